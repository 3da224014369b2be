"""Data sets and their division among clients.

Everything here is a pure function of its arguments (paths, seed, sizes): no
MPI and no output files, so the same data can be rebuilt on any rank, in a
test, or in an analysis script.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from fedmpi.errors import UserError

NAMES = ("synthetic", "fashion-mnist", "mnist", "npz:PATH", "h5:PATH")


@dataclass(frozen=True)
class Dataset:
    """A training and a test set in the layout the simulator consumes.

    Features stay in their compact storage dtype (uint8 pixels) and are turned
    into model inputs as ``x * x_scale``; that keeps Fashion-MNIST at 47 MB
    instead of 188 MB per copy and four times cheaper to send over MPI.
    """

    name: str
    x_train: np.ndarray  # (n_train, d), C-contiguous, uint8 (images) or float32
    y_train: np.ndarray  # (n_train,), int32 labels in [0, num_classes)
    x_test: np.ndarray  # (n_test, d), same dtype as x_train
    y_test: np.ndarray  # (n_test,), int32
    num_classes: int
    x_scale: float  # features = x * x_scale (1/255 for uint8 pixels, 1.0 for float32)
    # int64 per-client training-set sizes when the data set comes with a
    # natural client split (synthetic); those clients' samples are stored
    # consecutively in x_train, in client order.
    natural_sizes: np.ndarray | None = None
    # bytes ids of those clients where they have names (h5 data: the file's users)
    client_ids: np.ndarray | None = None
    # (height, width, channels) of image data, whose rows are such arrays
    # flattened row-major (what --augment shifts); None when the features
    # have no known pixel grid (synthetic, flat npz arrays)
    image_shape: tuple[int, int, int] | None = None

    @property
    def num_features(self) -> int:
        return self.x_train.shape[1]

    @classmethod
    def from_arrays(cls, name: str, x_train, y_train, x_test, y_test, **more) -> "Dataset":
        """A data set read from a user's file: classes 0..the largest label, and
        uint8 features read as pixels (x / 255), floats as they are."""
        return cls(name=name, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                   num_classes=int(max(y_train.max(), y_test.max())) + 1,
                   x_scale=1.0 / 255.0 if x_train.dtype == np.uint8 else 1.0, **more)


def image_shape(sample_shape: tuple[int, ...]) -> tuple[int, int, int] | None:
    """(height, width, channels) of samples stored with shape (h, w) or (h, w, c);
    None for any other shape (flat feature vectors have no pixel grid)."""
    if len(sample_shape) == 2:
        return (int(sample_shape[0]), int(sample_shape[1]), 1)
    if len(sample_shape) == 3:
        return tuple(int(v) for v in sample_shape)
    return None


def require_images(data: Dataset, option: str) -> None:
    """UserError unless `data` are images: `option` needs their pixel grid."""
    if data.image_shape is None:
        raise UserError(
            f"{option} augments images, but data set {data.name} has no image shape (its "
            f"{data.num_features} features are a flat vector); use it with fashion-mnist, "
            "mnist, h5 image data, or an npz file whose x arrays are (n, height, width[, "
            "channels]), or drop it")


def fingerprint(data: Dataset, order: np.ndarray, offsets: np.ndarray) -> dict[str, str]:
    """What a resumed run must find unchanged: short hashes of the data and partition.

    Settings alone do not pin the data down: a data file can be replaced, and
    the seeded draws that build the synthetic set and the partition come from
    NumPy's generator methods, whose algorithms may change between NumPy
    versions. Hashing the arrays themselves (~0.1 s for Fashion-MNIST) catches
    both; the NumPy version is kept to explain a changed hash.
    """
    def digest(*arrays) -> str:
        h = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype.str}{a.shape}".encode())
            h.update(a.data)
        return h.hexdigest()[:16]

    return {"train data": digest(data.x_train, data.y_train),
            "test data": digest(data.x_test, data.y_test),
            "partition": digest(order, offsets),
            "numpy": np.__version__}


def load_dataset(
    name: str,
    *,
    data_dir: str | None,
    seed: int,
    num_clients: int,
    synthetic_alpha: float = 1.0,
    synthetic_beta: float = 1.0,
    synthetic_mean_samples: float | None = None,
) -> Dataset:
    """Load data set `name`: ``synthetic``, ``fashion-mnist``, ``mnist``, ``npz:PATH`` or ``h5:PATH``.

    `data_dir` is where to look for the IDX files of (fashion-)mnist (default:
    ./data/<name>/, then /usr/share/datasets/<name>/).  `seed`, `num_clients`
    and the synthetic_* parameters only affect ``synthetic``, the one data set
    that is generated rather than read.
    """
    # Imported here so that importing fedmpi.data (for Dataset) stays cheap
    # and free of import cycles: the loaders import Dataset from this module.
    if name == "synthetic":
        from fedmpi.data.synthetic import load_synthetic

        if seed < 0:
            raise UserError(f"--seed must be a non-negative integer (got {seed})")
        return load_synthetic(num_clients, seed, synthetic_alpha, synthetic_beta,
                              synthetic_mean_samples)
    if name in ("fashion-mnist", "mnist"):
        from fedmpi.data.idx import load_idx

        return load_idx(name, data_dir)
    if name.startswith("npz:"):
        from fedmpi.data.npz import load_npz

        path = name[len("npz:"):]
        if not path:
            raise UserError("data set npz: needs a path, e.g. npz:/path/to/data.npz")
        return load_npz(path)
    if name.startswith("h5:"):
        from fedmpi.data.tff import load_tff

        return load_tff(name[len("h5:"):])
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}")
