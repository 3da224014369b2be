"""FedSGD (McMahan et al. 2017): each client sends one full-batch gradient.

w <- w - server_lr * lr * sum_k (n_k / n) g_k(w): one step of large-batch
gradient descent, the baseline FedAvg is compared against. Only the client
side differs from FedAvg: the update is -lr * g instead of a local delta.
"""

from __future__ import annotations

import numpy as np

from fedmpi.algorithms.base import ClientResult, FedAvg


class FedSGD(FedAvg):
    def client_update(self, trainer, global_params, indices, rng, **work) -> ClientResult:
        grad, loss = trainer.gradient(global_params, indices, work.get("flip_labels", False))
        np.multiply(grad, np.float32(-self.cfg.lr), out=self._local)
        return ClientResult(self._local, loss, int(indices.shape[0]), 1)
