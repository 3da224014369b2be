"""What the command-line tools (fedmpi-report, fedmpi-sweep) share: errors as one line."""

from __future__ import annotations

import os
import sys

from fedmpi.errors import UserError, printable


def run_tool(prog: str, build_parser, argv: list[str] | None) -> int:
    """Parse argv, run the chosen subcommand, turn UserError into one line and exit 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except UserError as e:
        # One line, and no control characters from names found in files.
        message = printable(" ".join(str(e).splitlines()))
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Reader went away (| head): stop quietly, and keep Python's exit-time
        # flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
