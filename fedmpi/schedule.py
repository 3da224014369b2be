"""Who takes part in a round, and which rank trains whom. Pure, same on every rank."""

from __future__ import annotations

import numpy as np

from fedmpi.rng import generator


def sample_clients(num_clients: int, per_round: int, seed: int, round_: int,
                   sizes: np.ndarray | None = None) -> np.ndarray:
    """Client ids of a round, drawn without replacement, in ascending order.

    Uniformly; or, given the clients' sample counts `sizes`, each draw with
    probability proportional to n_k among the clients not yet drawn (as
    FedProx's code samples: numpy choice with p = n_k/n, replace=False).
    """
    rng = generator(seed, "sample", round_)
    p = None
    if sizes is not None:
        p = np.asarray(sizes, np.float64)
        p = p / p.sum()
    return np.sort(rng.choice(num_clients, size=per_round, replace=False, p=p)).astype(np.int64)


def assign(clients: np.ndarray, sizes: np.ndarray, num_workers: int) -> list[np.ndarray]:
    """Spread clients over workers, balancing sample counts.

    Largest client first, each to the currently least-loaded worker (ties:
    fewer clients, then lower worker index) -- the greedy LPT rule, within
    4/3 of the best possible makespan. Every rank computes the same answer.
    Within a worker, clients stay in ascending id order.
    """
    order = sorted(clients.tolist(), key=lambda c: (-int(sizes[c]), c))
    load = [0] * num_workers
    count = [0] * num_workers
    out: list[list[int]] = [[] for _ in range(num_workers)]
    for c in order:
        w = min(range(num_workers), key=lambda i: (load[i], count[i], i))
        out[w].append(c)
        load[w] += int(sizes[c])
        count[w] += 1
    return [np.array(sorted(ws), dtype=np.int64) for ws in out]
