"""``fedmpi-report export RUN.h5 --format npz|onnx``: the trained model for use outside fedmpi.

The model is the run's MLP: hidden layers ReLU(x @ W_l + b_l), the last
layer's raw outputs (logits; argmax is the predicted class). Its input is
the features as the kernels see them: raw data times the data set's input
scale (pixels / 255 for the IDX images), recorded as ``x_scale`` where the
data set tells it.

- npz: arrays W0, b0, W1, b1, ... (W_l of shape (inputs, outputs)), plus
  layer_sizes, x_scale (if known), hidden_activation ("relu") and output
  ("logits"); ``np.load`` without pickle reads it.
- onnx: a graph of MatMul, Add and Relu nodes, input "x" (N, inputs) float32,
  output "logits" (N, classes); needs the optional extra
  ``pip install 'fedmpi[onnx]'`` (onnx; onnxruntime to run it).
"""

from __future__ import annotations

import os

import numpy as np

from fedmpi.errors import UserError

FORMATS = ("npz", "onnx")
ONNX_OPSET = 13  # MatMul/Add/Relu as they have been since 2020: any onnxruntime >= 1.7 runs it
ONNX_IR_VERSION = 7  # the IR version of opset 13


def load_layers(path: str) -> tuple[list[tuple[np.ndarray, np.ndarray]], dict]:
    """([(W, b), ...], config) of the final model in a results file."""
    from fedmpi import analysis

    run = analysis.load(path)
    return [(np.array(w), np.array(b)) for w, b in run.layers()], run.config


def input_scale(config: dict) -> float | None:
    """The factor fedmpi applied to the raw features of the run's data set, if known."""
    name = str(config.get("dataset", ""))
    if name in ("fashion-mnist", "mnist"):
        return 1.0 / 255.0
    if name == "synthetic":
        return 1.0
    return None  # npz:PATH: 1/255 for uint8 features, else 1 -- the file decides


def forward(layers, x: np.ndarray) -> np.ndarray:
    """NumPy reference forward pass: logits (N, classes) of features x (N, inputs)."""
    a = np.asarray(x, np.float32)
    for i, (w, b) in enumerate(layers):
        a = a @ w + b
        if i < len(layers) - 1:
            a = np.maximum(a, np.float32(0))
    return a


def to_npz(layers, config: dict, out: str) -> None:
    arrays = {}
    for i, (w, b) in enumerate(layers):
        arrays[f"W{i}"], arrays[f"b{i}"] = w, b
    sizes = [layers[0][0].shape[0]] + [w.shape[1] for w, _ in layers]
    arrays["layer_sizes"] = np.asarray(sizes, np.int64)
    scale = input_scale(config)
    if scale is not None:
        arrays["x_scale"] = np.float32(scale)
    arrays["hidden_activation"] = np.array("relu")
    arrays["output"] = np.array("logits")
    with open(out, "wb") as f:
        np.savez(f, **arrays)


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install 'fedmpi[onnx]' "
                        "(or pip install onnx onnxruntime)") from None
    return onnx


def onnx_model(layers, config: dict):
    """The MLP as an onnx.ModelProto: MatMul + Add (+ Relu) per layer."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    prev = "x"
    for i, (w, b) in enumerate(layers):
        inits += [numpy_helper.from_array(np.ascontiguousarray(w, np.float32), f"W{i}"),
                  numpy_helper.from_array(np.ascontiguousarray(b, np.float32), f"b{i}")]
        last = i == len(layers) - 1
        out = "logits" if last else f"h{i}"
        nodes.append(helper.make_node("MatMul", [prev, f"W{i}"], [f"z{i}_mm"], name=f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"z{i}_mm", f"b{i}"],
                                      [out if last else f"z{i}"], name=f"add{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [f"z{i}"], [out], name=f"relu{i}"))
        prev = out
    graph = helper.make_graph(
        nodes, "fedmpi_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", layers[0][0].shape[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                       ["N", layers[-1][0].shape[1]])],
        initializer=inits)
    model = helper.make_model(graph, producer_name="fedmpi",
                              opset_imports=[helper.make_opsetid("", ONNX_OPSET)])
    model.ir_version = ONNX_IR_VERSION
    scale = input_scale(config)
    meta = {"output": "logits", "dataset": str(config.get("dataset", ""))}
    if scale is not None:
        meta["x_scale"] = repr(scale)
    helper.set_model_props(model, meta)
    onnx.checker.check_model(model)
    return model


def export(path: str, fmt: str, out: str | None = None, overwrite: bool = False) -> str:
    """Write the final model of results file `path` as `fmt`; returns the output path."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose {' or '.join(FORMATS)}")
    if out is None:
        out = os.path.splitext(path)[0] + "." + fmt
    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite or choose another --out")
    if fmt == "onnx":
        _onnx()  # fail before reading the run
    layers, config = load_layers(path)
    if fmt == "npz":
        to_npz(layers, config, out)
    else:
        with open(out, "wb") as f:
            f.write(onnx_model(layers, config).SerializeToString())
    return out


def cmd_export(args) -> int:
    out = export(args.run, args.format, args.out, args.overwrite)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    """Register ``export`` on fedmpi-report's subcommands."""
    s = sub.add_parser("export", help="write a run's final model as npz or ONNX",
                       description="The final model of RUN for use outside fedmpi: npz "
                                   "(arrays W0, b0, W1, b1, ...; ReLU hidden layers, "
                                   "logits out) or ONNX (MatMul/Add/Relu graph; needs "
                                   "pip install 'fedmpi[onnx]'). Inputs are features as "
                                   "fedmpi scales them (x_scale: pixels / 255).")
    s.add_argument("run", metavar="RUN", help="one finished results file")
    s.add_argument("--format", choices=FORMATS, default="npz",
                   help="npz (default) or onnx")
    s.add_argument("--out", metavar="FILE",
                   help="output file (default: RUN with the format's suffix)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing FILE")
    s.set_defaults(func=cmd_export)
