"""Loader for user-supplied data sets stored as a NumPy ``.npz`` archive.

The archive must hold ``x_train``, ``y_train``, ``x_test`` and ``y_test``.
Features of any shape ``(n, ...)`` are flattened to ``(n, d)``; features
of shape ``(n, h, w)`` or ``(n, h, w, c)`` are taken to be images (their
shape is kept as the data set's ``image_shape``, which ``--augment`` needs).  ``uint8``
features are taken to be pixels and kept as bytes (scaled by 1/255 when
used), which keeps image data sets four times smaller in memory and in MPI
messages; any other integer or float dtype becomes float32 used as is.
Labels must be non-negative integers; the number of classes is the largest
label plus one.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from fedmpi.errors import UserError

KEYS = ("x_train", "y_train", "x_test", "y_test")


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    if not os.path.isfile(path):
        raise UserError(f"npz data set {path} does not exist")
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise UserError(f"{path} is not a valid .npz archive ({exc})") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        # np.load also accepts a single .npy array, which cannot hold the four arrays.
        raise UserError(f"{path} is a single .npy array, not an .npz archive with {', '.join(KEYS)}")
    with archive:
        missing = [k for k in KEYS if k not in archive.files]
        if missing:
            raise UserError(
                f"{path} lacks array(s) {', '.join(missing)}: it must hold {', '.join(KEYS)} "
                f"(it holds {', '.join(archive.files) or 'nothing'})"
            )
        arrays = {}
        for key in KEYS:
            try:
                arrays[key] = archive[key]
            except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
                # Object arrays (refused because they need pickle) and damaged
                # members only show up when the member is read.
                raise UserError(f"cannot read array {key} from {path} ({exc})") from None
    return arrays


def _features(path: str, key: str, x: np.ndarray) -> np.ndarray:
    if x.ndim == 0:
        raise UserError(f"{key} in {path} is a scalar; it must have one row per sample")
    if x.dtype.kind not in "iuf":
        raise UserError(f"{key} in {path} has dtype {x.dtype}; features must be integers or floats")
    x = x.reshape(len(x), -1)
    if x.dtype != np.uint8:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            raise UserError(f"{key} in {path} holds NaN or infinite values (or values too large for float32)")
    return np.ascontiguousarray(x)


def _labels(path: str, key: str, y: np.ndarray) -> np.ndarray:
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]  # column vectors are a common export format; accept them
    if y.ndim != 1:
        raise UserError(f"{key} in {path} has shape {y.shape}; labels must be a 1-D array")
    if y.dtype.kind == "f":
        # Float labels are accepted only if every one is a whole number.
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise UserError(f"{key} in {path} holds non-integer labels; labels must be integers 0..C-1")
    elif y.dtype.kind not in "iu":
        raise UserError(f"{key} in {path} has dtype {y.dtype}; labels must be integers 0..C-1")
    if y.size and y.min() < 0:
        raise UserError(f"{key} in {path} holds negative label {y.min()}; labels must be integers 0..C-1")
    if y.size and y.max() > np.iinfo(np.int32).max:
        raise UserError(f"{key} in {path} holds label {y.max()}, which is too large")
    return y.astype(np.int32)


def load_npz(path: str):
    """Load the ``.npz`` data set at `path` as a `fedmpi.data.Dataset`."""
    from fedmpi.data import Dataset, image_shape  # late import: the package imports this module

    a = _read_arrays(path)
    # (n, h, w) or (n, h, w, c) features are images (--augment can shift them)
    shape = a["x_train"].shape[1:]
    images = image_shape(shape) if shape == a["x_test"].shape[1:] else None
    x_train = _features(path, "x_train", a["x_train"])
    x_test = _features(path, "x_test", a["x_test"])
    y_train = _labels(path, "y_train", a["y_train"])
    y_test = _labels(path, "y_test", a["y_test"])

    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise UserError(f"x_{part} in {path} has {len(x)} samples but y_{part} has {len(y)} labels")
        if len(x) == 0:
            raise UserError(f"x_{part} in {path} is empty")
    if x_train.shape[1] != x_test.shape[1]:
        raise UserError(
            f"x_train in {path} has {x_train.shape[1]} features per sample but x_test has {x_test.shape[1]}"
        )
    if x_train.dtype != x_test.dtype:
        # Mixing would silently put one split in 0..255 and the other in 0..1.
        raise UserError(
            f"x_train in {path} is {a['x_train'].dtype} but x_test is {a['x_test'].dtype}: "
            f"store both as uint8 pixels or both as floats"
        )

    return Dataset.from_arrays(f"npz:{path}", x_train, y_train, x_test, y_test,
                               image_shape=images)
