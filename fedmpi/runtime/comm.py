"""MPI helpers: waiting without spinning, agreeing on errors, node-shared data.

A rank blocked in a plain MPICH collective polls at full speed and steals a
core from the ranks that are computing: with 8 ranks on 2 cores, a rank
waiting for the others spins on a core they need. So every collective is
started non-blocking and completed by `wait`, which tests the request and
sleeps in between with an exponential back-off. How long the sleeps may grow
depends on what is awaited: waiting for other ranks' training (seconds) may
sleep up to 1 ms a time; moving a model between ranks that are all present
takes many progress steps, each needing every rank awake, so those sleeps
stay below 50 us (measured, 8 ranks on 2 cores: 1 ms caps made the round's
reduce and broadcast take 70 ms instead of about 10).

`wait` is also where a hung rank is caught: `watch_round` arms a deadline
for the round (--round-timeout), and a rank whose wait outlives it reports
"I am here" to rank 0 with a small point-to-point message; a little later
rank 0 names the ranks that did not report and the job ends (status 1)
instead of waiting forever. Nothing is sent while rounds finish in time.
"""

from __future__ import annotations

import os
import statistics
import time

import numpy as np
from mpi4py import MPI

from fedmpi.errors import UserError

_MIN_SLEEP = 2e-6
LONG = 1e-3  # back-off cap while other ranks compute
SHORT = 5e-5  # back-off cap while data moves between ranks that are all here


class Hung(Exception):
    """Some rank did not reach the round's collectives within --round-timeout."""


AUTO_MIN = 60.0  # --round-timeout 0 (auto): never below this many seconds,
AUTO_FACTOR = 10.0  # else this many times the median round so far,
AUTO_AFTER = 3  # once this many rounds have been timed (before that: unwatched)
_TAG_HERE = 0x7ED0  # point-to-point tag of "I am waiting in round r" to rank 0


class _Watch:
    """The armed round: its deadline, and what has been reported about it."""

    def __init__(self):
        self.comm = None
        self.round = 0
        self.timeout = 0.0
        self.deadline = None  # time.monotonic() after which a wait reports / gives up
        self.reported = False
        self.sends = []  # pending "here" messages (kept until they complete)
        self.started = None  # monotonic time the previous round started
        self.durations = []  # seconds of each finished round on this rank

    def grace(self) -> float:
        """How long after the deadline rank 0 waits for reports before it judges."""
        return min(5.0, max(0.5, 0.1 * self.timeout))

    def check(self) -> None:
        """Called by a waiting rank; raises Hung once the round is judged hung."""
        now = time.monotonic()
        if now < self.deadline:
            return
        comm = self.comm
        if comm.rank != 0:
            if not self.reported:
                self.sends.append(comm.isend(self.round, dest=0, tag=_TAG_HERE))
                self.reported = True
            if now > self.deadline + max(3 * self.grace(), 0.5 * self.timeout):
                # rank 0 has not ended the job by now: it is the one missing
                raise Hung(f"round {self.round}: rank 0 did not arrive within "
                           f"{self.timeout:.0f} s (--round-timeout); aborting the job")
            return
        if now < self.deadline + self.grace():
            return
        here = set()
        status = MPI.Status()
        while comm.Iprobe(source=MPI.ANY_SOURCE, tag=_TAG_HERE, status=status):
            src = status.Get_source()
            if comm.recv(source=src, tag=_TAG_HERE) == self.round:
                here.add(src)
        missing = [r for r in range(1, comm.size) if r not in here]
        who = (f"rank(s) {', '.join(map(str, missing))} did not arrive" if missing else
               "every rank arrived but the round's collectives did not finish")
        raise Hung(f"round {self.round}: {who} within {self.timeout:.0f} s "
                   "(--round-timeout); aborting the job")


_watch = _Watch()


def watch_round(comm: MPI.Comm, rnd: int | None, timeout: float = 0.0) -> None:
    """Arm the watchdog for round `rnd` (None: disarm). timeout 0 = automatic.

    Automatic: max(AUTO_MIN, AUTO_FACTOR x the median of this rank's rounds so
    far), from the round after AUTO_AFTER timed rounds on.
    """
    w = _watch
    now = time.monotonic()
    if w.started is not None and w.comm is comm:
        w.durations.append(now - w.started)
    w.comm, w.started, w.reported = comm, now, False
    w.deadline = None
    if rnd is None or comm.size == 1:  # alone, nobody can be waited for
        w.started = None
        return
    if timeout > 0:
        w.timeout = timeout
    elif len(w.durations) >= AUTO_AFTER:
        w.timeout = max(AUTO_MIN, AUTO_FACTOR * statistics.median(w.durations))
    else:
        w.timeout = 0.0
    w.round = rnd
    if w.timeout > 0:
        w.deadline = now + w.timeout
    _test_hang(comm.rank, rnd)


def _test_hang(rank: int, rnd: int) -> None:
    """Test hook: FEDMPI_TEST_HANG_RANK=R:N makes rank R hang at the start of round N."""
    spec = os.environ.get("FEDMPI_TEST_HANG_RANK")
    if spec and spec == f"{rank}:{rnd}":
        time.sleep(3600)


def wait(req: MPI.Request, cap: float = LONG) -> None:
    """Complete `req`, giving the core back while it is pending.

    Raises Hung if the armed round's deadline passes (see watch_round).
    """
    delay = _MIN_SLEEP
    watch = _watch if _watch.deadline is not None else None
    while not req.Test():
        time.sleep(delay)
        delay = min(2 * delay, cap)
        if watch is not None:
            watch.check()


def barrier(comm: MPI.Comm) -> None:
    wait(comm.Ibarrier())


def bcast(comm: MPI.Comm, buf: np.ndarray, root: int = 0, cap: float = SHORT) -> None:
    wait(comm.Ibcast(buf, root=root), cap)


def reduce_sum(comm: MPI.Comm, send: np.ndarray, recv: np.ndarray | None, root: int = 0,
               cap: float = SHORT) -> None:
    wait(comm.Ireduce(send, recv, op=MPI.SUM, root=root), cap)


def gather_rows(comm: MPI.Comm, rows: np.ndarray, counts: list[int]) -> np.ndarray | None:
    """Every rank's float32 rows stacked on rank 0 in rank order (Gatherv); None elsewhere.

    counts[r] is how many rows rank r sends, known to every rank.
    """
    width = rows.shape[1]
    recv = None
    if comm.rank == 0:
        out = np.empty((sum(counts), width), np.float32)
        sizes = [c * width for c in counts]
        recv = [out, (sizes, np.cumsum([0] + sizes[:-1]).tolist()), MPI.FLOAT]
    wait(comm.Igatherv([rows, MPI.FLOAT], recv, root=0), SHORT)
    return out if comm.rank == 0 else None


def gather_in_client_order(comm: MPI.Comm, rows: np.ndarray,
                           clients_by_rank: list) -> np.ndarray | None:
    """Every rank's float32 rows on rank 0, one per client in ascending client id; None elsewhere.

    clients_by_rank[r] lists the client ids whose rows rank r sends, in its
    row order (known to every rank). The order does not depend on which rank
    trained which client, so neither does anything computed from the rows.
    """
    stacked = gather_rows(comm, rows, [len(ids) for ids in clients_by_rank])
    if comm.rank != 0:
        return None
    ids = np.concatenate([np.asarray(ids, np.int64) for ids in clients_by_rank])
    return stacked[np.argsort(ids, kind="stable")]


def scatter_rows(comm: MPI.Comm, rows: np.ndarray | None, counts: list[int],
                 width: int) -> np.ndarray:
    """Rank 0's float32 rows (sum(counts), width), counts[r] of them to rank r (Scatterv)."""
    out = np.empty((counts[comm.rank], width), np.float32)
    send = None
    if comm.rank == 0:
        sizes = [c * width for c in counts]
        send = [np.ascontiguousarray(rows, np.float32),
                (sizes, np.cumsum([0] + sizes[:-1]).tolist()), MPI.FLOAT]
    wait(comm.Iscatterv(send, [out, MPI.FLOAT], root=0), SHORT)
    return out


def gather_bytes(comm: MPI.Comm, buffers: list[np.ndarray],
                 counts: list[int]) -> list[np.ndarray] | None:
    """Every rank's uint8 buffers (any lengths) on rank 0, in rank order (two Gatherv).

    counts[r] is how many buffers rank r sends, known to every rank. The
    first Gatherv brings the lengths, the second the bytes, back to back.
    """
    lengths = np.array([b.size for b in buffers], np.int64)
    all_lengths = None
    recv = None
    if comm.rank == 0:
        all_lengths = np.empty(sum(counts), np.int64)
        recv = [all_lengths, (counts, np.cumsum([0] + counts[:-1]).tolist()), MPI.INT64_T]
    wait(comm.Igatherv([lengths, MPI.INT64_T], recv, root=0), SHORT)
    send = np.concatenate(buffers) if buffers else np.zeros(0, np.uint8)
    data = None
    if comm.rank == 0:
        ends = np.cumsum(all_lengths)
        per_rank = np.split(all_lengths, np.cumsum(counts)[:-1])
        sizes = [int(part.sum()) for part in per_rank]
        data = np.empty(int(ends[-1]) if ends.size else 0, np.uint8)
        recv = [data, (sizes, np.cumsum([0] + sizes[:-1]).tolist()), MPI.BYTE]
    wait(comm.Igatherv([send, MPI.BYTE], recv, root=0), SHORT)
    if comm.rank != 0:
        return None
    return np.split(data, ends[:-1]) if ends.size else []


def allreduce_max(comm: MPI.Comm, buf: np.ndarray) -> None:
    """buf = elementwise max of every rank's buf, in place (exact)."""
    wait(comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX))


def node_comm(comm: MPI.Comm) -> MPI.Comm:
    """The ranks of `comm` that share this rank's memory (its node), in rank order.

    FEDMPI_RANKS_PER_NODE=K instead cuts the ranks into groups of K, each
    acting as a node (the data held once per group, the inter-node
    collectives between group leaders): how the multi-node code paths are
    tested on one machine.
    """
    per_node = os.environ.get(RANKS_PER_NODE)  # checked by check_ranks_per_node
    if per_node:
        return comm.Split(comm.rank // int(per_node), comm.rank)
    return comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)


RANKS_PER_NODE = "FEDMPI_RANKS_PER_NODE"


def check_ranks_per_node(comm: MPI.Comm) -> None:
    """UserError on every rank unless FEDMPI_RANKS_PER_NODE is unset or the same
    integer >= 1 on all ranks.

    Virtual nodes are only right if every rank cuts the job the same way: a
    rank with another value (or none) would join other groups than the rest
    and the node collectives would deadlock or mix data.
    """
    raw = os.environ.get(RANKS_PER_NODE, "")
    error = None
    if raw:
        try:
            ok = int(raw) >= 1
        except ValueError:
            ok = False
        if not ok:
            error = (f"{RANKS_PER_NODE}={raw!r} on rank {comm.rank} is not an integer >= 1: "
                     f"unset it (it simulates nodes of that many ranks, for tests)")
    values = comm.allgather(raw)
    if error is None and len(set(values)) > 1:
        shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values) if v != values[0])
        error = (f"{RANKS_PER_NODE} differs between ranks (rank 0: {values[0]!r}; {shown}): "
                 "set it for the whole job or not at all")
    agree(comm, error)


def agree(comm: MPI.Comm, error: str | None) -> None:
    """Raise the same UserError on every rank if any rank had one.

    For checks that only some ranks can make (rank 0 checks the output path,
    node leaders read the data): all ranks then stop with status 2 together
    instead of the others waiting forever in the next collective.
    """
    barrier(comm)  # the allgather below would spin while slow ranks catch up
    errors = [e for e in comm.allgather(error) if e is not None]
    if errors:
        raise UserError(errors[0])


def share_arrays(comm: MPI.Comm, arrays: dict[str, np.ndarray] | None):
    """The arrays of the node leader (node rank 0), shared by every rank of the node.

    One copy per node in an MPI shared-memory window instead of one per rank.
    Returns ({name: read-only view}, handle); keep the handle (the window and
    the node communicator) alive as long as the views are used. Non-leaders pass None.
    """
    node = node_comm(comm)
    leader = node.rank == 0
    layout = None
    if leader:
        layout, pos = [], 0
        for name, a in arrays.items():
            layout.append((name, a.dtype.str, a.shape, pos))
            pos += -(-a.nbytes // 64) * 64  # 64-byte aligned starts
        layout.append(("", "", (), pos))
    layout = node.bcast(layout, root=0)
    total = layout[-1][3]
    win = MPI.Win.Allocate_shared(max(total, 1) if leader else 0, 1, comm=node)
    mem, _ = win.Shared_query(0)
    raw = np.frombuffer(mem, np.uint8, count=max(total, 1))
    views = {}
    for name, dtype, shape, pos in layout[:-1]:
        dt = np.dtype(dtype)
        n = int(np.prod(shape)) if shape else 1
        views[name] = raw[pos:pos + n * dt.itemsize].view(dt).reshape(shape)
        if leader:
            views[name][...] = arrays[name]
    barrier(node)
    for v in views.values():
        v.flags.writeable = False
    return views, (win, node)


class NodeShared:
    """The round's two big collectives through node shared memory.

    Summing the ranks' int64 update sums and broadcasting the new model with
    MPI Reduce/Bcast moves ~2.4 MB through many small progress steps, each
    needing the partner rank scheduled: with 8 ranks on 2 cores that cost
    more than the arithmetic. Here the ranks of a node write into one MPI
    shared-memory window, each sums a slice of the vector over all ranks
    (integers: exact in any order), and only the node leaders use MPI
    between nodes (Reduce/Bcast among leaders; global rank 0 leads its node).
    """

    def __init__(self, comm: MPI.Comm, n: int):
        self.n = n
        self.node = node_comm(comm)
        leader = self.node.rank == 0
        self.leaders = comm.Split(0 if leader else MPI.UNDEFINED, comm.rank)
        k = self.node.size
        # per rank: one int64 slot; then the int64 total and the float32 model
        nbytes = (k + 1) * n * 8 + n * 4
        self.win = MPI.Win.Allocate_shared(nbytes if leader else 0, 1, comm=self.node)
        mem, _ = self.win.Shared_query(0)
        raw = np.frombuffer(mem, np.uint8, count=nbytes)
        self.slots = raw[:k * n * 8].view(np.int64).reshape(k, n)
        self.total = raw[k * n * 8:(k + 1) * n * 8].view(np.int64)
        self.model = raw[(k + 1) * n * 8:].view(np.float32)
        lo = self.node.rank * n // k
        self.mine = slice(lo, (self.node.rank + 1) * n // k)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # passive target: Sync + barrier order the accesses

    def _fence(self) -> None:
        self.win.Sync()
        if self.node.size > 1:
            wait(self.node.Ibarrier(), SHORT)  # every rank is here or nearly
        self.win.Sync()

    def sum_to_root(self, acc: np.ndarray, out: np.ndarray | None) -> None:
        """out (on global rank 0) = sum of every rank's acc, exactly."""
        self.slots[self.node.rank] = acc
        self._fence()
        np.sum(self.slots[:, self.mine], axis=0, out=self.total[self.mine])
        self._fence()
        if self.leaders != MPI.COMM_NULL:
            if self.leaders.size > 1:
                # as uint64: MPI's unsigned sum wraps modulo 2^64 by definition (a
                # masked sum needs that), where signed overflow is undefined in C;
                # two's complement makes it the same bits as the int64 sum
                wait(self.leaders.Ireduce(self.total.view(np.uint64),
                                          None if out is None else out.view(np.uint64),
                                          op=MPI.SUM, root=0), SHORT)
            elif out is not None:
                out[:] = self.total

    def bcast_from_root(self, buf: np.ndarray) -> None:
        """buf on every rank = buf of global rank 0 (float32, length at most n)."""
        model = self.model[:buf.size]
        if self.leaders != MPI.COMM_NULL:
            if self.leaders.size > 1:
                wait(self.leaders.Ibcast(buf, root=0), SHORT)
            model[:] = buf
        self._fence()
        if self.node.rank != 0:
            buf[:] = model
        # no rank may overwrite the window (next round) before all have read it:
        # the next round's first write to it comes after sum_to_root's fence

    def free(self) -> None:
        # MPI_Win_free would spin while rank 0 writes the last round: sleep instead
        wait(self.node.Ibarrier())
        self.win.Unlock_all()
        self.win.Free()
