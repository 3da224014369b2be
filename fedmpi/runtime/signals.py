"""Stop cleanly on SIGTERM, SIGINT and SIGUSR1 (SLURM's warning before the time limit).

The handler raises Interrupted in the main thread, so the round loop unwinds
and rank 0 closes the results file, whose last checkpoint is complete. While
rank 0 writes a round (rows, model, checkpoint) the signal is held back and
raised right after, so a stop never leaves half a round in the file.
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


def install() -> None:
    for sig in SIGNALS:
        signal.signal(sig, _handler)


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
