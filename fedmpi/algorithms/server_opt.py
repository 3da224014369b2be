"""Server optimizers: how the server turns the mean client update into a step.

The mean update Delta_t = sum_k (n_k/n) (w_k - w_t) -- or, with
--client-weighting uniform, (1/K) sum_k (w_k - w_t) as in Reddi et al.'s
Algorithm 2 -- is used as a pseudo-gradient (with the sign of a descent
direction already applied), in float64 on rank 0:
- sgd:  w <- w + eta * Delta                      (FedAvg with eta = 1)
- avgm: v <- beta v + Delta; w <- w + eta v        (FedAvgM, Hsu et al. 2019)
- adam: m <- b1 m + (1-b1) Delta; v <- b2 v + (1-b2) Delta^2;
        w <- w + eta m / (sqrt(v) + tau)           (FedAdam, Reddi et al., ICLR 2021, Alg. 2)
- yogi: as adam but v <- v - (1-b2) Delta^2 sign(v - Delta^2)   (FedYogi, same paper)
As in the paper there is no bias correction, m starts at 0 and v at tau^2.
"""

from __future__ import annotations

import numpy as np

from fedmpi.config import SERVER_OPTIMIZERS  # the names users choose from: one list


class ServerOptimizer:
    def __init__(self, kind: str, num_params: int, *, lr: float, momentum: float = 0.9,
                 beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3):
        if kind not in SERVER_OPTIMIZERS:
            raise ValueError(f"unknown server optimizer {kind!r}")
        self.kind, self.lr, self.momentum = kind, lr, momentum
        self.beta1, self.beta2, self.tau = beta1, beta2, tau
        self.state: dict[str, np.ndarray] = {}
        if kind == "avgm":
            self.state["server_v"] = np.zeros(num_params)
        elif kind in ("adam", "yogi"):
            self.state["server_m"] = np.zeros(num_params)
            self.state["server_v"] = np.full(num_params, tau * tau)

    def step(self, params: np.ndarray, delta: np.ndarray) -> np.ndarray:
        """New float32 params from float32 params and the float64 mean update."""
        w = params.astype(np.float64)
        if self.kind == "sgd":
            return (w + self.lr * delta).astype(np.float32)
        v = self.state["server_v"]
        if self.kind == "avgm":
            v *= self.momentum
            v += delta
            return (w + self.lr * v).astype(np.float32)
        m = self.state["server_m"]
        m *= self.beta1
        m += (1.0 - self.beta1) * delta
        d2 = delta * delta
        if self.kind == "adam":
            v *= self.beta2
            v += (1.0 - self.beta2) * d2
        else:
            v -= (1.0 - self.beta2) * d2 * np.sign(v - d2)
        return (w + self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
