"""numba's @njit, with numba imported at the first call instead of at import.

Importing numba costs a process ~0.4 s and its first use another ~0.3 s.
Rank 0 of a multi-rank job runs no kernels, so the modules it shares with
the ranks that train (aggregate) declare their kernels with this decorator,
and rank 0 never imports numba. The result is a plain Python function: call
it from Python, not from other compiled code (use numba.njit there).
"""

from __future__ import annotations

import functools


def njit(**options):
    """Like numba.njit(**options), compiled (or loaded from the cache) when first called."""
    def decorate(py_func):
        dispatcher = None

        @functools.wraps(py_func)
        def call(*args):
            nonlocal dispatcher
            if dispatcher is None:
                import numba

                dispatcher = numba.njit(**options)(py_func)
            return dispatcher(*args)

        return call
    return decorate


def load_numba() -> None:
    """Import numba and its NumPy support without SciPy's BLAS bindings.

    When SciPy is installed, loading numba's NumPy support (at the first
    compiled call) imports scipy.linalg to probe its BLAS: ~0.2 s per
    process, for np.dot, which no fedmpi kernel calls. scipy.linalg is
    hidden while that module loads and importable again right after (and
    numba still finds the BLAS if compiled code ever calls np.dot). Call
    this before the first compiled call of a process; it does nothing after.
    """
    import sys

    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        import numba  # noqa: F401 -- too late to skip the probe, or nothing to skip
        return
    sys.modules["scipy.linalg"] = None  # an import of it now fails at once
    try:
        import numba.np.arraymath  # noqa: F401 -- the probe, failing fast
    finally:
        if sys.modules.get("scipy.linalg", 0) is None:
            del sys.modules["scipy.linalg"]
