"""Tests of the data loaders in fedmpi.data (pure numpy, no MPI)."""

import gzip
import os

import numpy as np
import pytest

from fedmpi.data import Dataset, load_dataset
from fedmpi.data.idx import FILES
from fedmpi.data.partition import make_partition
from fedmpi.errors import UserError

SYSTEM_FASHION = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------- IDX


def idx_images(x: np.ndarray) -> bytes:
    n, rows, cols = x.shape
    header = (0x00000803).to_bytes(4, "big") + b"".join(v.to_bytes(4, "big") for v in (n, rows, cols))
    return header + x.astype(np.uint8).tobytes()


def idx_labels(y: np.ndarray) -> bytes:
    header = (0x00000801).to_bytes(4, "big") + len(y).to_bytes(4, "big")
    return header + y.astype(np.uint8).tobytes()


def write_idx_set(directory, *, gz: bool, n_train=12, n_test=5, rows=4, cols=3, seed=0):
    """Write a tiny IDX data set; return the arrays written."""
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    arrays = {
        ("train", "images"): rng.integers(0, 256, (n_train, rows, cols)),
        ("train", "labels"): rng.integers(0, 10, n_train),
        ("test", "images"): rng.integers(0, 256, (n_test, rows, cols)),
        ("test", "labels"): rng.integers(0, 10, n_test),
    }
    for key, base in FILES.items():
        data = idx_images(arrays[key]) if key[1] == "images" else idx_labels(arrays[key])
        if gz:
            with gzip.open(os.path.join(directory, base + ".gz"), "wb") as f:
                f.write(data)
        else:
            with open(os.path.join(directory, base), "wb") as f:
                f.write(data)
    return arrays


def load_idx_dir(directory, name="fashion-mnist") -> Dataset:
    return load_dataset(name, data_dir=str(directory), seed=0, num_clients=1)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arrays = write_idx_set(tmp_path, gz=gz)
    d = load_idx_dir(tmp_path)
    assert d.name == "fashion-mnist"
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (12, 12)
    assert d.x_train.flags.c_contiguous and d.x_train.flags.writeable
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    np.testing.assert_array_equal(d.x_train, arrays[("train", "images")].reshape(12, 12))
    np.testing.assert_array_equal(d.y_train, arrays[("train", "labels")])
    np.testing.assert_array_equal(d.x_test, arrays[("test", "images")].reshape(5, 12))
    np.testing.assert_array_equal(d.y_test, arrays[("test", "labels")])
    assert d.num_classes == 10
    assert d.x_scale == pytest.approx(1 / 255)
    assert d.natural_sizes is None


def _assert_loaded(d: Dataset, arrays) -> None:
    np.testing.assert_array_equal(d.x_train, arrays[("train", "images")].reshape(len(d.x_train), -1))
    np.testing.assert_array_equal(d.y_train, arrays[("train", "labels")])
    np.testing.assert_array_equal(d.x_test, arrays[("test", "images")].reshape(len(d.x_test), -1))
    np.testing.assert_array_equal(d.y_test, arrays[("test", "labels")])


def test_idx_gz_cache(tmp_path, monkeypatch):
    """A .gz file is decompressed once into $XDG_CACHE_HOME/fedmpi/idx; a replaced
    source is never served from its predecessor's copy, whose file is removed."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cache = tmp_path / "cache" / "fedmpi" / "idx"
    arrays = write_idx_set(tmp_path / "d", gz=True, seed=3)
    _assert_loaded(load_idx_dir(tmp_path / "d"), arrays)
    names = sorted(os.listdir(cache))
    assert len(names) == 4 and not any(n.startswith(".tmp") for n in names)
    for base in FILES.values():  # each copy is the decompressed source, byte for byte
        [name] = [n for n in names if n.startswith(base + "-")]
        src = tmp_path / "d" / (base + ".gz")
        assert (cache / name).read_bytes() == gzip.decompress(src.read_bytes())
    d = load_idx_dir(tmp_path / "d")  # from the cache
    _assert_loaded(d, arrays)
    assert d.x_train.flags.writeable
    # a new download with other contents (and size) in the same place
    arrays = write_idx_set(tmp_path / "d", gz=True, seed=4, n_train=13)
    _assert_loaded(load_idx_dir(tmp_path / "d"), arrays)
    assert len(os.listdir(cache)) == 4 and sorted(os.listdir(cache)) != names


def test_idx_gz_cache_damaged_copy_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    arrays = write_idx_set(tmp_path / "d", gz=True, seed=5)
    load_idx_dir(tmp_path / "d")
    cache = tmp_path / "cache" / "fedmpi" / "idx"
    for name in os.listdir(cache):  # cut every copy short
        data = (cache / name).read_bytes()
        (cache / name).write_bytes(data[:-3])
    _assert_loaded(load_idx_dir(tmp_path / "d"), arrays)


def test_idx_gz_cache_unwritable(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    arrays = write_idx_set(tmp_path / "d", gz=True, seed=6)
    _assert_loaded(load_idx_dir(tmp_path / "d"), arrays)  # decompressed in memory
    assert blocker.read_text().startswith("a file")


def test_idx_prefers_raw_over_gz(tmp_path):
    raw = write_idx_set(tmp_path, gz=False, seed=1)
    write_idx_set(tmp_path, gz=True, seed=2)
    np.testing.assert_array_equal(load_idx_dir(tmp_path).y_train, raw[("train", "labels")])


def test_idx_default_search_uses_cwd_data_dir(tmp_path, monkeypatch):
    arrays = write_idx_set(tmp_path / "data" / "mnist", gz=True)
    monkeypatch.chdir(tmp_path)
    d = load_dataset("mnist", data_dir=None, seed=0, num_clients=1)
    assert d.name == "mnist"
    np.testing.assert_array_equal(d.y_test, arrays[("test", "labels")])


@pytest.mark.skipif(not os.path.isdir(SYSTEM_FASHION), reason="Fashion-MNIST not installed")
def test_real_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # make sure ./data/fashion-mnist is not picked up instead
    d = load_dataset("fashion-mnist", data_dir=None, seed=0, num_clients=10)
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784)
    assert d.x_train.dtype == np.uint8
    assert set(np.unique(d.y_train)) == set(range(10))
    assert set(np.unique(d.y_test)) == set(range(10))
    assert d.x_train.max() > 200


def test_idx_missing_files_lists_directories(tmp_path):
    with pytest.raises(UserError) as e:
        load_idx_dir(tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "train-images-idx3-ubyte" in msg


def test_idx_missing_default_dirs_mentions_all(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError) as e:
        load_dataset("mnist", data_dir=None, seed=0, num_clients=1)
    msg = str(e.value)
    assert os.path.join("data", "mnist") in msg and "/usr/share/datasets/mnist" in msg
    assert "--data-dir" in msg


def test_idx_one_file_missing(tmp_path):
    write_idx_set(tmp_path, gz=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(UserError, match="missing t10k-labels-idx1-ubyte"):
        load_idx_dir(tmp_path)


def test_idx_fashion_missing_mentions_apt(tmp_path):
    with pytest.raises(UserError, match="apt-get install dataset-fashion-mnist"):
        load_idx_dir(tmp_path)


def test_idx_truncated_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True, n_train=500)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz is not a valid gzip file"):
        load_idx_dir(tmp_path)


def test_idx_not_gzip(tmp_path):
    write_idx_set(tmp_path, gz=True)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"<html>404 not found</html>")
    with pytest.raises(UserError, match="not a valid gzip file"):
        load_idx_dir(tmp_path)


def test_idx_wrong_magic(tmp_path):
    write_idx_set(tmp_path, gz=False)
    # labels file where the images should be
    os.replace(tmp_path / "t10k-labels-idx1-ubyte", tmp_path / "t10k-images-idx3-ubyte")
    write_idx_set(tmp_path / "tmp", gz=False)
    os.replace(tmp_path / "tmp" / "t10k-labels-idx1-ubyte", tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(UserError, match=r"t10k-images-idx3-ubyte is not an IDX images file: magic number is 0x00000801"):
        load_idx_dir(tmp_path)


def test_idx_truncated_payload(tmp_path):
    write_idx_set(tmp_path, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(data[:-7]))
    with pytest.raises(UserError, match=r"is truncated: header says 12 images of 4x3 but file holds 137 bytes of pixels"):
        load_idx_dir(tmp_path)


def test_idx_count_mismatch(tmp_path):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_labels(np.zeros(11)))
    with pytest.raises(UserError, match="12 images but .* 11 labels"):
        load_idx_dir(tmp_path)


def test_idx_label_out_of_range(tmp_path):
    write_idx_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_labels(np.array([0, 1, 12, 3, 4])))
    with pytest.raises(UserError, match="label 12"):
        load_idx_dir(tmp_path)


# --------------------------------------------------------------------- npz


def test_npz_roundtrip_uint8_images(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, (20, 5, 5), dtype=np.uint8)
    x_test = rng.integers(0, 256, (6, 5, 5), dtype=np.uint8)
    y_train = rng.integers(0, 3, 20)
    y_test = np.array([0, 1, 4, 2, 2, 1], dtype=np.int64)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    d = load_dataset(f"npz:{path}", data_dir=None, seed=0, num_clients=1)
    assert d.x_train.dtype == np.uint8 and d.x_train.shape == (20, 25) and d.x_train.flags.c_contiguous
    np.testing.assert_array_equal(d.x_test, x_test.reshape(6, 25))
    np.testing.assert_array_equal(d.y_train, y_train)
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    assert d.num_classes == 5  # max label over train and test, plus one
    assert d.x_scale == pytest.approx(1 / 255)


def test_npz_float_features(tmp_path):
    path = tmp_path / "d.npz"
    x = np.arange(12, dtype=np.float64).reshape(4, 3)
    np.savez_compressed(path, x_train=x, y_train=np.array([0, 1, 0, 1]), x_test=x[:2], y_test=np.array([1.0, 0.0]))
    d = load_dataset(f"npz:{path}", data_dir=None, seed=0, num_clients=1)
    assert d.x_train.dtype == np.float32 and d.x_scale == 1.0
    np.testing.assert_array_equal(d.x_train, x)
    assert d.num_classes == 2


def npz_error(tmp_path, **arrays) -> str:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(UserError) as e:
        load_dataset(f"npz:{path}", data_dir=None, seed=0, num_clients=1)
    return str(e.value)


def test_npz_missing_keys(tmp_path):
    msg = npz_error(tmp_path, x_train=np.zeros((2, 2)), y_train=np.zeros(2, int))
    assert "x_test" in msg and "y_test" in msg


def test_npz_length_mismatch(tmp_path):
    x = np.zeros((3, 2))
    msg = npz_error(tmp_path, x_train=x, y_train=np.zeros(2, int), x_test=x, y_test=np.zeros(3, int))
    assert "3 samples but y_train has 2" in msg


def test_npz_bad_labels(tmp_path):
    x = np.zeros((2, 2))
    assert "non-integer" in npz_error(tmp_path, x_train=x, y_train=np.array([0.5, 1]), x_test=x, y_test=np.array([0, 1]))
    assert "negative" in npz_error(tmp_path, x_train=x, y_train=np.array([0, 1]), x_test=x, y_test=np.array([-1, 1]))


def test_npz_garbage_and_missing_file(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(b"this is not a zip archive at all" * 10)
    with pytest.raises(UserError, match="not a valid .npz archive"):
        load_dataset(f"npz:{path}", data_dir=None, seed=0, num_clients=1)
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"npz:{tmp_path / 'absent.npz'}", data_dir=None, seed=0, num_clients=1)


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown data set 'cifar10'.*synthetic.*fashion-mnist.*mnist.*npz:PATH"):
        load_dataset("cifar10", data_dir=None, seed=0, num_clients=1)


# --------------------------------------------------------------- synthetic


def synthetic(num_clients=30, seed=0, a=1.0, b=1.0) -> Dataset:
    return load_dataset(
        "synthetic", data_dir=None, seed=seed, num_clients=num_clients, synthetic_alpha=a, synthetic_beta=b
    )


def test_synthetic_shapes_and_types():
    d = synthetic()
    assert d.name == "synthetic" and d.num_classes == 10 and d.x_scale == 1.0
    assert d.x_train.dtype == np.float32 and d.x_train.shape[1] == 60 and d.x_train.flags.c_contiguous
    assert d.x_test.dtype == np.float32 and d.x_test.shape[1] == 60
    assert d.y_train.dtype == np.int32 and d.y_test.dtype == np.int32
    assert d.natural_sizes.dtype == np.int64 and len(d.natural_sizes) == 30
    assert d.natural_sizes.sum() == len(d.x_train) == len(d.y_train)
    assert len(d.x_test) == len(d.y_test)
    assert d.natural_sizes.min() >= 40
    assert ((d.y_train >= 0) & (d.y_train < 10)).all() and ((d.y_test >= 0) & (d.y_test < 10)).all()
    # 80/20 per client, so about a quarter as many test as training samples
    assert 0.2 < len(d.x_test) / len(d.x_train) < 0.3


def test_synthetic_deterministic():
    a, b, c = synthetic(seed=7), synthetic(seed=7), synthetic(seed=8)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    np.testing.assert_array_equal(a.natural_sizes, b.natural_sizes)
    assert not np.array_equal(a.natural_sizes, c.natural_sizes)


def test_synthetic_clients_independent_of_client_count():
    small, large = synthetic(num_clients=5), synthetic(num_clients=12)
    n = small.natural_sizes.sum()
    np.testing.assert_array_equal(large.natural_sizes[:5], small.natural_sizes)
    np.testing.assert_array_equal(large.x_train[:n], small.x_train)


def test_synthetic_heterogeneity():
    homo, hetero = synthetic(a=0.0, b=0.0), synthetic(a=1.0, b=1.0)
    assert not np.array_equal(homo.y_train, hetero.y_train)
    # With beta = 1 the clients' input means v_k are spread out, so per-client
    # feature means differ more than with beta = 0.
    def spread_of_client_means(d):
        bounds = np.concatenate([[0], np.cumsum(d.natural_sizes)])
        means = np.array([d.x_train[s:e].mean() for s, e in zip(bounds[:-1], bounds[1:])])
        return means.std()

    assert spread_of_client_means(hetero) > spread_of_client_means(homo)
    # Each client has its own teacher model: label distributions differ across clients.
    p = make_partition("natural", hetero.y_train, 30, seed=0, natural_sizes=hetero.natural_sizes)
    h = p.label_histogram(hetero.y_train, 10)
    dist = h / h.sum(axis=1, keepdims=True)
    glob = np.bincount(hetero.y_train, minlength=10) / len(hetero.y_train)
    assert 0.5 * np.abs(dist - glob).sum(axis=1).mean() > 0.3


def test_synthetic_bad_arguments():
    with pytest.raises(UserError, match="--clients"):
        synthetic(num_clients=0)
    with pytest.raises(UserError, match="alpha"):
        synthetic(a=-1.0)
    with pytest.raises(UserError, match="--seed"):
        synthetic(seed=-1)
