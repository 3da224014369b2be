"""Figures shared by the fedmpi-report subcommands: matplotlib on demand, file types, saving."""

from __future__ import annotations

import os

from fedmpi.errors import UserError

DPI = 150
FIGURE_FORMATS = ("png", "svg", "pdf")


def matplotlib_parts():
    """(Figure, EngFormatter, MaxNLocator), or UserError naming the pip install."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import EngFormatter, MaxNLocator
    except ImportError:
        raise UserError("plotting needs matplotlib, which is not installed: "
                        "pip install fedmpi[plot] (or pip install matplotlib)") from None
    return Figure, EngFormatter, MaxNLocator


def figure_format(out: str, dpi: int) -> str:
    """png, svg or pdf from the name of `out`; UserError otherwise or for a bad dpi."""
    fmt = os.path.splitext(out)[1].lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise UserError(f"cannot tell the figure type of {out}: give a file "
                        f"name ending in .png, .svg or .pdf")
    if dpi < 1:
        raise UserError(f"dpi must be positive, got {dpi}")
    return fmt


def save(fig, out: str, fmt: str, dpi: int) -> None:
    """fig to out, creating its directory; UserError if that fails."""
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        fig.savefig(out, dpi=dpi, format=fmt)
    except OSError as e:
        raise UserError(f"cannot write figure {out}: {e.strerror or e}") from None
