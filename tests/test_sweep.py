"""fedmpi.sweep: grid files, task expansion and naming, fedmpi flags, status of results files."""

import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from fedmpi import sweep
from fedmpi.config import parse_args
from fedmpi.errors import UserError
from fedmpi.results import ResultsWriter, read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(clients=8, clients_per_round=3, rounds=2, hidden=[8])


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return str(path)


def tiny_grid(path, grid: str, top: str = "", rounds: int = 2) -> str:
    """A grid file of tiny synthetic runs (TINY's settings) with these [grid] lines."""
    return write(path, top + f"""
        [base]
        clients = 8
        clients-per-round = 3
        rounds = {rounds}
        hidden = [8]
        [grid]
        """ + grid)


def cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-m", "fedmpi.sweep", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=60)


def grid_of(base=None, grid=None, **top):
    data = dict(top)
    data["base"] = dict(TINY if base is None else base)
    data["grid"] = {"algorithm": ["fedavg", "fedsgd"], "seed": [0, 1, 2]} if grid is None else grid
    return sweep.parse_grid(data, "g.toml")


# -- expansion and naming --------------------------------------------------------

def test_tasks_are_the_product_in_file_order_last_key_fastest():
    tasks = sweep.expand(grid_of(grid={"seed": [3, 1], "partition": ["iid", "shards"],
                                       "lr": [0.1]}))
    assert [t.index for t in tasks] == [0, 1, 2, 3]
    assert [t.name for t in tasks] == [
        "seed=3,partition=iid,lr=0.1", "seed=3,partition=shards,lr=0.1",
        "seed=1,partition=iid,lr=0.1", "seed=1,partition=shards,lr=0.1"]
    assert [(t.config.seed, t.config.partition) for t in tasks] == [
        (3, "iid"), (3, "shards"), (1, "iid"), (1, "shards")]
    # expansion is deterministic
    assert [t.out for t in tasks] == [t.out for t in sweep.expand(
        grid_of(grid={"seed": [3, 1], "partition": ["iid", "shards"], "lr": [0.1]}))]


def test_names_and_files():
    g = grid_of(grid={"algorithm": ["fedavg"], "partition": ["iid"], "seed": [0]},
                name="paper", out_dir="res/paper")
    (t,) = sweep.expand(g)
    assert t.name == "algorithm=fedavg,partition=iid,seed=0"
    assert t.out == os.path.join("res/paper", "algorithm-fedavg_partition-iid_seed-0.h5")
    assert g.name == "paper"
    # defaults: name from the file, out_dir results/<name>
    g = sweep.parse_grid({"base": TINY, "grid": {"seed": [0]}}, "some/dir/my-grid.toml")
    assert (g.name, g.out_dir) == ("my-grid", os.path.join("results", "my-grid"))


def test_value_text_of_lists_floats_and_paths():
    (t1, t2) = sweep.expand(grid_of(grid={"hidden": [[32, 16], []], "lr": [1e-3]}))
    assert t1.name == "hidden=32x16,lr=0.001" and t2.name == "hidden=none,lr=0.001"
    assert os.path.basename(t1.out) == "hidden-32x16_lr-0.001.h5"
    (t,) = sweep.expand(grid_of(grid={"dataset": ["npz:data/my set.npz"]}))
    assert os.path.basename(t.out) == "dataset-npz+data+my+set.npz.h5"
    assert sweep.value_text(0.1) == "0.1" and float(sweep.value_text(1 / 3)) == 1 / 3


def test_keys_may_use_dashes_or_underscores():
    (t,) = sweep.expand(grid_of(base={"clients": 8, "clients-per-round": 2, "rounds": 2},
                                grid={"local_epochs": [3]}))
    assert t.name == "local_epochs=3"
    assert (t.config.clients_per_round, t.config.local_epochs) == (2, 3)


def test_grid_values_replace_base_values():
    tasks = sweep.expand(grid_of(base={**TINY, "seed": 7, "lr": 0.2}, grid={"seed": [0, 1]}))
    assert [(t.config.seed, t.config.lr) for t in tasks] == [(0, 0.2), (1, 0.2)]
    assert sweep.task_flags(tasks[1]).count("--seed") == 1


@pytest.mark.parametrize("data, words", [
    ({"grid": {"seed": [0]}, "extra": 1}, ["unknown key 'extra'"]),
    ({"grid": {}}, ["[grid] needs at least one setting"]),
    ({"grid": {"seed": 0}}, ["seed must be a non-empty list"]),
    ({"grid": {"seed": []}}, ["seed must be a non-empty list"]),
    ({"grid": {"sede": [0]}}, ["unknown setting 'sede'"]),
    ({"base": {"out": "x.h5"}, "grid": {"seed": [0]}}, ["'out'", "can't be set"]),
    ({"grid": {"resume": ["auto"]}}, ["'resume'", "can't be set"]),
    ({"grid": {"seed": [0], "seed_": [1]}}, ["unknown setting"]),
    ({"grid": {"local-epochs": [1], "local_epochs": [2]}}, ["given twice"]),
    ({"grid": {"seed": [0, 0]}}, ["tasks 0 and 1 would both write"]),
    ({"name": "a b", "grid": {"seed": [0]}}, ["name must be a word"]),
    ({"grid": {"seed": [0, 1], "lr": [0.1, -1.0]}},
     ["task 1 (seed=0,lr=-1.0)", "--lr must be positive"]),
    ({"grid": {"algorithm": ["fedavg", "nosuchalgo"]}},
     ["task 1 (algorithm=nosuchalgo)", "unknown"]),
    ({"grid": {"clients_per_round": [2, 20]}}, ["task 1", "--clients-per-round"]),
    ({"grid": {"rounds": ["many"]}}, ["task 0", "--rounds got 'many'"]),
])
def test_bad_grids_are_refused_naming_the_problem(data, words):
    data = {"base": {k: v for k, v in TINY.items() if k not in data.get("grid", {})},
            **data}
    with pytest.raises(UserError) as e:
        sweep.expand(sweep.parse_grid(data, "g.toml"))
    for w in words:
        assert w in str(e.value), str(e.value)


# -- fedmpi flags ------------------------------------------------------------------

def test_flags_rebuild_exactly_the_task_config():
    g = grid_of(base={**TINY, "momentum": 0.9, "synthetic-alpha": 0.5, "hidden": [16, 8]},
                grid={"lr": [0.1, 1 / 3], "partition": ["iid", "dirichlet"]})
    for t in sweep.expand(g):
        flags = sweep.task_flags(t)
        assert flags[-4:] == ["--out", t.out, "--resume", "auto"]
        assert parse_args(flags) == t.config


def test_args_cli_is_shell_quoted(tmp_path):
    grid = tiny_grid(tmp_path / "g.toml", """\
        dataset = ["synthetic", "npz:my data.npz"]
        """, top="""\
        out_dir = "out dir"
        """)
    res = cli("args", grid, 1)
    assert res.returncode == 0, res.stderr
    words = shlex.split(res.stdout)
    assert words == sweep.task_flags(sweep.expand(sweep.load_grid(grid))[1])
    assert words[words.index("--dataset") + 1] == "npz:my data.npz"
    assert words[words.index("--out") + 1] == os.path.join("out dir", "dataset-npz+my+data.npz.h5")


def test_list_count_submit_cli(tmp_path):
    grid = write(tmp_path / "paper.toml", """\
        [base]
        clients = 8
        clients-per-round = 3
        [grid]
        partition = ["iid", "shards"]
        seed = [0, 1]
        """)
    res = cli("count", grid)
    assert (res.returncode, res.stdout) == (0, "4\n")
    res = cli("list", grid)
    lines = [line.split("\t") for line in res.stdout.splitlines()]
    assert lines[1] == ["1", "partition=iid,seed=1",
                        os.path.join("results", "paper", "partition-iid_seed-1.h5")]
    assert len(lines) == 4
    res = cli("submit", grid, "--parallel", 2, "--ntasks", 4, "--script", "s.sbatch")
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == ["sbatch", "--array=0-3%2", "--job-name=paper",
                                       "--ntasks=4", "s.sbatch", grid]
    # the default script is this source tree's jobs/sweep.sbatch
    res = cli("submit", grid, cwd=REPO)
    assert shlex.split(res.stdout)[-2] == os.path.join("jobs", "sweep.sbatch")


def test_array_spec():
    assert sweep.array_spec([0, 1, 2, 3]) == "0-3"
    assert sweep.array_spec([0, 2, 3, 4, 7]) == "0,2-4,7"
    assert sweep.array_spec([5]) == "5"


@pytest.mark.parametrize("args, words", [
    (["list", "missing.toml"], ["grid file missing.toml does not exist"]),
    (["args", "GRID", "4"], ["task '4' does not exist", "0 to 3"]),
    (["args", "GRID", "x"], ["task 'x' does not exist"]),
    (["frobnicate", "GRID"], ["invalid choice"]),
    ([], ["required"]),
    (["count", "BAD"], ["not valid TOML"]),
    (["submit", "GRID", "--parallel", "0"], ["--parallel", "positive"]),
])
def test_cli_errors_are_one_line_and_status_2(tmp_path, args, words):
    write(tmp_path / "GRID", """\
        [grid]
        partition = ["iid", "shards"]
        seed = [0, 1]
        """)
    (tmp_path / "BAD").write_text("[grid\n")
    res = cli(*args, cwd=tmp_path)
    assert res.returncode == 2
    assert res.stdout == ""
    assert res.stderr.startswith("fedmpi-sweep: error: ") and res.stderr.count("\n") == 1
    for w in words:
        assert w in res.stderr, res.stderr


def test_example_grid_in_jobs_configs_is_valid():
    g = sweep.load_grid(os.path.join(REPO, "jobs", "configs", "fashion-grid.toml"))
    tasks = sweep.expand(g)
    assert len(tasks) == 12
    assert tasks[0].name == "algorithm=fedavg,partition=iid,seed=0"
    assert {t.config.dataset for t in tasks} == {"fashion-mnist"}


# -- status ------------------------------------------------------------------------

def _run_fedmpi(flags, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-m", "fedmpi", *flags], capture_output=True,
                         text=True, cwd=cwd, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def _fake_file(path, config, rounds, params):
    """A results file as a (killed or finished) run leaves it, without running one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sizes = [60, 8, 10]
    n = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
    with ResultsWriter(path, overwrite=True, config=config, attrs={}, layer_sizes=sizes,
                       partition_sizes=np.ones(8, np.int64),
                       label_histogram=np.ones((8, 10), np.int64)) as w:
        for r in range(1, rounds + 1):
            w.append_round({"round": r, "test_accuracy": 0.5})
        if params:
            w.write_params("params", np.zeros(n, np.float32))


def test_status_of_done_incomplete_missing_unreadable_and_mismatched_runs(tmp_path):
    grid = tiny_grid(tmp_path / "g.toml", """\
        partition = ["iid", "dirichlet"]
        seed = [0, 1, 2]
        """, top="""\
        name = "st"
        out_dir = "runs"
        """)
    tasks = sweep.expand(sweep.load_grid(grid))
    # 0: a real finished run; 1: a real run of only 1 of its 2 rounds
    _run_fedmpi(sweep.task_flags(tasks[0]), tmp_path)
    _run_fedmpi(sweep.task_flags(tasks[1]) + ["--rounds", "1"], tmp_path)
    # 2: missing; 3: not HDF5; 4: made with other settings; 5: killed after round 1
    (tmp_path / tasks[3].out).write_bytes(b"not hdf5")
    cfg4 = read_run(str(tmp_path / tasks[0].out))["config"]
    _fake_file(str(tmp_path / tasks[4].out), {**cfg4, "partition": "dirichlet", "seed": 1,
                                              "lr": 0.5}, 2, True)
    _fake_file(str(tmp_path / tasks[5].out), {**cfg4, "partition": "dirichlet", "seed": 2},
               1, False)

    cwd = os.getcwd()
    os.chdir(tmp_path)  # out_dir is relative to the current directory
    try:
        states = [sweep.task_status(t) for t in tasks]
    finally:
        os.chdir(cwd)
    assert [s.state for s in states] == ["done", "incomplete", "missing", "unreadable",
                                         "mismatch", "incomplete"]
    assert states[1].describe() == "incomplete (1 of 2 rounds)"
    assert "not an HDF5 file" in states[3].detail
    assert "lr" in states[4].detail and "seed" not in states[4].detail

    res = cli("status", "g.toml", cwd=tmp_path)
    assert res.returncode == 1, res.stderr
    lines = res.stdout.splitlines()
    assert lines[0].split()[:3] == ["0", "partition=iid,seed=0", "done"]
    assert "incomplete (1 of 2 rounds)" in lines[1] and "missing" in lines[2]
    assert "sweep st: 6 tasks: 1 done, 2 incomplete, 1 missing, 1 unreadable, 1 mismatch" in lines
    assert "sbatch --array=1-5 --job-name=st " in lines[-1] and lines[-1].endswith(" g.toml")
    res = cli("submit", "g.toml", "--unfinished", "--script", "s.sbatch", cwd=tmp_path)
    assert shlex.split(res.stdout) == ["sbatch", "--array=1-5", "--job-name=st", "s.sbatch",
                                       "g.toml"]


def test_status_exits_0_when_all_tasks_are_done(tmp_path):
    grid = tiny_grid(tmp_path / "g.toml", """\
        seed = [0, 1]
        """)
    for t in sweep.expand(sweep.load_grid(grid)):
        _run_fedmpi(sweep.task_flags(t), tmp_path)
    res = cli("status", "g.toml", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.splitlines()[-1] == "sweep g: 2 tasks: 2 done"
    res = cli("submit", "g.toml", "--unfinished", cwd=tmp_path)
    assert res.returncode == 0 and res.stdout == "" and "all 2 tasks" in res.stderr


# -- run: the sweep without SLURM ----------------------------------------------------

def _sweep_proc(*args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return subprocess.Popen([sys.executable, "-m", "fedmpi.sweep", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
                            env=env)


def test_run_runs_the_unfinished_tasks_in_turn_and_goes_on_after_a_failure(tmp_path):
    tiny_grid(tmp_path / "g.toml", """\
        dataset = ["synthetic", "npz:missing.npz"]
        seed = [0, 1]
        """, top="""\
        name = "here"
        out_dir = "runs"
        """)
    tasks = sweep.expand(sweep.load_grid(str(tmp_path / "g.toml")))
    _run_fedmpi(sweep.task_flags(tasks[1]), tmp_path)  # task 1 is done already
    before = (tmp_path / tasks[1].out).read_bytes()
    res = cli("run", "g.toml", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert lines[0] == "sweep here: 1 of 4 tasks done; running 3 on 1 rank(s) each, 1 at a time"
    assert lines[1].startswith("[1/3] task 0 dataset=synthetic,seed=0: done, test accuracy 0.")
    assert lines[2].startswith("[2/3] task 2 dataset=npz:missing.npz,seed=0: failed (exit "
                               "status 2): fedmpi: error: npz data set missing.npz")
    assert lines[3].startswith("[3/3] task 3 ")
    assert "2 task(s) failed: 2, 3" in res.stderr
    assert (tmp_path / tasks[1].out).read_bytes() == before  # a done task is not run again
    run = read_run(str(tmp_path / tasks[0].out))
    assert len(run["rounds"]["round"]) == 2 and run["params"] is not None
    # the task's own output went to its log, beside its results
    assert "results written to runs/" in (tmp_path / "runs" / "dataset-synthetic_seed-0.log"
                                          ).read_text()
    assert "Traceback" not in (tmp_path / "runs" / "dataset-npz+missing.npz_seed-0.log"
                               ).read_text()


def test_run_stops_with_a_checkpoint_and_continues_when_run_again(tmp_path):
    """Two tasks at a time; a SIGTERM to the runner alone (kill PID) is passed on to
    both, which stop with a checkpoint; the same command then finishes them."""
    tiny_grid(tmp_path / "g.toml", """\
        seed = [0, 1]
        """, top="""\
        out_dir = "runs"
        """, rounds=400)
    tasks = sweep.expand(sweep.load_grid(str(tmp_path / "g.toml")))
    outs = [tmp_path / t.out for t in tasks]
    p = _sweep_proc("run", "g.toml", "--parallel", "2", cwd=tmp_path)
    deadline = time.time() + 120
    while min(_rounds_in(out) for out in outs) < 2:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 130, stdout + stderr
    assert stdout.count("stopped (its last checkpoint is kept)") == 2, stdout
    assert "stopped; run the same command again to continue" in stderr
    done = [_rounds_in(out) for out in outs]
    assert all(2 <= d < 400 for d in done), done
    res = cli("run", "g.toml", "--parallel", "2", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert sorted(line.split(":")[0] for line in lines[1:3]) == [
        "[1/2] task 0 seed=0", "[2/2] task 1 seed=1"]
    assert lines[-1] == "sweep g: all 2 tasks done"
    for t, d, out in zip(tasks, done, outs):
        log = (tmp_path / sweep.log_path(t)).read_text()
        assert f"resuming {t.out} after round {d}" in log
        assert len(read_run(str(out))["rounds"]["round"]) == 400


def _rounds_in(path):
    """Rounds a running job has written (0 while the file is new or mid-update)."""
    import h5py

    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["rounds/round"]) if "round" in f["rounds"] else 0
    except Exception:  # noqa: BLE001 -- a file being written can read as anything
        return 0
