"""Codecs, error feedback, the client-state store and pruning, against NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedmpi.compression import codecs as C
from fedmpi.compression.error_feedback import compress_with_feedback, needs_feedback
from fedmpi.compression import prune
from fedmpi.model.mlp import MLP
from fedmpi import state as state_module
from fedmpi.state import ClientStateStore

KEY = C.Key(seed=7, round=3, client=11)


def _vec(p, seed=0, ties=False):
    x = np.random.default_rng(seed).standard_normal(p).astype(np.float32)
    if ties:  # many equal magnitudes, of both signs
        x = (np.round(x * 2) / 2).astype(np.float32)
    return x


def _varint_len(g: int) -> int:
    return max(1, math.ceil(g.bit_length() / 7))


# -- top-k ----------------------------------------------------------------------

@pytest.mark.parametrize("p,ratio,ties", [(1000, 0.01, False), (1000, 0.1, True),
                                          (37, 0.5, True), (5, 1.0, False), (300, 0.003, True)])
def test_topk_keeps_exactly_the_k_largest_lower_index_on_ties(p, ratio, ties):
    x = _vec(p, seed=p, ties=ties)
    k = math.ceil(ratio * p)
    # Reference: sort by (-|x|, index) and take the first k.
    ref = np.sort(np.lexsort((np.arange(p), -np.abs(x).astype(np.float64)))[:k])
    buf = C.make_codec("topk", ratio=ratio).encode(x)
    y = C.decode(buf)
    expected = np.zeros(p, np.float32)
    expected[ref] = x[ref]
    assert np.array_equal(y, expected)
    gaps = np.diff(np.concatenate([[-1], ref])) - 1
    assert len(buf) == 8 + 4 + 4 * k + sum(_varint_len(int(g)) for g in gaps)


def test_topk_ties_all_equal_take_lowest_indices():
    x = np.full(10, -2.0, np.float32)
    x[[3, 7]] = 2.0  # same magnitude, other sign: still a tie
    y = C.decode(C.make_codec("topk", ratio=0.3).encode(x))
    assert np.flatnonzero(y).tolist() == [0, 1, 2]


def test_topk_large_gaps_use_multibyte_varints():
    x = np.zeros(1_000_000, np.float32)
    x[[5, 300_000, 999_999]] = [1.0, -2.0, 3.0]
    buf = C.make_codec("topk", ratio=3e-6).encode(x)
    assert np.array_equal(C.decode(buf), x)


# -- random-k -------------------------------------------------------------------

def test_randk_is_unbiased_and_sends_only_values_and_key():
    p, ratio, n = 40, 0.1, 10000
    k = math.ceil(ratio * p)
    x = _vec(p, seed=1)
    codec = C.make_codec("randk", ratio=ratio)
    total = np.zeros(p)
    for s in range(n):
        buf = codec.encode(x, C.Key(seed=s, round=2, client=5))
        assert len(buf) == 8 + 4 + 16 + 4 * k
        y = C.decode(buf)
        assert np.count_nonzero(y) == k
        total += y
    mean = total / n
    # Each coordinate is x_i * p/k with probability k/p, else 0: variance x_i^2 (p/k - 1).
    sd = np.abs(x) * math.sqrt(p / k - 1) / math.sqrt(n)
    assert np.all(np.abs(mean - x) <= 5 * sd + 1e-6)
    # All coordinates at once: <decode, x> has mean ||x||^2 and, as coordinates drawn
    # without replacement are negatively correlated, at most the variance of independent
    # ones. This side detects a bias of a few percent (a 5 % one is > 6 sd here).
    x64 = x.astype(np.float64)
    assert abs(mean @ x64 - x64 @ x64) <= 4 * math.sqrt((x64**4).sum() * (p / k - 1) / n)


def test_randk_decoder_redraws_the_same_coordinates():
    x = _vec(1000, seed=2)
    y = C.decode(C.make_codec("randk", ratio=0.05).encode(x, KEY))
    idx = np.flatnonzero(y)
    assert idx.size == 50
    np.testing.assert_array_equal(y[idx], x[idx] * np.float32(1000 / 50))
    for other_key in (KEY._replace(client=12), KEY._replace(purpose="compress-down")):
        other = C.decode(C.make_codec("randk", ratio=0.05).encode(x, other_key))
        assert np.count_nonzero(other) == 50
        assert not np.array_equal(np.flatnonzero(other), idx)


# -- QSGD -----------------------------------------------------------------------

def _gamma_bits(n: int) -> int:
    return 2 * (n.bit_length() - 1) + 1


def _qsgd_reference(x, bits, bucket, key):
    """(levels, bucket norms) of QSGD in NumPy, from the same uniforms the codec draws."""
    from fedmpi.rng import generator

    s = 2**bits - 1
    p = x.size
    nb = math.ceil(p / bucket)
    xp = np.zeros(nb * bucket, np.float32)
    xp[:p] = x
    norms = np.linalg.norm(xp.reshape(nb, bucket).astype(np.float64), axis=1).astype(np.float32)
    norm_i = np.repeat(norms, bucket)[:p]
    f = np.where(norm_i > 0, np.float32(s) / np.where(norm_i > 0, norm_i, 1), 0).astype(np.float32)
    u = generator(key.seed, "compress", key.round, key.client).random(p, np.float32)
    levels = np.minimum(np.floor(np.abs(x) * f + u), s).astype(np.int64)
    return levels, norms


@pytest.mark.parametrize("coding", ["elias", "fixed"])
@pytest.mark.parametrize("bits,bucket", [(1, 8), (4, 16), (8, 512), (12, 7), (16, 64)])
def test_qsgd_levels_norms_and_length(bits, bucket, coding):
    p = 100
    x = _vec(p, seed=bits)
    x[5] = 0.0
    x[50:58] = 0.0  # an all-zero bucket at bucket size 8
    buf = C.make_codec("qsgd", bits=bits, bucket=bucket, coding=coding).encode(x, KEY)
    nb = math.ceil(p / bucket)
    s = 2**bits - 1
    levels, norms = _qsgd_reference(x, bits, bucket, KEY)
    np.testing.assert_allclose(buf[12:12 + 4 * nb].view("<f4"), norms, rtol=1e-6)
    if coding == "fixed":
        stream_bits = p * (bits + 1)
    else:  # per bucket gamma(m + 1), per non-zero level gamma(gap) + sign + gamma(level)
        stream_bits = 0
        for b in range(nb):
            lv = levels[b * bucket:(b + 1) * bucket]
            nz = np.flatnonzero(lv)
            gaps = np.diff(np.concatenate([[-1], nz]))
            stream_bits += _gamma_bits(nz.size + 1) + sum(
                _gamma_bits(int(g)) + 1 + _gamma_bits(int(lv[j])) for g, j in zip(gaps, nz))
    assert len(buf) == 8 + 4 + 4 * nb + math.ceil(stream_bits / 8)
    y = C.decode(buf)
    unit = np.repeat(buf[12:12 + 4 * nb].view("<f4") / np.float32(s), bucket)[:p]
    expected = np.where(x < 0, -1, 1) * (levels.astype(np.float32) * unit)
    np.testing.assert_array_equal(y, expected.astype(np.float32))
    # The levels are the two integers around |x_i| / norm * s.
    r = np.abs(x.astype(np.float64)) / np.repeat(norms, bucket)[:p].clip(1e-30) * s
    assert np.all((levels == np.floor(r)) | (levels == np.ceil(r)) | (np.abs(levels - r) < 1e-4))
    assert y[5] == 0.0


def test_qsgd_codings_agree_and_elias_is_shorter_at_few_bits():
    x = _vec(5000, seed=13)
    el = C.make_codec("qsgd", bits=4).encode(x, KEY)
    fx = C.make_codec("qsgd", bits=4, coding="fixed").encode(x, KEY)
    assert np.array_equal(C.decode(el), C.decode(fx))
    assert len(el) < len(fx)


@pytest.mark.parametrize("bits", [2, 4])
def test_qsgd_is_unbiased(bits):  # the codings share their levels: testing one tests both
    p, bucket, n = 48, 16, 3000
    x = _vec(p, seed=3)
    codec = C.make_codec("qsgd", bits=bits, bucket=bucket)
    total = np.zeros(p)
    for s in range(n):
        total += C.decode(codec.encode(x, C.Key(seed=s, round=1, client=0)))
    mean = total / n
    s_ = 2**bits - 1
    unit = np.repeat(np.linalg.norm(x.astype(np.float64).reshape(-1, bucket), axis=1), bucket) / s_
    frac = np.abs(x) / unit - np.floor(np.abs(x) / unit)
    var = unit**2 * frac * (1 - frac)  # level is floor + Bernoulli(frac), independent per coordinate
    assert np.all(np.abs(mean - x) <= 5 * np.sqrt(var / n) + 1e-5 * np.abs(x))
    x64 = x.astype(np.float64)
    assert abs(mean @ x64 - x64 @ x64) <= 4 * math.sqrt((x64**2 * var).sum() / n) + 1e-5


def test_qsgd_rejects_bad_settings():
    for bits in (0, 17):
        with pytest.raises(ValueError, match="1..16"):
            C.make_codec("qsgd", bits=bits)
    with pytest.raises(ValueError, match="coding"):
        C.make_codec("qsgd", coding="huffman")


# -- sign, fp16 -----------------------------------------------------------------

def test_sign_scale_is_mean_absolute_value():
    x = _vec(1001, seed=4)
    x[10] = 0.0
    buf = C.make_codec("sign").encode(x)
    assert len(buf) == 8 + 4 + math.ceil(1001 / 8)
    scale = np.float32(np.mean(np.abs(x.astype(np.float64))))
    expected = np.where(x < 0, -scale, scale).astype(np.float32)  # 0 is sent as +
    assert np.array_equal(C.decode(buf), expected)


def test_fp16_round_trip_and_saturation():
    x = _vec(500, seed=5)
    x[0], x[1], x[2] = 1e6, -1e6, 1e-6
    buf = C.make_codec("fp16").encode(x)
    assert len(buf) == 8 + 2 * 500
    y = C.decode(buf)
    assert np.array_equal(y[3:], x[3:].astype(np.float16).astype(np.float32))
    assert y[0] == 65504.0 and y[1] == -65504.0
    assert y[2] == np.float32(np.float16(1e-6))


# -- generic --------------------------------------------------------------------

@pytest.mark.parametrize("name,coding", [("topk", ""), ("randk", ""), ("qsgd", "elias"),
                                         ("qsgd", "fixed"), ("sign", ""), ("fp16", "")])
def test_header_and_corrupt_buffers(name, coding):
    x = _vec(333, seed=6)
    codec = C.make_codec(name, ratio=0.1, bits=3, coding=coding or "elias")
    buf = codec.encode(x, KEY)
    assert buf.dtype == np.uint8 and buf.ndim == 1
    assert C.read_header(buf)[0] == name and C.read_header(buf)[2] == 333
    assert C.decode(buf.tobytes()).shape == (333,)  # bytes from MPI decode too
    with pytest.raises(ValueError):
        C.decode(buf[:-1])


def test_make_codec_checks_ratio_and_names():
    assert C.make_codec("none") is None
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
            C.make_codec("topk", ratio=bad)
    with pytest.raises(ValueError, match="unknown compressor"):
        C.make_codec("zip")


# -- error feedback -------------------------------------------------------------

@pytest.mark.parametrize("name", ["topk", "sign", "qsgd", "randk"])
def test_error_feedback_bookkeeping(name):
    p, rounds = 200, 25
    codec = C.make_codec(name, ratio=0.05, bits=2)
    residual = None
    sent_sum = np.zeros(p)
    true_sum = np.zeros(p)
    for t in range(rounds):
        x = _vec(p, seed=100 + t)
        buf, sent, residual = compress_with_feedback(codec, x, residual, KEY._replace(round=t))
        assert np.array_equal(sent, C.decode(buf))
        sent_sum += sent
        true_sum += x
    # Telescoping: sum of sent + final residual = sum of true updates (float32 rounding only).
    scale = np.abs(true_sum).max() + np.abs(sent_sum).max()
    np.testing.assert_allclose(sent_sum + residual, true_sum, rtol=0, atol=1e-5 * scale)
    assert needs_feedback(codec) == (name in ("topk", "sign"))


def test_error_feedback_topk_residual_is_what_was_dropped():
    x = _vec(100, seed=8)
    e = _vec(100, seed=9) * np.float32(0.1)
    _, sent, e2 = compress_with_feedback(C.make_codec("topk", ratio=0.1), x, e, KEY)
    corrected = x + e
    kept = np.sort(np.argsort(-np.abs(corrected), kind="stable")[:10])
    assert np.array_equal(np.flatnonzero(sent), kept)
    assert np.array_equal(e2[kept], np.zeros(10, np.float32))
    mask = np.ones(100, bool)
    mask[kept] = False
    assert np.array_equal(e2[mask], corrected[mask])


# -- client-state store ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["grow", "reserve", "refused", "spill"])
def test_store_lazy_rows_and_checkpoint_round_trip(tmp_path, monkeypatch, mode):
    """grow: doubling arrays; reserve: max_rows known, address space for all of them
    reserved up front; refused: the system refuses that reservation (strict
    overcommit), so the store grows; spill: a memory-mapped file."""
    p = 50
    spill = mode == "spill"
    if mode == "refused":
        monkeypatch.setattr(state_module, "_reserve", lambda rows, cols: None)
    store = ClientStateStore(p, name="ef", spill_dir=str(tmp_path) if spill else None,
                             max_rows=100 if mode in ("reserve", "refused") else None)
    assert len(store) == 0 and store.get(3) is None and store.nbytes == 0
    rows = {cid: _vec(p, seed=cid) for cid in (9, 3, 40, 17)}
    for cid in list(rows)[:2]:
        store.put(cid, rows[cid])
    first = store.get(9).__array_interface__["data"][0]
    assert len(store) == 2 and 40 not in store
    taken, has = store.take([40, 3, 9])
    assert has.tolist() == [False, True, True]
    assert np.array_equal(taken[0], np.zeros(p, np.float32))
    assert np.array_equal(taken[1], rows[3])
    store.put_many([40, 17], np.stack([rows[40], rows[17]]))
    for cid in range(20, 60):  # past the first capacity: the store grows
        store.put(cid, np.full(p, cid, np.float32))
        rows[cid] = np.full(p, cid, np.float32)
    assert store.ids().tolist() == sorted(rows)
    assert store.nbytes == len(rows) * 4 * p
    # a reserved store never moves its rows (no copy as it fills); the others do
    assert (store.get(9).__array_interface__["data"][0] == first) == (mode == "reserve")
    arrays = {k: np.array(v) for k, v in store.export().items()}  # as a checkpoint keeps them
    again = ClientStateStore.from_arrays(arrays, name="ef")
    for cid, row in rows.items():
        assert np.array_equal(again.get(cid), row)
        assert np.array_equal(store.get(cid), row)
    with pytest.raises(ValueError):
        store.get(3)[0] = 1.0  # read-only view
    line = store.describe(num_clients=10_000)
    assert "200 B per client" in line and "2 MB" in line and (("spilled" in line) == spill)
    store.close()
    if spill:
        assert list(tmp_path.iterdir()) == []


def test_store_rejects_bad_rows():
    store = ClientStateStore(4)
    with pytest.raises(ValueError):
        store.put(0, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="repeated"):
        store.load({"ids": np.array([1, 1]), "rows": np.zeros((2, 4), np.float32)})


# -- pruning --------------------------------------------------------------------

def test_prune_mask_per_layer_smallest_weights_biases_kept():
    model = MLP((6, 5, 3))
    params = _vec(model.num_params, seed=10, ties=True)
    mask = prune.prune_mask(params, model, 0.5)
    for (w, b), (mw, mb) in zip(model.layers(params), model.layers(mask)):
        assert mb.all()
        flat, keep = w.reshape(-1), mw.reshape(-1)
        assert (~keep).sum() == flat.size // 2
        pruned_ref = np.argsort(np.abs(flat), kind="stable")[:flat.size // 2]
        assert np.array_equal(np.sort(np.flatnonzero(~keep)), np.sort(pruned_ref))


def test_prune_mask_persists_and_grows():
    model = MLP((8, 4, 2))
    params = _vec(model.num_params, seed=11)
    m1 = prune.prune_mask(params, model, 0.25)
    prune.apply_mask(params, m1)
    params += np.float32(5.0)  # training moved every weight, pruned ones included
    m2 = prune.prune_mask(params, model, 0.5, mask=m1)
    assert not np.any(m2 & ~m1)  # pruned once, pruned for good
    assert (~m2).sum() == 8 * 4 // 2 + 4 * 2 // 2


def test_zhu_gupta_schedule():
    assert prune.sparsity_at(4, 0.8, start=5, end=25) == 0.0
    assert prune.sparsity_at(5, 0.8, start=5, end=25) == pytest.approx(0.0)
    assert prune.sparsity_at(15, 0.8, start=5, end=25) == pytest.approx(0.8 * (1 - 0.5**3))
    assert prune.sparsity_at(25, 0.8, start=5, end=25) == 0.8
    assert prune.sparsity_at(16, 0.8, start=5, end=25, every=10) == \
        prune.sparsity_at(15, 0.8, start=5, end=25)
    assert prune.sparsity_at(9, 0.5, start=10, end=10) == 0.0  # one-shot
    assert prune.sparsity_at(10, 0.5, start=10, end=10) == 0.5


def test_masked_model_encoding_bytes_and_round_trip():
    model = MLP((20, 10, 3))
    params = _vec(model.num_params, seed=12)
    mask = prune.prune_mask(params, model, 0.5)
    prune.apply_mask(params, mask)
    buf = prune.encode_masked(params, mask)
    kept = int(mask.sum())
    assert len(buf) == 8 + math.ceil(model.num_params / 8) + 4 * kept
    back, mask2 = prune.decode_masked(buf)
    assert np.array_equal(back, params) and np.array_equal(mask2, mask)


# -- round steps (fedmpi/compression/stages.py) ---------------------------------

def _cfg(**kw):
    from fedmpi.config import Config

    return Config(**kw)


def _ctx(rnd, client, params=None, state=None):
    from fedmpi.pipeline import ClientContext

    return ClientContext(rnd, client, 3, params or {}, state=state)


def test_compress_stage_error_feedback_and_checkpoint():
    from fedmpi.compression.stages import Compress

    model = MLP((20, 10, 3))
    p = model.num_params
    stage = Compress(_cfg(compress="topk", compress_ratio=0.1, error_feedback=True), model)
    assert stage.encodes and stage.client_state == "ef_residual"
    x = _vec(p, seed=20)
    ctx = _ctx(1, 4, state=np.zeros(p, np.float32))  # a client's first round: zero residual
    stage.client(x.copy(), ctx)
    np.testing.assert_array_equal(ctx.state + stage.decode(ctx.payload), x)  # nothing lost
    residual = ctx.state.copy()
    ctx2 = _ctx(2, 4, state=ctx.state)
    stage.client(x.copy(), ctx2)
    ref = C.make_codec("topk", ratio=0.1).encode(x + residual)
    np.testing.assert_array_equal(stage.decode(ctx2.payload), C.decode(ref))
    stage.store.put(4, ctx2.state)
    again = Compress(_cfg(compress="topk", compress_ratio=0.1, error_feedback=True), model)
    again.load_state({k: np.array(v) for k, v in stage.state().items()})
    np.testing.assert_array_equal(again.store.get(4), ctx2.state)
    from fedmpi.errors import UserError

    bad = dict(stage.state())
    bad["ef_residual_rows"] = bad["ef_residual_rows"][:, :-1]  # damaged checkpoint
    with pytest.raises(UserError, match="malformed"):
        again.load_state(bad)
    plain = Compress(_cfg(compress="qsgd"), model)
    assert plain.client_state is None and plain.state() == {}


def test_broadcast_one_shot_pruning_persists():
    from fedmpi.compression.stages import Broadcast

    model = MLP((30, 20, 5))
    stage = Broadcast(_cfg(prune=0.5, prune_start=2, prune_end=2), model)
    old = _vec(model.num_params, seed=30)
    new = old.copy()
    assert stage.downlink(old, new, rnd=1) is None and stage.mask is None
    assert stage.round_params(2) == {}
    nbytes = stage.downlink(old, new, rnd=2)
    kept = int(stage.mask.sum())
    assert kept == model.num_params - (30 * 20 // 2 + 20 * 5 // 2)
    assert nbytes == 8 + math.ceil(model.num_params / 8) + 4 * kept
    assert stage.weight_sparsity() == pytest.approx(0.5)
    assert np.all(new[~stage.mask] == 0)
    # Clients get the mask with the round's parameters and zero their updates there.
    update = np.ones(model.num_params, np.float32)
    stage.client(update, _ctx(3, 0, params={"broadcast": stage.round_params(3)}))
    assert np.array_equal(update, stage.mask.astype(np.float32))
    again = new + update
    stage.downlink(new, again, rnd=3)
    assert np.all(again[~stage.mask] == 0) and np.array_equal(again[stage.mask],
                                                               new[stage.mask] + 1)
    restored = Broadcast(_cfg(prune=0.5, prune_start=2, prune_end=2), model)
    restored.load_state(stage.state())
    assert np.array_equal(restored.mask, stage.mask) and restored.sparsity == 0.5


def test_broadcast_fp16_sends_the_model_change():
    from fedmpi.compression.stages import Broadcast

    model = MLP((10, 4))
    stage = Broadcast(_cfg(compress_down="fp16"), model)
    old = _vec(model.num_params, seed=31)
    new = old + _vec(model.num_params, seed=32) * np.float32(1e-3)
    change = new - old
    assert stage.downlink(old, new, rnd=1) == 8 + 2 * model.num_params
    np.testing.assert_array_equal(new, old + change.astype(np.float16).astype(np.float32))


def test_compression_warnings_and_config_errors():
    from fedmpi.compression.stages import warnings_for
    from fedmpi.config import from_dict
    from fedmpi.errors import UserError

    assert any("harmless" in w for w in warnings_for(_cfg(compress="qsgd", error_feedback=True)))
    assert any("biased" in w for w in warnings_for(_cfg(compress="sign")))
    assert warnings_for(_cfg(compress="topk", error_feedback=True)) == []
    from_dict({"dp_clip": "1", "dp_noise_multiplier": "1", "compress": "sign"})  # allowed
    for bad, msg in [({"compress_ratio": "0"}, r"\(0, 1\]"), ({"compress_ratio": "1.5"}, r"\(0, 1\]"),
                     ({"compress_bits": "0"}, "1..16"), ({"compress_bits": "17"}, "1..16"),
                     ({"prune": "1"}, r"\[0, 1\)"), ({"compress": "zip"}, "unknown"),
                     ({"prune": "0.5", "compress_down": "fp16"}, "cannot be combined"),
                     ({"dp_clip": "1", "dp_noise_multiplier": "1", "compress": "qsgd"},
                      "breaks the privacy guarantee"),
                     ({"dp_clip": "1", "dp_noise_multiplier": "1", "compress": "topk",
                       "error_feedback": True}, "without --error-feedback")]:
        with pytest.raises(UserError, match=msg):
            from_dict(bad)
