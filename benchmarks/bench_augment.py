"""What --augment costs in local training: kernels.train_local with and without it.

    PYTHONPATH=. python benchmarks/bench_augment.py [--samples 6000] [--repeats 5]

784-200-200-10 MLP, plain SGD, one epoch over --samples Fashion-MNIST images
(random images if it is not installed), one thread, CPU seconds, timed
interleaved (see bench_kernels.py). Rows: plain training; the augmented gather
with all offsets 0 (plain's inputs, so its own overhead); --augment shift
(each visited sample moved by its own (dy, dx) in -2..2, read in place);
--augment-noise 0.1 without shifts; both. Each augmented row is given as a
ratio to the plain run of the same repeat (median and range), so machine
load cancels. The shifts are drawn inside the timed call, as LocalTrainer
draws them (int8, 2 bytes per visited sample).

Noise changes more than the gather: every input becomes non-zero, so layer 1
no longer skips the ~half of the pixels that are zero, and its forward
pass, weight update and input CSR all grow; shifts keep the zeros.
"""

from __future__ import annotations

import os

for _var in ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402

import numpy as np  # noqa: E402

from bench_kernels import (SIZES, aligned_copy, fedmpi_trainer, interleaved,  # noqa: E402
                           load_data)
from common import cpu_model  # noqa: E402


def trainer(x, y, batch, shift, sigma):
    """(params, order) -> loss sum: train_local as LocalTrainer calls it, augmented
    unless shift is False and sigma 0."""
    from fedmpi.model import kernels as K

    def augment(order):
        rng = np.random.default_rng(0)
        shifts = (rng.integers(-2, 3, size=(order.size, 2), dtype=np.int8) if shift
                  else np.zeros((order.size, 2), np.int8))
        return K.Augment(shifts, 28, 28, 1, sigma, rng)
    return fedmpi_trainer(x, y, batch, augment if shift is not False or sigma else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=6000)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    import numba

    from fedmpi.model.mlp import MLP
    from fedmpi.model.simd import VECTOR_BITS

    print(f"--augment cost: one thread, 784-200-200-10 MLP, plain SGD; numba {numba.__version__}")
    print(f"  cpu: {cpu_model()}; {VECTOR_BITS}-bit vectors; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    rng = np.random.default_rng(0)
    x, y, what = load_data(args.samples, rng)
    print(f"  data: {what}; {args.repeats} interleaved repeats")
    p0 = MLP(SIZES).init(np.random.default_rng(1))
    order = rng.permutation(args.samples).astype(np.int64)
    # "zero shifts": the augmented gather with every offset 0 -- the same inputs and
    # bits as plain, so it times the gather alone; "shift" also changes what is learnt
    # (and so how sparse the hidden layers are)
    variants = (("plain", False, 0.0), ("zero shifts", None, 0.0), ("shift", True, 0.0),
                ("noise 0.1", False, 0.1), ("shift+noise", True, 0.1))
    print(f"{'batch':>5}  {'variant':<12}{'samples/s':>10}  {'time / plain':>12}  {'range':^11}  "
          "mean loss")
    for batch in (10, 50):
        runs = [trainer(x, y, batch, s, sg) for _, s, sg in variants]
        times, losses = interleaved([lambda r=r: r(aligned_copy(p0), order) for r in runs],
                                    args.repeats)
        for i, (name, _, _) in enumerate(variants):
            rel = times[:, i] / times[:, 0]
            print(f"{batch:>5}  {name:<12}{args.samples / np.median(times[:, i]):>10,.0f}  "
                  f"{np.median(rel):>11.2f}x  {rel.min():>5.2f}-{rel.max():<5.2f}  "
                  f"{losses[i] / args.samples:.5f}")


if __name__ == "__main__":
    main()
