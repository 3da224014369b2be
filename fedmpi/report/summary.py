"""fedmpi-report summary: one row per run, the settings that differ, accuracy, time, traffic."""

from __future__ import annotations

from fedmpi import analysis
from fedmpi.report._format import emit, format_table

ORDER = 10  # place in --help
TARGET_COLUMNS = ("rounds_to_target", "seconds_to_target")


def cmd_summary(args) -> int:
    runs = analysis.load_runs(args.runs)
    rows = analysis.summarize(runs, target=args.target)
    columns = list(rows[0])
    if args.target is None:
        columns = [c for c in columns if c not in TARGET_COLUMNS]
    if all(r["epsilon"] is None for r in rows):  # no DP run among them
        columns.remove("epsilon")
    style = "csv" if args.csv else "markdown" if args.markdown else "text"
    planned = [r.rounds_planned for r in runs]
    emit(format_table(rows, columns, style, planned))
    return 0


def register(sub) -> None:
    s = sub.add_parser("summary", help="one row per run: differing settings, accuracy, "
                                       "time, traffic",
                       description="One row per run: the config keys that differ between "
                                   "the runs, then rounds_done, final_accuracy (last "
                                   "evaluated), best_accuracy, bytes_up, bytes_down, "
                                   "wall_seconds (sum of round times), epsilon (privacy "
                                   "spent, DP runs); with --target also "
                                   "rounds_to_target and seconds_to_target.")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy in [0, 1]: add the first round reaching it and the "
                        "cumulative seconds up to it")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with raw numbers")
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table")
    s.set_defaults(func=cmd_summary)
