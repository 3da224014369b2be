"""Compression in real runs: bytes logged = buffers sent, bitwise equal at 1/3/8 ranks and
after resume, residuals checkpointed, pruned weights stay zero, bad input is one line."""

from __future__ import annotations

import math

import h5py
import numpy as np
import pytest

from conftest import SMALL_SYNTHETIC, describe, launch_fedmpi
from fedmpi.compression import codecs as C
from fedmpi.results import read_checkpoint

# error feedback, top-k with varint indices and a gradual prune: all per-client and
# server state at once
EF_PRUNE = ["--compress", "topk", "--compress-ratio", "0.05", "--error-feedback",
            "--prune", "0.4", "--prune-start", "1", "--prune-end", "3"]


def _run(tmp_path, name, args, ranks=1, rounds=4, expect=0):
    out = tmp_path / f"{name}.h5"
    res = launch_fedmpi([*SMALL_SYNTHETIC, "--rounds", str(rounds), *args, "--out", str(out),
                         "--overwrite"], ranks=ranks, timeout=240)
    assert res.returncode == expect, describe(res)
    return out, res


def _read(path):
    """(rounds, clients, final params, last checkpoint's arrays) of a results file."""
    with h5py.File(path, "r") as f:
        rounds = {k: f["rounds"][k][()] for k in f["rounds"]}
        clients = {k: f["clients"][k][()] for k in f["clients"]}
        params = f["model/params"][()] if "params" in f["model"] else None
    ckpt = read_checkpoint(str(path))
    return rounds, clients, params, ckpt[2] if ckpt else {}


@pytest.fixture(scope="module")
def ef_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("ef")
    return {n: _read(_run(d, f"n{n}", EF_PRUNE, ranks=n)[0]) for n in (1, 3, 8)}


def test_bitwise_identical_at_1_3_8_ranks(ef_runs):
    rounds1, clients1, params1, _ = ef_runs[1]
    for n in (3, 8):
        rounds, clients, params, _ = ef_runs[n]
        assert np.array_equal(params, params1), f"{n} ranks"
        for k in ("test_accuracy", "train_loss", "bytes_up", "bytes_down", "weight_sparsity"):
            assert np.array_equal(rounds[k], rounds1[k], equal_nan=True), (n, k)
        assert np.array_equal(clients["bytes_up"], clients1["bytes_up"])


def test_logged_bytes_are_the_encoded_buffers(ef_runs):
    rounds, clients, params, ckpt = ef_runs[1]
    assert "bytes_up" in clients
    per_round = [clients["bytes_up"][clients["round"] == r].sum() for r in rounds["round"]]
    assert np.array_equal(rounds["bytes_up"], per_round)
    p = params.size
    k = math.ceil(0.05 * p)
    # top-k buffer: 8-byte header, k as uint32, k float32 values, k varint gaps (1-2 bytes)
    assert np.all(clients["bytes_up"] >= 8 + 4 + 4 * k + k)
    assert np.all(clients["bytes_up"] <= 8 + 4 + 4 * k + 2 * k)
    # Pruned broadcast: header, a P-bit mask, the surviving float32 values.
    mask = np.unpackbits(ckpt["prune_mask"], count=p, bitorder="little").astype(bool)
    assert rounds["bytes_down"][-1] == 5 * (8 + math.ceil(p / 8) + 4 * int(mask.sum()))
    # Every client that trained holds a residual in the checkpoint.
    assert sorted(ckpt["ef_residual_ids"]) == sorted(set(clients["client_id"].tolist()))
    assert ckpt["ef_residual_rows"].shape == (len(ckpt["ef_residual_ids"]), p)


def test_pruned_weights_stay_zero(ef_runs):
    rounds, _, params, ckpt = ef_runs[1]
    assert rounds["weight_sparsity"][0] == 0.0  # round 1's clients trained the dense model
    assert rounds["weight_sparsity"][-1] == pytest.approx(0.4, abs=0.01)
    mask = np.unpackbits(ckpt["prune_mask"], count=params.size, bitorder="little").astype(bool)
    assert np.all(params[~mask] == 0.0)


def test_resume_continues_bitwise(tmp_path, ef_runs):
    out, _ = _run(tmp_path, "resumed", EF_PRUNE, ranks=3, rounds=2)
    # The second half keeps its residuals in a memory-mapped file: same results.
    res = launch_fedmpi([*SMALL_SYNTHETIC, "--rounds", "4", *EF_PRUNE, "--resume", str(out),
                         "--client-state-dir", str(tmp_path)], ranks=1, timeout=240)
    assert res.returncode == 0, describe(res)
    rounds, clients, params, _ = _read(out)
    assert np.array_equal(params, ef_runs[1][2])
    assert np.array_equal(rounds["bytes_up"], ef_runs[1][0]["bytes_up"])
    assert "spilled to" in res.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("fedmpi-")] == []  # removed


@pytest.mark.parametrize("args,length", [
    (["--compress", "qsgd", "--compress-bits", "4", "--aggregator", "median"], None),
    (["--compress", "sign", "--error-feedback", "--aggregator", "trimmed_mean", "--trim", "0.2"],
     lambda p: 8 + 4 + math.ceil(p / 8)),  # header, scale, one bit per coordinate
    (["--compress", "randk", "--compress-ratio", "0.2", "--compress-down", "qsgd"],
     lambda p: 8 + 4 + 16 + 4 * math.ceil(0.2 * p)),  # header, k, key, k values
])
def test_other_compressors_and_robust_aggregators_at_1_and_3_ranks(tmp_path, args, length):
    a = _read(_run(tmp_path, "a", args, ranks=1, rounds=2)[0])
    b = _read(_run(tmp_path, "b", args, ranks=3, rounds=2)[0])
    assert np.array_equal(a[2], b[2])
    assert np.all(np.isfinite(a[0]["test_loss"]))
    p = a[2].size
    assert np.all(a[0]["bytes_up"] < a[0]["num_clients"] * 4 * p)
    if length is not None:
        assert np.all(a[1]["bytes_up"] == length(p))


def test_downlink_fp16_bytes_and_a_warning(tmp_path):
    out, res = _run(tmp_path, "down", ["--compress", "qsgd", "--error-feedback",
                                       "--compress-down", "fp16"], rounds=2)
    assert "fedmpi: warning: --error-feedback with --compress qsgd" in res.stderr
    rounds, _, params, _ = _read(out)
    assert np.all(rounds["bytes_down"] == rounds["num_sampled"] * (8 + 2 * params.size))


def test_bad_input_is_one_line(tmp_path):
    # (every bad value's message is checked without MPI in test_compression.py)
    _, res = _run(tmp_path, "bad", ["--compress", "qsgd", "--compress-bits", "17"], rounds=1,
                  expect=2)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedmpi: error:")
    assert "--compress-bits must be in 1..16" in lines[0]


def test_decoded_sum_matches_numpy_reference():
    """What rank 0 does with the gathered buffers, against a NumPy weighted mean."""
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((4, 300)).astype(np.float32)
    codec = C.make_codec("qsgd", bits=3)
    bufs = [codec.encode(u, C.Key(1, 1, c)) for c, u in enumerate(updates)]
    w = np.array([0.1, 0.2, 0.3, 0.4])
    ref = (w[:, None] * np.stack([C.decode(b) for b in bufs]).astype(np.float64)).sum(axis=0)
    total = np.zeros(300)
    for wk, b in zip(w, bufs):
        total += wk * C.decode(b)
    np.testing.assert_allclose(total, ref, rtol=1e-12, atol=1e-12)
