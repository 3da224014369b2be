"""What the benchmark scripts share."""

import os
import shutil
import sys


def find_mpiexec(prog: str) -> str:
    """mpiexec next to this Python (the venv's mpich wheel), else on PATH; exit if none."""
    here = os.path.dirname(sys.executable)
    path = shutil.which("mpiexec", path=here + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        sys.exit(f"{prog}: mpiexec not found (install the mpich wheel into this venv)")
    return path
