"""Every random draw of a run comes from a generator made here.

A generator is named by (run seed, purpose, round, client): never by the MPI
rank or by global state, so a client's draws are the same whichever rank
trains it and however many ranks there are.
"""

from __future__ import annotations

import numpy as np

# Fixed codes: changing one changes every result drawn with it.
PURPOSES = {
    "init": 1,  # global model initialisation
    "sample": 2,  # which clients take part in a round
    "shuffle": 3,  # a client's minibatch order
    # secure aggregation: codes 20-29 (kept apart from other features' codes)
    "secagg_keys": 20,  # a client's key pairs, self-mask seed and Shamir coefficients
    "secagg_graph": 21,  # the SecAgg+ neighbour graph of a round
    "secagg_dropout": 22,  # the protocol phase in which a failing client stops
}


def generator(seed: int, purpose: str, round_: int = 0, client: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, PURPOSES[purpose], round_, client]))
