"""Secure aggregation (fedmpi.privacy): Shamir sharing, SecAgg, SecAgg+.

References are independent: plain NumPy int64 sums of the clients' inputs,
polynomials evaluated term by term, Miller-Rabin for the field prime, the
chi-square distribution from SciPy, breadth-first search for connectivity.
"""

from __future__ import annotations

import math
import random
import sys

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from scipy import stats

from fedmpi import rng
from fedmpi.errors import UserError
from fedmpi.privacy import he, secagg, shamir


def _probably_prime(n: int, rounds: int = 64) -> bool:
    if n < 4:
        return n in (2, 3)
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    r = random.Random(12345)
    for _ in range(rounds):
        x = pow(r.randrange(2, n - 1), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


# ------------------------------------------------------------------ Shamir

def test_field_is_the_smallest_prime_above_2_256():
    assert shamir.PRIME > 2**256
    assert _probably_prime(shamir.PRIME)
    assert not any(_probably_prime(n) for n in range(2**256 + 1, shamir.PRIME))


def test_shares_are_the_polynomial_evaluated_term_by_term():
    g = np.random.default_rng(1)
    secret = g.bytes(32)
    drawn = []

    def random_bytes(n):
        b = g.bytes(n)
        drawn.append(b)
        return b

    xs = [3, 7, 11, 200]
    ys = shamir.split(secret, 3, xs, random_bytes)
    # the coefficients are the accepted draws (257 bits, below p)
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [v for v in (int.from_bytes(b, "big") & (2**257 - 1) for b in drawn) if v < shamir.PRIME]
    assert len(coeffs) == 3
    for x, y in zip(xs, ys):
        assert y == sum(c * x**i for i, c in enumerate(coeffs)) % shamir.PRIME


@pytest.mark.parametrize("t,n", [(1, 1), (2, 3), (5, 9), (13, 20)])
def test_any_t_shares_reconstruct_and_t_minus_1_do_not(t, n):
    for trial in range(5):
        g = np.random.default_rng([t, n, trial])
        secret = g.bytes(32)
        xs = [int(x) for x in g.choice(np.arange(1, 10 * n), size=n, replace=False)]
        ys = shamir.split(secret, t, xs, g.bytes)
        pick = g.choice(n, size=t, replace=False)
        assert shamir.combine([xs[i] for i in pick], [ys[i] for i in pick]) == secret
        assert shamir.combine(xs, ys) == secret  # more than t: the same polynomial
        if t > 1:
            few = pick[: t - 1]
            try:
                assert shamir.combine([xs[i] for i in few], [ys[i] for i in few]) != secret
            except ValueError:
                pass  # a value >= 2**256: also not the secret


def test_t_minus_1_shares_fit_every_secret():
    # perfect secrecy: for t-1 shares and any candidate secret there is a
    # polynomial of degree t-1 through them -- the one the Lagrange form gives
    g = np.random.default_rng(5)
    t, xs = 4, [1, 2, 3, 4, 5]
    ys = shamir.split(g.bytes(32), t, xs, g.bytes)
    for candidate in (bytes(32), b"\xff" * 32, g.bytes(32)):
        pts = [(0, int.from_bytes(candidate, "big"))] + list(zip(xs[: t - 1], ys[: t - 1]))
        # evaluate that polynomial at 0 via the t points: it reproduces the candidate
        assert shamir.combine([x for x, _ in pts[1:]] + [xs[-1]],
                              [y for _, y in pts[1:]] + [_lagrange_eval(pts, xs[-1])]) == candidate


def _lagrange_eval(pts, x):
    p = shamir.PRIME
    total = 0
    for i, (xi, yi) in enumerate(pts):
        num = den = 1
        for j, (xj, _) in enumerate(pts):
            if j != i:
                num = num * (x - xj) % p
                den = den * (xi - xj) % p
        total += yi * num * pow(den, -1, p)
    return total % p


def test_bad_holders_and_thresholds_are_refused():
    g = np.random.default_rng(0)
    with pytest.raises(ValueError):
        shamir.split(g.bytes(32), 2, [0, 1], g.bytes)  # x = 0 would reveal the secret
    with pytest.raises(ValueError):
        shamir.split(g.bytes(32), 2, [1, 1], g.bytes)
    with pytest.raises(ValueError):
        shamir.split(g.bytes(32), 4, [1, 2, 3], g.bytes)
    with pytest.raises(ValueError):
        shamir.split(g.bytes(31), 2, [1, 2, 3], g.bytes)
    with pytest.raises(ValueError):
        shamir.decode(shamir.PRIME.to_bytes(33, "big"))


# ------------------------------------------------------------------ SecAgg

def _inputs(ids, n=257, seed=0):
    g = np.random.default_rng(seed)
    # the full int64 range, so that the sum wraps: masks must cancel modulo 2**64
    return {u: g.integers(-2**63, 2**63, size=n, dtype=np.int64) for u in ids}


def _plain_sum(inputs, ids):
    total = np.zeros(next(iter(inputs.values())).size, dtype=np.int64)
    for u in ids:
        total += inputs[u]  # NumPy int64 arrays wrap: the same ring as uint64
    return total


def _aes_ctr(key, n):
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return np.frombuffer(enc.update(bytes(8 * n)), dtype=np.uint64)


def test_masked_inputs_minus_self_masks_sum_to_the_plain_sum():
    # pairwise masks cancel: remove only the self masks, recomputed here from
    # the documented derivation (third 32 bytes of the client's generator)
    ids, seed, rnd = [2, 5, 9, 14], 7, 3
    x = _inputs(ids)
    clients = {u: secagg.Client(u, seed, rnd, threshold=3) for u in ids}
    adverts = {u: c.advertise() for u, c in clients.items()}
    shares = {u: clients[u].share_keys({v: adverts[v] for v in ids if v != u}) for u in ids}
    inbox = {v: {u: shares[u][v] for u in ids if u != v} for v in ids}
    total = np.zeros(257, dtype=np.uint64)
    for u in ids:
        y = clients[u].masked_input(x[u], inbox[u])
        assert not np.array_equal(y, x[u].view(np.uint64))
        b_u = rng.generator(seed, "secagg-keys", rnd, u).bytes(96)[64:]
        total += y - _aes_ctr(b_u, 257)
    assert np.array_equal(total.view(np.int64), _plain_sum(x, ids))


def test_no_dropouts_gives_the_exact_sum():
    ids = list(range(10))
    x = _inputs(ids)
    r = secagg.run_round(x, seed=1, rnd=0, threshold=7)
    assert r.aborted is None and r.included == tuple(ids)
    assert np.array_equal(r.total, _plain_sum(x, ids))


@pytest.mark.parametrize("drop", [
    {3: "advertise"},                                   # never sends its keys
    {3: "share", 8: "share"},                           # before sharing
    {0: "masked", 11: "masked"},                        # after sharing, before masked input
    {4: "unmask", 6: "unmask"},                         # after masked input
    {1: "advertise", 2: "share", 5: "masked", 7: "unmask"},  # at every phase at once
])
def test_dropouts_at_each_phase_unmask_to_the_survivors_sum(drop):
    ids = list(range(12))
    x = _inputs(ids, seed=len(drop))
    r = secagg.run_round(x, seed=4, rnd=2, threshold=8, drop=drop)
    in_sum = [u for u in ids if drop.get(u) in (None, "unmask")]  # masked input arrived
    assert r.aborted is None
    assert r.included == tuple(in_sum)
    assert np.array_equal(r.total, _plain_sum(x, in_sum))


def test_below_threshold_the_round_is_skipped_without_reconstructing(monkeypatch):
    def no_combine(*a):
        raise AssertionError("a secret was reconstructed in an aborted round")

    monkeypatch.setattr(shamir, "combine", no_combine)
    ids = list(range(9))
    x = _inputs(ids)
    for drop in ({u: "share" for u in range(3)},       # 6 < 7 shared keys
                 {u: "masked" for u in range(3)},      # 6 < 7 masked inputs
                 {u: "unmask" for u in range(3)}):     # 6 < 7 revealed shares
        r = secagg.run_round(x, seed=0, rnd=0, threshold=7, drop=drop)
        assert r.total is None and "threshold 7" in r.aborted


def test_a_masked_vector_is_indistinguishable_from_uniform():
    # a realistic input: the fixed-point encoding of a small update is far
    # from uniform byte by byte; what the server holds for one client is not
    n, ids = 20_000, [0, 1, 2]
    g = np.random.default_rng(0)
    x = {u: np.rint(g.normal(0, 1e-3, n) * 2**50).astype(np.int64) for u in ids}
    clients = {u: secagg.Client(u, 0, 0, threshold=2) for u in ids}
    adverts = {u: c.advertise() for u, c in clients.items()}
    shares = {u: clients[u].share_keys({v: adverts[v] for v in ids if v != u}) for u in ids}
    y = clients[1].masked_input(x[1], {v: shares[v][1] for v in ids if v != 1})

    def chi2_pvalue(a):
        counts = np.bincount(np.frombuffer(a.tobytes(), dtype=np.uint8), minlength=256)
        return stats.chisquare(counts).pvalue

    assert chi2_pvalue(x[1]) < 1e-100
    assert chi2_pvalue(y) > 1e-4


def test_traffic_counts_the_messages():
    ids = list(range(6))
    r = secagg.run_round(_inputs(ids, n=100), seed=0, rnd=0, threshold=4)
    tr = r.traffic
    # keys: 2 x 32 bytes; shares: id + AES-GCM(2 ids + 2 shares) + 16-byte tag per peer
    assert np.all(tr.up["advertise"] == 64)
    assert np.all(tr.down["advertise"] == 5 * (4 + 64))
    assert np.all(tr.up["share"] == 5 * (4 + 8 + 2 * 33 + 16))
    assert np.all(tr.up["masked"] == 8 * 100)
    assert np.all(tr.up["unmask"] == 6 * (4 + 1 + 33))


def test_rounds_are_reproducible_and_keys_fresh_per_round():
    ids = list(range(5))
    x = _inputs(ids)
    a = secagg.Client(3, 9, 1, 3).advertise()
    assert a == secagg.Client(3, 9, 1, 3).advertise()
    assert a != secagg.Client(3, 9, 2, 3).advertise()
    r1 = secagg.run_round(x, seed=9, rnd=1, threshold=3, drop={0: "masked"})
    r2 = secagg.run_round(x, seed=9, rnd=1, threshold=3, drop={0: "masked"})
    assert np.array_equal(r1.total, r2.total)


# ------------------------------------------------------------------ SecAgg+

def _connected(graph):
    start = next(iter(graph))
    seen, todo = {start}, [start]
    while todo:
        for v in graph[todo.pop()]:
            if v not in seen:
                seen.add(v)
                todo.append(v)
    return len(seen) == len(graph)


@pytest.mark.parametrize("n", [5, 16, 50, 200, 1000])
def test_secagg_plus_graph_is_regular_symmetric_connected(n):
    k = secagg.plus_degree(n)
    assert k == min(n - 1, 2 * math.ceil(math.log2(n)))
    assert k % 2 == 0 or k == n - 1
    ids = list(range(100, 100 + 3 * n, 3))
    graph = secagg.neighbours(ids, k, seed=3, rnd=1)
    assert sorted(graph) == ids
    assert all(len(nb) == k and u not in nb for u, nb in graph.items())
    assert all(u in graph[v] for u, nb in graph.items() for v in nb)
    assert _connected(graph)
    # k-connected: removing any k-1 nodes leaves it connected (checked on a few)
    g = np.random.default_rng(n)
    for _ in range(3):
        gone = set(g.choice(ids, size=k - 1, replace=False).tolist())
        rest = {u: tuple(v for v in nb if v not in gone) for u, nb in graph.items() if u not in gone}
        assert _connected(rest)


def test_secagg_plus_degrees_grow_logarithmically():
    assert [secagg.plus_degree(n) for n in (10, 50, 200, 1000)] == [8, 12, 16, 20]


def test_secagg_plus_unmasks_with_dropouts_and_costs_k_not_n():
    ids = list(range(60))
    k = secagg.plus_degree(60)  # 12
    t = math.ceil(2 * (k + 1) / 3)  # per neighbourhood (k neighbours and the client)
    x = _inputs(ids, n=64)
    drop = {1: "advertise", 17: "share", 33: "masked", 48: "unmask"}
    r = secagg.run_round(x, seed=2, rnd=5, threshold=t, k=k, drop=drop)
    in_sum = [u for u in ids if drop.get(u) in (None, "unmask")]
    assert r.aborted is None
    assert np.array_equal(r.total, _plain_sum(x, in_sum))
    # a client that nobody near dropped sends shares to exactly its k neighbours
    share_up = r.traffic.up["share"]
    assert share_up.max() == k * (4 + 8 + 2 * 33 + 16)


def test_secagg_plus_aborts_when_a_neighbourhood_falls_below_threshold():
    ids = list(range(30))
    k = secagg.plus_degree(30)  # 10
    graph = secagg.neighbours(ids, k, seed=0, rnd=0)
    drop = {v: "masked" for v in graph[0][:5]}  # client 0 keeps 6 of 11 holders
    r = secagg.run_round(_inputs(ids, n=8), seed=0, rnd=0, threshold=8, k=k, drop=drop)
    assert r.total is None and "threshold 8" in r.aborted


# ------------------------------------------------------------------ he

def test_he_parameters_allow_batching_and_exact_limb_sums():
    assert _probably_prime(he.PLAIN_MODULUS) and he.PLAIN_MODULUS % (2 * he.POLY_DEGREE) == 1
    assert he.PLAIN_MODULUS < 2**60  # SEAL's bound on the plaintext modulus
    # K limbs of 32 bits each stay inside (-t/2, t/2)
    assert he.MAX_CLIENTS * 2**32 < he.PLAIN_MODULUS // 2 and he.MAX_CLIENTS >= 2**25


def test_he_limb_encoding_sums_like_int64():
    x = _inputs(range(7), n=1000, seed=3)
    limb_sum = sum(he._limbs(v) for v in x.values())  # small ints: no wrap in int64
    assert np.array_equal(he._unlimb(limb_sum, 1000), _plain_sum(x, range(7)))


def test_he_without_tenseal_names_the_pip_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tenseal", None)  # import tenseal -> ImportError
    with pytest.raises(UserError, match=r"pip install 'fedmpi\[he\]'"):
        he.check_available()
    with pytest.raises(UserError, match=r"--secure-aggregation he needs TenSEAL.*pip install"):
        secagg.plan("he", 10)


@pytest.fixture(scope="module")
def he_keys():
    pytest.importorskip("tenseal")
    return he.keygen()


def test_he_decrypted_sum_equals_the_plaintext_int64_sum(he_keys):
    secret, public = he_keys
    server_ctx = he.Context(public)
    assert not server_ctx.ctx.has_secret_key()
    n = he.POLY_DEGREE + 123  # three ciphertexts, the last partly filled
    assert he.n_ciphertexts(n) == 3
    x = _inputs(range(5), n=n, seed=11)  # the full int64 range: the sum wraps
    acc = he.Sum(server_ctx)
    for v in x.values():
        cts = server_ctx.encrypt(v)  # encryption needs only the public key
        assert len(cts) == 3
        acc.add(cts)
    with pytest.raises(ValueError):
        server_ctx.decrypt(acc.ciphertexts(), n)  # the server cannot decrypt
    assert np.array_equal(he.Context(secret).decrypt(acc.ciphertexts(), n), _plain_sum(x, range(5)))


def test_he_sum_of_200_extreme_inputs_is_exact(he_keys):
    # the largest limbs 200 times: checks the limb bound and the noise budget
    secret, public = he_keys
    ctx = he.Context(public)
    x = np.array([2**63 - 1, -2**63, -1, 2**32 - 1, -2**31], dtype=np.int64)
    cts = ctx.encrypt(x)
    acc = he.Sum(ctx)
    for _ in range(200):
        acc.add(cts)
    expect = (x.astype(object) * 200 + 2**63) % 2**64 - 2**63
    assert he.Context(secret).decrypt(acc.ciphertexts(), x.size).tolist() == expect.tolist()


# ------------------------------------------------------------------ settings

def test_plan_defaults_and_bad_thresholds():
    assert secagg.plan("secagg", 10) == secagg.Plan("secagg", None, 7)
    assert secagg.plan("secagg+", 200) == secagg.Plan("secagg+", 16, 12)  # ceil(2 * 17 / 3)
    assert secagg.plan("secagg", 3).threshold == 2 and secagg.plan("secagg", 1).threshold == 1
    assert secagg.plan("secagg", 10, 6).threshold == 6
    for mode, k_, t, match in [("secagg", 10, 11, "more than the 10"),
                               ("secagg", 10, 5, "at most half"),
                               ("secagg+", 200, 8, "at most half of the 17"),
                               ("secagg+", 200, 18, "more than the 17")]:
        with pytest.raises(UserError, match=match):
            secagg.plan(mode, k_, t)
    for agg in ("median", "trimmed_mean"):
        with pytest.raises(UserError, match="needs each update"):
            secagg.plan("secagg", 10, aggregator=agg)
    with pytest.raises(UserError, match="use one of"):
        secagg.plan("paillier", 10)


def test_any_grouping_of_clients_over_hosts_gives_the_same_round():
    # as ranks host the clients: partial masked sums, merged messages
    ids = list(range(11))
    x = _inputs(ids, n=300)
    drop = {2: "share", 6: "masked", 9: "unmask"}
    one = secagg.run_round(x, seed=3, rnd=4, threshold=7, drop=drop)
    three = secagg.run_round(x, seed=3, rnd=4, threshold=7, drop=drop, groups=3)
    assert np.array_equal(one.total, three.total) and one.included == three.included
    for p in secagg.PHASES:
        assert np.array_equal(one.traffic.up[p], three.traffic.up[p])
        assert np.array_equal(one.traffic.down[p], three.traffic.down[p])


def test_dropout_phases_are_seeded_and_before_the_masked_input():
    ph = secagg.dropout_phases(range(300), seed=1, rnd=2)
    assert ph == secagg.dropout_phases(range(300), seed=1, rnd=2)
    assert set(ph.values()) == {"advertise", "share", "masked"}
    assert ph != secagg.dropout_phases(range(300), seed=1, rnd=3)


# ------------------------------------------------------------------ over MPI

def _mpi_check(ranks, mode, k, n, drop=None):
    import json
    import os
    import subprocess

    from conftest import MPIEXEC, REPO
    if MPIEXEC is None:
        pytest.skip("no mpiexec")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p))
    drops = ",".join(f"{u}:{p}" for u, p in (drop or {}).items())
    cmd = [MPIEXEC, "-n", str(ranks), sys.executable, os.path.join(REPO, "tests", "mpi_secure_check.py"),
           mode, str(k), str(n), drops]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout.strip().splitlines()[-1])


def _mpi_inputs(clients, n):
    return {u: np.random.default_rng([99, u]).integers(-2**63, 2**63, size=n, dtype=np.int64) for u in clients}


@pytest.mark.parametrize("ranks", [1, 3])
@pytest.mark.parametrize("mode", ["secagg", "secagg+"])
def test_secagg_over_mpi_equals_the_survivors_plain_sum(ranks, mode):
    k, n = 12, 100
    clients = list(range(3, 3 + 2 * k, 2))
    drop = {5: "advertise", 9: "share", 13: "masked", 21: "unmask"}
    if mode == "secagg+":  # k = 8: a neighbourhood of 9 with t = 6 tolerates 3 dropping
        drop = {9: "share", 13: "masked", 21: "unmask"}
    out = _mpi_check(ranks, mode, k, n, drop)
    in_sum = [u for u in clients if drop.get(u) in (None, "unmask")]
    assert out["aborted"] is None and out["included"] == in_sum and out["seconds"]
    total = np.frombuffer(bytes.fromhex(out["total"]), np.int64)
    assert np.array_equal(total, _plain_sum(_mpi_inputs(clients, n), in_sum))
    # the same messages as the single-process protocol
    plan = secagg.plan(mode, k)
    ref = secagg.run_round(_mpi_inputs(clients, n), seed=5, rnd=2, threshold=plan.threshold,
                           k=plan.k, drop=drop)
    for p in secagg.PHASES:
        assert out["up"][p] == ref.traffic.up[p].tolist()
        assert out["down"][p] == ref.traffic.down[p].tolist()


def test_secagg_over_mpi_aborts_on_every_rank_below_threshold():
    k = 6  # t = 4: three dropping leaves 3
    out = _mpi_check(3, "secagg", k, 10, {3: "masked", 5: "masked", 7: "masked"})
    assert out["total"] is None and "threshold 4" in out["aborted"]


@pytest.mark.parametrize("ranks", [1, 3])
def test_he_over_mpi_equals_the_plain_sum(ranks):
    pytest.importorskip("tenseal")
    k, n = 5, 1000
    out = _mpi_check(ranks, "he", k, n)
    clients = list(range(3, 3 + 2 * k, 2))
    total = np.frombuffer(bytes.fromhex(out["total"]), np.int64)
    assert np.array_equal(total, _plain_sum(_mpi_inputs(clients, n), clients))
    assert all(b > 0 for b in out["up"])
