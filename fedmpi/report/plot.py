"""fedmpi-report plot: a /rounds metric against round, time or traffic, one curve per setting."""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np

from fedmpi import analysis
from fedmpi.errors import UserError
from fedmpi.layout import ROUND_FIELDS
from fedmpi.report._figure import DPI, figure_format, matplotlib_parts, save
from fedmpi.report._format import emit, fmt_config, note

ORDER = 20  # place in --help
FIGSIZE = (7.0, 4.5)  # inches; PNG pixels = FIGSIZE * dpi
X_CHOICES = ("round", "seconds", "bytes_up", "bytes_down", "epsilon")

# Common settings named in a plot's subtitle when all runs share them.
_SUBTITLE_KEYS = ("dataset", "partition", "algorithm", "clients", "clients_per_round")


class PlotResult(NamedTuple):
    labels: list[str]  # legend labels, one per curve
    notes: list[str]   # things the reader of the figure should know
    figure: object     # the matplotlib Figure (curves: figure.axes[0])


def metric_label(name: str) -> tuple[str, str]:
    """(axis label with units, units) for a /rounds metric."""
    units = ROUND_FIELDS.get(name, ("", ""))[0]
    text = name.replace("_", " ")
    if units == "1":
        return f"{text} (fraction)", units
    if units == "bytes":
        return f"{text} (B)", units
    return (f"{text} ({units})" if units else text), units


def x_label(x: str) -> str:
    if x == "round":
        return "round"
    if x == "seconds":
        return "wall-clock time, cumulative (s)"
    if x == "epsilon":
        return "privacy spent, epsilon (at the run's delta)"
    return f"{x.replace('_', ' ').replace('bytes', 'bytes sent')}, cumulative (B)"


def plot_runs(runs, out: str, *, y: str = "test_accuracy", x: str = "round",
              group_by: list[str] | None = None, dpi: int = DPI,
              title: str | None = None) -> PlotResult:
    """draw_runs, then save the figure to `out` (.png/.svg/.pdf)."""
    fmt = figure_format(out, dpi)
    result = draw_runs(runs, y=y, x=x, group_by=group_by, dpi=dpi, title=title)
    save(result.figure, out, fmt, dpi)
    return result


def draw_runs(runs, *, y: str = "test_accuracy", x: str = "round",
              group_by: list[str] | None = None, dpi: int = DPI,
              title: str | None = None) -> PlotResult:
    """Draw /rounds/<y> against x for every run on one new figure.

    Runs are grouped into curves by the `group_by` config keys (default: every
    key that differs between the runs except seed); a group of several runs
    (typically seeds) is drawn as their mean with a min-max band, over the
    rounds all of them have. x = seconds / bytes_* are cumulative sums; for a
    group, x is the mean over its runs at each round. Rounds where y is NaN
    (not evaluated) are skipped.
    """
    Figure, EngFormatter, MaxNLocator = matplotlib_parts()
    if x not in X_CHOICES:
        raise UserError(f"x {x!r} is not one of {', '.join(X_CHOICES)}")
    runs = analysis.load_runs(runs)
    if not any(r.has_metric(y) for r in runs):
        have = sorted(set().union(*(r.metrics for r in runs)))
        raise UserError(f"no run has /rounds/{y}: choose one of "
                        f"{', '.join(have) or '(no rounds written yet)'}")
    configs = [r.config for r in runs]
    varying = analysis.differing_keys(configs)
    if group_by is None:
        keys = [k for k in varying if k != "seed"]
    else:
        keys = list(dict.fromkeys(group_by))
        for k in keys:
            if not any(k in c for c in configs):
                raise UserError(
                    f"--group-by {k}: no such config key (keys that differ "
                    f"between these runs: {', '.join(varying) or 'none'})")

    groups: dict[tuple, list] = {}
    for run in runs:
        ident = tuple(analysis._canonical(run.config.get(k)) for k in keys)
        groups.setdefault(ident, []).append(run)

    fig = Figure(figsize=FIGSIZE, dpi=dpi, layout="constrained")
    ax = fig.add_subplot()
    labels, notes = [], []
    for members in groups.values():
        label = ", ".join(f"{k}={fmt_config(members[0].config.get(k))}" for k in keys)
        if not label:
            label = (os.path.basename(members[0].path) if len(members) == 1
                     else "all runs")
        series = []
        for run in members:
            if run.rounds_done == 0:
                notes.append(f"{run.path} has no rounds yet")
                continue
            rnd = np.asarray(run.metric("round"))
            yv = np.asarray(run.metric(y), dtype=np.float64)
            if x == "round":
                xv = rnd.astype(np.float64)
            elif x == "epsilon":  # already cumulative: the accountant's value after the round
                if not run.has_metric("epsilon"):
                    notes.append(f"{run.path} has no /rounds/epsilon (not a DP run)")
                    continue
                xv = np.asarray(run.metric("epsilon"), dtype=np.float64)
            else:
                xv = np.cumsum(np.asarray(run.metric(x), dtype=np.float64))
            keep = ~np.isnan(yv)
            if keep.any():
                series.append((rnd[keep], xv[keep], yv[keep]))
        if not series:
            notes.append(f"curve {label!r} has no {y} values")
            continue
        if len(series) == 1:
            _, xs, ys = series[0]
            line, = ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 30 else None,
                            markersize=3)
        else:
            common = series[0][0]
            for rnd, _, _ in series[1:]:
                common = np.intersect1d(common, rnd)
            if common.size == 0:
                notes.append(f"curve {label!r}: its runs share no evaluated round")
                continue
            if any(len(rnd) != len(common) for rnd, _, _ in series):
                notes.append(f"curve {label!r}: mean over the {len(common)} rounds "
                             f"all of its {len(series)} runs have")
            pick = [np.searchsorted(rnd, common) if np.all(np.diff(rnd) > 0)
                    else np.array([np.flatnonzero(rnd == c)[0] for c in common])
                    for rnd, _, _ in series]
            xs = np.mean([s[1][p] for s, p in zip(series, pick)], axis=0)
            ys = np.vstack([s[2][p] for s, p in zip(series, pick)])
            other = [k for k in analysis.differing_keys([r.config for r in members])
                     if k != "seed"]
            what = "runs" if other else "seeds"
            if other:
                notes.append(f"curve {label!r} averages runs that also differ in "
                             f"{', '.join(other)}")
            label = f"{label} (mean, min-max of {len(series)} {what})"
            line, = ax.plot(xs, ys.mean(axis=0), label=label,
                            marker="o" if len(xs) <= 30 else None, markersize=3)
            ax.fill_between(xs, ys.min(axis=0), ys.max(axis=0),
                            color=line.get_color(), alpha=0.2, linewidth=0)
        labels.append(label)
    if not labels:
        raise UserError(f"nothing to plot: no run has {y} values yet")

    y_label, y_units = metric_label(y)
    ax.set_xlabel(x_label(x))
    ax.set_ylabel(y_label)
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if x.startswith("bytes"):
        ax.xaxis.set_major_formatter(EngFormatter(unit="B"))
    if y_units == "bytes":
        ax.yaxis.set_major_formatter(EngFormatter(unit="B"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    if title is None:
        shared = [f"{k}={fmt_config(configs[0][k])}" for k in _SUBTITLE_KEYS
                  if k not in varying and k in configs[0] and k not in keys]
        title = f"{y.replace('_', ' ')} vs {x_label(x).split(',')[0]}"
        if shared:
            title += "\n" + ", ".join(shared)
    ax.set_title(title, fontsize="medium")
    return PlotResult(labels, notes, fig)



def cmd_plot(args) -> int:
    matplotlib_parts()  # fail before reading any file
    group_by = None
    if args.group_by:
        group_by = [k.strip() for item in args.group_by for k in item.split(",") if k.strip()]
    result = plot_runs(args.runs, args.out, y=args.y, x=args.x, group_by=group_by,
                       dpi=args.dpi, title=args.title)
    for text in result.notes:
        note(text)
    emit(f"wrote {args.out}: {len(result.labels)} curve(s): {'; '.join(result.labels)}\n")
    return 0


def register(sub) -> None:
    s = sub.add_parser("plot", help="a metric against round, time or traffic, one curve per "
                                    "setting",
                       description="Overlaid curves of a /rounds metric. Runs that differ "
                                   "only in seed form one curve: their mean with a min-max "
                                   "band. Needs matplotlib (pip install fedmpi[plot]).")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--y", default="test_accuracy", metavar="METRIC",
                   help="a /rounds dataset: test_accuracy, test_loss, train_loss, ... "
                        "(default: test_accuracy)")
    s.add_argument("--x", default="round", choices=X_CHOICES,
                   help="round, epsilon (DP runs), or cumulative seconds / bytes_up / bytes_down "
                        "(default: round)")
    s.add_argument("--group-by", action="append", metavar="KEY",
                   help="config key(s) that make one curve each, repeatable or comma "
                        "separated; runs sharing them are averaged (default: every key "
                        "that differs except seed)")
    s.add_argument("--out", required=True, metavar="FILE",
                   help="figure file: .png, .svg or .pdf")
    s.add_argument("--dpi", type=int, default=DPI,
                   help=f"resolution (default: {DPI}; PNG size {FIGSIZE[0]:g}x{FIGSIZE[1]:g} "
                        f"inches times this)")
    s.add_argument("--title", help="figure title (default: metric vs x and the shared "
                                   "settings)")
    s.set_defaults(func=cmd_plot)
