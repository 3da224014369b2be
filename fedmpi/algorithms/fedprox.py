"""FedProx (Li et al., MLSys 2020): clients minimise F_k(w) + mu/2 ||w - w_t||^2.

The proximal term keeps heterogeneous clients near the global model w_t.
Only the client objective differs from FedAvg: the kernels add
mu * (w - w_t) to every local gradient.
"""

from __future__ import annotations

from fedmpi.algorithms.base import FedAvg


class FedProx(FedAvg):
    def local_objective(self, global_params) -> dict:
        return {"prox_mu": self.cfg.prox_mu, "anchor": global_params}
