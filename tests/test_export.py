"""fedmpi-report export: npz and ONNX predictions match fedmpi's own forward pass."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fedmpi import report
from fedmpi.model import kernels
from fedmpi.model.mlp import MLP
from fedmpi.results import ResultsWriter

SIZES = (20, 12, 9, 4)
XSCALE = np.float32(1.0 / 255.0)


def _write_run(path, with_params=True):
    model = MLP(SIZES)
    params = model.init(np.random.default_rng(0))
    params += np.random.default_rng(1).normal(0, 0.05, params.size).astype(np.float32)  # biases too
    with ResultsWriter(str(path), overwrite=False, config={"dataset": "fashion-mnist"}, attrs={},
                       layer_sizes=list(SIZES), partition_sizes=np.ones(2, np.int64),
                       label_histogram=np.ones((2, 4), np.int64)) as w:
        if with_params:
            w.write_params("params", params)
    return params


def _pixels(n=50):
    x = np.random.default_rng(2).integers(0, 256, (n, SIZES[0])).astype(np.uint8)
    x[:, :5] = 0  # zero inputs take the kernels' sparse path
    return x


def _fedmpi_logits(params, x):
    """Logits from fedmpi's numba forward pass, one tile at a time."""
    model = MLP(SIZES)
    sizes = model.sizes_array
    ws = kernels.workspace(sizes)
    out = []
    for t0 in range(0, x.shape[0], kernels.TILE):
        rows = np.arange(t0, min(x.shape[0], t0 + kernels.TILE))
        off = kernels._forward(params, sizes, model.weight_offsets, model.bias_offsets, x, XSCALE,
                               rows, ws, False)
        out.append(ws[0][off:off + rows.size * SIZES[-1]].reshape(rows.size, SIZES[-1]).copy())
    return np.concatenate(out)


def _numpy_forward(z, x):
    a = x.astype(np.float32) * z["x_scale"]
    n = len(z["layer_sizes"]) - 1
    for i in range(n):
        a = a @ z[f"W{i}"] + z[f"b{i}"]
        if i < n - 1:
            a = np.maximum(a, 0)
    return a


def test_npz_export_matches_fedmpi_forward(tmp_path, capsys):
    params = _write_run(tmp_path / "run.h5")
    assert report.main(["export", str(tmp_path / "run.h5"), "--format", "npz"]) == 0
    assert "run.npz" in capsys.readouterr().out
    z = np.load(tmp_path / "run.npz", allow_pickle=False)
    assert z["layer_sizes"].tolist() == list(SIZES)
    assert z["W0"].shape == (20, 12) and z["b2"].shape == (4,)
    assert str(z["hidden_activation"]) == "relu" and z["x_scale"] == np.float32(1 / 255)
    x = _pixels()
    ours = _fedmpi_logits(params, x)
    np.testing.assert_allclose(_numpy_forward(z, x), ours, rtol=1e-5, atol=1e-5)
    # And the counts of fedmpi's evaluate kernel agree with the export's argmax.
    model = MLP(SIZES)
    y = np.random.default_rng(3).integers(0, 4, x.shape[0]).astype(np.int32)
    _, correct = kernels.evaluate(params, model.sizes_array, model.weight_offsets,
                                  model.bias_offsets, x, XSCALE, y, 0, x.shape[0],
                                  kernels.LOSSES["cross_entropy"], kernels.workspace(model.sizes_array))
    assert correct == int((np.argmax(_numpy_forward(z, x), axis=1) == y).sum())


def test_onnx_export_matches_fedmpi_forward(tmp_path):
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    params = _write_run(tmp_path / "run.h5")
    out = tmp_path / "model.onnx"
    assert report.main(["export", str(tmp_path / "run.h5"), "--format", "onnx",
                        "--out", str(out)]) == 0
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["x"]
    x = _pixels(70)
    (logits,) = sess.run(["logits"], {"x": x.astype(np.float32) * XSCALE})
    np.testing.assert_allclose(logits, _fedmpi_logits(params, x), rtol=1e-5, atol=1e-5)


def test_export_errors(tmp_path, monkeypatch, capsys):
    _write_run(tmp_path / "unfinished.h5", with_params=False)
    assert report.main(["export", str(tmp_path / "unfinished.h5")]) == 2
    assert "no /model/params" in capsys.readouterr().err
    _write_run(tmp_path / "run.h5")
    assert report.main(["export", str(tmp_path / "run.h5")]) == 0
    assert report.main(["export", str(tmp_path / "run.h5")]) == 2
    assert "already exists" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if not installed
    assert report.main(["export", str(tmp_path / "run.h5"), "--format", "onnx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmpi-report: error:") and "pip install 'fedmpi[onnx]'" in err
    assert not (tmp_path / "run.onnx").exists()
