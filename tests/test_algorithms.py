"""FedProx and the server optimizers against the papers' update rules, written out here."""

import json
import subprocess
import sys

import h5py
import numpy as np
import pytest

from fedmpi.algorithms import FedAvg, FedProx
from fedmpi.algorithms.server_opt import ServerOptimizer
from fedmpi.client import LocalTrainer
from fedmpi.config import from_dict
from fedmpi.data import Dataset
from fedmpi.model.mlp import MLP
from fedmpi.rng import generator


def _reference(kind, w, deltas, lr, mom=0.9, b1=0.9, b2=0.99, tau=1e-3):
    """Reddi et al. 2021 Algorithm 2 (FedAdam/FedYogi) and FedAvgM, step by step."""
    w = w.astype(np.float64)
    m = np.zeros_like(w)
    v = np.full_like(w, tau ** 2) if kind in ("adam", "yogi") else np.zeros_like(w)
    out = []
    for d in deltas:
        if kind == "sgd":
            w = w + lr * d
        elif kind == "avgm":
            v = mom * v + d
            w = w + lr * v
        else:
            m = b1 * m + (1 - b1) * d
            if kind == "adam":
                v = b2 * v + (1 - b2) * d ** 2
            else:
                v = v - (1 - b2) * d ** 2 * np.sign(v - d ** 2)
            w = w + lr * m / (np.sqrt(v) + tau)
        w = w.astype(np.float32).astype(np.float64)  # the global model is float32
        out.append(w.astype(np.float32))
    return out


@pytest.mark.parametrize("kind", ["sgd", "avgm", "adam", "yogi"])
def test_server_optimizers_follow_the_papers(kind):
    rng = np.random.default_rng(0)
    w = rng.normal(size=50).astype(np.float32)
    deltas = [rng.normal(size=50) * 0.1 for _ in range(4)]
    opt = ServerOptimizer(kind, 50, lr=0.05)
    got, cur = [], w
    for d in deltas:
        cur = opt.step(cur, d)
        got.append(cur)
    for a, b in zip(got, _reference(kind, w, deltas, 0.05)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _setup(**cfg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=40).astype(np.int32)
    ds = Dataset("t", x, y, x[:10], y[:10], 3, 1.0)
    model = MLP((6, 8, 3))
    c = from_dict({"batch_size": 5, "lr": 0.1, **cfg})
    return c, model, LocalTrainer(c, model, ds), model.init(generator(0, "init"))


def test_fedprox_with_mu_zero_is_fedavg():
    cfg, model, tr, w = _setup(algorithm="fedprox", prox_mu=0.0)
    a = FedProx(cfg, model).client_update(tr, w, np.arange(40), generator(0, "shuffle", 1, 0))
    b = FedAvg(cfg, model).client_update(tr, w, np.arange(40), generator(0, "shuffle", 1, 0))
    assert np.array_equal(a.update, b.update)


def test_fedprox_pulls_the_local_model_towards_the_global_one():
    sizes = []
    for mu in (0.0, 1.0, 5.0):
        cfg, model, tr, w = _setup(algorithm="fedprox", prox_mu=mu, local_epochs=5)
        u = FedProx(cfg, model).client_update(tr, w, np.arange(40), generator(0, "shuffle", 1, 0))
        sizes.append(float(np.linalg.norm(u.update)))
    assert sizes[0] > sizes[1] > sizes[2] > 0


def test_fedprox_first_step_is_plain_sgd_then_prox_gradient():
    # One client, batch = all 40 samples, 2 epochs: step 1 starts at the anchor
    # (prox gradient 0), step 2 adds mu * (w1 - w0) -- check against FedAvg's steps.
    cfg, model, tr, w0 = _setup(algorithm="fedprox", prox_mu=2.0, batch_size=0, local_epochs=1)
    one = FedAvg(cfg, model).client_update(tr, w0, np.arange(40), generator(0, "shuffle", 1, 0))
    w1 = w0 + one.update
    g1, _ = tr.gradient(w1, np.arange(40))
    expected = w1 - np.float32(0.1) * (g1 + np.float32(2.0) * (w1 - w0))
    cfg2, _, tr2, _ = _setup(algorithm="fedprox", prox_mu=2.0, batch_size=0, local_epochs=2)
    two = FedProx(cfg2, model).client_update(tr2, w0, np.arange(40), generator(0, "shuffle", 1, 0))
    np.testing.assert_allclose(w0 + two.update, expected, rtol=1e-5, atol=1e-6)


def test_server_state_survives_resume(tmp_path):
    base = [sys.executable, "-m", "fedmpi", "--clients", "10", "--clients-per-round", "3",
            "--hidden", "8", "--server-optimizer", "adam", "--server-lr", "0.03"]
    subprocess.run([*base, "--rounds", "6", "--out", str(tmp_path / "a.h5")], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*base, "--rounds", "3", "--out", str(tmp_path / "b.h5")], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([*base, "--rounds", "6", "--resume", str(tmp_path / "b.h5")], check=True,
                   capture_output=True, timeout=120)
    with h5py.File(tmp_path / "a.h5") as a, h5py.File(tmp_path / "b.h5") as b:
        assert np.array_equal(a["model/params"][:], b["model/params"][:])
        assert "server_m" in b["checkpoint/slot0"] and "server_v" in b["checkpoint/slot0"]


# ---- robust aggregation (Yin et al. 2018) ----------------------------------------

from fedmpi.algorithms import robust  # noqa: E402


@pytest.mark.parametrize("k", [5, 6])
def test_coordinate_median_against_sorting(k):
    u = np.random.default_rng(k).normal(size=(k, 40)).astype(np.float32)
    s = np.sort(u.astype(np.float64), axis=0)
    expected = s[k // 2] if k % 2 else (s[k // 2 - 1] + s[k // 2]) / 2
    np.testing.assert_array_equal(robust.coordinate_median(u), expected)


@pytest.mark.parametrize("k, trim", [(10, 0.1), (10, 0.25), (7, 0.3), (4, 0.0)])
def test_trimmed_mean_against_scipy(k, trim):
    from scipy.stats import trim_mean

    u = np.random.default_rng(k).normal(size=(k, 40)).astype(np.float32)
    np.testing.assert_allclose(robust.trimmed_mean(u, trim),
                               trim_mean(u.astype(np.float64), trim, axis=0), rtol=1e-12)


def test_robust_combiners_ignore_a_byzantine_client_in_any_order():
    rng = np.random.default_rng(3)
    u = rng.normal(scale=0.01, size=(9, 30)).astype(np.float32)
    u[4] = 1e6  # one attacker
    honest = np.delete(u, 4, axis=0).astype(np.float64)
    # written out per coordinate: the median of 9 values with one at +1e6 is the 5th
    # smallest honest value; trimming 1 per side drops the attacker and the smallest
    cols = [sorted(honest[:, j]) for j in range(30)]
    want_median = np.array([c[4] for c in cols])
    want_trimmed = np.array([sum(c[1:]) / 7 for c in cols])
    for _ in range(5):
        perm = rng.permutation(9)
        np.testing.assert_array_equal(robust.coordinate_median(u[perm]), want_median)
        np.testing.assert_allclose(robust.trimmed_mean(u[perm], 0.2), want_trimmed,
                                   rtol=1e-12, atol=0)


@pytest.mark.parametrize("aggregator", ["median", "trimmed_mean", "uniform_mean"])
def test_robust_aggregation_against_reference_across_ranks(tmp_path, small_npz, aggregator):
    """One round, 5 clients trained by the plain NumPy SGD of test_mpi; the server
    steps by the coordinate-wise median (or trimmed mean) of their deltas, at 1 and 4
    ranks. The plain mean gives other parameters, so an ignored --aggregator fails.
    uniform_mean: --client-weighting uniform, the unweighted mean of the deltas
    (FedAdam's Algorithm 2), on a Dirichlet split whose clients differ in size."""
    import os
    import shutil

    from test_mpi import _split, reference_sgd

    from fedmpi.data.partition import make_partition

    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("mpiexec not found (pip install mpich)")
    seed, hidden, k, lr = 3, (6,), 5, 0.1
    base = ["-m", "fedmpi", "--dataset", f"npz:{small_npz}", "--clients", str(k),
            "--clients-per-round", str(k), "--rounds", "1", "--hidden", "6", "--batch-size", "16",
            "--lr", str(lr), "--seed", str(seed)]
    if aggregator == "uniform_mean":
        base += ["--client-weighting", "uniform", "--partition", "dirichlet", "--alpha", "1"]
    else:
        base += ["--aggregator", aggregator, "--trim", "0.2"]
    subprocess.run([sys.executable, *base, "--out", str(tmp_path / "1.h5")], check=True,
                   capture_output=True, timeout=120)
    subprocess.run([mpiexec, "-n", "4", sys.executable, *base, "--out", str(tmp_path / "4.h5")],
                   check=True, capture_output=True, timeout=120)

    with np.load(small_npz) as z:
        x = z["x_train"].astype(np.float64) / 255.0
        y = z["y_train"]
        classes = int(max(y.max(), z["y_test"].max())) + 1
    sizes = (x.shape[1], *hidden, classes)
    init = MLP(sizes).init(generator(seed, "init"), "glorot_uniform").astype(np.float64)
    if aggregator == "uniform_mean":
        part = make_partition("dirichlet", y, k, seed=seed, alpha=1.0)
        assert part.sizes.max() > 1.5 * part.sizes.min()  # weighting by n_k would differ
    else:
        part = make_partition("iid", y, k, seed=seed)
    deltas = []
    for c in range(k):
        idx = part.indices(c)
        order = idx[generator(seed, "shuffle", 1, c).permutation(len(idx))]
        layers = _split(init.astype(np.float32), sizes)
        reference_sgd(layers, x, y, order, 16, lr)
        deltas.append(np.concatenate([np.concatenate([w.ravel(), b]) for w, b in layers]) - init)
    deltas = np.array(deltas)
    s = np.sort(deltas, axis=0)
    if aggregator == "uniform_mean":
        expected = init + deltas.mean(axis=0)
        other = init + part.sizes @ deltas / part.sizes.sum()  # the sample-weighted mean
    else:
        expected = init + (s[k // 2] if aggregator == "median" else s[1:k - 1].mean(axis=0))
        other = init + deltas.mean(axis=0)
    assert np.abs(expected - other).max() > 1e-3, "the test would be vacuous"

    with h5py.File(tmp_path / "1.h5") as a, h5py.File(tmp_path / "4.h5") as b:
        got = a["model/params"][:]
        assert np.array_equal(got.view(np.uint32), b["model/params"][:].view(np.uint32))
        config = json.loads(a.attrs["config"])
        assert config["aggregator"] == aggregator or config["client_weighting"] == "uniform"
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=2e-5)
