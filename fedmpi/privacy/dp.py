"""User-level DP-FedAvg: clip each client's update, add Gaussian noise to the sum.

McMahan et al., ICLR 2018 ("Learning differentially private recurrent
language models"), with rank 0 as the trusted aggregator:
- client: the update Delta_k is scaled to L2 norm at most S
  (--dp-clip-per-layer: layer l to S_l = S sqrt(P_l / P), so that
  sum_l S_l^2 = S^2 and the whole update still has norm <= S);
- server: the sum of the clipped updates gets N(0, (z S)^2) per coordinate and
  is divided by the expected number of clients per round K, not by the
  clients' sample counts (data-dependent weights would break the sensitivity
  bound S). The noise is drawn from the (seed, round, "dp-noise") generator on
  rank 0, so it is the same for any number of ranks.

Adaptive clipping (Andrew et al., NeurIPS 2021, "Differentially private
learning with adaptive clipping"), on with --dp-clip-quantile gamma: each
client also reports b_k = 1[||Delta_k|| <= S]; the server sums b_k - 1/2
(sensitivity 1/2), adds N(0, sigma_b^2), estimates the unclipped fraction
b = noised / K + 1/2 and moves S <- S exp(-eta (b - gamma)). The noise
multiplier z the user gives is the total: the update gets
z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), and by the paper's Theorem 1 the
pair costs exactly what one Gaussian round with multiplier z costs, which is
what the accountant composes. S is server state: checkpointed and resumed.
"""

from __future__ import annotations

import importlib.util
import math

import numpy as np

from fedmpi.errors import UserError
from fedmpi.pipeline import ServerContext, Stage, restore
from fedmpi.privacy.accounting import Accountant, resolve_accountant
from fedmpi.rng import generator

# per-round metrics; units and descriptions are in fedmpi.results.ROUND_FIELDS
ROUND_COLUMNS = ("epsilon", "dp_clip_norm", "dp_clipped_fraction", "dp_median_norm",
                 "dp_noise_std")


def update_noise_multiplier(z: float, count_stddev: float) -> float:
    """z_Delta for the update when the clip count takes noise count_stddev (Andrew et al. Thm 1)."""
    if z == 0:
        return 0.0
    if count_stddev == 0:
        return z
    rest = z ** -2 - (2.0 * count_stddev) ** -2
    if rest <= 0:
        raise ValueError(f"the clip-count noise (stddev {count_stddev:g}) alone costs more than "
                         f"noise multiplier {z:g} allows")
    return rest ** -0.5


def layer_segments(model) -> list[tuple[int, int]]:
    """[start, stop) of each layer (W_l then b_l) in the flat vector."""
    woff = model.weight_offsets
    return [(int(woff[i]), int(model.bias_offsets[i]) + model.sizes[i + 1])
            for i in range(model.num_layers)]


def clip(update: np.ndarray, bound: float, segments=None) -> tuple[float, bool]:
    """Scale `update` in place to L2 norm <= bound; (norm before, clipped?).

    With `segments` ([start, stop) per layer), layer l is clipped to
    bound * sqrt(P_l / P) instead: per-layer bounds whose squares add up to
    bound^2. Norms are computed in float64.
    """
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if segments is None:
        if norm > bound:
            update *= np.float32(bound / norm)
            # float32 rounding may leave the norm a hair above the bound
            while float(np.linalg.norm(update.astype(np.float64))) > bound:
                update *= np.float32(1 - 2 ** -23)
            return norm, True
        return norm, False
    clipped = False
    total = update.shape[0]
    for start, stop in segments:
        seg = update[start:stop]
        b = bound * math.sqrt((stop - start) / total)
        n = float(np.linalg.norm(seg.astype(np.float64)))
        if n > b:
            seg *= np.float32(b / n)
            while float(np.linalg.norm(seg.astype(np.float64))) > b:
                seg *= np.float32(1 - 2 ** -23)
            clipped = True
    return norm, clipped


class GaussianDP(Stage):
    name = "dp"
    client_columns = ("update_norm", "clipped")
    round_columns = ROUND_COLUMNS
    fixed_denominator = True

    def __init__(self, cfg, model):
        if importlib.util.find_spec("dp_accounting") is None:  # every rank raises alike
            raise UserError("differential privacy needs Google's dp-accounting package for its "
                            "accountant: pip install 'fedmpi[dp]' (or pip install dp-accounting)")
        self.z = float(cfg.dp_noise_multiplier)
        self.delta = cfg.dp_delta
        self.expected = cfg.clients_per_round
        self.segments = layer_segments(model) if cfg.dp_clip_per_layer else None
        self.quantile = cfg.dp_clip_quantile
        self.clip_lr = cfg.dp_clip_lr
        self.count_stddev = 0.0
        if self.quantile is not None:
            self.count_stddev = (cfg.dp_clip_count_stddev if cfg.dp_clip_count_stddev is not None
                                 else cfg.clients_per_round / 20.0)
        try:
            self.z_update = update_noise_multiplier(self.z, self.count_stddev)
        except ValueError as e:
            raise UserError(f"{e}: adaptive clipping needs --dp-clip-count-stddev above "
                            f"half the noise multiplier ({self.z / 2:g})") from None
        self.accountant_kind = resolve_accountant(cfg.dp_accountant, cfg.sampling)
        self._cfg = cfg
        self._accountant = None  # built on first use: only rank 0 accounts
        self._clip = np.array([cfg.dp_clip], np.float64)  # S: server state
        # --dp-noise-at clients: each client adds N(0, (z S)^2 / t); a sum of m >= t of them
        # (secagg unmasks no fewer) carries m/t >= 1 times the accounted variance
        self.noise_share = 0.0
        if cfg.dp_noise_at == "clients":
            from fedmpi.privacy.secagg import round_plan
            self.noise_share = 1.0 / round_plan("secagg", cfg.clients_per_round,
                                                cfg.secagg_threshold).threshold

    @property
    def accountant(self) -> Accountant:
        if self._accountant is None:
            c = self._cfg
            self._accountant = Accountant(self.accountant_kind, c.sampling, c.clients,
                                          c.clients_per_round, self.z, self.delta)
        return self._accountant

    def attrs(self) -> dict:
        """What the results file's attributes record about the mechanism."""
        c = self._cfg
        return {"dp_noise_multiplier": self.z, "dp_update_noise_multiplier": self.z_update,
                "dp_sampling_rate": c.clients_per_round / c.clients, "dp_delta": self.delta,
                "dp_accountant": self.accountant_kind, "sampling": c.sampling,
                "dp_noise_at": c.dp_noise_at}

    @property
    def description(self) -> str:
        c = self._cfg
        how = "per layer" if self.segments else "whole update"
        adaptive = (f" (adaptive: quantile {self.quantile:g}, lr {self.clip_lr:g}, count noise "
                    f"{self.count_stddev:g})" if self.quantile is not None else "")
        where = (f", added by the clients (1/{round(1 / self.noise_share)} of the variance each)"
                 if self.noise_share else "")
        return (f"differential privacy: clip {how} to S={c.dp_clip:g}{adaptive}{where}, noise "
                f"multiplier z={self.z:g} (update {self.z_update:.4g}), sum / {self.expected}, "
                f"{c.sampling} sampling q={c.clients_per_round / c.clients:.4g}, "
                f"{self.accountant_kind.upper()} accountant at delta={self.delta:g}: "
                f"epsilon {self.accountant.epsilon(c.rounds):.4g} after {c.rounds} rounds")

    def round_params(self, rnd: int) -> dict:
        return {"clip": float(self._clip[0])}

    def client(self, update, ctx) -> None:
        bound = ctx.params[self.name]["clip"]
        norm, clipped = clip(update, bound, self.segments)
        if self.noise_share:
            std = self.z_update * bound * math.sqrt(self.noise_share)
            noise = generator(ctx.seed, "dp-client-noise", ctx.rnd, ctx.client_id)
            update += (std * noise.standard_normal(update.shape[0])).astype(np.float32)
        ctx.metrics["update_norm"] = norm
        ctx.metrics["clipped"] = float(clipped)

    def server(self, mean: np.ndarray, ctx: ServerContext) -> np.ndarray:
        bound = ctx.params[self.name]["clip"]
        std = self.z_update * bound / self.expected
        if self.noise_share:  # the clients added it: what the sum of those reporting carries
            std *= math.sqrt(self.noise_share * len(ctx.clients))
        elif std > 0:
            noise = generator(ctx.seed, "dp-noise", ctx.rnd).standard_normal(mean.shape[0])
            mean = mean + std * noise
        clipped = ctx.client_metrics["clipped"]
        norms = ctx.client_metrics["update_norm"]
        if self.quantile is not None:
            # centred bits b_k - 1/2 have sensitivity 1/2 (the paper's factor 2)
            below = float(np.sum(0.5 - clipped))
            if self.count_stddev > 0:
                below += self.count_stddev * float(
                    generator(ctx.seed, "dp-clip-count", ctx.rnd).standard_normal())
            fraction = below / self.expected + 0.5
            self._clip[0] = bound * math.exp(-self.clip_lr * (fraction - self.quantile))
        n = clipped.shape[0]
        self.accountant.prefetch(ctx.rnd, self._cfg.rounds)  # once; later rounds come ready
        ctx.metrics.update({
            "epsilon": self.accountant.epsilon(ctx.rnd),
            "dp_clip_norm": bound,
            "dp_clipped_fraction": float(clipped.mean()) if n else math.nan,
            "dp_median_norm": float(np.median(norms)) if n else math.nan,
            "dp_noise_std": std,
        })
        return mean

    def summary(self, final_params) -> dict:
        """After the last round (rank 0): the accountant's thread has done its work; let it
        end before the process does."""
        if self._accountant is not None:
            self._accountant.join()
        return {}

    def state(self) -> dict[str, np.ndarray]:
        return {"dp_clip_norm": self._clip}

    def load_state(self, arrays) -> None:
        restore(self._clip, arrays, "dp_clip_norm", "differential privacy's clip norm")
