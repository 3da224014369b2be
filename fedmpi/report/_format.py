"""Text output shared by the fedmpi-report subcommands: values, tables, clean lines."""

from __future__ import annotations

import csv
import io
import json
import math
import sys

import numpy as np

from fedmpi.errors import printable

PROG = "fedmpi-report"


def emit(text: str, stream=None) -> None:
    """Write text (lines ending in newlines) to stdout without control characters.

    Paths, config keys and values come from files and file names that other
    people made: an escape sequence in them must not reach a terminal.
    """
    (sys.stdout if stream is None else stream).write(printable(text, keep="\n"))


def note(text: str) -> None:
    """A ``fedmpi-report: note: ...`` line on stderr."""
    emit(f"{PROG}: note: {printable(text)}\n", sys.stderr)


def is_number(value) -> bool:
    return (isinstance(value, (int, float, np.integer, np.floating))
            and not isinstance(value, (bool, np.bool_)))


def fmt_config(value) -> str:
    """A config value as in the TOML fedmpi prints (hidden as 128,64)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return printable(",".join(map(str, value))) or "none"
    if isinstance(value, dict):
        return printable(json.dumps(value, sort_keys=True))
    return printable(value)


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


def fmt_metric(value) -> str:
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
    if column == "epsilon":
        return f"{value:.3g}" if human else repr(value)
    if isinstance(value, float) and not human:
        return repr(value)
    return fmt_config(value)


def format_table(rows: list[dict], columns: list[str], style: str = "text",
                 planned: list | None = None) -> str:
    """rows as an aligned text table, a Markdown table, or CSV (cells and
    column names without control characters)."""
    if style == "csv":
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow([printable(c) for c in columns])
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
        and all(row.get(c) is None or is_number(row.get(c)) for row in rows))
        for c in columns]
    if style == "markdown":
        def esc(s):
            return s.replace("|", "\\|")
        header = [esc(printable(c)) for c in columns]
        body = [[esc(s) for s in line] for line in cells]
    else:
        header, body = [printable(c) for c in columns], cells
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
