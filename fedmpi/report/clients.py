"""fedmpi-report clients: one run's partition, participation and client train-loss spread."""

from __future__ import annotations

import math
import os

import numpy as np

from fedmpi import analysis
from fedmpi.errors import UserError
from fedmpi.report._figure import DPI, figure_format, matplotlib_parts, save
from fedmpi.report._format import emit, fmt_config, fmt_metric, note

ORDER = 30  # place in --help
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
    return (f"{fmt_config(c.get('dataset', '?'))}, "
            f"partition={fmt_config(c.get('partition', '?'))}, {run.num_clients} clients, "
            f"{fmt_config(c.get('clients_per_round', '?'))} per round, "
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
            + [fmt_metric(float(stats[q][i])) for q in ("min", "q25", "median", "q75", "max")]
            for i in rows]
    widths = [max(len(h), *(len(r[j]) for r in body)) for j, h in enumerate(header)]
    out.append("  " + "  ".join(h.rjust(w) for h, w in zip(header, widths)))
    out.extend("  " + "  ".join(s.rjust(w) for s, w in zip(r, widths)) for r in body)
    return "\n".join(out) + "\n"


def plot_clients(run, out: str, *, dpi: int = DPI, title: str | None = None) -> list[str]:
    """draw_clients, then save the figure to `out` (.png/.svg/.pdf); returns its notes."""
    fmt = figure_format(out, dpi)
    fig, notes = draw_clients(run, dpi=dpi, title=title)
    save(fig, out, fmt, dpi)
    return notes


def draw_clients(run, *, dpi: int = DPI, title: str | None = None):
    """The clients figure of one run: (matplotlib Figure, notes for the reader).

    (a) the partition as a label x client heatmap of /partition/label_histogram,
    (b) rounds each client trained, (c) per round, the median of the clients'
    train_loss with its quartile and min-max bands. Axes: fig.axes[0] (a),
    [2] (b), [3] (c); [1] is (a)'s colour bar.
    """
    Figure, _, MaxNLocator = matplotlib_parts()
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
    return fig, notes


def _one_run(runs) -> analysis.Run:
    runs = analysis.load_runs(runs)
    if len(runs) != 1:
        raise UserError(f"clients shows one run, but got {len(runs)}: "
                        f"{', '.join(r.path for r in runs[:3])}"
                        + (", ..." if len(runs) > 3 else ""))
    return runs[0]


def cmd_clients(args) -> int:
    if args.out is not None:
        matplotlib_parts()  # fail before reading any file
        figure_format(args.out, args.dpi)
    run = _one_run(args.run)
    text = clients_text(run, top=args.top, every=args.every)
    if args.out is not None:
        notes = plot_clients(run, args.out, dpi=args.dpi, title=args.title)
        for text_ in notes:
            note(text_)
    emit(text)
    if args.out is not None:
        emit(f"\nwrote {args.out}\n")
    return 0


def register(sub) -> None:
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
