"""Checkpoint/resume: a run killed at random moments (SIGKILL of every rank) and
resumed, also with other rank counts, ends bitwise identical to an uninterrupted run."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import fedmpi_lines

ARGS = ["--rounds", "150", "--clients", "40", "--clients-per-round", "10", "--hidden", "64",
        "--batch-size", "5"]
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")


def _cmd(ranks, *args):
    base = [sys.executable, "-m", "fedmpi", *ARGS, *args]
    return base if ranks == 1 else [MPIEXEC, "-n", str(ranks), *base]


def _rows(path):
    """Rows written so far: a progress probe of a file another process is writing
    (without SWMR its metadata can be caught half-updated: HDF5 then raises OSError,
    KeyError or, with "addr overflow", other errors), so any failure reads as 0."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            return len(f["rounds/round"]) if "round" in f["rounds"] else 0
    except Exception:  # noqa: BLE001 -- see the docstring
        return 0


def _same_run(ref, out):
    """The two files hold the same results, bit for bit (timings aside)."""
    with h5py.File(ref, "r") as a, h5py.File(out, "r") as b:
        assert np.array_equal(a["model/params"][:].view(np.uint32), b["model/params"][:].view(np.uint32))
        for k in a["rounds"]:
            if k != "seconds":
                assert np.array_equal(a["rounds"][k][:], b["rounds"][k][:], equal_nan=True), k
        for k in ("round", "client_id", "num_samples", "train_loss"):
            assert np.array_equal(a["clients"][k][:], b["clients"][k][:]), k


def _round_seconds(path):
    with h5py.File(path, "r", locking=False) as f:
        return float(np.median(f["rounds/seconds"][:]))


@pytest.mark.skipif(MPIEXEC is None, reason="mpiexec not found (pip install mpich)")
@pytest.mark.parametrize("every", [1, 4])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, every):
    ref, out = tmp_path / "ref.h5", tmp_path / "run.h5"
    subprocess.run(_cmd(1, "--out", str(ref)), check=True, capture_output=True, timeout=300)
    # a new seed each time (printed on failure): the kill points differ from run to run
    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    # kill at a moment drawn uniformly over two whole rounds (training, aggregation,
    # writing rows and checkpoint), not only just after a row appeared
    span = 2 * _round_seconds(ref)
    kills, cut = 0, 0
    for ranks in (3, 1, 5, 2):
        p = subprocess.Popen(_cmd(ranks, "--out", str(out), "--resume", "auto",
                                  "--checkpoint-every", str(every)),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        start = _rows(out)
        deadline = time.time() + 120
        while _rows(out) < start + rng.randint(3, 12) and p.poll() is None:
            assert time.time() < deadline, f"run made no progress (seed {seed})"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, span))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            kills += 1
        p.wait(timeout=30)
        with h5py.File(out, "r", locking=False) as f:
            if "checkpoint" in f:
                cut += _rows(out) > int(f["checkpoint"].attrs["round"])
    assert kills >= 3, f"seed {seed}"
    # with --checkpoint-every 4 most kills leave rows after the last checkpoint,
    # which the resume cuts and re-runs (test_reopen_cuts_rows_after_the_checkpoint
    # covers that case deterministically)
    print(f"seed {seed}: {kills} kills, {cut} left rows after the checkpoint")
    done = subprocess.run(_cmd(3, "--out", str(out), "--resume", "auto",
                               "--checkpoint-every", str(every)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    _same_run(ref, out)


SMALL = ["--clients", "8", "--clients-per-round", "2", "--hidden", "8"]


def _fedmpi(*args, env=None):
    return subprocess.run([sys.executable, "-m", "fedmpi", *SMALL, *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)


def _one_error_line(r, *words):
    assert r.returncode == 2, r.stderr
    lines = fedmpi_lines(r.stderr)
    assert len(lines) == 1 and lines[0].startswith("fedmpi: error: "), r.stderr
    assert "Traceback" not in r.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run.h5"
    assert _fedmpi("--rounds", 2, "--out", out).returncode == 0
    r = _fedmpi("--rounds", 2, "--lr", 0.2, "--seed", 4, "--resume", out)
    _one_error_line(r, "lr", "seed")


def test_resume_path_keeps_the_runs_own_settings(tmp_path):
    """--resume PATH alone continues the run as it was started: settings the command
    leaves out come from the file (not the defaults); those it gives must match."""
    own = [*SMALL, "--lr", "0.2", "--seed", "4", "--batch-size", "5", "--server-optimizer",
           "adam", "--server-lr", "0.01"]
    ref, out = tmp_path / "ref.h5", tmp_path / "run.h5"
    run = [sys.executable, "-m", "fedmpi"]
    assert subprocess.run([*run, *own, "--rounds", "4", "--out", str(ref)],
                          capture_output=True, timeout=120).returncode == 0
    assert subprocess.run([*run, *own, "--rounds", "2", "--out", str(out)],
                          capture_output=True, timeout=120).returncode == 0
    r = subprocess.run([*run, "--resume", str(out), "--rounds", "4"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _same_run(ref, out)
    with h5py.File(out, "r") as f, h5py.File(ref, "r") as g:
        mine, theirs = json.loads(f.attrs["config"]), json.loads(g.attrs["config"])
        assert {k: v for k, v in mine.items() if k not in ("out", "resume")} == \
            {k: v for k, v in theirs.items() if k not in ("out", "resume")}
    # a setting given that differs from the run's is refused, with what to do
    line = _one_error_line(subprocess.run([*run, "--resume", str(out), "--rounds", "5",
                                           "--lr", "0.1"], capture_output=True, text=True,
                                          timeout=120), "lr", "0.2", "0.1")
    assert "leave such settings out" in line


def test_extension_equals_uninterrupted_run_and_records_segments(tmp_path):
    ref, out = tmp_path / "ref.h5", tmp_path / "run.h5"
    assert _fedmpi("--rounds", 5, "--out", ref).returncode == 0
    assert _fedmpi("--rounds", 2, "--out", out).returncode == 0
    # more rounds is allowed: it extends the finished run, here on 3 ranks
    cmd = [sys.executable, "-m", "fedmpi", *SMALL, "--rounds", "5", "--resume", str(out)]
    if MPIEXEC is not None:
        cmd = [MPIEXEC, "-n", "3", *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _same_run(ref, out)
    with h5py.File(out, "r") as f:
        # readers see the run as it now is: 5 rounds planned, the last segment's ranks
        assert json.loads(f.attrs["config"])["rounds"] == 5
        assert int(f.attrs["mpi_size"]) == (3 if MPIEXEC else 1)
        assert "--resume" in f.attrs["command"]
        segs = [f["segments"][k] for k in sorted(f["segments"], key=int)]
        assert [int(g.attrs["first_round"]) for g in segs] == [1, 3]
        assert [json.loads(g.attrs["config"])["rounds"] for g in segs] == [2, 5]
        assert [int(g.attrs["mpi_size"]) for g in segs] == [1, 3 if MPIEXEC else 1]
        assert "--resume" not in segs[0].attrs["command"]


def test_resume_refuses_fewer_rounds_than_done(tmp_path):
    out = tmp_path / "run.h5"
    assert _fedmpi("--rounds", 3, "--out", out).returncode == 0
    before = out.read_bytes()
    _one_error_line(_fedmpi("--rounds", 2, "--resume", out), "--rounds 2", "3 rounds")
    assert out.read_bytes() == before


def _drop_checkpoint(path):
    """What a run killed before its first checkpoint (--checkpoint-every N) leaves."""
    with h5py.File(path, "r+") as f:
        del f["checkpoint"]


def test_resume_auto_without_checkpoint_refuses_another_config(tmp_path):
    out = tmp_path / "run.h5"
    assert _fedmpi("--rounds", 2, "--out", out).returncode == 0
    _drop_checkpoint(out)
    before = out.read_bytes()
    _one_error_line(_fedmpi("--rounds", 2, "--lr", 0.3, "--out", out, "--resume", "auto"),
                    "lr", "0.3")
    assert out.read_bytes() == before
    # the same run's settings: it starts afresh in that file
    r = _fedmpi("--rounds", 2, "--out", out, "--resume", "auto")
    assert r.returncode == 0, r.stderr
    with h5py.File(out, "r") as f:
        assert list(f["rounds/round"][:]) == [1, 2] and "checkpoint" in f


def test_resume_refuses_other_data_naming_what_changed(tmp_path):
    from conftest import make_npz

    npz, out = tmp_path / "d.npz", tmp_path / "run.h5"
    make_npz(npz, seed=0)
    data = ["--dataset", f"npz:{npz}"]
    assert _fedmpi(*data, "--rounds", 2, "--out", out).returncode == 0
    make_npz(npz, seed=1)  # same shapes and settings, other samples
    _one_error_line(_fedmpi(*data, "--rounds", 3, "--resume", out), "train data", "test data")
    make_npz(npz, seed=0)
    with h5py.File(out, "r+") as f:  # as if written under another NumPy
        fp = json.loads(f.attrs["data_fingerprint"])
        fp["numpy"] = "1.0.0"
        f.attrs["data_fingerprint"] = json.dumps(fp)
    line = _one_error_line(_fedmpi(*data, "--rounds", 3, "--resume", out), "numpy", "1.0.0")
    assert "train data" not in line and "partition" not in line
    fp["numpy"] = np.__version__
    fp["partition"] = "0" * 16
    with h5py.File(out, "r+") as f:
        f.attrs["data_fingerprint"] = json.dumps(fp)
    _one_error_line(_fedmpi(*data, "--rounds", 3, "--resume", out), "partition")
    fp["partition"] = json.loads(h5py.File(out, "r")["segments/0"].attrs["data_fingerprint"])[
        "partition"]
    with h5py.File(out, "r+") as f:
        f.attrs["data_fingerprint"] = json.dumps(fp)
    r = _fedmpi(*data, "--rounds", 3, "--resume", out)
    assert r.returncode == 0, r.stderr


def test_damaged_checkpoint_is_refused_with_one_line(tmp_path):
    out = tmp_path / "run.h5"
    assert _fedmpi("--rounds", 2, "--out", out).returncode == 0
    with h5py.File(out, "r+") as f:
        slot = int(f["checkpoint"].attrs["current"])
        del f[f"checkpoint/slot{slot}"]
    _one_error_line(_fedmpi("--rounds", 3, "--resume", out), str(out), "checkpoint")


# -- the checkpoint API itself ---------------------------------------------------

def _writer(path):
    from fedmpi.results import ResultsWriter

    return ResultsWriter(str(path), overwrite=False, config={"rounds": 9},
                         attrs={"mpi_size": 1}, layer_sizes=[2, 1],
                         partition_sizes=np.array([3, 4]),
                         label_histogram=np.array([[1, 2], [4, 0]]))


def _write_round(w, r):
    w.append_round({"round": r, "loss": 1.0 / r})
    w.append_clients({"round": np.full(2, r), "client_id": np.array([0, 1])})
    w.flush()


def test_reopen_cuts_rows_after_the_checkpoint(tmp_path):
    from fedmpi.results import ResultsWriter, read_checkpoint, read_run

    path = tmp_path / "r.h5"
    states = {}
    with _writer(path) as w:
        for r in range(1, 8):
            _write_round(w, r)
            if r % 3 == 0:  # --checkpoint-every 3
                states[r] = {"params": np.arange(3, dtype=np.float32) + r,
                             "server_v": np.full(3, r / 7.0)}
                w.write_checkpoint(r, states[r])
    config, rnd, arrays = read_checkpoint(str(path))
    assert (config, rnd) == ({"rounds": 9}, 6)
    assert set(arrays) == {"params", "server_v"}
    for k, a in states[6].items():  # exact values, shapes and dtypes
        assert arrays[k].dtype == a.dtype and arrays[k].shape == a.shape
        assert np.array_equal(arrays[k], a)
    w, done, arrays = ResultsWriter.reopen(str(path), config={"rounds": 9}, attrs={"mpi_size": 2})
    with w:
        assert done == 6 and np.array_equal(arrays["params"], states[6]["params"])
        for r in range(7, 10):  # the cut round 7 is re-run, then the run goes on
            _write_round(w, r)
        w.write_checkpoint(9, states[6])
    run = read_run(str(path))
    assert run["rounds"]["round"].tolist() == list(range(1, 10))
    assert run["clients"]["round"].tolist() == [r for r in range(1, 10) for _ in range(2)]
    assert run["attrs"]["mpi_size"] == 2
    assert read_checkpoint(str(path))[1] == 9


def test_checkpoint_interrupted_mid_write_leaves_the_previous_one(tmp_path, monkeypatch):
    import h5py as h5

    from fedmpi.results import read_checkpoint

    path = tmp_path / "r.h5"
    w = _writer(path)
    _write_round(w, 1)
    w.write_checkpoint(1, {"params": np.ones(3, np.float32)})
    _write_round(w, 2)
    w.write_checkpoint(2, {"params": np.full(3, 2, np.float32)})
    _write_round(w, 3)
    # die after the new slot's data but before `current` switches to it
    real = h5.AttributeManager.__setitem__

    def die(self, name, value):
        if name == "current":
            raise KeyboardInterrupt
        real(self, name, value)

    monkeypatch.setattr(h5.AttributeManager, "__setitem__", die)
    with pytest.raises(KeyboardInterrupt):
        w.write_checkpoint(3, {"params": np.full(3, 3, np.float32)})
    monkeypatch.undo()
    w.close()
    _, rnd, arrays = read_checkpoint(str(path))
    assert rnd == 2 and np.array_equal(arrays["params"], np.full(3, 2, np.float32))


def test_sigterm_stops_with_a_checkpoint(tmp_path):
    out = tmp_path / "run.h5"
    p = subprocess.Popen([sys.executable, "-m", "fedmpi", *ARGS, "--rounds", "100000",
                          "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 120
    while _rows(out) < 3:
        assert time.time() < deadline and p.poll() is None
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=20)
    assert p.returncode == 128 + signal.SIGTERM
    assert "interrupted by SIGTERM" in err and "Traceback" not in err
    with h5py.File(out, "r") as f:
        n = len(f["rounds/round"])
        assert f["checkpoint"].attrs["round"] == n >= 3
