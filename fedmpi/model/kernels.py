"""Numba kernels: forward, backward and optimizer steps of the MLP, on flat vectors.

No MPI, no I/O. One call of `train_local` runs a client's whole local
training (all epochs, all minibatches), so Python is entered once per client,
not once per step.

Why these loops are fast at the small batches federated learning uses:
- Layer products run input-unit-outer: row k of W_l is loaded once per
  minibatch and applied to every sample whose input k is non-zero. About half
  of Fashion-MNIST's pixels and half of the ReLU outputs are exactly zero, and
  those rows are skipped -- in the forward pass and in the weight update.
- For plain SGD the weight update is fused into the backward pass: layer l's
  gradient is added into the parameters right after layer l's input delta
  has been computed from the old weights, so no gradient vector is written,
  zeroed or read back.
- Minibatches larger than TILE are processed TILE samples at a time with the
  gradient accumulated in a buffer, so the activations stay in cache.

Determinism: every loop runs in a fixed order; the only reassociation allowed
(fastmath 'reassoc', needed to vectorise dot products) is fixed at compile
time for a given CPU, so results are bitwise repeatable on a machine and
across ranks. For bitwise agreement across nodes with *different* CPUs set
NUMBA_CPU_NAME=generic on every node.
"""

from __future__ import annotations

import numpy as np
from numba import njit

LOSS_CE = 0  # softmax cross-entropy
LOSS_MSE = 1  # mean over classes of (output - one_hot)^2, linear outputs
LOSSES = {"cross_entropy": LOSS_CE, "mse": LOSS_MSE}

OPT_SGD = 0
OPT_ADAM = 1
OPTIMIZERS = {"sgd": OPT_SGD, "adam": OPT_ADAM}

TILE = 64  # samples per pass through the layers; bigger minibatches are tiled

_FM = {"reassoc"}


def workspace(sizes: np.ndarray):
    """Scratch buffers for the kernels, allocated once per rank and reused.

    acts: every layer's activations for one tile; deltas: two delta blocks;
    nz_*: per layer input, the non-zero entries of each input unit's column
    (sample index and value, CSR over input units), shared by the forward
    pass and the weight update.
    """
    n_inputs = int(np.sum(sizes[:-1]))
    acts = np.zeros(TILE * int(np.sum(sizes)), np.float32)
    deltas = np.zeros(2 * TILE * int(np.max(sizes)), np.float32)
    nz_idx = np.zeros(TILE * n_inputs, np.int32)
    nz_val = np.zeros(TILE * n_inputs, np.float32)
    nz_ptr = np.zeros(n_inputs + len(sizes), np.int64)
    return acts, deltas, nz_idx, nz_val, nz_ptr


@njit(cache=True)
def _compress(acts, a_off, nb, n_in, nz_idx, nz_val, nz_ptr, p_off, q_off):
    """CSR of the non-zero inputs, column by column, without branches.

    Each entry is written unconditionally and the cursor advances only for
    non-zeros: about half the inputs are zero in no predictable pattern, and
    a mispredicted branch per input cost more than the multiply it saves.
    """
    q = q_off
    nz_ptr[p_off] = q
    for k in range(n_in):
        for b in range(nb):
            v = acts[a_off + b * n_in + k]
            nz_idx[q] = b
            nz_val[q] = v
            q += v != 0.0
        nz_ptr[p_off + k + 1] = q


@njit(cache=True, fastmath=_FM)
def _forward(params, sizes, woff, boff, x, xscale, rows, ws):
    """Activations of len(rows) samples; returns the offset of the output layer.

    acts holds layer l's activations as an (nb, sizes[l]) row-major block;
    layer 0 is the scaled input, hidden layers are post-ReLU, the last block
    holds the raw outputs (logits). Leaves each layer input's CSR in ws.
    """
    acts, _, nz_idx, nz_val, nz_ptr = ws
    nb = rows.shape[0]
    d = sizes[0]
    for b in range(nb):
        xr = x[rows[b]]
        a = acts[b * d:(b + 1) * d]
        for k in range(d):
            a[k] = xr[k] * xscale
    a_off = 0
    p_off = 0  # where this layer's CSR starts in nz_ptr / nz_idx
    q_off = 0
    nlayers = sizes.shape[0] - 1
    for l in range(nlayers):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        z_off = a_off + nb * n_in
        wo = woff[l]
        bo = boff[l]
        _compress(acts, a_off, nb, n_in, nz_idx, nz_val, nz_ptr, p_off, q_off)
        # Inner loops index 1-D row slices from 0: with an offset added to
        # the index numba cannot prove it non-negative and the wraparound
        # check it emits stops vectorisation (measured 12x slower).
        bias = params[bo:bo + n_out]
        for b in range(nb):
            z = acts[z_off + b * n_out:z_off + (b + 1) * n_out]
            for j in range(n_out):
                z[j] = bias[j]
        for k in range(n_in):
            w = params[wo + k * n_out:wo + (k + 1) * n_out]
            for q in range(nz_ptr[p_off + k], nz_ptr[p_off + k + 1]):
                v = nz_val[q]
                b = nz_idx[q]
                z = acts[z_off + b * n_out:z_off + (b + 1) * n_out]
                for j in range(n_out):
                    z[j] += v * w[j]
        if l < nlayers - 1:
            z = acts[z_off:z_off + nb * n_out]
            for i in range(nb * n_out):
                if z[i] < 0.0:
                    z[i] = 0.0
        q_off = nz_ptr[p_off + n_in]
        p_off += n_in + 1
        a_off = z_off
    return a_off


@njit(cache=True, fastmath=_FM)
def _loss_and_delta(acts, out_off, nb, ncls, y, rows, loss_kind, deltas, want_delta):
    """Sum of the losses of nb samples and, if wanted, dLoss/dOutput per sample.

    Also returns how many samples were classified correctly (argmax).
    """
    loss = 0.0
    correct = 0
    for b in range(nb):
        o = out_off + b * ncls
        t = y[rows[b]]
        best = 0
        m = acts[o]
        for c in range(1, ncls):
            if acts[o + c] > m:
                m = acts[o + c]
                best = c
        if best == t:
            correct += 1
        if loss_kind == LOSS_CE:
            s = 0.0
            for c in range(ncls):
                s += np.exp(np.float64(acts[o + c] - m))
            loss += np.log(s) + m - acts[o + t]
            if want_delta:
                for c in range(ncls):
                    p = np.exp(np.float64(acts[o + c] - m)) / s
                    deltas[b * ncls + c] = p - (1.0 if c == t else 0.0)
        else:
            s = 0.0
            for c in range(ncls):
                e = acts[o + c] - (1.0 if c == t else 0.0)
                s += e * e
                if want_delta:
                    deltas[b * ncls + c] = 2.0 * e / ncls
            loss += s / ncls
    return loss, correct


@njit(cache=True, fastmath=_FM)
def _backward(params, sizes, woff, boff, nb, ws, target, scale):
    """Backpropagate the output deltas; add scale * gradient into `target`.

    `target` is either a gradient buffer (scale = 1/batch) or, for fused plain
    SGD, the parameters themselves (scale = -lr/batch). Layer l's input delta
    is computed from W_l before W_l is touched, so both uses are exact.
    Uses the CSR of each layer's inputs that `_forward` left in ws: an input
    that is zero contributes no gradient, and a hidden unit whose ReLU output
    is zero passes no delta back.
    """
    _, deltas, nz_idx, nz_val, nz_ptr = ws
    nlayers = sizes.shape[0] - 1
    half = deltas.shape[0] // 2
    p_offs = np.empty(nlayers, np.int64)
    p = 0
    for l in range(nlayers):
        p_offs[l] = p
        p += sizes[l] + 1
    d_out = 0  # offset of the current layer's output delta inside `deltas`
    for l in range(nlayers - 1, -1, -1):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        wo = woff[l]
        bo = boff[l]
        p_off = p_offs[l]
        d_in = half - d_out  # the other half of the buffer
        if l > 0:
            # input delta from the old weights, only where the ReLU fired
            dz = deltas[d_in:d_in + nb * n_in]
            dz[:] = 0.0
            for k in range(n_in):
                w = params[wo + k * n_out:wo + (k + 1) * n_out]
                for q in range(nz_ptr[p_off + k], nz_ptr[p_off + k + 1]):
                    b = nz_idx[q]
                    dl = deltas[d_out + b * n_out:d_out + (b + 1) * n_out]
                    s = np.float32(0.0)
                    for j in range(n_out):
                        s += w[j] * dl[j]
                    dz[b * n_in + k] = s
        # weight and bias gradient, skipping inputs that are zero
        for k in range(n_in):
            t = target[wo + k * n_out:wo + (k + 1) * n_out]
            for q in range(nz_ptr[p_off + k], nz_ptr[p_off + k + 1]):
                c = scale * nz_val[q]
                b = nz_idx[q]
                dl = deltas[d_out + b * n_out:d_out + (b + 1) * n_out]
                for j in range(n_out):
                    t[j] += c * dl[j]
        t = target[bo:bo + n_out]
        for b in range(nb):
            dl = deltas[d_out + b * n_out:d_out + (b + 1) * n_out]
            for j in range(n_out):
                t[j] += scale * dl[j]
        d_out = d_in


@njit(cache=True)
def _opt_step(params, grad, state, opt, lr, momentum, weight_decay, beta1, beta2,
              eps, step, prox_mu, anchor, correction):
    """One optimizer step over the flat vector.

    The gradient is first completed with weight decay (L2), the FedProx
    proximal term mu * (w - anchor) and a control-variate correction (SCAFFOLD),
    whichever are active; then SGD (optional heavy-ball momentum, PyTorch
    convention v = m v + g) or Adam (bias-corrected) steps.
    """
    n = params.shape[0]
    has_anchor = anchor.shape[0] == n and prox_mu != 0.0
    has_corr = correction.shape[0] == n
    if opt == OPT_ADAM:
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
    for i in range(n):
        g = grad[i]
        if weight_decay != 0.0:
            g += weight_decay * params[i]
        if has_anchor:
            g += prox_mu * (params[i] - anchor[i])
        if has_corr:
            g += correction[i]
        if opt == OPT_SGD:
            if momentum != 0.0:
                v = momentum * state[i] + g
                state[i] = v
                g = v
            params[i] -= lr * g
        else:
            m = beta1 * state[i] + (1.0 - beta1) * g
            v = beta2 * state[n + i] + (1.0 - beta2) * g * g
            state[i] = m
            state[n + i] = v
            params[i] -= lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


@njit(cache=True)
def gradient(params, sizes, woff, boff, x, xscale, y, rows, loss_kind, grad, ws):
    """Mean-loss gradient over `rows` into `grad` (overwritten); returns the loss sum."""
    grad[:] = 0.0
    n = rows.shape[0]
    ncls = sizes[sizes.shape[0] - 1]
    scale = np.float32(1.0 / n)
    loss = 0.0
    for t0 in range(0, n, TILE):
        tile = rows[t0:min(n, t0 + TILE)]
        nb = tile.shape[0]
        out = _forward(params, sizes, woff, boff, x, xscale, tile, ws)
        l, _ = _loss_and_delta(ws[0], out, nb, ncls, y, tile, loss_kind, ws[1], True)
        loss += l
        _backward(params, sizes, woff, boff, nb, ws, grad, scale)
    return loss


@njit(cache=True)
def train_local(params, sizes, woff, boff, x, xscale, y, order, epochs, batch,
                loss_kind, opt, lr, momentum, weight_decay, beta1, beta2, eps,
                prox_mu, anchor, correction, grad, state, ws):
    """Run `epochs` epochs of minibatch training in place on `params`.

    order: epochs * n sample indices; epoch e visits order[e*n:(e+1)*n] in
    that order, in minibatches of `batch` (0 = the full n); the last
    minibatch of an epoch may be smaller. Returns (sum of per-sample losses
    seen before each step, number of samples seen, number of steps).
    """
    n = order.shape[0] // epochs
    if batch <= 0 or batch > n:
        batch = n
    ncls = sizes[sizes.shape[0] - 1]
    fused = (opt == OPT_SGD and momentum == 0.0 and weight_decay == 0.0
             and (prox_mu == 0.0 or anchor.shape[0] == 0)
             and correction.shape[0] == 0 and batch <= TILE)
    state[:] = 0.0
    loss = 0.0
    steps = 0
    for e in range(epochs):
        for s0 in range(e * n, (e + 1) * n, batch):
            rows = order[s0:min((e + 1) * n, s0 + batch)]
            nb = rows.shape[0]
            if fused:
                out = _forward(params, sizes, woff, boff, x, xscale, rows, ws)
                l, _ = _loss_and_delta(ws[0], out, nb, ncls, y, rows, loss_kind, ws[1], True)
                loss += l
                _backward(params, sizes, woff, boff, nb, ws, params,
                          np.float32(-lr / nb))
            else:
                loss += gradient(params, sizes, woff, boff, x, xscale, y, rows,
                                 loss_kind, grad, ws)
                _opt_step(params, grad, state, opt, lr, momentum, weight_decay,
                          beta1, beta2, eps, steps + 1, prox_mu, anchor, correction)
            steps += 1
    return loss, epochs * n, steps


@njit(cache=True)
def evaluate(params, sizes, woff, boff, x, xscale, y, start, stop, loss_kind, ws):
    """(sum of losses, number correct) over samples start..stop-1 of (x, y)."""
    ncls = sizes[sizes.shape[0] - 1]
    loss = 0.0
    correct = 0
    rows = np.arange(start, stop)
    for t0 in range(0, rows.shape[0], TILE):
        tile = rows[t0:min(rows.shape[0], t0 + TILE)]
        out = _forward(params, sizes, woff, boff, x, xscale, tile, ws)
        l, c = _loss_and_delta(ws[0], out, tile.shape[0], ncls, y, tile, loss_kind, ws[1], False)
        loss += l
        correct += c
    return loss, correct
