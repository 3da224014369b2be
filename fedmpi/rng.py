"""The random draws of a run's rounds come from generators made here.

A generator is named by (run seed, purpose, round, client): never by the MPI
rank or by global state, so a client's draws are the same whichever rank
trains it and however many ranks there are. Three streams are seeded the
same way but elsewhere, next to the code that owns them: the data split
(fedmpi.data.partition, PARTITION_PURPOSE), the synthetic data set
(fedmpi.data.synthetic, SYNTHETIC_PURPOSE), and the kernels' warm-up in
fedmpi.runtime.loop, whose draws train a throwaway copy and reach no result.
"""

from __future__ import annotations

import numpy as np

# Fixed codes: changing one changes every result drawn with it.
PURPOSES = {
    "init": 1,  # global model initialisation
    "sample": 2,  # which clients take part in a round
    "shuffle": 3,  # a client's minibatch order
    "dp-noise": 4,  # Gaussian noise added to a round's sum of clipped updates (rank 0)
    "dp-clip-count": 5,  # noise on the count of unclipped clients (adaptive clipping)
    "dropout": 6,  # which sampled clients fail to report in a round
    "canary": 7,  # which canary clients take part in a round (empirical privacy)
    "canary-direction": 8,  # a canary's random unit update
    "straggler": 9,  # whether a round's client is a straggler and how much work it does
    "attackers": 10,  # which clients are malicious (one draw per run)
    "attack-noise": 11,  # a gaussian attacker's fake update
    "dp-client-noise": 12,  # a client's share of the DP noise (--dp-noise-at clients)
    "augment": 13,  # a client's per-sample image shifts and input noise (--augment)
    # secure aggregation: codes 20-29 (kept apart from other features' codes)
    "secagg-keys": 20,  # a client's key pairs, self-mask seed and Shamir coefficients
    "secagg-graph": 21,  # the SecAgg+ neighbour graph of a round
    "secagg-dropout": 22,  # the protocol phase in which a failing client stops
    "compress": 40,  # randk's coordinates, qsgd's stochastic rounding (uplink)
    "compress-down": 41,  # the same for the server's broadcast (--compress-down)
}


def generator(seed: int, purpose: str, round_: int = 0, client: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, PURPOSES[purpose], round_, client]))
