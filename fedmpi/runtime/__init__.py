"""The only package that imports mpi4py: process roles, collectives, the round loop."""

from __future__ import annotations

import sys
import traceback

from fedmpi.errors import UserError
from fedmpi.runtime import signals
from fedmpi.runtime.signals import Interrupted


def main(argv: list[str] | None = None, comm=None) -> int:
    """Entry point of ``python -m fedmpi``: returns the process exit status.

    0 on success; 2 for bad input (one line on stderr from rank 0, every rank
    exits by itself); 128+N when stopped by signal N. Any other failure on any
    rank aborts the whole MPI job, so no rank is left waiting in a collective.
    """
    from mpi4py import MPI

    from fedmpi.config import build_parser, parse_args
    from fedmpi.runtime.loop import run

    comm = MPI.COMM_WORLD if comm is None else comm
    argv = sys.argv[1:] if argv is None else list(argv)
    root = comm.rank == 0
    if "-h" in argv or "--help" in argv:
        if root:
            build_parser().print_help()
        return 0
    signals.install(defer=not root)  # a worker's stop goes through rank 0 (signals.py)
    try:
        cfg = parse_args(argv)
        run(cfg, comm, argv)
        return 0
    except UserError as e:
        if root:
            print(f"fedmpi: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Interrupted as e:
        # only rank 0 raises it (workers defer their signals to it)
        print(f"fedmpi: interrupted by {e}; finished rounds and the last checkpoint are in "
              "the results file (continue with --resume)", file=sys.stderr, flush=True)
        status = 128 + e.signum
    except BaseException as e:  # noqa: BLE001 -- any failure must end the whole job
        print(f"fedmpi: rank {comm.rank}/{comm.size} failed: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)
        traceback.print_exc(file=sys.stderr)
        status = 1
    if comm.size > 1:
        comm.Abort(status)  # the other ranks may be inside a collective
    return status
