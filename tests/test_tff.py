"""Natural federated data in TensorFlow Federated's HDF5 layout (--dataset h5:PATH) and
the LEAF JSON converter (fedmpi-data convert). Every file here is made by the test."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from conftest import describe
from fedmpi.data import load_dataset
from fedmpi.data import leaf
from fedmpi.errors import UserError
from fedmpi.results import read_run

# deliberately unsorted, of unequal sizes: the run's client order is the sorted ids
USERS = {"f0003_40": 5, "f0000_14": 3, "f0001_07": 7}


def emnist_like(seed=0, users=USERS):
    """{user: (pixels float32 (n, 28, 28) = k/255, labels int32)}, as in TFF's EMNIST."""
    rng = np.random.default_rng(seed)
    return {u: ((rng.integers(0, 256, (n, 28, 28)) / 255.0).astype(np.float32),
                rng.integers(0, 10, n).astype(np.int32)) for u, n in users.items()}


def write_tff(path, data, x_name="pixels"):
    with h5py.File(path, "w") as f:
        for u, (x, y) in data.items():
            f.create_dataset(f"examples/{u}/{x_name}", data=x)
            f.create_dataset(f"examples/{u}/label", data=y)
    return str(path)


def pair(tmp_path, train, test, **kw):
    return f"h5:{write_tff(tmp_path / 'fed_train.h5', train, **kw)}," \
           f"{write_tff(tmp_path / 'fed_test.h5', test, **kw)}"


def load(spec):
    return load_dataset(spec, data_dir=None, seed=0, num_clients=1)


def test_round_trip_emnist_layout_as_pixel_bytes(tmp_path):
    train, test = emnist_like(0), emnist_like(1, {"f0009_01": 4, "f0000_14": 2})
    d = load(pair(tmp_path, train, test))
    ids = sorted(train)
    assert [c.decode() for c in d.client_ids] == ids
    np.testing.assert_array_equal(d.natural_sizes, [len(train[u][1]) for u in ids])
    # pixels k/255 are held as the bytes k, features = k * (1/255)
    want = np.concatenate([np.rint(train[u][0] * 255).reshape(-1, 784) for u in ids])
    assert d.x_train.dtype == np.uint8 and d.x_scale == pytest.approx(1 / 255)
    np.testing.assert_array_equal(d.x_train, want)
    np.testing.assert_array_equal(d.y_train, np.concatenate([train[u][1] for u in ids]))
    np.testing.assert_allclose(d.x_train * np.float32(d.x_scale),
                               np.concatenate([train[u][0].reshape(-1, 784) for u in ids]),
                               atol=1e-6)
    test_ids = sorted(test)
    np.testing.assert_array_equal(d.y_test, np.concatenate([test[u][1] for u in test_ids]))
    assert d.x_test.shape == (6, 784) and d.x_test.dtype == np.uint8
    assert d.num_classes == int(max(d.y_train.max(), d.y_test.max())) + 1


def test_memory_estimate_is_an_upper_bound_from_the_file_sizes(tmp_path):
    from fedmpi.data import footprint

    spec = pair(tmp_path, emnist_like(0), emnist_like(1))
    fp = footprint.estimate(spec, num_clients=3)
    d = load(spec)
    held = sum(a.nbytes for a in (d.x_train, d.y_train, d.x_test, d.y_test, d.natural_sizes))
    assert held <= fp.data_bytes and fp.train_samples >= len(d.x_train)
    bad = tmp_path / "bad_train.h5"
    with h5py.File(bad, "w") as f:
        f.create_dataset("examples", data=[1, 2])
    write_tff(tmp_path / "bad_test.h5", emnist_like(0))
    assert footprint.estimate(f"h5:{bad}", num_clients=3) is None  # the loader explains


def test_float_inputs_that_are_not_bytes_stay_float32(tmp_path):
    rng = np.random.default_rng(3)
    train = {u: (rng.normal(size=(n, 6)).astype(np.float32), rng.integers(0, 3, n))
             for u, n in USERS.items()}
    test = {"a": (rng.normal(size=(4, 6)).astype(np.float32), rng.integers(0, 3, 4))}
    d = load(pair(tmp_path, train, test))
    assert d.x_train.dtype == np.float32 and d.x_scale == 1.0
    np.testing.assert_array_equal(d.x_train, np.concatenate([train[u][0] for u in sorted(train)]))
    np.testing.assert_array_equal(d.x_test, test["a"][0])


def test_uint8_images_named_image_and_sibling_test_file(tmp_path):
    rng = np.random.default_rng(4)
    data = {u: (rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8), rng.integers(0, 5, n))
            for u, n in USERS.items()}
    write_tff(tmp_path / "cifar_train.h5", data, x_name="image")
    write_tff(tmp_path / "cifar_test.h5", data, x_name="image")
    d = load(f"h5:{tmp_path / 'cifar_train.h5'}")  # test file found by its name
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (15, 48)
    np.testing.assert_array_equal(d.x_test[:3], data["f0000_14"][0].reshape(3, 48))


@pytest.mark.parametrize("case, message", [
    ("not-hdf5", "is not a readable HDF5 file"),
    ("no-examples", "has no 'examples' group: it is not in TensorFlow Federated's layout"),
    ("shapes", "inconsistent feature shapes"),
    ("text", "holds text \\(snippets\\).*tokenizer"),
    ("features", "fedmpi reads image data: pixels or image and label"),
    ("labels", "labels must be one per example"),
    ("client-not-group", "examples/u2 is not a group with datasets pixels and label"),
    ("no-test", "does not exist \\(the test file"),
])
def test_bad_files_one_clear_error(tmp_path, case, message):
    good = emnist_like(0)
    train = tmp_path / "x_train.h5"
    if case == "not-hdf5":
        train.write_text("users,x,y\n")
    elif case == "no-examples":
        with h5py.File(train, "w") as f:
            f.create_dataset("pixels", data=np.zeros((3, 28, 28), np.float32))
    elif case == "shapes":
        bad = dict(good, f0001_07=(np.zeros((2, 27, 28), np.float32), np.zeros(2, np.int32)))
        write_tff(train, bad)
    elif case == "text":
        with h5py.File(train, "w") as f:
            f.create_dataset("examples/THE_TEMPEST_ARIEL/snippets", data=[b"Full fathom five"])
    elif case == "features":
        with h5py.File(train, "w") as f:
            f.create_dataset("examples/u1/pixelz", data=np.zeros((2, 3), np.float32))
            f.create_dataset("examples/u1/label", data=np.zeros(2, np.int32))
    elif case == "client-not-group":
        with h5py.File(train, "w") as f:
            f.create_dataset("examples/u1/pixels", data=np.zeros((2, 3), np.float32))
            f.create_dataset("examples/u1/label", data=np.zeros(2, np.int32))
            f.create_dataset("examples/u2", data=np.zeros(3))
    elif case == "labels":
        write_tff(train, {"u": (np.zeros((3, 4), np.float32), np.zeros(2, np.int32))})
    else:
        write_tff(train, good)
    if case != "no-test":
        write_tff(tmp_path / "x_test.h5", good)
    with pytest.raises(UserError, match=message):
        load(f"h5:{train}")


def test_bad_file_exits_2_with_one_line(run_fedmpi, tmp_path):
    train = tmp_path / "fed_train.h5"
    with h5py.File(train, "w") as f:
        f.create_group("clients")
    write_tff(tmp_path / "fed_test.h5", emnist_like(0))
    res = run_fedmpi(["--dataset", f"h5:{train}", "--clients", "3", "--clients-per-round", "2",
                      "--rounds", "1"], timeout=60)
    assert res.returncode == 2, describe(res)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "has no 'examples' group" in lines[0], res.stderr


# ------------------------------------------------------------------- LEAF


def write_leaf(directory, data_by_file):
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in data_by_file.items():
        doc = {"users": list(data), "num_samples": [len(y) for _, y in data.values()],
               "user_data": {u: {"x": x.reshape(len(x), -1).tolist(), "y": y.tolist()}
                             for u, (x, y) in data.items()}}
        (directory / name).write_text(json.dumps(doc))
    return str(directory)


def test_leaf_conversion_round_trip(tmp_path):
    data = emnist_like(5)
    first, second = dict(list(data.items())[:2]), dict(list(data.items())[2:])
    src = write_leaf(tmp_path / "train", {"all_data_0.json": first, "all_data_1.json": second})
    out = tmp_path / "femnist_train.h5"
    assert leaf.main(["convert", src, str(out)]) == 0
    with h5py.File(out, "r") as f:
        assert sorted(f["examples"]) == sorted(data)
        for u, (x, y) in data.items():
            assert f[f"examples/{u}/pixels"].shape == (len(y), 28, 28)
            np.testing.assert_array_equal(f[f"examples/{u}/pixels"][...], x)
            np.testing.assert_array_equal(f[f"examples/{u}/label"][...], y)
    # and fedmpi reads it: the converted test split too
    write_leaf(tmp_path / "test", {"t.json": emnist_like(6, {"z": 3})})
    assert leaf.main(["convert", str(tmp_path / "test"), str(tmp_path / "femnist_test.h5")]) == 0
    d = load(f"h5:{out}")
    np.testing.assert_array_equal(d.natural_sizes, [len(data[u][1]) for u in sorted(data)])
    np.testing.assert_array_equal(
        d.x_train, np.concatenate([np.rint(data[u][0] * 255).reshape(-1, 784) for u in sorted(data)]))


def test_leaf_numeric_vectors_keep_their_width(tmp_path):
    src = write_leaf(tmp_path / "s", {"a.json": {"u": (np.arange(6.0).reshape(2, 3), np.array([0, 1]))}})
    leaf.convert(src, str(tmp_path / "o.h5"))
    with h5py.File(tmp_path / "o.h5", "r") as f:
        np.testing.assert_array_equal(f["examples/u/pixels"][...], np.arange(6.0).reshape(2, 3))


@pytest.mark.parametrize("doc, message", [
    ({"users": ["a"], "user_data": {"a": {"x": ["hello"], "y": ["h"]}}}, "text"),
    ({"users": ["a", "b"], "user_data": {"a": {"x": [[1, 2]], "y": [0]},
                                         "b": {"x": [[1, 2, 3]], "y": [0]}}},
     "inconsistent feature shapes"),
    ({"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[1]], "y": [0]}}},
     "num_samples says 2"),
    ({"rows": []}, "is not a LEAF data file"),
])
def test_leaf_bad_input_exits_2(tmp_path, capsys, doc, message):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "d.json").write_text(json.dumps(doc))
    assert leaf.main(["convert", str(tmp_path / "in"), str(tmp_path / "o.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fedmpi-data: error: ") and message in err[0]
    assert not (tmp_path / "o.h5").exists()


def test_leaf_refuses_to_replace_without_overwrite(tmp_path, capsys):
    src = write_leaf(tmp_path / "s", {"a.json": {"u": (np.ones((1, 2)), np.array([0]))}})
    (tmp_path / "o.h5").write_text("keep me")
    assert leaf.main(["convert", src, str(tmp_path / "o.h5")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert leaf.main(["convert", src, str(tmp_path / "o.h5"), "--overwrite"]) == 0


# --------------------------------------------------------------- a whole run


def test_run_on_h5_data_records_the_client_ids(run_fedmpi, tmp_path, numba_warm):
    spec = pair(tmp_path, emnist_like(0), emnist_like(1, {"t": 4}))
    out = tmp_path / "run.h5"
    res = run_fedmpi(["--dataset", spec, "--clients", "3", "--clients-per-round", "2",
                      "--rounds", "2", "--hidden", "8", "--out", str(out)], ranks=2)
    assert res.returncode == 0, describe(res)
    run = read_run(str(out))
    assert run["config"]["partition"] == "natural"
    assert [c.decode() for c in run["partition"]["client_ids"]] == sorted(USERS)
    np.testing.assert_array_equal(run["partition"]["num_samples"],
                                  [USERS[u] for u in sorted(USERS)])
    res = run_fedmpi(["--dataset", spec, "--clients", "5", "--clients-per-round", "2",
                      "--rounds", "1"], timeout=60)
    assert res.returncode == 2 and "natural split has 3 clients but --clients is 5" in res.stderr
