"""What the benchmark scripts share."""

import os
import platform
import shutil
import sys


def find_mpiexec(prog: str) -> str:
    """mpiexec next to this Python (the venv's mpich wheel), else on PATH; exit if none."""
    here = os.path.dirname(sys.executable)
    path = shutil.which("mpiexec", path=here + os.pathsep + os.environ.get("PATH", ""))
    if path is None:
        sys.exit(f"{prog}: mpiexec not found (install the mpich wheel into this venv)")
    return path


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else what platform says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
