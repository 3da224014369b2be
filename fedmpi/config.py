"""Every setting of a run: defaults, validation, TOML file + command-line flags.

The resolved Config is frozen and saved (as JSON) with the results, so a
results file always says exactly how it was made. Precedence: built-in
defaults < --config FILE.toml < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field, fields

from fedmpi.errors import UserError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DATASETS = ("synthetic", "fashion-mnist", "mnist", "npz:PATH")
PARTITIONS = ("auto", "natural", "iid", "shards", "dirichlet")
ALGORITHMS = ("fedavg", "fedsgd", "fedprox", "fednova")
SERVER_OPTIMIZERS = ("sgd", "avgm", "adam", "yogi")
AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multikrum")
ATTACKS = ("none", "signflip", "gaussian", "labelflip")
OPTIMIZERS = ("sgd", "adam")
LOSSES = ("cross_entropy", "mse")
SAMPLINGS = ("fixed", "poisson")
ACCOUNTANTS = ("auto", "rdp", "pld")
INITS = ("glorot_uniform", "he_uniform")


def _opt(help_, choices=None, flag=None):
    return {"help": help_, "choices": choices, "flag": flag}


@dataclass(frozen=True)
class Config:
    # data
    dataset: str = field(default="synthetic", metadata=_opt(
        "synthetic (built in: FedProx's Synthetic(alpha,beta)), fashion-mnist, mnist, or npz:PATH"))
    data_dir: str | None = field(default=None, metadata=_opt(
        "directory with the IDX files (default: ./data/<name>/, then /usr/share/datasets/<name>/)"))
    synthetic_alpha: float = field(default=1.0, metadata=_opt(
        "Synthetic(alpha,beta): how much the clients' models differ"))
    synthetic_beta: float = field(default=1.0, metadata=_opt(
        "Synthetic(alpha,beta): how much the clients' inputs differ"))
    partition: str = field(default="auto", metadata=_opt(
        "how samples are split over clients; auto = natural for synthetic, iid otherwise",
        PARTITIONS))
    alpha: float = field(default=0.5, metadata=_opt(
        "Dirichlet concentration for --partition dirichlet (smaller = more label skew)"))
    shards_per_client: int = field(default=2, metadata=_opt(
        "label-sorted shards per client for --partition shards (McMahan et al. use 2)"))
    clients: int = field(default=100, metadata=_opt("number of simulated clients"))
    # federated schedule
    clients_per_round: int = field(default=10, metadata=_opt(
        "clients sampled (without replacement) each round"))
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
    dp_canaries: int = field(default=0, metadata=_opt(
        "one-shot empirical privacy estimate (Andrew et al. 2024): insert this many canary "
        "clients (random unit updates at the clip norm) and as many held-out directions; the "
        "run reports an empirical epsilon beside the accountant's (0 = off)"))
    # local training
    local_epochs: int = field(default=1, metadata=_opt("local epochs E per round"))
    batch_size: int = field(default=10, metadata=_opt("local minibatch size B (0 = full batch)"))
    lr: float = field(default=0.05, metadata=_opt("client learning rate"))
    optimizer: str = field(default="sgd", metadata=_opt("client optimizer", OPTIMIZERS))
    momentum: float = field(default=0.0, metadata=_opt("SGD momentum (0 = plain SGD)"))
    weight_decay: float = field(default=0.0, metadata=_opt("L2 weight decay added to the gradient"))
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
        return sorted(k for k in mine if k not in RESUMABLE
                      and (k in other and other[k] != mine[k]
                           or k not in other and mine[k] != FIELDS[k].default))

    def resolved_partition(self) -> str:
        if self.partition != "auto":
            return self.partition
        return "natural" if self.dataset == "synthetic" else "iid"


FIELDS = {f.name: f for f in fields(Config)}
RESUMABLE = {"out", "overwrite", "resume", "checkpoint_every", "rounds"}


def parse_hidden(value) -> tuple[int, ...]:
    if isinstance(value, (list, tuple)):
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
            return float(value)
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
    need(cfg.eval_every >= 1, f"--eval-every must be at least 1 (got {cfg.eval_every})")
    need(cfg.seed >= 0, f"--seed must be non-negative (got {cfg.seed})")
    need(cfg.checkpoint_every >= 1, f"--checkpoint-every must be at least 1 (got {cfg.checkpoint_every})")
    need(cfg.resume != "auto" or cfg.out is not None,
         "--resume auto needs --out PATH: the file to continue if it has a checkpoint")
    need(cfg.dataset in DATASETS[:-1] or cfg.dataset.startswith("npz:") and len(cfg.dataset) > 4,
         f"--dataset {cfg.dataset!r} is unknown: choose synthetic, fashion-mnist, mnist or npz:PATH")
    need(0 <= cfg.server_momentum < 1, f"--server-momentum must be in [0, 1) (got {cfg.server_momentum})")
    need(0 <= cfg.server_beta1 < 1 and 0 <= cfg.server_beta2 < 1,
         "--server-beta1 and --server-beta2 must be in [0, 1)")
    need(cfg.server_tau > 0, f"--server-tau must be positive (got {cfg.server_tau})")
    need(cfg.prox_mu >= 0, f"--prox-mu must be non-negative (got {cfg.prox_mu})")
    need(0 <= cfg.trim < 0.5, f"--trim must be in [0, 0.5) (got {cfg.trim})")
    need(cfg.aggregator != "trimmed_mean" or 2 * int(cfg.trim * cfg.clients_per_round)
         < cfg.clients_per_round, "--trim removes every update of a round: lower --trim "
         "or raise --clients-per-round")
    need(0 <= cfg.dropout_rate < 1, f"--dropout-rate must be in [0, 1) (got {cfg.dropout_rate})")
    _validate_dp(cfg, need)
    _validate_algos(cfg, need)
    for name in ("partition", "algorithm", "optimizer", "loss", "init", "server_optimizer",
                 "aggregator", "sampling", "dp_accountant", "attack"):
        choices = FIELDS[name].metadata["choices"]
        value = getattr(cfg, name)
        need(value in choices, f"--{name.replace('_', '-')} {value!r} is unknown: choose one of {', '.join(choices)}")
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
        need(not given, f"--{given[0].replace('_', '-') if given else ''} needs --dp-clip S: "
             "differential privacy starts with clipping each update to norm S")
        return
    need(math.isfinite(cfg.dp_clip) and cfg.dp_clip > 0,
         f"--dp-clip must be a positive number (got {cfg.dp_clip})")
    need(cfg.dp_noise_multiplier is not None or cfg.dp_target_epsilon is not None,
         "--dp-clip needs a noise level: --dp-noise-multiplier Z (0 = clipping only) or "
         "--dp-target-epsilon E")
    if cfg.dp_target_epsilon is None:
        need(math.isfinite(cfg.dp_noise_multiplier) and cfg.dp_noise_multiplier >= 0,
             f"--dp-noise-multiplier must be >= 0 (got {cfg.dp_noise_multiplier})")
    else:
        need(math.isfinite(cfg.dp_target_epsilon) and cfg.dp_target_epsilon > 0,
             f"--dp-target-epsilon must be a positive number (got {cfg.dp_target_epsilon})")
    need(0 < cfg.dp_delta < 1, f"--dp-delta must be in (0, 1) (got {cfg.dp_delta})")
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
    need(cfg.attackers == 0 or cfg.attack != "none",
         "--attackers F needs --attack signflip, gaussian or labelflip")
    if cfg.attack != "none":
        need(0 < cfg.attackers < 1, f"--attack {cfg.attack} needs --attackers F in (0, 1), "
             f"the fraction of malicious clients (got {cfg.attackers})")
        need(math.isfinite(cfg.attack_scale) and cfg.attack_scale > 0,
             f"--attack-scale must be positive (got {cfg.attack_scale})")


def warnings(cfg: Config) -> list[str]:
    """Settings that are allowed but probably not what the user wants."""
    out = []
    if cfg.dp_clip is not None and cfg.dp_delta >= 1 / cfg.clients:
        out.append(f"--dp-delta {cfg.dp_delta:g} is at least 1/--clients (1/{cfg.clients}): "
                   "such a guarantee allows revealing a whole client's data; use a smaller delta")
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
    return out


class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise UserError(f"{message} (see python -m fedmpi --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m fedmpi",
        description="Run one federated training job. Under mpiexec, rank 0 aggregates and "
                    "the other ranks host the simulated clients; alone, one process does both.",
        argument_default=argparse.SUPPRESS,  # so we can tell which flags were given
    )
    p.add_argument("--config", metavar="FILE.toml",
                   help="read settings from a TOML file (keys as below, '-' or '_'); flags override it")
    defaults = Config()
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        if f.name == "hidden":
            default = ",".join(map(str, default)) or "none"
        help_ = f"{f.metadata['help']} (default: {default})"
        if f.type == "bool":
            p.add_argument(flag, action="store_true", dest=f.name, help=help_)
        else:
            p.add_argument(flag, dest=f.name, metavar=f.name.upper(), help=help_)
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


def parse_args(argv=None) -> Config:
    """Config from command-line arguments; UserError on anything wrong."""
    ns = vars(build_parser().parse_args(argv))
    values = load_toml(ns.pop("config")) if "config" in ns else {}
    values.update(ns)
    return from_dict(values)
