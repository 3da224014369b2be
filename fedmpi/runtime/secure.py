"""Secure aggregation over MPI: the protocol's messages routed through rank 0.

Rank 0 plays the server (fedmpi.privacy.secagg.Server, he.Sum); every rank
hosts the clients it trained this round. The protocols themselves are pure
(fedmpi/privacy/); this module only moves their messages:
- small messages (public keys, encrypted shares, survivor lists, revealed
  shares) are control data: pickled dicts gathered to rank 0 and scattered
  back, each rank receiving only its own clients' entries;
- the masked inputs -- the big messages -- are summed in Z_{2^64} on each
  rank and brought to rank 0 by `reduce`, the exact-sum transport of the
  plain path (a node sum and a Reduce), so no rank count changes a bit.
For he, a client-hosting rank (rank 1; rank 0 only when it is alone) makes
the key pair and keeps the secret key; every rank encrypts its clients'
updates and adds them up, rank 0 adds the ranks' ciphertext sums without the
secret key and sends the total back to the key holder to decrypt.
A round aborted for too few survivors is decided on rank 0 and reported to
every rank with the next scatter, so that all ranks leave the protocol at
the same step (nothing hangs).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from fedmpi.privacy import secagg
from fedmpi.privacy.secagg import Abort, ClientGroup, RoundResult, Server
from fedmpi.runtime import comm as C


def _route(comm: MPI.Comm, hosted: list[list[int]] | None, msgs: dict, step) -> dict:
    """Gather every rank's messages to rank 0, apply the server's `step`, and
    scatter its answers to the ranks hosting their addressees. Raises Abort
    on every rank if the step aborted.

    The pickled gather and scatter would spin while other ranks are busy
    (clients computing, rank 0 serving); sleep-waiting barriers in front of
    them give those cores back on oversubscribed nodes."""
    C.barrier(comm)  # every rank's clients are done with this phase
    gathered = comm.gather(msgs, root=0)
    replies = None
    if comm.rank == 0:
        merged = {}
        for g in gathered:
            merged.update(g)
        try:
            out = step(merged)
            replies = [("ok", {u: out[u] for u in ids if u in out}) for ids in hosted]
        except Abort as e:
            replies = [("abort", str(e))] * comm.size
    C.barrier(comm)  # rank 0 has served
    status, payload = comm.scatter(replies, root=0)
    if status == "abort":
        raise Abort(payload)
    return payload


def secagg_sum(comm: MPI.Comm, hosted: list[int], encode: Callable[[int], np.ndarray], *, clients,
               plan: secagg.Plan, seed: int, rnd: int, n: int,
               reduce: Callable[[np.ndarray], np.ndarray | None],
               drop: dict[int, str] | None = None) -> RoundResult | None:
    """One SecAgg / SecAgg+ round over `comm`.

    hosted: the clients this rank runs the protocol for; encode(u) -> client
    u's int64 fixed-point input (length n), asked only of clients that send
    one; clients: every sampled client of the round (the same on all ranks);
    reduce(part) -> the sum over ranks of the uint64 `part` on rank 0 (None
    elsewhere), called once by every rank; drop: who stops at which phase.
    Returns the RoundResult on rank 0 (with .seconds per client), None elsewhere.
    """
    root = comm.rank == 0
    clients = sorted(int(c) for c in clients)
    group = ClientGroup(hosted, seed, rnd, plan.threshold, drop)
    hosted = comm.gather(sorted(hosted), root=0)
    server = Server(clients, plan.threshold, secagg.neighbours(clients, plan.k, seed, rnd)) if root else None
    server_seconds = 0.0

    def serve(f):
        if not root:
            return None

        def step(*a):
            nonlocal server_seconds
            t0 = time.perf_counter()
            try:
                return f(*a)
            finally:
                server_seconds += time.perf_counter() - t0
        return step

    result = {}

    def finish(reveals):  # the last step answers nobody: the total stays on rank 0
        result["total"] = server.unmask(reveals, masked_sum)
        return {}

    aborted = None
    try:
        keys = _route(comm, hosted, group.advertise(), serve(server.route_keys if root else None))
        inbox = _route(comm, hosted, group.share_keys(keys), serve(server.route_shares if root else None))
        part, senders = group.masked_sum(inbox, encode, n)
        masked_sum = reduce(part)
        u3 = _route(comm, hosted, dict.fromkeys(senders),
                    serve(lambda m: server.collect_masked(list(m), 8 * n)))
        _route(comm, hosted, group.unmask(u3), serve(finish))
    except Abort as e:
        aborted = str(e)
    seconds = comm.gather(group.seconds, root=0)
    if not root:
        return None
    each = {u: t for s in seconds for u, t in s.items()}
    total = result.get("total")
    return RoundResult(total, tuple(sorted(server.u3)) if total is not None else (), aborted,
                       server.traffic, sum(each.values()), server_seconds, each)


# ---------------------------------------------------------------- he

def key_holder(comm: MPI.Comm) -> int:
    """The rank whose client decrypts: a client host, not the server, when there is one."""
    return 1 if comm.size > 1 else 0


def he_keys(comm: MPI.Comm):
    """(public context on every rank, secret context on the key holder else None). Collective."""
    from fedmpi.privacy import he
    holder = key_holder(comm)
    secret = public = None
    if comm.rank == holder:
        secret, public = he.keygen()
    public = comm.bcast(public, root=holder)
    return he.Context(public), (he.Context(secret) if comm.rank == holder else None)


@dataclass
class HEResult:
    total: np.ndarray  # the int64 sum of every client's input
    bytes_up: dict[int, int]  # ciphertext bytes each client sent
    bytes_down: int  # the summed ciphertexts sent to the key holder
    seconds: dict[int, float]  # each client's encryption seconds
    decrypt_seconds: float  # the key holder's
    server_seconds: float  # rank 0 adding ciphertexts


def he_sum(comm: MPI.Comm, hosted: list[int], encode: Callable[[int], np.ndarray],
           public, secret, n: int) -> HEResult | None:
    """Sum the int64 inputs encode(u) of every rank's `hosted` clients under BFV; the result on rank 0.

    Each rank adds its own clients' ciphertexts (a client host may add what
    it is given), rank 0 adds the ranks' sums; only the key holder decrypts.
    """
    from fedmpi.privacy import he
    root, holder = comm.rank == 0, key_holder(comm)
    seconds, sizes, local = {}, {}, he.Sum(public)
    for u in sorted(hosted):
        x = encode(u)
        t0 = time.perf_counter()
        cts = public.encrypt(x)
        seconds[u] = time.perf_counter() - t0
        sizes[u] = sum(map(len, cts))
        local.add(cts)
    part = (local.ciphertexts(), local.count) if local.count else None
    C.barrier(comm)  # sleep, not spin, while other ranks encrypt
    gathered = comm.gather((part, seconds, sizes), root=0)
    summed = None
    server_seconds = 0.0
    if root:
        t0 = time.perf_counter()
        acc = he.Sum(public)
        for p, _, _ in gathered:
            if p is not None:
                acc.add(*p)
        summed = acc.ciphertexts()
        server_seconds = time.perf_counter() - t0
    C.barrier(comm)  # the key holder sleeps while rank 0 adds
    total = np.zeros(n, np.int64)
    decrypt_seconds = 0.0
    if holder == 0:
        if root:
            t0 = time.perf_counter()
            total = secret.decrypt(summed, n)
            decrypt_seconds = time.perf_counter() - t0
    elif root:
        comm.send(summed, dest=holder, tag=91)
        C.wait(comm.Irecv(total, source=holder, tag=92))
        decrypt_seconds = comm.recv(source=holder, tag=93)
    elif comm.rank == holder:
        summed = comm.recv(source=0, tag=91)
        t0 = time.perf_counter()
        total = secret.decrypt(summed, n)
        C.wait(comm.Isend(total, dest=0, tag=92))
        comm.send(time.perf_counter() - t0, dest=0, tag=93)
    if not root:
        return None
    return HEResult(total, {u: b for _, _, s in gathered for u, b in s.items()}, sum(map(len, summed)),
                    {u: t for _, s, _ in gathered for u, t in s.items()}, decrypt_seconds, server_seconds)


# ---------------------------------------------------------------- the run's transport

class SecureSum:
    """--secure-aggregation secagg|secagg+|he: the round's exact int64 sum, protected.

    Built once per run on every rank (for he this makes the key pair: collective).
    Called once per round by every rank; returns on rank 0 the sum of the
    reporting clients' encodings (None if the round was skipped), the round's
    metrics and, per reporting client, its cryptography seconds and the bytes it
    sent and received.
    """

    def __init__(self, cfg, comm: MPI.Comm, workers: list[int]):
        self.mode, self.threshold, self.seed = cfg.secure_aggregation, cfg.secagg_threshold, cfg.seed
        self.comm, self.workers = comm, workers
        self.keys = he_keys(comm) if self.mode == "he" else (None, None)
        phases = ("ciphertext", "decrypt") if self.mode == "he" else secagg.PHASES
        self.round_columns = ("secure_skipped", *(f"secure_bytes_{p}" for p in phases),
                              "secure_client_seconds", "secure_server_seconds")

    def describe(self, clients_per_round: int) -> str:
        if self.mode == "he":
            from fedmpi.privacy import he
            return (f"secure aggregation: he (BFV, TenSEAL; {he.POLY_DEGREE} slots per ciphertext, "
                    f"key pair held by the clients of rank {key_holder(self.comm)})")
        p = secagg.round_plan(self.mode, clients_per_round, self.threshold)
        deg = f"{p.k} neighbours" if p.k is not None else "all other clients"
        return (f"secure aggregation: {self.mode} (each client pairs with {deg}; "
                f"threshold {p.threshold} share holders)")

    def __call__(self, rnd: int, sampled: np.ndarray, clients: np.ndarray, mine: np.ndarray,
                 encode: Callable[[int], np.ndarray], reduce: Callable[[np.ndarray], np.ndarray | None],
                 n: int):
        if self.mode == "he":
            return self._he(clients, mine, encode, n)
        comm, workers = self.comm, self.workers
        # clients that fail to report still take part until their drop phase:
        # they are hosted round-robin by the workers (they train nothing)
        dropped = np.setdiff1d(sampled, clients).tolist()
        hosted = mine.tolist() + [u for i, u in enumerate(dropped) if workers[i % len(workers)] == comm.rank]
        r = secagg_sum(comm, hosted, encode, clients=sampled.tolist(),
                       plan=secagg.round_plan(self.mode, len(sampled), self.threshold),
                       seed=self.seed, rnd=rnd, n=n, reduce=reduce,
                       drop=secagg.dropout_phases(dropped, self.seed, rnd))
        if r is None:
            return None, None, None
        pos = {c: i for i, c in enumerate(r.traffic.clients)}
        moved = sum(r.traffic.up[p] + r.traffic.down[p] for p in secagg.PHASES)
        metrics = {"secure_skipped": int(r.total is None),
                   **{f"secure_bytes_{p}": _mean(r.traffic.up[p] + r.traffic.down[p]) for p in secagg.PHASES},
                   "secure_client_seconds": r.client_seconds, "secure_server_seconds": r.server_seconds}
        return r.total, metrics, {
            "secure_seconds": np.array([r.seconds.get(c, 0.0) for c in clients.tolist()]),
            "secure_bytes": np.array([moved[pos[c]] for c in clients.tolist()], np.int64)}

    def _he(self, clients, mine, encode, n):
        public, secret = self.keys
        r = he_sum(self.comm, mine.tolist(), encode, public, secret, n)
        if r is None:
            return None, None, None
        metrics = {"secure_skipped": 0,
                   "secure_bytes_ciphertext": _mean(np.array(list(r.bytes_up.values()), np.float64)),
                   "secure_bytes_decrypt": r.bytes_down,
                   "secure_client_seconds": sum(r.seconds.values()) + r.decrypt_seconds,
                   "secure_server_seconds": r.server_seconds}
        return r.total, metrics, {
            "secure_seconds": np.array([r.seconds.get(c, 0.0) for c in clients.tolist()]),
            "secure_bytes": np.array([r.bytes_up.get(c, 0) for c in clients.tolist()], np.int64)}


def _mean(a: np.ndarray) -> float:
    return float(a.mean()) if a.size else 0.0
