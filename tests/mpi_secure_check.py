"""Run by tests/test_secagg.py under mpiexec: secure sums over MPI, printed as JSON by rank 0.

    mpiexec -n R python tests/mpi_secure_check.py MODE K N DROPS

Clients are hosted round-robin by ranks 1..R-1 (rank 0 too when alone), each
with an int64 input drawn from a generator seeded by its id; DROPS is a
comma-separated list of id:phase. Rank 0 prints the sum's bytes (hex), who
is in it, whether the round aborted, and the traffic per phase.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

from fedmpi.privacy import secagg
from fedmpi.runtime import comm as C
from fedmpi.runtime import secure


def client_input(u, n):
    return np.random.default_rng([99, u]).integers(-2**63, 2**63, size=n, dtype=np.int64)


def main():
    mode, k, n, drops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    comm = MPI.COMM_WORLD
    hosts = list(range(1, comm.size)) or [0]
    clients = list(range(3, 3 + 2 * k, 2))  # not 0..k-1: ids need not be dense
    mine = [u for i, u in enumerate(clients) if hosts[i % len(hosts)] == comm.rank]
    inputs = {u: client_input(u, n) for u in mine}
    out = {}
    if mode == "he":
        public, secret = secure.he_keys(comm)
        r = secure.he_sum(comm, mine, inputs.__getitem__, public, secret, n)
        if comm.rank == 0:
            out = {"total": r.total.tobytes().hex(), "included": clients,
                   "up": [r.bytes_up[u] for u in clients]}
    else:
        drop = dict((int(a), b) for a, b in (d.split(":") for d in drops.split(",") if d))
        plan = secagg.plan(mode, k)

        def reduce(part):
            total = np.zeros(n, np.uint64) if comm.rank == 0 else None
            C.reduce_sum(comm, part, total)
            return total

        r = secure.secagg_sum(comm, mine, inputs.__getitem__, clients=clients, plan=plan, seed=5,
                              rnd=2, n=n, reduce=reduce, drop=drop)
        if comm.rank == 0:
            out = {"total": None if r.total is None else r.total.tobytes().hex(),
                   "included": list(r.included), "aborted": r.aborted,
                   "seconds": sorted(r.seconds) == clients,
                   "up": {p: r.traffic.up[p].tolist() for p in secagg.PHASES},
                   "down": {p: r.traffic.down[p].tolist() for p in secagg.PHASES}}
    if comm.rank == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
