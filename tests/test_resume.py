"""Checkpoint/resume: a run killed at random moments (SIGKILL of every rank) and
resumed, also with other rank counts, ends bitwise identical to an uninterrupted run."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

ARGS = ["--rounds", "150", "--clients", "40", "--clients-per-round", "10", "--hidden", "64",
        "--batch-size", "5"]
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def _cmd(ranks, *args):
    base = [sys.executable, "-m", "fedmpi", *ARGS, *args]
    return base if ranks == 1 else [MPIEXEC, "-n", str(ranks), *base]


def _rows(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["rounds/round"]) if "round" in f["rounds"] else 0
    except (OSError, KeyError):
        return 0


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path):
    ref, out = tmp_path / "ref.h5", tmp_path / "run.h5"
    subprocess.run(_cmd(1, "--out", str(ref)), check=True, capture_output=True, timeout=300)
    rng = random.Random(1)
    kills = 0
    for ranks in (3, 1, 5, 2):
        p = subprocess.Popen(_cmd(ranks, "--out", str(out), "--resume", "auto"),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        start = _rows(out)
        deadline = time.time() + 120
        # kill after a few more rounds, at a random moment within a round
        while _rows(out) < start + rng.randint(3, 12) and p.poll() is None:
            assert time.time() < deadline, "run made no progress"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 0.05))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(timeout=30)
    assert kills >= 3
    done = subprocess.run(_cmd(3, "--out", str(out), "--resume", "auto"),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        assert np.array_equal(a["model/params"][:].view(np.uint32), b["model/params"][:].view(np.uint32))
        for k in a["rounds"]:
            if k != "seconds":
                assert np.array_equal(a["rounds"][k][:], b["rounds"][k][:], equal_nan=True), k
        for k in ("round", "client_id", "num_samples", "train_loss"):
            assert np.array_equal(a["clients"][k][:], b["clients"][k][:]), k


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run.h5"
    small = ["--rounds", "2", "--clients", "8", "--clients-per-round", "2", "--hidden", "8"]
    subprocess.run([sys.executable, "-m", "fedmpi", *small, "--out", str(out)], check=True,
                   capture_output=True, timeout=120)
    r = subprocess.run([sys.executable, "-m", "fedmpi", *small, "--lr", "0.2", "--seed", "4",
                        "--resume", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "lr" in r.stderr and "seed" in r.stderr
    # more rounds is allowed: it extends the run
    r = subprocess.run([sys.executable, "-m", "fedmpi", *small[2:], "--rounds", "3",
                        "--resume", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        assert list(f["rounds/round"][:]) == [1, 2, 3]


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "run.h5"
    p = subprocess.Popen([sys.executable, "-m", "fedmpi", *ARGS, "--rounds", "100000",
                          "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while _rows(out) < 3:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    with h5py.File(out, "r") as f:
        n = len(f["rounds/round"])
        assert f["checkpoint"].attrs["round"] == n >= 3
