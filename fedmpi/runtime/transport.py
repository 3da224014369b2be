"""How a round's client updates reach rank 0 and become one combined update.

One transport per run, chosen from the configuration (`make`); the round loop
calls `combine` and does not know which one it has:
- ExactSum: the weighted updates as fixed-point int64 (fedmpi/aggregate.py),
  summed through node shared memory and a Reduce between nodes -- exact, so
  the result does not depend on which rank trained whom;
- SecureSum: the very same int64 terms, masked (SecAgg, SecAgg+) or encrypted
  (BFV) per client, so rank 0 learns only their sum (fedmpi/runtime/secure.py);
- EachUpdate: every float32 update to rank 0 (Gatherv), in client-id order,
  for combiners that need each one (median, trimmed mean);
- Encoded: each client's compressed update as a byte buffer (two Gatherv),
  decoded on rank 0 in client-id order and summed in that order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedmpi import aggregate
from fedmpi.runtime import comm as C


@dataclass
class Round:
    """What every rank holds once its clients have trained and run the client stages."""
    rnd: int
    sampled: np.ndarray  # clients drawn this round, ascending
    clients: np.ndarray  # the ones that report, ascending; rows of `stats` and `weights`
    by_rank: list  # clients each rank trained, in its row order
    mine: np.ndarray  # this rank's clients (rows of `updates`)
    updates: np.ndarray  # float32 (len(mine), P), after the pipeline's client stages
    payloads: list  # their encoded buffers, when a stage encodes
    weights: np.ndarray  # each reporting client's weight in the combined update
    scales: np.ndarray  # the fixed-point encoding's agreed per-block scales
    stats: np.ndarray  # per-client rows the transport may fill (its stat_columns)
    column: dict  # stats column index by name


@dataclass
class Combined:
    """On rank 0: the round's combined float64 update and what the transport measured."""
    update: np.ndarray | None  # None on other ranks
    metrics: dict = field(default_factory=dict)  # per-round (/rounds), same keys every round
    columns: dict = field(default_factory=dict)  # per reporting client (/clients)
    skip_step: bool = False  # the round must not change the model (secure: too few survived)


class Transport:
    stat_columns: tuple[str, ...] = ()  # per-client numbers it fills on the ranks that train

    def __init__(self, comm, shared: C.NodeShared, num_params: int):
        self.comm, self.shared, self.n = comm, shared, num_params
        self.root = comm.rank == 0

    def describe(self, clients_per_round: int) -> str | None:
        return None

    def combine(self, r: Round) -> Combined:
        raise NotImplementedError

    def _terms(self, r: Round):
        """Each of this rank's clients' term of the exact sum: (client, row, update)."""
        for i, c in enumerate(r.mine.tolist()):
            yield c, int(np.searchsorted(r.clients, c)), r.updates[i]


class ExactSum(Transport):
    stat_columns = ("coarse",)

    def combine(self, r: Round) -> Combined:
        acc = np.zeros(self.n, np.int64)
        for _, row, u in self._terms(r):
            r.stats[row, r.column["coarse"]] = aggregate.accumulate(acc, u, r.weights[row],
                                                                    r.scales)
        total = np.zeros_like(acc) if self.root else None
        self.shared.sum_to_root(acc, total)
        return Combined(aggregate.to_float(total, r.scales) if self.root else None)


class SecureSum(ExactSum):
    def __init__(self, comm, shared, num_params, cfg, workers):
        super().__init__(comm, shared, num_params)
        from fedmpi.runtime import secure
        self.protocol = secure.SecureSum(cfg, comm, workers)

    def describe(self, clients_per_round: int) -> str:
        return self.protocol.describe(clients_per_round)

    def combine(self, r: Round) -> Combined:
        index = {c: (row, u) for c, row, u in self._terms(r)}

        def encode(c: int) -> np.ndarray:  # the plain path's integers, one client alone
            row, u = index[c]
            x = np.zeros(self.n, np.int64)
            r.stats[row, r.column["coarse"]] = aggregate.accumulate(x, u, r.weights[row], r.scales)
            return x

        def reduce(part: np.ndarray) -> np.ndarray | None:
            # the Z_2^64 sum of every rank's uint64 part: int64 addition that wraps is
            # uint64 addition, bit for bit
            total = np.zeros(self.n, np.int64) if self.root else None
            self.shared.sum_to_root(part.view(np.int64), total)
            return total.view(np.uint64) if self.root else None

        total, metrics, columns = self.protocol(r.rnd, r.sampled, r.clients, r.mine, encode,
                                                reduce, self.n)
        if not self.root:
            return Combined(None)
        skipped = total is None  # too few survivors to unmask: nothing is revealed
        total = np.zeros(self.n, np.int64) if skipped else total
        return Combined(aggregate.to_float(total, r.scales), metrics, columns, skip_step=skipped)


class EachUpdate(Transport):
    def __init__(self, comm, shared, num_params, combine):
        super().__init__(comm, shared, num_params)
        self.combine_updates = combine  # (K, P) float32 in client-id order -> (P,) float64

    def combine(self, r: Round) -> Combined:
        in_order = C.gather_in_client_order(self.comm, r.updates, r.by_rank)
        return Combined(self.combine_updates(in_order) if self.root else None)


class Encoded(Transport):
    stat_columns = ("bytes_up",)

    def __init__(self, comm, shared, num_params, pipeline, algo):
        super().__init__(comm, shared, num_params)
        self.pipeline, self.algo = pipeline, algo

    def combine(self, r: Round) -> Combined:
        for (_, row, _), buf in zip(self._terms(r), r.payloads):
            r.stats[row, r.column["bytes_up"]] = buf.size  # the real buffer's length
        got = C.gather_bytes(self.comm, r.payloads, [len(p) for p in r.by_rank])
        if not self.root:
            return Combined(None)
        # decoded and summed in client-id order, whoever trained them
        in_id_order = np.argsort(np.concatenate(r.by_rank), kind="stable")
        decode = self.pipeline.decode
        if self.algo.needs_each_update:
            return Combined(self.algo.combine(np.array(
                [decode(got[k]) for k in in_id_order], np.float32
            ).reshape(len(r.clients), self.n)))
        combined = np.zeros(self.n)  # one decoded update in memory at a time
        for j, k in enumerate(in_id_order):
            combined += r.weights[j] * decode(got[k])
        return Combined(combined)


class ClientStates:
    """Per-client state (error-feedback residuals, control variates) on its way to the
    ranks that train.

    The store (fedmpi/state.py) lives on rank 0; each round the rows of the
    round's clients go to whichever rank trains them (Scatterv) and come back
    changed (Gatherv), so a client's state follows it across ranks. Without a
    stage that keeps state, nothing moves and `fetch` gives None.
    """

    def __init__(self, comm, algo, pipeline, num_params: int):
        # the owner: the algorithm (SCAFFOLD's control variates) or a pipeline stage
        # (error feedback); the configuration never asks for both
        self.comm, self.n = comm, num_params
        self.for_algo = algo.client_state is not None
        self.owner = algo if self.for_algo else pipeline.stateful

    def rows(self, rows: np.ndarray | None, i: int) -> tuple:
        """(the algorithm's row, the pipeline's row) of this rank's i-th client (None: not its)."""
        if rows is None:
            return None, None
        return (rows[i], None) if self.for_algo else (None, rows[i])

    def fetch(self, by_rank: list) -> np.ndarray | None:
        """This rank's clients' rows, in its row order (None without state)."""
        if self.owner is None:
            return None
        ids = np.concatenate(by_rank)
        taken = self.owner.store.take(ids)[0] if self.comm.rank == 0 else None
        return C.scatter_rows(self.comm, taken, [len(p) for p in by_rank], self.n)

    def store_back(self, rows: np.ndarray | None, by_rank: list) -> None:
        if rows is None:
            return
        back = C.gather_rows(self.comm, rows, [len(p) for p in by_rank])
        if self.comm.rank == 0:
            self.owner.store.put_many(np.concatenate(by_rank), back)


def make(cfg, comm, shared: C.NodeShared, num_params: int, algo, pipeline,
         workers: list[int]) -> Transport:
    """The transport the configuration asks for (every rank builds the same one)."""
    if pipeline.encoder is not None:
        return Encoded(comm, shared, num_params, pipeline, algo)
    if algo.needs_each_update:
        return EachUpdate(comm, shared, num_params, algo.combine)
    if cfg.secure_aggregation != "none":
        return SecureSum(comm, shared, num_params, cfg, workers)
    return ExactSum(comm, shared, num_params)
