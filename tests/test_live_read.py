"""Reading a results file while its job writes it: every read succeeds, the job is undisturbed."""

import subprocess
import sys

import numpy as np

from fedmpi.results import load, read_run

# long enough for ~60 reads while it runs (a read takes ~50 ms, a round ~10 ms):
# 120 rounds left ~30, too close to the 20 the test asks for once rounds got faster
ROUNDS = 240
ARGS = [sys.executable, "-m", "fedmpi", "--rounds", str(ROUNDS), "--clients", "20",
        "--clients-per-round", "5", "--hidden", "32"]


def test_reads_during_a_run_succeed_and_do_not_disturb_it(tmp_path):
    ref, live = tmp_path / "ref.h5", tmp_path / "live.h5"
    subprocess.run([*ARGS, "--out", str(ref)], check=True, capture_output=True, timeout=120)
    job = subprocess.Popen([*ARGS, "--out", str(live)], stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        while job.poll() is None:
            if live.exists():
                run = load(str(live))  # raises on any failed read
                n = run.rounds_done
                assert len(run.metric("test_accuracy")) == n  # empty before round 1
                seen.append(n)
    finally:
        _, err = job.communicate(timeout=120)
    assert job.returncode == 0, err
    assert len(seen) > 20 and seen == sorted(seen)
    assert 0 < seen[len(seen) // 2] < ROUNDS  # read while rounds were being added
    a, b = read_run(str(ref)), read_run(str(live))
    assert np.array_equal(a["params"], b["params"])
    for k in ("test_accuracy", "test_loss", "train_loss"):
        assert np.array_equal(a["rounds"][k], b["rounds"][k])
