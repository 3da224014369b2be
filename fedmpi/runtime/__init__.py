"""The only package that imports mpi4py: process roles, collectives, the round loop."""

from __future__ import annotations

import ctypes
import sys
import traceback

from fedmpi.errors import UserError
from fedmpi.runtime import signals, timings
from fedmpi.runtime.signals import Interrupted


def main(argv: list[str] | None = None, comm=None) -> int:
    """Entry point of ``python -m fedmpi``: returns the process exit status.

    0 on success; 2 for bad input (one line on stderr from rank 0, every rank
    exits by itself); 128+N when stopped by signal N. Any other failure on any
    rank aborts the whole MPI job, so no rank is left waiting in a collective.
    """
    timings.mark("interpreter")
    from mpi4py import MPI  # MPI_Init

    timings.mark("MPI init")
    from fedmpi.config import build_parser, given_values
    from fedmpi.runtime.comm import Hung
    from fedmpi.runtime.loop import run

    timings.mark("imports")

    comm = MPI.COMM_WORLD if comm is None else comm
    argv = sys.argv[1:] if argv is None else list(argv)
    root = comm.rank == 0
    if "-h" in argv or "--help" in argv:
        if root:
            build_parser().print_help()
            sys.stdout.flush()
        return 0
    signals.install(defer=not root)  # a worker's stop goes through rank 0 (signals.py)
    try:
        run(given_values(argv), comm, argv)
        timings.report(comm)
        return 0
    except UserError as e:
        if root:
            print(f"fedmpi: error: {e}", file=sys.stderr, flush=True)
        return 2
    except Hung as e:  # on the rank that noticed: rank 0, or a worker if rank 0 is missing
        print(f"fedmpi: {e}; finished rounds and the last checkpoint are in the results file "
              "(continue with --resume)", file=sys.stderr, flush=True)
        status = 1
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


def exit_process(status: int) -> None:
    """End this rank now: flush output, finalize MPI, skip the interpreter's teardown.

    Python's teardown after numba has loaded its kernels (LLVM, thousands of
    objects to collect) took 0.3-0.7 s per rank, measured at 3 ranks on 2
    cores, far longer than MPI_Finalize itself (~0.04 s). Every file fedmpi
    writes is closed by the time main() returns, so nothing is lost by
    skipping it. Only on success: mpiexec (hydra) kills the ranks still
    running when one exits with a non-zero status, so a rank that got there
    first would turn the others' clean status 2 into "killed by signal 9";
    the interpreter's usual exit keeps them together, as before.
    """
    if status != 0:
        sys.exit(status)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more to say
            pass
    from mpi4py import MPI

    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.Finalize()
    # The C library's exit, not os._exit: it still runs the C-level exit handlers
    # (MPICH's among them). After MPI_Finalize, os._exit made mpiexec report
    # "killed by signal 9" in about half of 4-rank runs here; libc exit never did
    # (12 of 12), and it skips Python's teardown all the same.
    ctypes.CDLL(None).exit(status)
