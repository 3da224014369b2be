"""Single-thread local-training throughput: fedmpi's numba kernels vs plain NumPy.

    PYTHONPATH=. python benchmarks/bench_kernels.py [--samples 6000] [--repeats 5]

For the 784-200-200-10 MLP with plain SGD (softmax cross-entropy) this
prints, all measured in the same run on one thread:
- samples/s of kernels.train_local, one epoch over --samples samples, at
  minibatch 10 and 50 (median of --repeats, after a warm-up call that compiles);
- samples/s of a plain NumPy implementation of the same training loop
  (float32, same maths, BLAS matrix products) and the ratio of the two: the
  two are timed alternately, and each repeat gives one ratio, so the median
  and the range (min-max) of the ratios are reported;
- the same for test-set evaluation (forward pass, loss and accuracy over the
  first --samples test images in the 250-sample chunks the round loop uses),
  as the round loop runs it (kernels.evaluate_grouped), and the training
  forward pass over the same chunks (kernels.evaluate: same bits, checked);
- the matrix-multiply peak of this machine (2048x2048 float32 np.dot, best of
  --repeats) and the compute bound it implies for the dense network
  (2 * (784*200 + 200*200 + 200*10) * 3 = 1.19 MFLOP per sample, forward
  plus backward), and the fraction of it that the kernels reach. The kernels
  skip zero inputs and ReLU outputs, so they do fewer FLOPs than that and the
  fraction can in principle exceed 1.

Times are CPU seconds of this (single-threaded) process, so that other
processes preempting it on a shared machine do not count; they still share
caches and memory bandwidth, hence the ranges.

Uses Fashion-MNIST from /usr/share/datasets/fashion-mnist if present, otherwise
random uint8 images with about half the pixels zero (and says so).

To measure the AVX2 code on an AVX-512 machine, make both sides use AVX2:
    NUMBA_CPU_NAME=znver3 NUMBA_CPU_FEATURES= OPENBLAS_CORETYPE=Haswell \
        python benchmarks/bench_kernels.py
"""

from __future__ import annotations

import os

# one thread everywhere; must happen before numpy / numba are imported
for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import gzip  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from common import cpu_model  # noqa: E402  benchmarks/common.py (scripts run from benchmarks/)

SIZES = (784, 200, 200, 10)
FLOP_PER_SAMPLE = 2 * sum(a * b for a, b in zip(SIZES[:-1], SIZES[1:])) * 3
DATA_DIR = "/usr/share/datasets/fashion-mnist"
LR = 0.05
EVAL_CHUNK = 250  # test samples per evaluation chunk, as in fedmpi.runtime.loop


def load_data(n: int, rng: np.random.Generator, split: str = "train"):
    """(uint8 images (n, 784), int32 labels, description); split "train" or "t10k"."""
    img_path = os.path.join(DATA_DIR, f"{split}-images-idx3-ubyte.gz")
    lab_path = os.path.join(DATA_DIR, f"{split}-labels-idx1-ubyte.gz")
    if os.path.exists(img_path) and os.path.exists(lab_path):
        with gzip.open(img_path) as f:
            img = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, SIZES[0])
        with gzip.open(lab_path) as f:
            lab = np.frombuffer(f.read(), np.uint8, offset=8).astype(np.int32)
        if img.shape[0] >= n:
            return np.ascontiguousarray(img[:n]), lab[:n], f"Fashion-MNIST ({DATA_DIR}), first {n}"
    img = rng.integers(1, 256, size=(n, SIZES[0]), dtype=np.uint8)
    img[rng.random(img.shape) < 0.5] = 0
    lab = rng.integers(0, SIZES[-1], size=n).astype(np.int32)
    return img, lab, (f"RANDOM data ({n} samples, ~50% zero pixels): "
                      f"Fashion-MNIST not found in {DATA_DIR}")


def fedmpi_trainer(x, y, batch, augment=None):
    """A function (params, order) -> loss sum that runs kernels.train_local;
    `augment(order)` gives each call's kernels.Augment (bench_augment.py)."""
    from fedmpi.model import kernels as K
    from fedmpi.model.mlp import MLP

    model = MLP(SIZES)
    sizes, woff, boff = model.sizes_array, model.weight_offsets, model.bias_offsets
    ws = K.workspace(sizes)
    grad = np.zeros(model.num_params, np.float32)
    state = np.zeros(2 * model.num_params, np.float32)
    empty = np.zeros(0, np.float32)
    xscale = np.float32(1.0 / 255.0)
    settings = K.train_settings(1, batch, K.LOSS_CE, K.OPT_SGD, LR)

    def run(params, o):
        return K.train_local(params, sizes, woff, boff, x, xscale, y, o, settings, empty, empty,
                             grad, state, ws, None if augment is None else augment(o))[0]
    return run


def numpy_train(p, x, y, order, batch):
    """The same training loop in plain NumPy: float32, BLAS products, in place on p."""
    layers = []
    pos = 0
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        w = p[pos:pos + n_in * n_out].reshape(n_in, n_out)
        pos += n_in * n_out
        layers.append((w, p[pos:pos + n_out]))
        pos += n_out
    nl = len(layers)
    lr = np.float32(LR)
    scale = np.float32(1.0 / 255.0)
    loss = 0.0
    for s0 in range(0, order.size, batch):
        rows = order[s0:s0 + batch]
        nb = rows.size
        acts = [x[rows].astype(np.float32) * scale]
        for i, (w, b) in enumerate(layers):
            z = acts[-1] @ w
            z += b
            if i < nl - 1:
                np.maximum(z, 0.0, out=z)
            acts.append(z)
        out = acts[-1]
        m = out.max(axis=1, keepdims=True)
        e = np.exp(out - m)
        s = e.sum(axis=1, keepdims=True)
        t = y[rows]
        loss += float(np.sum(np.log(s[:, 0]) + m[:, 0] - out[np.arange(nb), t]))
        delta = e / s
        delta[np.arange(nb), t] -= 1.0
        delta *= np.float32(1.0 / nb)
        for i in range(nl - 1, -1, -1):
            w, b = layers[i]
            gw = acts[i].T @ delta
            gb = delta.sum(axis=0)
            if i > 0:
                delta = delta @ w.T
                delta *= acts[i] > 0
            w -= lr * gw
            b -= lr * gb
    return loss


def fedmpi_evaluator(x, y, grouped=True):
    """A function params -> (loss sum, correct) over 250-sample chunks. grouped:
    kernels.evaluate_grouped over eval_order's look-alike groups, as the round loop
    runs it (the orders made once, as LocalTrainer does); else kernels.evaluate, the
    training forward pass over consecutive samples (same bits, slower)."""
    from fedmpi.model import kernels as K
    from fedmpi.model.mlp import MLP

    model = MLP(SIZES)
    sizes, woff, boff = model.sizes_array, model.weight_offsets, model.bias_offsets
    ws = K.workspace(sizes)
    ews = K.eval_workspace(sizes, EVAL_CHUNK)
    xscale = np.float32(1.0 / 255.0)
    n = x.shape[0]
    chunks = [(s0, min(n, s0 + EVAL_CHUNK)) for s0 in range(0, n, EVAL_CHUNK)]
    orders = [K.eval_order(x, a, b) for a, b in chunks]

    def run(params):
        loss, correct = 0.0, 0
        for (a, b), order in zip(chunks, orders):
            if grouped:
                lo, c = K.evaluate_grouped(params, sizes, woff, boff, x, xscale, y, order,
                                           K.LOSS_CE, ews)
            else:
                lo, c = K.evaluate(params, sizes, woff, boff, x, xscale, y, a, b, K.LOSS_CE, ws)
            loss += lo
            correct += c
        return loss, correct
    return run


def numpy_evaluate(p, x, y):
    """(loss sum, correct) of the same network in plain NumPy, 250-sample chunks."""
    layers = []
    pos = 0
    for n_in, n_out in zip(SIZES[:-1], SIZES[1:]):
        layers.append((p[pos:pos + n_in * n_out].reshape(n_in, n_out),
                       p[pos + n_in * n_out:pos + n_in * n_out + n_out]))
        pos += n_in * n_out + n_out
    scale = np.float32(1.0 / 255.0)
    loss, correct = 0.0, 0
    for s0 in range(0, x.shape[0], EVAL_CHUNK):
        a = x[s0:s0 + EVAL_CHUNK].astype(np.float32) * scale
        for i, (w, b) in enumerate(layers):
            a = a @ w
            a += b
            if i < len(layers) - 1:
                np.maximum(a, 0.0, out=a)
        t = y[s0:s0 + EVAL_CHUNK]
        m = a.max(axis=1, keepdims=True)
        s = np.exp(a - m).sum(axis=1)
        loss += float(np.sum(np.log(s) + m[:, 0] - a[np.arange(a.shape[0]), t]))
        correct += int(np.sum(a.argmax(axis=1) == t))
    return loss, correct


def interleaved(runs, repeats):
    """CPU seconds of each of `runs` (argument-less callables) per repeat, timed in turn
    so that both see the same machine load; plus each one's last result."""
    for run in runs:  # warm-up: compile (or load numba's cache), touch memory
        run()
    times = np.zeros((repeats, len(runs)))
    results = [None] * len(runs)
    for r in range(repeats):
        for i, run in enumerate(runs):
            t0 = time.process_time()
            results[i] = run()
            times[r, i] = time.process_time() - t0
    return times, results


def aligned_copy(p):
    """p in a cache-line aligned buffer, as fedmpi trains clients (a plain copy may
    start mid-line, and then every vector load of the weights straddles two lines)."""
    from fedmpi.model.simd import aligned_zeros

    out = aligned_zeros(p.size)
    out[:] = p
    return out


def bench_train(p0, x, y, order, batch, repeats):
    """Per-repeat CPU seconds of (fedmpi, numpy) for one epoch, and their mean losses."""
    fed = fedmpi_trainer(x, y, batch)
    fed(aligned_copy(p0), order[:2 * batch])
    runs = [lambda: fed(aligned_copy(p0), order),
            lambda: numpy_train(aligned_copy(p0), x, y, order, batch)]
    times, results = interleaved(runs, repeats)
    return times, [r / order.size for r in results]


def bench_eval(p, x, y, repeats):
    """CPU seconds per repeat of (grouped evaluation, numpy, row-order evaluation)."""
    fed = fedmpi_evaluator(x, y)
    seq = fedmpi_evaluator(x, y, grouped=False)
    runs = [lambda: fed(p), lambda: numpy_evaluate(p, x, y), lambda: seq(p)]
    return interleaved(runs, repeats)


def report(label, n, times, bound=None, extra=""):
    """One line: median samples/s of both, median ratio and its range over repeats."""
    rate = n / np.median(times, axis=0)
    ratios = times[:, 1] / times[:, 0]
    frac = f"{rate[0] / bound:>8.1%}" if bound else f"{'':>8}"
    print(f"{label:>6}  {rate[0]:>10,.0f}  {rate[1]:>10,.0f}  {np.median(ratios):>5.2f}x  "
          f"{ratios.min():>5.2f}-{ratios.max():<5.2f}  {frac}  {extra}")


def matmul_peak(repeats, n=2048):
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    a @ b
    best = np.inf
    for _ in range(repeats):
        t0 = time.process_time()
        a @ b
        best = min(best, time.process_time() - t0)
    return 2.0 * n ** 3 / best


def openblas_core():
    """The kernel set OpenBLAS chose (e.g. SkylakeX, Haswell, Zen), if it says."""
    import ctypes
    import glob

    libdir = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for lib in glob.glob(os.path.join(libdir, "*openblas*")):
        try:
            dll = ctypes.CDLL(lib)
        except OSError:
            continue
        for name in ("scipy_openblas_get_corename64_", "openblas_get_corename64_",
                     "openblas_get_corename"):
            fn = getattr(dll, name, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                return fn().decode()
    return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=6000, help="samples per epoch (default 6000)")
    ap.add_argument("--repeats", type=int, default=5, help="timed runs of each, interleaved (default 5)")
    args = ap.parse_args(argv)
    if args.samples < 50 or args.repeats < 1:
        ap.error("need --samples >= 50 and --repeats >= 1")

    import numba

    from fedmpi.model.mlp import MLP

    print("fedmpi kernel benchmark: one thread, 784-200-200-10 MLP, plain SGD, cross-entropy")
    print(f"  python {platform.python_version()}, numpy {np.__version__}, "
          f"numba {numba.__version__}")
    import llvmlite.binding as llvm

    from fedmpi.model.simd import VECTOR_BITS

    print(f"  cpu: {cpu_model()}; numba compiles for "
          f"{numba.config.CPU_NAME or llvm.get_host_cpu_name()}, {VECTOR_BITS}-bit vectors; "
          f"OpenBLAS kernels: {openblas_core()}")
    if hasattr(os, "getloadavg"):
        load = os.getloadavg()[0]
        busy = " -- machine busy, timings may be low" if load > 0.5 * (os.cpu_count() or 1) else ""
        print(f"  load average {load:.2f} on {os.cpu_count()} CPUs{busy}")
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                "NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "NUMBA_CPU_NAME", "NUMBA_CPU_FEATURES"):
        print(f"  {var}={os.environ.get(var, '(unset)')}")

    rng = np.random.default_rng(0)
    x, y, what = load_data(args.samples, rng)
    print(f"  data: {what}")
    nz = float(np.count_nonzero(x)) / x.size
    print(f"  non-zero pixels: {nz:.1%}; epoch of {args.samples} samples, "
          f"{args.repeats} interleaved repeats")

    p0 = MLP(SIZES).init(np.random.default_rng(1))
    order = rng.permutation(args.samples).astype(np.int64)

    peak = matmul_peak(args.repeats)
    bound = peak / FLOP_PER_SAMPLE
    print()
    print(f"matmul peak (2048^2 float32 np.dot): {peak / 1e9:.1f} GFLOP/s -> compute bound "
          f"{bound:,.0f} samples/s at {FLOP_PER_SAMPLE / 1e6:.2f} MFLOP/sample")
    print()
    print("samples/s are medians; ratio = fedmpi/numpy, median and range over the repeats")
    print(f"{'batch':>6}  {'fedmpi/s':>10}  {'numpy/s':>10}  {'ratio':>6}  {'range':^11}  "
          f"{'of bound':>8}  loss fedmpi / numpy")
    for batch in (10, 50):
        times, (fl, nl) = bench_train(p0, x, y, order, batch, args.repeats)
        report(batch, args.samples, times, bound, f"{fl:.5f} / {nl:.5f}")
    # evaluate a trained model (realistic ReLU sparsity), as the round loop does
    trained = aligned_copy(p0)
    fedmpi_trainer(x, y, 10)(trained, order)
    # test images: the evaluation groups look-alike samples of each 250-sample chunk
    xt, yt, _ = load_data(args.samples, rng, "t10k")
    times, ((fl, fc), (nl, nc), seq) = bench_eval(trained, xt, yt, args.repeats)
    report("eval", args.samples, times[:, :2], None,
           f"{fl / args.samples:.5f} / {nl / args.samples:.5f}, accuracy "
           f"{fc / args.samples:.4f} / {nc / args.samples:.4f}")
    report("e-rows", args.samples, times[:, [2, 1]], None,
           "evaluate (training forward, row order): " +
           ("same bits" if seq == (fl, fc) else f"DIFFERENT: {seq} vs {(fl, fc)}"))
    speedup = times[:, 2] / times[:, 0]
    print(f"\ngrouped evaluation vs row order (evaluate_grouped vs evaluate): "
          f"{np.median(speedup):.2f}x (range {speedup.min():.2f}-{speedup.max():.2f})")


if __name__ == "__main__":
    main()
