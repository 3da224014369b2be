"""End-to-end tests of ``python -m fedmpi`` on 1 and several MPI ranks (subprocesses).

Reproducibility across rank counts, agreement with an independent NumPy
implementation of centralised SGD, the HDF5 results layout, evaluation
cadence, and what happens when a rank dies or the job is signalled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime

import h5py
import numpy as np
import pytest

import fedmpi
from conftest import (MPIEXEC, REPO, SMALL_SYNTHETIC, describe, fedmpi_lines, launch_fedmpi,
                      leftover_processes, requires_mpiexec)
from fedmpi.config import Config
from fedmpi.data import load_dataset
from fedmpi.model.mlp import MLP
from fedmpi.results import read_checkpoint, read_run
from fedmpi.rng import generator

CONFIGS = {
    "synthetic-fedavg": SMALL_SYNTHETIC,
    "synthetic-fedsgd": ["--algorithm", "fedsgd", "--lr", "0.5", "--clients", "12",
                         "--clients-per-round", "7", "--rounds", "3", "--hidden", "16"],
    # uint8 inputs, label-skewed clients of unequal size, two hidden layers,
    # several epochs with a ragged last minibatch, momentum (the unfused
    # optimizer path) and a server learning rate.
    "npz-dirichlet-fedavg": ["--dataset", "npz:{npz}", "--partition", "dirichlet",
                             "--alpha", "0.5", "--clients", "8", "--clients-per-round", "6",
                             "--rounds", "3", "--hidden", "12,8", "--local-epochs", "2",
                             "--batch-size", "7", "--momentum", "0.9", "--server-lr", "0.7"],
}

ROUND_COLUMNS = {"round", "test_accuracy", "test_loss", "train_loss", "num_clients",
                 "num_samples", "seconds", "bytes_up", "bytes_down", "num_sampled", "fixed_point_coarse"}
CLIENT_COLUMNS = {"round", "client_id", "rank", "num_samples", "train_loss", "seconds"}


@pytest.fixture(scope="module")
def job(tmp_path_factory, small_npz, numba_warm):
    """job(config name, ranks, seed=0) -> path of its results file; each run once per module."""
    cache = {}

    def get(name, ranks, seed=0):
        key = (name, ranks, seed)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"{name}-n{ranks}-s{seed}")
            out = d / "run.h5"
            args = [a.format(npz=small_npz) for a in CONFIGS[name]]
            res = launch_fedmpi(args + ["--seed", str(seed), "--out", str(out)],
                                ranks=ranks, cwd=d)
            assert res.returncode == 0, describe(res)
            cache[key] = out
        return cache[key]

    return get


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ------------------------------------------------------------ reproducibility


@pytest.mark.parametrize("name", list(CONFIGS))
def test_bitwise_identical_for_1_3_5_ranks(job, name):
    runs = {ranks: read_run(str(job(name, ranks))) for ranks in (1, 3, 5)}
    ref = runs[1]
    assert ref["params"] is not None and np.isfinite(ref["params"]).all()
    assert len(ref["rounds"]["round"]) == 3
    for ranks in (3, 5):
        run = runs[ranks]
        assert run["attrs"]["mpi_size"] == ranks
        np.testing.assert_array_equal(bits(run["params"]), bits(ref["params"]),
                                      err_msg=f"/model/params differ: 1 vs {ranks} ranks")
        for metric in ("test_accuracy", "test_loss", "train_loss", "num_samples"):
            np.testing.assert_array_equal(run["rounds"][metric], ref["rounds"][metric],
                                          err_msg=f"/rounds/{metric}: 1 vs {ranks} ranks")
        # Same clients each round, each with the same local training loss.
        order = np.lexsort((run["clients"]["client_id"], run["clients"]["round"]))
        ref_order = np.lexsort((ref["clients"]["client_id"], ref["clients"]["round"]))
        for col in ("round", "client_id", "num_samples", "train_loss"):
            np.testing.assert_array_equal(run["clients"][col][order],
                                          ref["clients"][col][ref_order],
                                          err_msg=f"/clients/{col}: 1 vs {ranks} ranks")


@pytest.mark.parametrize("name", ["synthetic-fedavg", "npz-dirichlet-fedavg"])
def test_bitwise_identical_across_simulated_nodes(job, run_fedmpi, tmp_path, small_npz, name):
    """5 ranks cut into 'nodes' of 2, 2 and 1 ranks: data loaded by each node's leader, sums
    and broadcasts going through node shared memory and then between the leaders."""
    out = tmp_path / "nodes.h5"
    args = [a.format(npz=small_npz) for a in CONFIGS[name]]
    res = run_fedmpi(args + ["--seed", "0", "--out", str(out)], ranks=5,
                     env={"FEDMPI_RANKS_PER_NODE": "2"})
    assert res.returncode == 0, describe(res)
    ref, run = read_run(str(job(name, 1))), read_run(str(out))
    np.testing.assert_array_equal(bits(run["params"]), bits(ref["params"]))
    for metric in ("test_accuracy", "test_loss", "train_loss"):
        np.testing.assert_array_equal(run["rounds"][metric], ref["rounds"][metric])


@pytest.mark.parametrize("name", ["synthetic-fedavg", "npz-dirichlet-fedavg"])
def test_other_seed_gives_other_params(job, name):
    a = read_run(str(job(name, 1, seed=0)))["params"]
    b = read_run(str(job(name, 1, seed=1)))["params"]
    assert a.shape == b.shape
    assert not np.array_equal(a, b)


# -------------------------------------------- FedAvg with one client == SGD


def _split(flat, sizes):
    out, pos = [], 0
    for n_in, n_out in zip(sizes[:-1], sizes[1:]):
        w = flat[pos:pos + n_in * n_out].reshape(n_in, n_out).astype(np.float64)
        pos += n_in * n_out
        b = flat[pos:pos + n_out].astype(np.float64)
        pos += n_out
        out.append([w, b])
    assert pos == flat.size
    return out


def _forward(layers, x):
    acts = [x]
    for i, (w, b) in enumerate(layers):
        z = acts[-1] @ w + b
        acts.append(np.maximum(z, 0.0) if i < len(layers) - 1 else z)
    return acts


def _softmax_ce(logits, y):
    m = logits.max(axis=1, keepdims=True)
    e = np.exp(logits - m)
    p = e / e.sum(axis=1, keepdims=True)
    loss = np.log(e.sum(axis=1)) + m[:, 0] - logits[np.arange(len(y)), y]
    return p, loss


def reference_sgd(layers, x, y, order, batch, lr):
    """Plain minibatch SGD on mean softmax cross-entropy; returns the sum of
    the per-sample losses seen before each step."""
    n = len(order)
    batch = n if batch <= 0 else batch
    loss_sum = 0.0
    for s in range(0, n, batch):
        rows = order[s:s + batch]
        acts = _forward(layers, x[rows])
        p, loss = _softmax_ce(acts[-1], y[rows])
        loss_sum += loss.sum()
        delta = p.copy()
        delta[np.arange(len(rows)), y[rows]] -= 1.0
        delta /= len(rows)
        for i in range(len(layers) - 1, -1, -1):
            w, b = layers[i]
            grad_w = acts[i].T @ delta
            grad_b = delta.sum(axis=0)
            if i > 0:
                delta = (delta @ w.T) * (acts[i] > 0)
            layers[i] = [w - lr * grad_w, b - lr * grad_b]
    return loss_sum


@pytest.mark.parametrize("batch, lr", [(16, 0.1), (0, 2.0)], ids=["B16", "full-batch"])
def test_fedavg_one_client_is_centralised_sgd(run_fedmpi, tmp_path, small_npz, numba_warm,
                                              batch, lr):
    seed, hidden = 3, (8, 6)
    out = tmp_path / "run.h5"
    res = run_fedmpi(["--dataset", f"npz:{small_npz}", "--clients", "1",
                      "--clients-per-round", "1", "--rounds", "1", "--local-epochs", "1",
                      "--batch-size", str(batch), "--lr", str(lr), "--seed", str(seed),
                      "--hidden", ",".join(map(str, hidden)), "--out", str(out)])
    assert res.returncode == 0, describe(res)
    run = read_run(str(out))

    with np.load(small_npz) as z:
        x_train = z["x_train"].astype(np.float64) / 255.0
        y_train = z["y_train"]
        x_test = z["x_test"].astype(np.float64) / 255.0
        y_test = z["y_test"]
    n = len(y_train)
    sizes = (x_train.shape[1], *hidden, int(max(y_train.max(), y_test.max())) + 1)
    assert run["layer_sizes"] == list(sizes)
    np.testing.assert_array_equal(run["partition"]["num_samples"], [n])

    # fedmpi's own seeded draws: the initial model and the client's shuffle
    # (the one client of an iid split holds samples 0..n-1).
    init = MLP(sizes).init(generator(seed, "init"), "glorot_uniform")
    order = np.arange(n)[generator(seed, "shuffle", 1, 0).permutation(n)]
    layers = _split(init, sizes)
    loss_sum = reference_sgd(layers, x_train, y_train, order, batch, lr)
    expected = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in layers])

    moved = np.abs(expected - init).max()
    assert moved > 1e-2, "training hardly changed the model: the comparison would be vacuous"
    np.testing.assert_allclose(run["params"], expected, rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(run["rounds"]["train_loss"], [loss_sum / n], rtol=1e-5)

    acts = _forward(_split(expected.astype(np.float32), sizes), x_test)
    _, test_loss = _softmax_ce(acts[-1], y_test)
    np.testing.assert_allclose(run["rounds"]["test_loss"], [test_loss.mean()], rtol=1e-4)
    np.testing.assert_allclose(run["rounds"]["test_accuracy"],
                               [np.mean(acts[-1].argmax(axis=1) == y_test)], atol=1.5 / len(y_test))


# ------------------------------------------------------------- HDF5 layout


@pytest.mark.parametrize("ranks", [1, 3])
def test_hdf5_layout(job, ranks):
    path = job("synthetic-fedavg", ranks)
    rounds, per_round, num_clients = 3, 5, 12
    data = load_dataset("synthetic", data_dir=None, seed=0, num_clients=num_clients)
    with h5py.File(path, "r", locking=False) as f:
        attrs = f.attrs
        config = json.loads(attrs["config"])
        assert set(config) == {fl.name for fl in dataclasses.fields(Config)}
        assert config["rounds"] == rounds and config["clients"] == num_clients
        assert config["clients_per_round"] == per_round and config["hidden"] == [16]
        assert config["partition"] == "natural"  # saved resolved, not "auto"
        assert config["out"] == str(path)
        assert attrs["fedmpi_version"] == fedmpi.__version__
        assert int(attrs["mpi_size"]) == ranks
        datetime.fromisoformat(attrs["created"])
        assert "-m fedmpi" in attrs["command"] and str(path) in attrs["command"]

        # /rounds: one row per round, every column with units and description
        assert set(f["rounds"]) == ROUND_COLUMNS
        for name, ds in f["rounds"].items():
            assert ds.shape == (rounds,), name
            assert "units" in ds.attrs and ds.attrs["description"], name
        r = {name: ds[()] for name, ds in f["rounds"].items()}
        np.testing.assert_array_equal(r["round"], np.arange(1, rounds + 1))
        np.testing.assert_array_equal(r["num_clients"], per_round)
        np.testing.assert_array_equal(r["num_sampled"], per_round)  # no drop-outs
        np.testing.assert_array_equal(r["fixed_point_coarse"], 0)  # a healthy run
        assert ((0 <= r["test_accuracy"]) & (r["test_accuracy"] <= 1)).all()
        assert np.isfinite(r["test_loss"]).all() and np.isfinite(r["train_loss"]).all()
        assert (r["seconds"] >= 0).all()

        # /clients: one row per (round, client)
        assert set(f["clients"]) == CLIENT_COLUMNS
        for name, ds in f["clients"].items():
            assert ds.shape == (rounds * per_round,), name
            assert "units" in ds.attrs and ds.attrs["description"], name
        c = {name: ds[()] for name, ds in f["clients"].items()}
        if ranks == 1:
            np.testing.assert_array_equal(c["rank"], 0)
        else:
            assert set(c["rank"].tolist()) <= set(range(1, ranks)), c["rank"]
        sizes = f["partition/num_samples"][()]
        assert sizes.shape == (num_clients,)
        assert sizes.sum() == data.x_train.shape[0]
        np.testing.assert_array_equal(f["partition/label_histogram"][()].sum(axis=1), sizes)
        np.testing.assert_array_equal(c["num_samples"], sizes[c["client_id"]])
        for rnd in range(1, rounds + 1):
            mine = c["round"] == rnd
            ids = c["client_id"][mine]
            assert len(set(ids.tolist())) == per_round and ids.min() >= 0 and ids.max() < num_clients
            assert r["num_samples"][rnd - 1] == c["num_samples"][mine].sum()
        assert np.isfinite(c["train_loss"]).all() and (c["seconds"] >= 0).all()

        # /model
        layer_sizes = [int(s) for s in f["model"].attrs["layer_sizes"]]
        assert layer_sizes == [data.num_features, 16, data.num_classes]
        num_params = sum(a * b + b for a, b in zip(layer_sizes[:-1], layer_sizes[1:]))
        assert f["model/params"].shape == (num_params,)
        assert f["model/params"].dtype == np.float32
        np.testing.assert_array_equal(r["bytes_up"], per_round * num_params * 4)
        np.testing.assert_array_equal(r["bytes_down"], per_round * num_params * 4)


def test_hdf5_loads_into_pandas(job):
    pd = pytest.importorskip("pandas")
    run = read_run(str(job("synthetic-fedavg", 3)))
    rounds = pd.DataFrame(run["rounds"])
    clients = pd.DataFrame(run["clients"])
    assert len(rounds) == 3 and set(rounds.columns) == ROUND_COLUMNS
    assert len(clients) == 15 and set(clients.columns) == CLIENT_COLUMNS
    merged = clients.groupby("round")["num_samples"].sum()
    np.testing.assert_array_equal(merged.to_numpy(), rounds["num_samples"].to_numpy())


# ------------------------------------------------------- evaluation cadence


@pytest.mark.parametrize("ranks", [1, 3])
def test_eval_every(run_fedmpi, tmp_path, numba_warm, ranks):
    out = tmp_path / "run.h5"
    res = run_fedmpi(SMALL_SYNTHETIC + ["--rounds", "5", "--eval-every", "2", "--out", str(out)],
                     ranks=ranks)
    assert res.returncode == 0, describe(res)
    r = read_run(str(out))["rounds"]
    np.testing.assert_array_equal(r["round"], [1, 2, 3, 4, 5])
    for metric in ("test_accuracy", "test_loss"):
        np.testing.assert_array_equal(np.isnan(r[metric]), [True, False, True, False, False],
                                      err_msg=metric)
    assert np.isfinite(r["train_loss"]).all()


# --------------------------------------------------- failures and signals


LONG_RUN = ["--clients", "30", "--clients-per-round", "6", "--hidden", "32",
            "--rounds", "100000"]


def wait_for_rounds(job, path, count: int, timeout: float = 60) -> None:
    """Poll the results file (without locking) until it holds `count` rounds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if job.proc.poll() is not None:
            pytest.fail(f"job ended before writing {count} rounds\n{job.describe()}")
        try:
            with h5py.File(path, "r", locking=False) as f:
                if "round" in f["rounds"] and f["rounds/round"].shape[0] >= count:
                    return
        except (OSError, KeyError, ValueError, RuntimeError):
            pass  # not created yet, or caught mid-write
        time.sleep(0.1)
    job.kill()
    pytest.fail(f"no {count} rounds in {path} after {timeout} s\n{job.describe()}")


def check_readable(path, min_rounds: int) -> dict:
    run = read_run(str(path))
    n = len(run["rounds"]["round"])
    assert n >= min_rounds
    np.testing.assert_array_equal(run["rounds"]["round"], np.arange(1, n + 1))
    with h5py.File(path, "r") as f:  # plain open, default locking, as a user would
        assert f["rounds/round"].shape[0] >= n
    return run


@requires_mpiexec
def test_killed_worker_ends_job(start_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "run.h5"
    job = start_fedmpi(LONG_RUN + ["--out", out], ranks=4)
    wait_for_rounds(job, out, 2)
    ranks = job.rank_pids()
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    os.kill(ranks[2], signal.SIGKILL)
    t0 = time.monotonic()
    status = job.wait(timeout=60)
    elapsed = time.monotonic() - t0
    assert elapsed < 30, f"job took {elapsed:.1f} s to end after a rank was killed"
    assert status != 0, job.describe()
    check_readable(out, 2)
    assert not leftover_processes(job.token)


@requires_mpiexec
def test_hung_rank_ends_job(run_fedmpi, tmp_path, numba_warm):
    """A rank that never reaches round 3's collectives (the FEDMPI_TEST_HANG_RANK
    hook puts it to sleep for an hour) ends the job after --round-timeout: status
    1, one line naming the round and the rank, rounds 1-2 and their checkpoint
    kept, and the run resumes from there."""
    out = tmp_path / "run.h5"
    args = SMALL_SYNTHETIC + ["--rounds", "5", "--round-timeout", "2", "--out", out]
    t0 = time.monotonic()
    res = run_fedmpi(args, ranks=3, timeout=60, env={"FEDMPI_TEST_HANG_RANK": "2:3"})
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, describe(res)
    assert elapsed < 30, f"{elapsed:.1f} s"
    ours = [line for line in res.stderr.splitlines() if line.startswith("fedmpi:")]
    assert ours == [ours[0]] and "Traceback" not in res.stderr, describe(res)
    assert ours[0].startswith("fedmpi: round 3: rank(s) 2 did not arrive within 2 s"), describe(res)
    assert not leftover_processes(res.token)
    run = check_readable(out, 2)
    np.testing.assert_array_equal(run["rounds"]["round"], [1, 2])
    _, done, arrays = read_checkpoint(str(out))
    assert done == 2 and "params" in arrays
    res = run_fedmpi(args[:-2] + ["--resume", out], ranks=3, timeout=60)
    assert res.returncode == 0, describe(res)
    np.testing.assert_array_equal(read_run(str(out))["rounds"]["round"], [1, 2, 3, 4, 5])


@requires_mpiexec
def test_dp_target_epsilon_run_resumes_with_its_solved_noise(run_fedmpi, tmp_path, numba_warm):
    """A --dp-target-epsilon run stopped by the watchdog resumes (as a requeued job
    does: the same command with --resume auto) with the noise multiplier solved at
    its start, and ends bitwise equal to an uninterrupted run; extending it to more
    rounds than its budget was solved for is refused."""
    ref, out = tmp_path / "ref.h5", tmp_path / "run.h5"
    args = SMALL_SYNTHETIC + ["--rounds", "5", "--round-timeout", "2", "--dp-clip", "1",
                              "--dp-target-epsilon", "20"]
    assert run_fedmpi(args + ["--out", ref], ranks=3, timeout=60).returncode == 0
    res = run_fedmpi(args + ["--out", out], ranks=3, timeout=60,
                     env={"FEDMPI_TEST_HANG_RANK": "2:4"})
    assert res.returncode == 1, describe(res)
    assert read_checkpoint(str(out))[1] == 3
    res = run_fedmpi(args + ["--out", out, "--resume", "auto"], ranks=3, timeout=60)
    assert res.returncode == 0, describe(res)
    a, b = read_run(str(ref)), read_run(str(out))
    assert np.array_equal(a["params"].view(np.uint32), b["params"].view(np.uint32))
    assert np.array_equal(a["rounds"]["epsilon"], b["rounds"]["epsilon"])
    assert a["config"]["dp_noise_multiplier"] == b["config"]["dp_noise_multiplier"] > 0
    res = run_fedmpi(args[:-6] + ["--rounds", "6", "--resume", out], timeout=60)
    assert res.returncode == 2 and "another privacy budget" in res.stderr, describe(res)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_single_process(start_fedmpi, tmp_path, numba_warm, sig):
    out = tmp_path / "run.h5"
    job = start_fedmpi(LONG_RUN + ["--out", out], ranks=1)
    wait_for_rounds(job, out, 2)
    os.killpg(job.pid, sig)  # the whole process group, as a batch system or Ctrl-C does
    status = job.wait(timeout=30)
    assert status == 128 + sig, job.describe()
    assert "Traceback" not in job.stderr, job.describe()
    run = check_readable(out, 2)
    with h5py.File(out, "r") as f:  # closed cleanly: every column equally long
        lengths = {ds.shape[0] for ds in f["rounds"].values()}
        assert lengths == {len(run["rounds"]["round"])}
        assert {ds.shape[0] for ds in f["clients"].values()} == {6 * len(run["rounds"]["round"])}
    assert not math.isnan(run["rounds"]["train_loss"][0])
    assert not leftover_processes(job.token)


@requires_mpiexec
def test_signal_to_a_worker_stops_at_rank_0s_safe_point(start_fedmpi, tmp_path, numba_warm):
    """A worker rank signalled alone (a stray kill, a node's OOM handler) must not abort
    the job under rank 0's writes: rank 0 stops after writing the round, as if signalled."""
    out = tmp_path / "run.h5"
    job = start_fedmpi(LONG_RUN + ["--out", out], ranks=4)
    wait_for_rounds(job, out, 2)
    ranks = job.rank_pids()
    assert sorted(ranks) == [0, 1, 2, 3], ranks
    os.kill(ranks[2], signal.SIGTERM)
    status = job.wait(timeout=60)
    assert status == 128 + signal.SIGTERM, job.describe()
    assert "fedmpi: interrupted by SIGTERM" in job.stderr, job.describe()
    assert "Traceback" not in job.stderr, job.describe()
    assert not [ln for ln in fedmpi_lines(job.stderr) if "failed" in ln], job.describe()
    run = check_readable(out, 2)
    n = len(run["rounds"]["round"])
    with h5py.File(out, "r") as f:  # closed by rank 0: complete rows and a checkpoint of the last
        assert {ds.shape[0] for ds in f["rounds"].values()} == {n}
        assert {ds.shape[0] for ds in f["clients"].values()} == {6 * n}
        assert int(f["checkpoint"].attrs["round"]) == n
    assert not leftover_processes(job.token)


@requires_mpiexec
@pytest.mark.parametrize("value", ["0", "two", "-1"])
def test_ranks_per_node_must_be_a_positive_integer(run_fedmpi, tmp_path, value):
    res = run_fedmpi(SMALL_SYNTHETIC + ["--out", tmp_path / "r.h5"], ranks=3,
                     env={"FEDMPI_RANKS_PER_NODE": value}, timeout=60)
    assert res.returncode == 2, describe(res)
    lines = fedmpi_lines(res.stderr)
    assert len(lines) == 1 and "FEDMPI_RANKS_PER_NODE" in lines[0] and repr(value) in lines[0], \
        describe(res)
    assert not (tmp_path / "r.h5").exists()


@requires_mpiexec
def test_ranks_per_node_must_be_equal_on_every_rank(tmp_path):
    """Ranks that cut the job into different virtual nodes would deadlock."""
    env = {k: v for k, v in os.environ.items() if k != "FEDMPI_RANKS_PER_NODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    base = [sys.executable, "-m", "fedmpi", *SMALL_SYNTHETIC, "--out", str(tmp_path / "r.h5")]
    # MPMD: rank 0 without the variable, ranks 1-2 with it (`env` works with every launcher)
    cmd = [MPIEXEC, "-n", "1", *base, ":", "-n", "2", "env", "FEDMPI_RANKS_PER_NODE=2", *base]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 2, describe(res)
    lines = fedmpi_lines(res.stderr)
    assert len(lines) == 1 and "differs between ranks" in lines[0], describe(res)


def test_default_output_names_are_unique(tmp_path, numba_warm):
    """Two runs started in the same second without --out write two files."""
    procs = [subprocess.Popen([sys.executable, "-m", "fedmpi", *SMALL_SYNTHETIC, "--rounds", "1"],
                              cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": REPO})
             for _ in range(2)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    files = sorted((tmp_path / "results").glob("*.h5"))
    assert len(files) == 2, files
    for f in files:
        assert len(read_run(str(f))["rounds"]["round"]) == 1


_GATHER_SCRIPT = """
import numpy as np
from mpi4py import MPI
from fedmpi.runtime import comm as C
comm = MPI.COMM_WORLD
# clients spread over ranks in no particular order; rank 0 trains some too
by_rank = [[7, 2], [0, 9, 4], [3], [8, 1, 5, 6]][:comm.size]
mine = by_rank[comm.rank]
rows = np.array([[c, c * 10.0 + comm.rank] for c in mine], np.float32).reshape(len(mine), 2)
got = C.gather_in_client_order(comm, rows, by_rank)
if comm.rank == 0:
    ids = sorted(c for ids in by_rank for c in ids)
    where = {c: r for r, ids in enumerate(by_rank) for c in ids}
    want = np.array([[c, c * 10.0 + where[c]] for c in ids], np.float32)
    assert np.array_equal(got, want), got
    print("ok")
else:
    assert got is None
"""


@requires_mpiexec
def test_gather_puts_updates_in_client_id_order(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO}
    res = subprocess.run([MPIEXEC, "-n", "4", sys.executable, "-c", _GATHER_SCRIPT],
                         capture_output=True, text=True, timeout=60, env=env)
    assert res.returncode == 0 and res.stdout.strip() == "ok", describe(res)
