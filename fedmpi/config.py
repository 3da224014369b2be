"""Every setting of a run: defaults, validation, TOML file + command-line flags.

The resolved Config is frozen and saved (as JSON) with the results, so a
results file always says exactly how it was made. Precedence: built-in
defaults < --config FILE.toml < command-line flags; `--resume PATH` puts the
settings PATH's run was started with between the defaults and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import math
import sys
from dataclasses import dataclass, field, fields

from fedmpi.cli import ArgumentParser
from fedmpi.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("synthetic", "fashion-mnist", "mnist", "npz:PATH", "h5:PATH")
PARTITIONS = ("auto", "natural", "iid", "shards", "dirichlet", "dirichlet_clients")
ALGORITHMS = ("fedavg", "fedsgd", "fedprox", "fednova", "scaffold")
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum")
CLIENT_SAMPLINGS = ("uniform", "proportional")
CLIENT_WEIGHTINGS = ("samples", "uniform")
ATTACKS = ("none", "signflip", "gaussian", "labelflip")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")
SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("auto", "rdp", "pld")
DP_NOISE_AT = ("server", "clients")
SECURE_AGGREGATIONS = ("none", "secagg", "secagg+", "he")
INITS = ("glorot_uniform", "he_uniform")
COMPRESSORS = ("none", "topk", "randk", "qsgd", "sign", "fp16")
DOWN_COMPRESSORS = ("none", "fp16", "qsgd")
QSGD_CODINGS = ("elias", "fixed")
AUGMENTS = ("none", "shift")


def _opt(help_, choices=None, flag=None):
    return {"help": help_, "choices": choices, "flag": flag}


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = field(default="synthetic", metadata=_opt(
        "synthetic (built in: FedProx's Synthetic(alpha,beta)), fashion-mnist, mnist, npz:PATH, "
        "or h5:TRAIN.h5[,TEST.h5] (TensorFlow Federated's HDF5 layout: the file's users are "
        "the clients)"))
    data_dir: str | None = field(default=None, metadata=_opt(
        "directory with the IDX files (default: ./data/<name>/, then /usr/share/datasets/<name>/)"))
    synthetic_alpha: float = field(default=1.0, metadata=_opt(
        "Synthetic(alpha,beta): how much the clients' models differ"))
    synthetic_beta: float = field(default=1.0, metadata=_opt(
        "Synthetic(alpha,beta): how much the clients' inputs differ"))
    synthetic_mean_samples: float | None = field(default=None, metadata=_opt(
        "synthetic: mean samples per client M, sizes 2 + Poisson(M-2) (default: FedProx's "
        "lognormal, mean ~352); e.g. 20 for 100,000 small clients"))
    partition: str = field(default="auto", metadata=_opt(
        "how samples are split over clients; auto = natural for synthetic and h5, iid otherwise; "
        "dirichlet = per class over clients (the NIID-Bench variant), dirichlet_clients = "
        "per client over classes, equal sizes (Hsu et al. 2019)", PARTITIONS))
    alpha: float = field(default=0.5, metadata=_opt(
        "Dirichlet concentration for --partition dirichlet and dirichlet_clients (smaller = "
        "more label skew)"))
    shards_per_client: int = field(default=2, metadata=_opt(
        "label-sorted shards per client for --partition shards (McMahan et al. use 2)"))
    clients: int = field(default=100, metadata=_opt("number of simulated clients"))
    # federated schedule
    clients_per_round: int = field(default=10, metadata=_opt(
        "clients sampled (without replacement) each round"))
    client_sampling: str = field(default="uniform", metadata=_opt(
        "how the round's clients are drawn: uniform, or proportional to their sample counts "
        "(FedProx's experiments, Li et al. 2020; pair with --client-weighting uniform)",
        CLIENT_SAMPLINGS))
    client_weighting: str = field(default="samples", metadata=_opt(
        "weights of the clients' updates in the mean: samples (n_k/n, FedAvg) or uniform "
        "(1/K: FedAdam/FedYogi's Algorithm 2, Reddi et al. 2021; FedProx's)",
        CLIENT_WEIGHTINGS))
    rounds: int = field(default=50, metadata=_opt("number of communication rounds"))
    algorithm: str = field(default="fedavg", metadata=_opt("federated algorithm", ALGORITHMS))
    server_lr: float = field(default=1.0, metadata=_opt(
        "server learning rate applied to the averaged update (1 = plain FedAvg; "
        "try 0.01-0.1 with adam/yogi)"))
    server_optimizer: str = field(default="sgd", metadata=_opt(
        "server step on the mean update: sgd (FedAvg), avgm (FedAvgM), adam (FedAdam), "
        "yogi (FedYogi)", SERVER_OPTIMIZERS))
    server_momentum: float = field(default=0.9, metadata=_opt("momentum of --server-optimizer avgm"))
    server_beta1: float = field(default=0.9, metadata=_opt("beta1 of --server-optimizer adam/yogi"))
    server_beta2: float = field(default=0.99, metadata=_opt("beta2 of --server-optimizer adam/yogi"))
    server_tau: float = field(default=1e-3, metadata=_opt(
        "adaptivity tau of --server-optimizer adam/yogi (Reddi et al. 2021)"))
    aggregator: str = field(default="mean", metadata=_opt(
        "how the server combines the updates: mean (sample-weighted), or the Byzantine-robust "
        "coordinate-wise median or trimmed_mean (Yin et al. 2018)", AGGREGATORS))
    trim: float = field(default=0.1, metadata=_opt(
        "fraction of updates dropped from each side per coordinate by --aggregator trimmed_mean"))
    prox_mu: float = field(default=0.01, metadata=_opt(
        "proximal weight mu of --algorithm fedprox"))
    # Byzantine robustness, attacks and system heterogeneity (validated in _validate_algos)
    byzantine: int = field(default=0, metadata=_opt(
        "f: Byzantine clients per round that --aggregator krum/multikrum must tolerate "
        "(Blanchard et al. 2017; needs --clients-per-round > 2f + 2)"))
    multikrum_m: int | None = field(default=None, metadata=_opt(
        "m: updates --aggregator multikrum averages (the m best Krum scores; default: the "
        "round's clients minus f)"))
    stragglers: float = field(default=0.0, metadata=_opt(
        "fraction of each round's clients that are stragglers (FedProx paper, Li et al. 2020): "
        "K - round(K*(1-p)) of them, seeded per round, do x ~ U{1..E-1} local epochs instead "
        "of E (with E = 1: x ~ U{1..S-1} of their S minibatch steps)"))
    drop_stragglers: bool = field(default=False, metadata=_opt(
        "stragglers do not report (their work is discarded): the FedProx paper's FedAvg "
        "baseline; without it, their partial work is used (FedProx, FedNova)"))
    attack: str = field(default="none", metadata=_opt(
        "what malicious clients do: signflip (send -scale * update), gaussian (send "
        "N(0, scale^2) noise), labelflip (train on labels C-1-y)", ATTACKS))
    attackers: float = field(default=0.0, metadata=_opt(
        "fraction of the clients that are malicious (round(f*N) of them, seeded, fixed for "
        "the run) under --attack"))
    attack_scale: float = field(default=1.0, metadata=_opt(
        "scale of --attack signflip (update -> -scale*update) and standard deviation of "
        "--attack gaussian"))
    sampling: str = field(default="fixed", metadata=_opt(
        "how a round's clients are drawn: fixed (exactly --clients-per-round K, without "
        "replacement) or poisson (each client independently with q = K / --clients; a round "
        "may have none)", SAMPLINGS))
    dropout_rate: float = field(default=0.0, metadata=_opt(
        "probability that a sampled client fails to report its update (seeded per round and "
        "client); the server step uses the survivors"))
    # differential privacy (user-level DP-FedAvg; on when --dp-clip is given)
    dp_clip: float | None = field(default=None, metadata=_opt(
        "turns on user-level differential privacy (DP-FedAvg): clip each client's update to "
        "this L2 norm S; the server then averages the noised sum of clipped updates over the "
        "expected number of clients per round K, not by sample counts (sample weights would "
        "break the sensitivity bound)"))
    dp_clip_per_layer: bool = field(default=False, metadata=_opt(
        "clip layer l (W_l and b_l) to S*sqrt(P_l/P) instead of the whole update to S "
        "(the whole update still has norm <= S)"))
    dp_noise_multiplier: float | None = field(default=None, metadata=_opt(
        "z: Gaussian noise N(0, (z*S)^2) per coordinate on the sum of clipped updates; "
        "0 = clipping only (epsilon = inf)"))
    dp_target_epsilon: float | None = field(default=None, metadata=_opt(
        "solve, before the run, for the smallest noise multiplier (3 significant digits, "
        "rounded up) whose epsilon after --rounds is at most this; sets --dp-noise-multiplier"))
    dp_delta: float = field(default=1e-5, metadata=_opt(
        "delta of the reported (epsilon, delta) guarantee; below 1/--clients"))
    dp_accountant: str = field(default="auto", metadata=_opt(
        "privacy accountant (Google's dp-accounting): rdp or pld; auto = pld for poisson "
        "sampling, rdp for fixed (pld does not support sampling without replacement)",
        ACCOUNTANTS))
    dp_clip_quantile: float | None = field(default=None, metadata=_opt(
        "adaptive clipping (Andrew et al. 2021): move S each round towards this quantile of "
        "the update norms (--dp-clip is then the initial S); the count's noise is taken out "
        "of the noise multiplier so the total cost is what is accounted"))
    dp_clip_lr: float = field(default=0.2, metadata=_opt(
        "geometric learning rate eta of adaptive clipping: S <- S*exp(-eta*(b - quantile))"))
    dp_clip_count_stddev: float | None = field(default=None, metadata=_opt(
        "noise stddev on the count of unclipped clients in adaptive clipping "
        "(default: --clients-per-round / 20, as in the paper)"))
    dp_noise_at: str = field(default="server", metadata=_opt(
        "who adds the DP noise: server (rank 0, to the sum) or clients (each adds "
        "N(0, (z*S)^2 / t) to its clipped update, t the --secure-aggregation secagg threshold, "
        "so that any sum the server can unmask carries at least the accounted noise)",
        DP_NOISE_AT))
    dp_canaries: int = field(default=0, metadata=_opt(
        "one-shot empirical privacy estimate (Andrew et al. 2024): insert this many canary "
        "clients (random unit updates at the clip norm) and as many held-out directions; the "
        "run reports an empirical epsilon beside the accountant's (0 = off)"))
    # secure aggregation (fedmpi/privacy/secagg.py, he.py; README "Secure aggregation")
    secure_aggregation: str = field(default="none", metadata=_opt(
        "what rank 0 sees of the updates: none (each update), secagg (only their sum: "
        "Bonawitz et al. 2017, every client paired with every other), secagg+ (only their "
        "sum: Bell et al. 2020, each client paired with 2*log2(K) neighbours) or he (only "
        "their sum, BFV-encrypted; pip install 'fedmpi[he]')", SECURE_AGGREGATIONS))
    secagg_threshold: int | None = field(default=None, metadata=_opt(
        "share holders needed to unmask (Shamir t): of the K sampled clients for secagg, of "
        "a client and its neighbours for secagg+; default ceil(2/3) of them; a round with "
        "fewer survivors is skipped"))
    # communication compression (fedmpi/compression/)
    compress: str = field(default="none", metadata=_opt(
        "uplink compression of each client update: topk, randk (--compress-ratio), qsgd "
        "(--compress-bits), sign (EF-SignSGD with --error-feedback), fp16", COMPRESSORS))
    compress_ratio: float = field(default=0.01, metadata=_opt(
        "fraction of coordinates topk / randk send, in (0, 1]"))
    compress_bits: int = field(default=8, metadata=_opt(
        "qsgd bits per level, 1..16 (2^bits - 1 levels per bucket)"))
    compress_bucket: int = field(default=512, metadata=_opt(
        "qsgd bucket size (512 as in Alistarh et al.'s experiments)"))
    qsgd_coding: str = field(default="elias", metadata=_opt(
        "qsgd levels as Elias codes (the paper's, shorter) or fixed width", QSGD_CODINGS))
    error_feedback: bool = field(default=False, metadata=_opt(
        "each client adds what compression dropped to its next update (needed by topk, sign)"))
    compress_down: str = field(default="none", metadata=_opt(
        "compression of the server's broadcast (the model change): fp16 or qsgd",
        DOWN_COMPRESSORS))
    prune: float = field(default=0.0, metadata=_opt(
        "fraction of each layer's weights pruned by magnitude (biases kept), in [0, 1)"))
    prune_start: int = field(default=1, metadata=_opt(
        "round after whose server step pruning starts (one-shot if --prune-end is the same)"))
    prune_end: int = field(default=1, metadata=_opt(
        "round from which the full --prune sparsity holds (Zhu & Gupta's cubic schedule "
        "between --prune-start and this)"))
    client_state_dir: str | None = field(default=None, metadata=_opt(
        "keep per-client state (error-feedback residuals) in a memory-mapped file under DIR "
        "instead of RAM"))
    # local training
    local_epochs: int = field(default=1, metadata=_opt("local epochs E per round"))
    batch_size: int = field(default=10, metadata=_opt("local minibatch size B (0 = full batch)"))
    lr: float = field(default=0.05, metadata=_opt("client learning rate"))
    optimizer: str = field(default="sgd", metadata=_opt("client optimizer", OPTIMIZERS))
    momentum: float = field(default=0.0, metadata=_opt("SGD momentum (0 = plain SGD)"))
    weight_decay: float = field(default=0.0, metadata=_opt("L2 weight decay added to the gradient"))
    augment: str = field(default="none", metadata=_opt(
        "image augmentation in local training: none, or shift (every sample, each time it is "
        "visited, moved by its own random (dy, dx) in -2..2 pixels, zero fill at the border; "
        "drawn per seed, round and client; image data only)", AUGMENTS))
    augment_noise: float = field(default=0.0, metadata=_opt(
        "standard deviation of Gaussian noise added to every input of every visited sample "
        "(after any shift), in units of the scaled input (pixels in [0, 1]); 0 = off; image "
        "data only"))
    # model
    hidden: tuple[int, ...] = field(default=(128, 64), metadata=_opt(
        "hidden layer widths, comma separated ('200,200' is the FedAvg paper's 2NN; "
        "'none' for softmax regression)"))
    init: str = field(default="glorot_uniform", metadata=_opt("weight initialisation", INITS))
    loss: str = field(default="cross_entropy", metadata=_opt(
        "cross_entropy (softmax) or mse (on one-hot targets)", LOSSES))
    # run
    seed: int = field(default=0, metadata=_opt("seed of every random draw of the run"))
    eval_every: int = field(default=1, metadata=_opt(
        "evaluate the global model on the test set every N rounds (and after the last)"))
    out: str | None = field(default=None, metadata=_opt(
        "results file (default: results/<timestamp>.h5)"))
    overwrite: bool = field(default=False, metadata=_opt("replace an existing results file"))
    checkpoint_every: int = field(default=1, metadata=_opt(
        "store a checkpoint in the results file every N rounds (a model's worth of data; "
        "cheap) and after the last"))
    round_timeout: float = field(default=0.0, metadata=_opt(
        "abort the job (status 1, finished rounds kept) when a rank has not reached a round's "
        "collectives after this many seconds; 0 = auto: max(60, 10 x the median round), "
        "from round 4 on"))
    resume: str | None = field(default=None, metadata=_opt(
        "continue the run in results file PATH from its last checkpoint; 'auto' = continue "
        "--out if it has a checkpoint, else start afresh"))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def differences(self, other: dict) -> list[str]:
        """Settings that change results and differ from `other` (a saved config).

        The output location, checkpoint frequency and the number of rounds
        may change on resume (more rounds extend a finished run).
        """
        mine = self.to_dict()
        # a setting missing from an older file had the default then
        default = Config().to_dict()
        # with --dp-target-epsilon the file records the noise multiplier solved for it:
        # it follows from the target and the other settings, which are compared
        derived = {"dp_noise_multiplier"} if self.dp_target_epsilon is not None else set()
        return sorted(k for k in mine if k not in RESUMABLE and k not in derived
                      and other.get(k, default[k]) != mine[k])

    @property
    def augments(self) -> bool:
        """Whether local training augments its images (--augment, --augment-noise)."""
        return self.augment != "none" or self.augment_noise > 0

    def resolved_partition(self) -> str:
        if self.partition != "auto":
            return self.partition
        natural = self.dataset == "synthetic" or self.dataset.startswith("h5:")
        return "natural" if natural else "iid"


FIELDS = {f.name: f for f in fields(Config)}
# Settings that say where and how a run is executed, not what it computes: they
# never make two runs different (analysis, sweeps) and may change on resume
# (client_state_dir: where per-client state lives does not change results).
EXECUTION_KEYS = ("out", "overwrite", "resume", "checkpoint_every", "round_timeout",
                  "client_state_dir")
# ... and more rounds extend a finished run.
RESUMABLE = frozenset(EXECUTION_KEYS + ("rounds",))


def parse_hidden(value) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        # a TOML list: integers only (int() would turn 1.5 into 1 and true into 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise UserError(f"--hidden {list(value)!r} is malformed: give a list of positive "
                            "integers such as [128, 64] (or [] for none)")
        items = list(value)
    else:
        text = str(value).strip().lower()
        if text in ("", "none", "0"):
            return ()
        items = [s.strip() for s in text.split(",")]
    try:
        widths = tuple(int(s) for s in items)
    except (TypeError, ValueError):
        raise UserError(f"--hidden {value!r} is malformed: give comma-separated positive "
                        "integers such as 128,64 (or 'none')") from None
    if any(w < 1 for w in widths):
        raise UserError(f"--hidden {value!r} has a width below 1: give positive integers such as 128,64")
    return widths


def _convert(name: str, value):
    """A TOML or command-line value converted to the field's type, or UserError."""
    f = FIELDS[name]
    flag = "--" + name.replace("_", "-")
    if name == "hidden":
        return parse_hidden(value)
    typ = f.type
    if typ.endswith(" | None") and not typ.startswith("str"):
        if value is None:
            return None
        typ = typ[:-len(" | None")]
    try:
        if typ == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
            if not math.isfinite(number):
                raise UserError(f"{flag} got {value!r}: expected a finite number")
            return number
        if typ.startswith("str"):
            if value is None or isinstance(value, str):
                return value
            raise ValueError
    except (TypeError, ValueError):
        pass
    else:
        raise AssertionError(f"unhandled type {typ}")
    raise UserError(f"{flag} got {value!r}: expected {typ.replace(' | None', '')}")


def validate(cfg: Config) -> Config:
    """Raise UserError naming the first bad setting and what to use instead."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)

    need(cfg.rounds >= 1, f"--rounds must be at least 1 (got {cfg.rounds})")
    need(cfg.clients >= 1, f"--clients must be at least 1 (got {cfg.clients})")
    need(1 <= cfg.clients_per_round <= cfg.clients,
         f"--clients-per-round must be between 1 and --clients ({cfg.clients}); got {cfg.clients_per_round}")
    need(cfg.local_epochs >= 1, f"--local-epochs must be at least 1 (got {cfg.local_epochs})")
    need(cfg.batch_size >= 0, f"--batch-size must be 0 (full batch) or positive (got {cfg.batch_size})")
    need(cfg.lr > 0, f"--lr must be positive (got {cfg.lr})")
    need(cfg.server_lr > 0, f"--server-lr must be positive (got {cfg.server_lr})")
    need(0 <= cfg.momentum < 1, f"--momentum must be in [0, 1) (got {cfg.momentum})")
    need(cfg.weight_decay >= 0, f"--weight-decay must be non-negative (got {cfg.weight_decay})")
    need(cfg.alpha > 0, f"--alpha must be positive (got {cfg.alpha})")
    need(cfg.shards_per_client >= 1, f"--shards-per-client must be at least 1 (got {cfg.shards_per_client})")
    need(cfg.synthetic_alpha >= 0 and cfg.synthetic_beta >= 0,
         "--synthetic-alpha and --synthetic-beta must be non-negative")
    need(cfg.synthetic_mean_samples is None or (math.isfinite(cfg.synthetic_mean_samples)
                                                  and cfg.synthetic_mean_samples >= 2),
         f"--synthetic-mean-samples must be a number >= 2 (got {cfg.synthetic_mean_samples})")
    need(cfg.eval_every >= 1, f"--eval-every must be at least 1 (got {cfg.eval_every})")
    need(cfg.seed >= 0, f"--seed must be non-negative (got {cfg.seed})")
    need(cfg.round_timeout >= 0, f"--round-timeout must be 0 (auto) or a number of seconds "
         f"(got {cfg.round_timeout})")
    need(cfg.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {cfg.checkpoint_every})")
    need(cfg.resume != "auto" or cfg.out is not None,
         "--resume auto needs --out PATH: the file to continue if it has a checkpoint")
    need(cfg.dataset in DATASETS[:-2] or cfg.dataset.startswith("npz:") and len(cfg.dataset) > 4
         or cfg.dataset.startswith("h5:") and len(cfg.dataset) > 3,
         f"--dataset {cfg.dataset!r} is unknown: choose synthetic, fashion-mnist, mnist, "
         "npz:PATH or h5:PATH")
    need(0 <= cfg.server_momentum < 1, f"--server-momentum must be in [0, 1) (got {cfg.server_momentum})")
    need(0 <= cfg.server_beta1 < 1 and 0 <= cfg.server_beta2 < 1,
         "--server-beta1 and --server-beta2 must be in [0, 1)")
    need(cfg.server_tau > 0, f"--server-tau must be positive (got {cfg.server_tau})")
    need(cfg.prox_mu >= 0, f"--prox-mu must be non-negative (got {cfg.prox_mu})")
    need(0 <= cfg.trim < 0.5, f"--trim must be in [0, 0.5) (got {cfg.trim})")
    if cfg.aggregator == "trimmed_mean":
        # a round has clients_per_round updates (on average under Poisson sampling or
        # drop-outs), so the cut is known now
        cut = int(cfg.trim * cfg.clients_per_round)
        need(cut >= 1, f"--aggregator trimmed_mean --trim {cfg.trim} with --clients-per-round "
             f"{cfg.clients_per_round} trims floor({cfg.trim} * {cfg.clients_per_round}) = 0 "
             "updates, which is the plain unweighted mean, not robust: raise --trim (or --clients-per-round) so that "
             "trim * clients-per-round >= 1")
        need(2 * cut < cfg.clients_per_round, "--trim removes every update of a round: lower "
             "--trim or raise --clients-per-round")
    need(0 <= cfg.dropout_rate < 1, f"--dropout-rate must be in [0, 1) (got {cfg.dropout_rate})")
    need(cfg.sampling == "fixed" or cfg.client_sampling == "uniform",
         "--sampling poisson draws each client with the same probability: it has no "
         "--client-sampling proportional variant")
    _validate_dp(cfg, need)
    need(0 < cfg.compress_ratio <= 1,
         f"--compress-ratio must be in (0, 1] (got {cfg.compress_ratio})")
    need(1 <= cfg.compress_bits <= 16, f"--compress-bits must be in 1..16 (got {cfg.compress_bits})")
    need(1 <= cfg.compress_bucket <= 2**24,
         f"--compress-bucket must be in 1..16777216 (got {cfg.compress_bucket})")
    need(0 <= cfg.prune < 1, f"--prune must be in [0, 1) (got {cfg.prune})")
    need(1 <= cfg.prune_start <= cfg.prune_end,
         f"--prune-start ({cfg.prune_start}) must be at least 1 and at most --prune-end "
         f"({cfg.prune_end})")
    need(cfg.prune == 0 or cfg.compress_down == "none",
         "--prune and --compress-down cannot be combined: pruning already sends the surviving "
         "weights and a mask; choose one")
    need(cfg.client_state_dir is None or os.path.isdir(cfg.client_state_dir),
         f"--client-state-dir {cfg.client_state_dir}: no such directory; create it or name "
         "an existing one")
    # DP's noise is calibrated to the clip norm S: only compressors whose decoded update
    # is never longer than what they encode (a subset of coordinates; signs scaled by the
    # mean magnitude) keep that bound; error feedback adds old residuals and breaks it.
    need(cfg.dp_clip is None or cfg.compress in ("none", "topk", "sign")
         and not cfg.error_feedback,
         f"--dp-clip with --compress {cfg.compress}"
         f"{' --error-feedback' if cfg.error_feedback else ''}: the decoded update can be "
         "longer than the clip norm, which breaks the privacy guarantee; with DP use "
         "--compress topk or sign, without --error-feedback")
    _validate_algos(cfg, need)
    for name in ("partition", "algorithm", "optimizer", "loss", "init", "server_optimizer",
                 "aggregator", "client_sampling", "client_weighting", "sampling",
                 "dp_accountant", "compress", "compress_down", "qsgd_coding", "attack",
                 "dp_noise_at", "augment"):
        choices = FIELDS[name].metadata["choices"]
        value = getattr(cfg, name)
        need(value in choices, f"--{name.replace('_', '-')} {value!r} is unknown: choose one of {', '.join(choices)}")
    _validate_augment(cfg, need)
    need(cfg.secure_aggregation == "none" or cfg.compress == "none",
         f"--secure-aggregation {cfg.secure_aggregation} with --compress {cfg.compress}: "
         "masks and ciphertexts add only the exact-sum encoding of each update, while "
         "compressed updates (top-k indices, signs, quantised buckets with their own scales) "
         "do not add up; use one or the other")
    if cfg.secure_aggregation != "none" or cfg.secagg_threshold is not None:
        from fedmpi.privacy import secagg  # refuses bad thresholds, robust aggregators, he without TenSEAL
        secagg.plan(cfg.secure_aggregation, cfg.clients_per_round, cfg.secagg_threshold, cfg.aggregator)
    if cfg.algorithm == "fedsgd":
        need(cfg.optimizer == "sgd" and cfg.momentum == 0 and cfg.weight_decay == 0,
             "--algorithm fedsgd sends one plain gradient per client: use --optimizer sgd "
             "without --momentum or --weight-decay")
        # One full-batch gradient per client: record that in the saved config
        # rather than the (unused) local-training defaults.
        cfg = dataclasses.replace(cfg, local_epochs=1, batch_size=0)
    return cfg


DP_FLAGS = ("dp_clip_per_layer", "dp_noise_multiplier", "dp_target_epsilon", "dp_clip_quantile",
            "dp_clip_count_stddev", "dp_canaries")


def _validate_dp(cfg: Config, need) -> None:
    if cfg.dp_clip is None:
        given = [n for n in DP_FLAGS if getattr(cfg, n) not in (None, False, 0)]
        if cfg.dp_noise_at != "server":
            given.append("dp_noise_at")
        need(not given, f"--{given[0].replace('_', '-') if given else ''} needs --dp-clip S: "
             "differential privacy starts with clipping each update to norm S")
        return
    need(math.isfinite(cfg.dp_clip) and cfg.dp_clip > 0,
         f"--dp-clip must be a positive number (got {cfg.dp_clip})")
    need(cfg.dp_noise_multiplier is not None or cfg.dp_target_epsilon is not None,
         "--dp-clip needs a noise level: --dp-noise-multiplier Z (0 = clipping only) or "
         "--dp-target-epsilon E")
    need(cfg.dp_noise_multiplier is None or cfg.dp_target_epsilon is None,
         "--dp-noise-multiplier and --dp-target-epsilon both set the noise: give one (the "
         "target's multiplier is solved for the run's --rounds)")
    if cfg.dp_target_epsilon is None:
        need(math.isfinite(cfg.dp_noise_multiplier) and cfg.dp_noise_multiplier >= 0,
             f"--dp-noise-multiplier must be >= 0 (got {cfg.dp_noise_multiplier})")
    else:
        need(math.isfinite(cfg.dp_target_epsilon) and cfg.dp_target_epsilon > 0,
             f"--dp-target-epsilon must be a positive number (got {cfg.dp_target_epsilon})")
    need(0 < cfg.dp_delta < 1, f"--dp-delta must be in (0, 1) (got {cfg.dp_delta})")
    need(cfg.dp_noise_at != "clients" or cfg.secure_aggregation == "secagg"
         and cfg.sampling == "fixed" and cfg.dp_clip_quantile is None,
         "--dp-noise-at clients needs --secure-aggregation secagg with --sampling fixed and no "
         "--dp-clip-quantile: the noise each client adds is sized by secagg's fixed threshold "
         "t (the fewest clients whose sum the server can unmask), and adaptive clipping's "
         "count would still be summed in the clear")
    need(cfg.dp_canaries == 0 or cfg.dp_canaries >= 2,
         f"--dp-canaries needs at least 2 canaries to estimate a spread (got {cfg.dp_canaries})")
    need(cfg.aggregator == "mean",
         f"--aggregator {cfg.aggregator} does not sum the updates, so clipping bounds nothing "
         "it computes: differential privacy needs --aggregator mean")
    need(cfg.dp_accountant != "pld" or cfg.sampling == "poisson",
         "--dp-accountant pld supports Poisson sampling only (dp-accounting has no PLD for "
         "sampling without replacement): use --sampling poisson or --dp-accountant rdp")
    if cfg.dp_clip_quantile is not None:
        need(0 < cfg.dp_clip_quantile < 1,
             f"--dp-clip-quantile must be in (0, 1) (got {cfg.dp_clip_quantile})")
        need(math.isfinite(cfg.dp_clip_lr) and cfg.dp_clip_lr > 0,
             f"--dp-clip-lr must be positive (got {cfg.dp_clip_lr})")
        need(cfg.dp_clip_count_stddev is None or cfg.dp_clip_count_stddev >= 0,
             f"--dp-clip-count-stddev must be >= 0 (got {cfg.dp_clip_count_stddev})")


def _validate_algos(cfg: Config, need) -> None:
    """Krum, FedNova, stragglers and attacks."""
    k, f = cfg.clients_per_round, cfg.byzantine
    need(f >= 0, f"--byzantine must be non-negative (got {f})")
    if cfg.aggregator in ("krum", "multikrum"):
        # with Poisson sampling or drop-outs a round may have fewer: such a
        # round keeps the model (see fedmpi.algorithms.robust.krum_select)
        need(k > 2 * f + 2, f"--aggregator {cfg.aggregator} with --byzantine {f} needs more "
             f"than 2f + 2 = {2 * f + 2} clients per round (Blanchard et al. 2017); got "
             f"--clients-per-round {k}: raise it or lower --byzantine")
    else:
        need(f == 0, f"--byzantine {f} is the Krum assumption: use it with --aggregator "
             "krum or multikrum")
    if cfg.multikrum_m is not None:
        need(cfg.aggregator == "multikrum", "--multikrum-m needs --aggregator multikrum")
        need(1 <= cfg.multikrum_m <= k - f, f"--multikrum-m must be between 1 and "
             f"--clients-per-round - --byzantine ({k - f}); got {cfg.multikrum_m}")
    need(0 <= cfg.stragglers <= 1, f"--stragglers must be in [0, 1] (got {cfg.stragglers})")
    need(not cfg.drop_stragglers or cfg.stragglers > 0,
         "--drop-stragglers needs --stragglers P (the fraction of clients that straggle)")
    need(cfg.stragglers == 0 or cfg.algorithm != "fedsgd",
         "--algorithm fedsgd sends one gradient per client: there is no local work to cut "
         "short, so --stragglers does not apply")
    if cfg.algorithm == "fednova":
        need(cfg.optimizer == "sgd", "--algorithm fednova normalises plain or momentum SGD "
             "steps (Wang et al. 2020): use --optimizer sgd")
        need(cfg.aggregator == "mean", f"--algorithm fednova is a weighted average: use "
             f"--aggregator mean, not {cfg.aggregator}")
        need(cfg.dp_clip is None, "--algorithm fednova rescales the sum by data-dependent "
             "step counts, which the DP sensitivity bound does not cover: drop --dp-clip")
    if cfg.algorithm == "scaffold":
        need(cfg.optimizer == "sgd" and cfg.momentum == 0.0,
             "--algorithm scaffold's control variates (option II) are the mean corrected "
             "gradient of plain SGD steps: use --optimizer sgd without --momentum")
        need(cfg.aggregator == "mean", f"--algorithm scaffold averages updates and control "
             f"variates: use --aggregator mean, not {cfg.aggregator}")
        need(cfg.dp_clip is None and cfg.secure_aggregation == "none",
             "--algorithm scaffold sends a control-variate update beside the model update; "
             "it needs its own privacy treatment (clipping and noise, masking), which fedmpi "
             "does not provide: drop --dp-clip and --secure-aggregation")
        need(cfg.compress == "none", "--algorithm scaffold sends control variates that "
             "--compress does not encode: drop --compress")
    need(cfg.attackers == 0 or cfg.attack != "none",
         "--attackers F needs --attack signflip, gaussian or labelflip")
    if cfg.attack != "none":
        need(0 < cfg.attackers < 1, f"--attack {cfg.attack} needs --attackers F in (0, 1), "
             f"the fraction of malicious clients (got {cfg.attackers})")
        need(math.isfinite(cfg.attack_scale) and cfg.attack_scale > 0,
             f"--attack-scale must be positive (got {cfg.attack_scale})")


def _validate_augment(cfg: Config, need) -> None:
    """--augment and --augment-noise (npz and h5 data are checked for images when read)."""
    need(math.isfinite(cfg.augment_noise) and cfg.augment_noise >= 0,
         f"--augment-noise must be a standard deviation >= 0 (got {cfg.augment_noise})")
    if not cfg.augments:
        return
    flag = "--augment" if cfg.augment != "none" else "--augment-noise"
    need(cfg.dataset != "synthetic", f"{flag} augments images, but --dataset synthetic is "
         "a vector of features with no pixel grid; use it with fashion-mnist, mnist or image "
         "data from npz:/h5: files, or drop it")
    need(cfg.algorithm != "fedsgd", f"{flag} augments the samples of local training steps; "
         "--algorithm fedsgd sends one gradient of the client's own samples: use fedavg "
         "(or drop it)")


def warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not what the user wants."""
    out = []
    if cfg.dp_clip is not None and cfg.dp_delta >= 1 / cfg.clients:
        out.append(f"--dp-delta {cfg.dp_delta:g} is at least 1/--clients (1/{cfg.clients}): "
                   "such a guarantee allows revealing a whole client's data; use a smaller delta")
    if cfg.synthetic_mean_samples is not None and cfg.dataset != "synthetic":
        out.append(f"--synthetic-mean-samples only shapes --dataset synthetic; it has no effect "
                   f"on {cfg.dataset}")
    if cfg.dp_clip is not None and cfg.dp_noise_multiplier == 0 and cfg.dp_target_epsilon is None:
        out.append("--dp-noise-multiplier 0: updates are clipped but not noised, so there is "
                   "no privacy guarantee (epsilon = inf)")
    if cfg.aggregator in ("krum", "multikrum") and (
            cfg.sampling == "poisson" or cfg.dropout_rate > 0 or cfg.drop_stragglers):
        out.append(f"--aggregator {cfg.aggregator}: a round in which {2 * cfg.byzantine + 2} or "
                   "fewer clients report (Poisson sampling, drop-outs, dropped stragglers) keeps "
                   "the model unchanged: Krum needs more than 2f + 2 updates")
    if cfg.attack != "none" and cfg.aggregator == "mean":
        out.append(f"--attack {cfg.attack} with --aggregator mean: nothing defends against the "
                   "attackers (the undefended baseline); use median, trimmed_mean, krum or "
                   "multikrum to defend")
    if cfg.compress != "none" or cfg.error_feedback:
        # the codecs are numba kernels: imported only where compression is asked for
        from fedmpi.compression.stages import warnings_for as compression_warnings
        out += compression_warnings(cfg)
    return out


# --help's sections: the field that opens each (fields follow Config's order)
HELP_SECTIONS = {
    "dataset": "data and partition",
    "clients_per_round": "rounds, algorithm and server",
    "byzantine": "robust aggregation, attacks, stragglers and drop-outs",
    "dp_clip": "differential privacy (on with --dp-clip)",
    "secure_aggregation": "secure aggregation",
    "compress": "compression and pruning",
    "client_state_dir": "per-client state",
    "local_epochs": "local training",
    "hidden": "model",
    "seed": "run: seed, evaluation, results, checkpoints",
}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m fedmpi",
        # the options' list would take 55 lines; they follow, in sections
        usage="[mpiexec -n N] python -m fedmpi [--config FILE.toml] [--option VALUE ...]",
        description="Run one federated training job. Under mpiexec, rank 0 aggregates and "
                    "the other ranks host the simulated clients; alone, one process does both.",
        argument_default=argparse.SUPPRESS,  # so we can tell which flags were given
    )
    p.add_argument("--config", metavar="FILE.toml",
                   help="read settings from a TOML file (keys as below, '-' or '_'); flags override it")
    defaults = Config()
    group = p
    for f in fields(Config):
        if f.name in HELP_SECTIONS:
            group = p.add_argument_group(HELP_SECTIONS[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "hidden":
            default = ",".join(map(str, default)) or "none"
        help_ = f"{f.metadata['help']} (default: {default})"
        if f.type == "bool":
            group.add_argument(flag, action="store_true", dest=f.name, help=help_)
        else:
            group.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=help_)
    return p


def read_toml(path: str, what: str = "config file") -> dict:
    """A TOML file's contents, or UserError saying what is wrong with the file."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory: give a .toml file") from None
    except OSError as e:
        raise UserError(f"cannot read {what} {path}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{what} {path} is not valid TOML: {e}") from None


def load_toml(path: str) -> dict:
    data = read_toml(path)
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in FIELDS:
            raise UserError(f"config file {path}: unknown setting {key!r} "
                            "(see python -m fedmpi --help for the settings)")
        out[name] = value
    return out


def from_dict(values: dict) -> Config:
    """A validated Config from {field: value} (values may be strings from a CLI)."""
    converted = {name: _convert(name, v) for name, v in values.items()}
    return validate(Config(**converted))


def given_values(argv=None) -> dict:
    """The settings the command line gives, with those of its --config file
    (flags win), as {field: raw value}; nothing else filled in or checked."""
    ns = vars(build_parser().parse_args(argv))
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    values.update(ns)
    return values


def parse_args(argv=None) -> Config:
    """Config from command-line arguments; UserError on anything wrong."""
    return from_dict(given_values(argv))


# Settings of the run being resumed that `--resume PATH` does not take over:
# where this segment writes and waits is the command's own business (a spill
# directory or a timeout of another machine would be wrong here).
NOT_INHERITED = frozenset(("out", "overwrite", "resume", "round_timeout", "client_state_dir"))


def with_saved(saved: dict, given: dict) -> Config:
    """The settings of a resumed run: those it was started with (`saved`, the
    file's config), overridden by what this command gives. A setting that
    changes results and differs from the file is then refused by the caller;
    a setting this fedmpi does not know (an older version's) is ignored."""
    given = {name: _convert(name, v) for name, v in given.items()}  # a bad flag: its own error
    base = {k: v for k, v in saved.items() if k in FIELDS and k not in NOT_INHERITED}
    if base.get("dp_target_epsilon") is not None:  # the multiplier was solved for the target
        base.pop("dp_noise_multiplier", None)
    try:
        return from_dict({**base, **given})
    except UserError as e:
        raise UserError(f"the settings of the run being resumed, with this command's: {e}") \
            from None
