"""Train one client: (global params, its samples, settings, rng) -> new params + metrics.

No MPI, no I/O. A rank keeps one LocalTrainer and reuses its buffers for
every client it hosts, so training a client allocates only its copy of the
model.
"""

from __future__ import annotations

import numpy as np

from fedmpi.config import Config
from fedmpi.data import Dataset
from fedmpi.model import kernels
from fedmpi.model.mlp import MLP
from fedmpi.rng import generator

_EMPTY = np.zeros(0, np.float32)
MAX_SHIFT = 2  # --augment shift: pixels a sample moves at most along each axis


class LocalTrainer:
    def __init__(self, cfg: Config, model: MLP, data: Dataset):
        self.cfg = cfg
        self.model = model
        self.data = data
        self._sizes = model.sizes_array
        self._woff = model.weight_offsets
        self._boff = model.bias_offsets
        self._ws = kernels.workspace(self._sizes)
        self._grad = kernels.aligned_zeros(model.num_params)
        self._state = kernels.aligned_zeros(2 * model.num_params)  # momentum or Adam m, v
        self._xscale = np.float32(data.x_scale)
        self._loss = kernels.LOSSES[cfg.loss]
        self._opt = kernels.OPTIMIZERS[cfg.optimizer]
        self._flipped = None  # labels C-1-y, made on first use by a label-flipping attacker
        self._eval_orders: dict[tuple[int, int], np.ndarray] = {}  # test chunk -> grouped rows
        self._eval_ws = None

    def labels(self, flip: bool = False) -> np.ndarray:
        """Training labels; with `flip`, the label-flipping attack's C-1-y (one
        label array per rank, made once: the shard's samples are not copied)."""
        if not flip:
            return self.data.y_train
        if self._flipped is None:
            y = self.data.y_train
            self._flipped = (self.data.num_classes - 1 - y).astype(y.dtype)
        return self._flipped

    def augmentation(self, rnd: int, client: int) -> dict:
        """`train`'s keyword for a client's augmentation draws in round `rnd`
        (the (seed, "augment", rnd, client) generator); {} without --augment."""
        if not self.cfg.augments:
            return {}
        return {"augment_rng": generator(self.cfg.seed, "augment", rnd, client)}

    def _augment(self, rng: np.random.Generator, visits: int) -> kernels.Augment:
        """The kernels' augmentation of `visits` visited samples: the shifts
        (int8, 2 bytes a visit: the shard is not copied) are drawn here, first;
        the noise, from the same generator, by the kernel as it reads each sample."""
        if self.cfg.augment == "shift":
            shifts = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(visits, 2), dtype=np.int8)
        else:
            shifts = np.zeros((visits, 2), np.int8)
        h, w, c = self.data.image_shape
        return kernels.Augment(shifts, h, w, c, float(self.cfg.augment_noise), rng)

    def train(self, params: np.ndarray, indices: np.ndarray, rng: np.random.Generator,
              prox_mu: float = 0.0, anchor: np.ndarray = _EMPTY,
              correction: np.ndarray = _EMPTY, epochs: int | None = None,
              steps: int | None = None, flip_labels: bool = False,
              augment_rng: np.random.Generator | None = None) -> tuple[float, int, int]:
        """Local epochs in place on `params`; returns (loss sum, samples seen, steps).

        Each epoch visits the client's samples in a fresh random order drawn
        from `rng` (the client's own generator for this round). `epochs`
        overrides --local-epochs (a straggler's); `steps` cuts a single epoch
        to its first `steps` minibatches. `augment_rng` (see `augmentation`)
        draws --augment's shifts and noise for every visited sample.
        """
        cfg = self.cfg
        epochs = cfg.local_epochs if epochs is None else epochs
        order = np.concatenate([indices[rng.permutation(indices.shape[0])]
                                for _ in range(epochs)])
        if steps is not None:
            assert epochs == 1 and cfg.batch_size > 0
            order = order[:steps * cfg.batch_size]
        settings = kernels.train_settings(
            epochs, cfg.batch_size, self._loss, self._opt, cfg.lr, cfg.momentum,
            cfg.weight_decay, prox_mu=prox_mu)
        aug = None if augment_rng is None else self._augment(augment_rng, order.shape[0])
        loss, seen, steps = kernels.train_local(
            params, self._sizes, self._woff, self._boff, self.data.x_train, self._xscale,
            self.labels(flip_labels), order, settings, anchor, correction, self._grad,
            self._state, self._ws, aug)
        return float(loss), int(seen), int(steps)

    def gradient(self, params: np.ndarray, indices: np.ndarray,
                 flip_labels: bool = False) -> tuple[np.ndarray, float]:
        """Full-batch mean-loss gradient at `params` (a view of an internal buffer) and the loss sum."""
        loss = kernels.gradient(params, self._sizes, self._woff, self._boff, self.data.x_train,
                                self._xscale, self.labels(flip_labels),
                                np.ascontiguousarray(indices),
                                self._loss, self._grad, self._ws)
        return self._grad, float(loss)

    def evaluate(self, params: np.ndarray, start: int, stop: int) -> tuple[float, int]:
        """(loss sum, number correct) on test samples start..stop-1.

        The test set never changes, so each chunk's grouping of look-alike
        samples is computed once (the results do not depend on it)."""
        order = self._eval_orders.get((start, stop))
        if order is None:
            order = self._eval_orders[start, stop] = kernels.eval_order(
                self.data.x_test, start, stop)
        if self._eval_ws is None or self._eval_ws[1].shape[0] < (stop - start) * self._sizes[-1]:
            self._eval_ws = kernels.eval_workspace(self._sizes, stop - start)
        loss, correct = kernels.evaluate_grouped(params, self._sizes, self._woff, self._boff,
                                                 self.data.x_test, self._xscale,
                                                 self.data.y_test, order, self._loss,
                                                 self._eval_ws)
        return float(loss), int(correct)
