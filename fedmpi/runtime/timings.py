"""Where each rank's start-up and shut-down time goes (FEDMPI_TIMINGS=1, for benchmarks).

A benchmark aid, not a setting of the run, so it is an environment variable
and not in --help. Each rank notes the wall-clock time when it passes a named
point of its start-up (`mark`); at the end rank 0 gathers every rank's marks
and prints them as one line, ``fedmpi-timings: {json}``, which
benchmarks/bench_run.py turns into a per-rank table. The process's own start
comes from /proc (10 ms resolution), so the first phase covers the
interpreter's start before any fedmpi code runs.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENABLED = os.environ.get("FEDMPI_TIMINGS") == "1"

_marks: list[tuple[str, float]] = []  # (phase that just ended, time.time() at its end)


def _process_start() -> float:
    """time.time() at which this process started (Linux /proc), or now elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            text = f.read()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        ticks = int(text[text.rindex(")") + 2:].split()[19])  # field 22: starttime
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


def mark(phase: str) -> None:
    """Note that `phase` (the work since the previous mark) has just ended."""
    if ENABLED:
        if not _marks:
            _marks.append(("", _process_start()))
        _marks.append((phase, time.time()))


def report(comm) -> None:
    """Rank 0 prints every rank's phases (a collective; call it on every rank)."""
    if not ENABLED:
        return
    mark("end")
    everyone = comm.gather(_marks, root=0)
    if comm.rank == 0:
        print("fedmpi-timings: " + json.dumps(everyone), flush=True)
        sys.stdout.flush()
