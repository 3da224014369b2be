"""One-shot empirical privacy estimation with canary clients.

Andrew, Kairouz, Oh, Oprea, McMahan, Suriyakumar (ICLR 2024), "One-shot
empirical privacy estimation for federated learning": alongside the real
clients, M canary clients take part in training; canary i's update is always
its own random unit direction c_i scaled to the clip norm. After the run,
the cosines between the final model delta theta_T - theta_0 and the inserted
canaries' directions are compared with those of M held-out directions that
were never inserted. Fitting a Gaussian to each set of cosines, the epsilon
at which an adversary could tell the two Gaussians apart (at the run's
delta) is an empirical estimate of the privacy the run actually gave a
worst-case client -- one run, no retraining, beside the accountant's bound.
The two Gaussians share one (pooled) spread, so the estimate is the epsilon
of a Gaussian mechanism with mu = (mean_inserted - mean_held_out) / spread.

Simulation: a canary is sampled like a real client (each round with
probability q = K/N, from the (seed, round, "canary") generator) and its
clipped update S_t c_i is added on rank 0 to the sum, before the DP noise,
with the same 1/K weight as every client. Directions come from the
(seed, "canary-direction", i) generator and are regenerated when needed, so
memory does not grow with M. The canaries are for measurement: they are not
counted as clients and their presence is not part of the accounted epsilon.
"""

from __future__ import annotations

import math

import numpy as np

from fedmpi.pipeline import ServerContext, Stage
from fedmpi.rng import generator


def direction(seed: int, index: int, num_params: int) -> np.ndarray:
    """Canary `index`'s random unit direction (float64)."""
    c = generator(seed, "canary-direction", 0, index).standard_normal(num_params)
    return c / np.linalg.norm(c)


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Smallest epsilon at which N(0, 1) and N(mu, 1) are (epsilon, delta)-indistinguishable.

    The Gaussian mechanism's exact curve (Balle & Wang, ICML 2018, Thm 8):
    delta(epsilon) = Phi(-epsilon/mu + mu/2) - e^epsilon Phi(-epsilon/mu - mu/2),
    decreasing in epsilon, solved by bisection; inf beyond epsilon = 100.
    """
    mu = abs(mu)
    if mu == 0:
        return 0.0

    def phi(x):
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def delta_of(eps):
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    if delta_of(0.0) <= delta:
        return 0.0
    lo, hi = 0.0, 100.0
    if delta_of(hi) > delta:
        return math.inf
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


class Canaries(Stage):
    name = "canary"
    round_columns = ("canaries_inserted",)

    def __init__(self, cfg, model, initial_params: np.ndarray):
        self.count = cfg.dp_canaries
        self.q = cfg.clients_per_round / cfg.clients
        self.expected = cfg.clients_per_round
        self.seed = cfg.seed
        self.delta = cfg.dp_delta
        self.initial = initial_params.astype(np.float64)
        self.description = (f"empirical privacy: {self.count} canary clients (sampled with "
                            f"q={self.q:.4g}) and {self.count} held-out directions")

    def server(self, mean: np.ndarray, ctx: ServerContext) -> np.ndarray:
        rng = generator(ctx.seed, "canary", ctx.rnd)
        chosen = np.flatnonzero(rng.random(self.count) < self.q)
        bound = ctx.params["dp"]["clip"]
        for i in chosen.tolist():  # ascending: the same float64 sum every run
            mean = mean + (bound / self.expected) * direction(self.seed, i, mean.shape[0])
        ctx.metrics["canaries_inserted"] = len(chosen)
        return mean

    def summary(self, final_params: np.ndarray) -> dict:
        """Attributes for the results file, from the final model (rank 0)."""
        delta_model = final_params.astype(np.float64) - self.initial
        norm = np.linalg.norm(delta_model)
        p = delta_model.shape[0]
        cos = np.array([direction(self.seed, i, p) @ delta_model / norm if norm > 0 else 0.0
                        for i in range(2 * self.count)])
        inserted, held_out = cos[:self.count], cos[self.count:]
        m1, s1 = float(inserted.mean()), float(inserted.std(ddof=1))
        m0, s0 = float(held_out.mean()), float(held_out.std(ddof=1))
        # one pooled spread: both sets of cosines carry the same projection of the noise and
        # of the other updates, and with a few hundred canaries the two sample spreads differ
        # by chance by ~10%, which a two-variance model would read as (spurious) privacy loss
        # in the tails
        pooled = math.sqrt(0.5 * (s0 * s0 + s1 * s1))
        if pooled == 0:
            return {"empirical_epsilon": math.inf, "empirical_epsilon_interval": [math.inf] * 2,
                    "canaries": self.count}

        def eps(shift):
            return gaussian_epsilon(max(shift, 0.0), self.delta)

        # 95% interval from the standard error of the difference of the two means
        mu, half = (m1 - m0) / pooled, 1.96 * math.sqrt(2.0 / self.count)
        return {"empirical_epsilon": eps(mu),
                "empirical_epsilon_interval": [eps(mu - half), eps(mu + half)],
                "canaries": self.count,
                "canary_cosine_inserted": [m1, s1], "canary_cosine_held_out": [m0, s0]}
