"""The round loop: who trains which client, exact aggregation, server step, evaluation.

Rank 0 is the aggregator; ranks 1..size-1 host the clients (a single process
plays both roles). One round:
  1. rank 0 broadcasts what the update pipeline's stages tell clients (a clip
     norm); every rank draws the same clients, drop-outs and rank assignment;
  2. each worker trains its clients one after another and runs the client side
     of the pipeline (fedmpi/pipeline.py: clipping, ...) on each update;
  3. an Allreduce(MAX) agrees on per-block bounds of the updates, and the run's
     transport (fedmpi/runtime/transport.py) brings them to rank 0: by default
     each worker sums its weighted updates as fixed-point int64 and the
     node-shared sum plus a Reduce between nodes gives the exact total -- so the
     result does not depend on who trained whom; secure aggregation masks or
     encrypts the same integers; robust combiners and compressed updates are
     gathered one by one and combined in client-id order;
  4. rank 0 runs the server side of the pipeline (DP noise, ...), applies the
     server step and broadcasts the new global model;
  5. every rank evaluates a fixed set of test chunks, rank 0 writes the round.
The loop knows no feature by name: what transforms updates is a pipeline stage.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from datetime import datetime
from typing import TYPE_CHECKING

import numpy as np
from mpi4py import MPI

import fedmpi
from fedmpi import aggregate, algorithms, schedule
from fedmpi import pipeline as update_pipeline
from fedmpi.config import Config
from fedmpi.config import warnings as config_warnings
from fedmpi.data import Dataset, footprint, load_dataset, require_images
from fedmpi.data import fingerprint as fingerprint_of
from fedmpi.data.partition import make_partition
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.progress import Progress
from fedmpi.rng import generator
from fedmpi.runtime import comm as C
from fedmpi.runtime import signals, timings
from fedmpi.runtime import transport as T

if TYPE_CHECKING:
    from fedmpi.client import LocalTrainer

EVAL_CHUNK = 250  # test samples per evaluation chunk: fixed, so sums do not depend on ranks;
# small, so the chunks spread evenly over many ranks


def _default_out() -> str:
    """results/<date>-<time>-<pid>.h5, with a suffix if taken: two runs started in the
    same second get different files (ResultsWriter's exclusive create catches races)."""
    stem = os.path.join("results", datetime.now().strftime("%Y%m%d-%H%M%S") + f"-{os.getpid()}")
    path, n = stem + ".h5", 1
    while os.path.lexists(path):
        path, n = f"{stem}-{n}.h5", n + 1
    return path


def _plan_output(given: dict):
    """(the run's Config, results path, checkpoint to continue from or None, replace
    an old file?) from the settings the command gives (config.given_values); rank 0.

    Without --resume: a new file at --out. With --resume PATH: continue PATH,
    with the settings its run was started with where the command gives none;
    those it gives must not change results. With --resume auto: continue --out
    if it holds a checkpoint of the same configuration, else start afresh there
    (a job script restates its whole command each time).
    """
    from fedmpi.config import from_dict, with_saved
    from fedmpi.results import check_output_path, read_checkpoint, read_run, require_regular_file

    resume, given_out = given.get("resume"), given.get("out")
    if resume is None:
        cfg = from_dict(given)
        out = cfg.out or _default_out()
        check_output_path(out, cfg.overwrite)
        return cfg, out, None, cfg.overwrite
    auto = resume == "auto"
    out = given_out if auto else resume
    if not auto and given_out is not None and os.path.abspath(given_out) != os.path.abspath(out):
        raise UserError(f"--out {given_out} and --resume {resume} name different files: "
                        "a resumed run continues in the file it resumes")
    if auto:
        cfg = from_dict(given)
    require_regular_file(out)  # before any open: a FIFO would block it forever
    if not os.path.exists(out):
        if auto:
            check_output_path(out, False)
            return cfg, out, None, False
        raise UserError(f"--resume {out}: no such file")
    try:
        ckpt = read_checkpoint(out)
    except (KeyError, ValueError, TypeError, OSError) as e:
        raise UserError(f"--resume {out}: its checkpoint is damaged ({e}); start a new run "
                        "(or --overwrite it)") from None
    if ckpt is None:
        if not auto:
            raise UserError(f"--resume {out}: the file holds no checkpoint; start the run "
                            "afresh (--resume auto does that by itself)")
        # only replace a fedmpi results file, and only one of this same run
        _refuse_other_config(cfg, out, read_run(out)["config"], "give the run's own settings")
        check_output_path(out, True)
        return cfg, out, None, True
    saved, done, _ = ckpt
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume {out}: its config attribute is not a JSON object")
    if not auto:
        cfg = with_saved(saved, given)
    cfg = _keep_solved_noise(cfg, saved, out)
    _refuse_other_config(cfg, out, saved, "give the run's own settings" if auto else
                         "leave such settings out (the run keeps its own)")
    if cfg.rounds < done:
        raise UserError(f"cannot resume {out} with --rounds {cfg.rounds}: it holds {done} "
                        f"rounds already; give --rounds {done} or more")
    return cfg, out, ckpt, False


def _keep_solved_noise(cfg: Config, saved: dict, out: str) -> Config:
    """A run with --dp-target-epsilon continues with the noise multiplier solved for
    it at its start (the file's config records it), not one solved again."""
    if cfg.dp_target_epsilon is None or saved.get("dp_target_epsilon") != cfg.dp_target_epsilon:
        return cfg  # no target, or another one: the comparison below refuses that
    if saved.get("rounds") != cfg.rounds:
        raise UserError(
            f"cannot resume {out} with --rounds {cfg.rounds}: its noise multiplier "
            f"{saved.get('dp_noise_multiplier')!r} was solved to reach --dp-target-epsilon "
            f"{cfg.dp_target_epsilon:g} after {saved.get('rounds')} rounds, and other rounds "
            "would spend another privacy budget; give --rounds "
            f"{saved.get('rounds')} or start a new run")
    return dataclasses.replace(cfg, dp_noise_multiplier=saved.get("dp_noise_multiplier"))


def _refuse_other_config(cfg: Config, out: str, saved, fix: str) -> None:
    if not isinstance(saved, dict):
        raise UserError(f"cannot resume {out}: its config attribute is not a JSON object")
    cfg = dataclasses.replace(cfg, partition=cfg.resolved_partition())  # the file's is resolved
    diff = cfg.differences(saved)
    if diff:
        mine = cfg.to_dict()
        raise UserError(f"cannot resume {out}: the configuration differs in "
                        + ", ".join(f"{k} (file {saved.get(k)!r}, now {mine[k]!r})" for k in diff)
                        + f"; {fix} or start a new run")


def _load_shared(cfg: Config, comm: MPI.Comm):
    """The data set, read or generated once per node and shared by its ranks."""
    node_rank = C.node_comm(comm)
    leader, ranks_on_node = node_rank.rank == 0, node_rank.size
    node_rank.Free()
    ds, error = None, None
    if leader:
        try:  # refuse a job that would not fit, rather than be killed while loading
            footprint.check(footprint.estimate(cfg.dataset, num_clients=cfg.clients,
                                               synthetic_mean_samples=cfg.synthetic_mean_samples),
                            ranks_on_node, writes_results=comm.rank == 0)
            ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed,
                              num_clients=cfg.clients, synthetic_alpha=cfg.synthetic_alpha,
                              synthetic_beta=cfg.synthetic_beta,
                              synthetic_mean_samples=cfg.synthetic_mean_samples)
            if cfg.augments:  # known for npz and h5 data only now that they are read
                require_images(ds, "--augment")
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    meta = None
    arrays = None
    if leader:
        meta = dict(name=ds.name, num_classes=ds.num_classes, x_scale=ds.x_scale,
                    image_shape=ds.image_shape)
        arrays = dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
        if ds.natural_sizes is not None:
            arrays["natural_sizes"] = np.asarray(ds.natural_sizes, np.int64)
        if ds.client_ids is not None:
            arrays["client_ids"] = ds.client_ids
        del ds  # the shared copy replaces it
    meta = comm.bcast(meta, root=0)
    views, handle = C.share_arrays(comm, arrays)
    del arrays
    data = Dataset(name=meta["name"], x_train=views["x_train"], y_train=views["y_train"],
                   x_test=views["x_test"], y_test=views["y_test"],
                   num_classes=meta["num_classes"], x_scale=meta["x_scale"],
                   natural_sizes=views.get("natural_sizes"), client_ids=views.get("client_ids"),
                   image_shape=meta["image_shape"])
    return data, handle


def _solve_noise(cfg: Config, comm: MPI.Comm) -> Config:
    """--dp-target-epsilon: the noise multiplier that reaches it, solved on rank 0."""
    if cfg.dp_clip is None or cfg.dp_target_epsilon is None or cfg.dp_noise_multiplier is not None:
        return cfg  # no target, or a resumed run's multiplier (solved at its start)
    from fedmpi.privacy.accounting import solve_noise_multiplier

    z, error = None, None
    if comm.rank == 0:
        try:
            z = solve_noise_multiplier(
                cfg.dp_target_epsilon, cfg.rounds, kind=cfg.dp_accountant, sampling=cfg.sampling,
                num_clients=cfg.clients, per_round=cfg.clients_per_round, delta=cfg.dp_delta)
            print(f"--dp-target-epsilon {cfg.dp_target_epsilon:g}: noise multiplier {z:g} "
                  f"(epsilon after {cfg.rounds} rounds at delta {cfg.dp_delta:g})", flush=True)
        except ValueError as e:
            error = (f"--dp-target-epsilon {cfg.dp_target_epsilon:g} cannot be reached: {e}; "
                     "allow a larger epsilon, fewer --rounds or a smaller sampling rate")
    C.agree(comm, error)
    return dataclasses.replace(cfg, dp_noise_multiplier=comm.bcast(z, root=0))


def _trainer(cfg: Config, model: MLP, data: Dataset) -> LocalTrainer:
    """The kernels' host on a rank that trains: the only place the runtime loads numba
    (~0.7 s a process), so rank 0 of several ranks, which runs no kernels, never does."""
    from fedmpi.jit import load_numba

    load_numba()
    from fedmpi.client import LocalTrainer

    return LocalTrainer(cfg, model, data)


def _warm_up(comm: MPI.Comm, algo, trainer: LocalTrainer, params: np.ndarray,
             indices: np.ndarray, pipeline) -> None:
    """Compile every kernel the run uses, one rank of each node at a time.

    numba compiles on first call and caches the machine code on disk. Left
    to the first round, every rank of a node compiles the same kernels at
    once (8 ranks on 2 cores: 38 s); here the node's first rank that trains
    compiles and writes the cache, then the other ranks load it. The calls train a
    throwaway copy on two samples and draw from their own generator, so the
    run's results are untouched. Every call passes the same argument types as
    the rounds do (numba compiles one version per type signature: a scalar
    scale here instead of the rounds' per-block array compiled a second
    `_accumulate` in round 1 on every rank).
    """
    node = C.node_comm(comm)
    runs = node.allgather(trainer is not None)  # rank 0 of several runs no kernels
    first = runs.index(True) if True in runs else -1
    try:
        for turn in (True, False):
            if trainer is not None and (node.rank == first) == turn:
                res = algo.client_update(trainer, params.copy(), indices[:2],
                                         np.random.default_rng(0),
                                         **trainer.augmentation(0, 0))  # no round 0 trains
                acc = np.zeros(res.update.shape, np.int64)
                bounds = np.zeros(aggregate.num_blocks(acc.shape[0]))
                aggregate.block_max_abs(res.update, bounds)
                aggregate.accumulate(acc, res.update, 0.5, np.ones_like(bounds))
                trainer.evaluate(params, 0, 1)
                pipeline.warm_up(res.update)
            # the others wait seconds for the compile: sleep up to 10 ms a time (with
            # C.barrier's 1 ms, 7 waiting ranks took 0.12 cores from it; now 0.04)
            C.wait(node.Ibarrier(), 0.01)
    finally:
        node.Free()


def _print_config(cfg: Config, data: Dataset, model: MLP, size: int, where: list[str]) -> None:
    print(f"fedmpi {fedmpi.__version__}: {size} MPI rank(s), "
          f"{'rank 0 aggregates, ' + str(size - 1) + ' host clients' if size > 1 else 'one process'}")
    if size > 1:
        # MPI's own message when a process dies names its PID: this maps it to the rank
        print("ranks (rank:pid@host): " + " ".join(f"{r}:{w}" for r, w in enumerate(where)))
    print(f"data {data.name}: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test samples, "
          f"{data.num_features} features, {data.num_classes} classes; "
          f"model {'-'.join(map(str, model.sizes))} ({model.num_params} parameters)")
    print("# resolved configuration (TOML, usable with --config)")
    for k, v in cfg.to_dict().items():
        if v is None:
            continue
        if isinstance(v, bool):
            v = str(v).lower()
        elif isinstance(v, str):
            v = '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        print(f"{k} = {v}")
    sys.stdout.flush()


class _Evaluator:
    """Test-set evaluation spread over all ranks in fixed chunks.

    Chunk boundaries do not depend on the number of ranks, each chunk's loss
    is summed in a fixed order, and rank 0 adds the chunks in chunk order:
    the same numbers for any rank count. The chunks go to the ranks that
    train (rank 0 alone, or ranks 1..size-1), so rank 0 of several ranks
    runs no kernels.
    """

    def __init__(self, comm: MPI.Comm, trainer: LocalTrainer | None, num_test: int,
                 workers: list[int]):
        self.comm = comm
        self.trainer = trainer
        self.num_test = num_test
        self.starts = np.arange(0, num_test, EVAL_CHUNK)
        w = workers.index(comm.rank) if comm.rank in workers else -1
        self.mine = [i for i in range(len(self.starts)) if i % len(workers) == w]

    def __call__(self, params: np.ndarray) -> tuple[float, float]:
        part = np.zeros((len(self.starts), 2), np.float64)
        for i in self.mine:
            start = int(self.starts[i])
            stop = min(self.num_test, start + EVAL_CHUNK)
            part[i] = self.trainer.evaluate(params, start, stop)
        total = np.zeros_like(part) if self.comm.rank == 0 else None
        C.reduce_sum(self.comm, part, total)  # adding zeros is exact
        if self.comm.rank != 0:
            return float("nan"), float("nan")
        return (float(total[:, 1].sum() / self.num_test),
                float(total[:, 0].sum() / self.num_test))


def run(given: dict, comm: MPI.Comm, argv: list[str] | None = None) -> None:
    """Run the federated job the command's settings (config.given_values) describe
    on `comm`."""
    rank, size = comm.rank, comm.size
    root = rank == 0  # this rank aggregates, writes results and prints
    workers = list(range(1, size)) if size > 1 else [0]

    cfg, ckpt, replace, error = None, None, False, None
    if root:
        try:
            cfg, out, ckpt, replace = _plan_output(given)
            cfg = dataclasses.replace(cfg, out=out)
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    cfg = comm.bcast(cfg, root=0)  # small control data; with --resume PATH the file's settings
    cfg = dataclasses.replace(cfg, partition=cfg.resolved_partition())
    C.check_ranks_per_node(comm)
    cfg = _solve_noise(cfg, comm)
    timings.mark("plan output")

    data, _keep_alive = _load_shared(cfg, comm)
    timings.mark("data load")
    part = make_partition(cfg.partition, data.y_train, cfg.clients, seed=cfg.seed,
                          alpha=cfg.alpha, shards_per_client=cfg.shards_per_client,
                          natural_sizes=data.natural_sizes)
    timings.mark("partition")
    sizes = part.sizes
    model = MLP((data.num_features, *cfg.hidden, data.num_classes))
    params = model.init(generator(cfg.seed, "init"), cfg.init)  # same on every rank
    algo = algorithms.make(cfg, model)
    pipeline = update_pipeline.build(cfg, model, params)
    warned_coarse = False
    trainer = _trainer(cfg, model, data) if rank in workers else None
    C.barrier(comm)  # rank 0 sleeps while the others load numba (MPI_Win_allocate would spin)
    evaluate = _Evaluator(comm, trainer, data.x_test.shape[0], workers)
    P, wire = model.num_params, algo.wire_size  # a client sends `wire` >= P values
    up_bytes = 4 * algo.values_sent  # one client's uncompressed upload
    side_down = 4 * sum(a.size for a in algo.downlink)  # sent down besides the model
    shared = C.NodeShared(comm, wire)
    # how the round's updates reach rank 0 (exact sum, secure sum, each update, encoded)
    transport = T.make(cfg, comm, shared, wire, algo, pipeline, workers)
    # per-client state (error-feedback residuals, control variates) follows its client
    client_states = T.ClientStates(comm, algo, pipeline, P)
    # per-client numbers that travel to rank 0 with one Reduce: training, the pipeline's
    # client columns, the transport's (the fixed-point coarse count, encoded bytes)
    # (local_steps, straggler: only when some clients straggle)
    work_cols = ("local_steps", "straggler") if cfg.stragglers > 0 else ()
    stat_cols = ("train_loss", "seconds", *work_cols, *pipeline.client_columns,
                 *transport.stat_columns)
    column = {name: j for j, name in enumerate(stat_cols)}

    timings.mark("set-up")
    where = comm.gather(f"{os.getpid()}@{MPI.Get_processor_name()}", root=0)
    writer, first, error = None, 1, None
    if root:
        _print_config(cfg, data, model, size, where)
        from fedmpi.results import ResultsWriter  # h5py: only the rank that writes imports it
        for line in filter(None, [algo.description, *pipeline.describe()]):
            print(line, flush=True)
        if (line := transport.describe(cfg.clients_per_round)) is not None:
            print(line, flush=True)
        for line in config_warnings(cfg):
            print(f"fedmpi: warning: {line}", file=sys.stderr, flush=True)
        fingerprint = fingerprint_of(data, part.order, part.offsets)
        attrs = {"mpi_size": size, "ranks": " ".join(where), "command": shlex.join(
            [sys.executable, "-m", "fedmpi", *(argv or [])]),
            "data_fingerprint": json.dumps(fingerprint, sort_keys=True), **pipeline.attrs()}
        try:  # the path was checked, but creating the file can still fail (disk, name, race)
            if ckpt is not None:
                writer, done, arrays = ResultsWriter.reopen(
                    cfg.out, config=cfg.to_dict(), attrs=attrs, data_fingerprint=fingerprint)
                update_pipeline.restore(params, arrays, "params", f"the model {model.sizes}")
                algo.load_server_state(arrays)
                pipeline.load_state(arrays)
                first = done + 1
                print(f"resuming {cfg.out} after round {done}", flush=True)
            else:
                writer = ResultsWriter(
                    cfg.out, overwrite=replace, config=cfg.to_dict(), attrs=attrs,
                    layer_sizes=list(model.sizes), partition_sizes=sizes,
                    label_histogram=part.label_histogram(data.y_train, data.num_classes),
                    client_ids=data.client_ids if cfg.partition == "natural" else None)
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    timings.mark("HDF5 create")
    first = comm.bcast(first, root=0)
    if first > 1:
        for a in (params, *algo.downlink):  # the checkpoint's model and server state
            C.bcast(comm, a)
    t_warm = time.perf_counter()
    _warm_up(comm, algo, trainer, params, part.indices(0), pipeline)
    if root and time.perf_counter() - t_warm > 2.0:
        print(f"compiled the numba kernels in {time.perf_counter() - t_warm:.0f} s "
              "(cached for later runs)", flush=True)
    timings.mark("numba warm-up")
    progress = Progress(cfg.rounds, first) if root else None
    finished = False
    try:
        if root and first > cfg.rounds:
            writer.write_params("params", params)
            print(f"{cfg.out} already holds all {cfg.rounds} rounds", flush=True)
        for rnd in range(first, cfg.rounds + 1):
            C.watch_round(comm, rnd, cfg.round_timeout)  # a rank that never arrives ends the job
            t0 = time.perf_counter()
            rparams = pipeline.round_params(rnd) if root else None
            if pipeline.has_round_params:
                rparams = comm.bcast(rparams, root=0)  # small control data (a clip norm)
            sampled = schedule.sample_clients(
                cfg.clients, cfg.clients_per_round, cfg.seed, rnd, cfg.sampling,
                sizes if cfg.client_sampling == "proportional" else None)
            clients = sampled[~schedule.dropouts(sampled, cfg.dropout_rate, cfg.seed, rnd)]
            slow = schedule.stragglers(clients, cfg.stragglers, cfg.seed, rnd)
            if cfg.drop_stragglers:  # FedAvg's way in the FedProx paper: their work is lost
                clients, slow = clients[~slow], slow[~slow]
            # each client's local-training overrides: a straggler's shorter work, an attacker's labels
            work = [{**(schedule.straggler_work(c, int(sizes[c]), cfg.local_epochs,
                                                cfg.batch_size, cfg.seed, rnd) if s else {}),
                     **pipeline.local_work(rnd, c)}
                    for c, s in zip(clients.tolist(), slow.tolist())]
            plan = schedule.assign(clients, sizes, len(workers))
            mine = plan[workers.index(rank)] if rank in workers else np.zeros(0, np.int64)
            by_rank = [plan[workers.index(r)] if r in workers else np.zeros(0, np.int64)
                       for r in range(size)]
            state_rows = client_states.fetch(by_rank)  # `mine`'s residuals or control variates
            weights = algo.round_weights(pipeline.weights(
                np.array([algo.weight(int(sizes[c])) for c in clients.tolist()], np.float64),
                cfg.clients_per_round), sizes[clients], work)

            # 2. local training and the client side of the pipeline
            updates = np.empty((len(mine), wire), np.float32)
            # per client of the round (rows in `clients` order), columns `stat_cols`;
            # zero rows for clients of other ranks, so a sum collects them exactly
            # last row: (count, sum) of signals workers noted, to stop at rank 0's safe point
            stats = np.zeros((len(clients) + 1, len(stat_cols)), np.float64)
            bounds = np.zeros(aggregate.num_blocks(wire))
            payloads = []  # encoded updates of `mine`, when a stage encodes
            for i, c in enumerate(mine.tolist()):
                tc = time.perf_counter()
                row = np.searchsorted(clients, c)
                algo_row, stage_row = client_states.rows(state_rows, i)
                res = algo.client_update(trainer, params, part.indices(c),
                                         generator(cfg.seed, "shuffle", rnd, c),
                                         state=algo_row, **work[row],
                                         **trainer.augmentation(rnd, c))
                updates[i] = res.update
                # the stages transform the model update (the first P values)
                ctx = pipeline.client(updates[i, :P], rnd, c, cfg.seed, rparams, stage_row)
                aggregate.block_max_abs(updates[i], bounds)  # also catches a diverged client
                stats[row, :2] = res.loss_sum / max(res.samples_seen, 1), time.perf_counter() - tc
                if work_cols:
                    stats[row, 2:4] = res.steps, float(slow[row])
                for k in pipeline.client_columns:
                    stats[row, column[k]] = ctx.metrics[k]
                if ctx.payload is not None:
                    payloads.append(ctx.payload)

            # 3. transport to rank 0 (fedmpi/runtime/transport.py)
            C.allreduce_max(comm, bounds)
            try:
                # weights per client, or per client and block (SCAFFOLD): the largest
                # block total bounds every block's sum
                scales = aggregate.scales_for(bounds, float(np.abs(weights).sum(axis=0).max(
                    initial=0.0)))
            except FloatingPointError:
                raise UserError(f"training diverged in round {rnd}: a client's update is not "
                                "finite; lower --lr (or --server-lr)") from None
            got = transport.combine(T.Round(rnd, sampled, clients, by_rank, mine, updates,
                                            payloads, weights, scales, stats, column))
            client_states.store_back(state_rows, by_rank)
            if not root:
                stats[-1, :2] = signals.deferred_row()
            all_stats = np.zeros_like(stats) if root else None
            C.reduce_sum(comm, stats, all_stats)

            # 4. the server side of the pipeline, the server step and the broadcast
            if root:
                combined, side = algo.split(got.update)  # the model's part, what else clients sent
                update, stage_metrics = pipeline.server(
                    combined, rnd, clients,
                    {k: all_stats[:-1, column[k]] for k in pipeline.client_columns},
                    cfg.clients_per_round, cfg.seed, rparams)
                old = params.copy()
                if not got.skip_step:
                    params = algo.server_step(params, update, side)
                down_bytes = pipeline.downlink(old, params, rnd)  # pruning, compression
            shared.bcast_from_root(params)
            for a in algo.downlink:  # e.g. SCAFFOLD's control variate
                C.bcast(comm, a)

            # 5. evaluation and results
            test_acc = test_loss = float("nan")
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                test_acc, test_loss = evaluate(params)
            if root:
                rank_of = {c: workers[w] for w, cs in enumerate(plan) for c in cs.tolist()}
                cols = {"round": np.full(len(clients), rnd), "client_id": clients,
                        "rank": np.array([rank_of[c] for c in clients.tolist()], np.int64),
                        "num_samples": sizes[clients]}
                cols.update({k: all_stats[:-1, j] for k, j in column.items() if k != "coarse"})
                cols.update(got.columns)
                n_round = int(cols["num_samples"].sum())
                train_loss = (float(np.dot(cols["num_samples"], cols["train_loss"]) / n_round)
                              if n_round else float("nan"))
                coarse = int(all_stats[:-1, column["coarse"]].sum()) if "coarse" in column else 0
                bytes_up = (int(all_stats[:-1, column["bytes_up"]].sum()) if "bytes_up" in column
                            else len(clients) * up_bytes)
                if coarse and not warned_coarse:
                    warned_coarse = True
                    print(f"fedmpi: warning: round {rnd}: {coarse} update coordinates kept fewer "
                          f"than {aggregate.COARSE_BITS} significant bits in the exact sum, "
                          "because a much larger value (a diverging or malicious client?) set "
                          "their block's scale; see /rounds/fixed_point_coarse",
                          file=sys.stderr, flush=True)
                final = pipeline.summary(params) if rnd == cfg.rounds else {}
                seconds = time.perf_counter() - t0
                with signals.held():  # a stop never leaves half a round in the file
                    if rnd < cfg.rounds:
                        signals.deliver(all_stats[-1, :2])
                    writer.append_round({
                        "round": rnd, "test_accuracy": test_acc, "test_loss": test_loss,
                        "train_loss": train_loss, "num_clients": len(clients),
                        "num_sampled": len(sampled), "num_samples": n_round, "seconds": seconds,
                        "bytes_up": bytes_up, "bytes_down": len(sampled) * (down_bytes + side_down),
                        "fixed_point_coarse": coarse, **stage_metrics, **got.metrics,
                    })
                    writer.append_clients(cols)
                    writer.flush()
                    if rnd % cfg.checkpoint_every == 0 or rnd == cfg.rounds:
                        writer.write_checkpoint(rnd, {"params": params, **algo.server_state(),
                                                      **pipeline.state()})
                    if rnd == cfg.rounds:
                        writer.write_params("params", params)
                        writer.set_attrs(final)
                        writer.flush()
                progress.round_done(rnd, test_acc, test_loss, train_loss, seconds)
                if "empirical_epsilon" in final:
                    lo, hi = final["empirical_epsilon_interval"]
                    print(f"empirical epsilon from {final['canaries']} canaries: "
                          f"{final['empirical_epsilon']:.3g} (95% interval {lo:.3g} to {hi:.3g}; "
                          f"accountant: {stage_metrics['epsilon']:.3g}) at delta "
                          f"{cfg.dp_delta:g}", flush=True)
        finished = True
        C.watch_round(comm, None)
        timings.mark("rounds")
        shared.free()  # collective: only on the way out that every rank takes
    finally:
        if writer is not None:
            if progress.tty and not finished:
                progress.close()
            writer.close()
    if root:
        print(f"results written to {cfg.out}", flush=True)
    timings.mark("close")
