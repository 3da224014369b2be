"""The numba kernels against finite differences and a plain-NumPy MLP.

Everything here is written independently of `fedmpi.model.kernels`: the
reference forward/backward pass, the losses and the optimizers are the same
maths in float64 NumPy, so a bug in a kernel cannot hide in a shared helper.
No MPI. Layer sizes are chosen off the SIMD widths (not multiples of 8 or 16,
some wider than 64) and minibatches around kernels.TILE, so that the
vector tails, the column blocks and the tiling are all exercised.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmpi.model import kernels as K
from fedmpi.model.mlp import MLP

EMPTY = np.zeros(0, np.float32)


# ----------------------------------------------------------------------------
# Independent float64 reference
# ----------------------------------------------------------------------------

def ref_layers(model, flat):
    flat = np.asarray(flat, np.float64)
    out, pos = [], 0
    for n_in, n_out in zip(model.sizes[:-1], model.sizes[1:]):
        w = flat[pos:pos + n_in * n_out].reshape(n_in, n_out)
        pos += n_in * n_out
        b = flat[pos:pos + n_out]
        pos += n_out
        out.append((w, b))
    assert pos == flat.size
    return out


def ref_forward(model, flat, xb):
    """Pre-activations and activations; acts[0] = input, acts[-1] = logits."""
    acts, pre = [xb], []
    layers = ref_layers(model, flat)
    for i, (w, b) in enumerate(layers):
        z = acts[-1] @ w + b
        pre.append(z)
        acts.append(np.maximum(z, 0.0) if i < len(layers) - 1 else z)
    return pre, acts


def ref_losses(out, yb, loss_kind):
    """Per-sample losses and dLoss/dOutput per sample."""
    nb, ncls = out.shape
    onehot = np.zeros_like(out)
    onehot[np.arange(nb), yb] = 1.0
    if loss_kind == K.LOSS_CE:
        m = out.max(axis=1, keepdims=True)
        e = np.exp(out - m)
        s = e.sum(axis=1, keepdims=True)
        losses = (np.log(s) + m)[:, 0] - out[np.arange(nb), yb]
        delta = e / s - onehot
    else:
        err = out - onehot
        losses = (err ** 2).mean(axis=1)
        delta = 2.0 * err / ncls
    return losses, delta


def ref_inputs(x, xscale, rows):
    return x[rows].astype(np.float64) * np.float64(xscale)


def ref_loss_grad(model, flat, x, xscale, y, rows, loss_kind):
    """(sum of per-sample losses, gradient of the MEAN loss) at flat (float64)."""
    xb = ref_inputs(x, xscale, rows)
    yb = y[rows]
    pre, acts = ref_forward(model, flat, xb)
    losses, delta = ref_losses(acts[-1], yb, loss_kind)
    delta = delta / len(rows)
    layers = ref_layers(model, flat)
    grads = []
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        grads.append(((acts[i].T @ delta).ravel(), delta.sum(axis=0)))
        if i > 0:
            delta = (delta @ w.T) * (pre[i - 1] > 0)
    g = np.concatenate([np.concatenate(p) for p in reversed(grads)])
    return losses.sum(), g


def ref_mean_loss(model, flat, xb, yb, loss_kind):
    _, acts = ref_forward(model, flat, xb)
    return ref_losses(acts[-1], yb, loss_kind)[0].mean()


def ref_train(model, p, x, xscale, y, order, epochs, batch, loss_kind, opt, lr,
              momentum=0.0, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
              prox_mu=0.0, anchor=None, correction=None):
    """Plain minibatch training in float64, PyTorch optimizer conventions."""
    p = np.asarray(p, np.float64).copy()
    n = order.size // epochs
    if batch <= 0 or batch > n:
        batch = n
    v = np.zeros_like(p)  # momentum buffer or Adam's second moment
    m = np.zeros_like(p)  # Adam's first moment
    loss = 0.0
    steps = 0
    for e in range(epochs):
        ep = order[e * n:(e + 1) * n]
        for s0 in range(0, n, batch):
            rows = ep[s0:s0 + batch]
            l, g = ref_loss_grad(model, p, x, xscale, y, rows, loss_kind)
            loss += l
            steps += 1
            if weight_decay:
                g = g + weight_decay * p
            if prox_mu and anchor is not None:
                g = g + prox_mu * (p - anchor)
            if correction is not None:
                g = g + correction
            if opt == K.OPT_SGD:
                if momentum:
                    v = momentum * v + g
                    g = v
                p = p - lr * g
            else:
                m = beta1 * m + (1 - beta1) * g
                v = beta2 * v + (1 - beta2) * g * g
                mhat = m / (1 - beta1 ** steps)
                vhat = v / (1 - beta2 ** steps)
                p = p - lr * mhat / (np.sqrt(vhat) + eps)
    return p, loss, steps


# ----------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------

def make_data(rng, n, d, ncls, dtype, zero_frac=0.4):
    if dtype == np.uint8:
        x = rng.integers(1, 256, size=(n, d)).astype(np.uint8)
        xscale = np.float32(1.0 / 255.0)
    else:
        x = rng.normal(0.0, 1.0, size=(n, d)).astype(np.float32)
        xscale = np.float32(1.0)
    x[rng.random((n, d)) < zero_frac] = 0
    x[:, 0] = 0  # one input that is zero for every sample: a skipped row
    y = rng.integers(0, ncls, size=n).astype(np.int32)
    return np.ascontiguousarray(x), xscale, y


def make_model(sizes, seed=0):
    model = MLP(tuple(sizes))
    rng = np.random.default_rng(seed)
    p = model.init(rng, "he_uniform")
    # non-zero biases so the bias paths are really checked
    for _, b in model.layers(p):
        b[:] = rng.uniform(-0.1, 0.1, b.shape).astype(np.float32)
    return model, p


def kargs(model):
    return model.sizes_array, model.weight_offsets, model.bias_offsets


def run_train(model, p, x, xscale, y, order, epochs, batch, loss_kind, opt, lr,
              momentum=0.0, weight_decay=0.0, beta1=0.9, beta2=0.999, eps=1e-8,
              prox_mu=0.0, anchor=EMPTY, correction=EMPTY, ws=None):
    sizes, woff, boff = kargs(model)
    if ws is None:
        ws = K.workspace(sizes)
    p = p.copy()
    grad = np.zeros(model.num_params, np.float32)
    state = np.full(2 * model.num_params, np.nan, np.float32)  # must be reset by the kernel
    settings = K.train_settings(epochs, batch, loss_kind, opt, lr, momentum, weight_decay,
                                beta1, beta2, eps, prox_mu)
    loss, seen, steps = K.train_local(p, sizes, woff, boff, x, xscale, y, order, settings,
                                      anchor, correction, grad, state, ws)
    return p, loss, seen, steps


def assert_params_close(model, got, want, rtol=2e-4):
    scale = np.abs(want).max()
    err = np.abs(got.astype(np.float64) - want)
    bad = err > rtol * (np.abs(want) + 0.05 * scale)
    assert not bad.any(), (
        f"{bad.sum()} of {bad.size} params differ; worst {err.max():.3g} "
        f"at {int(err.argmax())} (scale {scale:.3g})")


# ----------------------------------------------------------------------------
# Gradients against central finite differences
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_kind", [K.LOSS_CE, K.LOSS_MSE])
@pytest.mark.parametrize("nrows", [4, 150])  # 150 > TILE: gradient accumulated over tiles
def test_gradient_matches_finite_differences(loss_kind, nrows):
    sizes = (5, 7, 6, 3)
    h = 1e-5
    # choose a data set with no hidden pre-activation within 1e-3 of a ReLU kink
    for seed in range(100):
        rng = np.random.default_rng(seed)
        model, p = make_model(sizes, seed)
        x, xscale, y = make_data(rng, 200, sizes[0], sizes[-1], np.float32, zero_frac=0.3)
        rows = rng.choice(200, size=nrows, replace=False).astype(np.int64)
        pre, _ = ref_forward(model, p, ref_inputs(x, xscale, rows))
        if min(np.abs(z).min() for z in pre[:-1]) > 1e-3:
            break
    else:
        pytest.fail("no seed without ReLU kinks")
    # with perturbations of size h, pre-activations move by at most h * max|a| << 1e-3
    assert np.abs(x).max() * h < 1e-4

    sizes_a, woff, boff = kargs(model)
    ws = K.workspace(sizes_a)
    grad = np.full(model.num_params, np.nan, np.float32)  # overwritten by the kernel
    loss = K.gradient(p, sizes_a, woff, boff, x, xscale, y, rows, loss_kind, grad, ws)

    ref_loss, ref_g = ref_loss_grad(model, p, x, xscale, y, rows, loss_kind)
    assert loss == pytest.approx(ref_loss, rel=1e-5)

    xb = ref_inputs(x, xscale, rows)
    yb = y[rows]
    p64 = p.astype(np.float64)
    idx = np.random.default_rng(1).choice(model.num_params, size=60, replace=False)
    fd = np.empty(idx.size)
    for i, k in enumerate(idx):
        q = p64.copy()
        q[k] += h
        lp = ref_mean_loss(model, q, xb, yb, loss_kind)
        q[k] -= 2 * h
        lm = ref_mean_loss(model, q, xb, yb, loss_kind)
        fd[i] = (lp - lm) / (2 * h)
    # the analytic float64 reference agrees with finite differences ...
    np.testing.assert_allclose(ref_g[idx], fd, rtol=1e-5, atol=1e-8 * np.abs(fd).max())
    # ... and the float32 kernel agrees with both, everywhere
    gscale = np.abs(ref_g).max()
    np.testing.assert_allclose(grad[idx], fd, rtol=1e-4, atol=1e-5 * gscale)
    np.testing.assert_allclose(grad, ref_g, rtol=1e-4, atol=1e-5 * gscale)


def test_gradient_zero_input_rows_get_zero_weight_gradient():
    model, p = make_model((9, 20, 4))
    rng = np.random.default_rng(3)
    x, xscale, y = make_data(rng, 30, 9, 4, np.uint8)
    sizes, woff, boff = kargs(model)
    grad = np.zeros(model.num_params, np.float32)
    K.gradient(p, sizes, woff, boff, x, xscale, y, np.arange(30, dtype=np.int64), K.LOSS_CE,
               grad, K.workspace(sizes))
    w0 = model.layers(grad)[0][0]
    assert np.all(w0[0] == 0.0)  # input 0 is zero in every sample
    assert np.any(w0[1] != 0.0)


# ----------------------------------------------------------------------------
# Training steps against plain NumPy
# ----------------------------------------------------------------------------

SIZES = (37, 70, 33, 5)  # off the vector widths; 70 > 64 columns


def _order(rng, n, epochs):
    return np.concatenate([rng.permutation(n) for _ in range(epochs)]).astype(np.int64)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("loss_kind", [K.LOSS_CE, K.LOSS_MSE])
@pytest.mark.parametrize("batch", [1, 3, 0])
def test_sgd_fused_matches_numpy(dtype, loss_kind, batch):
    rng = np.random.default_rng(10 + batch)
    model, p = make_model(SIZES, 1)
    n = 24
    x, xscale, y = make_data(rng, 40, SIZES[0], SIZES[-1], dtype)
    order = rng.choice(40, size=n, replace=False).astype(np.int64)
    lr = 0.05 if dtype == np.uint8 else 0.01
    got, loss, seen, steps = run_train(model, p, x, xscale, y, order, 1, batch, loss_kind,
                                       K.OPT_SGD, lr)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 1, batch,
                                            loss_kind, K.OPT_SGD, lr)
    assert (seen, steps) == (n, want_steps)
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want)


@pytest.mark.parametrize("batch", [1, 3, 0])
def test_sgd_momentum_weight_decay_matches_numpy(batch):
    rng = np.random.default_rng(20 + batch)
    model, p = make_model(SIZES, 2)
    x, xscale, y = make_data(rng, 30, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 30, 2)  # two epochs, the second in a different order
    kw = dict(momentum=0.9, weight_decay=1e-3)
    got, loss, seen, steps = run_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE,
                                       K.OPT_SGD, 0.02, **kw)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 2, batch,
                                            K.LOSS_CE, K.OPT_SGD, 0.02, **kw)
    assert (seen, steps) == (60, want_steps)
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want)


@pytest.mark.parametrize("loss_kind", [K.LOSS_CE, K.LOSS_MSE])
@pytest.mark.parametrize("batch", [1, 3, 0])
def test_adam_matches_numpy(loss_kind, batch):
    rng = np.random.default_rng(30 + batch)
    model, p = make_model(SIZES, 3)
    x, xscale, y = make_data(rng, 20, SIZES[0], SIZES[-1], np.float32)
    order = _order(rng, 20, 2)
    kw = dict(beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=1e-4)
    got, loss, seen, steps = run_train(model, p, x, xscale, y, order, 2, batch, loss_kind,
                                       K.OPT_ADAM, 1e-3, **kw)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 2, batch,
                                            loss_kind, K.OPT_ADAM, 1e-3, **kw)
    assert steps == want_steps
    assert loss == pytest.approx(want_loss, rel=1e-4)
    # Adam divides by sqrt(v): tiny gradients make relative errors larger
    assert_params_close(model, got, want, rtol=1e-3)


@pytest.mark.parametrize("opt", [K.OPT_SGD, K.OPT_ADAM])
def test_prox_and_correction_match_numpy(opt):
    rng = np.random.default_rng(40)
    model, p = make_model(SIZES, 4)
    x, xscale, y = make_data(rng, 25, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 25, 2)
    anchor = (p + rng.normal(0, 0.05, p.size)).astype(np.float32)
    correction = rng.normal(0, 0.01, p.size).astype(np.float32)
    lr = 0.02 if opt == K.OPT_SGD else 1e-3
    got, loss, _, steps = run_train(model, p, x, xscale, y, order, 2, 4, K.LOSS_CE, opt, lr,
                                    prox_mu=0.1, anchor=anchor, correction=correction)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 2, 4, K.LOSS_CE,
                                            opt, lr, prox_mu=0.1,
                                            anchor=anchor.astype(np.float64),
                                            correction=correction.astype(np.float64))
    assert steps == want_steps == 14
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want, rtol=1e-3 if opt == K.OPT_ADAM else 2e-4)


@pytest.mark.parametrize("batch", [4, K.TILE + 3])  # fused plain-SGD path, and not
def test_correction_alone_matches_numpy(batch):
    """SCAFFOLD's steps w -= lr (g(w) + correction) on plain SGD."""
    rng = np.random.default_rng(42)
    model, p = make_model(SIZES, 4)
    x, xscale, y = make_data(rng, 2 * K.TILE, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 2 * K.TILE, 2)
    correction = rng.normal(0, 0.05, p.size).astype(np.float32)
    got, loss, _, steps = run_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE,
                                    K.OPT_SGD, 0.02, correction=correction)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE,
                                            K.OPT_SGD, 0.02,
                                            correction=correction.astype(np.float64))
    assert steps == want_steps
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want)


def test_prox_without_anchor_and_zero_mu_are_ignored():
    rng = np.random.default_rng(41)
    model, p = make_model(SIZES, 4)
    x, xscale, y = make_data(rng, 12, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 12, 1)
    base = run_train(model, p, x, xscale, y, order, 1, 3, K.LOSS_CE, K.OPT_SGD, 0.05)[0]
    no_anchor = run_train(model, p, x, xscale, y, order, 1, 3, K.LOSS_CE, K.OPT_SGD, 0.05,
                          prox_mu=0.5)[0]
    zero_mu = run_train(model, p, x, xscale, y, order, 1, 3, K.LOSS_CE, K.OPT_SGD, 0.05,
                        prox_mu=0.0, anchor=np.zeros_like(p))[0]
    np.testing.assert_array_equal(no_anchor, base)
    np.testing.assert_array_equal(zero_mu, base)


@pytest.mark.parametrize("momentum", [0.0, 0.5])  # fused (tiled) and gradient-buffer paths
@pytest.mark.parametrize("batch", [150, 0])
def test_batch_larger_than_tile_matches_numpy(momentum, batch):
    assert 150 > K.TILE
    rng = np.random.default_rng(50)
    model, p = make_model(SIZES, 5)
    x, xscale, y = make_data(rng, 160, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 150, 2)
    got, loss, seen, steps = run_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE,
                                       K.OPT_SGD, 0.1, momentum=momentum)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 2, batch,
                                            K.LOSS_CE, K.OPT_SGD, 0.1, momentum=momentum)
    assert (seen, steps) == (300, 2) == (300, want_steps)
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want)


def test_uneven_last_minibatch_and_many_epochs():
    rng = np.random.default_rng(60)
    model, p = make_model(SIZES, 6)
    x, xscale, y = make_data(rng, 11, SIZES[0], SIZES[-1], np.uint8)
    order = _order(rng, 11, 3)
    got, loss, seen, steps = run_train(model, p, x, xscale, y, order, 3, 4, K.LOSS_MSE,
                                       K.OPT_SGD, 0.1)
    want, want_loss, want_steps = ref_train(model, p, x, xscale, y, order, 3, 4, K.LOSS_MSE,
                                            K.OPT_SGD, 0.1)
    assert (seen, steps) == (33, 9) == (33, want_steps)
    assert loss == pytest.approx(want_loss, rel=1e-4)
    assert_params_close(model, got, want)


def test_fashion_mnist_shapes_match_numpy():
    """The production shape 784-200-200-10 with pixel-like sparse uint8 inputs."""
    sizes = (784, 200, 200, 10)
    rng = np.random.default_rng(70)
    model, p = make_model(sizes, 7)
    x, xscale, y = make_data(rng, 40, 784, 10, np.uint8, zero_frac=0.5)
    order = _order(rng, 40, 1)
    for batch, kw in ((10, {}), (50, {}), (10, dict(momentum=0.9))):
        got, loss, _, _ = run_train(model, p, x, xscale, y, order, 1, batch, K.LOSS_CE,
                                    K.OPT_SGD, 0.01, **kw)
        want, want_loss, _ = ref_train(model, p, x, xscale, y, order, 1, batch, K.LOSS_CE,
                                       K.OPT_SGD, 0.01, **kw)
        assert loss == pytest.approx(want_loss, rel=1e-4)
        assert_params_close(model, got, want)


# ----------------------------------------------------------------------------
# evaluate
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("loss_kind", [K.LOSS_CE, K.LOSS_MSE])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_evaluate_matches_numpy(loss_kind, dtype):
    rng = np.random.default_rng(80)
    model, p = make_model(SIZES, 8)
    x, xscale, y = make_data(rng, 200, SIZES[0], SIZES[-1], dtype)
    sizes, woff, boff = kargs(model)
    ws = K.workspace(sizes)
    for start, stop in ((0, 200), (13, 170), (5, 6), (7, 7)):
        loss, correct = K.evaluate(p, sizes, woff, boff, x, xscale, y, start, stop, loss_kind, ws)
        rows = np.arange(start, stop)
        _, acts = ref_forward(model, p, ref_inputs(x, xscale, rows))
        losses, _ = ref_losses(acts[-1], y[rows], loss_kind)
        assert loss == pytest.approx(losses.sum(), rel=1e-5, abs=1e-9)
        assert correct == int((acts[-1].argmax(axis=1) == y[rows]).sum())


def make_images(rng, n, side, ncls):
    """uint8 'images' whose non-zero pixels fill a random box each (as a garment
    fills part of a Fashion-MNIST frame) with holes: look-alike samples that
    `eval_order` can group."""
    x = np.zeros((n, side, side), np.uint8)
    for i in range(n):
        t, l = rng.integers(0, side // 2, 2)
        b, r = rng.integers(side // 2 + 1, side + 1, 2)
        x[i, t:b, l:r] = rng.integers(1, 256, (b - t, r - l))
    x[rng.random(x.shape) < 0.2] = 0
    y = rng.integers(0, ncls, size=n).astype(np.int32)
    return np.ascontiguousarray(x.reshape(n, side * side)), np.float32(1.0 / 255.0), y


@pytest.mark.parametrize("loss_kind", [K.LOSS_CE, K.LOSS_MSE])
@pytest.mark.parametrize("data", ["images", "uint8", "float32"])
def test_evaluate_grouped_same_bits_as_evaluate(loss_kind, data):
    """The forward-only evaluation over look-alike groups must return exactly
    what `evaluate` (the training forward pass, consecutive groups) returns:
    each output's sum runs over the same non-zero inputs in the same order, and
    the losses are summed in row order; also for any other order of the rows.
    Both are also checked against the float64 NumPy reference."""
    rng = np.random.default_rng(81)
    sizes = (784, 200, 200, 10) if data == "images" else SIZES
    model, p = make_model(sizes, 12)
    n = 300
    if data == "images":
        x, xscale, y = make_images(rng, n, 28, sizes[-1])
    else:
        x, xscale, y = make_data(rng, n, sizes[0], sizes[-1], getattr(np, data), zero_frac=0.5)
    sizes_a, woff, boff = kargs(model)
    ws = K.workspace(sizes_a)
    ews = K.eval_workspace(sizes_a, 250)
    for start, stop in ((0, 250), (250, 300), (13, 146), (5, 6), (7, 7), (0, 64), (1, 66)):
        want = K.evaluate(p, sizes_a, woff, boff, x, xscale, y, start, stop, loss_kind, ws)
        order = K.eval_order(x, start, stop)
        assert order.dtype == np.int64
        np.testing.assert_array_equal(np.sort(order), np.arange(start, stop))
        for rows in (order, np.arange(start, stop), rng.permutation(np.arange(start, stop))):
            got = K.evaluate_grouped(p, sizes_a, woff, boff, x, xscale, y, rows, loss_kind, ews)
            assert got == want, (start, stop)
        rows = np.arange(start, stop)
        _, acts = ref_forward(model, p, ref_inputs(x, xscale, rows))
        losses, _ = ref_losses(acts[-1], y[rows], loss_kind)
        assert want[0] == pytest.approx(losses.sum(), rel=1e-5, abs=1e-9)
        assert want[1] == int((acts[-1].argmax(axis=1) == y[rows]).sum())


def test_eval_order_groups_look_alike_images():
    """eval_order's point: groups of GROUP consecutive rows in its order share
    more of their non-zero inputs than groups in row order do."""
    rng = np.random.default_rng(82)
    x, _, _ = make_images(rng, 250, 28, 10)

    def union(rows):
        nz = x[rows] != 0
        return nz.reshape(-1, K.GROUP, nz.shape[1]).any(axis=1).sum()

    assert union(K.eval_order(x, 0, 250)) < 0.9 * union(np.arange(250))


# ----------------------------------------------------------------------------
# Determinism
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("opt,momentum,batch", [(K.OPT_SGD, 0.0, 10), (K.OPT_SGD, 0.9, 10),
                                                (K.OPT_ADAM, 0.0, 0), (K.OPT_SGD, 0.0, 100)])
def test_bitwise_deterministic(opt, momentum, batch):
    sizes = (784, 200, 200, 10)
    rng = np.random.default_rng(90)
    model, p = make_model(sizes, 9)
    x, xscale, y = make_data(rng, 100, 784, 10, np.uint8, zero_frac=0.5)
    order = _order(rng, 100, 2)
    lr = 0.05 if opt == K.OPT_SGD else 1e-3
    a, la, _, _ = run_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE, opt, lr,
                            momentum=momentum)
    # a workspace dirtied by another model's training must not matter
    ws = K.workspace(model.sizes_array)
    run_train(model, p + np.float32(0.01), x, xscale, y, order[::-1].copy(), 2, 7,
              K.LOSS_MSE, K.OPT_SGD, 0.3, ws=ws)
    b, lb, _, _ = run_train(model, p, x, xscale, y, order, 2, batch, K.LOSS_CE, opt, lr,
                            momentum=momentum, ws=ws)
    assert la == lb
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, p)


# ----------------------------------------------------------------------------
# Same bits on every instruction set
# ----------------------------------------------------------------------------

def _isa_workload():
    """Training (fused SGD, momentum, Adam, tiled minibatches, MSE), a gradient
    and evaluations on a sparse production-shaped model and on an odd-shaped
    one; returns every result as arrays, to be compared bit for bit."""
    out = {}
    for name, sizes in (("fmnist", (784, 200, 200, 10)), ("odd", (50, 37, 70, 3))):
        rng = np.random.default_rng(95)
        model, p = make_model(sizes, 11)
        x, xscale, y = make_data(rng, 120, sizes[0], sizes[-1], np.uint8, zero_frac=0.5)
        order = _order(rng, 120, 2)
        runs = ((10, K.LOSS_CE, K.OPT_SGD, 0.05, 0.0), (50, K.LOSS_CE, K.OPT_SGD, 0.05, 0.0),
                (7, K.LOSS_MSE, K.OPT_SGD, 0.1, 0.9), (0, K.LOSS_CE, K.OPT_ADAM, 1e-3, 0.0),
                (100, K.LOSS_CE, K.OPT_SGD, 0.05, 0.0))
        for i, (batch, loss_kind, opt, lr, momentum) in enumerate(runs):
            got, loss, _, _ = run_train(model, p, x, xscale, y, order, 2, batch, loss_kind, opt,
                                        lr, momentum=momentum)
            out[f"{name}_train{i}"] = got
            out[f"{name}_loss{i}"] = np.float64(loss)
        sizes_a, woff, boff = kargs(model)
        ws = K.workspace(sizes_a)
        grad = np.zeros(model.num_params, np.float32)
        out[f"{name}_gradloss"] = np.float64(K.gradient(
            got, sizes_a, woff, boff, x, xscale, y, order[:70].copy(), K.LOSS_CE, grad, ws))
        out[f"{name}_grad"] = grad
        ews = K.eval_workspace(sizes_a, 120)
        for loss_kind in (K.LOSS_CE, K.LOSS_MSE):
            loss, correct = K.evaluate(got, sizes_a, woff, boff, x, xscale, y, 3, 120, loss_kind,
                                       ws)
            out[f"{name}_eval{loss_kind}"] = np.array([loss, correct], np.float64)
            loss, correct = K.evaluate_grouped(got, sizes_a, woff, boff, x, xscale, y,
                                               K.eval_order(x, 3, 120), loss_kind, ews)
            out[f"{name}_evalgrouped{loss_kind}"] = np.array([loss, correct], np.float64)
    return out


_ISA_CHILD = """
import runpy, sys
import numpy as np
from fedmpi.model import simd
ns = runpy.run_path(sys.argv[1])
np.savez(sys.argv[2], vector_bits=simd.VECTOR_BITS, **ns["_isa_workload"]())
"""


def _host_has(feature):
    import llvmlite.binding as llvm

    return bool(llvm.get_host_cpu_features().flatten().count("+" + feature))


# (NUMBA_CPU_NAME, NUMBA_CPU_FEATURES, vector width the kernels must then compile for,
#  host feature needed to run that code)
ISAS = {"sse2": ("generic", "", 128, "sse2"), "avx2": ("haswell", "", 256, "avx2"),
        "avx512": ("skylake-avx512", "", 512, "avx512f")}


def test_same_bits_on_sse2_avx2_avx512(tmp_path):
    """The kernels' arithmetic is spelled out lane by lane (no FMA contraction,
    fixed reduction trees) and only their register blocking depends on the
    vector width, so code compiled for SSE2, AVX2 (which has FMA) and AVX-512
    must give the same bits as this process's native code. Each instruction
    set is compiled in a child process (numba reads NUMBA_CPU_NAME at import);
    one the host cannot run is skipped, and the test says so."""
    import os
    import subprocess
    import sys

    runnable = {k: v for k, v in ISAS.items() if _host_has(v[3])}
    children = {}
    for isa, (cpu, feats, _, _) in runnable.items():
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=feats)
        out = tmp_path / f"{isa}.npz"
        children[isa] = (out, subprocess.Popen(
            [sys.executable, "-c", _ISA_CHILD, __file__, str(out)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    want = _isa_workload()
    for isa, (out, proc) in children.items():
        log, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{isa} child failed:\n{log}"
        got = np.load(out)
        assert int(got["vector_bits"]) == runnable[isa][2], isa  # the blocking really differs
        for key, ref in want.items():
            a, b = np.atleast_1d(got[key]), np.atleast_1d(np.asarray(ref))
            assert a.dtype == b.dtype and a.shape == b.shape, (isa, key)
            # compare the bit patterns (also tells -0.0 from 0.0)
            np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8),
                                          err_msg=f"{isa}: {key}")
    missing = sorted(set(ISAS) - set(runnable))
    if missing:
        pytest.skip(f"compared {sorted(runnable)} with native code; this CPU cannot run "
                    f"{missing}")
