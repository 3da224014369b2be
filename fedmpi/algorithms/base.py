"""FedAvg (McMahan et al., AISTATS 2017) and the interface other algorithms extend.

An algorithm says three things, none of which knows about MPI:
- client_update: what one client sends, given the global model;
- weight: how much a client's update counts (normalised over the round);
- server_step: the new global model from the weighted mean of the updates.
The runtime does the rest (who trains whom, exact summation, broadcast).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from fedmpi.algorithms import robust
from fedmpi.algorithms.server_opt import ServerOptimizer
from fedmpi.config import Config
from fedmpi.model.mlp import MLP
from fedmpi.pipeline import restore

if TYPE_CHECKING:  # the server side of an algorithm runs without the kernels (and numba)
    from fedmpi.client import LocalTrainer


@dataclass(frozen=True)
class ClientResult:
    update: np.ndarray  # float32, what the client sends (may be a view of a scratch buffer)
    loss_sum: float  # sum of per-sample training losses the client saw
    samples_seen: int
    steps: int = 0  # local optimizer steps taken


class FedAvg:
    # per-client state the algorithm keeps across rounds (a ClientStateStore `store`
    # on rank 0, e.g. SCAFFOLD's control variates), named; None: no state
    client_state: str | None = None
    description = ""  # a line for the run's log

    """Clients run E local epochs; the server steps along the sample-weighted mean delta.

    With the default server optimizer: w <- w + server_lr * sum_k (n_k / n) (w_k - w),
    server_lr = 1 being the paper's; --server-optimizer avgm/adam/yogi give
    FedAvgM, FedAdam and FedYogi (see server_opt.py). --client-weighting uniform
    replaces n_k / n by 1 / K (as in FedAdam/FedYogi's Algorithm 2).
    """

    def __init__(self, cfg: Config, model: MLP):
        self.cfg = cfg
        self.model = model
        self.server_opt = ServerOptimizer(
            cfg.server_optimizer, model.num_params, lr=cfg.server_lr,
            momentum=cfg.server_momentum, beta1=cfg.server_beta1, beta2=cfg.server_beta2,
            tau=cfg.server_tau)
        self._scratch = None
        # float32 values each client sends: the vector summed (wire_size, maybe padded)
        # and the values in it (values_sent); both P unless clients send more (Scaffold)
        self.wire_size = self.values_sent = model.num_params

    @property
    def downlink(self) -> list[np.ndarray]:
        """Server state every client needs besides the model, sent down each round."""
        return []

    @property
    def _local(self) -> np.ndarray:
        """The client's model, trained in place: cache-line aligned, which the kernels
        run ~5% faster on; allocated on first use, on the ranks that train."""
        if self._scratch is None:
            from fedmpi.model.kernels import aligned_zeros

            self._scratch = aligned_zeros(self.model.num_params)
        return self._scratch

    def client_update(self, trainer: LocalTrainer, global_params: np.ndarray,
                      indices: np.ndarray, rng: np.random.Generator, state=None,
                      **work) -> ClientResult:
        """`work`: this client's overrides of local training (LocalTrainer.train's
        epochs, steps, flip_labels), e.g. for a straggler or an attacker; `state`:
        the client's row of the algorithm's per-client state (unused here)."""
        local = self._local
        local[:] = global_params
        loss, seen, steps = trainer.train(local, indices, rng, **work,
                                          **self.local_objective(global_params))
        np.subtract(local, global_params, out=local)
        return ClientResult(local, loss, seen, steps)

    def local_objective(self, global_params: np.ndarray) -> dict:
        """Extra terms of the client objective (keyword arguments of LocalTrainer.train)."""
        return {}

    @property
    def needs_each_update(self) -> bool:
        """True if the server step needs every client's update, not just their sum."""
        return self.cfg.aggregator != "mean"

    def combine(self, updates: np.ndarray) -> np.ndarray:
        """The round's update from all clients' updates ((K, P), in client-id order)."""
        if updates.shape[0] == 0:  # a Poisson-sampled round may have no client
            return np.zeros(updates.shape[1])
        kind, f = self.cfg.aggregator, self.cfg.byzantine
        if kind == "median":
            return robust.coordinate_median(updates)
        if kind == "trimmed_mean":
            return robust.trimmed_mean(updates, self.cfg.trim)
        if updates.shape[0] <= 2 * f + 2:
            # too few reports (Poisson sampling, drop-outs) for Krum's guarantee:
            # keep the model this round rather than trust an unprotected choice
            return np.zeros(updates.shape[1])
        if kind == "krum":
            return robust.krum(updates, f)
        return robust.multikrum(updates, f, self.cfg.multikrum_m)

    def weight(self, num_samples: int) -> float:
        """A client's weight in the mean (normalised over the round's clients)."""
        return float(num_samples) if self.cfg.client_weighting == "samples" else 1.0

    def round_weights(self, p: np.ndarray, sizes: np.ndarray, work: list[dict]) -> np.ndarray:
        """Final weights of the round's updates in the exact sum, from the
        normalised weights p (aligned with the round's clients, as are their
        sample counts and local-work overrides); FedAvg uses p as is."""
        return p

    def server_state(self) -> dict[str, np.ndarray]:
        """Server-side state beyond the model, saved in checkpoints."""
        return self.server_opt.state

    def load_server_state(self, arrays: dict[str, np.ndarray]) -> None:
        for name, a in self.server_opt.state.items():
            restore(a, arrays, name, f"server optimizer {self.server_opt.kind}")

    def split(self, combined: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """The combined wire vector as (the model's update, the rest or None)."""
        return combined, None

    def server_step(self, global_params: np.ndarray, mean_update: np.ndarray,
                    side: np.ndarray | None = None) -> np.ndarray:
        """New global params (float32) from the float64 weighted mean update; `side`:
        the combined values clients sent beyond the model's (wire_size > P)."""
        return self.server_opt.step(global_params, mean_update)
