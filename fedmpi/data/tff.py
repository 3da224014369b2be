"""Natural federated data sets in TensorFlow Federated's HDF5 layout (``--dataset h5:PATH``).

TFF ships its federated data sets as HDF5 files with one group per client
and one dataset per feature, the first axis running over that client's
examples::

    /examples/<client_id>/<feature>

e.g. ``fed_emnist_train.h5``: ``/examples/f0000_14/pixels`` (n, 28, 28)
float32 in [0, 1] and ``/examples/f0000_14/label`` (n,) int32. A training
file's users become the run's clients (``--partition natural``, the default
for h5 data), in the sorted order of their ids -- client i of the run is the
i-th id, recorded in the results file as /partition/client_ids. The test
file's examples, pooled over its users, are the test set.

``h5:TRAIN.h5,TEST.h5`` names both files; ``h5:TRAIN.h5`` takes the test set
from the file of the same name with ``train`` replaced by ``test``
(TFF's ``fed_emnist_train.h5`` / ``fed_emnist_test.h5``).

Features read: image data -- ``pixels`` (TFF's EMNIST) or ``image`` (TFF's
CIFAR-100) as the input, flattened, and ``label`` as the target; other
features (CIFAR-100's ``coarse_label``) are ignored. Text data sets
(Shakespeare's ``snippets``, Stack Overflow's ``tokens``/``title``/``tags``)
would need a tokenizer, a vocabulary and a sequence model (TFF's baselines use
a character or word LSTM), which fedmpi's MLP does not have: they are refused.

Storage: uint8 inputs stay uint8; float inputs whose every value is k/255 to
float32 rounding (EMNIST's pixels) are held as uint8 bytes with x_scale 1/255,
four times less memory (the model then sees k * float32(1/255), which may
differ from the file's float32 value in the last bit); any other input is
held as float32. Data are read client by client straight into arrays
allocated once, after a first pass over the file's metadata.
"""

from __future__ import annotations

import os

import numpy as np

from fedmpi.errors import UserError

INPUTS = ("pixels", "image")  # TFF's names of image inputs (EMNIST, CIFAR-100)
LABEL = "label"
TEXT_FEATURES = ("snippets", "tokens", "title", "tags")  # Shakespeare, Stack Overflow
LAYOUT = "TensorFlow Federated's layout examples/<client_id>/<feature>"
_QUANT_TOL = 1e-6  # |x - k/255| allowed for uint8 storage: a few float32 ulps at 1.0


def paths(spec: str) -> tuple[str, str]:
    """(training file, test file) of an ``h5:`` spec (without the prefix)."""
    if not spec:
        raise UserError("data set h5: needs a path, e.g. h5:fed_emnist_train.h5")
    train, _, test = spec.partition(",")
    if not test:
        head, base = os.path.split(train)
        if "train" not in base:
            raise UserError(f"h5:{spec}: name the test file too, as h5:TRAIN.h5,TEST.h5 (its "
                            "test set is not found by replacing 'train' in the name)")
        test = os.path.join(head, base.replace("train", "test"))
    for p in (train, test):
        if not os.path.isfile(p):
            raise UserError(f"h5 data file {p} does not exist"
                            + ("" if p == train or "," in spec else
                               f" (the test file for {train}; or give it as h5:TRAIN.h5,TEST.h5)"))
    return train, test


def _open(path: str):
    import h5py

    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path} is not a readable HDF5 file ({e})") from None


class _Scan:
    """One pass over a file's metadata: client ids, sizes, and the input's name, shape, dtype."""

    def __init__(self, f, path: str):
        import h5py

        examples = f.get("examples")
        if not isinstance(examples, h5py.Group):
            raise UserError(f"{path} has no 'examples' group: it is not in {LAYOUT}")
        self.ids = sorted(examples.keys())
        if not self.ids:
            raise UserError(f"{path}: its 'examples' group holds no clients")
        self.groups = [examples[c] for c in self.ids]
        first = self.groups[0]
        if not isinstance(first, h5py.Group):
            raise UserError(f"{path}: examples/{self.ids[0]} is not a group of features: "
                            f"the file is not in {LAYOUT}")
        names = set(first.keys())
        text = sorted(names & set(TEXT_FEATURES))
        if text:
            raise UserError(
                f"{path} holds text ({', '.join(text)}): text data sets need a tokenizer and a "
                "sequence model, which fedmpi's MLP does not have; h5 data sets must be image "
                f"data with features {' or '.join(INPUTS)} and {LABEL}")
        inputs = [n for n in INPUTS if n in names]
        if not inputs or LABEL not in names:
            raise UserError(f"{path}: client {self.ids[0]} has features {', '.join(sorted(names))}; "
                            f"fedmpi reads image data: {' or '.join(INPUTS)} and {LABEL}")
        self.x_name = inputs[0]
        x0 = first[self.x_name]
        self.shape, self.dtype = x0.shape[1:], x0.dtype
        if self.dtype.kind not in "iuf":
            raise UserError(f"{path}: {self.x_name} has dtype {self.dtype}; inputs must be numbers")
        self.sizes = np.empty(len(self.ids), np.int64)
        # the datasets' handles, kept for the read that follows: opening an
        # HDF5 object costs more than reading a small client's data
        self.xs, self.ys = [], []
        for i, (cid, g) in enumerate(zip(self.ids, self.groups)):
            x = g.get(self.x_name) if isinstance(g, h5py.Group) else None
            y = g.get(LABEL) if isinstance(g, h5py.Group) else None
            if not (isinstance(x, h5py.Dataset) and isinstance(y, h5py.Dataset)):
                raise UserError(f"{path}: examples/{cid} is not a group with datasets "
                                f"{self.x_name} and {LABEL} (every client needs both): the "
                                f"file is not in {LAYOUT}")
            self.xs.append(x)
            self.ys.append(y)
            if x.ndim == 0:
                raise UserError(f"{path}: client {cid}'s {self.x_name} is a scalar; it needs one "
                                "row per example")
            if x.shape[1:] != self.shape or x.dtype != self.dtype:
                raise UserError(
                    f"{path}: client {cid}'s {self.x_name} is {x.dtype} {x.shape[1:]} per example "
                    f"but client {self.ids[0]}'s is {self.dtype} {self.shape}: inconsistent "
                    "feature shapes")
            if y.ndim != 1 or y.shape[0] != x.shape[0]:
                raise UserError(f"{path}: client {cid} has {x.shape[0]} {self.x_name} rows but "
                                f"{LABEL} of shape {y.shape}: labels must be one per example")
            if y.dtype.kind not in "iu":
                raise UserError(f"{path}: client {cid}'s {LABEL} is {y.dtype}; labels must be integers")
            self.sizes[i] = x.shape[0]
        self.features = int(np.prod(self.shape, dtype=np.int64))


def estimate_bytes(spec: str):
    """`fedmpi.data.footprint.Footprint` of an h5 data set, from the files' sizes.

    Held inputs take at most the file's bytes times 4 / (the input's bytes
    per value) (float32; uint8 stays a byte): an upper bound for uncompressed
    files, found without visiting every client. Samples: the bytes over one
    example's (input + label) bytes.
    """
    from fedmpi.data.footprint import Footprint

    train, test = paths(spec)
    import h5py

    with _open(train) as f:
        examples = f.get("examples")
        if not isinstance(examples, h5py.Group) or not len(examples):
            return None  # not in the layout: the loader says what is wrong
        first = next(iter(examples.values()))
        inputs = [first[n] for n in INPUTS if isinstance(first, h5py.Group) and n in first]
        if not inputs or not isinstance(inputs[0], h5py.Dataset):
            return None
        x, per = inputs[0], 4 if inputs[0].dtype.kind != "u" or inputs[0].dtype.itemsize > 1 else 1
        example = x.dtype.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)) + 4
        clients = len(examples)
    sizes = [os.path.getsize(p) for p in (train, test)]
    held = sum(sizes) * per // x.dtype.itemsize
    return Footprint(f"h5 data set {train} ({clients:,} clients)", held + 8 * clients,
                     sizes[0] // example, "use a node with more free memory")


def _is_bytes(x: np.ndarray) -> bool:
    """Every value k/255 for an integer k in 0..255, to float32 rounding."""
    k = np.rint(x * 255.0)
    return bool(((k >= 0) & (k <= 255)).all() and (np.abs(x - k / 255.0) <= _QUANT_TOL).all())


def _read(path: str, as_bytes: bool | None):
    """(x (n, d), y int32 (n,), sizes, ids, file dtype) of a file; `as_bytes` None = decide
    from the data (uint8 kept; floats held as bytes if every value is k/255)."""
    with _open(path) as f:
        s = _Scan(f, path)
        n = int(s.sizes.sum())
        if as_bytes is None or s.dtype.kind in "iu":
            as_bytes = s.dtype == np.uint8 or (as_bytes is None and s.dtype.kind == "f")
        x = np.empty((n, s.features), np.uint8 if as_bytes else np.float32)
        y = np.empty(n, np.int32)
        pos = 0
        for cid, xd, yd, m in zip(s.ids, s.xs, s.ys, s.sizes.tolist()):
            rows = np.asarray(xd[...]).reshape(m, s.features)
            if as_bytes and s.dtype != np.uint8:
                if not _is_bytes(rows):
                    return _read(path, False)  # not pixel bytes after all: float32 throughout
                rows = np.rint(rows * 255.0)
            elif not as_bytes and s.dtype.kind == "f" and not np.isfinite(rows).all():
                raise UserError(f"{path}: client {cid}'s {s.x_name} holds NaN or infinite values")
            x[pos:pos + m] = rows
            labels = yd[...]
            if m and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
                bad = labels.min() if labels.min() < 0 else labels.max()
                raise UserError(f"{path}: client {cid} has label {bad}; labels must be "
                                "integers 0..C-1")
            y[pos:pos + m] = labels
            pos += m
    return x, y, s.sizes, s.ids, s.dtype, s.shape


def load_tff(spec: str):
    """The ``h5:`` data set `spec` (without the prefix) as a `fedmpi.data.Dataset`."""
    from fedmpi.data import Dataset, image_shape  # late import: the package imports this module

    train, test = paths(spec)
    x_train, y_train, sizes, ids, dtype, shape = _read(train, None)
    x_test, y_test, _, _, test_dtype, _ = _read(test, x_train.dtype == np.uint8)
    if x_train.shape[1] != x_test.shape[1] or dtype != test_dtype:
        raise UserError(f"{train} has {dtype} inputs of {x_train.shape[1]} values per example but "
                        f"{test} has {test_dtype} of {x_test.shape[1]}: inconsistent feature "
                        "shapes; they must be the same data set's two splits")
    if x_test.dtype != x_train.dtype:  # the test file's inputs were not bytes: align
        x_train, y_train, sizes, ids, _, _ = _read(train, False)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise UserError(f"{train}: client {ids[empty[0]]} has no examples; every client of a "
                        "natural split needs at least one")
    if len(x_test) == 0:
        raise UserError(f"{test} holds no examples: the test set would be empty")
    return Dataset.from_arrays(
        f"h5:{spec}", x_train, y_train, x_test, y_test,
        natural_sizes=sizes,
        client_ids=np.array([c.encode() for c in ids]),
        image_shape=image_shape(shape),  # EMNIST's pixels (28, 28), CIFAR's image (32, 32, 3)
    )
