#!/usr/bin/env python
"""Whole-run benchmark: one FedAvg job with 1 process, 3 and 8 MPI ranks.

The job is the FedAvg paper's Fashion-MNIST setting: 100 clients (iid
partition), 10 per round, E=1, B=10, the 2NN (784-200-200-10), lr 0.05.
Each rank count runs the very same job; the script then reports

- seconds per round: the median of /rounds/seconds over rounds 3..N (round 1
  pays for loading numba's cache, or compiling; round 2 still runs on cold
  CPU caches), and the median time between rank 0's consecutive per-round
  stdout lines, which also covers writing each round's results and
  checkpoint; plus the wall time of the whole command (start-up included);
- the speed-up over 1 process, and the product's two targets, measured in
  this same invocation: 3 ranks >= 1.7x faster than 1 process, and 8 ranks
  within 10% of 3 ranks (PASS/FAIL);
- the whole job against a plain one-thread PyTorch FedAvg loop of the same
  protocol (benchmarks/fedavg_torch.py), run interleaved with fedmpi's runs:
  the ratio of wall times per rank count (target: fedmpi >= 4x faster);
  skipped, saying so, when torch is not importable;
- a first run on an empty numba cache (NUMBA_CACHE_DIR set to a fresh
  directory), which compiles the kernels: wall time at 8 ranks and 1 process
  and the compile's share (target: <= 10 s at 8 ranks);
- a calibration: two independent 1-process jobs side by side, i.e. the most
  any parallel run can gain on this machine as it is right now;
- the final test accuracy of each run and whether /model/params is bitwise
  identical in all of them (it must be: aggregation is exact);
- the simulator overhead: per round, /rounds/seconds versus the time spent in
  local training (/clients/seconds summed over the round's clients; with
  several ranks also the slowest rank's sum, the round's critical path), and
  the CPU time all the job's processes spend per round, which other load on
  the machine hardly changes;
- how much CPU other processes used while each run was going: on a shared
  machine that, not fedmpi, can decide PASS or FAIL (see --wait-quiet and
  --nice).

Runs are interleaved (1, 3, 8, 1, 3, 8, ...) when --repeat > 1 so slow drift
in background load hits every rank count alike; per-round times of the
repeats are pooled before taking the median.

    python benchmarks/bench_run.py                   # 30 rounds, ranks 1,3,8, 3 repeats
    python benchmarks/bench_run.py --rounds 50 --ranks 1,2,3,8 --repeat 1 --keep

Needs mpiexec (the mpich wheel's, next to the venv's python, or on PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np

from common import cpu_model, find_mpiexec  # benchmarks/common.py (scripts run from benchmarks/)

# The benchmarked job (every flag spelled out, so defaults may change freely).
JOB = ["--dataset", "fashion-mnist", "--partition", "iid", "--clients", "100",
       "--clients-per-round", "10", "--local-epochs", "1", "--batch-size", "10",
       "--hidden", "200,200", "--lr", "0.05", "--algorithm", "fedavg", "--seed", "0",
       "--eval-every", "1"]

SPEEDUP_3_VS_1 = 1.7   # target: 3 ranks at least this much faster than 1 process
SLOWDOWN_8_VS_3 = 1.10  # target: 8 ranks at most this much slower than 3 ranks
TORCH_RATIO = 4.0      # target: the whole job this many times faster than the PyTorch loop
COLD_TARGET = 10.0     # target: a first run (numba compiles) at 8 ranks within this many seconds
SKIP = 2               # rounds left out of the per-round medians: round 1 loads numba's
                       # cache (or compiles) and round 2 still runs on cold caches
BUSY_WARN = 0.25       # cores of foreign CPU use above which results are flagged


def cpu_busy_seconds() -> float:
    """CPU-seconds all cores spent not idle since boot (from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


NICE = 0  # niceness increment for the benchmarked jobs (--nice)


def _renice() -> None:
    if NICE:
        os.nice(NICE)


def command(ranks: int, out: str, rounds: int, data_dir: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "fedmpi", *JOB, "--rounds", str(rounds),
           "--out", out, "--overwrite"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if ranks > 1:
        cmd = [find_mpiexec("bench_run"), "-n", str(ranks), *cmd]
    return cmd


def tree_cpu_seconds(root: int) -> float:
    """utime + stime of `root` and all its descendants (from /proc/*/stat)."""
    children: dict[int, list[int]] = {}
    stats: dict[int, list[str]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()  # the command name may hold spaces
        stats[int(name)] = fields
        children.setdefault(int(fields[1]), []).append(int(name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += int(stats[pid][11]) + int(stats[pid][12])
        todo.extend(children.get(pid, []))
    return total / os.sysconf("SC_CLK_TCK")


ROUND_LINE = re.compile(r"^round\s+(\d+)/(\d+)\s")


def run_job(ranks: int, out: str, rounds: int, data_dir: str | None, log: str) -> dict:
    """Run one job; time it as a whole and time-stamp rank 0's per-round lines."""
    cmd = command(ranks, out, rounds, data_dir)
    busy0, ours0 = cpu_busy_seconds(), children_cpu_seconds()
    stamps = {}  # round -> perf_counter when its line arrived
    cpu_at = {}  # round -> CPU seconds of the job's processes when its line arrived
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1, preexec_fn=_renice)
        for line in proc.stdout:
            now = time.perf_counter()
            fh.write(line)
            m = ROUND_LINE.match(line)
            if m:
                r = int(m.group(1))
                stamps[r] = now
                if r in (SKIP, rounds):  # only twice: walking /proc costs a few ms
                    cpu_at[r] = tree_cpu_seconds(proc.pid)
        rc = proc.wait()
    wall = time.perf_counter() - t0
    busy, ours = cpu_busy_seconds() - busy0, children_cpu_seconds() - ours0
    if rc != 0:
        with open(log) as fh:
            tail = fh.read()[-3000:]
        sys.exit(f"bench_run: {' '.join(cmd)}\nexited with status {rc}:\n{tail}")
    with open(log) as fh:
        warnings = [line.strip() for line in fh if "Warning" in line or "error:" in line]
    # Wall time of round r > SKIP as seen from outside: from round r-1's line to
    # round r's. Unlike /rounds/seconds it includes rank 0 writing round r's
    # results (and checkpoint) to the HDF5 file.
    intervals = np.array([stamps[r] - stamps[r - 1] for r in range(SKIP + 1, rounds + 1)
                          if r in stamps and r - 1 in stamps])
    # CPU time per round of all the job's processes, rounds SKIP+1..N: unlike
    # wall times, hardly affected by other processes competing for the cores.
    cpu_round = ((cpu_at[rounds] - cpu_at[SKIP]) / (rounds - SKIP)
                 if rounds > SKIP and SKIP in cpu_at and rounds in cpu_at else float("nan"))
    return {"ranks": ranks, "wall": wall, "cpu": ours, "line_intervals": intervals,
            "cpu_round": cpu_round,
            "foreign_cores": max(busy - ours, 0.0) / wall, "warnings": warnings,
            **read_results(out)}


def read_results(path: str) -> dict:
    with h5py.File(path, "r", locking=False) as f:
        rounds = {k: f["rounds"][k][()] for k in ("round", "seconds", "test_accuracy")}
        clients = {k: f["clients"][k][()] for k in ("round", "rank", "seconds")}
        params = f["model/params"][()]
        mpi_size = int(f.attrs.get("mpi_size", -1))
    r = rounds["round"]
    train_sum = np.array([clients["seconds"][clients["round"] == x].sum() for x in r])
    crit = []
    for x in r:
        sel = clients["round"] == x
        crit.append(max(clients["seconds"][sel & (clients["rank"] == k)].sum()
                        for k in np.unique(clients["rank"][sel])))
    return {"round_seconds": rounds["seconds"], "train_sum": train_sum,
            "critical": np.array(crit), "accuracy": float(rounds["test_accuracy"][-1]),
            "params": params, "mpi_size": mpi_size}


def git_state() -> str:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "-C", repo, "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--", "fedmpi"],
                               capture_output=True, text=True, check=True).stdout.split("\n")
        dirty = [line[3:] for line in dirty if line.strip()]
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (f" + uncommitted changes in {', '.join(dirty)}" if dirty else " (clean)")


def foreign_load(seconds: float = 1.0) -> float:
    """Cores kept busy by other processes over the next `seconds` (we run nothing)."""
    b0, o0 = cpu_busy_seconds(), children_cpu_seconds()
    time.sleep(seconds)
    return max(cpu_busy_seconds() - b0 - (children_cpu_seconds() - o0), 0.0) / seconds


_quiet_budget = [0.0]  # seconds left for wait_quiet, over the whole benchmark


def wait_quiet() -> None:
    """Wait (within the budget of --wait-quiet) for a second in which others use < BUSY_WARN cores."""
    while _quiet_budget[0] > 0:
        t = time.perf_counter()
        load = foreign_load(1.0)
        _quiet_budget[0] -= time.perf_counter() - t
        if load < BUSY_WARN:
            return
        if _quiet_budget[0] <= 0:
            print(f"  (the --wait-quiet budget is used up: other processes use {load:.2f} cores; "
                  "no more waiting)", flush=True)


def run_pair(out_dir: str, rounds: int, data_dir: str | None) -> tuple[list[float], float]:
    """Two independent 1-process jobs side by side: their median s/round, and foreign load."""
    busy0, ours0 = cpu_busy_seconds(), children_cpu_seconds()
    t0 = time.perf_counter()
    procs, outs = [], []
    for i in range(2):
        out = os.path.join(out_dir, f"pair-{i}.h5")
        log = open(os.path.join(out_dir, f"pair-{i}.log"), "w")
        procs.append((subprocess.Popen(command(1, out, rounds, data_dir), stdout=log,
                                       stderr=subprocess.STDOUT, preexec_fn=_renice), log))
        outs.append(out)
    for proc, log in procs:
        rc = proc.wait()
        log.close()
        if rc != 0:
            sys.exit(f"bench_run: calibration job exited with status {rc}, see {log.name}")
    wall = time.perf_counter() - t0
    foreign = max(cpu_busy_seconds() - busy0 - (children_cpu_seconds() - ours0), 0.0) / wall
    return [float(np.median(read_results(o)["round_seconds"][SKIP:])) for o in outs], foreign


# The floor of any mpi4py + NumPy + numba program: start Python, initialise
# MPI, import NumPy and numba, call one cached @njit function, exit.
FLOOR_SCRIPT = """\
from mpi4py import MPI
import numpy as np
from numba import njit


@njit(cache=True)
def total(x):
    s = 0.0
    for i in range(x.shape[0]):
        s += x[i]
    return s


total(np.ones(4))
"""
BARE = [sys.executable, "-c", "from mpi4py import MPI; import numpy"]
TIMINGS = "fedmpi-timings: "  # rank 0's line with every rank's marks (FEDMPI_TIMINGS=1)


def launch(ranks: int, argv: list[str]) -> list[str]:
    return argv if ranks == 1 else [find_mpiexec("bench_run"), "-n", str(ranks), *argv]


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Run `cmd` to its end: wall seconds, and when (time.time()) each stdout line came."""
    cpu0 = children_cpu_seconds()
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1, env=env, preexec_fn=_renice)
    lines = [(time.time(), line) for line in proc.stdout]
    rc = proc.wait()
    end = time.time()
    cpu = children_cpu_seconds() - cpu0
    if rc != 0:
        sys.exit(f"bench_run: {' '.join(cmd)}\nexited with status {rc}:\n"
                 + "".join(line for _, line in lines)[-3000:])
    return {"t0": t0, "wall": end - t0, "end": end, "lines": lines, "cpu": cpu}


def fedmpi_startup(ranks: int, out: str, data_dir: str | None, **env_extra: str) -> dict:
    """A 1-round job with FEDMPI_TIMINGS=1: wall, outside the round, per-rank phases."""
    env = dict(os.environ, FEDMPI_TIMINGS="1", **env_extra)
    res = timed(command(ranks, out, 1, data_dir), env)
    stamp, marks = next((t, json.loads(line[len(TIMINGS):])) for t, line in res["lines"]
                        if line.startswith(TIMINGS))
    with h5py.File(out, "r", locking=False) as f:
        rounds = float(f["rounds"]["seconds"][()].sum())
    phases = [name for name, _ in marks[0][1:]]
    per_rank = []  # rank -> {phase: seconds}
    for rank_marks in marks:
        times = dict(rank_marks[1:])
        prev, row = rank_marks[0][1], {}
        for name, t in rank_marks[1:]:
            row[name] = t - prev
            prev = t
        row["launch"] = rank_marks[0][1] - res["t0"]  # mpiexec until this process started
        row["exit"] = res["end"] - times["end"]  # gather, print, MPI finalize, exit
        per_rank.append(row)
    per_rank[0]["exit"] = res["end"] - stamp
    return {"wall": res["wall"], "outside": res["wall"] - rounds, "phases": phases,
            "per_rank": per_rank, "cpu": res["cpu"]}


HERE = os.path.dirname(os.path.abspath(__file__))
TORCH_LOOP = os.path.join(HERE, "fedavg_torch.py")
TORCH_LINE = re.compile(r"^round\s+(\d+)/(\d+) seconds (\S+) test_accuracy (\S+)")


def torch_missing() -> str | None:
    """Why the PyTorch loop can't run here, or None if torch is importable."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return ("torch is not importable in this Python: no PyTorch FedAvg loop to compare "
                "with (pip install torch into this venv to get the comparison)")
    return None


def run_torch(rounds: int, data_dir: str | None, log: str) -> dict:
    """The plain PyTorch FedAvg loop (fedavg_torch.py) as a whole command, like run_job."""
    cmd = [sys.executable, TORCH_LOOP, "--rounds", str(rounds)]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    repo = os.path.dirname(HERE)  # it reads the data with fedmpi's loader
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        x for x in (repo, os.environ.get("PYTHONPATH")) if x))
    busy0 = cpu_busy_seconds()
    res = timed(cmd, env)
    busy = cpu_busy_seconds() - busy0
    with open(log, "w") as fh:
        fh.writelines(line for _, line in res["lines"])
    summary = next(json.loads(line[len("summary: "):]) for _, line in res["lines"]
                   if line.startswith("summary: "))
    return {"wall": res["wall"], "cpu": res["cpu"], "torch": summary["torch"],
            "round_seconds": np.array(summary["round_seconds"]),
            "accuracy": summary["final_accuracy"],
            "foreign_cores": max(busy - res["cpu"], 0.0) / res["wall"]}


def torch_section(runs: dict[int, list[dict]], torch_runs: list[dict], rounds: int) -> None:
    """fedmpi's whole job against the PyTorch loop, per rank count, ratios per repeat."""
    def rng(xs):
        return f"{statistics.median(xs):.2f}x ({min(xs):.2f}-{max(xs):.2f})"

    t_sec = np.concatenate([t["round_seconds"][SKIP:] for t in torch_runs])
    print()
    print(f"Whole {rounds}-round job against a plain one-thread PyTorch FedAvg loop "
          f"(benchmarks/fedavg_torch.py, torch {torch_runs[0]['torch']}), run interleaved; "
          f"{len(torch_runs)} repeat(s), ratios per repeat, median (range):")
    print(f"  PyTorch loop: total {statistics.median(t['wall'] for t in torch_runs):.1f} s "
          f"({statistics.median(t['cpu'] for t in torch_runs):.1f} CPU s), "
          f"s/round {np.median(t_sec):.3f}, final accuracy "
          + "/".join(f"{t['accuracy']:.4f}" for t in torch_runs)
          + f", other processes used {max(t['foreign_cores'] for t in torch_runs):.2f} cores")
    print(f"{'ranks':>5} {'fedmpi total s':>14} {'torch total / fedmpi total':>27} "
          f"{'torch s/round / fedmpi s/round':>31} {'torch CPU s / fedmpi CPU s':>27}"
          f"   target: total >= {TORCH_RATIO:.0f}x")
    for k, rs in runs.items():
        whole = [t["wall"] / r["wall"] for r, t in zip(rs, torch_runs)]
        per_round = [float(np.median(t["round_seconds"][SKIP:]) / np.median(r["round_seconds"][SKIP:]))
                     for r, t in zip(rs, torch_runs)]
        cpu = [t["cpu"] / r["cpu"] for r, t in zip(rs, torch_runs)]
        verdict = "PASS" if statistics.median(whole) >= TORCH_RATIO else "FAIL"
        print(f"{k:>5} {statistics.median(r['wall'] for r in rs):>14.1f} {rng(whole):>27} "
              f"{rng(per_round):>31} {rng(cpu):>27}   {verdict}")
    print("""  total       wall time of the whole command (start-up, data, every round, shut-down)
  s/round     median over rounds 3..N, evaluation on the 10,000 test samples included
  CPU s       CPU time of all the command's processes: hardly changed by other load, so
              on a busy machine the 1-process CPU ratio is the steadier figure
  The loop: same protocol (100 IID clients, 10 a round, E=1, B=10, lr 0.05, 2NN), its own
  initialisation and sampling, one process, torch.set_num_threads(1).""")


def cold_section(ranks: list[int], workdir: str, data_dir: str | None) -> None:
    """A first run on an empty numba cache (it compiles) against the same run warm."""
    print()
    print("First run on an empty numba cache (NUMBA_CACHE_DIR = a fresh directory): the "
          "1-round job compiles the kernels; then the same job again, cache warm")
    print(f"{'ranks':>5} {'first run s':>11} {'compile s':>9} {'round 1 s':>9} {'CPU s':>6} "
          f"{'warm run s':>10} {'first - warm':>12}   target: first run <= {COLD_TARGET:.0f} s "
          "at 8 ranks")
    for k in ranks:
        cache = tempfile.mkdtemp(prefix="numba-cache-", dir=workdir)
        out = os.path.join(workdir, f"cold-{k}.h5")
        wait_quiet()
        cold = fedmpi_startup(k, out, data_dir, NUMBA_CACHE_DIR=cache)
        warm = fedmpi_startup(k, out, data_dir, NUMBA_CACHE_DIR=cache)
        compile_s = max(r.get("numba warm-up", 0.0) for r in cold["per_rank"])
        round_s = max(r.get("rounds", 0.0) for r in cold["per_rank"])
        verdict = ("PASS" if cold["wall"] <= COLD_TARGET else "FAIL") if k == 8 else ""
        print(f"{k:>5} {cold['wall']:>11.2f} {compile_s:>9.2f} {round_s:>9.2f} "
              f"{cold['cpu']:>6.1f} {warm['wall']:>10.2f} {cold['wall'] - warm['wall']:>12.2f}   "
              f"{verdict}", flush=True)
        shutil.rmtree(cache, ignore_errors=True)
    print("""  compile s   the "numba warm-up" phase (FEDMPI_TIMINGS): the node's first rank that
              trains compiles every kernel the run uses and writes the cache, the others
              then load it; round 1 s: the round after it (kernels compiled on first use
              there would show here)""")


def startup_section(ranks: list[int], repeat: int, workdir: str, data_dir: str | None) -> None:
    """Start-up + shut-down of a 1-round fedmpi job against the floor, interleaved."""
    floor = os.path.join(workdir, "floor.py")
    with open(floor, "w") as fh:
        fh.write(FLOOR_SCRIPT)
    env = dict(os.environ, **{v: "1" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")})
    timed([sys.executable, floor], env)  # compiles and caches `total`
    bare_ranks = 3
    floors = {k: [] for k in ranks}
    jobs = {k: [] for k in ranks}
    bare, bare_cpu = [], []
    print()
    print(f"Start-up and shut-down: a 1-round job vs the floor, {repeat} interleaved repeat(s)")
    for rep in range(repeat):
        for k in ranks:
            wait_quiet()
            floors[k].append(timed(launch(k, [sys.executable, floor]), env))
            jobs[k].append(fedmpi_startup(k, os.path.join(workdir, f"startup-{k}.h5"), data_dir))
        res = timed(launch(bare_ranks, BARE))
        bare.append(res["wall"])
        bare_cpu.append(res["cpu"])
        print(f"  repeat {rep + 1}/{repeat}: " + ", ".join(
            f"{k} rank(s) floor {floors[k][-1]['wall']:.2f} s, fedmpi {jobs[k][-1]['wall']:.2f} s "
            f"(outside the round {jobs[k][-1]['outside']:.2f} s)" for k in ranks)
            + f"; bare mpiexec -n {bare_ranks} {bare[-1]:.2f} s", flush=True)

    def rng(xs):
        return f"{statistics.median(xs):5.2f} ({min(xs):.2f}-{max(xs):.2f})"

    print()
    print(f"{'ranks':>5} {'floor s':>17} {'fedmpi 1-round s':>17} {'outside round s':>17} "
          f"{'job/floor':>17} {'outside/floor':>17} {'CPU s floor':>17} {'CPU s job':>17} "
          f"{'CPU job/floor':>17}")
    for k in ranks:
        fw = [f["wall"] for f in floors[k]]
        fc = [f["cpu"] for f in floors[k]]
        walls = [j["wall"] for j in jobs[k]]
        outs = [j["outside"] for j in jobs[k]]
        cpus = [j["cpu"] for j in jobs[k]]
        print(f"{k:>5} {rng(fw):>17} {rng(walls):>17} {rng(outs):>17} "
              f"{rng([w / f for w, f in zip(walls, fw)]):>17} "
              f"{rng([o / f for o, f in zip(outs, fw)]):>17} {rng(fc):>17} {rng(cpus):>17} "
              f"{rng([j / f for j, f in zip(cpus, fc)]):>17}")
    print(f"bare `mpiexec -n {bare_ranks} python -c \"from mpi4py import MPI; import numpy\"`: "
          f"{rng(bare)} s ({rng(bare_cpu)} CPU s)", end="")
    if bare_ranks in jobs:
        walls = [j["wall"] for j in jobs[bare_ranks]]
        cpus = [j["cpu"] for j in jobs[bare_ranks]]
        print(f";\n  fedmpi's 1-round job at -n {bare_ranks} takes "
              f"{rng([w / b for w, b in zip(walls, bare)])}x its wall time, "
              f"{rng([c / b for c, b in zip(cpus, bare_cpu)])}x its CPU time")
    print("""  floor       mpiexec + python importing mpi4py (MPI init), NumPy and numba and calling
              one cached @njit function: what any program on this stack pays
  outside     the 1-round job's wall time minus its /rounds/seconds
  CPU s       CPU time of all the command's processes (mpiexec included): unlike wall
              time, hardly changed by other load on the machine
  ratios are per repeat (the floor and the job ran back to back), median (min-max)""")

    for k in ranks:
        phases = ["launch", *jobs[k][0]["phases"], "exit"]
        print()
        print(f"Per-rank breakdown at {k} rank(s), seconds (median of {repeat}; FEDMPI_TIMINGS=1):")
        print(f"{'phase':<14}" + "".join(f"{'rank ' + str(r):>8}" for r in range(k)))
        for ph in phases:
            vals = [statistics.median(j["per_rank"][r].get(ph, float("nan")) for j in jobs[k])
                    for r in range(k)]
            print(f"{ph:<14}" + "".join(f"{v:>8.3f}" for v in vals))
    print("""  launch        from starting mpiexec (or python) to this rank's process start
  interpreter   Python start-up until fedmpi's main() runs
  MPI init      import of mpi4py.MPI (MPI_Init)
  imports       NumPy, numba (rank that trains) and fedmpi's modules
  plan output   rank 0 checks the results path; every rank agrees on errors
  data load     the node leader reads (or decompresses) the data set into shared memory
  partition     clients' sample indices (every rank, same result)
  set-up        model, trainer, shared windows
  HDF5 create   rank 0 creates the results file (others wait for its verdict)
  numba warm-up the kernels this run uses: cache load (or compile), node leader first
  rounds        the job's one round
  close         results file closed, shared windows freed
  end           gathering these timings
  exit          until the whole command ended: MPI finalize and interpreter exit
                (rank 0: from its timings line to the command's end)""")


def fmt_ratio(value: float, target: float, at_least: bool) -> str:
    ok = value >= target if at_least else value <= target
    return f"{value:.2f}x (target {'>=' if at_least else '<='} {target:.2f}x)  {'PASS' if ok else 'FAIL'}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=30, help="rounds per run (default 30)")
    p.add_argument("--ranks", default="1,3,8",
                   help="comma-separated rank counts; 1 = plain python (default 1,3,8)")
    p.add_argument("--repeat", type=int, default=3,
                   help="runs per rank count, interleaved; round times are pooled (default 3)")
    p.add_argument("--keep", action="store_true", help="keep the results files and logs")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files "
                   "(default: fedmpi's search path, e.g. /usr/share/datasets/fashion-mnist)")
    p.add_argument("--no-calibrate", action="store_true",
                   help="skip the calibration: two 1-process jobs side by side, which shows how "
                   "much faster 2 processes can go than 1 on this machine at all")
    p.add_argument("--wait-quiet", type=float, default=30, metavar="S",
                   help="before each run wait for other processes to go quiet (< %.2f cores "
                   "busy), spending at most S seconds on that in all (default 30; 0 = never wait)"
                   % BUSY_WARN)
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="run the jobs with niceness N (e.g. -10, needs root): on a shared machine "
                   "this keeps other jobs from taking the cores; the runs still report how much "
                   "CPU others got (default 0)")
    p.add_argument("--workdir", help="where to put results files (default: a temporary directory)")
    p.add_argument("--startup-repeat", type=int, default=3, metavar="N",
                   help="interleaved repeats of the start-up comparison: a 1-round job against "
                   "the floor (python + MPI init + NumPy + numba + one cached @njit call) at "
                   "each rank count (default 3; 0 = skip)")
    p.add_argument("--startup-only", action="store_true",
                   help="only the start-up comparison (and the first run), not the round timings")
    p.add_argument("--no-torch", action="store_true",
                   help="skip the plain PyTorch FedAvg loop (run by default when torch imports)")
    p.add_argument("--cold-ranks", default="8,1", metavar="RANKS",
                   help="rank counts of the first run on an empty numba cache, which compiles "
                   "the kernels (default 8,1; 0 = skip)")
    args = p.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    global NICE
    NICE = args.nice
    _quiet_budget[0] = args.wait_quiet
    if NICE < 0 and os.geteuid() != 0:
        p.error(f"--nice {NICE} (higher priority) needs root")
    if args.rounds <= SKIP or args.repeat < 1 or min(ranks) < 1:
        p.error(f"need --rounds > {SKIP} (rounds 1..{SKIP} are excluded), --repeat >= 1, ranks >= 1")

    workdir = args.workdir or tempfile.mkdtemp(prefix="fedmpi-bench-run-")
    os.makedirs(workdir, exist_ok=True)
    import numba  # noqa: E402 -- only for the version line
    import mpi4py
    print(f"fedmpi bench_run: {platform.node()}, {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}, numba {numba.__version__}, "
          f"mpi4py {mpi4py.__version__}")
    import llvmlite.binding as llvm

    flags = next((line.split(":", 1)[1].split() for line in open("/proc/cpuinfo")
                  if line.startswith("flags")), []) if os.path.exists("/proc/cpuinfo") else []
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    print(f"cpu: {cpu_model()} ({isa}); numba compiles for "
          f"{numba.config.CPU_NAME or llvm.get_host_cpu_name()}")
    print(f"code: git {git_state()}")
    print(f"job: {' '.join(JOB)} --rounds {args.rounds}")
    print(f"load average before: {open('/proc/loadavg').read().split()[:3]}; other processes "
          f"busy now: {foreign_load(2.0):.2f} cores" + (f"; jobs run at nice {NICE}" if NICE else ""))

    # Warm-up: numba's on-disk cache, the data files in the page cache.
    t = time.perf_counter()
    run_job(1, os.path.join(workdir, "warmup.h5"), 2, args.data_dir,
            os.path.join(workdir, "warmup.log"))
    print(f"warm-up run (1 process, 2 rounds): {time.perf_counter() - t:.1f} s")

    if args.startup_repeat > 0:
        startup_section(ranks, args.startup_repeat, workdir, args.data_dir)
    cold_ranks = [int(x) for x in args.cold_ranks.split(",") if x.strip() and int(x) > 0]
    if cold_ranks:
        cold_section(cold_ranks, workdir, args.data_dir)
    if args.startup_only:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0

    pair = None
    if not args.no_calibrate:
        wait_quiet()
        pair = run_pair(workdir, args.rounds, args.data_dir)
        print(f"  calibration, two 1-process jobs side by side: median round "
              f"{pair[0][0]:.3f} s and {pair[0][1]:.3f} s, other processes used "
              f"{pair[1]:.2f} cores", flush=True)

    no_torch = "the PyTorch comparison is skipped (--no-torch)" if args.no_torch else torch_missing()
    if no_torch:
        print(no_torch)
    runs: dict[int, list[dict]] = {k: [] for k in ranks}
    torch_runs: list[dict] = []
    for rep in range(args.repeat):
        for k in ranks:
            wait_quiet()
            name = f"run-{k}ranks-{rep}"
            res = run_job(k, os.path.join(workdir, name + ".h5"), args.rounds, args.data_dir,
                          os.path.join(workdir, name + ".log"))
            runs[k].append(res)
            sec = res["round_seconds"][SKIP:]
            print(f"  {k} rank(s), repeat {rep + 1}/{args.repeat}: median round "
                  f"{np.median(sec):.3f} s, total {res['wall']:.1f} s, other processes used "
                  f"{res['foreign_cores']:.2f} cores", flush=True)
        if not no_torch:
            wait_quiet()
            res = run_torch(args.rounds, args.data_dir, os.path.join(workdir, f"torch-{rep}.log"))
            torch_runs.append(res)
            print(f"  PyTorch loop, repeat {rep + 1}/{args.repeat}: median round "
                  f"{np.median(res['round_seconds'][SKIP:]):.3f} s, total {res['wall']:.1f} s, "
                  f"other processes used {res['foreign_cores']:.2f} cores", flush=True)

    # Pooled statistics per rank count.
    stats = {}
    for k, rs in runs.items():
        sec = np.concatenate([r["round_seconds"][SKIP:] for r in rs])
        lines = np.concatenate([r["line_intervals"] for r in rs])
        stats[k] = {"median": float(np.median(sec)),
                    "line": float(np.median(lines)) if lines.size else float("nan"),
                    "rounds_sum": statistics.median(float(r["round_seconds"][SKIP:].sum()) for r in rs),
                    "wall": statistics.median(r["wall"] for r in rs),
                    "round1": statistics.median(float(r["round_seconds"][0]) for r in rs),
                    "outside": statistics.median(r["wall"] - float(r["round_seconds"].sum())
                                                 for r in rs),
                    "cpu": statistics.median(r["cpu"] for r in rs),
                    "cpu_round": statistics.median(r["cpu_round"] for r in rs),
                    "foreign": max(r["foreign_cores"] for r in rs),
                    "acc": sorted({r["accuracy"] for r in rs})}
    base = stats.get(1)

    print()
    print(f"Rounds {SKIP + 1}..{args.rounds} ({args.rounds - SKIP} per run, {args.repeat} run(s) pooled per "
          "rank count); times are medians")
    print(f"{'ranks':>5} {'s/round':>8} {'speed-up':>8} {'wall/round':>10} {'speed-up':>8} "
          f"{'rounds ' + str(SKIP + 1) + '..N':>11} {'round 1':>8} {'total':>7} {'outside':>7} {'CPU s':>6} "
          f"{'final acc':>9} {'other load':>10}")
    for k in ranks:
        s = stats[k]
        speed = f"{base['median'] / s['median']:.2f}x" if base else "n/a"
        speed_l = f"{base['line'] / s['line']:.2f}x" if base else "n/a"
        acc = "/".join(f"{a:.4f}" for a in s["acc"])
        print(f"{k:>5} {s['median']:>8.3f} {speed:>8} {s['line']:>10.3f} {speed_l:>8} "
              f"{s['rounds_sum']:>10.2f}s {s['round1']:>7.2f}s {s['wall']:>6.1f}s "
              f"{s['outside']:>6.1f}s {s['cpu']:>6.1f} {acc:>9} {s['foreign']:>8.2f} c")
    print("""  s/round     /rounds/seconds (rank 0, from the round's start to the end of its evaluation)
  wall/round  time between rank 0's consecutive per-round lines on stdout, so it also
              includes writing the round's results and checkpoint to the HDF5 file
  speed-up    1 process's time over K ranks' time, for the column to its left
  rounds 3..N sum of /rounds/seconds (rounds 1..2 excluded: round 1 loads numba's cache
              or compiles, round 2 still runs on cold CPU caches); round 1 alone beside it
  total       wall time of the whole command; outside = total - sum of all /rounds/seconds
              (start-up, data loading, results writing, shut-down)
  CPU s       CPU time of all the job's processes; other load = cores busy with OTHER
              processes during the run (max over repeats): should be ~0 on a quiet machine""")

    print()
    print("Targets (same invocation; primary: s/round from /rounds/seconds):")
    for key, label in (("median", "s/round   "), ("line", "wall/round")):
        if 1 in stats and 3 in stats:
            print(f"  [{label}] 3 ranks vs 1 process: "
                  f"{fmt_ratio(stats[1][key] / stats[3][key], SPEEDUP_3_VS_1, True)}")
        else:
            print(f"  [{label}] 3 ranks vs 1 process: n/a (needs --ranks with 1 and 3)")
        if 3 in stats and 8 in stats:
            print(f"  [{label}] 8 ranks vs 3 ranks:   "
                  f"{fmt_ratio(stats[8][key] / stats[3][key], SLOWDOWN_8_VS_3, False)}"
                  "  (time of 8 over time of 3)")
        else:
            print(f"  [{label}] 8 ranks vs 3 ranks:   n/a (needs --ranks with 3 and 8)")
    if pair is not None and base is not None:
        cap = 2 * base["median"] / float(np.mean(pair[0]))
        print(f"  calibration: 2 independent 1-process jobs side by side deliver {cap:.2f}x the "
              f"throughput of one (median s/round {np.mean(pair[0]):.3f} vs {base['median']:.3f} "
              f"alone):\n  no rank count can beat that speed-up on this machine"
              + (f" (the 3-rank target, {SPEEDUP_3_VS_1}x, is out of reach here)"
                 if cap < SPEEDUP_3_VS_1 else ""))
    noisy = [k for k in ranks if stats[k]["foreign"] > BUSY_WARN]
    if noisy:
        print(f"  WARNING: other processes used > {BUSY_WARN} cores during the runs with "
              f"{noisy} rank(s): the machine was not quiet, so these timings are not fedmpi's alone")

    if torch_runs:
        torch_section(runs, torch_runs, args.rounds)

    all_runs = [r for k in ranks for r in runs[k]]
    ref = all_runs[0]["params"]
    same = all(r["params"].shape == ref.shape and r["params"].tobytes() == ref.tobytes()
               for r in all_runs)
    print()
    print(f"/model/params bitwise identical in all {len(all_runs)} runs: {'yes' if same else 'no'}")
    if not same:
        for r in all_runs:
            d = np.max(np.abs(r["params"].astype(np.float64) - ref)) if r["params"].shape == ref.shape else "shape"
            print(f"  {r['ranks']} ranks: max |diff| vs first run = {d}")
    warns = sorted({w for r in all_runs for w in r["warnings"]})
    if warns:
        print("warnings printed by the runs:")
        for w in warns[:10]:
            print(f"  {w}")

    print()
    print(f"Simulator overhead and CPU cost, rounds {SKIP + 1}..N (medians over rounds):")
    print(f"{'ranks':>5} {'round s':>8} {'training s':>10} {'overhead':>9} {'critical s':>10} "
          f"{'overhead':>9} {'CPU ms/round':>12} {'vs 1 proc':>9}")
    for k in ranks:
        rs = runs[k]
        rnd = np.concatenate([r["round_seconds"][SKIP:] for r in rs])
        trn = np.concatenate([r["train_sum"][SKIP:] for r in rs])
        crit = np.concatenate([r["critical"][SKIP:] for r in rs])
        cpu = stats[k]["cpu_round"]
        rel = f"{cpu / base['cpu_round']:.2f}x" if base else "n/a"
        print(f"{k:>5} {np.median(rnd):>8.4f} {np.median(trn):>10.4f} "
              f"{100 * np.median((rnd - trn) / rnd):>8.1f}% {np.median(crit):>10.4f} "
              f"{100 * np.median((rnd - crit) / rnd):>8.1f}% {1000 * cpu:>12.1f} {rel:>9}")
    print("""  round s     /rounds/seconds
  training s  local training in the round: /clients/seconds summed over its clients
  overhead    (round - training) / round: for 1 process the simulator's overhead (client
              sampling, aggregation, server step, evaluation of the global model on the
              test set, bookkeeping); negative with several ranks (clients train in parallel)
  critical s  the slowest rank's training sum, the round's critical path; the overhead
              next to it is (round - critical) / round: waiting, communication, evaluation
  CPU ms/round CPU time of all the job's processes per round (rank 0's round lines 2..N;
              includes results writing). Barely affected by other load, so it shows the
              cost of more ranks even on a busy machine: on C idle cores a round can't take
              less than CPU/round / C""")

    if args.keep:
        print(f"\nresults files and logs kept in {workdir}")
    elif not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
