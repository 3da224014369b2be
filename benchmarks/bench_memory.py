#!/usr/bin/env python
"""Memory benchmark: peak memory per rank and in total, 1 process, 2 and 8 ranks.

The training set must be held once per node (an MPI shared-memory window,
fedmpi.runtime.comm.share_arrays), so adding ranks must not add copies of it.
RSS can't show that: a page shared by 8 processes counts fully in each of
their 8 RSS values. PSS (proportional set size) charges a shared page 1/n to
each of the n processes mapping it, so the PSS summed over the ranks is the
memory the job really uses. This script samples, from the outside, every
--interval seconds while each job runs,

- /proc/<pid>/smaps_rollup (Pss and its Anon/File/Shmem split) and
- /proc/<pid>/status (VmRSS, VmHWM: the peak RSS so far)

of every rank process (the python descendants of the launcher; rank ids from
PMI_RANK) and reports, per rank count: the peak of the summed PSS, per-rank
peak PSS and RSS, the last VmHWM seen, and the launcher's own PSS (mpiexec and
hydra_pmi_proxy, not counted in the total). It also measures the baseline of
one process that imports what a rank imports (numpy, numba, mpi4py + MPI_Init,
h5py, fedmpi) and loads the numba kernels, but holds no data.

Verdict: the per-extra-rank cost, (total PSS at 8 ranks - at 2 ranks) / 6,
counting anonymous and shared-memory pages (file-backed library pages are
left out: their PSS depends on unrelated processes mapping the same
libraries), minus the private (anonymous) memory of a data-less rank process,
must stay well below the data size: PASS if it is under half of it; a private
copy of the data per rank would make it ~100%. (Comparing the per-extra-rank cost
with the data size alone can't work: a rank's own baseline is larger than
Fashion-MNIST.)

    python benchmarks/bench_memory.py                 # ranks 1,2,8, 3 rounds each
    python benchmarks/bench_memory.py --ranks 1,2,4,8 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from common import find_mpiexec  # benchmarks/common.py (scripts run from benchmarks/)

JOB = ["--dataset", "fashion-mnist", "--partition", "iid", "--clients", "100",
       "--clients-per-round", "10", "--local-epochs", "1", "--batch-size", "10",
       "--hidden", "200,200", "--lr", "0.05", "--algorithm", "fedavg", "--seed", "0"]

MiB = 1024 * 1024

# What one rank process imports and initialises, without any data.
BASELINE = """
import os, sys, time
for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(v, "1")
import numpy as np, h5py
from mpi4py import MPI
import fedmpi.runtime.loop, fedmpi.results
from fedmpi.model import kernels
from fedmpi.model.mlp import MLP
from fedmpi.config import Config
from fedmpi.client import LocalTrainer
from fedmpi.data import Dataset
from fedmpi.rng import generator
# Tiny data, so the kernels are loaded from numba's cache (same signatures as a
# Fashion-MNIST run: uint8 features, int32 labels) without holding real data.
x = np.zeros((20, 784), np.uint8); y = np.zeros(20, np.int32)
ds = Dataset("tiny", x, y, x, y, 10, 1 / 255)
cfg = Config(hidden=(200, 200), batch_size=10)
model = MLP((784, 200, 200, 10))
params = model.init(generator(0, "init"), cfg.init)
t = LocalTrainer(cfg, model, ds)
t.train(params.copy(), np.arange(20, dtype=np.int64), generator(0, "shuffle", 1, 0))
t.evaluate(params, 0, 20)
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
"""


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace")
    except OSError:  # the process exited meanwhile
        return None


def _kb_fields(text: str | None, names) -> dict[str, int]:
    out = {}
    if text:
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in names:
                out[key] = int(rest.split()[0]) * 1024
    return out


def descendants(root: int) -> list[int]:
    """root and every process below it, by walking the ppid fields of /proc/*/stat."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = _read(f"/proc/{name}/stat")
        if not stat:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # comm may hold spaces
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


class Sampler:
    """Samples PSS/RSS of a process tree every `interval` seconds in a thread."""

    SMAPS = ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem", "Rss")
    STATUS = ("VmRSS", "VmHWM")

    def __init__(self, root: int, interval: float):
        self.root, self.interval = root, interval
        self.procs: dict[int, dict] = {}  # pid -> {"kind", "rank", peaks...}
        self.peak_total = 0
        self.peak_total_split: dict[str, int] = {}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self):
        self._thread.start()
        return self

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _classify(self, pid: int) -> dict | None:
        cmd = _read(f"/proc/{pid}/cmdline")
        if not cmd:
            return None
        argv = cmd.split("\0")
        is_rank = "fedmpi" in argv and "-m" in argv and "python" in os.path.basename(argv[0])
        rank = 0
        if is_rank:
            env = _read(f"/proc/{pid}/environ") or ""
            for item in env.split("\0"):
                if item.startswith("PMI_RANK="):
                    rank = int(item.split("=", 1)[1])
        return {"kind": "rank" if is_rank else "launcher", "rank": rank,
                "name": os.path.basename(argv[0]), "Pss": 0, "Rss": 0, "VmHWM": 0}

    def sample(self) -> None:
        total = 0
        split = {"Pss_Anon": 0, "Pss_File": 0, "Pss_Shmem": 0}
        for pid in descendants(self.root):
            info = self.procs.get(pid)
            if info is None or info["kind"] == "launcher":
                # Classify again until it is a rank: a process seen between
                # hydra_pmi_proxy's fork and its exec of python still shows the
                # proxy's command line.
                fresh = self._classify(pid)
                if fresh is None:
                    continue
                if info is None or fresh["kind"] != info["kind"]:
                    info = self.procs[pid] = fresh
            smaps = _kb_fields(_read(f"/proc/{pid}/smaps_rollup"), self.SMAPS)
            status = _kb_fields(_read(f"/proc/{pid}/status"), self.STATUS)
            if "Pss" not in smaps:
                continue
            info["Pss"] = max(info["Pss"], smaps["Pss"])
            info["Rss"] = max(info["Rss"], status.get("VmRSS", smaps.get("Rss", 0)))
            info["VmHWM"] = max(info["VmHWM"], status.get("VmHWM", 0))  # last seen = max
            if info["kind"] == "rank":
                total += smaps["Pss"]
                for k in split:
                    split[k] += smaps.get(k, 0)
        self.samples += 1
        if total > self.peak_total:
            self.peak_total, self.peak_total_split = total, split

    def _loop(self):
        while not self._stop.is_set():
            t = time.perf_counter()
            self.sample()
            self._stop.wait(max(0.0, self.interval - (time.perf_counter() - t)))


def run_job(ranks: int, rounds: int, data_dir: str | None, workdir: str, interval: float) -> dict:
    out = os.path.join(workdir, f"mem-{ranks}.h5")
    cmd = [sys.executable, "-m", "fedmpi", *JOB, "--rounds", str(rounds), "--out", out,
           "--overwrite"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    if ranks > 1:
        cmd = [find_mpiexec("bench_memory"), "-n", str(ranks), *cmd]
    log = os.path.join(workdir, f"mem-{ranks}.log")
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        sampler = Sampler(proc.pid, interval).start()
        rc = proc.wait()
        sampler.stop()
    wall = time.perf_counter() - t0
    if rc != 0:
        sys.exit(f"bench_memory: {' '.join(cmd)}\nexited with status {rc}:\n"
                 + open(log).read()[-3000:])
    ranks_seen = sorted((i for i in sampler.procs.values() if i["kind"] == "rank"),
                        key=lambda i: i["rank"])
    if len(ranks_seen) != ranks:
        print(f"  warning: saw {len(ranks_seen)} rank processes, expected {ranks}")
    launcher = sum(i["Pss"] for i in sampler.procs.values() if i["kind"] == "launcher")
    return {"ranks": ranks, "wall": wall, "samples": sampler.samples,
            "total": sampler.peak_total, "split": sampler.peak_total_split,
            "per_rank": ranks_seen, "launcher": launcher if ranks > 1 else 0}


def baseline(interval: float, workdir: str) -> dict:
    """Peak PSS (and its split) and RSS of one process with a rank's imports and
    numba kernels, but no data."""
    proc = subprocess.Popen([sys.executable, "-c", BASELINE, "1.0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=workdir)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        sys.exit("bench_memory: baseline process failed:\n" + proc.stderr.read()[-3000:])
    peak: dict[str, int] = {}
    for _ in range(5):
        fields = _kb_fields(_read(f"/proc/{proc.pid}/smaps_rollup"), Sampler.SMAPS)
        fields.update(_kb_fields(_read(f"/proc/{proc.pid}/status"), Sampler.STATUS))
        for k, v in fields.items():
            peak[k] = max(peak.get(k, 0), v)
        time.sleep(interval)
    proc.wait()
    return peak


def data_size(data_dir: str | None) -> tuple[int, str]:
    """Bytes of the Fashion-MNIST arrays a run holds (train+test images and labels)."""
    try:
        from fedmpi.data import load_dataset
        ds = load_dataset("fashion-mnist", data_dir=data_dir, seed=0, num_clients=100)
        arrays = (ds.x_train, ds.y_train, ds.x_test, ds.y_test)
        return sum(a.nbytes for a in arrays), " + ".join(
            f"{a.shape}{a.dtype}" for a in arrays)
    except Exception as e:  # noqa: BLE001 -- fall back to the known shapes
        print(f"  (could not load the data set to size it: {e}; using the known shapes)")
        return 60000 * 784 + 60000 * 4 + 10000 * 784 + 10000 * 4, "known shapes, int32 labels"


def mib(n: float) -> str:
    return f"{n / MiB:7.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", default="1,2,8", help="comma-separated rank counts (default 1,2,8)")
    p.add_argument("--rounds", type=int, default=3, help="rounds per run (default 3)")
    p.add_argument("--interval", type=float, default=0.1, help="sampling period in s (default 0.1)")
    p.add_argument("--data-dir", help="directory with the Fashion-MNIST IDX files")
    p.add_argument("--keep", action="store_true", help="keep results files and logs")
    args = p.parse_args()
    ranks = [int(x) for x in args.ranks.split(",")]
    workdir = tempfile.mkdtemp(prefix="fedmpi-bench-mem-")

    size, what = data_size(args.data_dir)
    print(f"fedmpi bench_memory: {os.cpu_count()} cores, sampling every {args.interval} s, "
          f"{args.rounds} rounds per run")
    print(f"data set held by a run: {size / MiB:.1f} MiB ({size} bytes: {what})")
    base = baseline(args.interval, workdir)
    print(f"baseline process (imports + MPI_Init + numba kernels, no data): "
          f"PSS {base['Pss'] / MiB:.1f} MiB (anon {base.get('Pss_Anon', 0) / MiB:.1f}, "
          f"file {base.get('Pss_File', 0) / MiB:.1f}), RSS {base['VmRSS'] / MiB:.1f} MiB, "
          f"VmHWM {base['VmHWM'] / MiB:.1f} MiB")
    # Warm-up so that numba compiles (if it must) before any measured run.
    run_job(1, 1, args.data_dir, workdir, 1.0)

    results = []
    for k in ranks:
        r = run_job(k, args.rounds, args.data_dir, workdir, args.interval)
        results.append(r)
        print(f"  {k} rank(s): {r['wall']:.1f} s, {r['samples']} samples", flush=True)

    print()
    print("Peak memory, MiB. 'total PSS' = peak over samples of the PSS summed over the ranks "
          "(anon/file/shmem split at that moment);\nper-rank columns = min..max over the ranks "
          "of each rank's own peak; launcher = mpiexec + hydra_pmi_proxy PSS (not in total).")
    print(f"{'ranks':>5} {'total PSS':>9} {'anon':>7} {'file':>7} {'shmem':>7} "
          f"{'rank-0 PSS':>10} {'other ranks PSS':>15} {'RSS':>15} {'VmHWM':>15} {'launcher':>8}")
    for r in results:
        pr = r["per_rank"]
        rest = pr[1:] or pr
        rng = lambda key, rows: (f"{min(i[key] for i in rows) / MiB:.1f}..{max(i[key] for i in rows) / MiB:.1f}")  # noqa: E731
        s = r["split"]
        print(f"{r['ranks']:>5} {mib(r['total']):>9} {mib(s.get('Pss_Anon', 0))} "
              f"{mib(s.get('Pss_File', 0))} {mib(s.get('Pss_Shmem', 0))} "
              f"{mib(pr[0]['Pss']):>10} {rng('Pss', rest):>15} {rng('Rss', pr):>15} "
              f"{rng('VmHWM', pr):>15} {mib(r['launcher']):>8}")
    for r in results:
        print(f"  {r['ranks']} rank(s): total PSS {r['total'] / MiB:.1f} MiB = "
              f"{r['total'] / r['ranks'] / MiB:.1f} MiB per rank")

    by = {r["ranks"]: r for r in results}
    print()
    if 2 in by and 8 in by:
        per_extra = (by[8]["total"] - by[2]["total"]) / 6
        split = {k: (by[8]["split"].get(k, 0) - by[2]["split"].get(k, 0)) / 6
                 for k in ("Pss_Anon", "Pss_File", "Pss_Shmem")}
        anon = base.get("Pss_Anon", 0)
        # File-backed PSS (shared libraries) is left out of the verdict: it is
        # split with every process mapping the same files, including unrelated
        # Python jobs on the machine, so it moves from run to run.
        own = split["Pss_Anon"] + split["Pss_Shmem"]
        excess = own - anon
        print(f"per-extra-rank cost, (total PSS at 8 ranks - at 2) / 6: {per_extra / MiB:.1f} MiB "
              f"(anon {split['Pss_Anon'] / MiB:.1f}, shmem {split['Pss_Shmem'] / MiB:.1f}, "
              f"file {split['Pss_File'] / MiB:.1f})")
        print(f"  data set: {size / MiB:.1f} MiB; a data-less rank process alone: "
              f"{base['Pss'] / MiB:.1f} MiB PSS, of which {anon / MiB:.1f} MiB private (anon)")
        print(f"  per-extra-rank anon + shmem minus that private baseline: {excess / MiB:.1f} MiB = "
              f"{100 * excess / size:.0f}% of the data set (a private copy of the data per rank "
              f"would add ~100%)")
        ok = excess < size / 2
        print(f"  data held once per node, not per rank: {'PASS' if ok else 'FAIL'} "
              f"(criterion: < 50% of the data set)")
        print(f"  literal test 'per-extra-rank cost < data size': {per_extra / MiB:.1f} vs "
              f"{size / MiB:.1f} MiB -> {'yes' if per_extra < size else 'no'}"
              + ("" if per_extra < size else
                 " (a rank's own baseline is larger than the data set)"))
        sh2, sh8 = by[2]["split"].get("Pss_Shmem", 0), by[8]["split"].get("Pss_Shmem", 0)
        print(f"  shared-memory PSS summed over the ranks: {sh2 / MiB:.1f} MiB at 2 ranks, "
              f"{sh8 / MiB:.1f} MiB at 8 ranks (the data window + MPICH's own buffers)")
    else:
        print("per-extra-rank cost: n/a (needs --ranks with 2 and 8)")

    if args.keep:
        print(f"\nresults files and logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
