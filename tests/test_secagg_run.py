"""``python -m fedmpi --secure-aggregation ...`` end to end (subprocesses, MPI).

The reference is the same run without secure aggregation: masking in
Z_{2^64} (or BFV encryption) of the same fixed-point integers must give a
bitwise identical model and metrics, at any rank count, with and without
dropouts; skipped rounds leave the model unchanged; bad settings end with one
line and exit status 2.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from conftest import MPIEXEC, REPO, describe, launch_fedmpi

BASE = ["--clients", "24", "--clients-per-round", "12", "--rounds", "3", "--hidden", "16"]
SAME = ("test_accuracy", "test_loss", "train_loss", "num_clients", "num_sampled", "num_samples",
        "fixed_point_coarse")


def _run(tmp_path, name, args, ranks=1, env=None):
    out = tmp_path / f"{name}.h5"
    res = launch_fedmpi([*args, "--out", str(out)], ranks=ranks, cwd=tmp_path, timeout=300,
                        env=env)
    assert res.returncode == 0, describe(res)
    return out


def _assert_same_run(a, b):
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        pa, pb = fa["model/params"][()], fb["model/params"][()]
        assert np.array_equal(pa.view(np.uint32), pb.view(np.uint32))
        for k in SAME:
            assert np.array_equal(fa["rounds"][k][()], fb["rounds"][k][()], equal_nan=True), k
        for k in ("client_id", "train_loss", "num_samples"):
            assert np.array_equal(fa["clients"][k][()], fb["clients"][k][()]), k


@pytest.fixture(scope="module")
def plain(tmp_path_factory, numba_warm):
    """The reference runs without secure aggregation, each made once."""
    cache = {}

    def get(dropout):
        if dropout not in cache:
            d = tmp_path_factory.mktemp(f"none-{dropout}")
            cache[dropout] = _run(d, "none", [*BASE, "--dropout-rate", str(dropout)])
        return cache[dropout]
    return get


@pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec")
def test_masked_sum_between_nodes_wraps_exactly(tmp_path, plain):
    """5 ranks cut into 'nodes' of 2, 2 and 1: the node leaders add the masked sums
    (uniform in Z_2^64, so the additions overflow) with a Reduce between them; the
    model is still bitwise the plain run's."""
    out = _run(tmp_path, "nodes", [*BASE, "--secure-aggregation", "secagg"], 5,
               env={"FEDMPI_RANKS_PER_NODE": "2"})
    _assert_same_run(plain(0.0), out)


@pytest.mark.parametrize("mode,ranks,dropout", [("secagg", 1, 0.0), ("secagg", 3, 0.2), ("secagg", 8, 0.0),
                                                ("secagg+", 3, 0.2)])
def test_secure_run_is_bitwise_the_plain_run(tmp_path, plain, mode, ranks, dropout):
    if ranks > 1 and MPIEXEC is None:
        pytest.skip("no mpiexec")
    out = _run(tmp_path, mode, [*BASE, "--secure-aggregation", mode, "--dropout-rate", str(dropout)], ranks)
    _assert_same_run(plain(dropout), out)
    with h5py.File(out, "r") as f:
        r = f["rounds"]
        # this seed keeps enough clients in every round (checked: else the runs would differ)
        assert not r["secure_skipped"][()].any()
        assert (r["num_clients"][()] < 12).any() == (dropout > 0)  # some did drop out
        if dropout == 0:  # each client pairs with k others: 2 * 32-byte keys out, (4 + 64) per peer in
            k = 11 if mode == "secagg" else 8
            assert np.all(r["secure_bytes_advertise"][()] == 64 + k * 68)
        assert np.all(f["clients/secure_seconds"][()] > 0)
        assert np.all(f["clients/secure_bytes"][()] > 8 * f["model/params"].size)


def test_rounds_below_threshold_are_skipped_and_change_nothing(tmp_path, numba_warm):
    args = ["--clients", "12", "--clients-per-round", "6", "--rounds", "6", "--hidden", "16",
            "--dropout-rate", "0.4", "--secure-aggregation", "secagg", "--seed", "1"]
    out = _run(tmp_path, "skip", args)
    with h5py.File(out, "r") as f:
        skipped = f["rounds/secure_skipped"][()].astype(bool)
        n = f["rounds/num_clients"][()]
        loss = f["rounds/test_loss"][()]
        # threshold ceil(2 * 6 / 3) = 4: rounds with fewer reporting clients are skipped
        assert np.array_equal(skipped, n < 4)
        assert skipped[1:].any() and not skipped.all()
        for r in np.flatnonzero(skipped):
            if r > 0:  # the model is the previous round's
                assert loss[r] == loss[r - 1]


def test_he_run_is_bitwise_the_plain_run(tmp_path, plain):
    pytest.importorskip("tenseal")
    if MPIEXEC is None:
        pytest.skip("no mpiexec")
    out = _run(tmp_path, "he", [*BASE, "--secure-aggregation", "he", "--dropout-rate", "0.2"], 3)
    _assert_same_run(plain(0.2), out)
    with h5py.File(out, "r") as f:
        assert np.all(f["rounds/secure_bytes_ciphertext"][()] > 0)


@pytest.mark.parametrize("args,message", [
    (["--secagg-threshold", "13"], "--secagg-threshold 13 is more than the 12 share holders"),
    (["--secagg-threshold", "6"], "--secagg-threshold 6 is at most half of the 12 share holders"),
    (["--aggregator", "median"], "--aggregator median needs each update"),
    (["--aggregator", "trimmed_mean"], "--aggregator trimmed_mean needs each update"),
    (["--secure-aggregation", "none", "--secagg-threshold", "8"], "--secagg-threshold applies to"),
    (["--secure-aggregation", "he", "BLOCK_TENSEAL"], "pip install 'fedmpi[he]'"),
    (["--dropout-rate", "1"], "--dropout-rate must be in [0, 1)"),
])
def test_bad_settings_end_with_one_line(tmp_path, args, message):
    env = None
    if "BLOCK_TENSEAL" in args:  # a tenseal that cannot be imported, first on the path
        args = [a for a in args if a != "BLOCK_TENSEAL"]
        (tmp_path / "block").mkdir()
        (tmp_path / "block" / "tenseal.py").write_text("raise ImportError('blocked by the test')\n")
        env = {"PYTHONPATH": str(tmp_path / "block")}
    if "--secure-aggregation" not in args:
        args = ["--secure-aggregation", "secagg", *args]
    res = launch_fedmpi([*BASE, *args, "--out", str(tmp_path / "x.h5")], cwd=tmp_path, env=env)
    assert res.returncode == 2, describe(res)
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedmpi: error: ") and message in err[0], err


def test_resumed_secure_run_equals_uninterrupted(tmp_path, numba_warm):
    # stopped by SIGTERM after two rounds (a checkpoint), resumed on 3 ranks
    args = [sys.executable, "-m", "fedmpi", "--clients", "60", "--clients-per-round", "40",
            "--rounds", "4", "--hidden", "8", "--secure-aggregation", "secagg"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    whole = _run(tmp_path, "whole", args[3:])
    out = tmp_path / "cut.h5"
    p = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    deadline = time.time() + 120
    while _rows(out) < 2:
        assert time.time() < deadline and p.poll() is None, "the run ended before it was stopped"
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == 128 + signal.SIGTERM
    assert _rows(out) < 4
    cmd = [*args, "--out", str(out), "--resume", "auto"]
    if MPIEXEC is not None:
        cmd = [MPIEXEC, "-n", "3", *cmd]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    _assert_same_run(whole, out)


def _rows(path):
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["rounds/round"]) if "round" in f["rounds"] else 0
    except (OSError, KeyError, RuntimeError):  # a file being written may not be readable yet
        return 0
