"""Loader for the IDX files of MNIST and Fashion-MNIST.

Both data sets ship as four IDX files (training and test images and labels),
each either raw or gzip-compressed.  An IDX file is a 4-byte magic number --
two zero bytes, a type code (0x08 = unsigned byte) and the number of
dimensions -- followed by one big-endian uint32 per dimension and then the
payload in C order.  So images are magic 0x00000803 with dimensions
(count, rows, cols) and labels are magic 0x00000801 with dimension (count,).

A .gz file is decompressed once into a per-user cache
($XDG_CACHE_HOME/fedmpi/idx, default ~/.cache/fedmpi/idx) and read from there
afterwards: gunzipping Fashion-MNIST's 30 MB took ~0.65 s on every start.

Every way a file can be wrong (missing, not gzip, cut short, wrong kind of
file, labels that are not digits) becomes a ``UserError`` naming the file,
because in practice these are interrupted downloads, not programming errors.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tempfile
import zlib

import numpy as np

from fedmpi.errors import UserError

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
NUM_CLASSES = 10

# (split, kind) -> base file name; the same names for both data sets.
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}

SYSTEM_DIR = "/usr/share/datasets"

# What to tell the user when the files are nowhere to be found.
_HOW_TO_GET = {
    "fashion-mnist": (
        "install them with `apt-get install dataset-fashion-mnist` (puts them in "
        "/usr/share/datasets/fashion-mnist), or download the four IDX files "
        "(https://github.com/zalandoresearch/fashion-mnist) into ./data/fashion-mnist/, "
        "or pass --data-dir DIR"
    ),
    "mnist": (
        "download the four IDX files (https://yann.lecun.com/exdb/mnist/ or a mirror) "
        "into ./data/mnist/, or pass --data-dir DIR"
    ),
}


def candidate_dirs(name: str, data_dir: str | None) -> list[str]:
    """Directories searched for data set `name`, in order of preference."""
    if data_dir is not None:
        # An explicit --data-dir is taken literally: silently falling back to
        # another copy would hide a typo in the path.
        return [data_dir]
    return [os.path.join(".", "data", name), os.path.join(SYSTEM_DIR, name)]


def _find_file(directory: str, base: str) -> str | None:
    # Raw first: it is what a user gets after gunzip-ing the download, and it
    # reads faster than decompressing.
    for candidate in (base, base + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def find_files(name: str, data_dir: str | None) -> dict[tuple[str, str], str]:
    """Paths of the four IDX files, all taken from the same directory.

    All four must come from one directory so that training and test data can
    never be mixed from two different downloads.
    """
    dirs = candidate_dirs(name, data_dir)
    notes = []
    for directory in dirs:
        found = {key: _find_file(directory, base) for key, base in FILES.items()}
        missing = [FILES[key] for key, path in found.items() if path is None]
        if not missing:
            return found  # type: ignore[return-value]
        if not os.path.isdir(directory):
            notes.append(f"{directory} (no such directory)")
        elif len(missing) == len(FILES):
            notes.append(f"{directory} (no IDX files)")
        else:
            notes.append(f"{directory} (missing {', '.join(missing)})")
    how = _HOW_TO_GET.get(name, "download the four IDX files or pass --data-dir DIR")
    raise UserError(
        f"cannot find the {name} data set; looked in: {'; '.join(notes)}. "
        f"It needs {', '.join(FILES.values())} (raw or .gz): {how}"
    )


def _cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fedmpi", "idx")


def _cache_name(path: str, st: os.stat_result) -> tuple[str, str]:
    """(prefix shared by every version of `path`, full name of this version) in the cache.

    The source's path, size and modification time are in the name, so a
    replaced or re-downloaded file never meets the copy of its predecessor.
    """
    where = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    prefix = f"{os.path.basename(path)[:-3]}-{where}-"
    return prefix, f"{prefix}{st.st_size}-{st.st_mtime_ns}"


def _gzip_size(path: str) -> int:
    """The uncompressed size modulo 2**32, from the gzip trailer (ISIZE)."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return struct.unpack("<I", f.read(4))[0]


def _read_file(path: str) -> bytearray:
    """A file's bytes in writable memory (which numpy can then use without a copy)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)
        n = f.readinto(data)
    return data if n == len(data) else data[:n]


def _read_cached(path: str) -> bytearray | None:
    """The cached decompression of gzip file `path`, if there is a complete one."""
    try:
        _, name = _cache_name(path, os.stat(path))
        data = _read_file(os.path.join(_cache_dir(), name))
        if len(data) % 2**32 != _gzip_size(path):
            return None  # not what this file decompresses to: decompress afresh
        return data
    except OSError:
        return None


def _write_cached(path: str, st: os.stat_result, data: bytes) -> None:
    """Store `data` as the decompression of `path`; silently skip if the cache is unwritable.

    Written to a temporary file and renamed into place, so concurrent jobs
    only ever see complete copies; older copies of the same source are removed
    (a job still reading one keeps its open file).
    """
    directory = _cache_dir()
    prefix, name = _cache_name(path, st)
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(directory, name))
        tmp = None
        for other in os.listdir(directory):
            if other.startswith(prefix) and other != name:
                os.unlink(os.path.join(directory, other))
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _gunzip(path: str) -> bytes | bytearray:
    cached = _read_cached(path)
    if cached is not None:
        return cached
    st = os.stat(path)
    with gzip.open(path, "rb") as f:
        data = f.read()
    _write_cached(path, st, data)
    return data


def _read_bytes(path: str) -> bytes | bytearray:
    try:
        if path.endswith(".gz"):
            return _gunzip(path)
        return _read_file(path)
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        # EOFError is what an interrupted download looks like; the others are
        # a damaged or mislabelled file.
        raise UserError(f"{path} is not a valid gzip file ({exc}); re-download it") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None


def _parse(path: str, magic: int, what: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Check the header of an IDX file and return (dims, flat uint8 payload)."""
    data = _read_bytes(path)
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < 4:
        raise UserError(f"{path} is truncated: it holds only {len(data)} bytes; re-download it")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise UserError(
            f"{path} is not an IDX {what} file: magic number is 0x{found:08x}, "
            f"expected 0x{magic:08x}; check that the file is not swapped with another "
            f"or re-download it"
        )
    if len(data) < header_len:
        raise UserError(f"{path} is truncated inside its header; re-download it")
    dims = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(dims, dtype=np.int64))
    payload = len(data) - header_len
    if payload != expected:
        shape = " images of " + "x".join(map(str, dims[1:])) if what == "images" else " labels"
        state = "truncated" if payload < expected else "longer than its header says"
        raise UserError(
            f"{path} is {state}: header says {dims[0]}{shape} but file holds "
            f"{payload} bytes of {'pixels' if what == 'images' else 'labels'} "
            f"(expected {expected}); re-download it"
        )
    return dims, np.frombuffer(data, dtype=np.uint8, offset=header_len)


def read_images(path: str) -> np.ndarray:
    """(n, rows, cols) uint8 pixels of an IDX image file."""
    dims, flat = _parse(path, IMAGES_MAGIC, "images")
    n, rows, cols = dims
    # MPI receive/broadcast buffers must be writable: a view of a bytearray
    # is; one of an immutable bytes object (a fresh gunzip) needs a copy.
    images = flat.reshape(n, rows, cols)
    return images if images.flags.writeable else images.copy()


def read_labels(path: str) -> np.ndarray:
    """(n,) int32 labels of an IDX label file, checked to be in [0, 10)."""
    _, flat = _parse(path, LABELS_MAGIC, "labels")
    if flat.size and int(flat.max()) >= NUM_CLASSES:
        raise UserError(
            f"{path} holds label {int(flat.max())}, but labels must be 0..{NUM_CLASSES - 1}; "
            f"re-download it"
        )
    return flat.astype(np.int32)


def load_idx(name: str, data_dir: str | None):
    """Load MNIST or Fashion-MNIST (`name`) as a `fedmpi.data.Dataset`."""
    from fedmpi.data import Dataset, image_shape  # late import: the package imports this module

    paths = find_files(name, data_dir)
    split = {}
    for part in ("train", "test"):
        images = read_images(paths[(part, "images")])
        n, rows, cols = images.shape
        x = images.reshape(n, rows * cols)  # a view: one row of pixels per sample
        y = read_labels(paths[(part, "labels")])
        if len(x) != len(y):
            raise UserError(
                f"{paths[(part, 'images')]} holds {len(x)} images but "
                f"{paths[(part, 'labels')]} holds {len(y)} labels; the files come from "
                f"different downloads or one is damaged: re-download them"
            )
        if len(x) == 0:
            raise UserError(f"{paths[(part, 'images')]} holds no images; re-download it")
        split[part] = (x, y, images.shape[1:])
    x_train, y_train, shape = split["train"]
    x_test, y_test, test_shape = split["test"]
    if shape != test_shape:
        raise UserError(
            f"training images are {'x'.join(map(str, shape))} pixels but test images are "
            f"{'x'.join(map(str, test_shape))}; {paths[('train', 'images')]} and "
            f"{paths[('test', 'images')]} are from different data sets"
        )
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=NUM_CLASSES,
        x_scale=1.0 / 255.0,
        image_shape=image_shape(shape),
    )
