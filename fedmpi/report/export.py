"""``fedmpi-report export``: the subcommand; the export itself is fedmpi/export.py."""

from __future__ import annotations

ORDER = 50  # place in --help


def register(sub) -> None:
    from fedmpi.export import add_parser

    add_parser(sub)
