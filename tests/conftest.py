"""Shared helpers for the tests that run ``python -m fedmpi`` as a subprocess.

Every launch gets a unique token in its environment (mpiexec passes the
environment on to its proxies and ranks), so a test can find the processes of
its own job in /proc -- to pick a rank to kill, or to check that nothing of a
finished job is still running -- without guessing by process name.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKEN_VAR = "FEDMPI_TEST_TOKEN"
RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")

# Small and fast: well under a second per round on one core.
SMALL_SYNTHETIC = ["--clients", "12", "--clients-per-round", "5", "--rounds", "3", "--hidden", "16"]


def find_mpiexec() -> str | None:
    """mpiexec next to the running Python (a venv with the mpich wheel), else on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    return shutil.which("mpiexec")


MPIEXEC = find_mpiexec()

requires_mpiexec = pytest.mark.skipif(
    MPIEXEC is None, reason="no mpiexec next to sys.executable or on PATH: MPI tests need one "
                            "(pip install mpich, or load an MPI module)")


def fedmpi_command(args, ranks: int = 1) -> list[str]:
    cmd = [sys.executable, "-m", "fedmpi", *map(str, args)]
    if ranks == 1:
        return cmd
    if MPIEXEC is None:
        pytest.skip("no mpiexec next to sys.executable or on PATH: cannot run "
                    f"fedmpi on {ranks} ranks")
    return [MPIEXEC, "-n", str(ranks), *cmd]


def _environment(env: dict | None, token: str) -> dict:
    full = dict(os.environ)
    if env:
        full.update(env)
    full[TOKEN_VAR] = token
    # Import fedmpi from this source tree even if it is not installed.
    full["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, full.get("PYTHONPATH")) if p)
    return full


def kill_group(pid: int, token: str | None = None) -> None:
    """SIGKILL the process group `pid` and, by pid, every process carrying `token`
    (MPICH's proxy puts each rank into a process group of its own)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    if token is not None:
        for other in processes_with_token(token):
            try:
                os.kill(other, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


def processes_with_token(token: str) -> dict[int, dict]:
    """{pid: {"cmdline": [...], "env": {...}}} of live (non-zombie) processes carrying `token`."""
    needle = f"{TOKEN_VAR}={token}".encode()
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            with open(f"/proc/{pid}/environ", "rb") as fh:
                raw = fh.read()
            if needle not in raw.split(b"\0"):
                continue
            with open(f"/proc/{pid}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
            if state in (b"Z", b"X"):
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
        except OSError:  # gone meanwhile, or not ours
            continue
        env = dict(kv.decode(errors="replace").split("=", 1)
                   for kv in raw.split(b"\0") if b"=" in kv)
        found[pid] = {"cmdline": cmdline, "env": env}
    return found


def leftover_processes(token: str, grace: float = 10.0) -> dict[int, list[str]]:
    """Processes of a job still alive `grace` seconds after it should have ended."""
    deadline = time.monotonic() + grace
    while True:
        left = {pid: p["cmdline"] for pid, p in processes_with_token(token).items()}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


class Job:
    """A fedmpi job started in the background (its own session / process group)."""

    def __init__(self, args, ranks: int, cwd, env: dict | None):
        self.token = uuid.uuid4().hex
        self.cmd = fedmpi_command(args, ranks)
        self.ranks = ranks
        self.cwd = str(cwd)
        logdir = os.path.join(self.cwd, f".job-{self.token[:8]}")
        os.makedirs(logdir)
        # Files, not pipes: a long run must never block on a full pipe.
        self._stdout_path = os.path.join(logdir, "stdout")
        self._stderr_path = os.path.join(logdir, "stderr")
        with open(self._stdout_path, "w") as out, open(self._stderr_path, "w") as err:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=err, cwd=self.cwd,
                                         env=_environment(env, self.token),
                                         start_new_session=True)
        self.pid = self.proc.pid  # also the process group id

    @property
    def stdout(self) -> str:
        with open(self._stdout_path) as fh:
            return fh.read()

    @property
    def stderr(self) -> str:
        with open(self._stderr_path) as fh:
            return fh.read()

    def rank_pids(self) -> dict[int, int]:
        """{MPI rank: pid} of the Python processes of this job."""
        ranks = {}
        for pid, p in processes_with_token(self.token).items():
            for var in RANK_VARS:
                if var in p["env"]:
                    ranks[int(p["env"][var])] = pid
                    break
        if self.ranks == 1 and not ranks:
            ranks = {0: self.pid}
        return ranks

    def wait(self, timeout: float) -> int:
        """Exit status; fails the test (after killing the job) if it takes longer."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{self.cmd} did not end within {timeout} s (hang)\n"
                        f"--- stdout\n{self.stdout[-3000:]}\n--- stderr\n{self.stderr[-3000:]}")

    def kill(self) -> None:
        kill_group(self.pid, self.token)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    def describe(self) -> str:
        return (f"{self.cmd}\nexit {self.proc.returncode}\n--- stdout\n{self.stdout[-3000:]}\n"
                f"--- stderr\n{self.stderr[-3000:]}")


def launch_fedmpi(args, ranks: int = 1, timeout: float = 120, env: dict | None = None,
                  cwd=None) -> subprocess.CompletedProcess:
    """Run fedmpi to completion, capturing text output; a timeout fails the test.

    The job runs in its own session; on timeout its whole process group
    (mpiexec, proxies, ranks) is killed, so no hung rank outlives the test.
    The result has an extra attribute ``token`` for `leftover_processes`.
    """
    token = uuid.uuid4().hex
    cmd = fedmpi_command(args, ranks)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=None if cwd is None else str(cwd),
                            env=_environment(env, token), start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(proc.pid, token)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            out, err = "", ""
        pytest.fail(f"{cmd} did not finish within {timeout} s (a hang is a bug)\n"
                    f"--- stdout\n{out[-3000:]}\n--- stderr\n{err[-3000:]}")
    finally:
        if proc.poll() is None:
            kill_group(proc.pid, token)
    result = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    result.token = token
    return result


_NOTICE_RULE = re.compile(r"^\s*(-{20,}|={20,})\s*$")


def fedmpi_lines(stderr: str) -> list[str]:
    """The lines of stderr that fedmpi printed, without the MPI launcher's notices.

    Launchers add their own report when a rank exits non-zero: Open MPI's
    mpiexec prints blocks framed by lines of dashes ("Primary job terminated
    normally, but 1 process returned a non-zero exit code ..."), MPICH's
    hydra blocks framed by lines of '=' ("BAD TERMINATION ..."). Those blocks
    are dropped whole; everything else is fedmpi's (or a traceback, which
    the tests then see).
    """
    lines, inside = [], False
    for line in stderr.splitlines():
        if _NOTICE_RULE.match(line):
            inside = not inside
            continue
        if not inside and line.strip():
            lines.append(line)
    return lines


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"{result.args}\nexit {result.returncode}\n--- stdout\n{result.stdout[-3000:]}\n"
            f"--- stderr\n{result.stderr[-3000:]}")


def make_npz(path, *, n_train=200, n_test=60, features=20, classes=3, seed=0) -> dict:
    """A small learnable uint8 data set in fedmpi's npz format; returns its arrays."""
    rng = np.random.default_rng(seed)
    centres = rng.uniform(40, 215, size=(classes, features))

    def draw(n):
        y = rng.integers(0, classes, n)
        x = np.clip(centres[y] + rng.normal(0, 40, size=(n, features)), 0, 255)
        return np.rint(x).astype(np.uint8), y.astype(np.int64)

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    arrays = dict(x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    np.savez(path, **arrays)
    return arrays


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def run_fedmpi(tmp_path):
    """run_fedmpi(args, ranks=1, timeout=120, env=None, cwd=tmp_path) -> CompletedProcess."""
    def run(args, ranks=1, timeout=120, env=None, cwd=None):
        return launch_fedmpi(args, ranks=ranks, timeout=timeout, env=env,
                             cwd=tmp_path if cwd is None else cwd)
    return run


@pytest.fixture
def start_fedmpi(tmp_path):
    """start_fedmpi(args, ranks=1, env=None, cwd=tmp_path) -> Job (killed at teardown)."""
    jobs = []

    def start(args, ranks=1, env=None, cwd=None):
        job = Job(args, ranks, tmp_path if cwd is None else cwd, env)
        jobs.append(job)
        return job

    yield start
    for job in jobs:
        if job.proc.poll() is None:
            job.kill()


@pytest.fixture(scope="session")
def small_npz(tmp_path_factory) -> str:
    """200 train / 60 test samples, 20 uint8 features, 3 classes."""
    path = tmp_path_factory.mktemp("npz") / "small.npz"
    make_npz(path)
    return str(path)


@pytest.fixture(scope="session")
def numba_warm(tmp_path_factory, small_npz):
    """Fill numba's on-disk cache once (float32 and uint8 inputs, both
    algorithms) so the timed tests don't pay for compilation -- several ranks
    compiling at once on two cores would take minutes."""
    d = tmp_path_factory.mktemp("warm")
    for i, args in enumerate((
            SMALL_SYNTHETIC + ["--rounds", "1"],
            SMALL_SYNTHETIC + ["--rounds", "1", "--algorithm", "fedsgd", "--momentum", "0"],
            ["--dataset", f"npz:{small_npz}", "--clients", "4", "--clients-per-round", "2",
             "--rounds", "1", "--hidden", "8", "--momentum", "0.5"],
            ["--dataset", f"npz:{small_npz}", "--clients", "4", "--clients-per-round", "2",
             "--rounds", "1", "--hidden", "8", "--algorithm", "fedsgd"])):
        res = launch_fedmpi(args + ["--out", str(d / f"warm{i}.h5")], timeout=600, cwd=d)
        assert res.returncode == 0, describe(res)
