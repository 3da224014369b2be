"""Stop cleanly on SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before the time limit).

On rank 0 the handler raises Interrupted in the main thread, so the round
loop unwinds and rank 0 closes the results file, whose last checkpoint is
complete. While rank 0 writes a round (rows, model, checkpoint) the signal is
held back and raised right after, so a stop never leaves half a round in the
file.

A worker rank does not stop by itself: its ending would abort the job and
could kill rank 0 mid-write. It notes the signal (`install(defer=True)`), the
round loop carries the note to rank 0 with the round's statistics, and rank 0
stops at its own safe point after writing that round, as if signalled itself
(`deliver`); its abort then ends the workers.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

_held = False
_pending: int | None = None


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _handler(signum, frame):
    global _pending
    if _held:
        _pending = signum
        return
    raise Interrupted(signum)


_deferred: int | None = None  # worker ranks: the last signal received, not yet acted on


def _defer(signum, frame):
    global _deferred
    _deferred = signum


def install(defer: bool = False) -> None:
    """Handle SIGNALS: raise Interrupted (rank 0), or only note them (defer: workers)."""
    for sig in SIGNALS:
        signal.signal(sig, _defer if defer else _handler)


def deferred_row() -> tuple[float, float]:
    """(1, signal number) if this rank noted a signal, else (0, 0): summed over ranks,
    an exact (count, total) that `deliver` decodes on rank 0."""
    return (0.0, 0.0) if _deferred is None else (1.0, float(_deferred))


def deliver(row) -> None:
    """Rank 0, inside held(): stop after the write if workers noted a signal."""
    global _pending
    count, total = float(row[0]), float(row[1])
    if count > 0 and _pending is None:
        signum = round(total / count)  # the one number if all workers got the same signal
        _pending = signum if signum in [int(s) for s in SIGNALS] else int(signal.SIGTERM)


@contextmanager
def held():
    """Hold signals back for the duration of a write; raise afterwards if one came."""
    global _held, _pending
    _held = True
    try:
        yield
    finally:
        _held = False
        signum, _pending = _pending, None
        if signum is not None:
            raise Interrupted(signum)
