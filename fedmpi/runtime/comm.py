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


def allreduce_max(comm: MPI.Comm, value: float) -> float:
    buf = np.array([value], np.float64)
    wait(comm.Iallreduce(MPI.IN_PLACE, buf, op=MPI.MAX))
    return float(buf[0])


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
    node = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
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
