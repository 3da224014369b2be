"""The round loop: who trains which client, exact aggregation, server step, evaluation.

Rank 0 is the aggregator; ranks 1..size-1 host the clients (a single process
plays both roles). One round:
  1. rank 0 broadcasts what the update pipeline's stages tell clients (a clip
     norm); every rank draws the same clients, drop-outs and rank assignment;
  2. each worker trains its clients one after another and runs the client side
     of the pipeline (fedmpi/pipeline.py: clipping, ...) on each update;
  3. an Allreduce(MAX) agrees on per-block bounds of the updates; each worker
     sums its weighted updates as fixed-point int64 and the node-shared sum plus
     a Reduce between nodes brings the total to rank 0 -- exact, so the result
     does not depend on who trained whom (robust combiners Gatherv every update
     instead, ordered by client id);
  4. rank 0 runs the server side of the pipeline (DP noise, ...), applies the
     server step and broadcasts the new global model;
  5. every rank evaluates a fixed set of test chunks, rank 0 writes the round.
The loop knows no feature by name: what transforms updates is a pipeline stage.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from datetime import datetime

import numpy as np
from mpi4py import MPI

import fedmpi
from fedmpi import aggregate, algorithms, schedule
from fedmpi import pipeline as update_pipeline
from fedmpi.client import LocalTrainer
from fedmpi.config import Config
from fedmpi.config import warnings as config_warnings
from fedmpi.data import Dataset, load_dataset
from fedmpi.data.partition import make_partition
from fedmpi.errors import UserError
from fedmpi.model.mlp import MLP
from fedmpi.progress import Progress
from fedmpi.rng import generator
from fedmpi.runtime import comm as C
from fedmpi.runtime import signals

EVAL_CHUNK = 250  # test samples per evaluation chunk: fixed, so sums do not depend on ranks;
# small, so the chunks spread evenly over many ranks


def _default_out() -> str:
    return os.path.join("results", datetime.now().strftime("%Y%m%d-%H%M%S") + ".h5")


def _plan_output(cfg: Config):
    """(results path, checkpoint to continue from or None, replace an old file?); rank 0.

    Without --resume: a new file at --out. With --resume PATH: continue PATH,
    which must hold a checkpoint of the same configuration. With --resume
    auto: continue --out if it holds a checkpoint, else start afresh there.
    """
    from fedmpi.results import check_output_path, read_checkpoint, read_run

    if cfg.resume is None:
        out = cfg.out or _default_out()
        check_output_path(out, cfg.overwrite)
        return out, None, cfg.overwrite
    auto = cfg.resume == "auto"
    out = cfg.out if auto else cfg.resume
    if not auto and cfg.out is not None and os.path.abspath(cfg.out) != os.path.abspath(out):
        raise UserError(f"--out {cfg.out} and --resume {cfg.resume} name different files: "
                        "a resumed run continues in the file it resumes")
    if not os.path.exists(out):
        if auto:
            check_output_path(out, False)
            return out, None, False
        raise UserError(f"--resume {out}: no such file")
    ckpt = read_checkpoint(out)
    if ckpt is None:
        if not auto:
            raise UserError(f"--resume {out}: the file holds no checkpoint; start the run "
                            "afresh (--resume auto does that by itself)")
        read_run(out)  # only replace a file that is a fedmpi results file
        check_output_path(out, True)
        return out, None, True
    saved, _, _ = ckpt
    diff = cfg.differences(saved)
    if diff:
        mine = cfg.to_dict()
        raise UserError(f"cannot resume {out}: the configuration differs in "
                        + ", ".join(f"{k} (file {saved.get(k)!r}, now {mine[k]!r})" for k in diff)
                        + "; give the run's own settings or start a new run")
    return out, ckpt, False


def _load_shared(cfg: Config, comm: MPI.Comm):
    """The data set, read or generated once per node and shared by its ranks."""
    node_rank = C.node_comm(comm)
    leader = node_rank.rank == 0
    node_rank.Free()
    ds, error = None, None
    if leader:
        try:
            ds = load_dataset(cfg.dataset, data_dir=cfg.data_dir, seed=cfg.seed,
                              num_clients=cfg.clients, synthetic_alpha=cfg.synthetic_alpha,
                              synthetic_beta=cfg.synthetic_beta)
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    meta = None
    arrays = None
    if leader:
        meta = dict(name=ds.name, num_classes=ds.num_classes, x_scale=ds.x_scale)
        arrays = dict(x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test, y_test=ds.y_test)
        if ds.natural_sizes is not None:
            arrays["natural_sizes"] = np.asarray(ds.natural_sizes, np.int64)
        del ds  # the shared copy replaces it
    meta = comm.bcast(meta, root=0)
    views, handle = C.share_arrays(comm, arrays)
    del arrays
    data = Dataset(name=meta["name"], x_train=views["x_train"], y_train=views["y_train"],
                   x_test=views["x_test"], y_test=views["y_test"],
                   num_classes=meta["num_classes"], x_scale=meta["x_scale"],
                   natural_sizes=views.get("natural_sizes"))
    return data, handle


def _solve_noise(cfg: Config, comm: MPI.Comm) -> Config:
    """--dp-target-epsilon: the noise multiplier that reaches it, solved on rank 0."""
    if cfg.dp_clip is None or cfg.dp_target_epsilon is None:
        return cfg
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


def _warm_up(comm: MPI.Comm, algo, trainer: LocalTrainer, params: np.ndarray,
             indices: np.ndarray) -> None:
    """Compile every kernel the run uses, one rank of each node at a time.

    numba compiles on first call and caches the machine code on disk. Left
    to the first round, every rank of a node compiles the same kernels at
    once (8 ranks on 2 cores: 38 s); here the node leader compiles and
    writes the cache, then the other ranks load it. The calls train a
    throwaway copy on two samples and draw from their own generator, so the
    run's results are untouched.
    """
    node = C.node_comm(comm)
    try:
        for turn in (True, False):
            if (node.rank == 0) == turn:
                res = algo.client_update(trainer, params.copy(), indices[:2],
                                         np.random.default_rng(0))
                acc = np.zeros(res.update.shape, np.int64)
                aggregate.accumulate(acc, res.update, 0.5, 1.0)
                aggregate.block_max_abs(res.update, np.zeros(aggregate.num_blocks(acc.shape[0])))
                trainer.evaluate(params, 0, 1)
            C.barrier(node)
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
    the same numbers for any rank count.
    """

    def __init__(self, comm: MPI.Comm, trainer: LocalTrainer, num_test: int):
        self.comm = comm
        self.trainer = trainer
        self.num_test = num_test
        self.starts = np.arange(0, num_test, EVAL_CHUNK)
        self.mine = [i for i in range(len(self.starts)) if i % comm.size == comm.rank]

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


def run(cfg: Config, comm: MPI.Comm, argv: list[str] | None = None) -> None:
    """Run the federated job described by `cfg` on `comm`."""
    from fedmpi.results import ResultsWriter

    rank, size = comm.rank, comm.size
    root = rank == 0  # this rank aggregates, writes results and prints
    workers = list(range(1, size)) if size > 1 else [0]

    cfg = dataclasses.replace(cfg, partition=cfg.resolved_partition())
    out, ckpt, replace, error = None, None, False, None
    if root:
        try:
            out, ckpt, replace = _plan_output(cfg)
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    cfg = dataclasses.replace(cfg, out=comm.bcast(out, root=0))
    cfg = _solve_noise(cfg, comm)

    data, _keep_alive = _load_shared(cfg, comm)
    part = make_partition(cfg.partition, data.y_train, cfg.clients, seed=cfg.seed,
                          alpha=cfg.alpha, shards_per_client=cfg.shards_per_client,
                          natural_sizes=data.natural_sizes)
    sizes = part.sizes
    model = MLP((data.num_features, *cfg.hidden, data.num_classes))
    params = model.init(generator(cfg.seed, "init"), cfg.init)  # same on every rank
    algo = algorithms.make(cfg, model)
    pipeline = update_pipeline.build(cfg, model, params)
    # per-client statistics that travel to rank 0 with one Reduce: training, the
    # pipeline's client columns, and (last) the fixed-point encoder's coarse count
    # (local_steps, straggler: only when some clients straggle)
    work_cols = ("local_steps", "straggler") if cfg.stragglers > 0 else ()
    own = 2 + len(work_cols)  # columns before the pipeline's
    stat_cols = ("train_loss", "seconds", *work_cols, *pipeline.client_columns, "coarse")
    warned_coarse = False
    trainer = LocalTrainer(cfg, model, data)
    evaluate = _Evaluator(comm, trainer, data.x_test.shape[0])
    nbytes = model.num_params * 4  # one float32 model or update
    shared = C.NodeShared(comm, model.num_params)

    where = comm.gather(f"{os.getpid()}@{MPI.Get_processor_name()}", root=0)
    writer, first, error = None, 1, None
    if root:
        _print_config(cfg, data, model, size, where)
        for line in pipeline.describe():
            print(line, flush=True)
        for line in config_warnings(cfg):
            print(f"fedmpi: warning: {line}", file=sys.stderr, flush=True)
        try:  # the path was checked, but creating the file can still fail (disk, name, race)
            if ckpt is not None:
                writer, done, arrays = ResultsWriter.reopen(cfg.out)
                params[:] = arrays["params"]
                algo.load_server_state(arrays)
                pipeline.load_state(arrays)
                first = done + 1
                print(f"resuming {cfg.out} after round {done}", flush=True)
            else:
                writer = ResultsWriter(
                    cfg.out, overwrite=replace, config=cfg.to_dict(),
                    attrs={"mpi_size": size, "ranks": " ".join(where), "command": shlex.join(
                        [sys.executable, "-m", "fedmpi", *(argv or [])]), **pipeline.attrs()},
                    layer_sizes=list(model.sizes), partition_sizes=sizes,
                    label_histogram=part.label_histogram(data.y_train, data.num_classes))
        except UserError as e:
            error = str(e)
    C.agree(comm, error)
    first = comm.bcast(first, root=0)
    if first > 1:
        C.bcast(comm, params)  # the checkpoint's model, read by rank 0
    t_warm = time.perf_counter()
    _warm_up(comm, algo, trainer, params, part.indices(0))
    if root and time.perf_counter() - t_warm > 2.0:
        print(f"compiled the numba kernels in {time.perf_counter() - t_warm:.0f} s "
              "(cached for later runs)", flush=True)
    progress = Progress(cfg.rounds, first) if root else None
    finished = False
    try:
        if root and first > cfg.rounds:
            writer.write_params("params", params)
            print(f"{cfg.out} already holds all {cfg.rounds} rounds", flush=True)
        for rnd in range(first, cfg.rounds + 1):
            t0 = time.perf_counter()
            rparams = pipeline.round_params(rnd) if root else None
            if pipeline.has_round_params:
                rparams = comm.bcast(rparams, root=0)  # small control data (a clip norm)
            sampled = schedule.sample_clients(cfg.clients, cfg.clients_per_round, cfg.seed, rnd,
                                              cfg.sampling)
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
            weights = algo.round_weights(pipeline.weights(
                np.array([algo.weight(int(sizes[c])) for c in clients.tolist()], np.float64),
                cfg.clients_per_round), sizes[clients], work)

            # 2. local training and the client side of the pipeline
            updates = np.empty((len(mine), model.num_params), np.float32)
            # per client of the round (rows in `clients` order), columns `stat_cols`;
            # zero rows for clients of other ranks, so a sum collects them exactly
            stats = np.zeros((len(clients), len(stat_cols)), np.float64)
            bounds = np.zeros(aggregate.num_blocks(model.num_params))
            for i, c in enumerate(mine.tolist()):
                tc = time.perf_counter()
                row = np.searchsorted(clients, c)
                res = algo.client_update(trainer, params, part.indices(c),
                                         generator(cfg.seed, "shuffle", rnd, c), **work[row])
                updates[i] = res.update
                metrics = pipeline.client(updates[i], rnd, c, cfg.seed, rparams)
                aggregate.block_max_abs(updates[i], bounds)  # also catches a diverged client
                stats[row, :2] = res.loss_sum / max(res.samples_seen, 1), time.perf_counter() - tc
                if work_cols:
                    stats[row, 2:own] = res.steps, float(slow[row])
                stats[row, own:-1] = [metrics[k] for k in pipeline.client_columns]

            # 3. transport to rank 0: the exact sum, or every update for robust combiners
            C.allreduce_max(comm, bounds)
            try:
                scales = aggregate.scales_for(bounds, float(np.abs(weights).sum()))
            except FloatingPointError:
                raise UserError(f"training diverged in round {rnd}: a client's update is not "
                                "finite; lower --lr (or --server-lr)") from None
            if algo.needs_each_update:
                by_rank = [plan[workers.index(r)] if r in workers else [] for r in range(size)]
                stacked = C.gather_rows(comm, updates, [len(p) for p in by_rank])
                if root:  # in client-id order, whoever trained them
                    combined = algo.combine(stacked[np.argsort(np.concatenate(by_rank))])
            else:
                acc = np.zeros(model.num_params, np.int64)
                for i, c in enumerate(mine.tolist()):
                    row = np.searchsorted(clients, c)
                    stats[row, -1] = aggregate.accumulate(acc, updates[i], weights[row], scales)
                total = np.zeros_like(acc) if root else None
                shared.sum_to_root(acc, total)
                if root:
                    combined = aggregate.to_float(total, scales)
            all_stats = np.zeros_like(stats) if root else None
            C.reduce_sum(comm, stats, all_stats)

            # 4. the server side of the pipeline, the server step and the broadcast
            if root:
                update, stage_metrics = pipeline.server(
                    combined, rnd, clients,
                    {k: all_stats[:, own + j] for j, k in enumerate(pipeline.client_columns)},
                    cfg.clients_per_round, cfg.seed, rparams)
                params = algo.server_step(params, update)
            shared.bcast_from_root(params)

            # 5. evaluation and results
            test_acc = test_loss = float("nan")
            if rnd % cfg.eval_every == 0 or rnd == cfg.rounds:
                test_acc, test_loss = evaluate(params)
            if root:
                rank_of = {c: workers[w] for w, cs in enumerate(plan) for c in cs.tolist()}
                cols = {"round": np.full(len(clients), rnd), "client_id": clients,
                        "rank": np.array([rank_of[c] for c in clients.tolist()], np.int64),
                        "num_samples": sizes[clients]}
                cols.update({k: all_stats[:, j] for j, k in enumerate(stat_cols[:-1])})
                n_round = int(cols["num_samples"].sum())
                train_loss = (float(np.dot(cols["num_samples"], cols["train_loss"]) / n_round)
                              if n_round else float("nan"))
                coarse = int(all_stats[:, -1].sum())
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
                    writer.append_round({
                        "round": rnd, "test_accuracy": test_acc, "test_loss": test_loss,
                        "train_loss": train_loss, "num_clients": len(clients),
                        "num_sampled": len(sampled), "num_samples": n_round, "seconds": seconds,
                        "bytes_up": len(clients) * nbytes, "bytes_down": len(sampled) * nbytes,
                        "fixed_point_coarse": coarse, **stage_metrics,
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
        shared.free()  # collective: only on the way out that every rank takes
    finally:
        if writer is not None:
            if progress.tty and not finished:
                progress.close()
            writer.close()
    if root:
        print(f"results written to {cfg.out}", flush=True)
