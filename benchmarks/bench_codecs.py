"""Speed and size of the update codecs on one real client update, one thread.

    PYTHONPATH=. python benchmarks/bench_codecs.py [--repeats 20]

The update is what one Fashion-MNIST client sends in the FedAvg paper's
setting: the 784-200-200-10 MLP (P = 199,210), 600 samples, one epoch at
B = 10, lr 0.05, from a fresh model (random uint8 images if the data set is
missing, and it says so). For each codec it prints, all measured in this run:
encoded bytes and the reduction against float32 (4 P bytes), the relative
error ||decode(encode(x)) - x|| / ||x||, the best-of---repeats encode and
decode times, and those times as a fraction of the baseline: training that
client's epoch (kernels.train_local, best of --repeats / 4), i.e. the
compression overhead a client adds to its round. Best-of rather than median
because on a shared machine the fastest call is the least disturbed one.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from bench_kernels import LR, SIZES, load_data  # noqa: E402
from common import cpu_model  # noqa: E402  benchmarks/common.py (scripts run from benchmarks/)

CODECS = [("topk", dict(ratio=0.01)), ("topk", dict(ratio=0.1)), ("randk", dict(ratio=0.01)),
          ("qsgd", dict(bits=8)), ("qsgd", dict(bits=4)), ("qsgd", dict(bits=2)),
          ("qsgd", dict(bits=8, coding="fixed")), ("qsgd", dict(bits=4, coding="fixed")),
          ("sign", {}), ("fp16", {})]


def best_seconds(fn, repeats: int) -> float:
    """Fastest of `repeats` calls: on a shared machine the least disturbed one."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.min(times))


def client_update(x, y, repeats):
    """(one client's update after an epoch, median seconds of that epoch)."""
    from fedmpi.model import kernels
    from fedmpi.model.mlp import MLP

    model = MLP(SIZES)
    start = model.init(np.random.default_rng(0))
    sizes = model.sizes_array
    ws = kernels.workspace(sizes)
    grad = kernels.aligned_zeros(model.num_params)
    state = kernels.aligned_zeros(2 * model.num_params)
    order = np.random.default_rng(1).permutation(x.shape[0])
    empty = np.zeros(0, np.float32)
    params = start.copy()

    def train():
        params[:] = start
        kernels.train_local(params, sizes, model.weight_offsets, model.bias_offsets, x,
                            np.float32(1 / 255), y, order, 1, 10,
                            kernels.LOSSES["cross_entropy"], kernels.OPTIMIZERS["sgd"], LR,
                            0.0, 0.0, 0.9, 0.999, 1e-8, 0.0, empty, empty, grad, state, ws)

    train()  # compile
    seconds = best_seconds(train, repeats)
    return params - start, seconds


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20, help="timed calls, fastest taken")
    args = ap.parse_args(argv)

    import llvmlite.binding as llvm
    import numba

    from fedmpi.compression import codecs as C

    print("fedmpi codec benchmark: one thread, one client update of the 784-200-200-10 MLP")
    print(f"  python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}")
    print(f"  cpu: {cpu_model()}; numba compiles for "
          f"{numba.config.CPU_NAME or llvm.get_host_cpu_name()}")
    if hasattr(os, "getloadavg"):
        print(f"  load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    x, y, what = load_data(600, np.random.default_rng(0))
    print(f"  data: {what}")
    update, train_s = client_update(x, y, max(3, args.repeats // 4))
    p = update.size
    print(f"  baseline: one client's local epoch (600 samples, B=10): {train_s * 1e3:.1f} ms; "
          f"float32 update {4 * p} bytes")
    key = C.Key(seed=1, round=1, client=0)
    header = (f"  {'codec':<26} {'bytes':>9} {'vs fp32':>8} {'rel.err':>8} "
              f"{'encode ms':>10} {'decode ms':>10} {'enc+dec / epoch':>16}")
    print(header)
    for name, settings in CODECS:
        codec = C.make_codec(name, **settings)
        buf = codec.encode(update, key)  # compiles
        out = C.decode(buf)
        err = float(np.linalg.norm(out - update) / np.linalg.norm(update))
        enc = best_seconds(lambda: codec.encode(update, key), args.repeats)
        dec = best_seconds(lambda: C.decode(buf), args.repeats)
        label = name + "".join(f" {k}={v}" for k, v in settings.items())
        print(f"  {label:<26} {buf.size:>9} {4 * p / buf.size:>7.1f}x {err:>8.3f} "
              f"{enc * 1e3:>10.2f} {dec * 1e3:>10.2f} {(enc + dec) / train_s:>15.1%}")


if __name__ == "__main__":
    main()
