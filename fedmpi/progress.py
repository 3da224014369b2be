"""Rank 0's round-by-round report: a progress bar on a terminal, plain lines otherwise.

Batch logs (SLURM output files, pipes) get one self-contained line per round,
so they stay readable and greppable; a terminal gets one line rewritten in
place with a bar and an ETA.
"""

from __future__ import annotations

import collections
import math
import statistics
import sys


def _duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    def __init__(self, total_rounds: int, first_round: int = 1, stream=None, tty: bool | None = None):
        self.total = total_rounds
        self.first = first_round
        self.stream = stream if stream is not None else sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.recent = collections.deque(maxlen=10)
        self.last_acc = float("nan")

    def eta(self, rnd: int) -> float:
        """Seconds left, from the median of the recent rounds (round 1 pays
        numba's compilation, so a plain mean would overestimate)."""
        if not self.recent:
            return float("nan")
        return statistics.median(self.recent) * (self.total - rnd)

    def round_done(self, rnd: int, test_acc: float, test_loss: float, train_loss: float,
                   seconds: float) -> None:
        self.recent.append(seconds)
        if not math.isnan(test_acc):
            self.last_acc = test_acc
        eta = _duration(self.eta(rnd))
        if self.tty:
            width = 24
            filled = int(width * rnd / self.total)
            bar = "#" * filled + "." * (width - filled)
            line = (f"\rround {rnd}/{self.total} [{bar}] test_acc {self.last_acc:.4f}  "
                    f"{seconds:.3f} s/round  ETA {eta}")
            self.stream.write(line + ("\n" if rnd == self.total else ""))
        else:
            self.stream.write(f"round {rnd:4d}/{self.total}  test_acc {test_acc:.4f}  "
                              f"test_loss {test_loss:.4f}  train_loss {train_loss:.4f}  "
                              f"{seconds:.3f} s  ETA {eta}\n")
        self.stream.flush()

    def close(self) -> None:
        """End a partly drawn bar (stopped early) with a newline."""
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
