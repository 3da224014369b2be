"""HDF5 results file: the only place in fedmpi that writes HDF5 results
(fedmpi/data/leaf.py writes data files in TensorFlow Federated's layout).

Used by rank 0 only (no MPI here). One file per run, laid out as::

    /                     attrs: config (JSON), fedmpi_version, created,
                          layout_version, plus caller attrs (mpi_size, ...)
    /rounds/<metric>      1-D, one row per round (ROUND_FIELDS)
    /clients/<field>      1-D, one row per (round, client) (CLIENT_FIELDS)
    /partition/num_samples, /partition/label_histogram (and client_ids: the
                          data set's names of its clients, for h5 data)
    /model/<name>         flat float32 parameter vectors; attrs layer_sizes
    /segments/<i>         one group per run segment (the first run, then each
                          resume): attrs first_round, config, mpi_size,
                          command, ranks, started; the root attrs config,
                          mpi_size, command and ranks are the last segment's

Crash safety: the file stays open for the whole run and is flushed after
every round, so a job killed at any moment (SIGKILL, wall-time limit) leaves a
file that plain ``h5py.File(path, "r")`` opens, holding every flushed round.
That is why we use h5py's default ``libver`` and no SWMR: a SWMR/"latest"
file whose writer was SIGKILLed is marked "open for writing" in its superblock
and plain readers refuse it, while a default-libver file carries no such mark.
"""

from __future__ import annotations

import errno
import fcntl
import json
import numbers
import os
import stat
import tempfile
from datetime import datetime, timezone

import h5py
import numpy as np

import fedmpi
from fedmpi.analysis import load, load_many
from fedmpi.errors import UserError
from fedmpi.layout import (CLIENT_FIELDS, FLAT_LAYOUT, LAYOUT_VERSION, MORE_CLIENT_FIELDS,
                           MORE_ROUND_FIELDS, OPEN_WRITERS, ROUND_FIELDS, WRITER_LOCKING,
                           layers_from_flat, num_params)
# the names this module's writer used before layout.py existed
_FLAT_LAYOUT, _OPEN_WRITERS, _WRITER_LOCKING, _num_params = (
    FLAT_LAYOUT, OPEN_WRITERS, WRITER_LOCKING, num_params)
from fedmpi.reading import read_checkpoint, read_checkpoint_full, read_run

_RESERVED_ROOT_ATTRS = ("config", "fedmpi_version", "created",
                        "layout_version")
# Root attrs that describe the segment of the run that wrote them: a resumed
# run replaces them (and keeps every segment's under /segments).
_SEGMENT_ATTRS = ("config", "mpi_size", "command", "ranks", "data_fingerprint")

# Units of the loss columns by the run's --loss: cross-entropy is in nats, a
# squared error of one-hot targets has no unit.
LOSS_UNITS = {"cross_entropy": "nats", "mse": "1"}
_LOSS_COLUMNS = ("test_loss", "train_loss")

# Chunk lengths (rows). Small enough that a short run doesn't waste space,
# large enough that a long run doesn't pay per-chunk overhead per row.
_ROUND_CHUNK = 256
_CLIENT_CHUNK = 4096


def require_regular_file(path: str, what: str = "results file") -> None:
    """Raise UserError if path exists but is not a regular file (or a link to one).

    A FIFO or a device would make every later open block or misbehave
    (opening a FIFO for reading waits for a writer forever).
    """
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # nothing there (or a dangling link, or a parent that is a file): later checks say
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {path} is a directory: give a file name to --out")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {path} is not a regular file (a FIFO, socket or device): "
                        "give the path of an HDF5 file")


def _probe_lock(path: str) -> None:
    """Raise UserError if another open handle holds an HDF5 lock on path.

    Needed because HDF5's mode "w" truncates the file (O_TRUNC) *before*
    trying its lock: overwriting a file a running job is writing would wipe
    that job's results and only then fail. HDF5 locks with flock(), so an
    exclusive non-blocking flock here sees both writers and locking readers.
    """
    require_regular_file(path)
    try:
        # O_NONBLOCK: should the path become a FIFO after the check above,
        # the open still returns at once instead of waiting for a writer
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return  # unreadable: the later open reports it
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise UserError(f"results file {path} is not a regular file: give the path of "
                            "an HDF5 file")
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
            raise UserError(
                f"results file {path} is open in another process (a running "
                f"fedmpi job or an HDF5 reader): stop it or choose another "
                f"--out") from None
        # ENOLCK/EOPNOTSUPP etc.: no locking on this file system, so nobody
        # else's HDF5 lock can exist either; nothing to detect.
    finally:
        os.close(fd)  # also releases our probe lock


def _hold_lock_if_hdf5_does_not(path: str) -> int | None:
    """An fd holding an exclusive flock on path, if HDF5 holds none; else None.

    HDF5_USE_FILE_LOCKING=FALSE in the writer's environment (some sites set it
    for every job on file systems without flock) overrides h5py's `locking`
    and the writer then holds no lock: another run's --overwrite could not
    see it and would delete a live file. So the writer takes a lock of its
    own where HDF5 did not; where flock is unsupported, nobody can lock.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)  # held by HDF5 (the usual case), or flock unsupported
        return None
    return fd


def check_output_path(path: str, overwrite: bool) -> None:
    """Check early (before any work) that a results file can go to path.

    Raises UserError if path is a directory, exists and not overwrite, is
    open in another process, or its parent directory can't be created or
    written. Creates missing parent directories; leaves no file behind.
    """
    require_regular_file(path)
    if os.path.lexists(path):
        if not overwrite:
            raise UserError(
                f"results file {path} already exists: pass --overwrite or "
                f"choose another --out")
        _probe_lock(path)
    parent = os.path.dirname(os.path.abspath(path))
    # makedirs would say "File exists" here, which reads like a clash with
    # the results file itself; name the real problem instead.
    for ancestor in _ancestors(parent):
        if os.path.exists(ancestor) and not os.path.isdir(ancestor):
            raise UserError(
                f"cannot create directory {parent} for results file {path}: "
                f"{ancestor} is a file, not a directory")
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create directory {parent} for results file {path}: "
            f"{e.strerror or e}") from None
    # Actually create a file rather than trust os.access: os.access says yes
    # to root on read-only or full file systems and ignores ACL subtleties.
    try:
        with tempfile.TemporaryFile(dir=parent, prefix=".fedmpi-probe-"):
            pass
    except OSError as e:
        raise UserError(
            f"cannot write results file {path}: directory {parent} is not "
            f"writable ({e.strerror or e})") from None


def _ancestors(directory: str):
    """directory, its parent, ... up to the root (absolute paths)."""
    while True:
        yield directory
        up = os.path.dirname(directory)
        if up == directory:
            return
        directory = up


def _append(ds, n: int, a: np.ndarray) -> None:
    """Rows n.. of the 1-D dataset `ds` = `a` (of its dtype), growing it to n + len(a):
    h5py's low-level calls, as `ds.resize` and `ds[n:] = a` make them, without
    the high-level selection machinery (~0.1 ms a column, every round)."""
    m = a.shape[0]
    ds.id.set_extent((n + m,))
    if m:
        file_space = ds.id.get_space()
        file_space.select_hyperslab((n,), (m,))
        ds.id.write(h5py.h5s.create_simple((m,)), file_space, a)


def _is_int_scalar(v) -> bool:
    # bool is an int in Python; np.bool_ isn't numbers.Integral, so list it.
    return isinstance(v, (numbers.Integral, np.bool_))


class ResultsWriter:
    """Writes one run's results file; keep it open for the run.

    Per round the runtime calls append_round, append_clients, then flush.
    Datasets under /rounds and /clients are created on the first append, so
    their set of names and dtypes comes from the runtime, not from here.
    """

    def __init__(self, path: str, *, overwrite: bool, config: dict,
                 attrs: dict, layer_sizes: list[int],
                 partition_sizes: np.ndarray, label_histogram: np.ndarray,
                 client_ids: np.ndarray | None = None):
        # Validate everything before touching the file system, so a bad
        # argument doesn't leave a half-written file or clobber an old one.
        config_json = json.dumps(config, sort_keys=True)
        for key, value in attrs.items():
            if key in _RESERVED_ROOT_ATTRS:
                raise ValueError(f"root attribute {key!r} is reserved")
            if not isinstance(value, (str, numbers.Real)):
                raise TypeError(
                    f"root attribute {key!r} must be str, int or float, "
                    f"not {type(value).__name__}")
        layer_sizes = [int(s) for s in layer_sizes]
        if len(layer_sizes) < 2 or min(layer_sizes) < 1:
            raise ValueError(f"bad layer_sizes {layer_sizes}")
        num_samples = np.asarray(partition_sizes)
        histogram = np.asarray(label_histogram)
        if num_samples.ndim != 1 or histogram.ndim != 2 or (
                histogram.shape[0] != num_samples.shape[0]):
            raise ValueError(
                f"partition_sizes must be (clients,) and label_histogram "
                f"(clients, classes); got {num_samples.shape} and "
                f"{histogram.shape}")

        check_output_path(path, overwrite)
        if overwrite and os.path.lexists(path):
            # Remove rather than let HDF5 truncate (see _probe_lock), then
            # create exclusively: a racing job gets an error, not our file.
            os.unlink(path)
        try:
            self._file = h5py.File(path, "x", locking=_WRITER_LOCKING)
        except FileExistsError:
            raise UserError(
                f"results file {path} already exists: pass --overwrite or "
                f"choose another --out") from None
        except OSError as e:
            raise UserError(f"cannot create results file {path}: {e}") \
                from None
        self.path = path
        self._realpath = os.path.realpath(path)
        OPEN_WRITERS.add(self._realpath)
        self._own_lock = _hold_lock_if_hdf5_does_not(path)
        self._num_rounds = 0
        self._num_client_rows = 0
        self._round_keys: tuple[str, ...] | None = None
        self._client_keys: tuple[str, ...] | None = None
        self._column_cache: dict[str, dict] = {}
        self._loss_units = LOSS_UNITS.get(config.get("loss", "cross_entropy"), "")

        f = self._file
        f.attrs["config"] = config_json
        f.attrs["fedmpi_version"] = fedmpi.__version__
        f.attrs["created"] = datetime.now(timezone.utc).isoformat(
            timespec="seconds")
        f.attrs["layout_version"] = LAYOUT_VERSION
        for key, value in attrs.items():
            f.attrs[key] = value
        self._record_segment(1)

        part = f.create_group("partition")
        part.attrs["description"] = (
            "How the training set was split among clients; row i is client "
            "i (client_id in /clients)")
        ds = part.create_dataset("num_samples", data=num_samples,
                                 dtype="int64")
        ds.attrs["units"] = "samples"
        ds.attrs["description"] = "Training samples assigned to each client"
        ds = part.create_dataset("label_histogram", data=histogram,
                                 dtype="int64")
        ds.attrs["units"] = "samples"
        ds.attrs["description"] = (
            "Training samples of each class per client, shape "
            "(clients, classes)")
        if client_ids is not None:  # a natural data set's own names of its clients
            ds = part.create_dataset("client_ids", data=np.asarray(client_ids, dtype=bytes))
            ds.attrs["description"] = (
                "The data set's id of each client (row i is client i), e.g. the users "
                "of a TensorFlow Federated HDF5 file in sorted order")

        # /model and its layout attrs exist from the start, so a killed run
        # still tells readers how to interpret any parameters written later.
        model = f.create_group("model")
        model.attrs["layer_sizes"] = np.asarray(layer_sizes, dtype="int64")
        model.attrs["num_params"] = _num_params(layer_sizes)
        model.attrs["description"] = _FLAT_LAYOUT
        self._layer_sizes = layer_sizes

        f.create_group("rounds").attrs["description"] = (
            "One row per federated round; all datasets have the same length "
            "and 'round' is their dimension scale")
        f.create_group("clients").attrs["description"] = (
            "One row per (round, client) that trained; all datasets have the "
            "same length")
        # Make the file readable even if we're killed before the first round.
        f.flush()

    # -- appending -------------------------------------------------------

    def _check_open(self) -> None:
        if self._file is None:
            raise ValueError(f"results file {self.path} is closed")

    def append_round(self, row: dict) -> None:
        """Append one row to /rounds; keys must be the same every call."""
        self._check_open()
        keys = tuple(sorted(row))
        if self._round_keys is not None and keys != self._round_keys:
            raise ValueError(
                f"round fields changed: expected {list(self._round_keys)}, "
                f"got {list(keys)}")
        group = self._file["rounds"]
        # Convert every value first, so a bad one raises before any dataset
        # grows and the datasets stay the same length.
        values = {}
        for name, value in row.items():
            if not isinstance(value, (numbers.Real, np.bool_)):
                raise TypeError(f"round field {name!r} must be a number, "
                                f"not {type(value).__name__}")
            if self._round_keys is None:
                is_int = _is_int_scalar(value)
            else:
                is_int = self._columns("rounds")[name].dtype.kind == "i"
                if is_int and not _is_int_scalar(value):
                    raise ValueError(f"round field {name!r} was an integer "
                                     f"in earlier rounds, now {value!r}")
            values[name] = int(value) if is_int else float(value)

        if self._round_keys is None:
            self._create_columns(group, values, ROUND_FIELDS, _ROUND_CHUNK)
            self._set_loss_units(group)
            self._round_keys = keys
        n = self._num_rounds
        columns = self._columns("rounds")
        for name, value in values.items():
            ds = columns[name]
            _append(ds, n, np.array([value], ds.dtype))
        self._num_rounds = n + 1

    def append_clients(self, cols: dict) -> None:
        """Append rows to /clients: one array per field, all equally long."""
        self._check_open()
        keys = tuple(sorted(cols))
        if self._client_keys is not None and keys != self._client_keys:
            raise ValueError(
                f"client fields changed: expected {list(self._client_keys)}, "
                f"got {list(keys)}")
        group = self._file["clients"]
        arrays = {}
        for name, col in cols.items():
            a = np.asarray(col)
            if a.ndim != 1:
                raise ValueError(f"client field {name!r} must be 1-D, "
                                 f"got shape {a.shape}")
            if a.dtype.kind not in "iubf":
                raise TypeError(f"client field {name!r} must be numeric, "
                                f"got dtype {a.dtype}")
            if self._client_keys is None:
                is_int = a.dtype.kind in "iub"
            else:
                is_int = self._columns("clients")[name].dtype.kind == "i"
                if is_int and a.dtype.kind == "f":
                    raise ValueError(f"client field {name!r} was integer in "
                                     f"earlier rounds, now {a.dtype}")
            arrays[name] = a.astype("int64" if is_int else "float64",
                                    copy=False)
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) > 1:
            raise ValueError(
                "client fields have different lengths: "
                + ", ".join(f"{k}={len(a)}" for k, a in arrays.items()))
        m = lengths.pop() if lengths else 0

        if self._client_keys is None:
            self._create_columns(group, arrays, CLIENT_FIELDS, _CLIENT_CHUNK)
            self._set_loss_units(group)
            self._client_keys = keys
        n = self._num_client_rows
        columns = self._columns("clients")
        for name, a in arrays.items():
            _append(columns[name], n, np.ascontiguousarray(a))
        self._num_client_rows = n + m

    def _columns(self, group: str) -> dict:
        """{name: dataset} of /rounds or /clients, looked up once: an h5py lookup per
        column and round cost more than the write itself."""
        cache = self._column_cache.get(group)
        if cache is None:
            cache = self._column_cache[group] = dict(self._file[group].items())
        return cache

    def _set_loss_units(self, group) -> None:
        for name in _LOSS_COLUMNS:
            if name in group:
                group[name].attrs["units"] = self._loss_units

    @staticmethod
    def _create_columns(group, values: dict, fields: dict,
                        chunk: int) -> None:
        """Create an empty resizable 1-D dataset per key, with attrs."""
        for name, value in values.items():
            kind = np.asarray(value).dtype.kind
            ds = group.create_dataset(
                name, shape=(0,), maxshape=(None,), chunks=(chunk,),
                dtype="int64" if kind == "i" else "float64")
            more = MORE_ROUND_FIELDS if fields is ROUND_FIELDS else MORE_CLIENT_FIELDS
            units, description = fields.get(name) or more.get(name, ("", ""))
            ds.attrs["units"] = units
            ds.attrs["description"] = description
        # Only /rounds/round is a proper coordinate (one value per row,
        # increasing); /clients/round repeats, so it stays a plain column.
        if fields is ROUND_FIELDS and "round" in values:
            scale = group["round"]
            scale.make_scale("round")
            for name in values:
                if name != "round":
                    group[name].dims[0].attach_scale(scale)

    def set_attrs(self, attrs: dict) -> None:
        """Set root attributes measured during the run (e.g. a final estimate)."""
        self._check_open()
        for key, value in attrs.items():
            if key in _RESERVED_ROOT_ATTRS:
                raise ValueError(f"attribute {key!r} is reserved")
            self._file.attrs[key] = value

    def write_params(self, name: str, params: np.ndarray) -> None:
        """Store a flat parameter vector as /model/<name> (float32)."""
        self._check_open()
        flat = np.asarray(params, dtype="float32")
        expected = _num_params(self._layer_sizes)
        if flat.ndim != 1 or flat.size != expected:
            raise ValueError(
                f"params must be a flat vector of {expected} values for "
                f"layer sizes {self._layer_sizes}, got shape {flat.shape}")
        model = self._file["model"]
        if name in model:
            del model[name]  # shapes are fixed, so replace rather than write
        ds = model.create_dataset(name, data=flat)
        ds.attrs["description"] = _FLAT_LAYOUT

    # -- checkpoints -------------------------------------------------------

    def write_checkpoint(self, round_: int, arrays: dict[str, np.ndarray]) -> None:
        """Store what a resumed run needs after `round_`, atomically.

        Two slots under /checkpoint: the new state goes into the slot not in
        use, is flushed, and only then does /checkpoint's `current` attribute
        switch to it. A job killed while writing leaves `current` on the
        previous, complete slot. Datasets keep their shapes, so after the
        first two checkpoints a write changes data in place, not metadata.
        """
        self._check_open()
        group = self._file.require_group("checkpoint")
        current = int(group.attrs.get("current", -1))
        slot = group.require_group(f"slot{1 - current if current in (0, 1) else 0}")
        for name, a in arrays.items():
            a = np.asarray(a)
            if name in slot and (slot[name].shape != a.shape or slot[name].dtype != a.dtype):
                del slot[name]
            if name in slot:
                slot[name][...] = a
            else:
                slot.create_dataset(name, data=a)
        slot.attrs["round"] = int(round_)
        slot.attrs["rounds_rows"] = self._num_rounds
        slot.attrs["clients_rows"] = self._num_client_rows
        self._file.flush()
        group.attrs["current"] = int(slot.name[-1])
        group.attrs["round"] = int(round_)
        self._file.flush()

    def _record_segment(self, first_round: int) -> None:
        """Keep the root's segment attrs (this run's) under /segments/<i>.

        Segments that started after `first_round` are dropped: their rounds
        were cut off and are about to be re-run by this segment.
        """
        f = self._file
        group = f.require_group("segments")
        group.attrs["description"] = (
            "One group per run segment: the first run, then each resume; attrs say "
            "from which round on it ran and how (config JSON, mpi_size, command)")
        for name in list(group):
            if int(group[name].attrs["first_round"]) >= first_round:
                del group[name]
        seg = group.create_group(str(len(group)))
        seg.attrs["first_round"] = int(first_round)
        seg.attrs["started"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        seg.attrs["fedmpi_version"] = fedmpi.__version__
        for key in _SEGMENT_ATTRS:
            if key in f.attrs:
                seg.attrs[key] = f.attrs[key]

    @classmethod
    def reopen(cls, path: str, *, config: dict | None = None, attrs: dict | None = None,
               data_fingerprint: dict | None = None,
               ) -> tuple["ResultsWriter", int, dict[str, np.ndarray]]:
        """Open a run's file to continue it from its last checkpoint.

        Rows written after that checkpoint (rounds that will be re-run) are
        cut off. The checkpoint is checked first (fedmpi.reading.read_checkpoint_full),
        so a damaged file is refused with a UserError before anything changes.
        `config` and `attrs` (mpi_size, command, ...) describe the resumed
        segment: they replace the root's and are kept under /segments, so
        readers see the run as it now is (e.g. more rounds). A
        `data_fingerprint` (fedmpi.data.fingerprint) must equal the one
        stored, if any: a resume on other data or another partition would
        silently mix two runs. Returns (writer, checkpoint round, arrays).
        """
        require_regular_file(path)
        ckpt = read_checkpoint_full(path)
        if ckpt is None:
            raise UserError(f"{path} has no checkpoint to resume from: start the run afresh")
        if data_fingerprint is not None:
            _check_fingerprint(path, data_fingerprint)
        _probe_lock(path)
        self = cls.__new__(cls)
        try:
            self._file = h5py.File(path, "r+", locking=_WRITER_LOCKING)
        except OSError as e:
            raise UserError(f"cannot open {path} to resume: {e}") from None
        self.path = path
        self._realpath = os.path.realpath(path)
        OPEN_WRITERS.add(self._realpath)
        self._own_lock = _hold_lock_if_hdf5_does_not(path)
        f = self._file
        self._layer_sizes = ckpt.layer_sizes
        self._num_rounds = ckpt.rounds_rows
        self._num_client_rows = ckpt.clients_rows
        self._column_cache = {}
        run_config = config if config is not None else ckpt.config
        self._loss_units = LOSS_UNITS.get(run_config.get("loss", "cross_entropy"), "")
        try:
            if config is not None:
                f.attrs["config"] = json.dumps(config, sort_keys=True)
            for key, value in (attrs or {}).items():
                if key in _RESERVED_ROOT_ATTRS:
                    raise ValueError(f"root attribute {key!r} is reserved")
                f.attrs[key] = value
            if config is not None or attrs:
                if "segments" not in f:  # a file from before segments: the first one is unknown
                    f.create_group("segments")
                self._record_segment(ckpt.round + 1)
            for group, n in ((f["rounds"], self._num_rounds),
                             (f["clients"], self._num_client_rows)):
                for ds in group.values():
                    if ds.maxshape != (None,):  # the writer's columns all grow
                        raise UserError(f"{path}: {ds.name} cannot grow, so the run cannot "
                                        f"continue in this file; it was not written by fedmpi")
                    ds.resize((n,))
            self._round_keys = tuple(sorted(f["rounds"])) or None
            self._client_keys = tuple(sorted(f["clients"])) or None
            f.flush()
        except (OSError, KeyError, TypeError, ValueError) as e:
            self.close()
            raise UserError(f"cannot resume {path}: {e}") from None
        except UserError:
            self.close()
            raise
        return self, ckpt.round, ckpt.arrays

    # -- lifetime ----------------------------------------------------------

    def flush(self) -> None:
        """Push everything written so far to the OS (call after each round).

        This is what makes a SIGKILLed run's file readable. It doesn't fsync:
        a killed process's writes survive in the page cache; only a node
        crash could lose them, and an fsync per round is costly on Lustre.
        """
        self._check_open()
        self._file.flush()

    def close(self) -> None:
        """Flush and close; calling it again does nothing."""
        if self._file is None:
            return
        try:
            self._file.close()
        finally:
            self._file = None
            OPEN_WRITERS.discard(self._realpath)
            if self._own_lock is not None:
                os.close(self._own_lock)
                self._own_lock = None

    def __enter__(self) -> "ResultsWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _check_fingerprint(path: str, now: dict) -> None:
    """UserError naming what differs between the data fingerprint in path and `now`."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            stored = f.attrs.get("data_fingerprint")
            if isinstance(stored, bytes):
                stored = stored.decode()
            stored = None if stored is None else json.loads(str(stored))
    except (OSError, ValueError, UnicodeDecodeError):
        raise UserError(f"cannot read the data fingerprint of {path}") from None
    if stored is None:
        return  # written before fingerprints: nothing to compare with
    if not isinstance(stored, dict):
        raise UserError(f"{path}: its data_fingerprint attribute is not a JSON object")
    changed = [k for k in sorted(set(stored) | set(now)) if stored.get(k) != now.get(k)]
    if changed:
        raise UserError(
            f"cannot resume {path}: the " + ", ".join(
                f"{k} (file {stored.get(k)}, now {now.get(k)})" for k in changed)
            + " changed since the run started, so the resumed rounds would not continue it; "
            "resume with the run's own data and NumPy, or start a new run")


# -- reading: fedmpi.reading and fedmpi.analysis; names kept here for old imports --

__all__ = ["CLIENT_FIELDS", "LAYOUT_VERSION", "ROUND_FIELDS", "ResultsWriter",
           "check_output_path", "layers_from_flat", "load", "load_many", "read_checkpoint",
           "read_run"]
