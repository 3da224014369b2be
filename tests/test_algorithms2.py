"""Krum / Multi-Krum, FedNova, stragglers and attacks against independent references.

References are written out here in plain NumPy / Python from the papers:
Blanchard et al. 2017 (Krum), Wang et al. 2020 (FedNova), Li et al. 2020
(FedProx's straggler simulation), never taken from the code under test.
"""

import math

import numpy as np
import pytest

from conftest import SMALL_SYNTHETIC, describe
from fedmpi import schedule
from fedmpi.algorithms import FedAvg, FedNova, robust
from fedmpi.algorithms.fednova import nova_weights, step_weight_norm
from fedmpi.attacks import Attack, choose_attackers
from fedmpi.client import LocalTrainer
from fedmpi.config import from_dict, warnings
from fedmpi.data import Dataset, load_dataset
from fedmpi.data.partition import make_partition
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.pipeline import ClientContext
from fedmpi.results import read_run
from fedmpi.rng import generator

# ---- Krum / Multi-Krum (Blanchard et al., NeurIPS 2017) -------------------------


def test_krum_picks_the_centre_of_the_honest_cluster():
    # honest: the centre (0,0) and its four unit neighbours; two attackers far away.
    # n = 7, f = 2: each score sums the n - f - 2 = 3 nearest squared distances.
    # centre: 1+1+1 = 3; (1,0): 1 (centre) + 2 + 2 = 5, likewise the others; attackers: huge.
    pts = np.array([[1, 0], [0, 1], [100, 100], [0, 0], [-1, 0], [101, 100], [0, -1]],
                   np.float32)
    np.testing.assert_array_equal(robust.krum_scores(pts, 2)[[0, 1, 3, 4, 6]], [5, 5, 3, 5, 5])
    np.testing.assert_array_equal(robust.krum(pts, 2), [0, 0])
    # Multi-Krum with m = n - f = 5 averages exactly the five honest points
    np.testing.assert_array_equal(robust.multikrum(pts, 2), [0, 0])
    assert set(robust.krum_select(pts, 2, 5).tolist()) == {0, 1, 3, 4, 6}


def _brute_force_krum(u, f):
    """Scores by explicit loops over pairs, in float64 (the paper's definition)."""
    n = len(u)
    scores = []
    for i in range(n):
        d = sorted(float(np.sum((u[i].astype(np.float64) - u[j].astype(np.float64)) ** 2))
                   for j in range(n) if j != i)
        scores.append(sum(d[:n - f - 2]))
    return np.array(scores)


@pytest.mark.parametrize("n, f", [(7, 2), (10, 3), (12, 1)])
def test_krum_and_multikrum_against_brute_force(n, f):
    u = np.random.default_rng(n).normal(size=(n, 33)).astype(np.float32)
    u[:f] += 3.0  # some outliers
    ref = _brute_force_krum(u, f)
    np.testing.assert_allclose(robust.krum_scores(u, f), ref, rtol=1e-12)
    best = int(np.argmin(ref))
    np.testing.assert_array_equal(robust.krum(u, f), u[best].astype(np.float64))
    for m in (1, 3, n - f):
        chosen = sorted(range(n), key=lambda i: ref[i])[:m]
        np.testing.assert_allclose(robust.multikrum(u, f, m),
                                   u[chosen].astype(np.float64).mean(axis=0), rtol=1e-12)


def test_krum_needs_more_than_2f_plus_2_clients():
    with pytest.raises(ValueError):
        robust.krum(np.zeros((6, 3), np.float32), 2)
    with pytest.raises(UserError, match="2f \\+ 2"):
        from_dict({"aggregator": "krum", "byzantine": 4, "clients_per_round": 10})
    from_dict({"aggregator": "krum", "byzantine": 3, "clients_per_round": 9})
    with pytest.raises(UserError, match="--byzantine"):
        from_dict({"byzantine": 1})
    with pytest.raises(UserError, match="multikrum-m"):
        from_dict({"aggregator": "multikrum", "byzantine": 2, "multikrum_m": 9})
    cfg = from_dict({"aggregator": "krum", "byzantine": 2, "sampling": "poisson"})
    assert any("keeps the model unchanged" in w for w in warnings(cfg))


def test_a_krum_round_with_too_few_reports_keeps_the_model():
    cfg = from_dict({"aggregator": "krum", "byzantine": 2, "clients_per_round": 7})
    algo = FedAvg(cfg, MLP((3, 2)))
    np.testing.assert_array_equal(algo.combine(np.ones((6, 8), np.float32)), np.zeros(8))
    np.testing.assert_array_equal(algo.combine(np.ones((7, 8), np.float32)), np.ones(8))


# ---- FedNova (Wang et al., NeurIPS 2020) ----------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("tau", [1, 2, 7])
def test_step_weight_norm_is_the_l1_norm_of_heavy_ball_weights(rho, tau):
    # heavy ball v <- rho v + g_k, x <- x - lr v from v = 0 with arbitrary gradients:
    # x_tau - x_0 = -lr sum_k a_k g_k; recover a_k column by column with unit gradients
    lr = 0.1
    a = []
    for k in range(tau):
        x, v = 0.0, 0.0
        for t in range(tau):
            v = rho * v + (1.0 if t == k else 0.0)
            x -= lr * v
        a.append(-x / lr)
    assert step_weight_norm(tau, rho) == pytest.approx(sum(a), rel=1e-12)
    if rho == 0:
        assert step_weight_norm(tau, rho) == tau


def test_nova_weights_against_the_formula():
    p = np.array([0.5, 0.3, 0.2])
    a = np.array([10.0, 3.0, 1.0])
    tau_eff = 0.5 * 10 + 0.3 * 3 + 0.2 * 1
    np.testing.assert_allclose(nova_weights(p, a), [0.5 * tau_eff / 10, 0.3 * tau_eff / 3,
                                                    0.2 * tau_eff / 1], rtol=1e-15)
    # equal work: FedNova is FedAvg
    np.testing.assert_allclose(nova_weights(p, np.full(3, 4.0)), p, rtol=1e-15)


def _trainer(**cfg):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype(np.float32)
    y = rng.integers(0, 3, size=60).astype(np.int32)
    ds = Dataset("t", x, y, x[:10], y[:10], 3, 1.0)
    model = MLP((6, 8, 3))
    c = from_dict({"batch_size": 4, "lr": 0.1, **cfg})
    return c, model, ds, LocalTrainer(c, model, ds), model.init(generator(0, "init"))


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_fednova_one_round_against_numpy(momentum):
    """Three clients of 5, 13 and 30 samples, one a straggler: the server step equals
    w + tau_eff sum_i p_i Delta_i / ||a_i||_1, computed here with closed forms."""
    cfg, model, ds, tr, w0 = _trainer(algorithm="fednova", local_epochs=3, momentum=momentum)
    shards = [np.arange(0, 5), np.arange(5, 18), np.arange(18, 48)]
    work = [{}, {"epochs": 1}, {}]
    nova, avg = FedNova(cfg, model), FedAvg(cfg, model)
    deltas, taus = [], []
    for i, (idx, wk) in enumerate(zip(shards, work)):
        res = nova.client_update(tr, w0, idx, generator(0, "shuffle", 1, i), **wk)
        plain = avg.client_update(tr, w0, idx, generator(0, "shuffle", 1, i), **wk).update
        np.testing.assert_array_equal(res.update, plain)  # FedNova trains as FedAvg does
        deltas.append(plain.astype(np.float64))
        taus.append(wk.get("epochs", 3) * math.ceil(len(idx) / 4))
        assert res.steps == taus[-1]
    n = np.array([len(s) for s in shards], np.float64)
    p = n / n.sum()
    rho = momentum
    norms = [t if rho == 0 else (t - rho * (1 - rho ** t) / (1 - rho)) / (1 - rho) for t in taus]
    tau_eff = sum(pi * ai for pi, ai in zip(p, norms))
    expected = w0 + tau_eff * sum(pi * d / ai for pi, d, ai in zip(p, deltas, norms))
    # what the runtime does: weights from the algorithm, exact weighted sum, server step
    from fedmpi import aggregate
    weights = nova.round_weights(p, n.astype(np.int64), work)
    bounds = np.zeros(aggregate.num_blocks(model.num_params))
    for d in deltas:
        aggregate.block_max_abs(d.astype(np.float32), bounds)
    scales = aggregate.scales_for(bounds, float(np.abs(weights).sum()))
    acc = np.zeros(model.num_params, np.int64)
    for d, wt in zip(deltas, weights):
        aggregate.accumulate(acc, d.astype(np.float32), wt, scales)
    got = nova.server_step(w0, aggregate.to_float(acc, scales))
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)
    assert float(np.abs(weights).sum()) != pytest.approx(1.0)  # the case the encoder must handle


def test_fednova_rejects_what_it_cannot_normalise():
    for bad in ({"optimizer": "adam"}, {"aggregator": "median"},
                {"dp_clip": 1.0, "dp_noise_multiplier": 1.0}):
        with pytest.raises(UserError, match="fednova"):
            from_dict({"algorithm": "fednova", **bad})


# ---- stragglers (FedProx paper's system heterogeneity) ---------------------------


def test_straggler_count_and_epochs_follow_the_fedprox_code():
    clients = np.arange(3, 13)
    for rnd in range(1, 30):
        slow = schedule.stragglers(clients, 0.9, 7, rnd)
        assert slow.sum() == 10 - round(10 * 0.1) == 9  # exact, as np.random.choice in their code
    draws = [schedule.straggler_work(c, 40, 5, 10, 7, rnd)["epochs"]
             for rnd in range(1, 60) for c in range(10)]
    assert set(draws) == {1, 2, 3, 4}  # U{1..E-1}: randint(low=1, high=E)
    assert schedule.stragglers(clients, 0.0, 7, 1).sum() == 0
    assert schedule.stragglers(clients, 1.0, 7, 1).all()


def test_straggler_work_is_seeded_per_round_and_client():
    a = [schedule.straggler_work(c, 40, 20, 10, 3, 5) for c in range(20)]
    assert a == [schedule.straggler_work(c, 40, 20, 10, 3, 5) for c in range(20)]
    assert a != [schedule.straggler_work(c, 40, 20, 10, 3, 6) for c in range(20)]
    assert a != [schedule.straggler_work(c, 40, 20, 10, 4, 5) for c in range(20)]
    # a client's straggler status does not depend on where it sits in the round's list
    full = np.arange(20)
    mask = schedule.stragglers(full, 0.5, 3, 5)
    assert np.array_equal(schedule.stragglers(full[::-1].copy(), 0.5, 3, 5), mask[::-1])


def test_straggler_with_one_epoch_cuts_minibatch_steps():
    # E = 1, 40 samples, B = 10: S = 4 steps, a straggler does U{1..3}
    steps = {schedule.straggler_work(c, 40, 1, 10, 0, r)["steps"]
             for r in range(1, 20) for c in range(10)}
    assert steps == {1, 2, 3}
    assert schedule.straggler_work(0, 8, 1, 10, 0, 1) == {}  # one step per epoch: cannot cut
    cfg, model, ds, tr, w0 = _trainer(local_epochs=1, batch_size=4)
    w = w0.copy()
    loss, seen, taken = tr.train(w, np.arange(20), generator(0, "shuffle", 1, 0), steps=2)
    assert (seen, taken) == (8, 2)


def test_trainer_epoch_override_equals_a_config_with_those_epochs():
    _, _, _, tr2, w0 = _trainer(local_epochs=2)
    _, _, _, tr5, _ = _trainer(local_epochs=5)
    a, b = w0.copy(), w0.copy()
    ra = tr5.train(a, np.arange(30), generator(0, "shuffle", 1, 0), epochs=2)
    rb = tr2.train(b, np.arange(30), generator(0, "shuffle", 1, 0))
    assert ra == rb and np.array_equal(a, b)


# ---- attacks ---------------------------------------------------------------------


def test_attackers_are_a_seeded_fixed_fraction():
    a = choose_attackers(100, 0.2, 5)
    assert len(a) == 20 and np.array_equal(a, np.unique(a))
    assert np.array_equal(a, choose_attackers(100, 0.2, 5))
    assert not np.array_equal(a, choose_attackers(100, 0.2, 6))


def _attack(kind, scale=3.0):
    cfg = from_dict({"attack": kind, "attackers": 0.3, "attack_scale": scale, "clients": 10,
                     "aggregator": "median"})
    return Attack(cfg)


def test_signflip_and_gaussian_stages():
    st = _attack("signflip")
    bad, good = int(st.ids[0]), next(c for c in range(10) if c not in st.ids)
    u = np.random.default_rng(0).normal(size=50).astype(np.float32)
    for c, expected in ((bad, -3.0 * u), (good, u)):
        x = u.copy()
        ctx = ClientContext(1, c, 0, {})
        st.client(x, ctx)
        np.testing.assert_array_equal(x, expected.astype(np.float32))
        assert ctx.metrics["attacker"] == float(c == bad)
    st = _attack("gaussian", scale=2.0)
    x = np.zeros(20000, np.float32)
    st.client(x, ClientContext(4, bad, 0, {}))
    assert abs(x.std() - 2.0) < 0.05 and abs(x.mean()) < 0.05
    y = np.zeros(20000, np.float32)
    st.client(y, ClientContext(5, bad, 0, {}))
    assert not np.array_equal(x, y)  # fresh noise per round


def test_labelflip_trains_on_c_minus_1_minus_y():
    st = _attack("labelflip")
    bad = int(st.ids[0])
    assert st.local_work(1, bad) == {"flip_labels": True}
    assert st.local_work(1, next(c for c in range(10) if c not in st.ids)) == {}
    cfg, model, ds, tr, w0 = _trainer()
    flipped = Dataset("t", ds.x_train, (2 - ds.y_train).astype(np.int32), ds.x_test, ds.y_test,
                      3, 1.0)
    ref = LocalTrainer(cfg, model, flipped)
    a, b = w0.copy(), w0.copy()
    tr.train(a, np.arange(40), generator(0, "shuffle", 1, 0), flip_labels=True)
    ref.train(b, np.arange(40), generator(0, "shuffle", 1, 0))
    assert np.array_equal(a, b)
    assert np.array_equal(tr.labels(False), ds.y_train)  # the shared labels are untouched


def test_attack_settings():
    with pytest.raises(UserError, match="--attack"):
        from_dict({"attackers": 0.2})
    with pytest.raises(UserError, match="--attackers"):
        from_dict({"attack": "signflip"})
    cfg = from_dict({"attack": "signflip", "attackers": 0.2})
    assert any("undefended baseline" in w for w in warnings(cfg))


# ---- whole runs ------------------------------------------------------------------

KRUM = SMALL_SYNTHETIC + ["--clients-per-round", "8", "--aggregator", "krum", "--byzantine",
                          "2", "--attack", "signflip", "--attackers", "0.25"]
NOVA = SMALL_SYNTHETIC + ["--algorithm", "fednova", "--local-epochs", "3", "--stragglers",
                          "0.6", "--momentum", "0.5"]


def _bits(a):
    return np.asarray(a).view(np.uint32)


@pytest.mark.parametrize("args", [KRUM, NOVA], ids=["krum-signflip", "fednova-stragglers"])
def test_bitwise_identical_at_1_and_3_ranks(run_fedmpi, tmp_path, numba_warm, args):
    runs = []
    for ranks in (1, 3):
        out = tmp_path / f"{ranks}.h5"
        res = run_fedmpi(args + ["--out", str(out)], ranks=ranks)
        assert res.returncode == 0, describe(res)
        runs.append(read_run(str(out)))
    a, b = runs
    np.testing.assert_array_equal(_bits(a["params"]), _bits(b["params"]))
    for col in ("test_loss", "train_loss", "num_clients"):
        np.testing.assert_array_equal(a["rounds"][col], b["rounds"][col])
    oa = np.lexsort((a["clients"]["client_id"], a["clients"]["round"]))
    ob = np.lexsort((b["clients"]["client_id"], b["clients"]["round"]))
    for col in set(a["clients"]) - {"rank", "seconds"}:
        np.testing.assert_array_equal(a["clients"][col][oa], b["clients"][col][ob], err_msg=col)


def test_krum_run_records_fixed_attackers(run_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "k.h5"
    res = run_fedmpi(KRUM + ["--out", str(out)])
    assert res.returncode == 0, describe(res)
    assert "3 of 12 clients are malicious" in res.stdout
    run = read_run(str(out))
    ids = choose_attackers(12, 0.25, 0)
    np.testing.assert_array_equal(run["clients"]["attacker"],
                                  np.isin(run["clients"]["client_id"], ids).astype(float))


def test_fednova_run_matches_a_numpy_round(run_fedmpi, tmp_path, numba_warm):
    """One whole round of `python -m fedmpi --algorithm fednova --stragglers`, recomputed here:
    clients trained one by one, then w + tau_eff sum_i p_i Delta_i / ||a_i||_1."""
    out = tmp_path / "n.h5"
    args = NOVA + ["--rounds", "1"]
    res = run_fedmpi(args + ["--out", str(out)])
    assert res.returncode == 0, describe(res)
    run = read_run(str(out))
    cfg = from_dict({"clients": 12, "clients_per_round": 5, "rounds": 1, "hidden": "16",
                     "algorithm": "fednova", "local_epochs": 3, "stragglers": 0.6,
                     "momentum": 0.5})
    data = load_dataset("synthetic", data_dir=None, seed=0, num_clients=12)
    part = make_partition("natural", data.y_train, 12, seed=0, alpha=0.5, shards_per_client=2,
                          natural_sizes=data.natural_sizes)
    model = MLP((data.num_features, 16, data.num_classes))
    w0 = model.init(generator(0, "init"), cfg.init)
    tr, avg = LocalTrainer(cfg, model, data), FedAvg(cfg, model)
    clients = run["clients"]["client_id"]
    assert len(clients) == 5
    slow = run["clients"]["straggler"].astype(bool)
    assert slow.sum() == 5 - round(5 * 0.4)
    n = part.sizes[clients].astype(np.float64)
    p, total = n / n.sum(), np.zeros(model.num_params)
    norms, deltas, taus = [], [], []
    for c, s in zip(clients.tolist(), slow.tolist()):
        wk = schedule.straggler_work(c, int(part.sizes[c]), 3, 10, 0, 1) if s else {}
        r = avg.client_update(tr, w0, part.indices(c), generator(0, "shuffle", 1, c), **wk)
        tau = wk.get("epochs", 3) * math.ceil(part.sizes[c] / 10)
        taus.append(tau)
        norms.append((tau - 0.5 * (1 - 0.5 ** tau) / 0.5) / 0.5)
        deltas.append(r.update.astype(np.float64).copy())
    np.testing.assert_array_equal(run["clients"]["local_steps"], taus)
    tau_eff = float(np.dot(p, norms))
    for pi, d, a in zip(p, deltas, norms):
        total += pi * d / a
    expected = (w0.astype(np.float64) + tau_eff * total).astype(np.float32)
    np.testing.assert_allclose(run["params"], expected, rtol=1e-6, atol=1e-7)


def test_drop_stragglers_discards_their_work(run_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "d.h5"
    res = run_fedmpi(SMALL_SYNTHETIC + ["--local-epochs", "2", "--stragglers", "0.6",
                                        "--drop-stragglers", "--out", str(out)])
    assert res.returncode == 0, describe(res)
    run = read_run(str(out))
    assert (run["rounds"]["num_sampled"] == 5).all()
    assert (run["rounds"]["num_clients"] == 5 - (5 - round(5 * 0.4))).all()
    assert (run["clients"]["straggler"] == 0).all()
