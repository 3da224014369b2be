"""What differential privacy costs per round: clipping, noise, accounting, whole runs.

Two measurements, each against a baseline in the same run:
1. The DP stage's own work at the size of the FedAvg paper's 2NN (784-200-200-10,
   199,210 parameters): clipping one client's update, drawing and adding the noise,
   and the accountant's epsilon for one more round (PLD and RDP), timed in-process
   and compared with one client's local training (600 samples, B = 10, E = 1).
2. Whole one-process runs on Fashion-MNIST (100 clients, 10 per round, 20 rounds,
   eval every 10), interleaved with and without --dp-clip: CPU seconds per round of
   the job's process (less sensitive to other load on a shared machine than wall time).

Usage: python benchmarks/bench_dp.py [--repeats 3] [--rounds 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import cpu_model  # noqa: E402  benchmarks/common.py (the script's folder)
from fedmpi.config import from_dict  # noqa: E402
from fedmpi.model.mlp import MLP  # noqa: E402
from fedmpi.privacy.accounting import Accountant  # noqa: E402
from fedmpi.privacy.dp import clip  # noqa: E402

FMNIST = "/usr/share/datasets/fashion-mnist"


def best_of(fn, repeats=20) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def stage_costs() -> None:
    model = MLP((784, 200, 200, 10))
    p = model.num_params
    rng = np.random.default_rng(0)
    update = rng.normal(size=p).astype(np.float32)
    mean = rng.normal(size=p)

    def do_clip():
        u = update.copy()
        clip(u, 1.0)

    def do_noise():
        noise = np.random.default_rng(1).standard_normal(p)
        return mean + 0.01 * noise

    clip_s = best_of(do_clip)
    noise_s = best_of(do_noise)
    pld = Accountant("pld", "poisson", 1000, 50, 1.1, 1e-5)
    rdp = Accountant("rdp", "fixed", 1000, 50, 1.1, 1e-5)
    r = iter(range(1, 10_000))
    pld_s = best_of(lambda: pld.epsilon(next(r)), 10)
    rdp_s = best_of(lambda: rdp.epsilon(next(r)), 10)
    # one client's local training at the same size, for scale
    from fedmpi.client import LocalTrainer
    from fedmpi.data import load_dataset
    data = load_dataset("fashion-mnist", data_dir=FMNIST if os.path.isdir(FMNIST) else None,
                        seed=0, num_clients=100)
    cfg = from_dict({"dataset": "fashion-mnist", "hidden": "200,200"})
    trainer = LocalTrainer(cfg, model, data)
    params = model.init(np.random.default_rng(0))
    idx = np.arange(600)
    trainer.train(params.copy(), idx, np.random.default_rng(0))  # compile / warm
    train_s = best_of(lambda: trainer.train(params.copy(), idx, np.random.default_rng(0)), 5)
    print(f"\n1. DP stage work at {p:,} parameters (best of repeats)")
    print(f"   one client's local training (600 samples, B=10, E=1): {1e3 * train_s:8.2f} ms")
    print(f"   clip one client's update:                            {1e3 * clip_s:8.2f} ms "
          f"({clip_s / train_s:.1%} of its training)")
    print(f"   draw + add the round's noise (rank 0):                {1e3 * noise_s:8.2f} ms")
    print(f"   epsilon after one more round, PLD (Poisson):          {1e3 * pld_s:8.2f} ms")
    print(f"   epsilon after one more round, RDP (fixed):            {1e3 * rdp_s:8.3f} ms")
    per_round = 10 * clip_s + noise_s + pld_s
    print(f"   a 10-client round: DP adds {1e3 * per_round:.1f} ms to "
          f"{1e3 * 10 * train_s:.0f} ms of training = {per_round / (10 * train_s):.1%} "
          "(PLD; RDP accounting is negligible)")


def job_cpu(args: list[str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = subprocess.run([sys.executable, "-m", "fedmpi", *args], capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(res.stderr)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def whole_runs(repeats: int, rounds: int) -> None:
    base = ["--dataset", "fashion-mnist", "--hidden", "200,200", "--clients", "100",
            "--clients-per-round", "10", "--eval-every", "10", "--overwrite"]
    if os.path.isdir(FMNIST):
        base += ["--data-dir", FMNIST]
    dp = ["--dp-clip", "1.0", "--dp-noise-multiplier", "1.0", "--sampling", "poisson",
          "--dp-delta", "1e-5"]
    cpu = {"plain": [], "dp": []}
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            for name, extra in (("plain", []), ("dp", dp)):
                # per-round CPU: a long run minus a 1-round run (start-up cancels)
                long_ = job_cpu(base + extra + ["--rounds", str(rounds), "--out", f"{d}/a.h5"])
                short = job_cpu(base + extra + ["--rounds", "1", "--out", f"{d}/b.h5"])
                cpu[name].append((long_ - short) / (rounds - 1))
    p, q = statistics.median(cpu["plain"]), statistics.median(cpu["dp"])
    print(f"\n2. whole one-process runs, Fashion-MNIST 2NN, 10 clients a round, median of "
          f"{repeats} (CPU seconds per round, start-up subtracted)")
    print(f"   without DP {p:.3f} s   with DP (Poisson, PLD) {q:.3f} s   ratio {q / p:.3f}x "
          f"(ranges {min(cpu['plain']):.3f}-{max(cpu['plain']):.3f} / "
          f"{min(cpu['dp']):.3f}-{max(cpu['dp']):.3f})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=20)
    a = ap.parse_args()
    import numba
    from llvmlite import binding as llvm
    print(f"fedmpi bench_dp: {platform.node()}, CPU {cpu_model()}, numba target "
          f"{numba.config.CPU_NAME or llvm.get_host_cpu_name()}")
    stage_costs()
    whole_runs(a.repeats, a.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
