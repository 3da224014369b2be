"""Reading fedmpi results files: the one place that opens them for reading.

Files come from other people, other versions and crashed jobs, so everything
read here is untrusted. A file that is damaged or hostile gets a UserError
naming the file and the problem (one line, exit 2 in the tools), never a
traceback, a hang or unbounded memory:

- only hard links are followed, and datasets must keep their data in this
  file: soft and external links, external raw storage and virtual datasets
  are refused (they would make a reader open other files);
- a dataset is only read if its declared size is backed by storage in the
  file (a tiny file can declare a sparse chunked dataset of 10^12 rows);
- shapes and dtypes are checked against what the writer (fedmpi.results)
  writes, and values that index arrays (client_id) against the file's own
  metadata (/partition), so a bad value can't size an allocation;
- a checkpoint is only returned if it is complete and agrees with the rows
  of the file (see read_checkpoint).

Files are opened with ``locking=False``, so finished, killed and still-running
jobs can all be read; a read that catches the writer between two metadata
writes is retried while the file is live (recently modified).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import h5py
import numpy as np

from fedmpi.errors import UserError, printable
from fedmpi.layout import LAYOUT_VERSION, OPEN_WRITERS, WRITER_LOCKING, num_params

# A dataset may declare at most this many bytes more than the file stores for
# it (unwritten chunks read as zeros). Covers a writer killed between growing a
# column and writing it; refuses sparse datasets that would exhaust memory.
MAX_UNBACKED_BYTES = 64 * 2**20
# Compressed data (fedmpi writes none, but h5repack can) may expand this much.
_FILTER_EXPANSION = 1000

_LIVE_SECONDS = 30.0  # a file modified this recently may be mid-write by its job
_READ_ATTEMPTS = 6

# What h5py raises on damaged or half-written files (it maps HDF5's errors to
# these); anything else is a bug in fedmpi and keeps its traceback.
_H5_ERRORS = (OSError, KeyError, ValueError, RuntimeError, TypeError, IndexError,
              OverflowError, SystemError, RecursionError)


class _Transient(Exception):
    """A read failure that a file being written can cause (retried while live)."""


def _py(value):
    """h5py attribute value -> plain Python (numpy scalars to int/float)."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


class ResultsFile:
    """An open results file with checked access to its objects.

    Use through :func:`open_checked`; every accessor raises UserError (bad
    file) or lets h5py's errors through (caught and retried by the caller).
    """

    def __init__(self, f: h5py.File, path: str):
        self.f, self.path = f, path
        attrs = self._root_attrs()
        if "layout_version" not in attrs:
            raise UserError(f"{path} is an HDF5 file but not a fedmpi results file "
                            f"(no layout_version attribute)")
        version = attrs["layout_version"]
        if not _is_int(version) or version < 1:
            self.bad(f"its layout_version attribute is {version!r}, not a positive integer")
        if version > LAYOUT_VERSION:
            raise UserError(
                f"results file {path} has layout version {version}, newer "
                f"than this fedmpi reads ({LAYOUT_VERSION}): upgrade fedmpi")
        self.attrs = attrs
        self.config = self._config(attrs.get("config", "{}"))

    def bad(self, what: str):
        raise UserError(f"{self.path}: {printable(what)}; the file is damaged or was not "
                        f"written by fedmpi")

    # -- attributes ---------------------------------------------------------

    def _root_attrs(self) -> dict:
        out = {}
        for name in self.f.attrs:
            try:
                out[name] = _py(self.f.attrs[name])
            except _H5_ERRORS:
                continue  # an attribute h5py can't decode is not one fedmpi wrote
        return out

    def _config(self, text) -> dict:
        if not isinstance(text, str):
            self.bad("its config attribute is not a JSON text")
        try:
            config = json.loads(text)
        except (ValueError, RecursionError):
            self.bad("its config attribute is not valid JSON")
        if not isinstance(config, dict):
            self.bad("its config attribute is not a JSON object")
        return config

    def int_attr(self, obj, name: str, *, minimum: int = 0) -> int:
        """An integer attribute >= minimum of obj."""
        if name not in obj.attrs:
            self.bad(f"{obj.name} has no {name} attribute")
        value = _py(obj.attrs[name])
        if not _is_int(value) or value < minimum:
            self.bad(f"{obj.name} attribute {name} is {value!r}, not an integer >= {minimum}")
        return value

    # -- objects --------------------------------------------------------------

    def _member(self, group, name: str):
        """group/name if it is a hard link, None if absent; refuses other links."""
        link = group.get(name, getlink=True)
        if link is None:
            return None
        if not isinstance(link, h5py.HardLink):
            kind = "an external link" if isinstance(link, h5py.ExternalLink) else "a soft link"
            raise UserError(
                f"{self.path}: {printable(group.name.rstrip('/'))}/{printable(name)} is {kind}; "
                f"fedmpi reads only objects stored in the results file itself")
        return group[name]

    def group(self, name: str, parent=None) -> h5py.Group | None:
        obj = self._member(self.f if parent is None else parent, name)
        if obj is not None and not isinstance(obj, h5py.Group):
            self.bad(f"{obj.name} is not a group")
        return obj

    def names(self, group) -> list[str]:
        """Names of the datasets in group (links checked)."""
        out = []
        for name in group.keys():
            if isinstance(self._member(group, name), h5py.Dataset):
                out.append(name)
        return out

    def dataset(self, group, name: str, *, ndim: int, kinds: str) -> h5py.Dataset | None:
        """group/name checked: stored here, backed by storage, ndim and dtype kind."""
        ds = self._member(group, name)
        if ds is None:
            return None
        if not isinstance(ds, h5py.Dataset):
            self.bad(f"{ds.name} is not a dataset")
        if ds.is_virtual:
            raise UserError(f"{self.path}: {printable(ds.name)} is a virtual dataset; fedmpi "
                            f"reads only data stored in the results file itself")
        if ds.external:
            raise UserError(f"{self.path}: {printable(ds.name)} keeps its data in external "
                            f"files; fedmpi reads only data stored in the results file itself")
        if ds.ndim != ndim or ds.dtype.kind not in kinds:
            self.bad(f"{ds.name} has shape {ds.shape} and dtype {ds.dtype}, expected "
                     f"{ndim} dimension(s) of {_KIND_NAMES[kinds]}")
        declared = int(np.prod(ds.shape, dtype=object)) * ds.dtype.itemsize
        stored = ds.id.get_storage_size()
        if ds.id.get_create_plist().get_nfilters():
            stored *= _FILTER_EXPANSION
        if declared - stored > MAX_UNBACKED_BYTES:
            self.bad(f"{ds.name} declares {declared} bytes ({ds.shape}) but the file holds "
                     f"only {ds.id.get_storage_size()} for it")
        return ds

    # -- what readers need ------------------------------------------------------

    def columns(self, group_name: str, names=None) -> dict[str, np.ndarray]:
        """Equal-length 1-D numeric columns of /rounds or /clients, cut to the shortest.

        The writer keeps columns equal; unequal lengths can only come from a
        writer killed mid-round whose partial writes reached the disk, and that
        round's row is incomplete, so it's dropped. `names`: only these.
        """
        group = self.group(group_name)
        if group is None:
            return {}
        available = self.names(group)
        wanted = available if names is None else [n for n in names if n in available]
        sets = {n: self.dataset(group, n, ndim=1, kinds="iufb") for n in available}
        rows = min((len(ds) for ds in sets.values()), default=0)
        cols = {n: sets[n][:rows] for n in wanted}
        if group_name == "clients" and "client_id" in cols:
            self._check_client_ids(cols["client_id"])
        return cols

    def num_clients(self, required: bool = True) -> int | None:
        """Clients of the run: rows of /partition/num_samples, else config ``clients``.

        None (or UserError if required) when the file has neither.
        """
        part = self.group("partition")
        sizes = None if part is None else self.dataset(part, "num_samples", ndim=1, kinds="iu")
        if sizes is not None:
            return len(sizes)
        value = self.config.get("clients")
        if _is_int(value) and value >= 0:
            return value
        if required:
            self.bad("it has neither /partition/num_samples nor an integer config 'clients'")
        return None

    def _check_client_ids(self, ids: np.ndarray) -> None:
        if ids.size == 0:
            return
        if ids.dtype.kind not in "iu":
            self.bad(f"/clients/client_id has dtype {ids.dtype}, not integers")
        n = self.num_clients()
        low, high = ids.min(), ids.max()
        if low < 0 or high >= n:
            self.bad(f"/clients/client_id holds {low if low < 0 else high}, outside the "
                     f"{n} clients of /partition")

    def partition(self) -> dict[str, np.ndarray]:
        part = self.group("partition")
        if part is None:
            return {}
        out = {}
        sizes = self.dataset(part, "num_samples", ndim=1, kinds="iu")
        hist = self.dataset(part, "label_histogram", ndim=2, kinds="iu")
        if sizes is not None:
            out["num_samples"] = sizes[()]
        if hist is not None:
            if sizes is not None and hist.shape[0] != len(sizes):
                self.bad(f"/partition/label_histogram has {hist.shape[0]} rows for "
                         f"{len(sizes)} clients")
            out["label_histogram"] = hist[()]
        return out

    def layer_sizes(self) -> list[int]:
        model = self.group("model")
        if model is None or "layer_sizes" not in model.attrs:
            return []
        sizes = np.asarray(model.attrs["layer_sizes"])
        if sizes.ndim != 1 or sizes.size < 2 or sizes.dtype.kind not in "iu" or sizes.min() < 1:
            self.bad(f"/model attribute layer_sizes is {sizes.tolist()!r}, not two or more "
                     f"positive integers")
        return [int(s) for s in sizes]

    def params(self, name: str = "params", group=None) -> np.ndarray | None:
        """A flat float32 parameter vector of the model's size, or None if absent."""
        if group is None:
            group = self.group("model")
            if group is None:
                return None
        ds = self.dataset(group, name, ndim=1, kinds="f")
        if ds is None:
            return None
        expected = num_params(self.layer_sizes())
        if ds.dtype != np.float32 or len(ds) != expected:
            self.bad(f"{ds.name} has shape {ds.shape} and dtype {ds.dtype}, expected "
                     f"({expected},) float32 for layer sizes {self.layer_sizes()}")
        return ds[()]


_KIND_NAMES = {"iufb": "numbers", "iu": "integers", "f": "floats"}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# -- opening, with retries for live files ---------------------------------------

def _with_file(path: str, read):
    """read(ResultsFile) on path, retried while a live file can explain a failure."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise UserError(f"{path} is a directory, not a results file")
    if not os.path.exists(path):
        raise UserError(f"results file {path} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a regular file, so not a fedmpi results file")
    for attempt in range(_READ_ATTEMPTS):
        try:
            return _read_once(path, read)
        except _Transient as e:
            live = time.time() - os.path.getmtime(path) < _LIVE_SECONDS
            if not live or attempt == _READ_ATTEMPTS - 1:
                raise UserError(f"cannot read results file {path}: "
                                f"{printable(' '.join(str(e).split()))}") from None
            time.sleep(0.05 * 2 ** attempt)
    raise AssertionError("unreachable")


def _read_once(path: str, read):
    # locking=False: a reader must neither wait for nor block the running
    # job that writes this file. Exception: a file this process is writing,
    # where HDF5 insists on the writer's own locking setting (and shares the
    # open file, so no lock is taken anyway).
    same_process = os.path.realpath(path) in OPEN_WRITERS
    f = None
    # The caller's own code may hold the file open too (h5py.File with default
    # locking): HDF5 then insists on that setting, and shares the open file.
    for locking in (WRITER_LOCKING if same_process else False, True, "best-effort"):
        try:
            f = h5py.File(path, "r", locking=locking)
            break
        except OSError as e:
            if not h5py.is_hdf5(path):
                raise UserError(f"{path} is not an HDF5 file, so not a fedmpi results "
                                f"file") from None
            if "flag values don't match" not in str(e):
                raise _Transient(e) from None
            error = e
    if f is None:
        raise _Transient(error)
    try:
        return read(ResultsFile(f, path))
    except _H5_ERRORS as e:
        raise _Transient(e) from None
    finally:
        f.close()


# -- public readers -----------------------------------------------------------------

def read_run(path: str) -> dict:
    """Read a whole results file (also one still being written) into memory.

    Returns {"config", "attrs", "rounds", "clients", "partition", "params",
    "layer_sizes", "num_clients"}; "params" is /model/params or None if not
    written yet. UserError if the file is missing, not a fedmpi file, or damaged.
    """
    def read(rf: ResultsFile) -> dict:
        return {**read_meta_of(rf), "clients": rf.columns("clients"),
                "partition": rf.partition(), "params": rf.params()}
    return _with_file(path, read)


def read_meta_of(rf: ResultsFile) -> dict:
    return {"config": rf.config, "attrs": rf.attrs, "rounds": rf.columns("rounds"),
            "layer_sizes": rf.layer_sizes(), "num_clients": rf.num_clients(required=False)}


def read_meta(path: str) -> dict:
    """What a summary needs, cheaply: config, attrs, layer_sizes, num_clients, /rounds."""
    return _with_file(path, read_meta_of)


def read_part(path: str, what: str):
    """One more part of a file read by read_meta: "clients", "partition" or "params"."""
    readers = {"clients": lambda rf: rf.columns("clients"),
               "partition": ResultsFile.partition, "params": ResultsFile.params}
    return _with_file(path, readers[what])


@dataclass(frozen=True)
class Checkpoint:
    config: dict
    round: int
    arrays: dict[str, np.ndarray]
    rounds_rows: int   # rows of /rounds and /clients that the checkpoint covers
    clients_rows: int
    layer_sizes: list[int]


def _checkpoint(rf: ResultsFile) -> Checkpoint | None:
    """The current checkpoint slot, checked; None if the file has no /checkpoint.

    Every array is a vector of the model's size: ``params`` float32 (as the
    model), all other (server state) float64, as the runtime writes them.
    """
    group = rf.group("checkpoint")
    if group is None:
        return None
    current = rf.int_attr(group, "current")
    if current not in (0, 1):
        rf.bad(f"/checkpoint attribute current is {current}, not 0 or 1")
    slot = rf.group(f"slot{current}", group)
    if slot is None:
        rf.bad(f"/checkpoint/slot{current}, the current checkpoint, is missing")
    rnd = rf.int_attr(slot, "round")
    if "round" in group.attrs and rf.int_attr(group, "round") != rnd:
        rf.bad(f"/checkpoint says round {rf.int_attr(group, 'round')} but its slot{current} "
               f"holds round {rnd}")
    rows = {name: rf.int_attr(slot, f"{name}_rows") for name in ("rounds", "clients")}
    for name, n in rows.items():
        g = rf.group(name)
        have = [] if g is None else [len(rf.dataset(g, d, ndim=1, kinds="iufb"))
                                     for d in rf.names(g)]
        if n > min(have, default=0):
            rf.bad(f"the checkpoint covers {n} rows of /{name} but the file has "
                   f"{min(have, default=0)}")
    if rows["rounds"]:
        last = rf.dataset(rf.group("rounds"), "round", ndim=1, kinds="iu")
        if last is None or int(last[rows["rounds"] - 1]) != rnd:
            rf.bad(f"the checkpoint is of round {rnd} but /rounds/round of its last row is "
                   f"{None if last is None else int(last[rows['rounds'] - 1])}")
    if rows["clients"]:
        last = rf.dataset(rf.group("clients"), "round", ndim=1, kinds="iu")
        if last is None or int(last[rows["clients"] - 1]) > rnd:
            rf.bad(f"the checkpoint of round {rnd} covers /clients rows of later rounds")
    layer_sizes = rf.layer_sizes()
    if not layer_sizes:
        rf.bad("/model has no layer_sizes attribute")
    size = num_params(layer_sizes)
    arrays = {}
    for name in rf.names(slot):
        if name == "params":
            ds = rf.dataset(slot, name, ndim=1, kinds="f")
            if ds.dtype != np.float32 or ds.shape != (size,):
                rf.bad(f"checkpoint array params has shape {ds.shape} and dtype {ds.dtype}, "
                       f"expected ({size},) float32")
        else:
            # server state of the algorithm and the update pipeline's stages: each owner
            # checks shape and dtype as it loads its arrays; dataset() bounds what is read
            ndim = getattr(rf._member(slot, name), "ndim", 1)
            ds = rf.dataset(slot, name, ndim=ndim if ndim in (1, 2) else 1, kinds="iuf")
        arrays[name] = ds[()]
    if "params" not in arrays:
        rf.bad(f"/checkpoint/slot{current} has no params")
    return Checkpoint(rf.config, rnd, arrays, rows["rounds"], rows["clients"], layer_sizes)


def read_checkpoint_full(path: str) -> Checkpoint | None:
    """The checked current checkpoint of path (see _checkpoint), or None if none."""
    return _with_file(path, _checkpoint)


def read_checkpoint(path: str) -> tuple[dict, int, dict[str, np.ndarray]] | None:
    """(config, round, arrays) of the run's last complete checkpoint, or None.

    None if the file is a fedmpi results file without a checkpoint; UserError
    if it is missing, not a fedmpi file, or its checkpoint is damaged.
    """
    ckpt = read_checkpoint_full(path)
    return None if ckpt is None else (ckpt.config, ckpt.round, ckpt.arrays)
