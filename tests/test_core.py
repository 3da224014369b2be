"""Pure pieces of the round: sampling, assignment, exact aggregation, config, algorithms."""

import itertools
from fractions import Fraction
import math

import numpy as np
import pytest

from fedmpi import aggregate, schedule
from fedmpi.algorithms import FedAvg, FedSGD
from fedmpi.client import LocalTrainer
from fedmpi.config import Config, from_dict, parse_args
from fedmpi.data import Dataset
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.rng import generator


# ---- schedule -------------------------------------------------------------

def test_sample_clients_is_seeded_sorted_and_without_replacement():
    a = schedule.sample_clients(100, 10, seed=3, round_=7)
    assert np.array_equal(a, schedule.sample_clients(100, 10, seed=3, round_=7))
    assert len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
    assert not np.array_equal(a, schedule.sample_clients(100, 10, seed=3, round_=8))
    assert np.array_equal(schedule.sample_clients(5, 5, seed=0, round_=1), np.arange(5))


@pytest.mark.parametrize("workers", [1, 2, 3, 7])
def test_assign_uses_every_client_once_and_balances_samples(workers):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 1000, size=50)
    clients = np.sort(rng.choice(50, 20, replace=False))
    plan = schedule.assign(clients, sizes, workers)
    assert len(plan) == workers
    assert sorted(np.concatenate(plan).tolist()) == clients.tolist()
    loads = [int(sizes[p].sum()) for p in plan]
    # LPT: no worker exceeds the ideal share by more than the largest client
    assert max(loads) <= sum(loads) / workers + sizes[clients].max()


def test_assign_is_largest_first_to_least_loaded():
    sizes = np.array([10, 9, 8, 1])
    plan = schedule.assign(np.arange(4), sizes, 2)
    assert [p.tolist() for p in plan] == [[0, 3], [1, 2]]


# ---- exact aggregation ------------------------------------------------------

def test_fixed_point_sum_is_independent_of_order_and_accurate():
    rng = np.random.default_rng(1)
    ups = [rng.normal(size=1000).astype(np.float32) * 10.0 ** rng.integers(-4, 1) for _ in range(9)]
    w = rng.random(9)
    w /= w.sum()
    bound = max(float(np.abs(u).max()) for u in ups)
    scale = aggregate.scale_for(bound)
    sums = []
    for perm in itertools.islice(itertools.permutations(range(9)), 0, 40000, 9973):
        acc = np.zeros(1000, np.int64)
        for i in perm:
            aggregate.accumulate(acc, ups[i], w[i], scale)
        sums.append(aggregate.to_float(acc, scale))
    for s in sums[1:]:
        assert np.array_equal(s, sums[0])
    # reference in float64 (itself rounded: allow its few ulps on top of the
    # fixed-point rounding of half a unit per term)
    exact = sum(wi * u.astype(np.float64) for wi, u in zip(w, ups))
    tol = 9 * 0.5 / scale + 16 * np.finfo(np.float64).eps * np.abs(exact).max()
    assert np.max(np.abs(sums[0] - exact)) <= tol
    assert 9 / scale < bound * 2.0 ** -55  # far finer than float32


def test_scale_is_a_power_of_two_with_headroom():
    for bound in (1e-30, 0.3, 1.0, 7.5, 1e30):
        s = aggregate.scale_for(bound)
        assert math.frexp(s)[0] == 0.5
        assert bound * s <= 2.0 ** 61
    assert aggregate.scale_for(0.0) == 1.0
    for bad in (math.inf, math.nan):
        with pytest.raises(FloatingPointError):
            aggregate.scale_for(bad)


def _fraction_sum(ups, w):
    """The exact weighted sum in rationals: float32 values and float64 weights are dyadic."""
    return [sum(Fraction(float(wi)) * Fraction(float(u[j])) for wi, u in zip(w, ups))
            for j in range(len(ups[0]))]


def _check_within_rounding(acc, scales, ups, w, idx):
    """|acc_j - exact_j * scale_j| <= sum_k (1/2 + |w_k u_kj| scale_j 2^-52) for j in idx, exactly:
    each term is rounded once in float64 (u * w * scale) and once to an integer."""
    per = np.repeat(scales, aggregate.BLOCK)
    exact = _fraction_sum(ups, w)
    for j in idx:
        err = abs(Fraction(int(acc[j])) - exact[j] * Fraction(float(per[j])))
        tol = sum(0.5 + abs(float(wi) * float(u[j])) * per[j] * 2.0 ** -52 for wi, u in zip(w, ups))
        assert err <= tol, (j, float(err), tol)


def test_one_outlier_coarsens_only_its_own_block():
    """One coordinate 1e12 times larger than the rest (a diverging or malicious client) sets
    only its block's scale: every other block keeps full precision against an exact rational
    reference, and the encoder counts the coordinates it could not carry with 16 bits."""
    rng = np.random.default_rng(2)
    n = 3 * aggregate.BLOCK + 17
    ups = [rng.normal(size=n).astype(np.float32) * 1e-3 for _ in range(4)]
    ups[2][5] = 1e9  # block 0
    w = np.array([0.1, 0.2, 0.3, 0.4])
    bounds = np.zeros(aggregate.num_blocks(n))
    for u in ups:
        aggregate.block_max_abs(u, bounds)
    assert bounds[0] == 1e9 and bounds[1] < 1e-2
    scales = aggregate.scales_for(bounds, w.sum())
    acc = np.zeros(n, np.int64)
    coarse = sum(aggregate.accumulate(acc, u, wi, scales) for u, wi in zip(ups, w))
    # blocks 1..3: error within the rounding of 4 terms at their own (fine) resolution
    _check_within_rounding(acc, scales, ups, w, range(aggregate.BLOCK, n))
    assert np.all(1 / scales[1:] < 1e-2 * 2.0 ** -55)
    # block 0 lost its small coordinates to the outlier's scale, and that is counted
    assert coarse > 0 and coarse <= 4 * aggregate.BLOCK
    assert aggregate.to_float(acc, scales)[5] == pytest.approx(float(_fraction_sum(ups, w)[5]),
                                                               rel=1e-15)


def test_weights_above_one_do_not_wrap_int64():
    """A fixed DP denominator under Poisson sampling: 25 clients of K = 5 expected give weights
    summing to 5; every term at the bound must still fit, with no int64 wrap-around."""
    n, k = 2000, 25
    ups = [np.full(n, 3.9, np.float32) for _ in range(k)]
    ups[0][:] = -3.9
    w = np.full(k, 1 / 5)
    bounds = np.zeros(aggregate.num_blocks(n))
    for u in ups:
        aggregate.block_max_abs(u, bounds)
    scales = aggregate.scales_for(bounds, w.sum())
    acc = np.zeros(n, np.int64)
    for u, wi in zip(ups, w):
        aggregate.accumulate(acc, u, wi, scales)
    assert np.all(np.abs(acc) < 2 ** 62)
    exact = np.array([float(x) for x in _fraction_sum(ups, w)])
    np.testing.assert_allclose(aggregate.to_float(acc, scales), exact, rtol=1e-15)
    # a scale that assumed weights summing to 1 would wrap the same sum past int64
    assert 3.9 * w.sum() * aggregate.scale_for(3.9, 1.0) > 2 ** 63


def test_sums_split_over_ranks_and_nodes_equal_the_rational_sum():
    """Each 'rank' sums its own clients, the partial int64 sums are added in any grouping (node
    sums, then leaders): the result is the same integers, within rounding of the exact sum."""
    rng = np.random.default_rng(4)
    n = 1500
    ups = [(rng.normal(size=n) * 10.0 ** rng.integers(-6, 2)).astype(np.float32) for _ in range(7)]
    w = rng.random(7)
    w /= w.sum()
    bounds = np.zeros(aggregate.num_blocks(n))
    for u in ups:
        aggregate.block_max_abs(u, bounds)
    scales = aggregate.scales_for(bounds, w.sum())
    totals = []
    for groups in ([[0, 1, 2, 3, 4, 5, 6]], [[0, 3], [1, 4, 6], [2, 5]], [[6], [5], [4, 3, 2, 1, 0]]):
        partial = []
        for g in groups:
            acc = np.zeros(n, np.int64)
            for i in g:
                aggregate.accumulate(acc, ups[i], w[i], scales)
            partial.append(acc)
        totals.append(np.sum(partial[::-1], axis=0))
    for t in totals[1:]:
        np.testing.assert_array_equal(t, totals[0])
    _check_within_rounding(totals[0], scales, ups, w, range(n))


# ---- config -----------------------------------------------------------------

def test_defaults_and_flags():
    cfg = parse_args([])
    assert cfg == Config()
    assert cfg.hidden == (128, 64) and cfg.algorithm == "fedavg"
    cfg = parse_args(["--hidden", "200,200", "--rounds", "3", "--overwrite"])
    assert cfg.hidden == (200, 200) and cfg.rounds == 3 and cfg.overwrite
    assert parse_args(["--hidden", "none"]).hidden == ()


def test_toml_file_and_flag_precedence(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('rounds = 7\nlocal-epochs = 2\nhidden = [32, 16]\nlr = 0.1\n')
    cfg = parse_args(["--config", str(f), "--lr", "0.2"])
    assert (cfg.rounds, cfg.local_epochs, cfg.hidden, cfg.lr) == (7, 2, (32, 16), 0.2)


@pytest.mark.parametrize("values, words", [
    ({"rounds": -1}, "--rounds"),
    ({"clients": 5, "clients_per_round": 6}, "--clients-per-round"),
    ({"hidden": "12,x"}, "--hidden"),
    ({"lr": "abc"}, "--lr"),
    ({"partition": "nope"}, "--partition"),
    ({"dataset": "cifar"}, "--dataset"),
    ({"algorithm": "fedsgd", "momentum": 0.9}, "fedsgd"),
])
def test_bad_values_name_the_setting(values, words):
    with pytest.raises(UserError, match=words):
        from_dict(values)


def test_fedsgd_records_full_batch_single_epoch():
    cfg = from_dict({"algorithm": "fedsgd", "batch_size": 10, "local_epochs": 3})
    assert (cfg.batch_size, cfg.local_epochs) == (0, 1)


# ---- algorithms ---------------------------------------------------------------

def _tiny():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=40).astype(np.int32)
    ds = Dataset("t", x, y, x[:10], y[:10], 3, 1.0)
    model = MLP((6, 8, 3))
    return ds, model


def test_fedsgd_update_equals_one_full_batch_fedavg_step():
    ds, model = _tiny()
    cfg = from_dict({"batch_size": 0, "local_epochs": 1, "lr": 0.1})
    params = model.init(generator(0, "init"))
    idx = np.arange(40)
    trainer = LocalTrainer(cfg, model, ds)
    avg = FedAvg(cfg, model).client_update(trainer, params, idx, generator(0, "shuffle", 1, 0))
    sgd = FedSGD(from_dict({"algorithm": "fedsgd", "lr": 0.1}), model).client_update(
        trainer, params, idx, generator(0, "shuffle", 1, 0))
    np.testing.assert_allclose(avg.update, sgd.update, rtol=1e-4, atol=1e-6)
    assert avg.samples_seen == sgd.samples_seen == 40


def test_server_step_applies_server_lr():
    _, model = _tiny()
    w = np.ones(model.num_params, np.float32)
    d = np.full(model.num_params, 0.5)
    assert np.allclose(FedAvg(from_dict({"server_lr": 2.0}), model).server_step(w, d), 2.0)


def test_max_abs_keeps_non_finite_values():
    assert aggregate.max_abs(np.array([1.0, -3.0, 2.0], np.float32)) == 3.0
    assert aggregate.max_abs(np.zeros(0, np.float32)) == 0.0
    assert aggregate.max_abs(np.array([1.0, np.nan, 2.0], np.float32)) == np.inf
    assert aggregate.max_abs(np.array([np.nan], np.float32)) == np.inf
    assert aggregate.max_abs(np.array([-np.inf, 1.0], np.float32)) == np.inf


def test_accumulate_matches_numpy_rounding():
    rng = np.random.default_rng(5)
    u = rng.normal(size=1001).astype(np.float32)
    acc = np.zeros(1001, np.int64)
    aggregate.accumulate(acc, u, 0.3, 2.0 ** 40)
    assert np.array_equal(acc, np.rint(u.astype(np.float64) * (0.3 * 2.0 ** 40)).astype(np.int64))
