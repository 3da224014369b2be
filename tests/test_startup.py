"""What each rank loads at start-up: numba only where kernels run, h5py only where results
are written, SciPy's BLAS never (fedmpi's kernels do not call it)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import SMALL_SYNTHETIC, REPO, describe, requires_mpiexec


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def test_aggregate_loads_numba_on_first_call():
    res = _python(
        "import sys, numpy as np\n"
        "from fedmpi import aggregate\n"
        "assert 'numba' not in sys.modules\n"
        "print(aggregate.max_abs(np.array([1.0, -3.5, 2.0], np.float32)))\n"
        "assert 'numba' in sys.modules\n")
    assert res.returncode == 0, res.stderr
    assert float(res.stdout) == 3.5


def test_load_numba_skips_scipys_blas_but_leaves_it_usable():
    pytest.importorskip("scipy")
    res = _python(
        "import sys, numpy as np\n"
        "from fedmpi.jit import load_numba\n"
        "load_numba()\n"
        "import numba\n"
        "f = numba.njit(lambda x: x.sum())\n"
        "assert f(np.arange(4.0)) == 6.0\n"
        "assert 'scipy.linalg' not in sys.modules, 'the BLAS probe ran'\n"
        "g = numba.njit(lambda a, b: np.dot(a, b))\n"  # numba still finds the BLAS
        "a = np.array([[1.0, 2.0], [3.0, 4.0]])\n"
        "assert (g(a, a) == a @ a).all()\n"
        "import scipy.linalg\n"
        "assert scipy.linalg.norm([3.0, 4.0]) == 5.0\n")
    assert res.returncode == 0, res.stderr


def _imported(stderr: str, module: str) -> int:
    """How many processes imported `module` (lines of python -X importtime)."""
    return sum(1 for line in stderr.splitlines()
               if line.startswith("import time:") and line.rsplit("|", 1)[-1].strip() == module)


@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=requires_mpiexec)])
def test_who_imports_numba_and_h5py(run_fedmpi, tmp_path, numba_warm, ranks):
    res = run_fedmpi(SMALL_SYNTHETIC + ["--rounds", "1", "--out", tmp_path / "run.h5"],
                     ranks=ranks, env={"PYTHONPROFILEIMPORTTIME": "1"})
    assert res.returncode == 0, describe(res)
    assert _imported(res.stderr, "mpi4py.MPI") == ranks  # every process is counted
    trainers = ranks - 1 if ranks > 1 else 1
    assert _imported(res.stderr, "numba") == trainers, "rank 0 of several imported numba"
    assert _imported(res.stderr, "h5py") == 1, "a rank that writes no results imported h5py"
    for module in ("scipy.linalg", "pandas", "matplotlib"):
        assert _imported(res.stderr, module) == 0, module
    assert "results written to" in res.stdout
