"""Reading results files: the checked, forked reader vs the same checks in-process.

    PYTHONPATH=. python benchmarks/bench_read.py [--rounds 1000] [--clients-per-round 100]

Writes one file like a 784-200-200-10 run (rounds x clients-per-round client
rows, 1000 clients, final model) and times, as ratios to an in-process
read_run (the baseline, measured in the same run):
- read_run with the fork and time limit (what tools and load use),
- load(path).summary() (reads /rounds only; /clients etc. are lazy),
- load(path).participation() (reads /clients too, as `fedmpi-report clients`).
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np

from fedmpi import analysis, reading
from fedmpi.results import ResultsWriter

LAYERS = [784, 200, 200, 10]


def write(path, rounds, per_round, clients=1000):
    rng = np.random.default_rng(0)
    with ResultsWriter(path, overwrite=True, config={"rounds": rounds, "clients": clients},
                       attrs={"mpi_size": 1}, layer_sizes=LAYERS,
                       partition_sizes=np.full(clients, 60), label_histogram=np.full(
                           (clients, 10), 6)) as w:
        for r in range(1, rounds + 1):
            w.append_round({"round": r, "test_accuracy": 0.5, "test_loss": 1.0,
                            "train_loss": 1.0, "num_clients": per_round,
                            "num_samples": 60 * per_round, "seconds": 0.1,
                            "bytes_up": 1, "bytes_down": 1})
            ids = rng.choice(clients, per_round, replace=False)
            w.append_clients({"round": np.full(per_round, r), "client_id": ids,
                              "rank": np.zeros(per_round, np.int64),
                              "num_samples": np.full(per_round, 60),
                              "train_loss": rng.random(per_round), "seconds": np.ones(per_round)})
        n = sum(a * b + b for a, b in zip(LAYERS[:-1], LAYERS[1:]))
        w.write_params("params", np.zeros(n, np.float32))


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=1000)
    p.add_argument("--clients-per-round", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}; python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "run.h5")
        write(path, args.rounds, args.clients_per_round)
        print(f"file: {args.rounds} rounds, {args.rounds * args.clients_per_round} client rows, "
              f"{os.path.getsize(path) / 1e6:.1f} MB")
        forked = reading._can_fork

        def in_process():
            reading._can_fork = lambda: False
            try:
                reading.read_run(path)
            finally:
                reading._can_fork = forked

        base = timed(in_process, args.repeats)
        rows = [("read_run in-process (baseline)", base),
                ("read_run forked, time-limited", timed(lambda: reading.read_run(path),
                                                         args.repeats)),
                ("load().summary()", timed(lambda: analysis.load(path).summary(),
                                           args.repeats)),
                ("load().participation()", timed(lambda: analysis.load(path).participation(),
                                                 args.repeats))]
        for name, t in rows:
            print(f"  {name:32s} {t * 1e3:8.1f} ms  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
