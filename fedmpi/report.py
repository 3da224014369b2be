"""``fedmpi-report`` (or ``python -m fedmpi.report``): tables, plots and live progress of runs.

::

    fedmpi-report summary results/*.h5 [--target 0.8] [--csv | --markdown]
    fedmpi-report plot results/*.h5 --y test_accuracy --x round|seconds|bytes_up \\
        [--group-by KEY] --out acc.png|svg|pdf
    fedmpi-report clients results/run.h5 [--out clients.png|svg|pdf]
    fedmpi-report watch results/run.h5 [--interval 5]

RUN arguments are results files, globs (quote them to pass them through the
shell; ``results/**/*.h5`` recurses) or directories (their ``*.h5``). Files of
finished, killed and still-running jobs can all be read.

Bad input gets one line ``fedmpi-report: error: <what is wrong>`` on stderr
and exit status 2, with no traceback.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
import time
from datetime import timedelta
from typing import NamedTuple

import numpy as np

from fedmpi import analysis
from fedmpi.cli import run_tool
from fedmpi.errors import UserError
from fedmpi.results import ROUND_FIELDS

PROG = "fedmpi-report"
FIGSIZE = (7.0, 4.5)  # inches; PNG pixels = FIGSIZE * dpi
DPI = 150
FIGURE_FORMATS = ("png", "svg", "pdf")
X_CHOICES = ("round", "seconds", "bytes_up", "bytes_down")
TARGET_COLUMNS = ("rounds_to_target", "seconds_to_target")

# Common settings named in a plot's subtitle when all runs share them.
_SUBTITLE_KEYS = ("dataset", "partition", "algorithm", "clients", "clients_per_round")


# -- formatting ---------------------------------------------------------------

def _is_number(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def fmt_config(value) -> str:
    """A config value as in the TOML fedmpi prints (hidden as 128,64)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def fmt_bytes(n) -> str:
    """Bytes with an SI prefix: 950 B, 18.3 kB, 1.20 GB."""
    n = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            break
        n /= 1000.0
    if unit == "B":
        return f"{n:.0f} B"
    return f"{n:.3g} {unit}"


def _fmt_metric(value) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _cell(column: str, value, human: bool) -> str:
    if value is None:
        return "-" if human else ""
    if column in ("final_accuracy", "best_accuracy"):
        return f"{value:.4f}" if human else repr(value)
    if column in ("seconds_to_target", "wall_seconds"):
        return f"{value:.2f}" if human else repr(value)
    if column in ("bytes_up", "bytes_down"):
        return fmt_bytes(value) if human else str(value)
    if isinstance(value, float) and not human:
        return repr(value)
    return fmt_config(value)


def format_table(rows: list[dict], columns: list[str], style: str = "text",
                 planned: list | None = None) -> str:
    """rows as an aligned text table, a Markdown table, or CSV."""
    if style == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_cell(c, row.get(c), human=False) for c in columns])
        return buf.getvalue()

    cells = []
    for i, row in enumerate(rows):
        line = []
        for c in columns:
            if c == "rounds_done" and planned is not None and planned[i] is not None:
                line.append(f"{row[c]}/{planned[i]}")
            else:
                line.append(_cell(c, row.get(c), human=True))
        cells.append(line)
    numeric = [c == "rounds_done" or (
        any(row.get(c) is not None for row in rows)
        and all(row.get(c) is None or _is_number(row.get(c)) for row in rows))
        for c in columns]
    if style == "markdown":
        def esc(s):
            return s.replace("|", "\\|")
        header = [esc(c) for c in columns]
        body = [[esc(s) for s in line] for line in cells]
    else:
        header, body = list(columns), cells
    widths = [max(len(header[j]), *(len(line[j]) for line in body))
              for j in range(len(columns))]

    def join(line):
        parts = [s.rjust(w) if num else s.ljust(w)
                 for s, w, num in zip(line, widths, numeric)]
        if style == "markdown":
            return "| " + " | ".join(parts) + " |"
        return "  ".join(parts).rstrip()

    out = [join(header)]
    if style == "markdown":
        out.append("|" + "|".join(
            ("-" * (w + 1) + ":") if num else ("-" * (w + 2))
            for w, num in zip(widths, numeric)) + "|")
    else:
        out.append("  ".join("-" * w for w in widths))
    out.extend(join(line) for line in body)
    return "\n".join(out) + "\n"


# -- summary ------------------------------------------------------------------

def cmd_summary(args) -> int:
    runs = analysis.load_runs(args.runs)
    rows = analysis.summarize(runs, target=args.target)
    columns = list(rows[0])
    if args.target is None:
        columns = [c for c in columns if c not in TARGET_COLUMNS]
    style = "csv" if args.csv else "markdown" if args.markdown else "text"
    planned = [r.rounds_planned for r in runs]
    sys.stdout.write(format_table(rows, columns, style, planned))
    return 0


# -- plot ---------------------------------------------------------------------

class PlotResult(NamedTuple):
    labels: list[str]  # legend labels, one per curve
    notes: list[str]   # things the reader of the figure should know


def _matplotlib():
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, MaxNLocator
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: "
                        "pip install fedmpi[plot] (or pip install matplotlib)") from None
    return Figure, EngFormatter, MaxNLocator


def _metric_label(name: str) -> tuple[str, str]:
    """(axis label with units, units) for a /rounds metric."""
    units = ROUND_FIELDS.get(name, ("", ""))[0]
    text = name.replace("_", " ")
    if units == "1":
        return f"{text} (fraction)", units
    if units == "bytes":
        return f"{text} (B)", units
    return (f"{text} ({units})" if units else text), units


def _x_label(x: str) -> str:
    if x == "round":
        return "round"
    if x == "seconds":
        return "wall-clock time, cumulative (s)"
    return f"{x.replace('_', ' ').replace('bytes', 'bytes sent')}, cumulative (B)"


def _figure_format(out: str, dpi: int) -> str:
    """png, svg or pdf from the name of `out`; UserError otherwise or for a bad dpi."""
    fmt = os.path.splitext(out)[1].lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise UserError(f"cannot tell the figure type of {out}: give a file "
                        f"name ending in .png, .svg or .pdf")
    if dpi < 1:
        raise UserError(f"dpi must be positive, got {dpi}")
    return fmt


def _save(fig, out: str, fmt: str, dpi: int) -> None:
    """fig to out, creating its directory; UserError if that fails."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        fig.savefig(out, dpi=dpi, format=fmt)
    except OSError as e:
        raise UserError(f"cannot write figure {out}: {e.strerror or e}") from None


def plot_runs(runs, out: str, *, y: str = "test_accuracy", x: str = "round",
              group_by: list[str] | None = None, dpi: int = DPI,
              title: str | None = None) -> PlotResult:
    """Draw /rounds/<y> against x for every run, save to `out` (.png/.svg/.pdf).

    Runs are grouped into curves by the `group_by` config keys (default: every
    key that differs between the runs except seed); a group of several runs
    (typically seeds) is drawn as their mean with a min-max band, over the
    rounds all of them have. x = seconds / bytes_* are cumulative sums; for a
    group, x is the mean over its runs at each round. Rounds where y is NaN
    (not evaluated) are skipped.
    """
    Figure, EngFormatter, MaxNLocator = _matplotlib()
    fmt = _figure_format(out, dpi)
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

    y_label, y_units = _metric_label(y)
    ax.set_xlabel(_x_label(x))
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
        title = f"{y.replace('_', ' ')} vs {_x_label(x).split(',')[0]}"
        if shared:
            title += "\n" + ", ".join(shared)
    ax.set_title(title, fontsize="medium")

    _save(fig, out, fmt, dpi)
    return PlotResult(labels, notes)


def cmd_plot(args) -> int:
    _matplotlib()  # fail before reading any file
    group_by = None
    if args.group_by:
        group_by = [k.strip() for item in args.group_by for k in item.split(",") if k.strip()]
    result = plot_runs(args.runs, args.out, y=args.y, x=args.x, group_by=group_by,
                       dpi=args.dpi, title=args.title)
    for note in result.notes:
        print(f"{PROG}: note: {note}", file=sys.stderr)
    print(f"wrote {args.out}: {len(result.labels)} curve(s): {'; '.join(result.labels)}")
    return 0


# -- clients ------------------------------------------------------------------

CLIENTS_FIGSIZE = (8.0, 9.0)  # inches; PNG pixels = CLIENTS_FIGSIZE * dpi
CLIENTS_TOP = 5               # most / least sampled clients listed
LOSS_ROWS = 15                # about this many rounds in the train-loss table


def _num(value) -> str:
    """A count or a median of counts: 600, 3.5, 60000."""
    value = float(value)
    if not math.isfinite(value):
        return "-"
    return str(int(value)) if value.is_integer() else f"{value:.1f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _min_median_max(values) -> str:
    values = np.asarray(values)
    if values.size == 0:
        return "-"
    return (f"min {_num(values.min())}  median {_num(np.median(values))}  "
            f"max {_num(values.max())}")


def _run_heading(run: analysis.Run) -> str:
    c = run.config
    planned = run.rounds_planned
    return (f"{c.get('dataset', '?')}, partition={fmt_config(c.get('partition', '?'))}, "
            f"{run.num_clients} clients, {c.get('clients_per_round', '?')} per round, "
            f"{run.rounds_done}/{planned if planned is not None else '?'} rounds")


def loss_rows(num_rounds: int, every: int | None = None) -> np.ndarray:
    """Row indices of the train-loss table: every k-th round from the first, and
    the last; k = `every`, or chosen so there are about LOSS_ROWS rows."""
    if num_rounds == 0:
        return np.empty(0, dtype=np.int64)
    k = every if every is not None else max(1, math.ceil(num_rounds / LOSS_ROWS))
    rows = list(range(0, num_rounds, k))
    if rows[-1] != num_rounds - 1:
        rows.append(num_rounds - 1)
    return np.asarray(rows, dtype=np.int64)


def clients_text(run: analysis.Run, top: int = CLIENTS_TOP, every: int | None = None) -> str:
    """The text of ``fedmpi-report clients``: partition, participation, client losses."""
    if top < 0:
        raise UserError(f"--top must be 0 or more, got {top}")
    if every is not None and every < 1:
        raise UserError(f"--every must be 1 or more, got {every}")
    out = [f"{run.path}: {_run_heading(run)}", ""]
    n = run.num_clients
    sizes = run.partition.get("num_samples")
    hist = run.partition.get("label_histogram")
    labels = run.labels_per_client()

    # partition
    if sizes is None or hist is None:
        out.append("partition: not in this file")
    else:
        sizes = np.asarray(sizes)
        out.append(f"partition: {int(sizes.sum())} training samples of "
                   f"{_plural(hist.shape[1], 'label')} over {_plural(len(sizes), 'client')}")
        out.append(f"  samples per client   {_min_median_max(sizes)}")
        line = f"  labels per client    {_min_median_max(labels)}"
        kinds, how_many = np.unique(labels, return_counts=True)
        if 1 < len(kinds) <= 10:
            line += "   (" + ", ".join(f"{_plural(int(k), 'label')}: {_plural(int(m), 'client')}"
                                       for k, m in zip(kinds, how_many)) + ")"
        out.append(line)
    out.append("")

    # participation
    counts = run.participation()
    ids = np.asarray(run.client_column("client_id"))
    client_rounds = np.unique(np.asarray(run.client_column("round"))).size
    out.append(f"participation: {ids.size} client-rounds in "
               f"{_plural(client_rounds, 'round')}")
    if n:
        out.append(f"  rounds per client    {_min_median_max(counts)}  "
                   f"mean {counts.mean():.2f}")
        never = np.flatnonzero(counts == 0)
        shown = ", ".join(map(str, never[:20]))
        if never.size > 20:
            shown += f", ... ({never.size - 20} more)"
        out.append(f"  never sampled        {_plural(int(never.size), 'client')}"
                   + (f": {shown}" if never.size else ""))
    if n and top:
        loss = np.asarray(run.client_column("train_loss"), dtype=np.float64)
        order = sorted(range(n), key=lambda i: (-counts[i], i))
        picked = order if n <= 2 * top else order[:top] + [None] + order[-top:]
        header = ["client", "rounds", "samples", "labels", "median_train_loss"]
        body = []
        for i in picked:
            if i is None:
                body.append(["...", f"({n - 2 * top} more clients)", "", "", ""])
                continue
            mine = loss[ids == i]
            mine = mine[~np.isnan(mine)]
            body.append([str(i), str(int(counts[i])),
                         str(int(sizes[i])) if sizes is not None and i < len(sizes) else "-",
                         str(int(labels[i])) if labels is not None and i < len(labels) else "-",
                         f"{np.median(mine):.4f}" if mine.size else "-"])
        widths = [max(len(h), *(len(r[j]) for r in body if r[0] != "..."))
                  for j, h in enumerate(header)]
        out.append("  most and least sampled (median_train_loss: over the client's rounds, nats)")
        out.append("    " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
        for r in body:
            if r[0] == "...":
                out.append("    " + "...".rjust(widths[0]) + "  " + r[1])
            else:
                out.append("    " + "  ".join(s.rjust(w) for s, w in zip(r, widths)))
    out.append("")

    # client train loss per round
    stats = run.client_loss_by_round()
    rows = loss_rows(len(stats["round"]), every)
    if not rows.size:
        out.append("client train_loss per round: no rounds yet")
        return "\n".join(out) + "\n"
    k = rows[1] - rows[0] if rows.size > 1 else 1
    which = "all rounds" if len(rows) == len(stats["round"]) else (
        f"every {_ordinal(int(k))} round and the last")
    out.append(f"client train_loss per round (nats; spread over the round's clients; {which})")
    header = ["round", "clients", "min", "q25", "median", "q75", "max"]
    body = [[str(int(stats["round"][i])), str(int(stats["clients"][i]))]
            + [_fmt_metric(float(stats[q][i])) for q in ("min", "q25", "median", "q75", "max")]
            for i in rows]
    widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(header)]
    out.append("  " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
    out.extend("  " + "  ".join(s.rjust(w) for s, w in zip(r, widths)) for r in body)
    return "\n".join(out) + "\n"


def plot_clients(run, out: str, *, dpi: int = DPI, title: str | None = None) -> list[str]:
    """Save the clients figure of one run to `out` (.png/.svg/.pdf).

    (a) the partition as a label x client heatmap of /partition/label_histogram,
    (b) rounds each client trained, (c) per round, the median of the clients'
    train_loss with its quartile and min-max bands. Returns notes for the reader.
    """
    Figure, _, MaxNLocator = _matplotlib()
    fmt = _figure_format(out, dpi)
    run = _one_run(run)
    notes: list[str] = []
    n = run.num_clients
    hist = run.partition.get("label_histogram")
    counts = run.participation()
    stats = run.client_loss_by_round()

    fig = Figure(figsize=CLIENTS_FIGSIZE, dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(3, 2, width_ratios=(40, 1), height_ratios=(1.0, 0.8, 1.2))
    ax_part = fig.add_subplot(grid[0, 0])
    ax_part_bar = fig.add_subplot(grid[0, 1])
    ax_count = fig.add_subplot(grid[1, 0], sharex=ax_part)
    ax_loss = fig.add_subplot(grid[2, 0])
    edges = np.arange(n + 1) - 0.5

    # (a) partition
    ax_part.set_title("(a) partition: training samples of each label per client",
                      fontsize="medium", loc="left")
    if hist is not None and np.asarray(hist).size:
        hist = np.asarray(hist)
        image = ax_part.imshow(hist.T, aspect="auto", interpolation="nearest",
                               cmap="Blues", vmin=0, origin="lower",
                               extent=(-0.5, hist.shape[0] - 0.5, -0.5, hist.shape[1] - 0.5))
        bar = fig.colorbar(image, cax=ax_part_bar)
        bar.set_label("samples")
        ax_part.set_ylabel("label (class index)")
        ax_part.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=min(hist.shape[1], 10)))
    else:
        ax_part_bar.set_axis_off()
        ax_part.text(0.5, 0.5, "no /partition in this file", ha="center", va="center",
                     transform=ax_part.transAxes)
        notes.append(f"{run.path} has no /partition")
    ax_part.tick_params(labelbottom=False)

    # (b) participation
    ax_count.set_title(f"(b) participation: rounds each client trained "
                       f"(of {run.rounds_done})", fontsize="medium", loc="left")
    if n:
        ax_count.stairs(counts, edges, fill=True, color="C0", alpha=0.8, linewidth=0)
        ax_count.axhline(counts.mean(), color="C3", linestyle="--", linewidth=1,
                         label=f"mean {counts.mean():.2f}")
        never = np.flatnonzero(counts == 0)
        if never.size:
            ax_count.plot(never, np.zeros(never.size), linestyle="none", marker="x",
                          markersize=5, color="C3", clip_on=False,
                          label=f"never sampled ({_plural(int(never.size), 'client')})")
        ax_count.legend(fontsize="small", loc="upper right", framealpha=0.9)
        ax_count.set_xlim(-0.5, n - 0.5)
        ax_count.set_ylim(0, max(1, counts.max()) * 1.25)
    ax_count.set_xlabel("client id")
    ax_count.set_ylabel("rounds")
    ax_count.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax_count.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_count.grid(True, axis="y", alpha=0.3)
    fig.add_subplot(grid[1, 1]).set_axis_off()

    # (c) client train loss per round
    ax_loss.set_title("(c) train loss of the round's clients", fontsize="medium", loc="left")
    if stats["round"].size:
        x = stats["round"]
        marker = "o" if len(x) <= 30 else None
        ax_loss.fill_between(x, stats["min"], stats["max"], color="C0", alpha=0.15,
                             linewidth=0, label="min-max")
        ax_loss.fill_between(x, stats["q25"], stats["q75"], color="C0", alpha=0.35,
                             linewidth=0, label="quartiles (q25-q75)")
        ax_loss.plot(x, stats["median"], color="C0", marker=marker, markersize=3,
                     label="median")
        ax_loss.legend(fontsize="small", loc="upper right", framealpha=0.9)
        ax_loss.set_ylim(bottom=0)
    else:
        ax_loss.text(0.5, 0.5, "no rounds yet", ha="center", va="center",
                     transform=ax_loss.transAxes)
        notes.append(f"{run.path} has no rounds yet")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("client train loss (nats)")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.grid(True, alpha=0.3)
    fig.add_subplot(grid[2, 1]).set_axis_off()

    if title is None:
        title = f"clients of {os.path.basename(run.path)}\n{_run_heading(run)}"
    fig.suptitle(title, fontsize="medium")
    _save(fig, out, fmt, dpi)
    return notes


def _one_run(runs) -> analysis.Run:
    runs = analysis.load_runs(runs)
    if len(runs) != 1:
        raise UserError(f"clients shows one run, but got {len(runs)}: "
                        f"{', '.join(r.path for r in runs[:3])}"
                        + (", ..." if len(runs) > 3 else ""))
    return runs[0]


def cmd_clients(args) -> int:
    if args.out is not None:
        _matplotlib()  # fail before reading any file
        _figure_format(args.out, args.dpi)
    run = _one_run(args.run)
    text = clients_text(run, top=args.top, every=args.every)
    if args.out is not None:
        notes = plot_clients(run, args.out, dpi=args.dpi, title=args.title)
        for note in notes:
            print(f"{PROG}: note: {note}", file=sys.stderr)
    sys.stdout.write(text)
    if args.out is not None:
        print(f"\nwrote {args.out}")
    return 0


# -- watch --------------------------------------------------------------------

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
            f"test_acc {_fmt_metric(_value(run, 'test_accuracy', i)):>6}  "
            f"test_loss {_fmt_metric(_value(run, 'test_loss', i)):>6}  "
            f"train_loss {_fmt_metric(_value(run, 'train_loss', i)):>6}  "
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
        print(text, file=stream, flush=True)

    if interval <= 0:
        raise UserError(f"--interval must be positive, got {interval:g}")
    run = analysis.load(path)
    run.metric("round"), run.metric("seconds")  # UserError if missing
    c = run.config
    say(f"{path}: {c.get('dataset', '?')}, {c.get('algorithm', '?')}, "
        f"{c.get('clients', '?')} clients ({c.get('clients_per_round', '?')} per round), "
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
                f"{_fmt_metric(final)}")
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


# -- command line -------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that raises UserError (one line, no usage dump) instead of exiting."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description=(
        "Tables, plots and live progress of fedmpi runs. RUN is a results file, a glob "
        "(quoted: 'results/*.h5', 'results/**/*.h5') or a directory (its *.h5)."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("summary", help="one row per run: differing settings, accuracy, "
                                       "time, traffic",
                       description="One row per run: the config keys that differ between "
                                   "the runs, then rounds_done, final_accuracy (last "
                                   "evaluated), best_accuracy, bytes_up, bytes_down, "
                                   "wall_seconds (sum of round times); with --target also "
                                   "rounds_to_target and seconds_to_target.")
    s.add_argument("runs", nargs="+", metavar="RUN")
    s.add_argument("--target", type=float, metavar="ACC",
                   help="test accuracy in [0, 1]: add the first round reaching it and the "
                        "cumulative seconds up to it")
    fmt = s.add_mutually_exclusive_group()
    fmt.add_argument("--csv", action="store_true", help="CSV with raw numbers")
    fmt.add_argument("--markdown", action="store_true", help="a Markdown table")
    s.set_defaults(func=cmd_summary)

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
                   help="round, or cumulative seconds / bytes_up / bytes_down "
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

    s = sub.add_parser("clients", help="one run's clients: partition, participation, "
                                       "train-loss spread per round",
                       description="The clients of one run: samples and labels per client "
                                   "(/partition), how many rounds each client trained, the "
                                   "most and least sampled clients, and per round the "
                                   "min / quartiles / max of the clients' train_loss. With "
                                   "--out also a figure of the same (needs matplotlib).")
    s.add_argument("run", metavar="RUN", help="one results file")
    s.add_argument("--out", metavar="FILE",
                   help="also draw a figure: .png, .svg or .pdf (partition heatmap, "
                        "participation bars, client train loss per round)")
    s.add_argument("--top", type=int, default=CLIENTS_TOP, metavar="N",
                   help=f"list the N most and N least sampled clients (default: "
                        f"{CLIENTS_TOP}; 0: none)")
    s.add_argument("--every", type=int, metavar="K",
                   help=f"train-loss table: every K-th round and the last (default: about "
                        f"{LOSS_ROWS} rows; 1: all rounds)")
    s.add_argument("--dpi", type=int, default=DPI,
                   help=f"resolution (default: {DPI}; PNG size {CLIENTS_FIGSIZE[0]:g}x"
                        f"{CLIENTS_FIGSIZE[1]:g} inches times this)")
    s.add_argument("--title", help="figure title (default: file name and settings)")
    s.set_defaults(func=cmd_clients)

    s = sub.add_parser("watch", help="follow a running job's file, one line per round",
                       description="Print each round of RUN as it is written (test "
                                   "accuracy and loss, train loss, seconds per round, ETA "
                                   "for the configured rounds) until the last round. "
                                   "Ctrl-C stops watching (exit status 0).")
    s.add_argument("run", metavar="RUN", help="the results file (--out) of the job")
    s.add_argument("--interval", type=float, default=5.0, metavar="S",
                   help="seconds between looks at the file (default: 5)")
    s.set_defaults(func=cmd_watch)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmpi-report``: returns the exit status (0, or 2 on bad input)."""
    return run_tool(PROG, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
