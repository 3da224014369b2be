#!/usr/bin/env python
"""Memory of per-client state: SCAFFOLD's control variates for many registered clients.

One process runs the same job three times -- FedAvg, SCAFFOLD with the control
variates in RAM, SCAFFOLD with them in a memory-mapped spill file
(--client-state-dir) -- and reports each run's peak RSS (the child's
ru_maxrss) and how many clients held a row at the end. Only clients that
have trained hold one (4 P bytes each), so the in-RAM cost is about
(clients trained) x 4 P over FedAvg's; with the spill file it is bounded by
the pages the kernel keeps cached.

    python benchmarks/bench_client_state.py                       # 10,000 clients, 100 a round
    python benchmarks/bench_client_state.py --clients 100000 --rounds 50
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from common import cpu_model

from fedmpi.results import read_checkpoint


def peak_rss(args: list[str]) -> int:
    """Peak RSS in bytes of `python -m fedmpi args` (run in a fresh wrapper process, so
    ru_maxrss of its children is this job's alone)."""
    code = ("import resource, subprocess, sys; "
            "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "fedmpi", *args],
                         check=True, capture_output=True, text=True).stdout
    return int(out.split()[-1]) * 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10_000)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30)
    a = ap.parse_args()
    print(f"CPU: {cpu_model()}; {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as tmp:
        common = ["--dataset", "synthetic", "--synthetic-mean-samples", "20",
                  "--clients", str(a.clients), "--clients-per-round", str(a.per_round),
                  "--rounds", str(a.rounds), "--eval-every", str(a.rounds),
                  "--checkpoint-every", str(a.rounds), "--overwrite"]
        spill = os.path.join(tmp, "spill")
        os.mkdir(spill)
        runs = [("fedavg", []), ("scaffold, in RAM", ["--algorithm", "scaffold"]),
                ("scaffold, spilled", ["--algorithm", "scaffold", "--client-state-dir", spill])]
        base = None
        print(f"{a.clients} clients, {a.per_round} a round, {a.rounds} rounds, one process")
        print("| run | clients with a row | their rows | peak RSS | over FedAvg |")
        print("|---|---|---|---|---|")
        for name, extra in runs:
            out = os.path.join(tmp, "r.h5")
            rss = peak_rss(common + extra + ["--out", out])
            _, _, arrays = read_checkpoint(out)
            rows = arrays.get("scaffold_c_rows")
            n, nbytes = (0, 0) if rows is None else (rows.shape[0], rows.nbytes)
            base = rss if base is None else base
            print(f"| {name} | {n} | {nbytes / 1e6:.0f} MB | {rss / 1e6:.0f} MB | "
                  f"{(rss - base) / 1e6:+.0f} MB |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
