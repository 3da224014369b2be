"""FedNova (Wang et al., NeurIPS 2020): normalised averaging for unequal local work.

When clients take different numbers of local steps tau_i (different data
sizes, stragglers), FedAvg's sample-weighted mean of the deltas
Delta_i = w_i - w_t over-weights the clients that did more steps and
optimises a skewed objective. FedNova divides each delta by the L1 norm of
its step-weight vector a_i and rescales the mean by tau_eff:

    w <- w + server_lr * tau_eff * sum_i p_i Delta_i / ||a_i||_1,
    tau_eff = sum_i p_i ||a_i||_1,              p_i = n_i / n

- plain SGD: a_i = (1, ..., 1), ||a_i||_1 = tau_i;
- heavy-ball momentum rho (v <- rho v + g, w <- w - lr v, v_0 = 0):
  a_i,k = (1 - rho^(tau_i - k + 1)) / (1 - rho), so
  ||a_i||_1 = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho)  (the paper's formula).

Local training is FedAvg's; only the weights differ. tau_i follows from a
client's sample count, the batch size and its local work (stragglers), so
every rank computes the weights p_i tau_eff / ||a_i||_1 before training and
the exact fixed-point sum (whose scales allow for weights that do not sum
to 1) applies them; the client checks that it took the steps assumed.
"""

from __future__ import annotations

import numpy as np

from fedmpi import schedule
from fedmpi.algorithms.base import ClientResult, FedAvg


def step_weight_norm(steps: int, momentum: float = 0.0) -> float:
    """||a||_1 of `steps` local SGD steps with heavy-ball `momentum`."""
    if momentum == 0.0:
        return float(steps)
    r = momentum
    return (steps - r * (1.0 - r ** steps) / (1.0 - r)) / (1.0 - r)


def nova_weights(p: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Weights p_i tau_eff / ||a_i||_1 with tau_eff = sum_i p_i ||a_i||_1 (0 where a_i = 0)."""
    tau_eff = float(np.dot(p, norms))
    out = np.zeros(p.shape[0])
    did = norms > 0
    out[did] = p[did] * tau_eff / norms[did]
    return out


class FedNova(FedAvg):
    def _steps(self, num_samples: int, work: dict) -> int:
        c = self.cfg
        return schedule.local_steps(num_samples, c.batch_size, c.local_epochs, work)

    def round_weights(self, p, sizes, work) -> np.ndarray:
        norms = np.array([step_weight_norm(self._steps(int(n), w), self.cfg.momentum)
                          for n, w in zip(sizes.tolist(), work)], np.float64)
        return nova_weights(p, norms)

    def client_update(self, trainer, global_params, indices, rng, **work) -> ClientResult:
        res = super().client_update(trainer, global_params, indices, rng, **work)
        expected = self._steps(int(indices.shape[0]), work)
        if res.steps != expected:  # the weights were computed for `expected` steps
            raise RuntimeError(f"FedNova: a client took {res.steps} local steps, "
                               f"its weight assumed {expected}")
        return res
