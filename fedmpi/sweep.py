"""``python -m fedmpi.sweep``: a grid of fedmpi runs, one SLURM array task each.

::

    python -m fedmpi.sweep list GRID.toml          # index, name, results file of every task
    python -m fedmpi.sweep count GRID.toml         # number of tasks
    python -m fedmpi.sweep args GRID.toml TASK     # fedmpi's flags for task TASK (shell-quoted)
    python -m fedmpi.sweep status GRID.toml        # done / incomplete / missing per task
    python -m fedmpi.sweep submit GRID.toml        # the sbatch command that runs the sweep
    python -m fedmpi.sweep run GRID.toml -n 8      # or run the unfinished tasks here

A grid file is TOML::

    name = "fashion-grid"              # job name (default: the file's name)
    out_dir = "results/fashion-grid"   # where the results go (default: results/<name>)
    [base]                             # settings shared by every task (a [grid]
    dataset = "fashion-mnist"          # value replaces a [base] one)
    rounds = 200
    [grid]                             # setting -> list of values
    algorithm = ["fedavg", "fedsgd"]
    partition = ["iid", "shards"]
    seed = [0, 1, 2]

Settings are fedmpi's flag names ('-' or '_'), as in a --config file. The
tasks are every combination of the [grid] values, numbered in a fixed order:
grid keys in file order, the last key varying fastest. Task
``algorithm=fedavg,partition=iid,seed=0`` writes
``<out_dir>/algorithm-fedavg_partition-iid_seed-0.h5`` and always runs with
``--resume auto``, so a requeued or resubmitted task continues its own file.
Relative paths (out_dir, data paths) are relative to the current directory:
the directory the array job is submitted from.

``run`` is the sweep without SLURM (a laptop, a workstation, an interactive
allocation): the tasks that are not done, one after another (or K at a time), each under
``mpiexec -n N`` (or in one process); Ctrl-C stops the running task at its next
round, with a checkpoint, and running it again continues where it stopped.

Bad input gets one line ``fedmpi-sweep: error: <what is wrong>`` on stderr and
exit status 2. ``status`` exits 0 only if every task is done, else 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from fedmpi.cli import ArgumentParser, run_tool
from fedmpi.config import EXECUTION_KEYS, FIELDS, Config, from_dict, read_toml
from fedmpi.errors import UserError

PROG = "fedmpi-sweep"
# The sweep chooses these itself: one file per task, always resumable.
RESERVED = {"out": "the results file is <out_dir>/<task name>.h5",
            "resume": "every task runs with --resume auto",
            "overwrite": "a task continues its file rather than replace it"}
# only settings that do not change results may be the sweep's to choose
assert set(RESERVED) <= set(EXECUTION_KEYS), "RESERVED must be execution settings (config.py)"
TOP_LEVEL = ("name", "out_dir", "base", "grid")


@dataclass(frozen=True)
class Grid:
    path: str
    name: str
    out_dir: str
    base: dict          # setting (fedmpi field name) -> value
    axes: tuple         # ((key as written in the file, field name, (values...)), ...)


@dataclass(frozen=True)
class Task:
    index: int
    name: str           # "algorithm=fedavg,partition=iid,seed=0"
    out: str            # "<out_dir>/algorithm-fedavg_partition-iid_seed-0.h5"
    settings: dict      # field name -> value: base, then this task's grid values
    config: Config      # validated, with out and resume=auto


@dataclass(frozen=True)
class Status:
    state: str          # done, incomplete, missing, unreadable, mismatch
    rounds: int         # rounds in the file
    total: int          # rounds of the task's configuration
    detail: str = ""

    def describe(self) -> str:
        if self.state == "incomplete":
            return f"incomplete ({self.rounds} of {self.total} rounds)"
        if self.state in ("unreadable", "mismatch"):
            return f"{self.state}: {self.detail}"
        return self.state


# -- grid file -----------------------------------------------------------------

def _field_name(key: str, where: str) -> str:
    name = key.replace("-", "_")
    if name in RESERVED:
        raise UserError(f"{where}: setting {key!r} can't be set in a grid file "
                        f"({RESERVED[name]})")
    if name not in FIELDS:
        raise UserError(f"{where}: unknown setting {key!r} "
                        "(see python -m fedmpi --help for the settings)")
    return name


def parse_grid(data: dict, path: str = "<grid>") -> Grid:
    """A Grid from the parsed TOML of a grid file; UserError on anything wrong."""
    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise UserError(f"grid file {path}: unknown key {unknown[0]!r}: a grid file has "
                        "name, out_dir, [base] and [grid]")
    stem = os.path.splitext(os.path.basename(path))[0] or "sweep"
    name = data.get("name", stem)
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name):
        raise UserError(f"grid file {path}: name must be a word of letters, digits and "
                        f"._+- (it names the SLURM job); got {name!r}")
    out_dir = data.get("out_dir", os.path.join("results", name))
    if not isinstance(out_dir, str) or not out_dir:
        raise UserError(f"grid file {path}: out_dir must be a directory path (a string)")
    base_in, grid_in = data.get("base", {}), data.get("grid", {})
    for table, value in (("base", base_in), ("grid", grid_in)):
        if not isinstance(value, dict):
            raise UserError(f"grid file {path}: {table} must be a table: [{table}]")
    base = {}
    for key, value in base_in.items():
        field = _field_name(key, f"grid file {path} [base]")
        if field in base:
            raise UserError(f"grid file {path} [base]: setting {key!r} is given twice")
        base[field] = value
    if not grid_in:
        raise UserError(f"grid file {path}: [grid] needs at least one setting with a list of "
                        "values (for a single run use jobs/fedavg.sbatch)")
    axes, seen = [], set()
    for key, values in grid_in.items():
        field = _field_name(key, f"grid file {path} [grid]")
        if field in seen:
            raise UserError(f"grid file {path} [grid]: setting {key!r} is given twice")
        if not isinstance(values, list) or not values:
            raise UserError(f"grid file {path} [grid]: {key} must be a non-empty list of "
                            f"values, e.g. {key} = [1, 2]; got {values!r}")
        seen.add(field)
        axes.append((key, field, tuple(values)))
    return Grid(path=path, name=name, out_dir=out_dir, base=base, axes=tuple(axes))


def load_grid(path: str) -> Grid:
    return parse_grid(read_toml(path, "grid file"), path)


# -- tasks ---------------------------------------------------------------------

def value_text(value, list_sep: str = ",") -> str:
    """A setting's value as text: as a command-line flag takes it (list_sep ',')
    or as it appears in a task's name (list_sep 'x': hidden=200x200)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, (list, tuple)):
        return list_sep.join(value_text(v, list_sep) for v in value) or "none"
    return str(value)


def task_name(values: list[tuple[str, object]]) -> str:
    """[("algorithm", "fedavg"), ("seed", 0)] -> "algorithm=fedavg,seed=0"."""
    return ",".join(f"{k}={value_text(v, 'x')}" for k, v in values)


def file_name(values: list[tuple[str, object]]) -> str:
    """[("algorithm", "fedavg"), ("seed", 0)] -> "algorithm-fedavg_seed-0.h5"."""
    def safe(text):
        return re.sub(r"[^A-Za-z0-9.,+=-]", "+", text)
    return "_".join(f"{safe(k)}-{safe(value_text(v, 'x'))}" for k, v in values) + ".h5"


def expand(grid: Grid) -> list[Task]:
    """Every task of the grid in index order, each validated; UserError names the task."""
    keys = [key for key, _, _ in grid.axes]
    fields_ = [field for _, field, _ in grid.axes]
    tasks, files = [], {}
    for index, combo in enumerate(itertools.product(*(values for _, _, values in grid.axes))):
        pairs = list(zip(keys, combo))
        name = task_name(pairs)
        out = os.path.join(grid.out_dir, file_name(pairs))
        if out in files:
            raise UserError(f"grid file {grid.path}: tasks {files[out]} and {index} would both "
                            f"write {out}; make the [grid] values distinct")
        files[out] = index
        settings = {**grid.base, **dict(zip(fields_, combo))}
        try:
            config = from_dict({**settings, "out": out, "resume": "auto"})
        except UserError as e:
            raise UserError(f"grid file {grid.path}: task {index} ({name}): {e}") from None
        tasks.append(Task(index=index, name=name, out=out, settings=settings, config=config))
    return tasks


def get_task(tasks: list[Task], index) -> Task:
    try:
        i = int(index)
    except (TypeError, ValueError):
        i = -1
    if not 0 <= i < len(tasks):
        raise UserError(f"task {index!r} does not exist: the grid has tasks 0 to "
                        f"{len(tasks) - 1}")
    return tasks[i]


def task_flags(task: Task) -> list[str]:
    """fedmpi's command-line flags that run `task`."""
    flags = []
    for field, value in task.settings.items():
        flag = "--" + field.replace("_", "-")
        if FIELDS[field].type == "bool":
            if value is True:
                flags.append(flag)
            elif value is not False:
                flags += [flag, value_text(value)]  # let fedmpi reject it
            continue
        flags += [flag, value_text(value)]
    return flags + ["--out", task.out, "--resume", "auto"]


# -- status --------------------------------------------------------------------

def task_status(task: Task) -> Status:
    """How far task's results file is, read without locking (safe while it runs)."""
    from fedmpi.results import read_run

    total = task.config.rounds
    if not os.path.lexists(task.out):
        return Status("missing", 0, total)
    try:
        run = read_run(task.out)
    except UserError as e:
        return Status("unreadable", 0, total, str(e))
    except Exception as e:  # noqa: BLE001 -- a damaged file must not stop the report
        return Status("unreadable", 0, total, f"{type(e).__name__}: {e}")
    rounds = len(run["rounds"].get("round", ()))
    # The run saves its configuration with the partition resolved.
    mine = dataclasses.replace(task.config, partition=task.config.resolved_partition())
    diff = mine.differences(run["config"])
    if diff:
        return Status("mismatch", rounds, total,
                      "the file was made with other settings (" + ", ".join(diff)
                      + "); the task would refuse to resume it")
    if run["params"] is not None and rounds >= total:
        return Status("done", rounds, total)
    return Status("incomplete", rounds, total)


# -- submitting ----------------------------------------------------------------

def array_spec(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2,5,7-8" (sbatch --array syntax)."""
    parts, start = [], None
    for i, n in enumerate(indices):
        if start is None:
            start = n
        if i + 1 == len(indices) or indices[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(parts)


def default_script() -> str:
    """jobs/sweep.sbatch of this source tree (relative if under the current directory)."""
    here = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "jobs", "sweep.sbatch")
    if not os.path.isfile(here):
        return os.path.join("jobs", "sweep.sbatch")
    rel = os.path.relpath(here)
    return here if rel.startswith("..") else rel


def submit_command(grid: Grid, indices: list[int], *, script: str | None = None,
                   parallel: int | None = None, ntasks: int | None = None) -> list[str]:
    spec = array_spec(indices) + (f"%{parallel}" if parallel else "")
    cmd = ["sbatch", f"--array={spec}", f"--job-name={grid.name}"]
    if ntasks:
        cmd.append(f"--ntasks={ntasks}")
    return cmd + [script or default_script(), grid.path]


# -- running here -----------------------------------------------------------------

def find_mpiexec() -> str | None:
    """mpiexec beside this Python first (pip's mpich in the venv), then on PATH."""
    return (shutil.which("mpiexec", path=os.path.dirname(sys.executable))
            or shutil.which("mpiexec"))


def run_command(task: Task, ranks: int, mpiexec: str | None) -> list[str]:
    """The command that runs `task` on `ranks` MPI ranks of this machine."""
    cmd = [sys.executable, "-m", "fedmpi", *task_flags(task)]
    return cmd if ranks == 1 else [mpiexec, "-n", str(ranks), *cmd]


def log_path(task: Task) -> str:
    """Where `run` writes the task's output: beside its results, .log for .h5."""
    return os.path.splitext(task.out)[0] + ".log"


def _last_error(path: str) -> str:
    """The last line of a task's log that fedmpi or MPI wrote about a failure."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return f"see {path}"
    for line in reversed(lines):
        if line.startswith("fedmpi") or "error" in line.lower():
            return line
    return lines[-1] if lines else f"no output; see {path}"


def _outcome(task: Task) -> str:
    """'done, test accuracy 0.8312' (the last evaluated) from the task's results file."""
    from fedmpi.reading import read_meta

    try:
        rounds = read_meta(task.out)["rounds"]
        acc = [a for a in rounds.get("test_accuracy", []) if a == a]  # NaN: not evaluated
    except (UserError, KeyError):
        return "done"
    return f"done, test accuracy {acc[-1]:.4f}" if acc else "done"


_STOP_STATUSES = {128 + s for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}


def run_here(grid: Grid, ranks: int, parallel: int = 1) -> int:
    """Run the grid's unfinished tasks on this machine, `parallel` at a time, each on
    `ranks` MPI ranks; the exit status (0: all done, 1: some failed, 130: stopped).

    Ctrl-C reaches the whole foreground process group, so the running fedmpi
    jobs get it too and stop after their round with a checkpoint: wait for
    them rather than kill them, and start no more. A SIGTERM sent to this
    process alone is passed on to them.
    """
    mpiexec = find_mpiexec() if ranks > 1 else None
    if ranks > 1 and mpiexec is None:
        raise UserError(f"-n {ranks} needs mpiexec, and there is none beside {sys.executable} "
                        "or on PATH: pip install mpich (or load your MPI), or run with -n 1")
    tasks = expand(grid)
    todo = [t for t in tasks if task_status(t).state != "done"]
    print(f"sweep {grid.name}: {len(tasks) - len(todo)} of {len(tasks)} tasks done; running "
          f"{len(todo)} on {ranks} rank(s) each, {parallel} at a time", flush=True)
    queue = list(enumerate(todo, 1))
    running: dict[subprocess.Popen, tuple] = {}
    failed, stopped = [], False

    def forward(signum, frame):
        nonlocal stopped
        stopped = True
        for proc in running:
            proc.send_signal(signum)

    old = signal.signal(signal.SIGTERM, forward)
    try:
        while queue or running:
            while queue and len(running) < parallel and not stopped:
                n, t = queue.pop(0)
                label = f"[{n}/{len(todo)}] task {t.index} {t.name}: "
                os.makedirs(os.path.dirname(t.out) or ".", exist_ok=True)
                log = open(log_path(t), "a")  # a resumed task adds to its log
                proc = subprocess.Popen(run_command(t, ranks, mpiexec), stdout=log,
                                        stderr=subprocess.STDOUT)
                running[proc] = (label, t, time.monotonic(), log)
                if parallel == 1:  # one at a time: say what runs now, the outcome later
                    print(label, end="", flush=True)
            try:
                next(iter(running)).wait(timeout=0.1 if parallel > 1 else None)
            except subprocess.TimeoutExpired:
                pass
            except KeyboardInterrupt:
                stopped = True
            for proc in [p for p in running if p.poll() is not None]:
                label, t, t0, log = running.pop(proc)
                log.close()
                head = label if parallel > 1 else ""
                # fedmpi exits 128 + N when a signal N stopped it (also one this process
                # ignored, as a background job of a shell ignores Ctrl-C)
                if proc.returncode in _STOP_STATUSES:
                    stopped = True
                    print(f"{head}stopped (its last checkpoint is kept)", flush=True)
                elif proc.returncode != 0:
                    failed.append(t.index)
                    print(f"{head}failed (exit status {proc.returncode}): "
                          f"{_last_error(log_path(t))}", flush=True)
                else:
                    print(f"{head}{_outcome(t)} in {time.monotonic() - t0:.1f} s [{t.out}]",
                          flush=True)
    finally:
        signal.signal(signal.SIGTERM, old)
    if stopped:
        print(f"sweep {grid.name}: stopped; run the same command again to continue",
              file=sys.stderr, flush=True)
        return 130
    if failed:
        print(f"sweep {grid.name}: {len(failed)} task(s) failed: "
              f"{', '.join(map(str, sorted(failed)))} (their .log files beside the results "
              "say why)", file=sys.stderr)
        return 1
    print(f"sweep {grid.name}: all {len(tasks)} tasks done", flush=True)
    return 0


# -- command line --------------------------------------------------------------

def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m fedmpi.sweep",
                description="A grid of fedmpi runs as a SLURM array job (one task per "
                            "combination of the [grid] values; see jobs/README.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    sub.required = True
    for name, help_ in (("list", "index, name and results file of every task"),
                        ("count", "the number of tasks (for sbatch --array=0-<count-1>)"),
                        ("status", "done / incomplete / missing per task; exit 0 only if "
                                   "all are done")):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("grid", metavar="GRID.toml")
        s.set_defaults(func=globals()[f"_cmd_{name}"])
    s = sub.add_parser("args", help="fedmpi's flags for one task, shell-quoted",
                       description="fedmpi's flags for one task, shell-quoted, including "
                                   "--out and --resume auto")
    s.add_argument("grid", metavar="GRID.toml")
    s.add_argument("task", metavar="TASK", help="task index, from 0")
    s.set_defaults(func=_cmd_args)
    s = sub.add_parser("submit", help="print the sbatch command that runs the sweep",
                       description="print the sbatch command line that runs the sweep as "
                                   "an array job (run it with $(...) or copy it)")
    s.add_argument("grid", metavar="GRID.toml")
    s.add_argument("--parallel", type=_positive, metavar="K",
                   help="run at most K tasks at a time (--array=...%%K)")
    s.add_argument("--ntasks", type=_positive, metavar="N",
                   help="MPI ranks per task (default: the script's #SBATCH --ntasks)")
    s.add_argument("--script", metavar="PATH", help="the array job script "
                   "(default: jobs/sweep.sbatch of this source tree)")
    s.add_argument("--unfinished", action="store_true",
                   help="only the tasks that are not done (see status)")
    s.set_defaults(func=_cmd_submit)
    s = sub.add_parser("run", help="run the unfinished tasks here, one after another",
                       description="run the tasks that are not done on this machine, one "
                                   "after another, each under mpiexec -n N (SLURM not "
                                   "needed); Ctrl-C stops with a checkpoint and running "
                                   "again continues")
    s.add_argument("grid", metavar="GRID.toml")
    s.add_argument("-n", "--ranks", type=_positive, default=1, metavar="N",
                   help="MPI ranks per task (default: 1, one process without mpiexec)")
    s.add_argument("--parallel", type=_positive, default=1, metavar="K",
                   help="run up to K tasks at once (default: 1); K x N processes should "
                        "not exceed the cores")
    s.set_defaults(func=_cmd_run)
    return p


def _cmd_list(args) -> int:
    for t in expand(load_grid(args.grid)):
        print(f"{t.index}\t{t.name}\t{t.out}")
    return 0


def _cmd_count(args) -> int:
    print(len(expand(load_grid(args.grid))))
    return 0


def _cmd_args(args) -> int:
    print(shlex.join(task_flags(get_task(expand(load_grid(args.grid)), args.task))))
    return 0


def _cmd_status(args) -> int:
    grid = load_grid(args.grid)
    tasks = expand(grid)
    counts = dict.fromkeys(("done", "incomplete", "missing", "unreadable", "mismatch"), 0)
    unfinished = []
    width = max(len(t.name) for t in tasks)
    for t in tasks:
        st = task_status(t)
        counts[st.state] += 1
        if st.state != "done":
            unfinished.append(t.index)
        print(f"{t.index:4d}  {t.name:<{width}}  {st.describe()}  [{t.out}]")
    summary = ", ".join(f"{n} {state}" for state, n in counts.items() if n or state == "done")
    print(f"sweep {grid.name}: {len(tasks)} tasks: {summary}")
    if not unfinished:
        return 0
    print("to run the unfinished tasks again (once none of them is queued or running): "
          + shlex.join(submit_command(grid, unfinished)))
    return 1


def _cmd_submit(args) -> int:
    grid = load_grid(args.grid)
    tasks = expand(grid)
    indices = [t.index for t in tasks]
    if args.unfinished:
        indices = [t.index for t in tasks if task_status(t).state != "done"]
        if not indices:
            print(f"all {len(tasks)} tasks of {grid.name} are done", file=sys.stderr)
            return 0
    print(shlex.join(submit_command(grid, indices, script=args.script,
                                    parallel=args.parallel, ntasks=args.ntasks)))
    return 0


def _cmd_run(args) -> int:
    return run_here(load_grid(args.grid), args.ranks, args.parallel)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m fedmpi.sweep``: the exit status."""
    return run_tool(PROG, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
