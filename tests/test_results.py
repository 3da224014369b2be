"""Tests for fedmpi.results (HDF5 results file). No MPI; fast."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from fedmpi.errors import UserError
from fedmpi.results import (
    CLIENT_FIELDS, LAYOUT_VERSION, ROUND_FIELDS, ResultsWriter,
    check_output_path, layers_from_flat, read_run)

# Subprocesses import fedmpi from the source tree (it may not be installed).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYER_SIZES = [4, 3, 2]
NUM_PARAMS = 4 * 3 + 3 + 3 * 2 + 2
CONFIG = {"rounds": 3, "lr": 0.1, "data": {"name": "mnist"}}


def make_writer(path, **kw):
    args = dict(
        overwrite=False, config=CONFIG,
        attrs={"mpi_size": 4, "command": "fedmpi run x.toml"},
        layer_sizes=LAYER_SIZES,
        partition_sizes=np.array([10, 20, 30]),
        label_histogram=np.array([[5, 5], [10, 10], [0, 30]]))
    args.update(kw)
    return ResultsWriter(str(path), **args)


def round_row(r):
    evaluated = r % 2 == 1
    return {
        "round": r,
        "test_accuracy": 0.5 + 0.1 * r if evaluated else float("nan"),
        "test_loss": 1.0 / (r + 1) if evaluated else float("nan"),
        "train_loss": np.float32(2.0 - r),
        "num_clients": np.int32(3),
        "num_samples": 60,
        "seconds": 0.25,
        "bytes_up": 1000 * r,
        "bytes_down": 2000 * r,
        "extra_metric": 7.5,
    }


def client_cols(r):
    return {
        "round": np.full(3, r),
        "client_id": np.arange(3),
        "rank": np.array([1, 2, 1], dtype=np.int32),
        "num_samples": np.array([10, 20, 30]),
        "train_loss": np.array([0.1, 0.2, 0.3]) * (r + 1),
        "seconds": np.array([0.01, 0.02, 0.03], dtype=np.float32),
    }


def write_run(path, rounds=3):
    params = np.arange(NUM_PARAMS, dtype=np.float64) / 10
    with make_writer(path) as w:
        for r in range(rounds):
            w.append_round(round_row(r))
            w.append_clients(client_cols(r))
            w.flush()
        w.write_params("params", params * 0)  # replaced just below
        w.write_params("params", params)
    return params


def test_round_trip_plain_h5py(tmp_path):
    path = tmp_path / "run.h5"
    params = write_run(path)
    with h5py.File(path, "r") as f:
        assert f.attrs["layout_version"] == LAYOUT_VERSION
        assert json.loads(f.attrs["config"]) == CONFIG
        assert f.attrs["mpi_size"] == 4
        assert f.attrs["command"] == "fedmpi run x.toml"
        assert "fedmpi_version" in f.attrs and "created" in f.attrs

        rounds = f["rounds"]
        assert {len(ds) for ds in rounds.values()} == {3}
        assert set(rounds) == set(round_row(0))
        for name in ("round", "num_clients", "num_samples", "bytes_up"):
            assert rounds[name].dtype == np.int64, name
        for name in ("test_accuracy", "train_loss", "seconds"):
            assert rounds[name].dtype == np.float64, name
        assert rounds["round"][:].tolist() == [0, 1, 2]
        assert rounds["bytes_down"][:].tolist() == [0, 2000, 4000]
        acc = rounds["test_accuracy"][:]
        assert np.isnan(acc[0]) and np.isnan(acc[2])
        assert acc[1] == pytest.approx(0.6)
        for name, (units, desc) in ROUND_FIELDS.items():
            assert rounds[name].attrs["units"] == units
            assert rounds[name].attrs["description"] == desc
        assert rounds["extra_metric"].attrs["units"] == ""
        assert rounds["round"].is_scale
        assert rounds["test_loss"].dims[0][0] == rounds["round"]

        clients = f["clients"]
        assert {len(ds) for ds in clients.values()} == {9}
        assert clients["rank"].dtype == np.int64
        assert clients["seconds"].dtype == np.float64
        assert clients["round"][:].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        assert clients["train_loss"][6:].tolist() == pytest.approx(
            [0.3, 0.6, 0.9])
        for name, (units, _) in CLIENT_FIELDS.items():
            assert clients[name].attrs["units"] == units

        assert f["partition/num_samples"].dtype == np.int64
        assert f["partition/label_histogram"].shape == (3, 2)
        assert f["partition/label_histogram"].attrs["description"]

        assert f["model"].attrs["layer_sizes"].tolist() == LAYER_SIZES
        assert "row-major" in f["model"].attrs["description"]
        assert f["model/params"].dtype == np.float32
        np.testing.assert_allclose(f["model/params"][:], params, rtol=1e-6)


def test_round_trip_read_run(tmp_path):
    path = tmp_path / "run.h5"
    params = write_run(path)
    run = read_run(str(path))
    assert run["config"] == CONFIG
    assert run["attrs"]["mpi_size"] == 4
    assert run["attrs"]["layout_version"] == LAYOUT_VERSION
    assert run["layer_sizes"] == LAYER_SIZES
    assert run["rounds"]["num_samples"].tolist() == [60, 60, 60]
    assert run["clients"]["client_id"].tolist() == [0, 1, 2] * 3
    assert run["partition"]["num_samples"].tolist() == [10, 20, 30]
    np.testing.assert_allclose(run["params"], params, rtol=1e-6)

    layers = layers_from_flat(run["params"], run["layer_sizes"])
    assert [(w.shape, b.shape) for w, b in layers] == [
        ((4, 3), (3,)), ((3, 2), (2,))]
    w0, b0 = layers[0]
    np.testing.assert_allclose(w0[1, 2], params[1 * 3 + 2], rtol=1e-6)
    np.testing.assert_allclose(b0, params[12:15], rtol=1e-6)
    np.testing.assert_allclose(layers[1][1], params[-2:], rtol=1e-6)
    assert np.shares_memory(w0, run["params"])  # views, not copies


def test_read_run_before_any_round(tmp_path):
    path = tmp_path / "run.h5"
    make_writer(path).close()
    run = read_run(str(path))
    assert run["rounds"] == {} and run["clients"] == {}
    assert run["params"] is None
    assert run["layer_sizes"] == LAYER_SIZES


def test_append_round_rejects_changed_keys(tmp_path):
    with make_writer(tmp_path / "run.h5") as w:
        w.append_round({"round": 0, "train_loss": 1.0})
        with pytest.raises(ValueError):
            w.append_round({"round": 1})
        with pytest.raises(ValueError):
            w.append_round({"round": 1, "train_loss": 1.0, "other": 2})
        with pytest.raises(ValueError):  # int column, non-integer value
            w.append_round({"round": 1.5, "train_loss": 1.0})
        w.append_round({"round": 1, "train_loss": 2})  # int into float: ok
    rounds = read_run(str(tmp_path / "run.h5"))["rounds"]
    assert rounds["round"].tolist() == [0, 1]
    assert rounds["train_loss"].tolist() == [1.0, 2.0]


def test_append_clients_rejects_bad_columns(tmp_path):
    with make_writer(tmp_path / "run.h5") as w:
        with pytest.raises(ValueError):
            w.append_clients({"round": np.zeros(3, int),
                              "train_loss": np.zeros(2)})
        w.append_clients(client_cols(0))
        with pytest.raises(ValueError):
            w.append_clients({"round": np.zeros(3, int)})
    assert len(read_run(str(tmp_path / "run.h5"))["clients"]["round"]) == 3


def test_write_params_checks_length(tmp_path):
    with make_writer(tmp_path / "run.h5") as w:
        with pytest.raises(ValueError):
            w.write_params("params", np.zeros(NUM_PARAMS + 1))


def test_close_is_idempotent(tmp_path):
    w = make_writer(tmp_path / "run.h5")
    w.close()
    w.close()
    with pytest.raises(ValueError):
        w.append_round({"round": 0})


KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path[:0] = [{repo!r}, {tests_dir!r}]
    from test_results import make_writer, round_row, client_cols
    w = make_writer({path!r})
    for r in range(5):
        w.append_round(round_row(r))
        w.append_clients(client_cols(r))
        w.flush()
    # Dirty, unflushed state at the moment of death must not matter.
    w.append_round(round_row(5))
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_sigkilled_writer_leaves_readable_file(tmp_path):
    path = str(tmp_path / "killed.h5")
    code = KILLED_WRITER.format(repo=REPO, path=path,
                                tests_dir=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, timeout=60, cwd=REPO)
    assert proc.returncode == -9, proc.stderr
    with h5py.File(path, "r") as f:  # plain open, as any user would
        assert len(f["rounds/round"]) == 5
        assert f["rounds/round"][:].tolist() == [0, 1, 2, 3, 4]
        assert len(f["clients/round"]) == 15
    assert read_run(path)["rounds"]["seconds"].shape == (5,)


def test_check_output_path_existing_file(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"old")
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        check_output_path(str(path), overwrite=False)
    check_output_path(str(path), overwrite=True)
    assert path.read_bytes() == b"old"  # checking doesn't touch it
    with pytest.raises(UserError, match="already exists"):
        make_writer(path)
    make_writer(path, overwrite=True).close()
    assert read_run(str(path))["config"] == CONFIG


def test_check_output_path_creates_parents(tmp_path):
    path = tmp_path / "a" / "b" / "x.h5"
    check_output_path(str(path), overwrite=False)
    assert path.parent.is_dir()
    assert os.listdir(path.parent) == []  # no probe file left behind


def test_check_output_path_parent_is_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="not a directory"):
        check_output_path(str(blocker / "sub" / "x.h5"), overwrite=False)


def _as_unprivileged(fn) -> int:
    """fn()'s int result, computed as user nobody in a forked child if we are root
    (root ignores permissions), else right here."""
    if os.geteuid() != 0:
        return fn()
    pid = os.fork()
    if pid == 0:  # child: drop root for good, answer through the exit status
        status = 99
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            status = fn()
        finally:
            os._exit(status)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_check_output_path_unwritable_dir():
    # real permissions, also when the tests run as root (then as nobody in a child)
    import tempfile

    base = tempfile.mkdtemp(prefix="fedmpi-perm-")  # not under root's private tmp_path
    os.chmod(base, 0o755)
    locked = os.path.join(base, "ro")
    os.mkdir(locked, 0o555)
    os.chmod(locked, 0o555)

    def check() -> int:
        try:
            check_output_path(os.path.join(locked, "x.h5"), overwrite=False)
        except UserError as e:
            return 0 if "not writable" in str(e) else 2
        return 1

    try:
        assert _as_unprivileged(check) == 0
    finally:
        os.chmod(locked, 0o755)
        shutil.rmtree(base)


def test_check_output_path_unwritable_dir_any_user(tmp_path, monkeypatch):
    # Same as above but also runs as root: fake the probe file failing.
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("fedmpi.results.tempfile.TemporaryFile", refuse)
    with pytest.raises(UserError, match="not writable"):
        check_output_path(str(tmp_path / "x.h5"), overwrite=False)


def test_check_output_path_is_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        check_output_path(str(tmp_path), overwrite=True)


def test_overwrite_refuses_file_of_running_writer(tmp_path):
    # HDF5's mode "w" would truncate the running job's file before failing
    # on the lock; we must refuse without touching it.
    path = tmp_path / "run.h5"
    with make_writer(path) as w:
        w.append_round({"round": 0})
        w.flush()
        size = path.stat().st_size
        with pytest.raises(UserError, match="open in another process"):
            make_writer(path, overwrite=True)
        assert path.stat().st_size == size
    assert read_run(str(path))["rounds"]["round"].tolist() == [0]


def test_read_run_not_hdf5(tmp_path):
    path = tmp_path / "junk.h5"
    path.write_text("not hdf5\n")
    with pytest.raises(UserError, match="not an HDF5 file"):
        read_run(str(path))
    with pytest.raises(UserError, match="does not exist"):
        read_run(str(tmp_path / "missing.h5"))


def test_read_run_foreign_hdf5(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(UserError, match="not a fedmpi results file"):
        read_run(str(path))


def test_read_while_writer_open_same_process(tmp_path):
    path = tmp_path / "run.h5"
    with make_writer(path) as w:
        for r in range(2):
            w.append_round(round_row(r))
            w.append_clients(client_cols(r))
            w.flush()
        run = read_run(str(path))
        assert run["rounds"]["round"].tolist() == [0, 1]
        w.append_round(round_row(2))  # writer still works after the read
        w.flush()
    assert read_run(str(path))["rounds"]["round"].tolist() == [0, 1, 2]


def test_read_while_writer_open_other_process(tmp_path):
    # The real use: a tool reading the file of a job that is still running.
    path = tmp_path / "run.h5"
    code = ("import sys; from fedmpi.results import read_run; "
            "print(read_run(sys.argv[1])['rounds']['round'].tolist())")
    with make_writer(path) as w:
        for r in range(2):
            w.append_round(round_row(r))
            w.append_clients(client_cols(r))
            w.flush()
        proc = subprocess.run([sys.executable, "-c", code, str(path)],
                              capture_output=True, text=True, timeout=60,
                              cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == "[0, 1]"


def test_layers_from_flat_checks_length():
    with pytest.raises(ValueError):
        layers_from_flat(np.zeros(NUM_PARAMS - 1), LAYER_SIZES)


def test_writer_keeps_its_file_locked_without_hdf5_locking(tmp_path):
    """HDF5_USE_FILE_LOCKING=FALSE (set by some sites for every job) turns HDF5's lock
    off; the writer's own lock must still stop an --overwrite of its live file.
    (HDF5 reads the variable once, when the library starts: hence a subprocess.)"""
    path = tmp_path / "run.h5"
    writer = textwrap.dedent(f"""
        import sys
        import numpy as np
        from fedmpi.results import ResultsWriter
        w = ResultsWriter({str(path)!r}, overwrite=False, config={{}}, attrs={{}},
                          layer_sizes=[2, 1], partition_sizes=np.array([1]),
                          label_histogram=np.array([[1]]))
        print("open", flush=True)
        sys.stdin.readline()
        w.close()
    """)
    env = {**os.environ, "HDF5_USE_FILE_LOCKING": "FALSE", "PYTHONPATH": REPO}
    p = subprocess.Popen([sys.executable, "-c", writer], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert p.stdout.readline().strip() == "open"
        size = path.stat().st_size
        with pytest.raises(UserError, match="open in another process"):
            check_output_path(str(path), overwrite=True)
        with pytest.raises(UserError, match="open in another process"):
            make_writer(path, overwrite=True)
        assert path.stat().st_size == size
    finally:
        p.communicate("\n", timeout=30)
    assert p.returncode == 0
    check_output_path(str(path), overwrite=True)  # closed: free again


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "x.h5"
    os.mkfifo(fifo)
    for overwrite in (False, True):
        with pytest.raises(UserError, match="not a regular file"):
            check_output_path(str(fifo), overwrite=overwrite)
    with pytest.raises(UserError, match="not a regular file"):
        ResultsWriter.reopen(str(fifo))


@pytest.mark.parametrize("loss, units", [("cross_entropy", "nats"), ("mse", "1")])
def test_loss_units_follow_the_loss(tmp_path, loss, units):
    path = tmp_path / "run.h5"
    with make_writer(path, config={**CONFIG, "loss": loss}) as w:
        w.append_round({"round": 1, "test_loss": 0.5, "train_loss": 0.4})
        w.append_clients({"round": [1], "train_loss": [0.4]})
    with h5py.File(path, "r") as f:
        assert f["rounds/test_loss"].attrs["units"] == units
        assert f["rounds/train_loss"].attrs["units"] == units
        assert f["clients/train_loss"].attrs["units"] == units
        assert "cross-entropy" not in f["rounds/test_loss"].attrs["description"]
