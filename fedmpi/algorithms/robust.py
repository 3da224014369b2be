"""Byzantine-robust aggregation of client updates.

Instead of the sample-weighted mean, the server combines the round's K
updates coordinate by coordinate:
- median: the coordinate-wise median;
- trimmed_mean: per coordinate, drop the floor(trim * K) largest and as many
  smallest values and average the rest (unweighted, as in the paper).
Both sort each coordinate's values, so the result does not depend on the
order in which updates arrive (Yin et al., ICML 2018).
- krum: the one update closest to its n - f - 2 nearest neighbours
  (Blanchard et al., NeurIPS 2017): score(i) = sum of the squared distances
  from V_i to its n - f - 2 closest other updates; the update with the lowest
  score wins. Needs n > 2f + 2.
- multikrum: the plain mean of the m updates with the lowest scores (the
  paper's Multi-Krum; m = n - f unless given).
Ties in the score go to the lower client id (updates arrive in id order).
All need every update at the server: the runtime gathers them (MPI
Gatherv) instead of summing them.
"""

from __future__ import annotations

import numpy as np


def coordinate_median(updates: np.ndarray) -> np.ndarray:
    """(K, P) float32 updates -> (P,) float64 coordinate-wise median."""
    return np.median(updates.astype(np.float64), axis=0)


def trimmed_mean(updates: np.ndarray, trim: float) -> np.ndarray:
    """(K, P) float32 updates -> (P,) float64 coordinate-wise trimmed mean."""
    k = updates.shape[0]
    cut = int(np.floor(trim * k))
    if 2 * cut >= k:
        raise ValueError(f"trimming {cut} of {k} updates from each side leaves none")
    ordered = np.sort(updates.astype(np.float64), axis=0)
    return ordered[cut:k - cut].mean(axis=0)


_KRUM_BLOCK = 8192  # coordinates per pass of krum_scores


def krum_scores(updates: np.ndarray, f: int) -> np.ndarray:
    """Krum score of each of the (n, P) updates: sum of squared L2 distances to
    its n - f - 2 nearest other updates (float64)."""
    n = updates.shape[0]
    if n <= 2 * f + 2:
        raise ValueError(f"Krum with f = {f} needs more than {2 * f + 2} updates, got {n}")
    # squared distances via differences, not |a|^2 + |b|^2 - 2ab: no cancellation;
    # over blocks of coordinates, so the float64 temporaries are n x BLOCK, not n x P
    # (100 updates of the 2NN would need 160 MB per copy); each pair once
    d2 = np.zeros((n, n))
    for lo in range(0, updates.shape[1], _KRUM_BLOCK):
        u = updates[:, lo:lo + _KRUM_BLOCK].astype(np.float64)
        for i in range(n - 1):
            diff = u[i + 1:] - u[i]
            d2[i, i + 1:] += np.einsum("ij,ij->i", diff, diff)
    d2 += d2.T
    d2[np.arange(n), np.arange(n)] = np.inf  # a vector is not its own neighbour
    nearest = np.sort(d2, axis=1)[:, :n - f - 2]
    return nearest.sum(axis=1)


def krum_select(updates: np.ndarray, f: int, m: int = 1) -> np.ndarray:
    """Row indices of the m updates with the lowest Krum scores (ties: lower index first)."""
    return np.argsort(krum_scores(updates, f), kind="stable")[:m]


def krum(updates: np.ndarray, f: int) -> np.ndarray:
    """(n, P) float32 updates -> (P,) float64: the update Krum selects."""
    return updates[krum_select(updates, f, 1)[0]].astype(np.float64)


def multikrum(updates: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    """(n, P) float32 updates -> (P,) float64 mean of the m best-scored (default n - f)."""
    n = updates.shape[0]
    m = n - f if m is None else min(m, n - f)
    chosen = np.sort(krum_select(updates, f, m))  # sum in id order
    return updates[chosen].astype(np.float64).mean(axis=0)
