"""Magnitude pruning of the global model, with a persistent mask.

`prune_mask` sets, in every layer, the given fraction of the weights with the
smallest magnitude to pruned (biases are never pruned); weights pruned
before stay pruned (they are taken first), so the mask only ever grows. The
schedule is one-shot (all at one round) or gradual as in Zhu & Gupta 2017,
"To prune, or not to prune" (ICLR workshop 2018), eq. 1:

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (n * dt))^3,   t in t_0 .. t_0 + n*dt

What the server broadcasts is then the mask as a bitmap (P bits) plus the
surviving values (float32): `encode_masked` makes that buffer, and bytes_down
is its length.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.model.mlp import MLP

_HEADER = 8  # uint32 P, uint32 number of kept values


def num_pruned(fraction: float, n: int) -> int:
    """How many of n weights a sparsity `fraction` prunes: floor(fraction * n)."""
    return min(n, int(math.floor(fraction * n + 1e-9)))


def prune_mask(params: np.ndarray, model: MLP, sparsity: float,
               mask: np.ndarray | None = None) -> np.ndarray:
    """Boolean keep-mask (P,): per layer, floor(sparsity * weights) smallest |w| pruned.

    Ties are broken by lower index (pruned first). Weights already pruned in
    `mask` are pruned again first, so the returned mask is a subset of `mask`.
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity:g}")
    keep = np.ones(model.num_params, bool) if mask is None else mask.copy()
    for (w, _), off in zip(model.layers(params), model.weight_offsets):
        n = w.size
        mag = np.abs(w.reshape(-1)).astype(np.float64)
        old = keep[off:off + n]
        mag[~old] = -1.0  # already pruned: always among the smallest
        cut = np.argsort(mag, kind="stable")[:num_pruned(sparsity, n)]
        old[cut] = False
    return keep


def apply_mask(params: np.ndarray, mask: np.ndarray) -> None:
    """Zero the pruned coordinates in place."""
    params[~mask] = 0.0


def sparsity_at(round_: int, final: float, start: int, end: int, every: int = 1,
                initial: float = 0.0) -> float:
    """Zhu & Gupta's cubic schedule; start == end is one-shot pruning at `start`.

    Updated every `every` rounds from `start` (n * dt = end - start); 0 before
    `start` (initial from there), `final` from `end` on.
    """
    if round_ < start:
        return 0.0
    if round_ >= end:
        return final
    t = start + ((round_ - start) // every) * every
    frac = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - frac) ** 3


def encode_masked(params: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """uint8 buffer: header, the keep-mask as a bitmap, the kept values as float32."""
    params = np.asarray(params, np.float32)
    kept = params[mask]
    header = np.array([params.size, kept.size], "<u4").view(np.uint8)
    return np.concatenate([header, np.packbits(mask, bitorder="little"),
                           kept.astype("<f4").view(np.uint8)])


def decode_masked(buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(params float32 (P,), keep-mask) from encode_masked's buffer."""
    buf = np.asarray(buf, np.uint8)
    p, k = (int(v) for v in buf[:_HEADER].view("<u4"))
    bitmap = -(-p // 8)
    if buf.size != _HEADER + bitmap + 4 * k:
        raise ValueError("corrupt pruned-model buffer")
    mask = np.unpackbits(buf[_HEADER:_HEADER + bitmap], count=p, bitorder="little").astype(bool)
    if int(mask.sum()) != k:
        raise ValueError("corrupt pruned-model buffer: mask and values disagree")
    params = np.zeros(p, np.float32)
    params[mask] = buf[_HEADER + bitmap:].view("<f4")
    return params, mask
