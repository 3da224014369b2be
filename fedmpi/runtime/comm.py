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
"""

from __future__ import annotations

import os
import time

import numpy as np
from mpi4py import MPI

from fedmpi.errors import UserError

_MIN_SLEEP = 2e-6
LONG = 1e-3  # back-off cap while other ranks compute
SHORT = 5e-5  # back-off cap while data moves between ranks that are all here


def wait(req: MPI.Request, cap: float = LONG) -> None:
    """Complete `req`, giving the core back while it is pending."""
    delay = _MIN_SLEEP
    while not req.Test():
        time.sleep(delay)
        delay = min(2 * delay, cap)


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
                wait(self.leaders.Ireduce(self.total, out, op=MPI.SUM, root=0), SHORT)
            elif out is not None:
                out[:] = self.total

    def bcast_from_root(self, buf: np.ndarray) -> None:
        """buf on every rank = buf of global rank 0 (float32, length n)."""
        if self.leaders != MPI.COMM_NULL:
            if self.leaders.size > 1:
                wait(self.leaders.Ibcast(buf, root=0), SHORT)
            self.model[:] = buf
        self._fence()
        if self.node.rank != 0:
            buf[:] = self.model
        # no rank may overwrite the window (next round) before all have read it:
        # the next round's first write to it comes after sum_to_root's fence

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()
