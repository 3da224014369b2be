"""Test accuracy of each run's final model on the test images as they are and shifted:
every test image moved by its own random (dy, dx) in -2..2 pixels, zero fill (the shifts
--augment shift trains on), built here with np.roll and a NumPy forward pass.

Usage: python benchmarks/shifted_accuracy.py RUN.h5 ...   (prints a Markdown table)
"""

from __future__ import annotations

import sys

import numpy as np

from fedmpi.data import load_dataset
from fedmpi.results import read_run

MAX_SHIFT = 2
SEED = 123  # the test set's shifts: the same for every run


def shift_image(img: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """img (h, w, c) moved down dy and right dx pixels, zeros where nothing moved in."""
    out = np.roll(img, (dy, dx), axis=(0, 1))
    if dy > 0:
        out[:dy] = 0
    elif dy < 0:
        out[dy:] = 0
    if dx > 0:
        out[:, :dx] = 0
    elif dx < 0:
        out[:, dx:] = 0
    return out


def accuracy(params: np.ndarray, sizes: list[int], x: np.ndarray, scale: float,
             y: np.ndarray) -> float:
    a, pos = x.astype(np.float64) * scale, 0
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = params[pos:pos + n_in * n_out].reshape(n_in, n_out)
        pos += n_in * n_out
        a = a @ w + params[pos:pos + n_out]
        pos += n_out
        if i < len(sizes) - 2:
            a = np.maximum(a, 0.0)
    return float(np.mean(a.argmax(axis=1) == y))


def main(paths: list[str]) -> None:
    print("| run | augment | augment_noise | seed | test accuracy | on shifted test images |")
    print("|---|---|---|---|---|---|")
    shifted = {}
    for path in paths:
        run = read_run(path)
        cfg = run["config"]
        key = (cfg["dataset"], cfg["data_dir"])
        if key not in shifted:
            data = load_dataset(cfg["dataset"], data_dir=cfg["data_dir"], seed=0, num_clients=1)
            if data.image_shape is None:
                sys.exit(f"{path}: data set {data.name} has no image shape")
            imgs = data.x_test.reshape(-1, *data.image_shape)
            d = np.random.default_rng(SEED).integers(-MAX_SHIFT, MAX_SHIFT + 1, (len(imgs), 2))
            moved = np.stack([shift_image(im, dy, dx) for im, (dy, dx) in zip(imgs, d)])
            shifted[key] = (data, moved.reshape(len(imgs), -1))
        data, moved = shifted[key]
        p, sizes = np.asarray(run["params"], np.float64), list(run["layer_sizes"])
        print(f"| {path} | {cfg.get('augment', 'none')} | {cfg.get('augment_noise', 0.0)} | "
              f"{cfg['seed']} | {accuracy(p, sizes, data.x_test, data.x_scale, data.y_test):.4f} | "
              f"{accuracy(p, sizes, moved, data.x_scale, data.y_test):.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
