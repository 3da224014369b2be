"""Per-client state that a client carries from one round to its next.

Error-feedback residuals (compression) and control variates (SCAFFOLD) are
both one float32 vector of P values per client. A ClientStateStore holds one
such quantity for every client that has one, keyed by client id:

- rows are allocated lazily, on a client's first write: with 10,000 clients
  of which 10 train per round, after 100 rounds at most 1,000 hold a row;
- a row costs 4 * P bytes (796,840 B for the 784-200-200-10 MLP, so 10,000
  clients would take 7.97 GB); `describe()` prints this;
- given `max_rows` (the number of clients), the in-memory store reserves
  address space for all of them at once, without committing memory
  (MAP_NORESERVE: a page costs RAM when first written), so it never grows by
  copying -- doubling an array of 2,000 rows meant 3.2 GB at the moment of the
  copy for 1.6 GB of rows; where the kernel refuses such a reservation
  (strict overcommit), it falls back to doubling;
- memory is bounded by `spill_dir`: rows then live in a sparse file mapped
  with np.memmap, so RAM holds only the pages in use and the operating system
  writes the rest to disk. We chose this over float16 rows because it keeps
  results bitwise identical to the in-memory store (a float16 residual would
  change what a client sends) and bounds memory by the page cache, not by a
  factor of two;
- `export()` / `ClientStateStore.from_arrays()` turn the store into two arrays
  (ids, rows) for checkpoints and back.

Pure: no MPI. The runtime moves the rows of a round's clients to the ranks
that train them (`take`) and back (`put_many`).
"""

from __future__ import annotations

import mmap
import os
import shutil
import tempfile
import weakref

import numpy as np

_DTYPE = np.dtype(np.float32)
_MIN_CAPACITY = 16  # rows allocated at the first write


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 999.5 or unit == "TB":
            break
        n /= 1000.0
    return f"{n:.0f} B" if unit == "B" else f"{n:.3g} {unit}"


def _reserve(rows: int, cols: int) -> np.ndarray | None:
    """A zero (rows, cols) float32 array in reserved, uncommitted memory, or None
    where the system refuses the reservation."""
    flags = getattr(mmap, "MAP_NORESERVE", 0)
    try:
        mm = mmap.mmap(-1, rows * cols * _DTYPE.itemsize,
                       flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | flags)
    except (OSError, ValueError, AttributeError, OverflowError):
        return None
    return np.frombuffer(mm, _DTYPE).reshape(rows, cols)  # keeps `mm` alive as its base


class ClientStateStore:
    """float32 rows of `num_params` values keyed by client id, allocated on first write."""

    def __init__(self, num_params: int, *, name: str = "state", spill_dir: str | None = None,
                 max_rows: int | None = None):
        if num_params < 1:
            raise ValueError(f"num_params must be positive, got {num_params}")
        self.num_params = int(num_params)
        self.name = name
        self.max_rows = max_rows  # at most this many clients will hold a row (None: unknown)
        self._slot: dict[int, int] = {}  # client id -> row of self._rows
        self._ids: list[int] = []  # slot -> client id (insertion order)
        self._spill_dir = spill_dir
        self._dir: str | None = None  # made at the first write (a rank that never stores
        # anything leaves nothing behind) and removed by close() or at exit
        self._cleanup = None
        self._rows = np.zeros((0, self.num_params), _DTYPE)

    # -- storage ---------------------------------------------------------------

    @property
    def spilled(self) -> bool:
        return self._spill_dir is not None

    def _grow(self, rows_needed: int) -> None:
        capacity = self._rows.shape[0]
        if rows_needed <= capacity:
            return
        new = max(_MIN_CAPACITY, 2 * capacity, rows_needed)
        if self._spill_dir is None:
            rows = None
            if capacity == 0 and self.max_rows is not None and rows_needed <= self.max_rows:
                rows = _reserve(self.max_rows, self.num_params)
            if rows is None:
                # np.zeros maps fresh zero pages: unused capacity costs no RAM.
                rows = np.zeros((new, self.num_params), _DTYPE)
                rows[:capacity] = self._rows
        else:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix=f"fedmpi-{self.name}-", dir=self._spill_dir)
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, True)
            path = os.path.join(self._dir, "rows.f32")
            with open(path, "ab") as f:
                f.truncate(new * self.num_params * _DTYPE.itemsize)  # sparse: no disk used yet
            rows = np.memmap(path, _DTYPE, "r+", shape=(new, self.num_params))
        self._rows = rows

    def _new_slot(self, cid: int) -> int:
        slot = len(self._ids)
        self._grow(slot + 1)
        self._slot[cid] = slot
        self._ids.append(cid)
        return slot

    # -- access ----------------------------------------------------------------

    def __contains__(self, cid) -> bool:
        return int(cid) in self._slot

    def __len__(self) -> int:
        return len(self._ids)

    def ids(self) -> np.ndarray:
        """Client ids that hold a row, ascending."""
        return np.array(sorted(self._slot), np.int64)

    def get(self, cid) -> np.ndarray | None:
        """A read-only view of the client's row, or None if it has none (= zeros)."""
        slot = self._slot.get(int(cid))
        if slot is None:
            return None
        view = self._rows[slot]
        view.flags.writeable = False
        return view

    def put(self, cid, values: np.ndarray) -> None:
        """Store `values` (P,) as the client's row, allocating it on first write."""
        values = np.asarray(values)
        if values.shape != (self.num_params,):
            raise ValueError(f"a row has {self.num_params} values, got shape {values.shape}")
        cid = int(cid)
        slot = self._slot.get(cid)
        if slot is None:
            slot = self._new_slot(cid)
        self._rows[slot] = values

    def take(self, ids) -> tuple[np.ndarray, np.ndarray]:
        """(rows (n, P) float32, has (n,) bool) of clients `ids`: a copy, zeros where absent.

        What rank 0 scatters to the ranks that train these clients.
        """
        ids = np.asarray(ids, np.int64)
        out = np.zeros((ids.size, self.num_params), _DTYPE)
        has = np.zeros(ids.size, bool)
        for i, cid in enumerate(ids.tolist()):
            slot = self._slot.get(cid)
            if slot is not None:
                out[i] = self._rows[slot]
                has[i] = True
        return out, has

    def put_many(self, ids, rows: np.ndarray) -> None:
        """put() each (id, row); what rank 0 does with the rows gathered back."""
        ids = np.asarray(ids, np.int64)
        rows = np.asarray(rows)
        if rows.shape != (ids.size, self.num_params):
            raise ValueError(f"expected rows of shape {(ids.size, self.num_params)}, "
                             f"got {rows.shape}")
        for cid, row in zip(ids.tolist(), rows):
            self.put(cid, row)

    # -- checkpoints -------------------------------------------------------------

    def export(self) -> dict[str, np.ndarray]:
        """{"ids": int64 (n,), "rows": float32 (n, P)} in allocation order.

        When spilled, "rows" is a view of the mapped file (no copy of the
        whole store in RAM); do not keep it past the next write.
        """
        n = len(self._ids)
        return {"ids": np.array(self._ids, np.int64), "rows": self._rows[:n]}

    def load(self, arrays: dict[str, np.ndarray]) -> None:
        """Replace the contents with exported arrays (any order of ids)."""
        ids = np.asarray(arrays["ids"], np.int64)
        rows = np.asarray(arrays["rows"])
        if ids.ndim != 1 or rows.shape != (ids.size, self.num_params):
            raise ValueError(f"client state {self.name!r}: expected ids (n,) and rows "
                             f"(n, {self.num_params}), got {ids.shape} and {rows.shape}")
        if np.unique(ids).size != ids.size:
            raise ValueError(f"client state {self.name!r}: repeated client ids")
        self._slot.clear()
        self._ids.clear()
        self._grow(ids.size)
        for i, cid in enumerate(ids.tolist()):
            self._slot[cid] = i
            self._ids.append(cid)
        self._rows[:ids.size] = rows

    def checkpoint(self) -> dict[str, np.ndarray]:
        """export() under the checkpoint names <name>_ids and <name>_rows."""
        arrays = self.export()
        return {f"{self.name}_ids": arrays["ids"], f"{self.name}_rows": arrays["rows"]}

    def restore(self, arrays: dict[str, np.ndarray], owner: str) -> None:
        """load() from a checkpoint's arrays (untrusted input): UserError naming `owner`
        (who needs the state) if they are missing or malformed."""
        ids, rows = arrays.get(f"{self.name}_ids"), arrays.get(f"{self.name}_rows")
        p = self.num_params
        if (ids is None or rows is None or ids.dtype != np.int64 or ids.ndim != 1
                or rows.dtype != _DTYPE or rows.shape != (ids.size, p)
                or np.unique(ids).size != ids.size):
            from fedmpi.errors import UserError
            raise UserError(
                f"the checkpoint's {self.name}_ids/_rows are missing or malformed, but "
                f"{owner} needs int64 ids (n,) and float32 rows (n, {p}): the file is damaged "
                "or from another configuration")
        self.load({"ids": ids, "rows": rows})

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], *, name: str = "state",
                    spill_dir: str | None = None) -> "ClientStateStore":
        store = cls(np.asarray(arrays["rows"]).shape[1], name=name, spill_dir=spill_dir)
        store.load(arrays)
        return store

    # -- memory ------------------------------------------------------------------

    @property
    def bytes_per_client(self) -> int:
        return self.num_params * _DTYPE.itemsize

    @property
    def nbytes(self) -> int:
        """Bytes of the rows in use (allocated capacity may be up to twice this)."""
        return len(self._ids) * self.bytes_per_client

    def describe(self, num_clients: int | None = None) -> str:
        """One line of memory cost: per client, now, and for `num_clients` clients."""
        where = (f"spilled to a memory-mapped file under {self._spill_dir}" if self.spilled
                 else "in memory")
        line = (f"client state {self.name!r}: {_fmt_bytes(self.bytes_per_client)} per client "
                f"({self.num_params} float32); {len(self)} clients hold a row: "
                f"{_fmt_bytes(self.nbytes)} ({where})")
        if num_clients is not None:
            line += (f"; all {num_clients} clients would take "
                     f"{_fmt_bytes(num_clients * self.bytes_per_client)}")
        return line

    def close(self) -> None:
        """Drop the rows and remove the spill file, if any."""
        self._rows = np.zeros((0, self.num_params), _DTYPE)
        self._slot.clear()
        self._ids.clear()
        if self._cleanup is not None:
            self._cleanup()  # removes the spill directory
            self._dir = self._cleanup = None
