"""Command line of ``python -m fedmpi``: bad input, --help, TOML config files.

Bad input of any kind must end the job with exit status 2 and exactly one
line ``fedmpi: error: ...`` on stderr -- no traceback, no rank left running --
alone and under ``mpiexec -n 4``. (Under mpiexec the launcher may add its own
notice about the non-zero exit -- Open MPI's does -- which is not fedmpi's to
suppress; `fedmpi_lines` tells the two apart.)
"""

from __future__ import annotations

import gzip
import json
import os
import re
from dataclasses import fields

import h5py
import numpy as np
import pytest

from conftest import (SMALL_SYNTHETIC, describe, fedmpi_lines, leftover_processes, make_npz,
                      requires_mpiexec)
from fedmpi.config import HELP_SECTIONS, Config
from fedmpi.data.idx import FILES

# Later flags win, so a case's own flags override these. Small, so that a
# case that wrongly does not fail still ends quickly.
BASE = SMALL_SYNTHETIC + ["--rounds", "2", "--hidden", "8"]


def _write_idx_gz(directory, n_train=10, n_test=5):
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for (split, kind), base in FILES.items():
        n = n_train if split == "train" else n_test
        if kind == "images":
            header = b"\0\0\x08\x03" + b"".join(v.to_bytes(4, "big") for v in (n, 4, 4))
            payload = rng.integers(0, 256, (n, 4, 4), dtype=np.uint8).tobytes()
        else:
            header = b"\0\0\x08\x01" + n.to_bytes(4, "big")
            payload = rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        with gzip.open(os.path.join(directory, base + ".gz"), "wb") as fh:
            fh.write(header + payload)


# Each case: tmp dir -> (extra args, substrings the error line must contain).
# A case that gives its own --out gets no default one.

def case_unknown_flag(d):
    return ["--no-such-flag", "3"], ["--no-such-flag"]


def case_rounds_negative(d):
    return ["--rounds", "-1"], ["--rounds"]


def case_round_timeout_negative(d):
    return ["--round-timeout", "-5"], ["--round-timeout", "-5"]


def case_rounds_not_int(d):
    return ["--rounds", "abc"], ["--rounds", "abc"]


def case_per_round_above_clients(d):
    return ["--clients", "5", "--clients-per-round", "6"], ["--clients-per-round"]


def case_hidden_malformed(d):
    return ["--hidden", "12,x"], ["--hidden", "12,x"]


def case_dataset_missing(d):
    empty = d / "empty"
    empty.mkdir()
    return ["--dataset", "mnist", "--data-dir", empty], [str(empty)]


def case_idx_truncated_gzip(d):
    idx = d / "idx"
    _write_idx_gz(idx)
    path = idx / (FILES[("train", "images")] + ".gz")
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return ["--dataset", "fashion-mnist", "--data-dir", idx], [str(path)]


def case_npz_truncated(d):
    path = d / "data.npz"
    make_npz(path)
    raw = path.read_bytes()
    path.write_bytes(raw[:len(raw) // 2])
    return ["--dataset", f"npz:{path}"], [str(path)]


def case_npz_garbage(d):
    path = d / "data.npz"
    path.write_bytes(np.random.default_rng(0).bytes(3000))
    return ["--dataset", f"npz:{path}"], [str(path)]


def case_fewer_samples_than_clients(d):
    path = d / "tiny.npz"
    make_npz(path, n_train=5, n_test=5)
    return ["--dataset", f"npz:{path}", "--clients", "10", "--clients-per-round", "3"], ["--clients"]


def case_out_exists(d):
    out = d / "old.h5"
    out.write_bytes(b"previous results")
    return ["--out", out], [str(out), "--overwrite"]


def case_out_in_proc(d):
    return ["--out", "/proc/x/y.h5"], ["/proc/x/y.h5"]


def case_out_below_file(d):
    (d / "plainfile").write_text("x")
    out = d / "plainfile" / "sub" / "run.h5"
    return ["--out", out], [str(out)]


def case_out_name_too_long(d):
    # Passes every early check of the path (the directory is writable); only
    # creating the file itself fails (ENAMETOOLONG).
    out = d / ("r" * 300 + ".h5")
    return ["--out", out], [str(out)]


def case_out_fifo(d):
    # opening a FIFO for reading waits for a writer forever: refused before any open
    fifo = d / "fifo.h5"
    os.mkfifo(fifo)
    return ["--out", fifo, "--overwrite"], [str(fifo), "not a regular file"]


def case_resume_fifo(d):
    fifo = d / "fifo.h5"
    os.mkfifo(fifo)
    return ["--out", fifo, "--resume", fifo], [str(fifo), "not a regular file"]


def case_resume_auto_fifo(d):
    fifo = d / "fifo.h5"
    os.mkfifo(fifo)
    return ["--out", fifo, "--resume", "auto"], [str(fifo), "not a regular file"]


def case_trimmed_mean_trims_nothing(d):
    return ["--aggregator", "trimmed_mean", "--trim", "0.1"], ["--trim", "= 0 updates"]


def case_lr_not_finite(d):
    return ["--lr", "nan"], ["--lr", "finite"]


def case_toml_not_finite(d):
    path = d / "inf.toml"
    path.write_text("server-lr = inf\n")
    return ["--config", path], ["--server-lr", "finite"]


def case_toml_malformed(d):
    path = d / "bad.toml"
    path.write_text("rounds = = 3\n[unclosed\n")
    return ["--config", path], [str(path)]


def case_toml_unknown_key(d):
    path = d / "unknown.toml"
    path.write_text("rounds = 2\nlearning_rate = 0.1\n")
    return ["--config", path], [str(path), "learning_rate"]


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
# mpiexec -n 4 for one case of each way of failing: argparse, conversion,
# validation, TOML, data loading on the node leader, partition, output path on
# rank 0. (Every case under 4 ranks costs ~2 s each on two cores.)
MPI_CASES = ["unknown_flag", "rounds_not_int", "per_round_above_clients", "dataset_missing",
             "idx_truncated_gzip", "npz_truncated", "fewer_samples_than_clients", "out_exists",
             "out_below_file", "out_name_too_long", "toml_unknown_key", "resume_fifo"]

PARAMS = [pytest.param(name, 1, id=f"{name}-n1") for name in CASES] + [
    pytest.param(name, 4, id=f"{name}-n4", marks=requires_mpiexec) for name in MPI_CASES]


def assert_one_error_line(res, must_contain=()):
    assert res.returncode == 2, describe(res)
    assert "Traceback" not in res.stderr, describe(res)
    lines = fedmpi_lines(res.stderr)
    assert len(lines) == 1, describe(res)
    assert lines[0].startswith("fedmpi: error: "), describe(res)
    for text in must_contain:
        assert text in lines[0], f"{text!r} not in the error line\n{describe(res)}"


@pytest.mark.parametrize("name, ranks", PARAMS)
def test_bad_input(run_fedmpi, tmp_path, name, ranks):
    args, expect = CASES[name](tmp_path)
    default_out = tmp_path / "out.h5"
    if "--out" not in args:
        args = args + ["--out", default_out]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    res = run_fedmpi(BASE + [str(a) for a in args], ranks=ranks, timeout=30)
    assert_one_error_line(res, expect)
    assert not leftover_processes(res.token), f"processes left running after\n{describe(res)}"
    # Nothing written: no results file, existing files untouched.
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.parametrize("ranks", [1, pytest.param(4, marks=requires_mpiexec)])
def test_help_lists_every_option_with_default(run_fedmpi, ranks):
    res = run_fedmpi(["--help"], ranks=ranks, timeout=60)
    assert res.returncode == 0, describe(res)
    assert res.stderr == "", describe(res)
    assert res.stdout.count("usage:") == 1, describe(res)  # printed by rank 0 only
    # argparse's option blocks: a line starting "  --flag", then its help lines.
    blocks = {}
    for block in re.split(r"\n(?=  -)", res.stdout):
        m = re.match(r"\s*(?:-\w, )?(--[\w-]+)", block)
        if m:
            blocks[m.group(1)] = " ".join(block.split())
    assert "--config" in blocks
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        assert flag in blocks, f"{flag} missing from --help\n{res.stdout}"
        assert "(default:" in blocks[flag], f"{flag} shows no default: {blocks[flag]}"
    # the options come in sections, in Config's order
    titles = [line[:-1] for line in res.stdout.splitlines() if line.endswith(":")
              and not line.startswith(" ")]
    assert titles == ["options", *HELP_SECTIONS.values()], titles


@pytest.mark.parametrize("ranks", [1, pytest.param(3, marks=requires_mpiexec)])
def test_toml_config_values_used_and_flags_override(run_fedmpi, tmp_path, ranks):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'dataset = "synthetic"\n'
        "clients = 12\n"
        "clients-per-round = 4\n"   # '-' spelling
        "rounds = 5\n"
        "lr = 0.02\n"
        "hidden = [8, 4]\n"
        "seed = 5\n"
        "eval_every = 2\n")
    out = tmp_path / "run.h5"
    res = run_fedmpi(["--config", toml, "--rounds", "2", "--seed", "7", "--out", out],
                     ranks=ranks)
    assert res.returncode == 0, describe(res)
    with h5py.File(out, "r", locking=False) as f:
        config = json.loads(f.attrs["config"])
        assert f["rounds/round"].shape == (2,)
        assert list(f["model"].attrs["layer_sizes"][1:-1]) == [8, 4]
    assert config["rounds"] == 2 and config["seed"] == 7         # flags win
    assert config["clients"] == 12 and config["clients_per_round"] == 4  # from the file
    assert config["lr"] == 0.02 and config["hidden"] == [8, 4] and config["eval_every"] == 2
    assert config["batch_size"] == Config().batch_size            # built-in default
    assert config["out"] == str(out)
