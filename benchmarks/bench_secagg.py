"""Cost of secure aggregation against none: the pure protocol, one core, no MPI.

    PYTHONPATH=. python benchmarks/bench_secagg.py [--ks 10,50,200] [--hidden 200,200]
        [--modes none,secagg,secagg+,he] [--dropout 0.0] [--rounds 1]

One round of K clients, each holding a random int64 fixed-point update of
the FedAvg paper's Fashion-MNIST 2NN (784-200-200-10: P = 199,210
parameters), aggregated by
- none:    the plain int64 sum (the exact-sum path without protection);
- secagg:  Bonawitz et al.'s protocol, every client paired with every other;
- secagg+: Bell et al.'s, each client paired with k = 2*log2(K) neighbours;
- he:      BFV encryption (TenSEAL), server-side ciphertext sums, one decryption.
Every client's work runs one after another on this core, so "client s"
summed over clients is the CPU time K devices would spend in parallel, and
"per client" is what one device spends. With --dropout p, a fraction p of
the clients drop after sharing their keys (the costliest point for the
server: it must reconstruct their mask keys and remove their pair masks).

Prints, per mode and K: client seconds per client and in total, server
seconds, the round's CPU seconds as a ratio to none, the bytes each client
sends and receives per phase, and the growth exponent of the total cost
between successive K (log cost ratio / log K ratio: secagg ~2, since each
of K clients expands K masks; secagg+ ~1.1-1.2, K log K; he ~1). Also the
mask expansion speed against the raw AES-256-CTR keystream of the same
library, and the CPU model and its AES/vector flags.

With --runs R, it also times whole runs of `python -m fedmpi` (R MPI ranks,
1 = no mpiexec) on Fashion-MNIST (the FedAvg paper's 2NN, iid, B = 10,
E = 1, --clients max(100, 2K)) for each mode and K: the median seconds per
round of --run-rounds rounds (the first round, which compiles and warms up,
left out), its ratio to none, the secure-aggregation CPU seconds of the
clients and of rank 0 from the results file, and the growth exponents.
    PYTHONPATH=. python benchmarks/bench_secagg.py --runs 3 --ks 10,50,200 --run-rounds 3
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import cpu_model, find_mpiexec  # noqa: E402  benchmarks/common.py

from fedmpi.privacy import secagg  # noqa: E402


def cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return " ".join(x for x in ("aes", "vaes", "avx2", "avx512f", "sha_ni") if x in have)
    except OSError:
        pass
    return "?"


def n_params(hidden: str) -> int:
    sizes = [784, *(int(h) for h in hidden.split(",")), 10]
    return sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def inputs(k: int, p: int) -> dict[int, np.ndarray]:
    g = np.random.default_rng(k)
    # fixed-point updates of magnitude ~2**50 (the exact-sum path's scale)
    return {u: g.integers(-2**50, 2**50, size=p, dtype=np.int64) for u in range(k)}


def run_none(x):
    t0 = time.perf_counter()
    total = np.zeros(next(iter(x.values())).size, dtype=np.int64)
    for v in x.values():
        total += v
    return {"client": 0.0, "server": time.perf_counter() - t0, "phases": {}}


def run_secagg(x, k, mode, dropout, rnd):
    plan = secagg.plan(mode, len(x))
    g = np.random.default_rng(rnd)
    ids = sorted(x)
    gone = g.choice(ids, size=int(round(dropout * len(ids))), replace=False)
    r = secagg.run_round(x, seed=0, rnd=rnd, threshold=plan.threshold, k=plan.k,
                         drop={int(u): "masked" for u in gone})
    if r.aborted:
        raise SystemExit(f"round aborted: {r.aborted}")
    phases = {p: (r.traffic.up[p].mean(), r.traffic.down[p].mean()) for p in secagg.PHASES}
    return {"client": r.client_seconds, "server": r.server_seconds, "phases": phases,
            "degree": plan.k if plan.k is not None else len(x) - 1, "t": plan.threshold}


def run_he(x, keys):
    from fedmpi.privacy import he
    secret, public = keys
    t0 = time.perf_counter()
    client_ctx = he.Context(public)
    cts = {u: client_ctx.encrypt(v) for u, v in x.items()}
    t1 = time.perf_counter()
    acc = he.Sum(he.Context(public))
    for c in cts.values():
        acc.add(c)
    summed = acc.ciphertexts()
    t2 = time.perf_counter()
    n = next(iter(x.values())).size
    he.Context(secret).decrypt(summed, n)
    t3 = time.perf_counter()
    up = np.mean([sum(map(len, c)) for c in cts.values()])
    down = sum(map(len, summed)) / len(x)  # the summed ciphertexts to one decrypting client, per client
    return {"client": (t1 - t0) + (t3 - t2), "server": t2 - t1, "phases": {"ciphertexts": (up, down)}}


def prg_speed(p: int, repeats: int = 20) -> tuple[float, float]:
    """GB/s of Prg (the mask expansion) and of the bare AES-256-CTR update_into."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    key = bytes(range(32))
    prg = secagg.Prg(p)
    zeros, buf = bytes(8 * p), bytearray(8 * p + 15)

    def bare():
        Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update_into(zeros, buf)

    best = {}
    for name, f in (("prg", lambda: prg(key)), ("aes", bare)):
        f()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        best[name] = 8 * p / min(ts) / 1e9
    return best["prg"], best["aes"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ks", default="10,50,200", help="clients per round to measure (default 10,50,200)")
    ap.add_argument("--hidden", default="200,200", help="hidden widths of the MLP (default 200,200)")
    ap.add_argument("--modes", default="none,secagg,secagg+,he")
    ap.add_argument("--dropout", type=float, default=0.0, help="fraction dropping after sharing keys")
    ap.add_argument("--rounds", type=int, default=1, help="rounds per (mode, K); the fastest counts")
    ap.add_argument("--runs", type=int, default=0, metavar="R",
                    help="also time whole fedmpi runs on R ranks (0 = protocol only)")
    ap.add_argument("--run-rounds", type=int, default=3, help="rounds of each whole run (default 3)")
    ap.add_argument("--data-dir", default=None, help="Fashion-MNIST directory for the whole runs")
    ap.add_argument("--no-protocol", action="store_true", help="skip the pure-protocol table")
    a = ap.parse_args(argv)
    ks = [int(k) for k in a.ks.split(",")]
    modes = a.modes.split(",")
    p = n_params(a.hidden)
    print(f"CPU: {cpu_model()} [{cpu_flags()}]  python {sys.version.split()[0]}")
    g_prg, g_aes = prg_speed(p)
    print(f"P = {p:,} parameters (784,{a.hidden},10); mask expansion {g_prg:.2f} GB/s = "
          f"{g_prg / g_aes:.2f} x the bare AES-256-CTR keystream ({g_aes:.2f} GB/s)")
    if a.no_protocol:
        return whole_runs(ks, modes, a.runs, a.run_rounds, a.data_dir) if a.runs else None
    keys = None
    if "he" in modes:
        try:
            from fedmpi.privacy import he
            he.check_available()
            t0 = time.perf_counter()
            keys = he.keygen()
            print(f"he: key generation {time.perf_counter() - t0:.2f} s; public context "
                  f"{len(keys[1]) / 1e6:.2f} MB to the server, secret context {len(keys[0]) / 1e6:.2f} MB")
        except Exception as e:  # UserError: TenSEAL missing
            print(f"he: skipped ({e})")
            modes.remove("he")
    print(f"dropout after sharing: {a.dropout:g}\n")
    hdr = f"{'mode':8} {'K':>4} {'deg':>4} {'t':>4} {'client s':>9} {'/client':>8} {'server s':>9} " \
          f"{'CPU s':>8} {'x none':>9}  bytes per client (up / down) per phase"
    print(hdr)
    print("-" * len(hdr))
    cost = {}
    for k in ks:
        x = inputs(k, p)
        for mode in modes:
            best = None
            for rnd in range(a.rounds):
                if mode == "none":
                    r = run_none(x)
                elif mode == "he":
                    r = run_he(x, keys)
                else:
                    r = run_secagg(x, k, mode, a.dropout, rnd)
                if best is None or r["client"] + r["server"] < best["client"] + best["server"]:
                    best = r
            r = best
            total = r["client"] + r["server"]
            cost[mode, k] = total
            ratio = total / cost["none", k] if ("none", k) in cost and cost["none", k] > 0 else float("nan")
            phases = "  ".join(f"{ph} {_fmt(u)}/{_fmt(d)}" for ph, (u, d) in r["phases"].items())
            print(f"{mode:8} {k:4d} {r.get('degree', ''):>4} {r.get('t', ''):>4} {r['client']:9.3f} "
                  f"{r['client'] / k:8.4f} {r['server']:9.3f} {total:8.3f} {ratio:9.0f}  {phases}", flush=True)
    print("\ngrowth exponent of CPU seconds, d log(cost) / d log(K):")
    for mode in modes:
        steps = [f"K {k1}->{k2}: {math.log(cost[mode, k2] / cost[mode, k1]) / math.log(k2 / k1):.2f}"
                 for k1, k2 in zip(ks[:-1], ks[1:]) if cost[mode, k1] > 0]
        print(f"  {mode:8} " + ", ".join(steps))
    if a.runs:
        whole_runs(ks, modes, a.runs, a.run_rounds, a.data_dir)


def whole_runs(ks, modes, ranks: int, rounds: int, data_dir: str | None) -> None:
    import h5py
    print(f"\nwhole runs: Fashion-MNIST 2NN, {ranks} rank(s), {rounds} rounds (median s/round "
          "of rounds 2..; crypto s summed over the round's clients / on rank 0, per round)")
    hdr = f"{'mode':8} {'K':>4} {'s/round':>9} {'x none':>8} {'client crypto s':>16} {'rank 0 crypto s':>16}"
    print(hdr)
    print("-" * len(hdr))
    cost = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in ks:
            for mode in modes:
                out = os.path.join(tmp, f"{mode}-{k}.h5")
                cmd = [sys.executable, "-m", "fedmpi", "--dataset", "fashion-mnist", "--partition", "iid",
                       "--clients", str(max(100, 2 * k)), "--clients-per-round", str(k),
                       "--rounds", str(rounds), "--local-epochs", "1", "--batch-size", "10",
                       "--hidden", "200,200", "--lr", "0.05", "--secure-aggregation", mode,
                       "--out", out]
                if data_dir:
                    cmd += ["--data-dir", data_dir]
                if ranks > 1:
                    cmd = [find_mpiexec("bench_secagg"), "-n", str(ranks), *cmd]
                p = subprocess.run(cmd, capture_output=True, text=True)
                if p.returncode != 0:
                    print(f"{mode:8} {k:4d} failed: {p.stderr.strip().splitlines()[-1:]}")
                    continue
                with h5py.File(out, "r") as f:
                    r = f["rounds"]
                    sec = float(np.median(r["seconds"][1:] if rounds > 1 else r["seconds"][()]))
                    crypto = [float(np.median(r[c][1:] if rounds > 1 else r[c][()])) if c in r else 0.0
                              for c in ("secure_client_seconds", "secure_server_seconds")]
                cost[mode, k] = sec
                ratio = sec / cost["none", k] if ("none", k) in cost else float("nan")
                print(f"{mode:8} {k:4d} {sec:9.3f} {ratio:8.2f} {crypto[0]:16.3f} {crypto[1]:16.3f}", flush=True)
    print("growth exponent of s/round, d log(s) / d log(K):")
    for mode in modes:
        steps = [f"K {k1}->{k2}: {math.log(cost[mode, k2] / cost[mode, k1]) / math.log(k2 / k1):.2f}"
                 for k1, k2 in zip(ks[:-1], ks[1:]) if (mode, k1) in cost and (mode, k2) in cost]
        print(f"  {mode:8} " + ", ".join(steps))


def _fmt(n: float) -> str:
    for unit, f in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= f:
            return f"{n / f:.1f}{unit}"
    return f"{n:.0f}B"


if __name__ == "__main__":
    main()
