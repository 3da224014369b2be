"""The multilayer perceptron: layer sizes -> offsets into ONE flat float32 vector.

Everything that moves or stores a model (MPI collectives, HDF5, compression,
privacy) sees only the flat vector; the layers are views into it. Layer l has
weights W_l of shape (sizes[l], sizes[l+1]) stored row-major -- one row per
*input* unit, so a zero input (a black pixel, a ReLU that did not fire) skips
a whole contiguous row in the kernels -- followed by its bias b_l.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

INITS = ("glorot_uniform", "he_uniform")


@dataclass(frozen=True)
class MLP:
    sizes: tuple[int, ...]  # (inputs, hidden..., classes)

    def __post_init__(self):
        if len(self.sizes) < 2 or any(int(s) < 1 for s in self.sizes):
            raise ValueError(f"bad layer sizes {self.sizes}")

    @property
    def num_layers(self) -> int:
        return len(self.sizes) - 1

    @property
    def weight_offsets(self) -> np.ndarray:
        return self._offsets()[0]

    @property
    def bias_offsets(self) -> np.ndarray:
        return self._offsets()[1]

    @property
    def num_params(self) -> int:
        s = self.sizes
        return int(sum(s[i] * s[i + 1] + s[i + 1] for i in range(len(s) - 1)))

    def _offsets(self):
        woff = np.empty(self.num_layers, np.int64)
        boff = np.empty(self.num_layers, np.int64)
        pos = 0
        for i in range(self.num_layers):
            woff[i] = pos
            pos += self.sizes[i] * self.sizes[i + 1]
            boff[i] = pos
            pos += self.sizes[i + 1]
        return woff, boff

    @property
    def sizes_array(self) -> np.ndarray:
        return np.asarray(self.sizes, dtype=np.int64)

    def layers(self, flat: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(W, b) views into `flat`: writing to them writes the flat vector."""
        if flat.shape != (self.num_params,):
            raise ValueError(f"expected {self.num_params} parameters, got {flat.shape}")
        woff, boff = self._offsets()
        out = []
        for i in range(self.num_layers):
            n_in, n_out = self.sizes[i], self.sizes[i + 1]
            w = flat[woff[i]:woff[i] + n_in * n_out].reshape(n_in, n_out)
            out.append((w, flat[boff[i]:boff[i] + n_out]))
        return out

    def init(self, rng: np.random.Generator, scheme: str = "glorot_uniform") -> np.ndarray:
        """A fresh flat float32 parameter vector; biases start at zero."""
        flat = np.zeros(self.num_params, np.float32)
        for w, _ in self.layers(flat):
            fan_in, fan_out = w.shape
            if scheme == "glorot_uniform":
                limit = np.sqrt(6.0 / (fan_in + fan_out))
            elif scheme == "he_uniform":
                limit = np.sqrt(6.0 / fan_in)
            else:
                raise ValueError(f"unknown init {scheme!r}; choose from {INITS}")
            w[...] = rng.uniform(-limit, limit, size=w.shape).astype(np.float32)
        return flat
