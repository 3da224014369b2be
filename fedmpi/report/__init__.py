"""``fedmpi-report`` (or ``python -m fedmpi.report``): tables, plots and live progress of runs.

::

    fedmpi-report summary results/*.h5 [--target 0.8] [--csv | --markdown]
    fedmpi-report plot results/*.h5 --y test_accuracy --x round|seconds|bytes_up \\
        [--group-by KEY] --out acc.png|svg|pdf
    fedmpi-report clients results/run.h5 [--out clients.png|svg|pdf]
    fedmpi-report watch results/run.h5 [--interval 5]
    fedmpi-report export results/run.h5 --format npz|onnx [--out FILE]

RUN arguments are results files, globs (quote them to pass them through the
shell; ``results/**/*.h5`` recurses) or directories (their ``*.h5``). Files of
finished, killed and still-running jobs can all be read; files are untrusted
input (see fedmpi.reading), and text from them is printed without control
characters.

Bad input gets one line ``fedmpi-report: error: <what is wrong>`` on stderr
and exit status 2, with no traceback.

One module per subcommand: a module of this package whose name doesn't start
with ``_`` and that defines ``register(subparsers)`` is a subcommand (listed
in ``--help`` by its ``ORDER``, then name). Adding a subcommand is adding a module.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil

from fedmpi.cli import ArgumentParser, run_tool
from fedmpi.report._format import PROG


def subcommands() -> list:
    """The subcommand modules of this package, in --help order."""
    modules = [importlib.import_module(f"{__name__}.{info.name}")
               for info in pkgutil.iter_modules(__path__)
               if not info.name.startswith("_")]
    modules = [m for m in modules if hasattr(m, "register")]
    return sorted(modules, key=lambda m: (getattr(m, "ORDER", 100), m.__name__))


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog=PROG, description=(
        "Tables, plots and live progress of fedmpi runs. RUN is a results file, a glob "
        "(quoted: 'results/*.h5', 'results/**/*.h5') or a directory (its *.h5)."))
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in subcommands():
        module.register(sub)  # adds its parser with set_defaults(func=...)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmpi-report``: returns the exit status (0, or 2 on bad input)."""
    return run_tool(PROG, build_parser, argv)
