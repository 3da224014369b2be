"""SCAFFOLD (Karimireddy et al. 2020, option II) against a float64 NumPy re-computation.

The reference below trains each client with the kernels tests' independent
float64 MLP (tests/test_kernels.py: ref_train, which adds a gradient
correction per step) and applies Algorithm 1's formulas written out here:
y <- y - lr (g(y) - c_i + c); c_i+ = c_i - c + (x - y_i)/(K lr);
x <- x + sum_i p_i (y_i - x); c <- c + (1/N) sum_i (c_i+ - c_i).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SMALL_SYNTHETIC, describe
from fedmpi import aggregate, schedule
from fedmpi.algorithms import FedAvg, Scaffold
from fedmpi.client import LocalTrainer
from fedmpi.config import from_dict, validate
from fedmpi.data import load_dataset
from fedmpi.data.partition import make_partition
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.results import read_checkpoint, read_run
from fedmpi.rng import generator
from test_kernels import ref_train

# 6 clients, 4 a round: clients come back with their control variates in later rounds
ARGS = SMALL_SYNTHETIC[:] + ["--algorithm", "scaffold", "--local-epochs", "2"]
ARGS[ARGS.index("--clients") + 1] = "6"
ARGS[ARGS.index("--clients-per-round") + 1] = "4"
SETTINGS = {"clients": 6, "clients_per_round": 4, "hidden": "16", "algorithm": "scaffold",
            "local_epochs": 2}


def _reference(rounds: int, cfg):
    """(x, c, {client: c_i}) after `rounds` rounds, all in float64."""
    data = load_dataset("synthetic", data_dir=None, seed=cfg.seed, num_clients=cfg.clients)
    part = make_partition("natural", data.y_train, cfg.clients, seed=cfg.seed, alpha=0.5,
                          shards_per_client=2, natural_sizes=data.natural_sizes)
    model = MLP((data.num_features, 16, data.num_classes))
    x = model.init(generator(cfg.seed, "init"), cfg.init).astype(np.float64)
    c = np.zeros_like(x)
    ci: dict[int, np.ndarray] = {}
    for rnd in range(1, rounds + 1):
        clients = schedule.sample_clients(cfg.clients, cfg.clients_per_round, cfg.seed, rnd)
        n = part.sizes[clients].astype(np.float64)
        p = n / n.sum()
        dx, dc = np.zeros_like(x), np.zeros_like(x)
        for pk, k in zip(p, clients.tolist()):
            idx = part.indices(k)
            rng = generator(cfg.seed, "shuffle", rnd, k)  # the client's epochs, as LocalTrainer
            order = np.concatenate([idx[rng.permutation(idx.size)]
                                    for _ in range(cfg.local_epochs)])
            c_old = ci.get(k, np.zeros_like(x))
            y, _, steps = ref_train(model, x, data.x_train, data.x_scale, data.y_train, order,
                                    cfg.local_epochs, cfg.batch_size, 0, 0, cfg.lr,
                                    correction=c - c_old)
            c_new = c_old - c + (x - y) / (steps * cfg.lr)
            dx += pk * (y - x)
            dc += c_new - c_old
            ci[k] = c_new
        x = x + dx
        c = c + dc / cfg.clients
    return x, c, ci


def test_client_update_is_option_ii():
    """One client, nonzero c and c_i: the kernels' corrected steps and c_i+ against NumPy."""
    rng = np.random.default_rng(0)
    xs = rng.integers(0, 256, size=(40, 6)).astype(np.uint8)
    ys = rng.integers(0, 3, size=40).astype(np.int32)
    from fedmpi.data import Dataset
    ds = Dataset("t", xs, ys, xs[:8], ys[:8], 3, 1 / 255)
    model = MLP((6, 8, 3))
    cfg = from_dict({"batch_size": 4, "lr": 0.1, "local_epochs": 2, "algorithm": "scaffold",
                     "clients": 10})
    tr = LocalTrainer(cfg, model, ds)
    w = model.init(generator(0, "init"))
    algo = Scaffold(cfg, model)
    algo.c[:] = rng.normal(0, 0.05, model.num_params)
    c_i = rng.normal(0, 0.05, model.num_params).astype(np.float32)
    c_i_before = c_i.astype(np.float64)
    idx = np.arange(3, 33)
    res = algo.client_update(tr, w, idx, generator(0, "shuffle", 1, 7), state=c_i)
    assert res.update.size == algo.wire_size and res.steps == 2 * 8
    r = generator(0, "shuffle", 1, 7)
    order = np.concatenate([idx[r.permutation(30)] for _ in range(2)])
    y, _, steps = ref_train(model, w, xs, np.float32(1 / 255), ys, order, 2, 4, 0, 0, 0.1,
                            correction=algo.c.astype(np.float64) - c_i_before)
    P = model.num_params
    np.testing.assert_allclose(res.update[:P], y - w, rtol=1e-4, atol=1e-6)
    want_c = c_i_before - algo.c + (w - y) / (steps * 0.1)
    np.testing.assert_allclose(c_i, want_c, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(res.update[algo.side_offset:], want_c - c_i_before,
                               rtol=1e-3, atol=1e-5)
    assert not res.update[P:algo.side_offset].any()  # the padding carries nothing


def test_one_exact_sum_weights_model_by_p_and_control_by_one_over_n():
    cfg = from_dict({"algorithm": "scaffold", "clients": 50})
    model = MLP((300, 7, 3))  # 2,131 parameters: the model part ends mid-block
    algo = Scaffold(cfg, model)
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(3, algo.wire_size)).astype(np.float32)
    p = np.array([0.2, 0.3, 0.5])
    w = algo.round_weights(p, np.array([2, 3, 5]), [{}] * 3)
    bounds = np.zeros(aggregate.num_blocks(algo.wire_size))
    for r in rows:
        aggregate.block_max_abs(r, bounds)
    scales = aggregate.scales_for(bounds, float(np.abs(w).sum(axis=0).max()))
    acc = np.zeros(algo.wire_size, np.int64)
    for r, wk in zip(rows, w):
        aggregate.accumulate(acc, r, wk, scales)
    model_part, side = algo.split(aggregate.to_float(acc, scales))
    P = model.num_params
    np.testing.assert_allclose(model_part, p @ rows[:, :P].astype(np.float64), atol=1e-12)
    np.testing.assert_allclose(side, rows[:, algo.side_offset:].astype(np.float64).sum(0) / 50,
                               atol=1e-12)


def test_a_run_follows_algorithm_1(run_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "s.h5"
    res = run_fedmpi(ARGS + ["--out", str(out)])
    assert res.returncode == 0, describe(res)
    assert "SCAFFOLD (option II): control variates" in res.stdout
    cfg = from_dict(SETTINGS)
    x, c, ci = _reference(3, cfg)
    run = read_run(str(out))
    np.testing.assert_allclose(run["params"], x, rtol=1e-4, atol=2e-5)
    _, done, arrays = read_checkpoint(str(out))
    assert done == 3
    np.testing.assert_allclose(arrays["scaffold_c"], c, rtol=1e-3, atol=1e-4)
    ids = arrays["scaffold_c_ids"]
    assert sorted(ids.tolist()) == sorted(ci)  # only clients that trained hold a row
    for k, row in zip(ids.tolist(), arrays["scaffold_c_rows"]):
        np.testing.assert_allclose(row, ci[k], rtol=1e-3, atol=1e-4)
    # Delta y and Delta c go up, x and c come down: 2P float32 each way per client
    P = run["params"].size
    np.testing.assert_array_equal(run["rounds"]["bytes_up"], 4 * 2 * P * 4)
    np.testing.assert_array_equal(run["rounds"]["bytes_down"], 4 * 2 * P * 4)


def _state(path):
    run = read_run(str(path))
    _, done, arrays = read_checkpoint(str(path))
    order = np.argsort(arrays["scaffold_c_ids"])
    return (run["params"].view(np.uint32), arrays["scaffold_c"].view(np.uint32),
            arrays["scaffold_c_ids"][order], arrays["scaffold_c_rows"][order].view(np.uint32),
            run["rounds"]["test_loss"])


def test_control_variates_follow_clients_bitwise_at_1_3_8_ranks(run_fedmpi, tmp_path,
                                                                numba_warm):
    got = []
    for ranks in (1, 3, 8):
        out = tmp_path / f"{ranks}.h5"
        res = run_fedmpi(ARGS + ["--out", str(out)], ranks=ranks, timeout=300)
        assert res.returncode == 0, describe(res)
        got.append(_state(out))
    for other in got[1:]:
        for a, b in zip(got[0], other):
            np.testing.assert_array_equal(a, b)


def test_resume_mid_run_on_other_rank_counts_is_bitwise(run_fedmpi, tmp_path, numba_warm):
    """2 rounds on one process, resumed to 5 on 3 ranks, equals 5 rounds on 3 ranks; the
    control variates spill to disk in the resumed part (where they live changes nothing)."""
    five = ARGS + ["--rounds", "5"]
    straight, cut = tmp_path / "straight.h5", tmp_path / "cut.h5"
    res = run_fedmpi(five + ["--out", str(straight)], ranks=3)
    assert res.returncode == 0, describe(res)
    res = run_fedmpi(ARGS + ["--rounds", "2", "--out", str(cut)])
    assert res.returncode == 0, describe(res)
    spill = tmp_path / "spill"
    spill.mkdir()
    res = run_fedmpi(five + ["--resume", str(cut), "--client-state-dir", str(spill)], ranks=3)
    assert res.returncode == 0, describe(res)
    assert "resuming" in res.stdout
    for a, b in zip(_state(straight), _state(cut)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("bad", [
    {"dp_clip": 1.0, "dp_noise_multiplier": 1.0}, {"secure_aggregation": "secagg"},
    {"compress": "topk"}, {"aggregator": "median"}, {"momentum": 0.9}, {"optimizer": "adam"}])
def test_refused_combinations(bad):
    with pytest.raises(UserError, match="--algorithm scaffold"):
        validate(from_dict({**SETTINGS, **bad}))


def test_refusal_is_one_line_and_exit_2(run_fedmpi):
    res = run_fedmpi(ARGS + ["--dp-clip", "1", "--dp-noise-multiplier", "1"], ranks=3)
    assert res.returncode == 2, describe(res)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "control-variate" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_fedavg_sends_p_values_and_nothing_else():
    cfg = from_dict({})
    model = MLP((5, 4, 2))
    a = FedAvg(cfg, model)
    assert a.wire_size == a.values_sent == model.num_params and a.downlink == []


def test_checkpoint_round_trip_and_damaged_rows():
    cfg = from_dict({"algorithm": "scaffold", "clients": 9, "clients_per_round": 3})
    model = MLP((5, 4, 2))
    a = Scaffold(cfg, model)
    a.c[:] = 0.5
    a.store.put(7, np.full(model.num_params, 2.0, np.float32))
    saved = {k: np.array(v) for k, v in a.server_state().items()}
    b = Scaffold(cfg, model)
    b.load_server_state(saved)
    np.testing.assert_array_equal(b.c, a.c)
    np.testing.assert_array_equal(b.store.get(7), a.store.get(7))
    saved["scaffold_c_rows"] = saved["scaffold_c_rows"][:, :-1]
    with pytest.raises(UserError, match="malformed.*SCAFFOLD"):
        Scaffold(cfg, model).load_server_state(saved)
