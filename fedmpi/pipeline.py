"""The update pipeline: small stages between "client trained" and "server stepped".

    client (on whichever rank trains it):  train -> delta -> stage.client ... (clip, ...)
    transport (runtime):                   exact fixed-point sum, or Gatherv of each update
    server (rank 0):                       decode -> stage.server ... (noise, ...) -> server step

A stage is a plain object with no MPI and no I/O. It owns its state (for
example the adaptive clip norm), declares it for checkpoints, and names the
metrics it reports, per client and per round. The round loop runs the chain
and does not know which stages exist: a new transformation of updates is a
new stage, never a branch in the loop.

State lives on the server (rank 0). What clients need from it in a round
(a clip norm, ...) is the stage's `round_params`, broadcast at the start of
the round as small control data. Per-client state that a client carries
between its rounds (error-feedback residuals) is a row of a ClientStateStore
(fedmpi/state.py) kept on rank 0; the runtime hands the row to the rank that
trains the client (ctx.state) and brings it back.

A stage that `encodes` turns the update into bytes (ctx.payload: compression);
then those bytes travel to rank 0 instead of the float update and rank 0
decodes them in client-id order. After the server step, `downlink` may change
what is broadcast (pruning, compression) and says how many bytes it takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClientContext:
    """What a client-side stage may use: who the client is and the round's parameters."""
    rnd: int
    client_id: int
    seed: int
    params: dict  # this round's parameters from every stage's round_params, by stage name
    metrics: dict = field(default_factory=dict)  # per-client metrics the stage fills
    # the client's row of the state store (float32 (P,), zeros before the client's
    # first round; updated in place), for the stage with `client_state`
    state: np.ndarray | None = None
    payload: np.ndarray | None = None  # uint8 bytes an `encodes` stage made of the update


@dataclass
class ServerContext:
    """What a server-side stage may use (rank 0, once per round)."""
    rnd: int
    clients: np.ndarray  # ids of the clients whose updates are in the aggregate, ascending
    client_metrics: dict  # {column: float64 array aligned with `clients`}
    expected_clients: int  # clients per round the run asked for (K)
    seed: int
    params: dict  # the round's parameters, as the clients saw them
    metrics: dict = field(default_factory=dict)  # per-round metrics the stage fills


class Stage:
    """Base class: a stage that does nothing. Override what the stage needs."""

    name = "stage"
    # per-client float metrics this stage sets in ClientContext.metrics -> /clients/<column>
    client_columns: tuple[str, ...] = ()
    # per-round metrics this stage sets in ServerContext.metrics -> /rounds/<column>
    # (their units and descriptions: fedmpi.results.ROUND_FIELDS / CLIENT_FIELDS)
    round_columns: tuple[str, ...] = ()
    # True if the server divides the sum of updates by the expected number of
    # clients per round instead of normalising sample weights (DP needs it:
    # data-dependent weights break the sensitivity bound)
    fixed_denominator = False
    # name of the per-client state this stage keeps (its `store`, a ClientStateStore on
    # rank 0), or None
    client_state: str | None = None
    # True if client() leaves ctx.payload (bytes) that replaces the update in transport
    encodes = False

    def round_params(self, rnd: int) -> dict:
        return {}

    def local_work(self, rnd: int, client_id: int) -> dict:
        """Overrides of the client's local training (LocalTrainer.train keywords)."""
        return {}

    def client(self, update: np.ndarray, ctx: ClientContext) -> None:
        """Transform one client's float32 update in place."""

    def server(self, mean: np.ndarray, ctx: ServerContext) -> np.ndarray:
        """Transform the float64 combined update; return it (or a new array)."""
        return mean

    def decode(self, payload: np.ndarray) -> np.ndarray:
        """rank 0: the float32 update an `encodes` stage's payload carries."""
        raise NotImplementedError

    def downlink(self, old: np.ndarray, new: np.ndarray, rnd: int) -> int | None:
        """rank 0, after the server step: change `new` (float32, in place) into what the
        clients receive; bytes per client of that broadcast, or None (a float32 model)."""
        return None

    def warm_up(self, update: np.ndarray) -> None:
        """Compile the stage's kernels on a throwaway float32 update (no state changes)."""

    def state(self) -> dict[str, np.ndarray]:
        """Server state to checkpoint (names must be unique across stages)."""
        return {}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        pass


def restore(target: np.ndarray, arrays: dict[str, np.ndarray], name: str, owner: str) -> None:
    """target[...] = arrays[name] from a checkpoint, refusing a missing or mismatched array.

    Checkpoint files are untrusted: a wrong shape must not broadcast into the
    state and a wrong dtype must not be cast silently.
    """
    from fedmpi.errors import UserError

    got = arrays.get(name)
    if got is None or got.shape != target.shape or got.dtype != target.dtype:
        raise UserError(
            f"the checkpoint's {name} is "
            + ("missing" if got is None else f"{got.dtype} of shape {got.shape}")
            + f", but {owner} needs {target.dtype} of shape {target.shape}: the file is "
            "damaged or from another configuration")
    target[...] = got


class Pipeline:
    """The chain of stages, in order; the only thing the round loop talks to."""

    def __init__(self, stages: list[Stage]):
        self.stages = list(stages)
        self.client_columns = tuple(c for s in self.stages for c in s.client_columns)
        self.round_columns = tuple(c for s in self.stages for c in s.round_columns)
        self.fixed_denominator = any(s.fixed_denominator for s in self.stages)
        encoders = [s for s in self.stages if s.encodes]
        if len(encoders) > 1 or (encoders and encoders[0] is not self.stages[-1]):
            raise ValueError("only the last stage may encode updates into bytes")
        self.encoder = encoders[0] if encoders else None
        # the stage that keeps per-client state (its `store` on rank 0), if any
        stateful = [s for s in self.stages if s.client_state is not None]
        if len(stateful) > 1:
            raise ValueError("one stage at most may keep per-client state for now")
        self.stateful = stateful[0] if stateful else None

    @property
    def has_round_params(self) -> bool:
        return any(type(s).round_params is not Stage.round_params for s in self.stages)

    def round_params(self, rnd: int) -> dict:
        return {s.name: s.round_params(rnd) for s in self.stages}

    def weights(self, raw: np.ndarray, expected_clients: int) -> np.ndarray:
        """Each reporting client's weight in the combined update.

        Normalised algorithm weights (FedAvg: n_k / n), or 1/K for every
        client when a stage fixes the denominator (then the weights sum to
        the number of reporting clients over K, which may exceed 1 under
        Poisson sampling; the fixed-point encoding leaves room for that).
        """
        if self.fixed_denominator:
            return np.full(raw.shape, 1.0 / expected_clients)
        total = float(raw.sum())
        return raw / total if total > 0 else raw.astype(np.float64)

    def local_work(self, rnd: int, client_id: int) -> dict:
        """What the stages change in one client's local training (e.g. an attacker's labels)."""
        out: dict = {}
        for s in self.stages:
            out.update(s.local_work(rnd, client_id))
        return out

    def client(self, update: np.ndarray, rnd: int, client_id: int, seed: int,
               params: dict, state: np.ndarray | None = None) -> ClientContext:
        """Run the client-side stages on one update (in place); metrics, payload, state."""
        ctx = ClientContext(rnd, client_id, seed, params, state=state)
        for s in self.stages:
            s.client(update, ctx)
        return ctx

    def decode(self, payload: np.ndarray) -> np.ndarray:
        return self.encoder.decode(payload)

    def warm_up(self, update: np.ndarray) -> None:
        for s in self.stages:
            s.warm_up(update.copy())

    def downlink(self, old: np.ndarray, new: np.ndarray, rnd: int) -> int:
        """rank 0: what the stages make of the broadcast; its bytes per client."""
        nbytes = 4 * new.size
        for s in self.stages:
            got = s.downlink(old, new, rnd)
            if got is not None:
                nbytes = got
        return nbytes

    def server(self, mean: np.ndarray, rnd: int, clients: np.ndarray, client_metrics: dict,
               expected_clients: int, seed: int, params: dict) -> tuple[np.ndarray, dict]:
        """Run the server-side stages on the combined update; (update, round metrics)."""
        ctx = ServerContext(rnd, clients, client_metrics, expected_clients, seed, params)
        for s in self.stages:
            mean = s.server(mean, ctx)
        missing = set(self.round_columns) - set(ctx.metrics)
        if missing:  # a results file needs the same columns every round
            raise RuntimeError(f"pipeline stages did not report {sorted(missing)}")
        return mean, ctx.metrics

    def state(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for s in self.stages:
            out.update(s.state())
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        for s in self.stages:
            s.load_state(arrays)

    def describe(self) -> list[str]:
        """One line per stage for the run's log (rank 0)."""
        return [d for s in self.stages if (d := getattr(s, "description", ""))]

    def summary(self, final_params: np.ndarray) -> dict:
        """Results-file attributes measured on the final model (rank 0, after the last round)."""
        out: dict = {}
        for s in self.stages:
            if hasattr(s, "summary"):
                out.update(s.summary(final_params))
        return out

    def attrs(self) -> dict:
        """Results-file attributes the stages record (rank 0)."""
        out: dict = {}
        for s in self.stages:
            out.update(getattr(s, "attrs", dict)())
        return out


def build(cfg, model, initial_params: np.ndarray) -> Pipeline:
    """The pipeline a configuration asks for (`initial_params`: the round-0 global model)."""
    first: list[Stage] = []
    last: list[Stage] = []
    if cfg.prune > 0 or cfg.compress_down != "none" or cfg.compress != "none":
        # the codecs are numba kernels: only runs that compress import them (rank 0 too)
        from fedmpi.compression.stages import stages_for
        first, last = stages_for(cfg, model)  # prune first, compress last
    stages: list[Stage] = list(first)
    if cfg.dp_canaries:
        from fedmpi.privacy.canaries import Canaries
        stages.append(Canaries(cfg, model, initial_params))
    if cfg.dp_clip is not None:
        from fedmpi.privacy.dp import GaussianDP
        stages.append(GaussianDP(cfg, model))
    if cfg.attack != "none":
        from fedmpi.attacks import Attack
        stages.insert(0, Attack(cfg))  # the attacker acts before any honest stage
    return Pipeline(stages + last)
