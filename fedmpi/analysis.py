"""Read and summarise fedmpi results files: the Python side of ``fedmpi-report``.

::

    from fedmpi import analysis
    run = analysis.load("results/a.h5")        # one run
    run.config["lr"], run.rounds["test_accuracy"], run.layers()[0]
    df = analysis.load_many("results/*.h5", target=0.8)   # one row per run
    rows = analysis.summarize(["a.h5", "b.h5"], target=0.8)
    run.participation(), run.client_loss_by_round()  # per-client views

Nothing here writes HDF5: files are read through :mod:`fedmpi.reading`, which
opens them with ``locking=False`` (finished, killed and still-running jobs can
all be read; a running job's file shows its flushed rounds) and treats them as
untrusted input. ``load`` reads the configuration and /rounds; /clients,
/partition and the model are read when first used, so a summary of many big
runs reads only what it shows.

pandas is optional. With it, ``Run.rounds`` / ``Run.clients`` are DataFrames and
:func:`load_many` returns a DataFrame; without it they are dicts of NumPy arrays
and a list of dicts. ``run.rounds["test_accuracy"]`` works either way.

Bad input (missing file, not HDF5, a file from another program, a missing
dataset, a damaged file, a glob matching nothing) raises
:class:`fedmpi.errors.UserError` with a message naming the path.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable

import numpy as np

from fedmpi import reading
from fedmpi.errors import UserError
from fedmpi.layout import CLIENT_FIELDS, ROUND_FIELDS, layers_from_flat

# Config keys that say how a run was executed, not what it computed, so they
# never count as a difference between runs (every run has its own `out`).
IGNORED_KEYS = ("out", "overwrite", "resume", "checkpoint_every")

# Per-run summary columns, in output order (see Run.summary).
SUMMARY_COLUMNS = ("rounds_done", "final_accuracy", "best_accuracy",
                   "rounds_to_target", "seconds_to_target",
                   "bytes_up", "bytes_down", "wall_seconds", "epsilon")


def _pandas():
    """The pandas module, or None if it isn't installed (imported lazily)."""
    try:
        import pandas
    except ImportError:
        return None
    return pandas


def _ordered(columns: dict, known: dict) -> dict:
    """Columns in the writer's documented order, then any others by name."""
    names = [n for n in known if n in columns]
    names += sorted(n for n in columns if n not in known)
    return {n: columns[n] for n in names}


class Run:
    """One results file, read into memory.

    Attributes: ``path``; ``config`` (dict of every setting of the run);
    ``attrs`` (root attributes: fedmpi_version, mpi_size, created, command,
    ...); ``rounds`` and ``clients`` (DataFrames with pandas, else dicts of
    arrays); ``partition`` (dict: num_samples, label_histogram); ``params``
    (final flat float32 parameters, None until the run has finished);
    ``layer_sizes``.
    """

    def __init__(self, path: str, data: dict):
        """data: from fedmpi.reading.read_meta (parts missing from it are read
        from path when first used) or read_run."""
        self.path = path
        self.config: dict = data["config"]
        self.attrs: dict = data["attrs"]
        self.layer_sizes: list[int] = data["layer_sizes"]
        self._num_clients: int | None = data.get("num_clients")
        self._rounds = _ordered(data["rounds"], ROUND_FIELDS)
        self._parts = {k: data[k] for k in ("clients", "partition", "params") if k in data}
        self._frames: dict = {}

    def _part(self, name: str):
        if name not in self._parts:
            self._parts[name] = reading.read_part(self.path, name)
        return self._parts[name]

    @property
    def _clients(self) -> dict:
        return _ordered(self._part("clients"), CLIENT_FIELDS)

    @property
    def partition(self) -> dict:
        """/partition: num_samples and label_histogram (empty dict if absent)."""
        return self._part("partition")

    @property
    def params(self) -> np.ndarray | None:
        """Final flat float32 parameters, None until the run has finished."""
        return self._part("params")

    def __repr__(self) -> str:
        return (f"<Run {self.path}: {self.rounds_done}/"
                f"{self.rounds_planned if self.rounds_planned is not None else '?'}"
                f" rounds>")

    def _table(self, name: str, columns: dict):
        pd = _pandas()
        if pd is None:
            return dict(columns)
        if name not in self._frames:
            self._frames[name] = pd.DataFrame(columns)
        return self._frames[name]

    @property
    def rounds(self):
        """/rounds: one row per round (DataFrame, or dict of arrays)."""
        return self._table("rounds", self._rounds)

    @property
    def clients(self):
        """/clients: one row per (round, client) (DataFrame, or dict of arrays)."""
        return self._table("clients", self._clients)

    @property
    def rounds_done(self) -> int:
        """Rounds in the file (fewer than planned if killed or still running)."""
        return len(next(iter(self._rounds.values()), ()))

    @property
    def rounds_planned(self) -> int | None:
        value = self.config.get("rounds")
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return value if ok else None

    @property
    def finished(self) -> bool:
        planned = self.rounds_planned
        return planned is not None and self.rounds_done >= planned

    def metric(self, name: str) -> np.ndarray:
        """/rounds/<name> as an array (empty if no round was written yet).

        Raises UserError if rounds exist but this dataset doesn't.
        """
        return self._column("rounds", self._rounds, name)

    def _column(self, group: str, table: dict, name: str) -> np.ndarray:
        if name in table:
            return table[name]
        if not table:
            return np.empty(0)
        raise UserError(
            f"{self.path} has no /{group}/{name} dataset (it has: "
            f"{', '.join(table)}); not a complete fedmpi results file?")

    def has_metric(self, name: str) -> bool:
        return name in self._rounds

    @property
    def metrics(self) -> list[str]:
        """Names of the datasets under /rounds."""
        return list(self._rounds)

    def layers(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The final model as [(W, b), ...] views of ``params``."""
        if self.params is None:
            raise UserError(
                f"{self.path} has no /model/params yet: the run is still "
                f"running or was stopped before its last round")
        return layers_from_flat(self.params, self.layer_sizes)

    # -- clients ---------------------------------------------------------

    def client_column(self, name: str) -> np.ndarray:
        """/clients/<name> as an array (empty if no client row was written yet).

        Raises UserError if client rows exist but this dataset doesn't.
        """
        return self._column("clients", self._clients, name)

    @property
    def num_clients(self) -> int:
        """Clients in the run: rows of /partition/num_samples, else config
        ``clients`` (every client_id is below it: the reader checks)."""
        if self._num_clients is None:
            raise UserError(f"{self.path} has neither /partition/num_samples nor an integer "
                            f"config 'clients': cannot tell its clients")
        return self._num_clients

    def participation(self) -> np.ndarray:
        """Rounds each client trained in so far: an int array indexed by client_id."""
        ids = np.asarray(self.client_column("client_id"), dtype=np.int64)
        return np.bincount(ids, minlength=self.num_clients)

    def labels_per_client(self) -> np.ndarray | None:
        """Distinct labels each client holds (from /partition/label_histogram),
        or None if the file has no partition."""
        hist = self.partition.get("label_histogram")
        if hist is None:
            return None
        return np.count_nonzero(np.asarray(hist) > 0, axis=1)

    def client_loss_by_round(self) -> dict[str, np.ndarray]:
        """How the clients' /clients/train_loss spreads within each round.

        Returns a dict of equal-length arrays, one entry per round that has
        client rows: ``round``, ``clients`` (how many trained), ``min``,
        ``q25``, ``median``, ``q75``, ``max`` (NumPy's default linear
        percentiles; NaN losses are left out, all-NaN rounds give NaN).
        """
        rnd = np.asarray(self.client_column("round"))
        loss = np.asarray(self.client_column("train_loss"), dtype=np.float64)
        keys = ("round", "clients", "min", "q25", "median", "q75", "max")
        if rnd.size == 0:
            return {k: np.empty(0, dtype=np.int64 if k in ("round", "clients")
                                else np.float64) for k in keys}
        order = np.argsort(rnd, kind="stable")
        rounds, starts, counts = np.unique(rnd[order], return_index=True,
                                           return_counts=True)
        stats = np.full((len(rounds), 5), np.nan)
        for i, (start, count) in enumerate(zip(starts, counts)):
            values = loss[order[start:start + count]]
            values = values[~np.isnan(values)]
            if values.size:
                stats[i] = np.percentile(values, [0, 25, 50, 75, 100])
                stats[i, 0], stats[i, 4] = values.min(), values.max()  # exact with inf
        out = {"round": rounds.astype(np.int64), "clients": counts.astype(np.int64)}
        out.update({k: stats[:, j] for j, k in enumerate(keys[2:])})
        return out

    def summary(self, target: float | None = None) -> dict:
        """The SUMMARY_COLUMNS of this run (values None where undefined).

        final_accuracy is the last evaluated (non-NaN) test accuracy;
        rounds_to_target is the first round whose test accuracy is >= target
        and seconds_to_target the sum of /rounds/seconds up to and including
        that round (None if never reached, or no target given); epsilon is the
        privacy spent after the last round (None without DP).
        """
        target = check_target(target)
        acc = np.asarray(self.metric("test_accuracy"), dtype=np.float64)
        rnd = self.metric("round")
        secs = np.asarray(self.metric("seconds"), dtype=np.float64)
        up = self.metric("bytes_up")
        down = self.metric("bytes_down")
        evaluated = acc[~np.isnan(acc)]
        rounds_to = seconds_to = None
        if target is not None:
            with np.errstate(invalid="ignore"):
                hits = np.flatnonzero(acc >= target)  # NaN compares False
            if hits.size:
                i = int(hits[0])
                rounds_to = int(rnd[i])
                seconds_to = float(np.cumsum(secs)[i])
        return {
            "rounds_done": self.rounds_done,
            "final_accuracy": float(evaluated[-1]) if evaluated.size else None,
            "best_accuracy": float(evaluated.max()) if evaluated.size else None,
            "rounds_to_target": rounds_to,
            "seconds_to_target": seconds_to,
            "bytes_up": int(np.sum(up)),
            "bytes_down": int(np.sum(down)),
            "wall_seconds": float(np.sum(secs)),
            # privacy spent (differentially private runs): the accountant's after the last round
            "epsilon": (float(self.metric("epsilon")[-1])
                        if self.has_metric("epsilon") and self.rounds_done else None),
        }


def check_target(target) -> float | None:
    """target as a float in [0, 1], or UserError."""
    if target is None:
        return None
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise UserError(f"target accuracy {target!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        hint = f" (for {value:g}% give {value / 100:g})" if 1 < value <= 100 else ""
        raise UserError(f"target accuracy must be a fraction in [0, 1], got "
                        f"{value:g}{hint}")
    return value


def load(path) -> Run:
    """Read one results file (finished, killed or still being written)."""
    path = os.fspath(path)
    return Run(path, reading.read_meta(path))


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_paths(paths_or_globs) -> list[str]:
    """Paths, globs and directories (meaning their *.h5) to a list of files.

    Order is kept (glob matches sorted) and duplicates dropped. A glob or
    directory matching nothing raises UserError; plain paths are returned
    as given (load() reports missing ones).
    """
    if isinstance(paths_or_globs, (str, os.PathLike)):
        items = [paths_or_globs]
    else:
        items = list(paths_or_globs)
    out: list[str] = []
    seen: set[str] = set()
    for item in items:
        item = os.fspath(item)
        if os.path.isdir(item):
            matches = sorted(glob.glob(os.path.join(glob.escape(item), "*.h5")))
            if not matches:
                raise UserError(f"directory {item} has no *.h5 results files")
        elif _is_glob(item) and not os.path.lexists(item):
            matches = sorted(m for m in glob.glob(item, recursive=True)
                             if not os.path.isdir(m))
            if not matches:
                raise UserError(f"no files match {item}")
        else:
            matches = [item]
        for m in matches:
            key = os.path.realpath(m)
            if key not in seen:
                seen.add(key)
                out.append(m)
    if not out:
        raise UserError("no results files given")
    return out


def load_runs(runs) -> list[Run]:
    """Runs from a Run, a path/glob/directory, or an iterable of those."""
    if isinstance(runs, Run):
        return [runs]
    if isinstance(runs, (str, os.PathLike)):
        runs = [runs]
    elif not isinstance(runs, Iterable):
        raise TypeError(f"expected runs, paths or globs, not {type(runs).__name__}")
    loaded: list[Run] = []
    pending: list = []

    def flush():
        if pending:
            loaded.extend(load(p) for p in expand_paths(pending))
            pending.clear()

    for item in runs:
        if isinstance(item, Run):
            flush()
            loaded.append(item)
        else:
            pending.append(item)
    flush()
    if not loaded:
        raise UserError("no results files given")
    return loaded


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _key_order(keys) -> list[str]:
    """Config keys in Config's field order (the --help order), others last."""
    try:
        from fedmpi.config import FIELDS
        order = {name: i for i, name in enumerate(FIELDS)}
    except Exception:  # noqa: BLE001 -- ordering is cosmetic
        order = {}
    return sorted(keys, key=lambda k: (order.get(k, len(order)), k))


_MISSING = object()


def differing_keys(configs: list[dict], ignore=IGNORED_KEYS) -> list[str]:
    """Config keys whose values are not the same in all configs.

    A key missing from some configs counts as differing; keys in `ignore`
    never do. Order: as in ``python -m fedmpi --help``.
    """
    keys = set().union(*configs) - set(ignore) if configs else set()
    diff = []
    for key in keys:
        values = {_canonical(c[key]) if key in c else _MISSING for c in configs}
        if len(values) > 1:
            diff.append(key)
    return _key_order(diff)


def summarize(runs, target: float | None = None) -> list[dict]:
    """One dict per run: path, differing config keys, then SUMMARY_COLUMNS.

    `runs`: Runs, paths, globs or directories (or one of them). Config keys
    are those that differ between the runs (IGNORED_KEYS left out); target
    is a test accuracy in [0, 1] for rounds_to_target / seconds_to_target.
    """
    runs = load_runs(runs)
    return _rows(runs, differing_keys([r.config for r in runs]), target)


def _rows(runs: list, keys: list[str], target) -> list[dict]:
    """One dict per run: path, the given config keys, then SUMMARY_COLUMNS."""
    target = check_target(target)
    return [{"path": run.path, **{k: run.config.get(k) for k in keys}, **run.summary(target)}
            for run in runs]


def load_many(paths_or_glob, target: float | None = None):
    """One row per run: path, every config key, then SUMMARY_COLUMNS.

    Returns a pandas DataFrame, or a list of dicts without pandas.
    """
    runs = load_runs(paths_or_glob)
    keys = _key_order(set().union(*(r.config for r in runs)))
    rows = _rows(runs, keys, target)
    pd = _pandas()
    if pd is None:
        return rows
    return pd.DataFrame(rows, columns=["path", *keys, *SUMMARY_COLUMNS])

