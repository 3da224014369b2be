"""``fedmpi-data convert LEAF_DIR OUT.h5``: LEAF's JSON files to TensorFlow Federated's HDF5 layout.

LEAF (Caldas et al., 2018; github.com/TalwalkarLab/leaf) stores each split of
a federated data set as JSON files (``data/<name>/data/train/*.json`` and
``.../test/*.json``), each holding::

    {"users": [id, ...], "num_samples": [n, ...],
     "user_data": {id: {"x": [sample, ...], "y": [label, ...]}, ...}}

This converts one split -- a directory of such files, or one file -- into
one HDF5 file in TFF's layout, ``/examples/<id>/pixels`` (float32; (n, 28,
28) when a sample has 784 values, as FEMNIST's and TFF's EMNIST do, else
(n, d)) and ``/examples/<id>/label`` (int32), which ``--dataset
h5:TRAIN.h5,TEST.h5`` reads. Convert the train and the test split
separately. Only numeric samples are supported: LEAF's text data sets
(Shakespeare, Sent140) are refused, as fedmpi's MLP cannot use text.

This writes a data file, not results: fedmpi/results.py remains the only
writer of results files.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from fedmpi.cli import ArgumentParser, run_tool
from fedmpi.errors import UserError

PROG = "fedmpi-data"
IMAGE_SIDE = 28  # FEMNIST / EMNIST: 784 values per sample are a 28 x 28 image


def _json_files(src: str) -> list[str]:
    if os.path.isfile(src):
        return [src]
    if not os.path.isdir(src):
        raise UserError(f"{src} does not exist: give a LEAF split directory (e.g. "
                        "leaf/data/femnist/data/train) or one of its .json files")
    files = sorted(os.path.join(src, f) for f in os.listdir(src) if f.endswith(".json"))
    if not files:
        sub = [d for d in ("train", "test") if os.path.isdir(os.path.join(src, d))]
        hint = (f"; convert its {' and '.join(sub)} folder(s) one at a time" if sub else "")
        raise UserError(f"{src} holds no .json files{hint}")
    return files


def _read_leaf(path: str) -> dict:
    try:
        with open(path) as fh:
            doc = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read LEAF file {path}: {e}") from None
    if not (isinstance(doc, dict) and isinstance(doc.get("users"), list)
            and isinstance(doc.get("user_data"), dict)):
        raise UserError(f"{path} is not a LEAF data file: it needs 'users' (a list) and "
                        "'user_data' ({user: {'x': [...], 'y': [...]}})")
    return doc


def _user_arrays(path: str, uid: str, entry, expected) -> tuple[np.ndarray, np.ndarray]:
    if not (isinstance(entry, dict) and "x" in entry and "y" in entry):
        raise UserError(f"{path}: user {uid} has no 'x' and 'y' in user_data")
    xs, ys = entry["x"], entry["y"]
    if any(isinstance(v, str) for v in xs[:1]) or any(isinstance(v, str) for v in ys[:1]):
        raise UserError(f"{path}: user {uid}'s samples are text (LEAF's Shakespeare or "
                        "Sent140): fedmpi trains MLPs on numeric inputs and cannot use them")
    try:
        x = np.asarray(xs, dtype=np.float32)
        y = np.asarray(ys)
    except (TypeError, ValueError):
        raise UserError(f"{path}: user {uid}'s x must be equal-length lists of numbers "
                        "(inconsistent feature shapes)") from None
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise UserError(f"{path}: user {uid} has x of shape {x.shape} and y of shape {y.shape}: "
                        "one list of numbers and one label per sample are needed")
    if y.size and not (y.dtype.kind in "iu" or (y.dtype.kind == "f" and (y == np.round(y)).all())):
        raise UserError(f"{path}: user {uid}'s labels are not integers")
    if expected is not None and expected != len(x):
        raise UserError(f"{path}: num_samples says {expected} for user {uid} but it has {len(x)}")
    return x, y.astype(np.int32)


def convert(src: str, out: str, overwrite: bool = False) -> tuple[int, int]:
    """Write LEAF split `src` (directory or file) to `out` in TFF's layout; (users, samples)."""
    import h5py

    if os.path.exists(out) and not overwrite:
        raise UserError(f"{out} already exists: pass --overwrite or choose another name")
    files = _json_files(src)
    tmp = f"{out}.tmp{os.getpid()}"  # written whole, then renamed: no half file on failure
    try:
        with h5py.File(tmp, "w") as f:
            users, samples = _write_users(f.create_group("examples"), files)
        if not users:
            raise UserError(f"{src}: no users in its LEAF files")
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return users, samples


def _write_users(examples, files: list[str]) -> tuple[int, int]:
    """Every user of every LEAF file into `examples`, one JSON file in memory at a time."""
    seen: set[str] = set()
    width, samples = None, 0
    for path in files:
        doc = _read_leaf(path)
        counts = doc.get("num_samples")
        counts = dict(zip(doc["users"], counts)) if isinstance(counts, list) else {}
        for uid in doc["users"]:
            uid = str(uid)
            if uid in seen:
                raise UserError(f"{path}: user {uid} appears more than once in the LEAF files")
            if "/" in uid or uid in (".", ""):
                raise UserError(f"{path}: user id {uid!r} cannot name an HDF5 group")
            x, y = _user_arrays(path, uid, doc["user_data"].get(uid), counts.get(uid))
            if width is None:
                width = x.shape[1]
            elif x.shape[1] != width:
                raise UserError(f"{path}: user {uid} has {x.shape[1]} values per sample, others "
                                f"{width}: inconsistent feature shapes")
            shape = (IMAGE_SIDE, IMAGE_SIDE) if width == IMAGE_SIDE * IMAGE_SIDE else (width,)
            g = examples.create_group(uid)
            g.create_dataset("pixels", data=x.reshape(len(x), *shape))
            g.create_dataset("label", data=y)
            seen.add(uid)
            samples += len(y)
    return len(seen), samples


def _cmd_convert(args) -> int:
    n_users, n_samples = convert(args.leaf_dir, args.out, args.overwrite)
    print(f"wrote {args.out}: {n_users} users, {n_samples} samples "
          "(TensorFlow Federated layout: examples/<user>/pixels, label)")
    return 0


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog=PROG, description="Prepare federated data sets for fedmpi.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    s = sub.add_parser("convert", help="LEAF JSON split -> HDF5 in TensorFlow Federated's layout",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    s.add_argument("leaf_dir", metavar="LEAF_DIR", help="a LEAF split directory of .json files "
                   "(e.g. leaf/data/femnist/data/train), or one .json file")
    s.add_argument("out", metavar="OUT.h5", help="the HDF5 file to write")
    s.add_argument("--overwrite", action="store_true", help="replace OUT.h5 if it exists")
    s.set_defaults(func=_cmd_convert)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fedmpi-data``: returns the exit status (0, or 2 on bad input)."""
    return run_tool(PROG, build_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
