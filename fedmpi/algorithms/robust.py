"""Byzantine-robust aggregation of client updates (Yin et al., ICML 2018).

Instead of the sample-weighted mean, the server combines the round's K
updates coordinate by coordinate:
- median: the coordinate-wise median;
- trimmed_mean: per coordinate, drop the floor(trim * K) largest and as many
  smallest values and average the rest (unweighted, as in the paper).
Both sort each coordinate's values, so the result does not depend on the
order in which updates arrive. They need every update at the server: the
runtime gathers them (MPI Gatherv) instead of summing them.
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
