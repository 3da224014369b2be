#!/usr/bin/env python
"""Scale benchmark: memory and seconds per round as the number of registered clients grows.

The same job -- synthetic data with --synthetic-mean-samples 20 (about 16
training samples per client), 100 clients per round, evaluation only after
the last round -- with N = 1,000, 10,000 and 100,000 registered clients, on
--ranks MPI ranks (default 3). For each N it reports

- the data set's size (training + test arrays, from the results file's
  partition sizes and the capped test set) and the peak memory: per rank
  (PSS and RSS peaks sampled from /proc every --interval s while the job
  loads, every 2 s once its rounds run, and VmHWM, the kernel's exact peak), and
  summed over the ranks (PSS). The job's own memory is the anonymous +
  shared-memory part of that sum (file-backed library pages are left out:
  their PSS depends on other processes mapping the same libraries) minus the
  anonymous memory of as many data-less rank processes (imports, MPI, numba
  kernels: bench_memory.py's baseline), shown as a multiple of the data's
  size; and, free of any baseline, the growth of that memory from the
  smallest N to each N over the growth of the data. Target: <= 2x the data
  plus a few models' worth (the loaded arrays and their copy in node shared
  memory, briefly, while the copy is made);
- seconds per round: the median of /rounds/seconds over rounds 2..R-1
  (round 1 loads numba's cache; round R evaluates), and its ratio to the
  N = 1,000 job's. Target: within 10% at N = 100,000. Every round trains
  100 clients of ~16 samples, so a round is mostly fixed cost: the ratio
  shows per-round work that grows with N; so does "outside", the round
  minus the busiest rank's local training (sum of its /clients/seconds), and
  the CPU time all the job's processes spend per round (rounds 2..R-1, read
  from /proc when rank 0 prints those rounds), which other load on a shared
  machine changes much less than wall times.

Runs are interleaved (1,000, 10,000, 100,000, 1,000, ...) with --repeat > 1
and their round times pooled, so background load drifts hit every N alike.

    python benchmarks/bench_scale.py                            # N = 1e3, 1e4, 1e5, 3 ranks
    python benchmarks/bench_scale.py --clients 1000,100000 --rounds 40 --repeat 2
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from bench_kernels import cpu_model  # benchmarks/ scripts run from benchmarks/
from bench_memory import MiB, Sampler, baseline
from bench_run import ROUND_LINE, tree_cpu_seconds
from common import find_mpiexec

JOB = ["--dataset", "synthetic", "--synthetic-mean-samples", "20", "--clients-per-round", "100",
       "--local-epochs", "1", "--batch-size", "10", "--hidden", "128,64", "--lr", "0.05",
       "--algorithm", "fedavg", "--seed", "0", "--eval-every", "1000000"]
DIM, TEST_CAP = 60, 10_000  # synthetic features; its capped test set
ROUND_INTERVAL = 2.0  # memory sampling period once the rounds run (s)


def run_job(n: int, ranks: int, rounds: int, workdir: str, interval: float) -> dict:
    out = os.path.join(workdir, f"scale-{n}.h5")
    cmd = [sys.executable, "-m", "fedmpi", *JOB, "--clients", str(n), "--rounds", str(rounds),
           "--out", out, "--overwrite"]
    if ranks > 1:
        cmd = [find_mpiexec("bench_scale"), "-n", str(ranks), *cmd]
    log = os.path.join(workdir, f"scale-{n}.log")
    cpu_at = {}  # round -> CPU seconds of the job's processes when rank 0 printed it
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        sampler = Sampler(proc.pid, interval).start()
        for line in proc.stdout:
            fh.write(line)
            m = ROUND_LINE.match(line)
            if m and int(m.group(1)) in (1, rounds - 1):
                cpu_at[int(m.group(1))] = tree_cpu_seconds(proc.pid)
                # Reading smaps_rollup walks the page tables of every rank (each maps the
                # whole data window): every 0.1 s that took a good part of one of the two
                # cores. The peak is while loading; during the rounds sample rarely.
                sampler.interval = ROUND_INTERVAL
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"bench_scale: {' '.join(cmd)}\nexited with status {rc}:\n"
                 + open(log).read()[-3000:])
    with h5py.File(out, "r") as f:
        seconds = f["rounds/seconds"][:]
        train = int(f["partition/num_samples"][:].sum())
        c = {k: f[f"clients/{k}"][:] for k in ("round", "rank", "seconds")}
    # the round's critical path in local training: the busiest rank's sum of client times
    busiest = np.zeros(len(seconds))
    for rnd in range(1, len(seconds) + 1):
        m = c["round"] == rnd
        busiest[rnd - 1] = np.bincount(c["rank"][m], weights=c["seconds"][m]).max()
    per_rank = sorted((i for i in sampler.procs.values() if i["kind"] == "rank"),
                      key=lambda i: i["rank"])
    data = (train + min(TEST_CAP, train)) * (DIM * 4 + 4) + 8 * n
    return {"n": n, "wall": wall, "round_s": list(seconds[1:-1]), "data": data,
            "outside_s": list((seconds - busiest)[1:-1]),
            # CPU per round of all the job's processes, rounds 2..R-1: barely moved by
            # other processes competing for the cores, unlike wall times
            "cpu_round": ((cpu_at[rounds - 1] - cpu_at[1]) / (rounds - 2)
                          if rounds > 2 else float("nan")),
            "total": sampler.peak_total, "per_rank": per_rank, "train": train,
            "own": sampler.peak_total_split.get("Pss_Anon", 0)
            + sampler.peak_total_split.get("Pss_Shmem", 0)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="1000,10000,100000", help="registered clients N, comma-separated")
    p.add_argument("--ranks", type=int, default=3, help="MPI ranks (default 3; 1 = one process)")
    p.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    p.add_argument("--repeat", type=int, default=1, help="runs per N, interleaved (default 1)")
    p.add_argument("--interval", type=float, default=0.1, help="memory sampling period, s")
    p.add_argument("--keep", action="store_true", help="keep results files and logs")
    args = p.parse_args()
    ns = [int(x) for x in args.clients.split(",")]
    if args.rounds < 3:
        p.error("need --rounds >= 3 (the first and the last round are left out)")
    workdir = tempfile.mkdtemp(prefix="fedmpi-bench-scale-")

    import llvmlite.binding as llvm
    import numba
    print(f"fedmpi bench_scale: {platform.node()}, {os.cpu_count()} cores, cpu {cpu_model()}, "
          f"numba compiles for {numba.config.CPU_NAME or llvm.get_host_cpu_name()}")
    print(f"job: {' '.join(JOB)} --clients N --rounds {args.rounds}, {args.ranks} rank(s)")
    print(f"load average before: {os.getloadavg()}")
    base = baseline(args.interval, workdir)
    print(f"data-less rank process (imports + MPI + numba kernels): PSS {base['Pss'] / MiB:.1f} MiB, "
          f"RSS {base['VmRSS'] / MiB:.1f} MiB")
    run_job(ns[0], 1, 2, workdir, 1.0)  # warm-up: numba's cache, imports in the page cache

    results: dict[int, list[dict]] = {n: [] for n in ns}
    for _ in range(args.repeat):
        for n in ns:
            r = run_job(n, args.ranks, args.rounds, workdir, args.interval)
            results[n].append(r)
            print(f"  N={n}: {r['wall']:.1f} s wall, median round "
                  f"{statistics.median(r['round_s']):.4f} s", flush=True)

    print()
    print(f"{'N':>7} {'data MiB':>9} {'PSS sum':>8} {'anon+shm':>8} {'- base':>7} {'x data':>6} "
          f"{'growth x':>8} {'PSS/rank':>8} {'RSS/rank':>8} {'VmHWM':>7} {'s/round':>8} {'ratio':>6} "
          f"{'outside':>8} {'ratio':>6} {'CPU/rnd':>8} {'ratio':>6}")
    ref = statistics.median(s for r in results[ns[0]] for s in r["round_s"])
    ref_out = statistics.median(s for r in results[ns[0]] for s in r["outside_s"])
    ref_cpu = statistics.median(r["cpu_round"] for r in results[ns[0]])
    first = results[ns[0]][0]
    rows = {}
    for n in ns:
        rs = results[n]
        data = rs[0]["data"]
        total = max(r["total"] for r in rs)
        anon = max(r["own"] for r in rs)
        own = anon - args.ranks * base.get("Pss_Anon", 0)
        growth = ((anon - max(r["own"] for r in results[ns[0]])) / (data - first["data"])
                  if n != ns[0] else float("nan"))
        pss = max(i["Pss"] for r in rs for i in r["per_rank"])
        rss = max(i["Rss"] for r in rs for i in r["per_rank"])
        hwm = max(i["VmHWM"] for r in rs for i in r["per_rank"])
        sec = statistics.median(s for r in rs for s in r["round_s"])
        outside = statistics.median(s for r in rs for s in r["outside_s"])
        cpu = statistics.median(r["cpu_round"] for r in rs)
        rows[n] = (own / data, growth, sec / ref, cpu / ref_cpu)
        print(f"{n:>7} {data / MiB:>9.1f} {total / MiB:>8.1f} {anon / MiB:>8.1f} {own / MiB:>7.1f} "
              f"{own / data:>6.2f} {growth:>8.2f} {pss / MiB:>8.1f} {rss / MiB:>8.1f} "
              f"{hwm / MiB:>7.1f} {sec:>8.4f} {sec / ref:>6.3f} {outside:>8.4f} "
              f"{outside / ref_out:>6.3f} {cpu:>8.4f} {cpu / ref_cpu:>6.3f}")
    print("MiB; PSS sum = peak of the PSS summed over the ranks, anon+shm its anonymous + shared-"
          "memory part, - base = minus the ranks' data-less anonymous memory, growth x = "
          "(anon+shm - at the smallest N) / (data - at the smallest N); per-rank columns: the "
          "largest rank's peak; outside = s/round minus the busiest rank's local training "
          "(sampling, transport, server step, results): where work growing with N would show; "
          "CPU/rnd = CPU seconds of all the job's processes per round (rounds 2..R-1)")
    big = max(ns)
    mem_x, growth_x, time_x, cpu_x = rows[big]
    print()
    print(f"N={big}: job memory = {mem_x:.2f}x the data (growth from N={ns[0]}: {growth_x:.2f}x): "
          f"{'PASS' if max(mem_x, growth_x) <= 2.1 else 'FAIL'} (target <= 2x + a few models)")
    print(f"N={big}: s/round = {time_x:.3f}x N={ns[0]}'s: {'PASS' if time_x <= 1.10 else 'FAIL'} "
          "(target <= 1.10)")
    print(f"N={big}: CPU/round = {cpu_x:.3f}x N={ns[0]}'s (the same comparison, less sensitive "
          "to other load on the machine)")
    print(f"load average after: {os.getloadavg()}")
    if args.keep:
        print(f"results files and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
