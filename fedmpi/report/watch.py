"""fedmpi-report watch: follow a running job's file, one line per round."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import numpy as np

from fedmpi import analysis
from fedmpi.errors import UserError
from fedmpi.report._format import emit, fmt_config, fmt_metric

ORDER = 40  # place in --help
def _value(run: analysis.Run, name: str, i: int):
    return float(run.metric(name)[i]) if run.has_metric(name) else None


def round_line(run: analysis.Run, i: int) -> str:
    """The progress line of row i of /rounds, with an ETA from config rounds."""
    planned = run.rounds_planned
    rnd = int(run.metric("round")[i])
    secs = np.asarray(run.metric("seconds"), dtype=np.float64)
    per_round = float(np.mean(secs[max(0, i - 9):i + 1]))  # recent rounds
    if planned is None:
        eta = "?"
    else:
        eta = str(timedelta(seconds=round(max(planned - rnd, 0) * per_round)))
    return (f"round {rnd:4d}/{planned if planned is not None else '?'}  "
            f"test_acc {fmt_metric(_value(run, 'test_accuracy', i)):>6}  "
            f"test_loss {fmt_metric(_value(run, 'test_loss', i)):>6}  "
            f"train_loss {fmt_metric(_value(run, 'train_loss', i)):>6}  "
            f"{secs[i]:.3f} s/round  ETA {eta}")


def _identity(run: analysis.Run) -> tuple:
    """What tells one run's file from another written later at the same path."""
    return tuple(run.attrs.get(k) for k in ("created", "command", "config"))


def watch(path: str, interval: float = 5.0, stream=None,
          give_up_after: float = 60.0) -> None:
    """Print each round of a run's file as it appears; return when all are done.

    Read errors after the first successful read (a file caught mid-write, or
    replaced by an --overwrite run) are retried for `give_up_after` seconds.
    """
    stream = sys.stdout if stream is None else stream

    def say(text):
        emit(text + "\n", stream)
        stream.flush()

    if interval <= 0:
        raise UserError(f"--interval must be positive, got {interval:g}")
    run = analysis.load(path)
    run.metric("round"), run.metric("seconds")  # UserError if missing
    c = run.config
    say(f"{path}: {fmt_config(c.get('dataset', '?'))}, {fmt_config(c.get('algorithm', '?'))}, "
        f"{fmt_config(c.get('clients', '?'))} clients "
        f"({fmt_config(c.get('clients_per_round', '?'))} per round), "
        f"{run.rounds_planned if run.rounds_planned is not None else '?'} rounds; "
        f"{run.rounds_done} done" + ("" if run.finished else "; Ctrl-C stops watching"))
    shown = 0
    identity = _identity(run)
    last_ok = time.monotonic()
    while True:
        n = run.rounds_done
        if _identity(run) != identity:
            say("(the file was replaced by a new run: starting over)")
            identity, shown = _identity(run), 0
        elif n < shown:
            say(f"(rows after {n} were removed: the run was resumed from a checkpoint, "
                f"or the file replaced)")
            shown = n
        for i in range(shown, n):
            say(round_line(run, i))
        shown = n
        if run.finished:
            summary = run.summary()
            final = summary["final_accuracy"]
            say(f"finished: {n} rounds in {summary['wall_seconds']:.1f} s, final test_acc "
                f"{fmt_metric(final)}")
            return
        time.sleep(interval)
        try:
            run = analysis.load(path)
            run.metric("round"), run.metric("seconds")
            last_ok = time.monotonic()
        except UserError as e:
            if time.monotonic() - last_ok > give_up_after:
                raise UserError(f"{e} (for over {give_up_after:.0f} s; stopped watching)") \
                    from None


def cmd_watch(args) -> int:
    try:
        watch(args.run, args.interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is the normal way to stop watching an unfinished run
    return 0


def register(sub) -> None:
    s = sub.add_parser("watch", help="follow a running job's file, one line per round",
                       description="Print each round of RUN as it is written (test "
                                   "accuracy and loss, train loss, seconds per round, ETA "
                                   "for the configured rounds) until the last round. "
                                   "Ctrl-C stops watching (exit status 0).")
    s.add_argument("run", metavar="RUN", help="the results file (--out) of the job")
    s.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between looks at the file (default: 5)")
    s.set_defaults(func=cmd_watch)
