"""Order-independent sums of client updates: fixed-point int64 accumulation.

Floating-point addition is not associative, so summing updates in a
different order (another rank count, another assignment of clients to
ranks) would change the last bits of the global model. Integers add exactly
in any order. Each weighted update w_k * u_k (weights summing to 1) is
rounded to int64 at a power-of-two scale chosen from a bound M >= max|u_k|
that every rank agrees on (an Allreduce MAX, which is exact), such that
  sum_k |w_k u_k| * scale <= M * scale <= 2**61,
leaving room for the rounding of each term. The resolution is
M * 2**-61 -- far finer than float32's, so nothing of the update is lost.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.jit import njit  # numba only where the kernels run (not on rank 0)

_HEADROOM_BITS = 61


def scale_for(bound: float) -> float:
    """Power-of-two scale for updates bounded in magnitude by `bound`."""
    if not math.isfinite(bound):
        raise FloatingPointError("a client update is not finite")
    if bound == 0.0:
        return 1.0
    _, exp = math.frexp(bound)  # bound < 2**exp
    return math.ldexp(1.0, _HEADROOM_BITS - exp)


def accumulate(acc: np.ndarray, update: np.ndarray, weight: float, scale: float) -> None:
    """acc += round(update * weight * scale), exactly representable, in place."""
    _accumulate(acc, update, weight * scale)  # weight * 2**k: exact


@njit(cache=True)
def _accumulate(acc, update, factor):
    # one pass, no float64/int64 temporaries of the model's size; np.rint
    # rounds half to even, the same on every rank
    for i in range(acc.shape[0]):
        acc[i] += np.int64(np.rint(np.float64(update[i]) * factor))


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


def to_float(acc: np.ndarray, scale: float) -> np.ndarray:
    """The weighted sum as float64 (division by a power of two: exact)."""
    return acc.astype(np.float64) / scale
