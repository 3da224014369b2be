"""Differential privacy: clipping, noise, accounting, sampling, and whole DP runs.

References are independent of the code under test: closed forms for the
Gaussian mechanism (Balle & Wang, ICML 2018), the integer-order RDP of the
Poisson-subsampled Gaussian (Mironov, Talwar & Zhang 2019) and the figure
Abadi et al. (CCS 2016) published for their moments accountant.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import gammaln, logsumexp
from scipy.stats import norm

from conftest import SMALL_SYNTHETIC, describe, requires_mpiexec
from fedmpi import schedule
from fedmpi.config import from_dict, warnings
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.privacy.accounting import Accountant, solve_noise_multiplier
from fedmpi.privacy.dp import clip, layer_segments, update_noise_multiplier
from fedmpi.results import read_run

# ------------------------------------------------------------------ clipping


def test_clipping_bounds_the_norm_and_keeps_the_direction():
    rng = np.random.default_rng(0)
    for scale in (1e-3, 0.5, 1.0, 3.0, 1e4):
        u = (rng.normal(size=5000) * scale / 70).astype(np.float32)
        before = u.astype(np.float64)
        n0, clipped = clip(u, 1.0)
        assert n0 == pytest.approx(np.linalg.norm(before), rel=1e-12)
        after = u.astype(np.float64)
        assert np.linalg.norm(after) <= 1.0 * (1 + 1e-6)
        assert clipped == (n0 > 1.0)
        if clipped:
            assert np.linalg.norm(after) == pytest.approx(1.0, rel=1e-6)
            cos = after @ before / (np.linalg.norm(after) * np.linalg.norm(before))
            assert cos == pytest.approx(1.0, abs=1e-9)
        else:
            np.testing.assert_array_equal(after, before)


def test_per_layer_clipping_splits_the_bound_by_layer_size():
    model = MLP((30, 20, 5))
    segs = layer_segments(model)
    assert segs == [(0, 620), (620, 725)] and segs[-1][1] == model.num_params
    rng = np.random.default_rng(1)
    u = rng.normal(size=model.num_params).astype(np.float32)
    u[620:] *= 100  # the last layer is far over its share, the first one too
    S = 2.0
    clip(u, S, segs)
    total = 0.0
    for start, stop in segs:
        n = np.linalg.norm(u[start:stop].astype(np.float64))
        assert n <= S * math.sqrt((stop - start) / model.num_params) * (1 + 1e-6)
        total += n * n
    assert math.sqrt(total) <= S * (1 + 1e-6)


# ---------------------------------------------------------------- accounting


def _analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon of a Gaussian mechanism with mu = sensitivity / sigma (Balle & Wang 2018, Thm 8)."""
    def delta_of(eps):
        return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if delta_of(mid) <= delta else (mid, hi)
    return hi


@pytest.mark.parametrize("z,rounds", [(1.0, 1), (1.1, 30), (4.0, 200)])
def test_unsampled_gaussian_matches_closed_forms(z, rounds):
    """q = 1: T rounds of noise z compose to one Gaussian with mu = sqrt(T)/z (exact), and RDP
    is alpha/(2 z^2) per round, whose classic conversion bounds the accountant's from above."""
    delta = 1e-5
    exact = _analytic_gaussian_epsilon(math.sqrt(rounds) / z, delta)
    pld = Accountant("pld", "poisson", 100, 100, z, delta).epsilon(rounds)
    rdp = Accountant("rdp", "poisson", 100, 100, z, delta).epsilon(rounds)
    assert pld == pytest.approx(exact, rel=2e-3)  # pessimistic discretisation: a hair above
    assert pld >= exact * (1 - 1e-6)
    classic = min(rounds * a / (2 * z * z) + math.log(1 / delta) / (a - 1)
                  for a in np.linspace(1.01, 200, 20000))
    assert exact <= rdp <= classic * (1 + 1e-9)


def _rdp_poisson_integer(q: float, z: float, alpha: int) -> float:
    """RDP of the Poisson-subsampled Gaussian at integer order alpha (Mironov et al. 2019, Sec. 3.3)."""
    k = np.arange(alpha + 1)
    log_binom = gammaln(alpha + 1) - gammaln(k + 1) - gammaln(alpha - k + 1)
    terms = log_binom + (alpha - k) * math.log1p(-q) + k * math.log(q) + (k * k - k) / (2 * z * z)
    return float(logsumexp(terms)) / (alpha - 1)


def test_sampled_gaussian_reproduces_abadi_et_al():
    """Abadi et al. 2016, Sec. 3.1: q = 0.01, sigma = 4, delta = 1e-5, 10,000 steps give
    epsilon ~ 1.26 with the moments accountant (integer orders <= 32, classic conversion).
    Our independent RDP reproduces that figure; the accountants (finer orders, better
    conversion; PLD tighter still) may only be below it, and not by much."""
    q, z, T, delta = 0.01, 4.0, 10_000, 1e-5
    moments = min(T * _rdp_poisson_integer(q, z, a) + math.log(1 / delta) / (a - 1)
                  for a in range(2, 33))
    assert moments == pytest.approx(1.26, abs=0.005)
    rdp = Accountant("rdp", "poisson", 10_000, 100, z, delta).epsilon(T)
    pld = Accountant("pld", "poisson", 10_000, 100, z, delta).epsilon(T)
    assert 0.75 * moments < pld < rdp < moments


def test_fixed_size_sampling_is_not_accounted_as_poisson():
    """Sampling K of N without replacement (replace-one neighbours) costs more than
    Poisson sampling at the same rate: accounting it as Poisson would understate epsilon."""
    fixed = Accountant("rdp", "fixed", 1000, 50, 1.1, 1e-5).epsilon(30)
    poisson = Accountant("rdp", "poisson", 1000, 50, 1.1, 1e-5).epsilon(30)
    assert fixed > 1.2 * poisson
    with pytest.raises(ValueError):
        Accountant("pld", "fixed", 1000, 50, 1.1, 1e-5)


def test_epsilon_grows_with_rounds_and_is_infinite_without_noise():
    acc = Accountant("pld", "poisson", 1000, 50, 1.1, 1e-5)
    eps = [acc.epsilon(r) for r in range(1, 21)]
    assert all(a < b for a, b in zip(eps, eps[1:]))
    assert Accountant("rdp", "fixed", 1000, 50, 0.0, 1e-5).epsilon(3) == math.inf


@pytest.mark.parametrize("kind,sampling", [("rdp", "fixed"), ("pld", "poisson")])
def test_target_epsilon_gives_the_smallest_3_digit_noise_multiplier(kind, sampling):
    kw = dict(kind=kind, sampling=sampling, num_clients=1000, per_round=50, delta=1e-5)
    z = solve_noise_multiplier(4.0, 30, **kw)
    assert float(f"{z:.3g}") == z
    step = 10.0 ** (math.floor(math.log10(z)) - 2)
    assert Accountant(kind, sampling, 1000, 50, z, 1e-5).epsilon(30) <= 4.0
    assert Accountant(kind, sampling, 1000, 50, z - step, 1e-5).epsilon(30) > 4.0
    with pytest.raises(ValueError):
        solve_noise_multiplier(1e-4, 1000, **kw)


def test_adaptive_clipping_noise_split_costs_what_is_accounted():
    """Andrew et al. 2021, Thm 1: update noise z_D and count noise s cost what one Gaussian
    with z^-2 = z_D^-2 + (2s)^-2 costs."""
    z, s = 1.1, 2.5
    zd = update_noise_multiplier(z, s)
    assert zd ** -2 + (2 * s) ** -2 == pytest.approx(z ** -2, rel=1e-12)
    assert update_noise_multiplier(z, 0.0) == z and update_noise_multiplier(0.0, s) == 0.0
    with pytest.raises(ValueError):
        update_noise_multiplier(1.1, 0.5)  # the count alone would cost more than z allows


# ------------------------------------------------------------------ sampling


def test_poisson_inclusion_rate_and_empty_rounds():
    n, k, rounds = 40, 4, 3000
    counts = np.zeros(n)
    sizes = []
    for r in range(1, rounds + 1):
        c = schedule.sample_clients(n, k, 7, r, "poisson")
        assert np.all(np.diff(c) > 0)
        counts[c] += 1
        sizes.append(len(c))
    q = k / n
    # each client: Binomial(rounds, q); 5 sigma over 40 clients
    assert np.all(np.abs(counts / rounds - q) < 5 * math.sqrt(q * (1 - q) / rounds))
    sizes = np.array(sizes)
    assert abs(sizes.mean() - k) < 5 * math.sqrt(n * q * (1 - q) / rounds)
    assert np.mean(sizes == 0) == pytest.approx((1 - q) ** n, abs=0.01)
    assert np.array_equal(schedule.sample_clients(n, k, 7, 1, "fixed"),
                          schedule.sample_clients(n, k, 7, 1, "fixed"))
    assert len(schedule.sample_clients(n, k, 7, 1, "fixed")) == k


def test_dropouts_are_per_client_and_at_the_rate():
    clients = np.arange(2000)
    drop = schedule.dropouts(clients, 0.3, 1, 5)
    assert abs(drop.mean() - 0.3) < 5 * math.sqrt(0.21 / 2000)
    # a client's coin does not depend on who else was sampled
    np.testing.assert_array_equal(schedule.dropouts(clients[::3], 0.3, 1, 5), drop[::3])
    assert not schedule.dropouts(clients, 0.0, 1, 5).any()


# --------------------------------------------------------------------- config


@pytest.mark.parametrize("values,words", [
    ({"dp_clip": 1.0}, "--dp-noise-multiplier"),
    ({"dp_noise_multiplier": 1.0}, "needs --dp-clip"),
    ({"dp_clip": 0.0, "dp_noise_multiplier": 1.0}, "--dp-clip must be"),
    ({"dp_clip": -1.0, "dp_noise_multiplier": 1.0}, "--dp-clip must be"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": -0.5}, "--dp-noise-multiplier must be"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1.0}, "--dp-delta"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 0.0}, "--dp-delta"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_clip_quantile": 1.0}, "--dp-clip-quantile"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "aggregator": "median"}, "--aggregator mean"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "aggregator": "trimmed_mean"}, "--aggregator mean"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_accountant": "pld"}, "--sampling poisson"),
    ({"dp_clip": 1.0, "dp_target_epsilon": 0.0}, "--dp-target-epsilon"),
    ({"dp_noise_at": "clients"}, "needs --dp-clip"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_noise_at": "clients"},
     "needs --secure-aggregation secagg"),
    ({"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_noise_at": "clients",
      "secure_aggregation": "secagg", "sampling": "poisson"}, "needs --secure-aggregation secagg"),
    ({"dropout_rate": 1.0}, "--dropout-rate"),
    ({"sampling": "random"}, "--sampling"),
])
def test_bad_dp_settings_name_the_flag(values, words):
    with pytest.raises(UserError, match=words.replace("-", r"\-").replace("+", r"\+")):
        from_dict(values)


def test_weak_delta_and_no_noise_warn():
    cfg = from_dict({"dp_clip": 1.0, "dp_noise_multiplier": 0.0, "dp_delta": 0.05,
                     "clients": 100})
    text = " ".join(warnings(cfg))
    assert "1/--clients" in text and "no privacy" in text
    assert warnings(from_dict({"sampling": "poisson"})) == []  # allowed without DP


# ------------------------------------------------------------------ whole runs

DP_ARGS = SMALL_SYNTHETIC + ["--rounds", "4", "--clients", "20", "--clients-per-round", "6",
                             "--sampling", "poisson", "--dp-clip", "0.5",
                             "--dp-noise-multiplier", "0.8", "--dp-delta", "1e-3",
                             "--dp-clip-quantile", "0.5", "--dp-clip-count-stddev", "0.5",
                             "--dropout-rate", "0.2"]


@requires_mpiexec
def test_dp_runs_are_bitwise_identical_for_1_3_8_ranks(run_fedmpi, tmp_path, numba_warm):
    runs = {}
    for ranks in (1, 3, 8):
        out = tmp_path / f"dp{ranks}.h5"
        res = run_fedmpi(DP_ARGS + ["--out", str(out)], ranks=ranks, timeout=300)
        assert res.returncode == 0, describe(res)
        runs[ranks] = read_run(str(out))
    ref = runs[1]
    r = ref["rounds"]
    assert np.all(np.diff(r["epsilon"]) > 0) and np.isfinite(r["epsilon"]).all()
    assert len(set(r["dp_clip_norm"].tolist())) == 4  # adaptive: S moves every round
    assert (r["num_clients"] <= r["num_sampled"]).all()
    for ranks in (3, 8):
        np.testing.assert_array_equal(runs[ranks]["params"].view(np.uint32),
                                      ref["params"].view(np.uint32))
        for col, values in ref["rounds"].items():
            if col != "seconds":
                np.testing.assert_array_equal(runs[ranks]["rounds"][col], values, err_msg=col)


def test_noise_has_the_stated_standard_deviation(run_fedmpi, tmp_path, numba_warm):
    """With S so large that nothing is clipped, (model with z) - (model with z = 0) after one
    round is the noise alone: N(0, (z S / K * server_lr)^2) per coordinate."""
    S, z, K, lr = 1000.0, 0.002, 5, 0.5
    base = SMALL_SYNTHETIC + ["--rounds", "1", "--hidden", "64", "--server-lr", str(lr),
                              "--dp-clip", str(S), "--dp-delta", "1e-3"]
    params = {}
    for name, noise in (("clean", 0.0), ("noisy", z)):
        out = tmp_path / f"{name}.h5"
        res = run_fedmpi(base + ["--dp-noise-multiplier", str(noise), "--out", str(out)])
        assert res.returncode == 0, describe(res)
        run = read_run(str(out))
        params[name] = run["params"].astype(np.float64)
    assert run["clients"]["clipped"].sum() == 0
    assert run["rounds"]["dp_noise_std"][0] == pytest.approx(z * S / K)
    diff = params["noisy"] - params["clean"]
    std = z * S / K * lr
    assert diff.std() == pytest.approx(std, rel=0.04)  # 4554 coordinates: ~1% standard error
    assert abs(diff.mean()) < 4 * std / math.sqrt(diff.size)


def test_adaptive_clip_norm_follows_the_paper_and_resumes(run_fedmpi, tmp_path, numba_warm):
    """S_{t+1} = S_t exp(-eta (b_t - gamma)), b_t = (sum_k (1/2 - clipped_k) + noise) / K + 1/2,
    recomputed from the per-client records; a run extended from a checkpoint continues S
    (and epsilon) exactly where an uninterrupted run is."""
    from fedmpi.rng import generator

    full = tmp_path / "full.h5"
    res = run_fedmpi(DP_ARGS + ["--out", str(full)])
    assert res.returncode == 0, describe(res)
    run = read_run(str(full))
    S = run["rounds"]["dp_clip_norm"]
    c = run["clients"]
    for t in range(1, 4):
        clipped = c["clipped"][c["round"] == t]
        noise = 0.5 * generator(0, "dp-clip-count", t).standard_normal()
        b = (np.sum(0.5 - clipped) + noise) / 6 + 0.5
        assert S[t] == pytest.approx(S[t - 1] * math.exp(-0.2 * (b - 0.5)), rel=1e-12)

    part = tmp_path / "part.h5"
    args = [a if a != "4" else "2" for a in DP_ARGS]  # --rounds 2
    assert run_fedmpi(args + ["--out", str(part)]).returncode == 0
    res = run_fedmpi(DP_ARGS + ["--resume", str(part)])
    assert res.returncode == 0, describe(res)
    resumed = read_run(str(part))
    np.testing.assert_array_equal(resumed["params"].view(np.uint32), run["params"].view(np.uint32))
    for col in ("epsilon", "dp_clip_norm", "test_loss", "num_clients"):
        np.testing.assert_array_equal(resumed["rounds"][col], run["rounds"][col], err_msg=col)


def test_target_epsilon_run_records_the_solved_noise(run_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "target.h5"
    args = SMALL_SYNTHETIC + ["--clients", "100", "--clients-per-round", "5", "--rounds", "3",
                              "--dp-clip", "1", "--dp-target-epsilon", "2", "--out", str(out)]
    res = run_fedmpi(args)
    assert res.returncode == 0, describe(res)
    run = read_run(str(out))
    z = run["config"]["dp_noise_multiplier"]
    assert "noise multiplier" in res.stdout and f"{z:g}" in res.stdout
    assert run["attrs"]["dp_accountant"] == "rdp" and run["attrs"]["sampling"] == "fixed"
    assert run["rounds"]["epsilon"][-1] <= 2.0
    assert run["rounds"]["epsilon"][-1] == pytest.approx(
        Accountant("rdp", "fixed", 100, 5, z, 1e-5).epsilon(3))


def test_empty_poisson_rounds_still_add_noise(run_fedmpi, tmp_path, numba_warm):
    out = tmp_path / "empty.h5"
    args = ["--clients", "12", "--clients-per-round", "1", "--rounds", "6", "--hidden", "16",
            "--sampling", "poisson", "--dp-clip", "1", "--dp-noise-multiplier", "1",
            "--dp-delta", "1e-3", "--seed", "3", "--out", str(out)]
    res = run_fedmpi(args)
    assert res.returncode == 0, describe(res)
    r = read_run(str(out))["rounds"]
    assert (r["num_clients"] == 0).any(), "seed 3 should give an empty round"
    assert np.isnan(r["train_loss"][r["num_clients"] == 0]).all()
    assert np.isfinite(r["test_loss"]).all()


# ------------------------------------------------------- empirical privacy


def test_canary_epsilon_is_the_hockey_stick_of_two_gaussians():
    """Reference: the hockey-stick divergence of N(0,1) and N(mu,1) integrated on a grid."""
    from fedmpi.privacy.canaries import gaussian_epsilon

    x = np.linspace(-40, 50, 900_001)
    dx = x[1] - x[0]
    for mu, delta in ((0.5, 1e-5), (2.0, 1e-3), (5.0, 1e-5)):
        p0, p1 = norm.pdf(x), norm.pdf(x, loc=mu)
        eps = gaussian_epsilon(mu, delta)
        assert np.clip(p1 - math.exp(eps) * p0, 0, None).sum() * dx == pytest.approx(delta, rel=1e-3)
        assert gaussian_epsilon(mu, delta) == pytest.approx(_analytic_gaussian_epsilon(mu, delta),
                                                            rel=1e-6)
    assert gaussian_epsilon(0.0, 1e-5) == 0.0 and gaussian_epsilon(-2.0, 1e-3) == gaussian_epsilon(2.0, 1e-3)


def test_canaries_estimate_follows_the_noise(run_fedmpi, tmp_path, numba_warm):
    """No noise: the inserted canaries stand out (large empirical epsilon); strong noise: the
    estimate's interval reaches down to the accountant's bound or below."""
    est = {}
    for z in (0.0, 5.0):
        out = tmp_path / f"canary{z}.h5"
        args = SMALL_SYNTHETIC + ["--clients", "30", "--clients-per-round", "6", "--rounds", "8",
                                  "--sampling", "poisson", "--dp-clip", "0.5",
                                  "--dp-noise-multiplier", str(z), "--dp-delta", "1e-3",
                                  "--dp-canaries", "60", "--out", str(out)]
        res = run_fedmpi(args)
        assert res.returncode == 0, describe(res)
        assert "empirical epsilon from 60 canaries" in res.stdout
        run = read_run(str(out))
        est[z] = (run["attrs"]["empirical_epsilon"], run["attrs"]["empirical_epsilon_interval"],
                  run["rounds"]["epsilon"][-1])
        assert run["rounds"]["canaries_inserted"].sum() > 0
    assert est[0.0][0] > 3 and est[0.0][2] == math.inf
    lo, hi = est[5.0][1]
    assert lo <= est[5.0][0] <= hi and lo <= est[5.0][2]
    assert est[5.0][0] < est[0.0][0]


@requires_mpiexec
def test_noise_added_by_clients_under_secure_aggregation(run_fedmpi, tmp_path, numba_warm):
    """--dp-noise-at clients: each of the K = 5 clients adds N(0, (z S)^2 / t) with t = 4, secagg's
    default threshold ceil(2K/3), so the average carries sqrt(K / t) z S / K per coordinate --
    at least the accounted z S / K whenever the server can unmask a sum -- and rank 0 adds none."""
    S, z, K, t, lr = 1000.0, 0.002, 5, 4, 0.5
    base = SMALL_SYNTHETIC + ["--rounds", "1", "--hidden", "64", "--server-lr", str(lr),
                              "--dp-clip", str(S), "--dp-delta", "1e-3",
                              "--secure-aggregation", "secagg", "--dp-noise-at", "clients"]
    params = {}
    for name, noise in (("clean", 0.0), ("noisy", z)):
        out = tmp_path / f"{name}.h5"
        res = run_fedmpi(base + ["--dp-noise-multiplier", str(noise), "--out", str(out)], ranks=3)
        assert res.returncode == 0, describe(res)
        run = read_run(str(out))
        params[name] = run["params"].astype(np.float64)
    assert run["clients"]["clipped"].sum() == 0 and run["attrs"]["dp_noise_at"] == "clients"
    want = math.sqrt(K / t) * z * S / K
    assert run["rounds"]["dp_noise_std"][0] == pytest.approx(want)
    diff = params["noisy"] - params["clean"]
    assert diff.std() == pytest.approx(want * lr, rel=0.04)
    assert abs(diff.mean()) < 4 * want * lr / math.sqrt(diff.size)
