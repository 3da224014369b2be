"""Tests for fedmpi.analysis (Python API) and fedmpi.report (fedmpi-report CLI).

A module fixture makes four small real runs (2 partitions x 2 seeds, 4 rounds
each, one process); expected numbers are computed from the files with plain
h5py, independently of fedmpi's reader.
"""

import configparser
import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from fedmpi import analysis, report
from fedmpi.report import clients as report_clients
from fedmpi.report import plot as report_plot
from fedmpi.report._figure import DPI
from fedmpi.errors import UserError
from fedmpi.results import ResultsWriter, read_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROUNDS = 4
RUN_ARGS = ["--clients", "12", "--clients-per-round", "4", "--rounds", str(ROUNDS),
            "--hidden", "16"]
SPECS = [(p, s) for p in ("iid", "natural") for s in (0, 1)]
SUMMARY = ["rounds_done", "final_accuracy", "best_accuracy", "rounds_to_target",
           "seconds_to_target", "bytes_up", "bytes_down", "wall_seconds", "epsilon"]
# what `summary` prints when no run is differentially private: no epsilon column
SUMMARY_NO_DP = [c for c in SUMMARY if c != "epsilon"]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
    return env


def _fedmpi(out, partition, seed):
    cmd = [sys.executable, "-m", "fedmpi", *RUN_ARGS, "--partition", partition,
           "--seed", str(seed), "--out", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(out), env=_env(), start_new_session=True)


def _finish(proc, timeout=300):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{proc.args} did not finish in {timeout} s")
    assert proc.returncode == 0, f"{proc.args}\n{out[-2000:]}\n{err[-2000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{(partition, seed): path} of four finished runs in one directory."""
    d = tmp_path_factory.mktemp("runs")
    paths = {spec: str(d / f"{spec[0]}-s{spec[1]}.h5") for spec in SPECS}
    # The first run alone fills numba's on-disk cache; the others reuse it.
    _finish(_fedmpi(paths[SPECS[0]], *SPECS[0]))
    procs = [_fedmpi(paths[spec], *spec) for spec in SPECS[1:]]
    for proc in procs:
        _finish(proc)
    return paths


@pytest.fixture(scope="module")
def run_dir(runs):
    return os.path.dirname(next(iter(runs.values())))


def expected(path, target=None):
    """Summary numbers straight from the file with h5py."""
    with h5py.File(path, "r") as f:
        r = {k: f["rounds"][k][()] for k in f["rounds"]}
        config = json.loads(f.attrs["config"])
    acc = r["test_accuracy"]
    ok = acc[~np.isnan(acc)]
    row = {
        "rounds_done": len(r["round"]),
        "final_accuracy": float(ok[-1]),
        "best_accuracy": float(ok.max()),
        "rounds_to_target": None,
        "seconds_to_target": None,
        "bytes_up": int(r["bytes_up"].sum()),
        "bytes_down": int(r["bytes_down"].sum()),
        "wall_seconds": float(r["seconds"].sum()),
        "epsilon": float(r["epsilon"][-1]) if "epsilon" in r else None,
    }
    if target is not None:
        for i in range(len(acc)):
            if acc[i] >= target:
                row["rounds_to_target"] = int(r["round"][i])
                row["seconds_to_target"] = float(sum(r["seconds"][:i + 1]))
                break
    return row, config, r


def assert_summary_equal(got, want):
    for key in SUMMARY:
        if want[key] is None or isinstance(want[key], int):
            assert got[key] == want[key], key
        else:
            assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-15), key


def cli(*args, timeout=60):
    """python -m fedmpi.report ARGS in a subprocess."""
    return subprocess.run([sys.executable, "-m", "fedmpi.report", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=_env())


def call(capsys, *args):
    """report.main(ARGS) in this process: (status, stdout, stderr)."""
    status = report.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, err


def write_partial(src, dst, rows, config_update=None, drop=(), extra_rounds=None):
    """A copy of run src with only its first `rows` rounds and no final model,
    as a killed (or still running) job leaves it; `drop` omits round fields,
    `extra_rounds` ({field: values}) adds some."""
    data = read_run(src)
    config = dict(data["config"], **(config_update or {}))
    with ResultsWriter(str(dst), overwrite=True, config=config,
                       attrs={"mpi_size": 1, "command": "test"},
                       layer_sizes=data["layer_sizes"],
                       partition_sizes=data["partition"]["num_samples"],
                       label_histogram=data["partition"]["label_histogram"]) as w:
        for i in range(rows):
            w.append_round({**{k: v[i].item() for k, v in data["rounds"].items()
                               if k not in drop},
                            **{k: float(v[i]) for k, v in (extra_rounds or {}).items()}})
            sel = data["clients"]["round"] == data["rounds"]["round"][i]
            w.append_clients({k: v[sel] for k, v in data["clients"].items()})
            w.flush()
    return str(dst)


# -- analysis API --------------------------------------------------------------

def test_load_matches_h5py(runs):
    path = runs[("iid", 0)]
    run = analysis.load(path)
    want, config, rounds = expected(path)
    assert run.path == path
    assert run.config == config
    assert run.config["partition"] == "iid" and run.config["seed"] == 0
    assert run.attrs["layout_version"] == 1 and run.attrs["mpi_size"] == 1
    assert run.rounds_done == ROUNDS and run.finished
    for name, values in rounds.items():
        np.testing.assert_array_equal(np.asarray(run.rounds[name]), values)
    with h5py.File(path, "r") as f:
        np.testing.assert_array_equal(np.asarray(run.clients["client_id"]),
                                      f["clients/client_id"][()])
        np.testing.assert_array_equal(run.partition["num_samples"],
                                      f["partition/num_samples"][()])
        np.testing.assert_array_equal(run.params, f["model/params"][()])
        sizes = list(f["model"].attrs["layer_sizes"])
    assert run.layer_sizes == sizes
    layers = run.layers()
    assert [w.shape for w, _ in layers] == list(zip(sizes[:-1], sizes[1:]))
    assert [b.shape for _, b in layers] == [(n,) for n in sizes[1:]]
    assert np.shares_memory(layers[0][0], run.params)
    assert_summary_equal(run.summary(), want)


def test_without_pandas_tables_are_dicts_of_arrays(runs, run_dir, monkeypatch):
    monkeypatch.setattr(analysis, "_pandas", lambda: None)
    run = analysis.load(runs[("natural", 1)])
    assert isinstance(run.rounds, dict) and isinstance(run.clients, dict)
    assert list(run.rounds)[:3] == ["round", "test_accuracy", "test_loss"]
    assert all(isinstance(v, np.ndarray) for v in run.rounds.values())
    rows = analysis.load_many(os.path.join(run_dir, "*.h5"))
    assert isinstance(rows, list) and len(rows) == 4
    # every config key is a column, plus the summary
    assert set(run.config) <= set(rows[0]) and set(SUMMARY) <= set(rows[0])
    assert [r["path"] for r in rows] == sorted(runs.values())


def test_load_many_dataframe(runs, run_dir):
    pd = pytest.importorskip("pandas")
    df = analysis.load_many(os.path.join(run_dir, "*.h5"), target=0.5)
    assert isinstance(df, pd.DataFrame) and len(df) == 4
    assert list(df.columns[:1]) == ["path"] and list(df.columns[-len(SUMMARY):]) == SUMMARY
    for _, row in df.iterrows():
        want, config, _ = expected(row["path"], 0.5)
        assert row["seed"] == config["seed"] and row["lr"] == config["lr"]
        assert row["wall_seconds"] == pytest.approx(want["wall_seconds"], rel=1e-12)
    run = analysis.load(runs[("iid", 1)])
    assert isinstance(run.rounds, pd.DataFrame) and len(run.rounds) == ROUNDS
    assert isinstance(run.clients, pd.DataFrame)


def test_summarize_numbers_and_differing_keys(runs):
    paths = [runs[spec] for spec in SPECS]
    rows = analysis.summarize(paths)
    assert [list(r) for r in rows] == [["path", "partition", "seed", *SUMMARY]] * 4
    for (partition, seed), row in zip(SPECS, rows):
        want, _, _ = expected(row["path"])
        assert (row["partition"], row["seed"]) == (partition, seed)
        assert_summary_equal(row, want)
        assert row["rounds_to_target"] is None and row["seconds_to_target"] is None
    # the same runs given as Run objects, a glob and a directory
    by_glob = analysis.summarize(os.path.join(os.path.dirname(paths[0]), "*-s0.h5"))
    assert [r["path"] for r in by_glob] == sorted(runs[(p, 0)] for p in ("iid", "natural"))
    assert list(by_glob[0])[:2] == ["path", "partition"]  # seed is the same in both
    assert len(analysis.summarize([analysis.load(p) for p in paths])) == 4


def test_rounds_to_target(runs):
    paths = [runs[spec] for spec in SPECS]
    accs = np.concatenate([expected(p)[2]["test_accuracy"] for p in paths])
    # Targets equal to reached accuracies (>= must count equality), one in
    # between, and ones no run / every run reaches.
    targets = sorted({float(np.median(accs)), float(accs[5]), float(accs.max()),
                      float(accs.min()), 0.0, 1.0})
    reached_some = False
    for target in targets:
        for row in analysis.summarize(paths, target=target):
            want, _, rounds = expected(row["path"], target)
            assert_summary_equal(row, want)
            if want["rounds_to_target"] is not None:
                reached_some = True
                i = want["rounds_to_target"] - 1
                assert rounds["test_accuracy"][i] >= target
                assert np.all(rounds["test_accuracy"][:i] < target)
    assert reached_some
    row = analysis.summarize(paths[0], target=0.0)[0]
    assert row["rounds_to_target"] == 1
    assert row["seconds_to_target"] == pytest.approx(expected(paths[0])[2]["seconds"][0])
    with pytest.raises(UserError, match="fraction"):
        analysis.summarize(paths[0], target=80)


def test_killed_run(runs, tmp_path):
    path = write_partial(runs[("iid", 0)], tmp_path / "killed.h5", rows=2)
    run = analysis.load(path)
    assert run.rounds_done == 2 and run.rounds_planned == ROUNDS and not run.finished
    assert run.params is None
    with pytest.raises(UserError, match="no /model/params"):
        run.layers()
    want, _, _ = expected(path)
    assert_summary_equal(run.summary(), want)
    status_rows = analysis.summarize([path, runs[("iid", 0)]])
    assert [r["rounds_done"] for r in status_rows] == [2, ROUNDS]
    # no round written yet (job killed while loading data)
    empty = write_partial(runs[("iid", 0)], tmp_path / "empty.h5", rows=0)
    s = analysis.load(empty).summary(0.5)
    assert s["rounds_done"] == 0 and s["final_accuracy"] is None
    assert s["rounds_to_target"] is None and s["wall_seconds"] == 0 and s["bytes_up"] == 0


def test_differing_keys():
    a = {"lr": 0.1, "hidden": [16], "out": "a.h5", "overwrite": True, "seed": 0}
    b = {"lr": 0.1, "hidden": [16, 8], "out": "b.h5", "overwrite": False, "seed": 0,
         "extra": 1}
    assert analysis.differing_keys([a, b]) == ["hidden", "extra"]
    assert analysis.differing_keys([a, dict(a, out="c.h5")]) == []
    assert analysis.differing_keys([a]) == []


# -- summary command -----------------------------------------------------------

def test_summary_csv(runs, run_dir, capsys):
    target = float(np.median(np.concatenate(
        [expected(p)[2]["test_accuracy"] for p in runs.values()])))
    status, out, err = call(capsys, "summary", os.path.join(run_dir, "*.h5"),
                            "--target", repr(target), "--csv")
    assert status == 0 and err == ""
    table = list(csv.DictReader(io.StringIO(out)))
    assert list(table[0]) == ["path", "partition", "seed", *SUMMARY_NO_DP]
    assert len(table) == 4
    for row in table:
        want, config, _ = expected(row["path"], target)
        assert row["partition"] == config["partition"]
        assert int(row["seed"]) == config["seed"]
        for key in SUMMARY_NO_DP:
            if want[key] is None:
                assert row[key] == ""
            elif isinstance(want[key], int):
                assert int(row[key]) == want[key], key
            else:
                assert float(row[key]) == pytest.approx(want[key], rel=1e-12), key


def test_summary_text_and_markdown(runs, run_dir, tmp_path, capsys):
    killed = write_partial(runs[("iid", 0)], tmp_path / "killed.h5", rows=2)
    status, out, err = call(capsys, "summary", run_dir, killed)
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["path", "partition", "seed", "rounds_done", "final_accuracy",
                                "best_accuracy", "bytes_up", "bytes_down", "wall_seconds"]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 5
    # aligned: every column ends (numbers) or starts (text) at the same place
    ends = {len(line) for line in lines[2:]}
    assert len(ends) == 1
    by_path = {line.split()[0]: line.split() for line in lines[2:]}
    want, _, _ = expected(runs[("natural", 1)])
    row = by_path[runs[("natural", 1)]]
    assert row[1:4] == ["natural", "1", f"{ROUNDS}/{ROUNDS}"]
    assert row[4] == f"{want['final_accuracy']:.4f}"
    assert by_path[killed][3] == f"2/{ROUNDS}"

    status, out, err = call(capsys, "summary", run_dir, "--markdown", "--target", "0.5")
    assert status == 0
    lines = out.splitlines()
    assert all(line.startswith("|") and line.endswith("|") for line in lines)
    assert "rounds_to_target" in lines[0] and len(lines) == 2 + 4
    assert set(lines[1]) <= {"|", "-", ":"}


def test_summary_via_python_m_and_console_script_config(runs):
    res = cli("summary", runs[("iid", 0)], runs[("iid", 1)], "--csv")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines()[0].startswith("path,seed,rounds_done,")
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    scripts = cfg["options.entry_points"]["console_scripts"]
    assert "fedmpi-report = fedmpi.report:main" in scripts
    assert "matplotlib" in cfg["options.extras_require"]["plot"]


# -- errors --------------------------------------------------------------------

@pytest.fixture
def bad_inputs(runs, tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not HDF5\n")
    foreign = tmp_path / "other.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
        f.attrs["config"] = "{}"
    missing = write_partial(runs[("iid", 0)], tmp_path / "no_acc.h5", rows=2,
                            drop=("test_accuracy",))
    return {
        "not hdf5": (["summary", str(text)], "not an HDF5 file"),
        "other program": (["summary", str(foreign)], "not a fedmpi results file"),
        "missing dataset": (["summary", missing], "/rounds/test_accuracy"),
        "missing file": (["summary", str(tmp_path / "nope.h5")], "does not exist"),
        "glob matches nothing": (["summary", str(tmp_path / "zz*.h5")], "no files match"),
        "directory without runs": (["summary", str(tmp_path / "empty_dir")], "no *.h5"),
        "bad target": (["summary", runs[("iid", 0)], "--target", "80"], "fraction"),
        "bad flag": (["summary", runs[("iid", 0)], "--nope"], "unrecognized"),
        "no command": ([], "required"),
        "watch missing file": (["watch", str(tmp_path / "nope.h5")], "does not exist"),
        "watch bad interval": (["watch", runs[("iid", 0)], "--interval", "0"], "interval"),
        "plot bad y": (["plot", runs[("iid", 0)], "--y", "nope", "--out",
                        str(tmp_path / "a.png")], "no run has /rounds/nope"),
        "plot bad suffix": (["plot", runs[("iid", 0)], "--out", str(tmp_path / "a.gif")],
                            ".png, .svg or .pdf"),
        "plot bad group": (["plot", runs[("iid", 0)], "--group-by", "nope", "--out",
                            str(tmp_path / "a.png")], "no such config key"),
        "clients missing file": (["clients", str(tmp_path / "nope.h5")], "does not exist"),
        "clients several runs": (["clients", os.path.dirname(runs[("iid", 0)])],
                                 "clients shows one run, but got 4"),
        "clients not hdf5": (["clients", str(text)], "not an HDF5 file"),
        "clients bad every": (["clients", runs[("iid", 0)], "--every", "0"], "--every"),
        "clients bad top": (["clients", runs[("iid", 0)], "--top", "-1"], "--top"),
        "clients bad suffix": (["clients", runs[("iid", 0)], "--out",
                                str(tmp_path / "a.gif")], ".png, .svg or .pdf"),
        "clients bad dpi": (["clients", runs[("iid", 0)], "--dpi", "0", "--out",
                             str(tmp_path / "a.png")], "dpi must be positive"),
    }


CASES = ["not hdf5", "other program", "missing dataset", "missing file",
         "glob matches nothing", "directory without runs", "bad target", "bad flag",
         "no command", "watch missing file", "watch bad interval", "plot bad y",
         "plot bad suffix", "plot bad group", "clients missing file", "clients several runs",
         "clients not hdf5", "clients bad every", "clients bad top", "clients bad suffix",
         "clients bad dpi"]
NEEDS_MATPLOTLIB = {"plot bad y", "plot bad suffix", "plot bad group", "clients bad suffix",
                    "clients bad dpi"}


@pytest.mark.parametrize("case", CASES)
def test_bad_input_one_line_exit_2(case, bad_inputs, tmp_path, capsys):
    os.makedirs(tmp_path / "empty_dir", exist_ok=True)
    args, message = bad_inputs[case]
    if case in NEEDS_MATPLOTLIB and not _has_matplotlib():
        message = "pip install fedmpi[plot]"
    status, out, err = call(capsys, *args)
    assert status == 2
    assert out == ""
    assert err.count("\n") == 1 and err.startswith("fedmpi-report: error: ")
    assert message in err
    assert not (tmp_path / "a.png").exists() and not (tmp_path / "a.gif").exists()


def test_bad_input_subprocess_no_traceback(bad_inputs):
    for case in ("not hdf5", "other program", "missing dataset"):
        args, message = bad_inputs[case]
        res = cli(*args)
        assert res.returncode == 2, res.stderr
        assert res.stdout == ""
        assert "Traceback" not in res.stderr
        lines = res.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("fedmpi-report: error: ")
        assert message in lines[0] and args[-1] in lines[0]  # names the file


# -- plot ----------------------------------------------------------------------

def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_plot_png(runs, run_dir, tmp_path, capsys):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (pip install fedmpi[plot])")
    import matplotlib.image

    out = tmp_path / "fig" / "acc.png"  # directory created on demand
    status, stdout, err = call(capsys, "plot", os.path.join(run_dir, "*.h5"), "--out", out)
    assert status == 0, err
    assert err == ""
    assert out.stat().st_size > 1000
    img = matplotlib.image.imread(str(out))
    h, w = round(report_plot.FIGSIZE[1] * DPI), round(report_plot.FIGSIZE[0] * DPI)
    assert img.shape[:2] == (h, w)
    assert img[..., :3].std() > 0.05  # not blank
    # partitions are curves, seeds are averaged into them
    assert "partition=iid (mean, min-max of 2 seeds)" in stdout
    assert "partition=natural (mean, min-max of 2 seeds)" in stdout


def test_plot_curves_and_other_axes(runs, tmp_path, capsys):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (pip install fedmpi[plot])")
    paths = [runs[spec] for spec in SPECS]
    res = report_plot.plot_runs(paths, str(tmp_path / "a.svg"), x="seconds")
    assert res.labels == ["partition=iid (mean, min-max of 2 seeds)",
                          "partition=natural (mean, min-max of 2 seeds)"]
    assert res.notes == []
    assert (tmp_path / "a.svg").read_text().lstrip().startswith("<?xml")
    res = report_plot.plot_runs(paths, str(tmp_path / "b.pdf"), x="bytes_up", y="train_loss",
                           group_by=["partition", "seed"], dpi=50)
    assert res.labels == [f"partition={p}, seed={s}" for p, s in SPECS]
    assert (tmp_path / "b.pdf").read_bytes().startswith(b"%PDF")
    res = report_plot.plot_runs(paths, str(tmp_path / "c.png"), group_by=["seed"], dpi=40)
    assert res.labels == ["seed=0 (mean, min-max of 2 runs)", "seed=1 (mean, min-max of 2 runs)"]
    assert any("also differ in partition" in n for n in res.notes)
    killed = write_partial(runs[("iid", 1)], tmp_path / "killed.h5", rows=2)
    res = report_plot.plot_runs([runs[("iid", 0)], killed], str(tmp_path / "d.png"), dpi=40)
    assert res.labels == ["all runs (mean, min-max of 2 seeds)"]
    assert any("over the 2 rounds" in n for n in res.notes)


def test_epsilon_in_summary_and_on_the_x_axis(runs, tmp_path, capsys):
    """A DP run's privacy spent: the last /rounds/epsilon in the summary, and accuracy drawn
    against the per-round epsilon values themselves (not a cumulative sum)."""
    eps = np.array([0.4, 0.7, 0.95])
    dp = write_partial(runs[("iid", 0)], tmp_path / "dp.h5", rows=3, extra_rounds={"epsilon": eps},
                       config_update={"dp_clip": 1.0, "dp_noise_multiplier": 1.0})
    plain = runs[("iid", 1)]
    status, out, err = call(capsys, "summary", dp, plain, "--csv")
    assert status == 0 and err == ""
    table = {row["path"]: row for row in csv.DictReader(io.StringIO(out))}
    assert float(table[dp]["epsilon"]) == 0.95 and table[plain]["epsilon"] == ""
    status, out, _ = call(capsys, "summary", dp)
    assert out.splitlines()[0].split()[-1] == "epsilon" and out.split()[-1] == "0.95"
    if not _has_matplotlib():
        return
    res = report_plot.draw_runs([dp, plain], x="epsilon")
    (line,) = res.figure.axes[0].get_lines()
    acc = read_run(dp)["rounds"]["test_accuracy"]
    keep = ~np.isnan(acc)
    np.testing.assert_array_equal(line.get_xdata(), eps[keep])
    np.testing.assert_array_equal(line.get_ydata(), acc[keep])
    assert any("not a DP run" in n for n in res.notes)


def test_plot_without_matplotlib(runs, tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    status, out, err = call(capsys, "plot", runs[("iid", 0)], "--out", tmp_path / "a.png")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "pip install fedmpi[plot]" in err
    assert not (tmp_path / "a.png").exists()


# -- watch ---------------------------------------------------------------------

def _round_lines(text):
    return [line for line in text.splitlines() if line.startswith("round ")]


def test_watch_finished_run(runs):
    path = runs[("natural", 0)]
    res = cli("watch", path, "--interval", "0.05", timeout=30)
    assert res.returncode == 0, res.stderr
    lines = _round_lines(res.stdout)
    assert [line.split()[1] for line in lines] == [f"{r}/{ROUNDS}" for r in range(1, ROUNDS + 1)]
    want, _, rounds = expected(path)
    for line, acc in zip(lines, rounds["test_accuracy"]):
        assert f"test_acc {acc:.4f}" in line and "s/round" in line and "ETA" in line
    assert lines[-1].endswith("ETA 0:00:00")
    assert res.stdout.splitlines()[-1].startswith(f"finished: {ROUNDS} rounds")


def test_watch_follows_a_growing_file(runs, tmp_path):
    """A writer appends rounds while watch runs; watch prints each, then exits."""
    src = read_run(runs[("iid", 0)])
    path = str(tmp_path / "live.h5")
    w = ResultsWriter(path, overwrite=False, config=src["config"],
                      attrs={"mpi_size": 1, "command": "test"},
                      layer_sizes=src["layer_sizes"],
                      partition_sizes=src["partition"]["num_samples"],
                      label_histogram=src["partition"]["label_histogram"])
    proc = None
    try:
        w.flush()
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedmpi.report", "watch", path, "--interval", "0.05"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        header = proc.stdout.readline()  # watch has read the file once
        for i in range(ROUNDS):
            w.append_round({k: v[i].item() for k, v in src["rounds"].items()})
            w.flush()
            time.sleep(0.3)
        w.close()
        out, err = proc.communicate(timeout=30)
    finally:
        w.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert header.endswith("0 done; Ctrl-C stops watching\n")
    assert len(_round_lines(out)) == ROUNDS
    assert out.splitlines()[-1].startswith(f"finished: {ROUNDS} rounds")


def test_watch_ctrl_c_exits_0(runs, tmp_path):
    path = write_partial(runs[("iid", 0)], tmp_path / "stopped.h5", rows=2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmpi.report", "watch", path, "--interval", "0.1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        lines = []
        deadline = time.monotonic() + 30
        while len(_round_lines("\n".join(lines))) < 2 and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
        assert len(_round_lines("\n".join(lines))) == 2
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "Traceback" not in err and err == ""
    assert "finished" not in out


# -- clients -------------------------------------------------------------------

def client_expected(path):
    """Per-client numbers straight from the file with h5py."""
    with h5py.File(path, "r") as f:
        c = {k: f["clients"][k][()] for k in f["clients"]}
        sizes = f["partition/num_samples"][()]
        hist = f["partition/label_histogram"][()]
    counts = np.bincount(c["client_id"], minlength=len(sizes))
    labels = (hist > 0).sum(axis=1)
    per_round = {}
    for r in np.unique(c["round"]):
        loss = c["train_loss"][c["round"] == r]
        per_round[int(r)] = [len(loss), loss.min(), *np.percentile(loss, [25, 50, 75]),
                             loss.max()]
    return c, sizes, hist, counts, labels, per_round


def _mmm(values):
    """'min A  median B  max C' as clients prints it."""
    def num(v):
        v = float(v)
        return str(int(v)) if v.is_integer() else f"{v:.1f}"
    return f"min {num(np.min(values))}  median {num(np.median(values))}  max {num(np.max(values))}"


def _section(lines, start):
    i = next(i for i, line in enumerate(lines) if line.startswith(start))
    j = next((k for k in range(i + 1, len(lines)) if not lines[k].strip()), len(lines))
    return lines[i:j]


def test_client_api_matches_h5py(runs):
    path = runs[("natural", 0)]
    run = analysis.load(path)
    c, sizes, hist, counts, labels, per_round = client_expected(path)
    assert run.num_clients == len(sizes) == 12
    np.testing.assert_array_equal(run.participation(), counts)
    assert run.participation().sum() == ROUNDS * 4
    np.testing.assert_array_equal(run.labels_per_client(), labels)
    stats = run.client_loss_by_round()
    assert list(stats) == ["round", "clients", "min", "q25", "median", "q75", "max"]
    assert list(stats["round"]) == sorted(per_round)
    for i, r in enumerate(stats["round"]):
        got = [stats[k][i] for k in ("clients", "min", "q25", "median", "q75", "max")]
        np.testing.assert_allclose(got, per_round[int(r)], rtol=1e-12)
    np.testing.assert_array_equal(run.client_column("rank"), c["rank"])


@pytest.mark.parametrize("spec", [("iid", 0), ("natural", 1)])
def test_clients_text_matches_h5py(runs, spec, capsys):
    path = runs[spec]
    c, sizes, hist, counts, labels, per_round = client_expected(path)
    status, out, err = call(capsys, "clients", path, "--every", "1", "--top", "3")
    assert status == 0 and err == ""
    lines = out.splitlines()
    assert lines[0] == (f"{path}: synthetic, partition={spec[0]}, 12 clients, 4 per round, "
                        f"{ROUNDS}/{ROUNDS} rounds")

    part = _section(lines, "partition:")
    assert part[0] == (f"partition: {sizes.sum()} training samples of {hist.shape[1]} "
                       f"labels over 12 clients")
    assert part[1].split(None, 3)[3] == _mmm(sizes)
    assert part[2].split(None, 3)[3].startswith(_mmm(labels))

    par = _section(lines, "participation:")
    assert par[0] == f"participation: {ROUNDS * 4} client-rounds in {ROUNDS} rounds"
    assert par[1].split(None, 3)[3] == f"{_mmm(counts)}  mean {counts.mean():.2f}"
    never = np.flatnonzero(counts == 0)
    assert par[2].split()[2] == str(never.size)
    if never.size:
        assert par[2].split(": ", 1)[1] == ", ".join(map(str, never))
    # the table: header, 3 most sampled, "...", 3 least sampled, by (-rounds, id)
    assert par[4].split() == ["client", "rounds", "samples", "labels", "median_train_loss"]
    order = sorted(range(12), key=lambda i: (-counts[i], i))
    table = par[5:]
    assert len(table) == 7 and table[3].split() == ["...", "(6", "more", "clients)"]
    for row, i in zip(table[:3] + table[4:], order[:3] + order[-3:]):
        mine = c["train_loss"][c["client_id"] == i]
        want = [str(i), str(counts[i]), str(sizes[i]), str(labels[i]),
                f"{np.median(mine):.4f}" if mine.size else "-"]
        assert row.split() == want

    loss = _section(lines, "client train_loss per round")
    assert "all rounds" in loss[0]
    assert loss[1].split() == ["round", "clients", "min", "q25", "median", "q75", "max"]
    assert len(loss) == 2 + ROUNDS
    for row in loss[2:]:
        r, n, *values = row.split()
        want = per_round[int(r)]
        assert int(n) == want[0]
        assert values == [f"{v:.4f}" for v in want[1:]]


def test_clients_defaults_and_without_pandas(runs, capsys, monkeypatch):
    path = runs[("iid", 1)]
    status, out, _ = call(capsys, "clients", path)
    assert status == 0
    lines = out.splitlines()
    par = _section(lines, "participation:")
    assert len(par) == 5 + 2 * report_clients.CLIENTS_TOP + 1 and "(2 more clients)" in par[10]
    assert len(_section(lines, "client train_loss per round")) == 2 + ROUNDS
    monkeypatch.setattr(analysis, "_pandas", lambda: None)
    status, again, _ = call(capsys, "clients", path)
    assert status == 0 and again == out
    status, out, _ = call(capsys, "clients", path, "--top", "0", "--every", "3")
    lines = out.splitlines()
    assert not any("most and least" in line for line in lines)
    loss = _section(lines, "client train_loss per round")
    assert "every 3rd round and the last" in loss[0]
    assert [row.split()[0] for row in loss[2:]] == ["1", "4"]


def test_loss_rows():
    assert list(report_clients.loss_rows(0)) == []
    assert list(report_clients.loss_rows(4)) == [0, 1, 2, 3]
    assert list(report_clients.loss_rows(30)) == [*range(0, 30, 2), 29]
    assert len(report_clients.loss_rows(1000)) <= report_clients.LOSS_ROWS + 1
    assert list(report_clients.loss_rows(31, every=10)) == [0, 10, 20, 30]
    assert list(report_clients.loss_rows(32, every=10)) == [0, 10, 20, 30, 31]


def test_clients_killed_and_empty_runs(runs, tmp_path, capsys):
    killed = write_partial(runs[("iid", 0)], tmp_path / "killed.h5", rows=2)
    status, out, err = call(capsys, "clients", killed)
    assert status == 0 and err == ""
    assert f"2/{ROUNDS} rounds" in out.splitlines()[0]
    assert "participation: 8 client-rounds in 2 rounds" in out
    empty = write_partial(runs[("iid", 0)], tmp_path / "empty.h5", rows=0)
    status, out, err = call(capsys, "clients", empty)
    assert status == 0 and err == ""
    assert "participation: 0 client-rounds in 0 rounds" in out
    assert "never sampled        12 clients" in out
    assert out.rstrip().endswith("client train_loss per round: no rounds yet")
    if _has_matplotlib():
        status, out, err = call(capsys, "clients", empty, "--out", tmp_path / "e.png",
                                "--dpi", "30")
        assert status == 0 and "has no rounds yet" in err
        assert (tmp_path / "e.png").stat().st_size > 1000


def test_clients_figure(runs, tmp_path, capsys):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (pip install fedmpi[plot])")
    import matplotlib.image

    out = tmp_path / "fig" / "clients.png"  # directory created on demand
    status, stdout, err = call(capsys, "clients", runs[("natural", 0)], "--out", out)
    assert status == 0, err
    assert err == ""
    assert stdout.splitlines()[-1] == f"wrote {out}"
    assert "participation:" in stdout  # the text comes too
    assert out.stat().st_size > 1000
    img = matplotlib.image.imread(str(out))
    w, h = (round(v * DPI) for v in report_clients.CLIENTS_FIGSIZE)
    assert img.shape[:2] == (h, w)
    assert img[..., :3].std() > 0.05  # not blank
    notes = report_clients.plot_clients(runs[("iid", 0)], str(tmp_path / "c.svg"), dpi=40,
                                title="my title")
    assert notes == []
    svg = (tmp_path / "c.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "my title" in svg
    report_clients.plot_clients(analysis.load(runs[("iid", 1)]), str(tmp_path / "c.pdf"), dpi=40)
    assert (tmp_path / "c.pdf").read_bytes().startswith(b"%PDF")
    report_clients.plot_clients(runs[("iid", 0)], str(tmp_path / "small.png"), dpi=50)
    img = matplotlib.image.imread(str(tmp_path / "small.png"))
    assert img.shape[:2] == (round(report_clients.CLIENTS_FIGSIZE[1] * 50),
                             round(report_clients.CLIENTS_FIGSIZE[0] * 50))


def test_clients_without_matplotlib(runs, tmp_path, capsys, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.ticker"):
        monkeypatch.setitem(sys.modules, name, None)  # import fails
    status, out, err = call(capsys, "clients", runs[("iid", 0)], "--out", tmp_path / "a.png")
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and "pip install fedmpi[plot]" in err
    # text alone needs no matplotlib
    status, out, err = call(capsys, "clients", runs[("iid", 0)])
    assert status == 0 and "participation:" in out
