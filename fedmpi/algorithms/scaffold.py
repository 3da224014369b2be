"""SCAFFOLD (Karimireddy et al., ICML 2020), Algorithm 1 with option II control variates.

Client drift under non-IID data is corrected with control variates: the
server keeps c, each client i keeps c_i (both zero at the start), and
client i's K local SGD steps follow the corrected gradient

    y <- y - lr (g_i(y) - c_i + c)

(the kernels add `correction` = c - c_i to every local gradient). Option II
then sets c_i+ = c_i - c + (x - y_i) / (K lr) and the client sends
Delta y_i = y_i - x and Delta c_i = c_i+ - c_i. The server steps

    x <- x + server_lr * sum_i p_i Delta y_i   (through the server optimizer)
    c <- c + (1/N) sum_i Delta c_i             (N = --clients, i over the reporting clients)

with p_i the run's client weights (1/|S| with --client-weighting uniform,
the paper's choice; n_i/n by default, as in FedAvg).

Both deltas travel in one exactly summed vector (`wire_size`): the model
part, zero padding to the fixed-point encoder's block boundary, then the
control-variate part. Per-block weights give the model blocks p_i and the
control blocks 1/N, so one exact int64 sum yields both results, the same for
any number of ranks. c_i is per-client state (a row of the client-state
store, fedmpi/state.py, held on rank 0 and moved to whichever rank trains
the client); c travels down with the model each round.
"""

from __future__ import annotations

import numpy as np

from fedmpi import aggregate
from fedmpi.algorithms.base import ClientResult, FedAvg
from fedmpi.pipeline import restore
from fedmpi.state import ClientStateStore


class Scaffold(FedAvg):
    client_state = "scaffold_c"  # the store's name in checkpoints

    def __init__(self, cfg, model):
        super().__init__(cfg, model)
        p = model.num_params
        self.side_offset = aggregate.num_blocks(p) * aggregate.BLOCK  # control part's start
        self.wire_size = self.side_offset + p
        self.values_sent = 2 * p  # Delta y and Delta c (the padding is not sent: bytes_up)
        self.c = np.zeros(p, np.float32)  # the server's control variate, on every rank
        self.store = ClientStateStore(p, name=self.client_state, spill_dir=cfg.client_state_dir,
                                      max_rows=cfg.clients)
        self.description = (f"SCAFFOLD (option II): control variates {self.store.describe(cfg.clients)}"
                            "; --client-state-dir DIR keeps them on disk")
        self._wire = None
        self._correction = None

    @property
    def downlink(self) -> list[np.ndarray]:
        return [self.c]

    def client_update(self, trainer, global_params, indices, rng, state=None,
                      **work) -> ClientResult:
        """`state`: the client's c_i (float32 (P,), zeros before its first round),
        updated in place to c_i+."""
        p = self.model.num_params
        if self._wire is None:
            self._wire = np.zeros(self.wire_size, np.float32)
            self._correction = np.empty(p, np.float32)
        c_i = np.zeros(p, np.float32) if state is None else state  # (the warm-up's call)
        np.subtract(self.c, c_i, out=self._correction)
        local = self._local
        local[:] = global_params
        loss, seen, steps = trainer.train(local, indices, rng, correction=self._correction,
                                          **work)
        dy = self._wire[:p]
        np.subtract(local, global_params, out=dy)
        # option II: c_i+ = c_i - c + (x - y_i) / (K lr), in float64, stored as float32
        new_c = (c_i.astype(np.float64) - self.c
                 - dy.astype(np.float64) / (max(steps, 1) * self.cfg.lr)).astype(np.float32)
        dc = self._wire[self.side_offset:]
        np.subtract(new_c, c_i, out=dc)
        c_i[:] = new_c
        return ClientResult(self._wire, loss, seen, steps)

    def round_weights(self, p, sizes, work) -> np.ndarray:
        """Per client and fixed-point block: p_i on the model part, 1/N on the control part."""
        blocks = aggregate.num_blocks(self.wire_size)
        model_blocks = self.side_offset // aggregate.BLOCK
        w = np.empty((p.shape[0], blocks), np.float64)
        w[:, :model_blocks] = p[:, None]
        w[:, model_blocks:] = 1.0 / self.cfg.clients
        return w

    def split(self, combined):
        return combined[:self.model.num_params], combined[self.side_offset:]

    def server_step(self, global_params, mean_update, side=None) -> np.ndarray:
        """New model from the weighted model part; c moves by the control part."""
        if side is not None:
            self.c[:] = (self.c.astype(np.float64) + side).astype(np.float32)
        return super().server_step(global_params, mean_update)

    def server_state(self) -> dict[str, np.ndarray]:
        return {**super().server_state(), "scaffold_c": self.c, **self.store.checkpoint()}

    def load_server_state(self, arrays) -> None:
        super().load_server_state(arrays)
        restore(self.c, arrays, "scaffold_c", "SCAFFOLD's server control variate")
        self.store.restore(arrays, "SCAFFOLD")
