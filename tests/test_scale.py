"""Many clients: the synthetic generator's size knob and test-set cap, the memory
estimate and refusal, O(K) per-round work, and a 20,000-client run on 1 and 3 ranks."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from conftest import describe
from fedmpi import schedule
from fedmpi.data import footprint, synthetic
from fedmpi.errors import UserError
from fedmpi.results import read_run


def naive_synthetic(num_clients, seed, alpha=1.0, beta=1.0):
    """The recipe written plainly, one client at a time, every test part kept:
    a reference for the in-place filling and the test-set cap."""
    xs, ys, xt, yt, sizes = [], [], [], [], []
    for k in range(num_clients):
        x, y = synthetic.generate_client(synthetic.client_rng(seed, k), alpha, beta)
        n = int(0.8 * len(x))
        xs.append(x[:n]), ys.append(y[:n]), xt.append(x[n:]), yt.append(y[n:]), sizes.append(n)
    return (np.concatenate(xs).astype(np.float32), np.concatenate(ys),
            np.concatenate(xt).astype(np.float32), np.concatenate(yt), np.array(sizes))


def test_default_synthetic_matches_the_plain_recipe_below_the_cap():
    d = synthetic.load_synthetic(40, 3)
    x, y, xt, yt, sizes = naive_synthetic(40, 3)
    assert len(xt) < synthetic.MAX_TEST_SAMPLES
    for got, want in ((d.x_train, x), (d.y_train, y), (d.x_test, xt), (d.y_test, yt),
                      (d.natural_sizes, sizes)):
        np.testing.assert_array_equal(got, want)


def test_test_set_is_capped_at_the_first_clients_held_out_samples():
    d = synthetic.load_synthetic(300, 0)
    x, y, xt, yt, sizes = naive_synthetic(300, 0)
    assert len(xt) > synthetic.MAX_TEST_SAMPLES == len(d.x_test)
    np.testing.assert_array_equal(d.x_test, xt[:synthetic.MAX_TEST_SAMPLES])
    np.testing.assert_array_equal(d.y_test, yt[:synthetic.MAX_TEST_SAMPLES])
    np.testing.assert_array_equal(d.x_train, x)  # training data untouched by the cap
    np.testing.assert_array_equal(d.natural_sizes, sizes)


def test_expected_samples_closed_form_against_monte_carlo():
    rng = np.random.default_rng(12345)
    draws = np.minimum(np.floor(rng.lognormal(4.0, 2.0, 2_000_000)) + 50, 5000)
    se = draws.std() / math.sqrt(len(draws))
    assert abs(synthetic.expected_samples() - draws.mean()) < 5 * se
    assert synthetic.expected_samples(20) == 20.0


def test_mean_samples_sizes_are_two_plus_poisson():
    m, n = 20.0, 200_000
    sizes = synthetic._client_sizes(n, 0, m)
    assert sizes.min() >= 2
    # mean M and variance M - 2 of 2 + Poisson(M - 2), within 5 standard errors
    assert abs(sizes.mean() - m) < 5 * math.sqrt((m - 2) / n)
    assert abs(sizes.var() - (m - 2)) < 5 * (m - 2) * math.sqrt(2 / n)


def test_mean_samples_data_depend_only_on_seed_and_client():
    per = synthetic.block_clients(5)
    small = synthetic.load_synthetic(3, 4, mean_samples=5)
    large = synthetic.load_synthetic(per + 7, 4, mean_samples=5)  # crosses a block boundary
    n = int(small.natural_sizes.sum())
    np.testing.assert_array_equal(large.natural_sizes[:3], small.natural_sizes)
    np.testing.assert_array_equal(large.x_train[:n], small.x_train)
    np.testing.assert_array_equal(large.y_train[:n], small.y_train)
    other = synthetic.load_synthetic(3, 5, mean_samples=5)
    assert not np.array_equal(other.x_train[:10], small.x_train[:10])


def test_mean_samples_clients_have_their_own_teachers():
    d = synthetic.load_synthetic(2000, 0, mean_samples=40)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int32
    assert len(d.x_test) == synthetic.MAX_TEST_SAMPLES
    assert d.natural_sizes.min() >= 1  # int(0.8 n) of n >= 2
    # per-client label distributions far from the global one, as with the default recipe
    client = np.repeat(np.arange(2000), d.natural_sizes)
    h = np.zeros((2000, 10))
    np.add.at(h, (client, d.y_train), 1)
    dist = h / h.sum(axis=1, keepdims=True)
    glob = np.bincount(d.y_train, minlength=10) / len(d.y_train)
    assert 0.5 * np.abs(dist - glob).sum(axis=1).mean() > 0.4


def test_bad_mean_samples():
    with pytest.raises(UserError, match="--synthetic-mean-samples"):
        synthetic.load_synthetic(3, 0, mean_samples=1.5)


# ------------------------------------------------------------------ memory


def test_footprint_estimate_close_to_the_loaded_arrays():
    fp = footprint.estimate("synthetic", num_clients=5000, synthetic_mean_samples=20)
    d = synthetic.load_synthetic(5000, 0, mean_samples=20)
    real = sum(a.nbytes for a in (d.x_train, d.y_train, d.x_test, d.y_test, d.natural_sizes))
    # an upper bound (0.8 E[n] >= E[int(0.8 n)]), within 5%
    assert real <= fp.data_bytes < 1.05 * real
    assert len(d.x_train) <= fp.train_samples < 1.05 * len(d.x_train)
    assert footprint.estimate("mnist", num_clients=10) is None


def test_footprint_check_refuses_with_what_it_needs_and_what_is_free():
    fp = footprint.Footprint("synthetic data for 7 clients", 10**9, 10**6, "use fewer --clients")
    need = footprint.node_need(fp, 3, True)
    assert need == 2 * 10**9 + 3 * 8 * 10**6 + 16 * 10**6
    footprint.check(fp, 3, True, available=need, shm=10**9)  # fits exactly: no error
    with pytest.raises(UserError, match=r"needs about 2\.0 GB .* only 1\.5 GB is available "
                                        r"\(MemAvailable.*use fewer --clients"):
        footprint.check(fp, 3, True, available=int(1.5e9), shm=10**10)
    with pytest.raises(UserError, match=r"/dev/shm has only 0\.07 GB free: enlarge /dev/shm"):
        footprint.check(fp, 3, True, available=10**12, shm=64 * 2**20)


def test_job_too_large_for_memory_is_refused_before_loading(run_fedmpi):
    res = run_fedmpi(["--clients", "100000000", "--synthetic-mean-samples", "20",
                      "--clients-per-round", "10", "--rounds", "1"], timeout=60)
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmpi: error: this job needs about ")
    assert "MemAvailable" in lines[0] and "Traceback" not in res.stderr


# ------------------------------------------------------------ O(K) per round


def test_round_schedule_is_o_of_k_at_a_million_clients():
    """Sampling, drop-outs and the rank assignment of K clients out of N allocate
    O(K) memory: an O(N) step would need >= 8 bytes x 10^12 here."""
    n, k = 10**12, 100
    sizes = np.full(10, 7, np.int64)  # only indexed by the sampled ids (remapped below)
    tracemalloc.start()
    try:
        clients = schedule.sample_clients(n, k, 0, 3)
        kept = clients[~schedule.dropouts(clients, 0.1, 0, 3)]
        plan = schedule.assign(kept, np.broadcast_to(sizes[:1], (n,)), 3)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(clients) == k and len(np.unique(clients)) == k and clients.max() < n
    assert sum(len(p) for p in plan) == len(kept)
    assert peak < 4 * 2**20, f"{peak} bytes traced"
    # and at N = 10^6 the draws are the same kind of sample: ascending distinct ids
    small = schedule.sample_clients(10**6, k, 0, 3)
    assert (np.diff(small) > 0).all() and small.max() < 10**6


# ------------------------------------------------------ many clients, 1 vs 3 ranks


def test_twenty_thousand_clients_bitwise_identical_on_1_and_3_ranks(run_fedmpi, tmp_path,
                                                                     numba_warm):
    args = ["--clients", "20000", "--synthetic-mean-samples", "5", "--clients-per-round", "10",
            "--rounds", "3", "--hidden", "16", "--eval-every", "2"]
    runs = {}
    for ranks in (1, 3):
        out = tmp_path / f"r{ranks}.h5"
        res = run_fedmpi(args + ["--out", str(out)], ranks=ranks)
        assert res.returncode == 0, describe(res)
        runs[ranks] = read_run(str(out))
    a, b = runs[1], runs[3]
    assert a["params"].view(np.uint32).tobytes() == b["params"].view(np.uint32).tobytes()
    for metric in ("test_accuracy", "test_loss", "train_loss", "num_samples"):
        np.testing.assert_array_equal(a["rounds"][metric], b["rounds"][metric])
    assert len(a["partition"]["num_samples"]) == 20000
