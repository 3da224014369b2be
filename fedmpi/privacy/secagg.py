"""Secure aggregation: the server learns only the sum of the clients' inputs.

The protocol of Bonawitz et al., "Practical secure aggregation for
privacy-preserving machine learning" (CCS 2017, §4, the honest-but-curious
version), and its sparse variant SecAgg+ of Bell et al., "Secure single-server
aggregation with (poly)logarithmic overhead" (CCS 2020), in which a client
pairs only with its k neighbours on a random regular graph.

Inputs are int64 vectors (the fixed-point encoding of the exact-sum path),
masked and summed in Z_{2^64} (uint64 arithmetic wraps), so the masks cancel
exactly and the unmasked sum equals the plain int64 sum bit for bit.

Rounds (all messages pass through the server, which counts their bytes):
  0 advertise  u -> S: c_u^PK, s_u^PK (two X25519 key pairs);
               S -> u: the keys of u's neighbours that advertised (U1)
  1 share      u -> S: for each neighbour v, AES-GCM under HKDF(c_u^SK c_v^PK)
               of Shamir shares of the self-mask seed b_u and of s_u^SK;
               S -> v: the ciphertexts addressed to v from senders in U2
  2 masked     u -> S: y_u = x_u + PRG(b_u) + sum_{v>u} PRG(s_uv) - sum_{v<u} PRG(s_uv),
               s_uv = HKDF(s_u^SK s_v^PK), over neighbours v in U2;
               S -> u: U3, the neighbours whose masked input arrived
  3 unmask     u -> S: for each neighbour v in U2: the share of b_v if v in U3,
               else the share of s_v^SK (never both);
               S: reconstructs b_v (v in U3) and s_v^SK (v in U2 \\ U3) from t
               shares each, removes PRG(b_v) and the dropped clients' pair masks.
A client can drop out at any phase. When some secret the server needs has
fewer than t live holders, the round is aborted before anything is
reconstructed: the server then holds only masked vectors, which look uniform.

Trust model: semi-honest server and clients (the paper's active-adversary
version adds signatures and a consistency round; not simulated). Every
client's key pairs, mask seed and Shamir coefficients come from
fedmpi.rng.generator(seed, "secagg-keys", round, client) so that runs are
reproducible; a deployment draws them from the operating system's CSPRNG.
"""

from __future__ import annotations

import math
import struct
import time
from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedmpi import rng
from fedmpi.errors import UserError
from fedmpi.privacy import shamir

PHASES = ("advertise", "share", "masked", "unmask")
_ID = struct.Struct(">I")  # a client id on the wire
_ID_BYTES = _ID.size
_KEY_BYTES = 32
_SELF_MASK, _KEY_SHARE = 0, 1  # the kind of a revealed share


class Abort(Exception):
    """Too few live holders for some secret: the round ends, nothing is unmasked."""


# ---------------------------------------------------------------- primitives

def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(shared)


def _agree(sk: X25519PrivateKey, pk: bytes, info: bytes) -> bytes:
    """A 32-byte key both ends derive: HKDF-SHA256 of the X25519 shared secret."""
    return _hkdf(sk.exchange(X25519PublicKey.from_public_bytes(pk)), info)


class Prg:
    """Mask expansion: n uint64 words of AES-256-CTR keystream under a 32-byte seed.

    Every seed (a self-mask seed, a pairwise key) keys exactly one stream, so
    a fixed zero counter block is safe. The keystream is written into one
    reused buffer (update_into): measured ~6x faster than update(), which
    allocates its output, and close to the cipher's own speed.
    """

    def __init__(self, n: int):
        self.n = n
        self._zeros = bytes(8 * n)
        self._buf = bytearray(8 * n + 15)  # update_into wants a block of slack
        self._words = np.frombuffer(self._buf, dtype=np.uint64, count=n)

    def __call__(self, seed: bytes) -> np.ndarray:
        """The mask; a view of the buffer, valid until the next call."""
        enc = Cipher(algorithms.AES(seed), modes.CTR(bytes(16))).encryptor()
        enc.update_into(self._zeros, self._buf)
        return self._words


def prg(seed: bytes, n: int) -> np.ndarray:
    """A fresh copy of Prg(n)(seed)."""
    return Prg(n)(seed).copy()


def _stream(key: bytes):
    """random_bytes(n) for Shamir coefficients: an AES-CTR keystream under `key`."""
    enc = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()
    return lambda n: enc.update(bytes(n))


def _nonce(sender: int, receiver: int) -> bytes:
    # c_uv is shared by u and v: the direction makes each nonce unique, and
    # keys are fresh every round
    return struct.pack(">III", sender, receiver, 0)


# ---------------------------------------------------------------- the graph

def plus_degree(n: int) -> int:
    """SecAgg+ degree: 2*log2(n) rounded up to even, at most n-1 (then complete)."""
    if n <= 1:
        return 0
    k = math.ceil(2 * math.log2(n))
    k += k % 2
    return min(k, n - 1)


def neighbours(clients, k: int | None, seed: int, rnd: int) -> dict[int, tuple[int, ...]]:
    """Each client's neighbours: everyone else (k None: SecAgg) or a random
    Harary graph H(n, k) -- a ring of the clients in a seeded random order,
    each joined to the k/2 nearest on either side (SecAgg+). k-regular and
    k-connected, so no dropout of fewer than k clients splits it."""
    ids = sorted(clients)
    n = len(ids)
    if k is None or k >= n - 1:
        return {u: tuple(v for v in ids if v != u) for u in ids}
    if k % 2 or k < 2:
        raise ValueError(f"SecAgg+ degree must be even and >= 2, not {k}")
    order = [ids[i] for i in rng.generator(seed, "secagg-graph", rnd).permutation(n)]
    nb = {u: set() for u in ids}
    for i, u in enumerate(order):
        for d in range(1, k // 2 + 1):
            v = order[(i + d) % n]
            nb[u].add(v)
            nb[v].add(u)
    return {u: tuple(sorted(nb[u])) for u in ids}


# ---------------------------------------------------------------- settings

MODES = ("none", "secagg", "secagg+", "he")


@dataclass(frozen=True)
class Plan:
    """How a round of K sampled clients is protected: degree k (None: complete) and threshold t."""
    mode: str
    k: int | None
    threshold: int


def plan(mode: str, clients_per_round: int, threshold: int | None = None,
         aggregator: str = "mean") -> Plan:
    """Resolve and check --secure-aggregation settings; UserError on bad input.

    The threshold counts share holders: all K sampled clients for secagg,
    a client and its k neighbours for secagg+ (Bell et al.'s per-neighbourhood
    threshold). Default: ceil(2/3) of them, which tolerates a third dropping.
    """
    if mode not in MODES:
        raise UserError(f"--secure-aggregation {mode!r} is unknown: use one of {', '.join(MODES)}")
    if mode != "none" and aggregator != "mean":
        raise UserError(f"--secure-aggregation {mode} reveals only the sum of the updates, but "
                        f"--aggregator {aggregator} needs each update: use --aggregator mean")
    if mode == "he":
        from fedmpi.privacy import he  # TenSEAL is optional: only this mode needs it
        he.check_available()
        if clients_per_round > he.MAX_CLIENTS:
            raise UserError(f"--secure-aggregation he sums at most {he.MAX_CLIENTS} clients per round "
                            "exactly: lower --clients-per-round")
    if mode in ("none", "he"):
        if threshold is not None:
            raise UserError(f"--secagg-threshold applies to secagg and secagg+, not to {mode}")
        return Plan(mode, None, 0)
    k = plus_degree(clients_per_round) if mode == "secagg+" else None
    group = clients_per_round if k is None else k + 1
    where = "of the sampled clients" if k is None else f"per neighbourhood (a client and its {k} neighbours)"
    t = math.ceil(2 * group / 3) if threshold is None else threshold
    if t > group:
        raise UserError(f"--secagg-threshold {t} is more than the {group} share holders {where}: "
                        f"use at most {group}")
    if 2 * t <= group:
        raise UserError(f"--secagg-threshold {t} is at most half of the {group} share holders {where}: "
                        f"then two disjoint groups could each unmask; use at least {group // 2 + 1}")
    return Plan(mode, k, t)


def round_plan(mode: str, sampled: int, threshold: int | None) -> Plan:
    """The plan of one round of `sampled` clients (Poisson sampling varies it).

    Unlike plan() this never refuses: a given threshold larger than the
    round's holders makes the round abort (skipped), as too many dropouts do.
    """
    k = plus_degree(sampled) if mode == "secagg+" else None
    group = sampled if k is None else k + 1
    return Plan(mode, k, math.ceil(2 * group / 3) if threshold is None else threshold)


# ---------------------------------------------------------------- client

class Client:
    """One client's side of a round. Holds its secrets; sees others' only as shares."""

    def __init__(self, cid: int, seed: int, rnd: int, threshold: int):
        self.id = cid
        self.threshold = threshold
        g = rng.generator(seed, "secagg-keys", rnd, cid)
        self._c_sk = X25519PrivateKey.from_private_bytes(g.bytes(_KEY_BYTES))  # share encryption
        self._s_sk = X25519PrivateKey.from_private_bytes(g.bytes(_KEY_BYTES))  # pairwise masks
        self._b = g.bytes(_KEY_BYTES)  # self-mask seed
        self._coeffs = _stream(g.bytes(_KEY_BYTES))  # Shamir polynomial coefficients
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}
        self._enc_keys: dict[int, bytes] = {}  # AES-GCM key shared with each neighbour
        self._own_shares: tuple[int, int] | None = None
        self._received: dict[int, bytes] = {}

    def _enc_key(self, v: int) -> bytes:
        if v not in self._enc_keys:
            self._enc_keys[v] = _agree(self._c_sk, self._peer_keys[v][0], b"fedmpi secagg share encryption")
        return self._enc_keys[v]

    def advertise(self) -> bytes:
        return self._c_sk.public_key().public_bytes_raw() + self._s_sk.public_key().public_bytes_raw()

    def share_keys(self, peer_keys: dict[int, bytes]) -> dict[int, bytes]:
        """Shares of b_u and s_u^SK for u and its advertised neighbours, each encrypted to its holder."""
        self._peer_keys = {v: (k[:_KEY_BYTES], k[_KEY_BYTES:]) for v, k in peer_keys.items()}
        holders = sorted([self.id, *peer_keys])
        if len(holders) < self.threshold:
            raise Abort(f"client {self.id}: {len(holders)} holders < threshold {self.threshold}")
        xs = [v + 1 for v in holders]  # Shamir x must be nonzero
        b_sh = shamir.split(self._b, self.threshold, xs, self._coeffs)
        s_sh = shamir.split(self._s_sk.private_bytes_raw(), self.threshold, xs, self._coeffs)
        out = {}
        for v, b, s in zip(holders, b_sh, s_sh):
            if v == self.id:
                self._own_shares = (b, s)
                continue
            key = self._enc_key(v)
            msg = _ID.pack(self.id) + _ID.pack(v) + shamir.encode(b) + shamir.encode(s)
            out[v] = AESGCM(key).encrypt(_nonce(self.id, v), msg, None)
        return out

    def masked_input(self, x: np.ndarray, ciphertexts: dict[int, bytes]) -> np.ndarray:
        """y_u in Z_{2^64}; pairs with exactly the neighbours whose shares arrived (U2)."""
        if x.dtype != np.int64:
            raise TypeError("secure aggregation masks the int64 fixed-point encoding")
        self._received = dict(ciphertexts)
        y = x.view(np.uint64).copy()
        mask = Prg(y.size)
        np.add(y, mask(self._b), out=y)
        for v in sorted(ciphertexts):
            m = mask(_agree(self._s_sk, self._peer_keys[v][1], b"fedmpi secagg pairwise mask"))
            (np.add if v > self.id else np.subtract)(y, m, out=y)
        return y

    def unmask(self, survivors) -> dict[int, bytes]:
        """For each neighbour v in U2 (and u itself): b_v's share if v sent its
        masked input, else s_v^SK's. One or the other, never both."""
        survivors = set(survivors)
        live = len(survivors & ({self.id} | set(self._received)))
        if live < self.threshold:
            raise Abort(f"client {self.id}: {live} surviving holders < threshold {self.threshold}")
        out = {self.id: bytes([_SELF_MASK]) + shamir.encode(self._own_shares[0])}
        for v, ct in self._received.items():
            msg = AESGCM(self._enc_key(v)).decrypt(_nonce(v, self.id), ct, None)
            if _ID.unpack_from(msg, 0)[0] != v or _ID.unpack_from(msg, _ID_BYTES)[0] != self.id:
                raise ValueError(f"client {self.id}: a share from {v} is addressed wrongly")
            b = msg[2 * _ID_BYTES:2 * _ID_BYTES + shamir.SHARE_BYTES]
            s = msg[2 * _ID_BYTES + shamir.SHARE_BYTES:]
            out[v] = bytes([_SELF_MASK]) + b if v in survivors else bytes([_KEY_SHARE]) + s
        return out


# ---------------------------------------------------------------- server

@dataclass
class Traffic:
    """Bytes each client sent (up) and received (down) per phase, in client order."""
    clients: tuple[int, ...]
    up: dict[str, np.ndarray] = field(default_factory=dict)
    down: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self):
        for p in PHASES:
            self.up[p] = np.zeros(len(self.clients), dtype=np.int64)
            self.down[p] = np.zeros(len(self.clients), dtype=np.int64)
        self._pos = {c: i for i, c in enumerate(self.clients)}

    def add(self, phase: str, direction: str, cid: int, nbytes: int) -> None:
        getattr(self, direction)[phase][self._pos[cid]] += nbytes


def _size(msg: dict[int, bytes]) -> int:
    """Wire size of a message keyed by client id: an id plus a payload per entry."""
    return sum(_ID_BYTES + len(b) for b in msg.values())


class Server:
    """The server's side: routes messages, checks thresholds, unmasks the sum."""

    def __init__(self, clients, threshold: int, graph: dict[int, tuple[int, ...]]):
        self.clients = tuple(sorted(clients))
        self.threshold = threshold
        self.graph = graph
        self.traffic = Traffic(self.clients)
        self.u1 = self.u2 = self.u3 = frozenset()
        self._keys: dict[int, bytes] = {}
        self._holders: dict[int, frozenset] = {}  # whose shares of u's secrets exist

    def route_keys(self, adverts: dict[int, bytes]) -> dict[int, dict[int, bytes]]:
        self.u1 = frozenset(adverts)
        self._keys = dict(adverts)
        for u, a in adverts.items():
            self.traffic.add("advertise", "up", u, len(a))
        self._holders = {u: frozenset([u, *(v for v in self.graph[u] if v in self.u1)]) for u in self.u1}
        self._require(self.u1, self.u1, "advertised keys")
        out = {u: {v: adverts[v] for v in self.graph[u] if v in self.u1} for u in self.u1}
        for u, m in out.items():
            self.traffic.add("advertise", "down", u, _size(m))
        return out

    def route_shares(self, shares: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        self.u2 = frozenset(shares)
        for u, m in shares.items():
            self.traffic.add("share", "up", u, _size(m))
        self._require(self.u2, self.u2, "shared their keys")
        out = {v: {} for v in self.u2}
        for u in sorted(self.u2):
            for v, ct in shares[u].items():
                if v in self.u2:  # a holder that dropped gets nothing
                    out[v][u] = ct
        for v, m in out.items():
            self.traffic.add("share", "down", v, _size(m))
        return out

    def collect_masked(self, senders, nbytes: int) -> dict[int, tuple[int, ...]]:
        """U3 (the clients whose masked input of nbytes arrived); each learns its neighbours in U3."""
        self.u3 = frozenset(senders)
        for u in self.u3:
            self.traffic.add("masked", "up", u, nbytes)
        self._require(self.u3, self.u3, "sent a masked input")
        out = {u: tuple(v for v in (u, *self.graph[u]) if v in self.u3) for u in self.u3}
        for u, m in out.items():
            self.traffic.add("masked", "down", u, _ID_BYTES * len(m))
        return out

    def unmask(self, reveals: dict[int, dict[int, bytes]], masked_sum: np.ndarray) -> np.ndarray:
        """The sum of the inputs of U3, as int64: masked sum minus every remaining mask."""
        u4 = frozenset(reveals)
        for u, m in reveals.items():
            self.traffic.add("unmask", "up", u, _size(m))
        dropped = self.u2 - self.u3
        # the secrets needed: b_v of each survivor, s_v^SK of each dropped client paired with one
        needed = sorted(self.u3) + sorted(v for v in dropped if any(w in self.u3 for w in self.graph[v]))
        self._require(needed, u4, "revealed shares")  # before reconstructing anything
        total = masked_sum.astype(np.uint64, copy=True)
        mask = Prg(total.size)
        for v in needed:
            holders = sorted(h for h in self._holders[v] & u4)[:self.threshold]
            kind = _SELF_MASK if v in self.u3 else _KEY_SHARE
            ys = []
            for h in holders:
                share = reveals[h][v]
                if share[0] != kind:
                    raise ValueError(f"client {h} revealed the wrong share of client {v}")
                ys.append(shamir.decode(share[1:]))
            secret = shamir.combine([h + 1 for h in holders], ys)
            if kind == _SELF_MASK:
                np.subtract(total, mask(secret), out=total)
                continue
            s_sk = X25519PrivateKey.from_private_bytes(secret)
            for w in self.graph[v]:
                if w in self.u3:  # w added +PRG(s_wv) if v > w, else subtracted it
                    m = mask(_agree(s_sk, self._keys[w][_KEY_BYTES:], b"fedmpi secagg pairwise mask"))
                    (np.subtract if v > w else np.add)(total, m, out=total)
        return total.view(np.int64)

    def _require(self, owners, live, what: str) -> None:
        """Abort unless each owner's secrets have >= t holders among `live`."""
        live = frozenset(live)
        for u in owners:
            have = len(self._holders[u] & live)
            if have < self.threshold:
                raise Abort(f"client {u}: {have} holders {what} < threshold {self.threshold}")


def dropout_phases(dropped, seed: int, rnd: int) -> dict[int, str]:
    """The phase in which each client that fails to report stops sending:
    one of the three before its masked input would arrive, drawn per
    (round, client), so that runs exercise every recovery path. (A client
    dropping after its masked input still counts in the sum, so it is not a
    client that "fails to report".)"""
    return {u: PHASES[int(rng.generator(seed, "secagg-dropout", rnd, u).integers(3))] for u in dropped}


# ---------------------------------------------------------------- one round

class ClientGroup:
    """The clients one process hosts in a round, run phase by phase.

    Messages in and out are dicts keyed by client id, as the Server takes
    and gives them (a process passes on only its own clients' entries).
    drop[u] names the phase in which u stops sending: its message of that
    phase and every later one never leaves. Masked inputs leave as one
    partial sum: addition in Z_{2^64} is associative, so any grouping of
    clients (any rank count) gives the same total bit for bit.
    """

    def __init__(self, ids, seed: int, rnd: int, threshold: int, drop: dict[int, str] | None = None):
        self.seconds: dict[int, float] = {}  # cryptography seconds of each client
        self.clients = {}
        for u in sorted(ids):
            t0 = time.perf_counter()
            self.clients[u] = Client(u, seed, rnd, threshold)
            self.seconds[u] = time.perf_counter() - t0
        self._drop = drop or {}

    def _sends(self, u: int, phase: str) -> bool:
        return u in self.clients and (u not in self._drop
                                      or PHASES.index(self._drop[u]) > PHASES.index(phase))

    def _run(self, phase: str, msgs: dict, call) -> dict:
        out = {}
        for u, m in msgs.items():
            if self._sends(u, phase):
                t0 = time.perf_counter()
                out[u] = call(self.clients[u], m)
                self.seconds[u] += time.perf_counter() - t0
        return out

    def advertise(self) -> dict[int, bytes]:
        return self._run("advertise", dict.fromkeys(self.clients), lambda c, _: c.advertise())

    def share_keys(self, keys: dict[int, dict[int, bytes]]) -> dict[int, dict[int, bytes]]:
        return self._run("share", keys, lambda c, m: c.share_keys(m))

    def masked_sum(self, inbox: dict[int, dict[int, bytes]], encode, n: int) -> tuple[np.ndarray, list[int]]:
        """(sum of this group's masked inputs in Z_{2^64}, who sent one).

        encode(u) -> client u's int64 input, made when needed (one at a time:
        a rank hosting many clients never holds all their encodings).
        """
        total = np.zeros(n, dtype=np.uint64)
        senders = []
        for u, m in inbox.items():
            if self._sends(u, "masked"):
                x = encode(u)  # not the client's cryptography: outside its seconds
                t0 = time.perf_counter()
                np.add(total, self.clients[u].masked_input(x, m), out=total)
                self.seconds[u] += time.perf_counter() - t0
                senders.append(u)
        return total, sorted(senders)

    def unmask(self, survivors: dict[int, tuple[int, ...]]) -> dict[int, dict[int, bytes]]:
        return self._run("unmask", survivors, lambda c, m: c.unmask(m))


@dataclass
class RoundResult:
    total: np.ndarray | None  # int64 sum of the included inputs; None when aborted
    included: tuple[int, ...]  # U3: whose inputs are in the sum
    aborted: str | None  # why the round was skipped
    traffic: Traffic
    client_seconds: float  # summed over clients
    server_seconds: float
    seconds: dict[int, float] = field(default_factory=dict)  # each client's


def run_round(inputs: dict[int, np.ndarray], *, seed: int, rnd: int, threshold: int,
              k: int | None = None, drop: dict[int, str] | None = None, groups: int = 1) -> RoundResult:
    """Simulate one round end to end in this process, with the clients split
    round-robin into `groups` hosts (as ranks would host them)."""
    ids = sorted(inputs)
    n = next(iter(inputs.values())).size
    server = Server(ids, threshold, neighbours(ids, k, seed, rnd))
    hosts = [ClientGroup(ids[g::groups], seed, rnd, threshold, drop) for g in range(groups)]
    server_seconds = 0.0

    def serve(f, *a):
        nonlocal server_seconds
        t0 = time.perf_counter()
        try:
            return f(*a)
        finally:
            server_seconds += time.perf_counter() - t0

    def each(f):  # one phase on every host; the hosts' answers merged (a gather)
        out = {}
        for h in hosts:
            out.update(f(h))
        return out

    try:
        keys = serve(server.route_keys, each(lambda h: h.advertise()))
        inbox = serve(server.route_shares, each(lambda h: h.share_keys(keys)))
        parts = [h.masked_sum(inbox, inputs.__getitem__, n) for h in hosts]
        masked_sum = np.zeros(n, dtype=np.uint64)
        for part, _ in parts:  # the transport's sum (a Reduce)
            np.add(masked_sum, part, out=masked_sum)
        u3 = serve(server.collect_masked, [u for _, senders in parts for u in senders], 8 * n)
        total = serve(server.unmask, each(lambda h: h.unmask(u3)), masked_sum)
        aborted = None
    except Abort as e:
        total, aborted = None, str(e)
    each = {u: t for h in hosts for u, t in h.seconds.items()}
    return RoundResult(total, tuple(sorted(server.u3)) if total is not None else (), aborted,
                       server.traffic, sum(each.values()), server_seconds, each)
