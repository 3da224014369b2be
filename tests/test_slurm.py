"""The SLURM job scripts: jobs/fedavg.sbatch, jobs/sweep.sbatch and jobs/lib.sh.

First the scripts' signal and requeue logic with a fake launcher and a fake
scontrol (no SLURM needed), then real jobs on a throw-away single-node SLURM
cluster (tests/slurm_cluster.py; needs slurm-wlm and root): a single run, an
array sweep, a preempted job that is requeued and resumes bitwise identical
to an uninterrupted run, and a cancelled job that is not requeued.
"""

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from slurm_cluster import SlurmCluster, marked_processes, unavailable_reason

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOBS = os.path.join(REPO, "jobs")
FEDAVG = os.path.join(JOBS, "fedavg.sbatch")
SWEEP = os.path.join(JOBS, "sweep.sbatch")


def _pythonpath():
    return os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)


# == the scripts' logic, with a fake launcher and a fake scontrol ===================

FAKE_LAUNCHER = """\
#!/bin/bash
# Stands in for mpiexec: logs its arguments and thread settings, then
# exits with $FAKE_STATUS, or (FAKE_STATUS=run) runs until USR1/TERM as fedmpi does.
echo "args $*" >> "$FAKE_LOG"
echo "threads $OMP_NUM_THREADS $OPENBLAS_NUM_THREADS $MKL_NUM_THREADS $NUMBA_NUM_THREADS" >> "$FAKE_LOG"
if [ "$FAKE_STATUS" != run ]; then exit "$FAKE_STATUS"; fi
trap 'echo "launcher got USR1" >> "$FAKE_LOG"; exit 138' USR1
trap 'echo "launcher got TERM" >> "$FAKE_LOG"; exit 143' TERM
echo started >> "$FAKE_LOG"
for i in $(seq 600); do sleep 0.05; done
exit 0
"""

FAKE_SCONTROL = """\
#!/bin/bash
case $1 in
    requeue) echo "scontrol $*" >> "$FAKE_LOG"; exit "${FAKE_REQUEUE_STATUS:-0}" ;;
    *) exit 1 ;;  # show job: nothing known
esac
"""


@pytest.fixture
def fake(tmp_path):
    """run(script_args, status=..., signal=None, env=None) -> (exit status, log lines)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("mpiexec", FAKE_LAUNCHER), ("scontrol", FAKE_SCONTROL)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    log = tmp_path / "log"

    def run(args, status="0", send=None, env=None, script=FEDAVG):
        log.write_text("")
        full = dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}",
                    FAKE_LOG=str(log), FAKE_STATUS=status, SLURM_JOB_ID="42", SLURM_NTASKS="3",
                    PYTHON=sys.executable, PYTHONPATH=_pythonpath())
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS", "CONFIG", "OUT", "REQUEUE", "REQUEUE_ON"):
            full.pop(var, None)
        full.update(env or {})
        proc = subprocess.Popen(["bash", script, *args], cwd=tmp_path, env=full,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            if send is not None:
                deadline = time.monotonic() + 30
                while "started" not in log.read_text():
                    assert time.monotonic() < deadline and proc.poll() is None, \
                        "the fake launcher did not start"
                    time.sleep(0.02)
                proc.send_signal(send)  # to the batch shell only, as --signal=B:USR1 does
            out, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
        return proc.returncode, log.read_text().splitlines(), out

    return run


def test_fedavg_sbatch_launches_fedmpi_with_resume_auto(fake):
    status, log, out = fake(["jobs/configs/my-run.toml", "--rounds", "5"])
    assert status == 0, out
    assert log[0] == (f"args -n 3 {sys.executable} -m fedmpi --config jobs/configs/my-run.toml "
                      "--out results/my-run.h5 --resume auto --rounds 5")
    assert log[1] == "threads 1 1 1 1"
    assert not any("requeue" in line for line in log)
    # CONFIG and OUT may come from the environment instead
    status, log, out = fake([], env={"CONFIG": "c.toml", "OUT": "x/y.h5"})
    assert log[0].endswith("-m fedmpi --config c.toml --out x/y.h5 --resume auto"), log


@pytest.mark.parametrize("status, send, env, requeued, expected", [
    # SLURM's warning signal to the batch shell: passed on, run stops, job requeued
    ("run", signal.SIGUSR1, {}, True, 0),
    # requeue refused: the run's own status
    ("run", signal.SIGUSR1, {"FAKE_REQUEUE_STATUS": "1"}, True, 138),
    # requeueing switched off
    ("run", signal.SIGUSR1, {"REQUEUE": "0"}, False, 138),
    # SIGTERM (plain scancel, or the time limit): passed on, NOT requeued
    ("run", signal.SIGTERM, {}, False, 143),
    ("run", signal.SIGTERM, {"REQUEUE_ON": "USR1 TERM"}, True, 0),
    # the ranks were signalled directly (scancel --signal=USR1 without --batch)
    ("138", None, {}, True, 0),
    ("143", None, {}, False, 143),
    # failures are not retried
    ("2", None, {}, False, 2),
    ("1", None, {}, False, 1),
])
def test_signals_are_passed_on_and_interrupted_runs_requeued(fake, status, send, env, requeued,
                                                             expected):
    code, log, out = fake(["c.toml"], status=status, send=send, env=env)
    assert code == expected, out
    if send is not None:
        assert f"launcher got {signal.Signals(send).name[3:]}" in log, (log, out)
    assert ("scontrol requeue 42" in log) == requeued, (log, out)


def test_sweep_sbatch_runs_the_array_task_of_its_index(fake, tmp_path):
    (tmp_path / "g.toml").write_text(textwrap.dedent("""\
        out_dir = "runs"
        [base]
        clients = 8
        clients-per-round = 2
        [grid]
        seed = [0, 1]
        lr = [0.1, 0.2]
        """))
    status, log, out = fake(["g.toml"], env={"SLURM_ARRAY_TASK_ID": "2"}, script=SWEEP)
    assert status == 0, out
    assert log[0] == (f"args -n 3 {sys.executable} -m fedmpi --clients 8 --clients-per-round 2 "
                      "--seed 1 --lr 0.1 "
                      "--out runs/seed-1_lr-0.1.h5 --resume auto")
    status, log, out = fake(["g.toml"], env={"SLURM_ARRAY_TASK_ID": "4"}, script=SWEEP)
    assert status == 2 and "task '4' does not exist" in out and log == []
    status, log, out = fake(["g.toml"], status="run", send=signal.SIGUSR1,
                            env={"SLURM_ARRAY_TASK_ID": "0"}, script=SWEEP)
    assert status == 0 and "scontrol requeue 42" in log, out


# == a real single-node SLURM cluster =================================================

@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    try:
        yield cluster
    finally:
        leftovers = cluster.stop()
    assert not leftovers, f"still running after the cluster stopped (now killed): {leftovers}"


def job_env() -> dict:
    """Jobs use this Python and the mpiexec next to it, and import fedmpi from this tree."""
    bindir = os.path.dirname(sys.executable)
    return {"PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": _pythonpath(),
            "PYTHON": sys.executable}


EXPORT = f"--export=ALL,PYTHON={sys.executable}"


def write_config(path, **settings):
    lines = [f"{k} = {v!r}".replace("'", '"') if not isinstance(v, list) else f"{k} = {v}"
             for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


TINY = dict(clients=12, clients_per_round=4, rounds=4, hidden=[16])
# Long enough (tenths of a second per round on one core) that a stop lands mid-run.
LONG = dict(clients=30, clients_per_round=15, rounds=20, hidden=[64], batch_size=5,
            local_epochs=15)


def rows(path) -> int:
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["rounds/round"])
    except (OSError, KeyError):
        return 0


def job_log(record) -> str:
    try:
        with open(record["StdOut"]) as fh:
            return fh.read()
    except (KeyError, OSError):
        return "(no job output)"


def assert_no_job_processes(cluster, grace=15.0):
    """No rank, proxy or job script of a finished job is left behind."""
    deadline = time.monotonic() + grace
    while True:
        left = {pid: cmd for pid, cmd in marked_processes(cluster.marker).items()
                if re.search(r"fedmpi|hydra_pmi_proxy|slurm_script|slurmstepd", cmd)}
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert not left, f"processes of finished jobs still running: {left}"


def run_reference(config, out, cwd):
    """The same configuration run directly, one process, no SLURM."""
    res = subprocess.run([sys.executable, "-m", "fedmpi", "--config", config, "--out", out],
                         capture_output=True, text=True, cwd=cwd, timeout=300,
                         env=dict(os.environ, PYTHONPATH=_pythonpath()))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]


def assert_same_run(ref, out, rounds):
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        assert list(b["rounds/round"][:]) == list(range(1, rounds + 1))
        assert np.array_equal(a["model/params"][:].view(np.uint32),
                              b["model/params"][:].view(np.uint32))
        for k in a["rounds"]:
            if k != "seconds":
                assert np.array_equal(a["rounds"][k][:], b["rounds"][k][:], equal_nan=True), k
        for k in ("round", "client_id", "num_samples", "train_loss"):
            assert np.array_equal(a["clients"][k][:], b["clients"][k][:]), k


@pytest.fixture(scope="module")
def long_reference(tmp_path_factory):
    """LONG run directly with one process (also fills numba's cache before the jobs)."""
    d = tmp_path_factory.mktemp("reference")
    config = write_config(d / "long.toml", **LONG)
    run_reference(config, str(d / "ref.h5"), d)
    return config, str(d / "ref.h5")


def test_single_run_job(slurm, tmp_path):
    config = write_config(tmp_path / "tiny.toml", **TINY)
    job = slurm.sbatch("--ntasks=2", EXPORT, FEDAVG, config, env=job_env(), cwd=tmp_path)
    (rec,) = slurm.wait_finished(job, timeout=150)
    assert (rec["JobState"], rec["ExitCode"]) == ("COMPLETED", "0:0"), job_log(rec)
    assert rec["StdOut"] == str(tmp_path / f"fedmpi-{job}.out")
    with h5py.File(tmp_path / "results" / "tiny.h5", "r") as f:
        assert list(f["rounds/round"][:]) == [1, 2, 3, 4]
        assert f["model/params"].shape == (f["model"].attrs["num_params"],)
        assert f.attrs["mpi_size"] == 2
    assert "results written to results/tiny.h5" in job_log(rec)
    assert_no_job_processes(slurm)


def test_array_sweep(slurm, tmp_path):
    grid = tmp_path / "mini.toml"
    grid.write_text(textwrap.dedent("""\
        out_dir = "runs"
        [base]
        clients = 12
        clients-per-round = 4
        rounds = 3
        hidden = [16]
        [grid]
        partition = ["iid", "dirichlet"]
        seed = [0, 1]
        """))
    env = dict(os.environ, PYTHONPATH=_pythonpath())

    def sweep_cli(*args):
        return subprocess.run([sys.executable, "-m", "fedmpi.sweep", *args], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=60)

    submit = sweep_cli("submit", "mini.toml", "--ntasks", "1", "--script", SWEEP)
    cmd = shlex.split(submit.stdout)
    assert cmd == ["sbatch", "--array=0-3", "--job-name=mini", "--ntasks=1", SWEEP, "mini.toml"]
    job = slurm.sbatch(EXPORT, *cmd[1:], env=job_env(), cwd=tmp_path)
    records = slurm.wait_finished(job, timeout=150)
    assert sorted(r["ArrayTaskId"] for r in records) == ["0", "1", "2", "3"]
    for r in records:
        assert r["JobState"] == "COMPLETED", job_log(r)
        assert r["StdOut"] == str(tmp_path / f"mini-{job}_{r['ArrayTaskId']}.out")
    for name, seed in (("partition-iid_seed-0", 0), ("partition-dirichlet_seed-1", 1)):
        with h5py.File(tmp_path / "runs" / f"{name}.h5", "r") as f:
            assert list(f["rounds/round"][:]) == [1, 2, 3] and "params" in f["model"]
            assert f'"seed": {seed}' in f.attrs["config"]
    status = sweep_cli("status", "mini.toml")
    assert status.returncode == 0, status.stdout + status.stderr
    assert status.stdout.splitlines()[-1] == "sweep mini: 4 tasks: 4 done"
    assert_no_job_processes(slurm)


def wait_for_rows(slurm, job, path, n, timeout=120):
    deadline = time.monotonic() + timeout
    while rows(path) < n:
        (rec,) = slurm.jobs(job) or [{}]
        assert rec.get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), job_log(rec)
        assert time.monotonic() < deadline, f"no {n} rounds in {path} after {timeout} s"
        time.sleep(0.1)


def test_preempted_job_is_requeued_and_resumes_bitwise_identical(slurm, tmp_path, long_reference):
    config, ref = long_reference
    out = tmp_path / "results" / "long.h5"
    job = slurm.sbatch("--ntasks=2", EXPORT, FEDAVG, config, env=job_env(), cwd=tmp_path)
    wait_for_rows(slurm, job, out, 2)
    # What SLURM does 60 s before the time limit (--signal=B:USR1@60), or a preemption by hand:
    slurm.run("scancel", "--signal=USR1", "--batch", job)
    (rec,) = slurm.wait_until(job, lambda r: int(r[0]["Restarts"]) >= 1
                              and r[0]["JobState"] == "PENDING", 60, "requeue")
    stopped_at = rows(out)
    # SLURM 22.05 makes a requeued job eligible only cred_expire + 1 = 121 s later
    # (Reason=BeginTime): the old run's credential is revoked until then. Starting
    # it in the same second fails ("Job credential revoked"); a few seconds later
    # is fine. A job requeued too often after launch failures would be held
    # (JobHoldMaxRequeue) and need a release; `scontrol requeue` itself never holds.
    if "hold" in rec["Reason"].lower() or "held" in rec["Reason"].lower():
        slurm.run("scontrol", "release", job)
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    (rec,) = slurm.wait_finished(job, timeout=150)
    log = job_log(rec)
    assert (rec["JobState"], rec["ExitCode"], rec["Restarts"]) == ("COMPLETED", "0:0", "1"), log
    assert "got SIGUSR1" in log and f"requeued job {job}" in log, log
    resumed = re.search(r"resuming results/long\.h5 after round (\d+)", log)
    assert resumed, log
    assert 2 <= int(resumed.group(1)) == stopped_at < LONG["rounds"], log
    assert_same_run(ref, out, LONG["rounds"])
    assert_no_job_processes(slurm)


def test_cancelled_job_is_not_requeued_and_a_resubmission_finishes_it(slurm, tmp_path,
                                                                      long_reference):
    config, ref = long_reference
    out = tmp_path / "results" / "long.h5"
    job = slurm.sbatch("--ntasks=2", EXPORT, FEDAVG, config, env=job_env(), cwd=tmp_path)
    wait_for_rows(slurm, job, out, 1)
    slurm.run("scancel", job)  # SIGTERM to the batch shell and the ranks
    (rec,) = slurm.wait_finished(job, timeout=60)
    log = job_log(rec)
    assert (rec["JobState"], rec["Restarts"]) == ("CANCELLED", "0"), log
    assert "after SIGTERM" in log and "requeued" not in log, log
    done = rows(out)
    assert 1 <= done < LONG["rounds"]
    assert_no_job_processes(slurm)
    # the same command again continues the file
    job = slurm.sbatch("--ntasks=2", EXPORT, FEDAVG, config, env=job_env(), cwd=tmp_path)
    (rec,) = slurm.wait_finished(job, timeout=150)
    assert rec["JobState"] == "COMPLETED", job_log(rec)
    assert re.search(r"resuming results/long\.h5 after round \d+", job_log(rec))
    assert_same_run(ref, out, LONG["rounds"])
    assert_no_job_processes(slurm)
