"""--augment (per-sample image shifts, input noise) against independent references.

The references shift images explicitly with np.roll and zero the wrapped-in
border, build the noised inputs with NumPy, and train on those copies (or
compute the step in NumPy): never the kernels' own augmented gather.
"""

import numpy as np
import pytest

from conftest import describe, fedmpi_lines
from fedmpi.client import MAX_SHIFT, LocalTrainer
from fedmpi.config import from_dict
from fedmpi.data import Dataset
from fedmpi.errors import UserError
from fedmpi.model import kernels as K
from fedmpi.model.mlp import MLP
from fedmpi.results import read_run
from fedmpi.rng import generator


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


def images(n, h, w, c, seed=0):
    """uint8 images with about half the pixels zero, flattened (n, h*w*c)."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 256, size=(n, h * w * c), dtype=np.uint8)
    x[rng.random(x.shape) < 0.5] = 0
    return x, rng.integers(0, 3, size=n).astype(np.int32)


def test_shift_image_reference():
    img = np.arange(12).reshape(3, 4, 1)
    np.testing.assert_array_equal(shift_image(img, 1, -2)[..., 0],
                                  [[0, 0, 0, 0], [2, 3, 0, 0], [6, 7, 0, 0]])


def _kernel_run(model, x, xscale, y, order, settings, aug, params):
    p = params.copy()
    ws = K.workspace(model.sizes_array)
    grad = K.aligned_zeros(model.num_params)
    state = K.aligned_zeros(2 * model.num_params)
    empty = np.zeros(0, np.float32)
    out = K.train_local(p, model.sizes_array, model.weight_offsets, model.bias_offsets, x,
                        np.float32(xscale), y, order, settings, empty, empty, grad, state, ws,
                        aug)
    return p, out


@pytest.mark.parametrize("shape,n,batch,epochs,momentum,sigma", [
    ((6, 5, 1), 12, 4, 2, 0.0, 0.0),  # fused SGD path, two epochs
    ((6, 5, 1), 12, 5, 1, 0.9, 0.3),  # optimizer path (momentum), with noise
    ((4, 4, 3), 150, 100, 1, 0.0, 0.0),  # colour; minibatch > TILE: tiled gradient path
    ((4, 4, 3), 150, 100, 1, 0.0, 0.1),
])
def test_augmented_training_equals_training_on_shifted_copies(shape, n, batch, epochs,
                                                              momentum, sigma):
    """train_local with Augment is bitwise the plain kernel on explicitly shifted (and
    noised) copies of the visited samples, one copy per visit."""
    h, w, c = shape
    x, y = images(n, h, w, c)
    model = MLP((h * w * c, 8, 3))
    params = model.init(generator(0, "init"))
    rng = np.random.default_rng(1)
    order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
    shifts = rng.integers(-2, 3, size=(order.size, 2), dtype=np.int8)
    settings = K.train_settings(epochs, batch, K.LOSS_CE, K.OPT_SGD, 0.1, momentum)
    xscale = np.float32(1 / 255)
    got, out = _kernel_run(model, x, xscale, y, order, settings,
                           K.Augment(shifts, h, w, c, sigma, np.random.default_rng(7)), params)

    noise = np.random.default_rng(7)  # the same stream, drawn per visited sample in order
    x_ref = np.empty((order.size, h * w * c), np.float32)
    for m, (i, (dy, dx)) in enumerate(zip(order, shifts.astype(int))):
        pix = shift_image(x[i].reshape(h, w, c), dy, dx).reshape(-1).astype(np.float32) * xscale
        if sigma:
            pix = pix + (sigma * noise.standard_normal(h * w * c)).astype(np.float32)
        x_ref[m] = pix
    want, out_ref = _kernel_run(model, x_ref, 1.0, y[order], np.arange(order.size), settings,
                                None, params)
    assert out == out_ref
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert not np.array_equal(got, _kernel_run(model, x, xscale, y, order, settings, None,
                                               params)[0])


def test_zero_shifts_without_noise_are_the_plain_kernel_bitwise():
    x, y = images(20, 5, 5, 1)
    model = MLP((25, 6, 3))
    params = model.init(generator(0, "init"))
    order = np.random.default_rng(2).permutation(20)
    settings = K.train_settings(1, 5, K.LOSS_CE, K.OPT_SGD, 0.1)
    aug = K.Augment(np.zeros((20, 2), np.int8), 5, 5, 1, 0.0, np.random.default_rng(0))
    a, _ = _kernel_run(model, x, 1 / 255, y, order, settings, aug, params)
    b, _ = _kernel_run(model, x, 1 / 255, y, order, settings, None, params)
    np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


# ---- the client: draws and one local step against NumPy -----------------------------


def _image_trainer(n=4, side=4, **cfg):
    x, y = images(n, side, side, 1, seed=3)
    ds = Dataset("img", x, y, x[:2], y[:2], 3, 1 / 255, image_shape=(side, side, 1))
    model = MLP((side * side, 5, 3))
    c = from_dict({"dataset": "fashion-mnist", "batch_size": n, "lr": 0.5, "augment": "shift",
                   **cfg})
    return c, model, ds, LocalTrainer(c, model, ds), model.init(generator(0, "init"))


@pytest.mark.parametrize("sigma", [0.0, 0.2])
def test_one_augmented_step_against_numpy(sigma):
    """A client of 4 samples, batch 4: one SGD step. NumPy recomputes it on images
    shifted with np.roll (+ the noise), drawn as documented: the shuffle from the
    (seed, "shuffle") generator, then shifts (dy, dx) ~ U{-2..2}^2 per visited sample
    and N(0, sigma^2) per input from the (seed, "augment", round, client) generator."""
    cfg, model, ds, tr, w0 = _image_trainer(augment_noise=sigma)
    w = w0.copy()
    tr.train(w, np.arange(4), generator(0, "shuffle", 3, 1), **tr.augmentation(3, 1))

    order = generator(0, "shuffle", 3, 1).permutation(4)
    aug = generator(0, "augment", 3, 1)
    shifts = aug.integers(-MAX_SHIFT, MAX_SHIFT + 1, size=(4, 2), dtype=np.int8).astype(int)
    a0 = np.stack([shift_image(ds.x_train[i].reshape(4, 4, 1), dy, dx).reshape(-1)
                   for i, (dy, dx) in zip(order, shifts)]).astype(np.float64) / 255
    if sigma:
        a0 += np.stack([sigma * aug.standard_normal(16) for _ in range(4)])
    t = ds.y_train[order]
    W1 = w0[:80].reshape(16, 5).astype(np.float64)
    b1 = w0[80:85].astype(np.float64)
    W2 = w0[85:100].reshape(5, 3).astype(np.float64)
    b2 = w0[100:103].astype(np.float64)
    z1 = a0 @ W1 + b1
    a1 = np.maximum(z1, 0)
    z2 = a1 @ W2 + b2
    p = np.exp(z2 - z2.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    d2 = p.copy()
    d2[np.arange(4), t] -= 1
    d2 /= 4
    d1 = (d2 @ W2.T) * (z1 > 0)
    want = np.concatenate([(W1 - 0.5 * a0.T @ d1).ravel(), b1 - 0.5 * d1.sum(0),
                           (W2 - 0.5 * a1.T @ d2).ravel(), b2 - 0.5 * d2.sum(0)])
    np.testing.assert_allclose(w, want, rtol=2e-5, atol=2e-6)


def test_augmentation_is_seeded_per_round_and_client():
    cfg, model, ds, tr, w0 = _image_trainer(n=40, side=6, augment_noise=0.1, batch_size=5)

    def run(rnd, client, seed=0, augment=True):
        w = w0.copy()
        t = LocalTrainer(from_dict({**cfg.to_dict(), "seed": seed}), model, ds)
        kw = t.augmentation(rnd, client) if augment else {}
        t.train(w, np.arange(40), generator(0, "shuffle", 1, 0), **kw)
        return w.view(np.uint32)

    base = run(1, 0)
    np.testing.assert_array_equal(base, run(1, 0))  # deterministic
    for other in (run(2, 0), run(1, 1), run(1, 0, seed=1), run(1, 0, augment=False)):
        assert not np.array_equal(base, other)
    assert tr.augmentation(1, 0).keys() == {"augment_rng"}
    plain = LocalTrainer(from_dict({"dataset": "fashion-mnist"}), model, ds)
    assert plain.augmentation(1, 0) == {}


def test_shifts_cover_minus_2_to_2_uniformly():
    cfg, model, ds, tr, _ = _image_trainer()
    aug = tr._augment(generator(0, "augment", 1, 0), 25_000)
    assert aug.shifts.dtype == np.int8 and aug.shifts.shape == (25_000, 2)
    counts = np.array([[np.sum((aug.shifts[:, 0] == dy) & (aug.shifts[:, 1] == dx))
                        for dx in range(-2, 3)] for dy in range(-2, 3)])
    assert counts.min() > 850 and counts.max() < 1150  # 1000 each, +-4.7 sigma


# ---- which data are images -------------------------------------------------------------


def test_loaders_report_the_image_shape(tmp_path):
    from test_data import write_idx_set
    from test_tff import emnist_like, pair

    from fedmpi.data import load_dataset

    def load(name, data_dir=None):
        return load_dataset(name, data_dir=data_dir, seed=0, num_clients=3)

    write_idx_set(tmp_path / "idx", gz=False, rows=4, cols=3)
    d = load("mnist", str(tmp_path / "idx"))
    assert d.image_shape == (4, 3, 1) and d.x_train.shape[1] == 12
    assert load(pair(tmp_path, emnist_like(0), emnist_like(1))).image_shape == (28, 28, 1)
    rng = np.random.default_rng(0)
    for shape, want in (((5, 4), (5, 4, 1)), ((5, 4, 3), (5, 4, 3)), ((20,), None)):
        path = tmp_path / f"{len(shape)}.npz"
        np.savez(path, x_train=rng.integers(0, 255, (8, *shape), dtype=np.uint8),
                 y_train=np.arange(8) % 2,
                 x_test=rng.integers(0, 255, (4, *shape), dtype=np.uint8), y_test=np.arange(4) % 2)
        assert load(f"npz:{path}").image_shape == want
    assert load("synthetic").image_shape is None


# ---- settings and runs ---------------------------------------------------------------


def test_augment_settings_are_checked():
    for bad, msg in (({"augment": "shift"}, "--dataset synthetic"),
                     ({"augment_noise": 0.1}, "--augment-noise augments images"),
                     ({"dataset": "mnist", "augment_noise": -1}, "--augment-noise must be"),
                     ({"dataset": "mnist", "augment": "flip"}, "--augment 'flip' is unknown"),
                     ({"dataset": "mnist", "augment": "shift", "algorithm": "fedsgd"},
                      "fedsgd")):
        with pytest.raises(UserError, match=msg):
            from_dict(bad)
    assert from_dict({"dataset": "mnist", "augment": "shift"}).augments
    assert not from_dict({}).augments


def _image_npz(path, n_train=120, n_test=40, side=6, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 255, size=(3, side, side))

    def draw(n):
        y = rng.integers(0, 3, n)
        x = np.clip(centres[y] + rng.normal(0, 60, size=(n, side, side)), 0, 255)
        x[x < 80] = 0  # zero pixels, as in real images
        return np.rint(x).astype(np.uint8), y

    (xa, ya), (xb, yb) = draw(n_train), draw(n_test)
    np.savez(path, x_train=xa, y_train=ya, x_test=xb, y_test=yb)


AUG_RUN = ["--clients", "6", "--clients-per-round", "4", "--rounds", "2", "--hidden", "8",
           "--batch-size", "5", "--augment", "shift", "--augment-noise", "0.05"]


def test_bitwise_identical_at_1_and_3_ranks(run_fedmpi, tmp_path):
    data = tmp_path / "img.npz"
    _image_npz(data)
    runs = []
    for ranks in (1, 3):
        out = tmp_path / f"{ranks}.h5"
        res = run_fedmpi(["--dataset", f"npz:{data}", *AUG_RUN, "--out", str(out)],
                         ranks=ranks, timeout=300)
        assert res.returncode == 0, describe(res)
        runs.append(read_run(str(out)))
    a, b = runs
    assert a["config"]["augment"] == "shift" and a["config"]["augment_noise"] == 0.05
    np.testing.assert_array_equal(a["params"].view(np.uint32), b["params"].view(np.uint32))
    for col in ("test_loss", "train_loss"):
        np.testing.assert_array_equal(a["rounds"][col], b["rounds"][col])
    plain = tmp_path / "plain.h5"
    args = [v for v in AUG_RUN if v not in ("--augment", "shift", "--augment-noise", "0.05")]
    res = run_fedmpi(["--dataset", f"npz:{data}", *args, "--out", str(plain)], timeout=300)
    assert res.returncode == 0, describe(res)
    assert not np.array_equal(read_run(str(plain))["params"], a["params"])


@pytest.mark.parametrize("ranks", [1, 3])
def test_non_image_data_is_refused_on_every_rank(run_fedmpi, tmp_path, small_npz, ranks):
    """A flat npz (no pixel grid: known only once the file is read) and the synthetic
    data: one line, exit 2, no hang."""
    for dataset in (f"npz:{small_npz}", "synthetic"):
        res = run_fedmpi(["--dataset", dataset, "--clients", "4", "--clients-per-round", "2",
                          "--rounds", "1", "--augment", "shift", "--out",
                          str(tmp_path / "x.h5")], ranks=ranks, timeout=120)
        assert res.returncode == 2, describe(res)
        lines = fedmpi_lines(res.stderr)
        assert len(lines) == 1 and lines[0].startswith("fedmpi: error: --augment"), res.stderr
        assert "image" in lines[0]
