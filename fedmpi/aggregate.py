"""Order-independent sums of client updates: fixed-point int64 accumulation.

Floating-point addition is not associative, so summing updates in a
different order (another rank count, another assignment of clients to
ranks) would change the last bits of the global model. Integers add exactly
in any order. Each weighted update w_k * u_k is rounded to int64 at a
power-of-two scale and the integers are summed.

Scales are per block of BLOCK consecutive coordinates, not one for the whole
vector: the scale of block b comes from a bound M_b >= max_k |u_k| over that
block (every rank agrees on it with an Allreduce MAX, which is exact) and the
total weight W = sum_k |w_k|, such that

    sum_k |w_k u_k| * scale_b <= W * M_b * scale_b <= 2**61,

leaving room for the rounding of each term even when the weights do not sum
to 1 (a fixed DP denominator under Poisson sampling sums to count / K). The
resolution of block b is W M_b 2**-61. One diverging coordinate (or one
malicious client) coarsens only its own block, and the encoder counts the
coordinates it carries with fewer than COARSE_BITS significant bits, so the
run can say so instead of silently rounding them to zero.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

HEADROOM_BITS = 61
BLOCK = 1024  # coordinates per scale: 1/1024 of the model's size in agreed bounds
COARSE_BITS = 16  # a nonzero coordinate kept with fewer significant bits than this is "coarse"


def num_blocks(num_params: int) -> int:
    return -(-num_params // BLOCK)


def scale_for(bound: float, total_weight: float = 1.0) -> float:
    """Power-of-two scale for a block of terms w_k u_k with |u_k| <= bound, sum |w_k| = total_weight."""
    m = bound * max(total_weight, 1.0)
    if not math.isfinite(m):
        raise FloatingPointError("a client update is not finite")
    if m == 0.0:
        return 1.0
    _, exp = math.frexp(m)  # m < 2**exp
    return math.ldexp(1.0, HEADROOM_BITS - exp)


def scales_for(bounds: np.ndarray, total_weight: float = 1.0) -> np.ndarray:
    """Per-block scales (float64 powers of two) for per-block bounds."""
    return np.array([scale_for(float(b), total_weight) for b in bounds], np.float64)


@njit(cache=True)
def max_abs(x) -> float:
    """max |x_i| (0 for an empty array); inf if any element is NaN or inf.

    inf rather than NaN, so that max() and MPI's MAX keep it and scale_for
    rejects it: a NaN compares false with everything and would be dropped.
    """
    m = 0.0
    for i in range(x.shape[0]):
        a = abs(np.float64(x[i]))
        if not a <= m:
            m = a if a == a else np.inf
    return m


@njit(cache=True)
def block_max_abs(x, out) -> None:
    """out[b] = max(out[b], max |x_i| over block b), inf for NaN/inf (see max_abs)."""
    for i in range(x.shape[0]):
        b = i // BLOCK
        a = abs(np.float64(x[i]))
        if not a <= out[b]:
            out[b] = a if a == a else np.inf


def accumulate(acc: np.ndarray, update: np.ndarray, weight: float, scales) -> int:
    """acc += round(update * weight * scale_of_its_block), in place; returns the coarse count.

    `scales` is one power of two for the whole vector or one per block.
    weight * 2**k is exact, so every rank computes the same integers.
    """
    factors = np.broadcast_to(np.asarray(scales, np.float64) * weight,
                              (num_blocks(acc.shape[0]),))
    return _accumulate(acc, update, np.ascontiguousarray(factors), float(2 ** COARSE_BITS))


@njit(cache=True)
def _accumulate(acc, update, factors, coarse):
    # one pass, no float64/int64 temporaries of the model's size; np.rint
    # rounds half to even, the same on every rank
    n_coarse = 0
    for i in range(acc.shape[0]):
        u = np.float64(update[i])
        q = np.rint(u * factors[i // BLOCK])
        if u != 0.0 and abs(q) < coarse:
            n_coarse += 1
        acc[i] += np.int64(q)
    return n_coarse


def to_float(acc: np.ndarray, scales) -> np.ndarray:
    """The weighted sum as float64 (division by powers of two: exact)."""
    s = np.asarray(scales, np.float64)
    if s.ndim == 0:
        return acc.astype(np.float64) / s
    return acc.astype(np.float64) / np.repeat(s, BLOCK)[:acc.shape[0]]
