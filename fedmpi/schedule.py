"""Who takes part in a round, and which rank trains whom. Pure, same on every rank."""

from __future__ import annotations

import numpy as np

from fedmpi.rng import generator



def sample_clients(num_clients: int, per_round: int, seed: int, round_: int,
                   sampling: str = "fixed", sizes: np.ndarray | None = None) -> np.ndarray:
    """Client ids of a round, in ascending order.

    fixed: exactly `per_round` clients drawn without replacement: uniformly, or,
    given the clients' sample counts `sizes`, each draw with probability
    proportional to n_k among the clients not yet drawn (as FedProx's code
    samples: numpy choice with p = n_k/n, replace=False).
    poisson: each client independently with probability q = per_round /
    num_clients (a round may have none). Drawn as a Binomial(N, q) count and
    then that many distinct clients uniformly -- the same distribution as N
    independent coin flips, at O(count) cost instead of O(N).
    """
    rng = generator(seed, "sample", round_)
    p = None
    if sampling == "poisson":
        if sizes is not None:
            raise ValueError("Poisson sampling is uniform: no sample-proportional variant")
        count = int(rng.binomial(num_clients, per_round / num_clients))
    elif sampling == "fixed":
        count = per_round
        if sizes is not None:
            p = np.asarray(sizes, np.float64)
            p = p / p.sum()
    else:
        raise ValueError(f"unknown sampling {sampling!r}")
    return np.sort(rng.choice(num_clients, size=count, replace=False, p=p)).astype(np.int64)


def dropouts(clients: np.ndarray, rate: float, seed: int, round_: int) -> np.ndarray:
    """Boolean mask over `clients`: True where the client fails to report this round.

    One coin per (round, client) from the client's own generator, so whether
    a client drops out does not depend on which other clients were sampled.
    """
    if rate <= 0:
        return np.zeros(clients.shape[0], bool)
    return np.array([generator(seed, "dropout", round_, int(c)).random() < rate
                     for c in clients.tolist()], bool)


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


def stragglers(clients: np.ndarray, fraction: float, seed: int, round_: int) -> np.ndarray:
    """Boolean mask over `clients`: True for this round's stragglers.

    As in the FedProx paper's code (Li et al. 2020, flearn/trainers): of the
    round's K clients, K - round(K (1 - fraction)) are stragglers. Each client
    draws a key from its own (round, client) generator and the clients with
    the smallest keys straggle: the count is exact and the choice does not
    depend on the number of ranks.
    """
    k = clients.shape[0]
    count = k - int(round(k * (1.0 - fraction)))
    mask = np.zeros(k, bool)
    if count <= 0:
        return mask
    keys = [generator(seed, "straggler", round_, int(c)).random() for c in clients.tolist()]
    mask[np.argsort(keys, kind="stable")[:count]] = True
    return mask


def straggler_work(client: int, num_samples: int, epochs: int, batch: int, seed: int,
                   round_: int) -> dict:
    """The reduced local work of straggler `client` (LocalTrainer.train overrides).

    E >= 2: x ~ U{1..E-1} epochs, as the paper's code draws them
    (np.random.randint(1, E); the paper's text says "[1, E]"). E = 1: the
    first x ~ U{1..S-1} of its S minibatch steps; a client with one step per
    epoch cannot do less and does its full work.
    """
    rng = generator(seed, "straggler", round_, client)
    rng.random()  # the key `stragglers` drew
    if epochs >= 2:
        return {"epochs": int(rng.integers(1, epochs))}
    per_epoch = steps_per_epoch(num_samples, batch)
    if per_epoch >= 2:
        return {"steps": int(rng.integers(1, per_epoch))}
    return {}


def steps_per_epoch(num_samples: int, batch: int) -> int:
    """Minibatch steps in one local epoch (the kernels' rule: batch 0 or > n is full batch)."""
    if num_samples == 0:
        return 0
    if batch <= 0 or batch > num_samples:
        return 1
    return -(-num_samples // batch)


def local_steps(num_samples: int, batch: int, epochs: int, work: dict) -> int:
    """Optimizer steps a client takes with local-work overrides `work`."""
    if "steps" in work:
        return int(work["steps"])
    return int(work.get("epochs", epochs)) * steps_per_epoch(num_samples, batch)
