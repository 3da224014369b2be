"""Numba kernels: forward, backward and optimizer steps of the MLP, on flat vectors.

No MPI, no I/O. One call of `train_local` runs a client's whole local
training (all epochs, all minibatches), so Python is entered once per client,
not once per step.

Why these loops are fast at the small batches federated learning uses:
- Zero inputs are skipped. About half of Fashion-MNIST's pixels and half of
  the ReLU outputs are exactly zero; each layer's input is compressed to its
  non-zero entries and only those rows of W_l are touched: in the forward
  pass (rows that are zero for all of a group of GROUP = 5 samples; a
  minibatch's samples are grouped by the span of their non-zero inputs, so
  that a group shares more of them), in the weight update and in the input
  delta (per sample and input unit).
- The layer loops are register-blocked with explicit SIMD (the intrinsics of
  `fedmpi.model.simd`), because the loops LLVM vectorises by itself load and
  store the accumulator for every input (the previous version of these
  kernels; 1.5-1.8x slower overall). The forward pass keeps 32 outputs (16
  with AVX2's 16 registers) of 5 samples in registers, so each vector of W_l
  loaded from L2 serves five samples; the weight update keeps 64 floats of
  one row of W_l in 4 vectors while it adds in every sample whose input is
  non-zero, so a row is loaded and stored once per minibatch.
- The delta buffers are cache-line aligned with rows padded to whole vectors:
  a vector load that straddles two cache lines costs about twice as much.
- For plain SGD the weight update is fused into the backward pass: layer l's
  gradient is added into the parameters right after layer l's input delta
  has been computed from the old weights, so no gradient vector is written,
  zeroed or read back.
- Minibatches larger than TILE are processed TILE samples at a time with the
  gradient accumulated in a buffer, so the activations stay in cache.
- The scalar loops that build the sparse inputs index with unsigned integers:
  for a signed index numba adds a negative-index wraparound (three
  instructions) to every access, which made those loops twice as slow.
- Test-set evaluation (`evaluate_grouped`) runs the forward pass only, over
  groups of look-alike samples, which share more of their non-zero inputs.

Determinism: every loop runs in a fixed order, nothing is compiled with
fast-math, and the SIMD code spells out its arithmetic (a separate multiply
and add, never a fused multiply-add; dot products reduced lane-wise, then by
a fixed halving tree). The results are therefore bitwise repeatable on a
machine and across ranks, and do not depend on the CPU's vector width:
AVX-512, AVX2 and plain SSE2 code (NUMBA_CPU_NAME=generic) give the same bits
-- the register blocking chosen per vector width groups independent outputs,
never the terms of one sum (tests/test_kernels.py compiles all three in child
processes and compares the bits of training, gradients and evaluation; exp/log
come from the C library, so use the same software stack on every node).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from fedmpi.model.simd import (VECTOR_BITS, VW, aligned_zeros, vadd, vload, vload_m,
                               vmuladd, vrelu, vsplat, vstore, vstore_m, vsum, vzero)

LOSS_CE = 0  # softmax cross-entropy
LOSS_MSE = 1  # mean over classes of (output - one_hot)^2, linear outputs
LOSSES = {"cross_entropy": LOSS_CE, "mse": LOSS_MSE}

OPT_SGD = 0
OPT_ADAM = 1
OPTIMIZERS = {"sgd": OPT_SGD, "adam": OPT_ADAM}

# the client optimizer's Adam constants (PyTorch's defaults)
ADAM_BETA1 = 0.9
ADAM_BETA2 = 0.999
ADAM_EPS = 1e-8


class TrainSettings(NamedTuple):
    """The scalar settings of one `train_local` call (numba takes it as a tuple);
    build it with `train_settings`, which fixes the field types."""
    epochs: int
    batch: int  # 0 = full batch
    loss: int  # LOSS_*
    opt: int  # OPT_*
    lr: float
    momentum: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    prox_mu: float  # FedProx's mu; used only with an anchor


def train_settings(epochs, batch, loss=LOSS_CE, opt=OPT_SGD, lr=0.01, momentum=0.0,
                   weight_decay=0.0, beta1=ADAM_BETA1, beta2=ADAM_BETA2, eps=ADAM_EPS,
                   prox_mu=0.0) -> TrainSettings:
    """TrainSettings with Python int/float fields, so that numba compiles
    `train_local` once whatever number types the caller had."""
    return TrainSettings(int(epochs), int(batch), int(loss), int(opt), float(lr),
                         float(momentum), float(weight_decay), float(beta1), float(beta2),
                         float(eps), float(prox_mu))


class Augment(NamedTuple):
    """Image augmentation of one `train_local` call (pass None for none).

    The m-th sample visited (position m of `order`) is shifted by
    shifts[m] = (dy, dx) pixels, the vacated border filled with zeros, and,
    with noise > 0, gets N(0, noise^2) added to every input (in units of the
    scaled input x * xscale), drawn per sample in visit order from `rng`
    (numba draws NumPy's exact stream from a Generator). Both happen where
    layer 0 reads its pixels: the shard is never copied.
    """
    shifts: np.ndarray  # int8 (len(order), 2): (dy, dx), rows then columns
    height: int
    width: int
    channels: int  # inputs are (height, width, channels) row-major
    noise: float
    rng: np.random.Generator


TILE = 64  # samples per pass through the layers; bigger minibatches are tiled
# Samples whose forward pass shares each loaded vector of weights: 5 divides
# the FedAvg paper's minibatches (10, 50), so no lanes are computed for
# missing samples there; 5 x the registers per sample fit both AVX-512 and AVX2.
GROUP = 5

# ----------------------------------------------------------------------------
# Layer kernels
# ----------------------------------------------------------------------------

@njit(cache=True)
def _ld(n):
    """Row stride of the delta blocks: n rounded up to whole vectors, so that with
    the 64-byte aligned buffer every row starts on a cache line (a vector load
    that straddles two lines costs about twice as much)."""
    return (n + VW - 1) // VW * VW


def workspace(sizes: np.ndarray):
    """Scratch buffers for the kernels, allocated once per rank and reused.

    acts: every layer's activations for one tile; deltas: two delta blocks
    (rows padded to whole vectors);
    nz_*: per layer input, the non-zero entries of each input unit's column
    (sample index and value, CSR over input units), left by the forward pass
    for the backward pass; grp_*: the input units that are non-zero in any of
    a group of GROUP samples and those samples' inputs, for the forward pass.
    """
    n_inputs = int(np.sum(sizes[:-1]))
    max_in = int(np.max(sizes[:-1]))
    acts = aligned_zeros(TILE * int(np.sum(sizes)))
    deltas = aligned_zeros(2 * TILE * int(_ld(int(np.max(sizes)))))
    nz_idx = np.zeros(TILE * n_inputs, np.int32)
    nz_val = np.zeros(TILE * n_inputs, np.float32)
    nz_ptr = np.zeros(n_inputs + len(sizes), np.int64)
    grp_idx = np.zeros(max_in, np.int32)
    grp_val = np.zeros(GROUP * max_in, np.float32)
    perm = np.zeros(2 * TILE, np.int64)  # the group order, then scratch for its keys
    return acts, deltas, nz_idx, nz_val, nz_ptr, grp_idx, grp_val, perm


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
        o = a_off + k
        for b in range(nb):
            v = acts[np.uint64(o)]  # unsigned: numba adds no negative-index wraparound
            nz_idx[np.uint64(q)] = b
            nz_val[np.uint64(q)] = v
            q += v != 0.0
            o += n_in
        nz_ptr[p_off + k + 1] = q


@njit(cache=True)
def _group_rows(perm, b0, g, off, n):
    """Offsets of the rows of samples perm[b0], ..., perm[b0+g-1] (g <= GROUP) in a
    block at `off` with rows n apart, as a GROUP-tuple (off for i >= g: unused)."""
    # no list: a heap allocation per call cost ~2.5 % of the evaluation
    r0 = off + np.int64(perm[b0]) * n
    r1 = off + np.int64(perm[b0 + 1]) * n if g > 1 else off
    r2 = off + np.int64(perm[b0 + 2]) * n if g > 2 else off
    r3 = off + np.int64(perm[b0 + 3]) * n if g > 3 else off
    r4 = off + np.int64(perm[b0 + 4]) * n if g > 4 else off
    return r0, r1, r2, r3, r4


@njit(cache=True)
def _compress_group(acts, rows, n_in, g, grp_idx, grp_val):
    """The input units k that are non-zero in any of a group of g <= GROUP samples,
    whose inputs are acts[rows[i]:rows[i]+n_in] (rows: `_group_rows`).

    grp_idx[c] = k and grp_val[GROUP*c:GROUP*c+GROUP] = the g samples' inputs k
    (0 for the missing samples of a short group), for c < the returned count;
    branch-free like `_compress`.
    """
    z = np.float32(0.0)
    u = np.uint64  # unsigned indices: numba adds no negative-index wraparound
    r0, r1, r2, r3, r4 = rows
    cnt = 0
    for k in range(n_in):
        v0 = acts[u(r0 + k)]
        v1 = acts[u(r1 + k)] if g > 1 else z
        v2 = acts[u(r2 + k)] if g > 2 else z
        v3 = acts[u(r3 + k)] if g > 3 else z
        v4 = acts[u(r4 + k)] if g > 4 else z
        c = GROUP * cnt
        grp_idx[u(cnt)] = k
        grp_val[u(c)] = v0
        grp_val[u(c + 1)] = v1
        grp_val[u(c + 2)] = v2
        grp_val[u(c + 3)] = v3
        grp_val[u(c + 4)] = v4
        cnt += (v0 != 0.0) | (v1 != 0.0) | (v2 != 0.0) | (v3 != 0.0) | (v4 != 0.0)
    return cnt


# Vectors of outputs per sample that the forward pass keeps in registers: 5
# samples x 2 vectors = 10 of AVX-512's 32 zmm registers; with AVX2's 16 ymm
# (two per vector) that would be 20 and spill in the inner loop, so there it
# is 1 vector per sample (10 ymm). Chosen when numba compiles, from the target
# it compiles for; only the outputs' grouping changes, not their sums.
_FWD_NV = 2 if VECTOR_BITS >= 512 else 1


@njit(cache=True)
def _store_group(acts, rows, j, g, a0, a1, a2, a3, a4, relu):
    """The group's output rows (offsets `rows`, g of them) at column j: one full
    vector each."""
    if relu:
        a0, a1, a2, a3, a4 = vrelu(a0), vrelu(a1), vrelu(a2), vrelu(a3), vrelu(a4)
    vstore(acts, rows[0] + j, a0)
    if g > 1:
        vstore(acts, rows[1] + j, a1)
    if g > 2:
        vstore(acts, rows[2] + j, a2)
    if g > 3:
        vstore(acts, rows[3] + j, a3)
    if g > 4:
        vstore(acts, rows[4] + j, a4)


@njit(cache=True)
def _dense_group(params, wo, bo, n_out, grp_idx, grp_val, cnt, acts, rows, g, relu):
    """Outputs of a group of g <= GROUP samples (rows at offsets `rows` of acts).

    z = bias + sum over the group's non-zero inputs k of a_k * W[k], in
    increasing k; _FWD_NV vectors of outputs of each of the GROUP samples stay
    in registers, so each loaded vector of W serves all of them (W_1 does not
    fit in L1: loading it once per sample made the forward pass L2-bound).
    A sample whose input k is zero adds 0 * W[k], which changes nothing (for
    finite weights; at most the sign of an exact zero, which no later step
    can see); a row-wise skip per sample would need a branch or W loaded
    once per sample, both slower.
    """
    j0 = np.int64(0)  # (np.int64: see _backward)
    if _FWD_NV == 2:
        while j0 + 2 * VW <= n_out:
            c0 = vload(params, bo + j0)
            c1 = vload(params, bo + j0 + VW)
            a00, a01, a10, a11, a20, a21, a30, a31 = c0, c1, c0, c1, c0, c1, c0, c1
            a40, a41 = c0, c1
            for q in range(cnt):
                o = wo + np.int64(grp_idx[q]) * n_out + j0
                w0 = vload(params, o)
                w1 = vload(params, o + VW)
                v = GROUP * q
                s = vsplat(grp_val[v])
                a00 = vmuladd(a00, s, w0)
                a01 = vmuladd(a01, s, w1)
                s = vsplat(grp_val[v + 1])
                a10 = vmuladd(a10, s, w0)
                a11 = vmuladd(a11, s, w1)
                s = vsplat(grp_val[v + 2])
                a20 = vmuladd(a20, s, w0)
                a21 = vmuladd(a21, s, w1)
                s = vsplat(grp_val[v + 3])
                a30 = vmuladd(a30, s, w0)
                a31 = vmuladd(a31, s, w1)
                s = vsplat(grp_val[v + 4])
                a40 = vmuladd(a40, s, w0)
                a41 = vmuladd(a41, s, w1)
            _store_group(acts, rows, j0, g, a00, a10, a20, a30, a40, relu)
            _store_group(acts, rows, j0 + VW, g, a01, a11, a21, a31, a41, relu)
            j0 += 2 * VW
    while j0 + VW <= n_out:
        c0 = vload(params, bo + j0)
        a0, a1, a2, a3, a4 = c0, c0, c0, c0, c0
        for q in range(cnt):
            w0 = vload(params, wo + np.int64(grp_idx[q]) * n_out + j0)
            v = GROUP * q
            a0 = vmuladd(a0, vsplat(grp_val[v]), w0)
            a1 = vmuladd(a1, vsplat(grp_val[v + 1]), w0)
            a2 = vmuladd(a2, vsplat(grp_val[v + 2]), w0)
            a3 = vmuladd(a3, vsplat(grp_val[v + 3]), w0)
            a4 = vmuladd(a4, vsplat(grp_val[v + 4]), w0)
        _store_group(acts, rows, j0, g, a0, a1, a2, a3, a4, relu)
        j0 += VW
    if j0 < n_out:
        m = n_out - j0
        c0 = vload_m(params, bo + j0, m)
        a0, a1, a2, a3, a4 = c0, c0, c0, c0, c0
        for q in range(cnt):
            w0 = vload_m(params, wo + np.int64(grp_idx[q]) * n_out + j0, m)
            v = GROUP * q
            a0 = vmuladd(a0, vsplat(grp_val[v]), w0)
            a1 = vmuladd(a1, vsplat(grp_val[v + 1]), w0)
            a2 = vmuladd(a2, vsplat(grp_val[v + 2]), w0)
            a3 = vmuladd(a3, vsplat(grp_val[v + 3]), w0)
            a4 = vmuladd(a4, vsplat(grp_val[v + 4]), w0)
        if relu:
            a0, a1, a2, a3, a4 = vrelu(a0), vrelu(a1), vrelu(a2), vrelu(a3), vrelu(a4)
        vstore_m(acts, rows[0] + j0, a0, m)
        if g > 1:
            vstore_m(acts, rows[1] + j0, a1, m)
        if g > 2:
            vstore_m(acts, rows[2] + j0, a2, m)
        if g > 3:
            vstore_m(acts, rows[3] + j0, a3, m)
        if g > 4:
            vstore_m(acts, rows[4] + j0, a4, m)


@njit(cache=True)
def _gather_augmented(acts, x, xscale, rows, aug, pos):
    """Layer 0 of `rows` (visit positions pos, pos+1, ...) with `aug`'s shifts and noise.

    Input (i, j, ch) of a sample shifted by (dy, dx) is pixel (i-dy, j-dx, ch)
    of its row of x, or 0 where that lies outside the image: per image row, a
    run of columns copied from source row i-dy, zeros on either side. The
    copies index views from 0 (a loop index numba cannot prove non-negative
    gets a wrap-around check that stops vectorisation: 4x slower here).
    Each value is float32(x * xscale) as without augmentation, then
    + float32(noise * z) with z a float64 N(0, 1) draw (numba draws float64
    normals twice as fast as float32 ones).
    """
    h, w, c = aug.height, aug.width, aug.channels
    rw = w * c
    d = h * rw
    sigma = aug.noise
    for b in range(rows.shape[0]):
        xr = x[rows[b]]
        a = acts[b * d:(b + 1) * d]
        dy = np.int64(aug.shifts[pos + b, 0])
        dx = np.int64(aug.shifts[pos + b, 1])
        c0 = max(0, dx) * c  # the columns (times channels) that have a source
        c1 = min(w, w + dx) * c
        for i in range(h):
            o = i * rw
            si = i - dy
            if si < 0 or si >= h or c0 >= c1:
                a[o:o + rw] = 0.0
                continue
            a[o:o + c0] = 0.0
            dst = a[o + c0:o + c1]
            src = xr[si * rw + c0 - dx * c:si * rw + c1 - dx * c]
            for k in range(dst.shape[0]):
                dst[k] = src[k] * xscale
            a[o + c1:o + rw] = 0.0
        if sigma != 0.0:
            z = aug.rng.standard_normal(d)
            for k in range(d):
                a[k] = a[k] + np.float32(sigma * z[k])


@njit(cache=True)
def _group_order(acts, nb, d, perm):
    """perm[:nb]: the samples in the order the forward pass groups them, GROUP at a
    time -- by increasing span from their first to their last non-zero input (ties
    in sample order), so that a group's samples share more of their non-zero
    inputs (Fashion-MNIST minibatches of 50: 16% fewer input units per group; of
    10: 6%). Which samples share a group changes no output's bits (see
    `_dense_group`); for nb <= GROUP there is one group and no sorting."""
    for b in range(nb):
        perm[b] = b
    if nb <= GROUP:
        return
    u = np.uint64  # unsigned indices: numba adds no negative-index wraparound
    span = perm[TILE:]
    for b in range(nb):
        o = b * d
        lo = 0
        while lo < d and acts[u(o + lo)] == 0.0:
            lo += 1
        hi = d - 1
        while hi > lo and acts[u(o + hi)] == 0.0:
            hi -= 1
        span[b] = hi - lo
    for i in range(1, nb):  # insertion sort: stable, and nb <= TILE is small
        p = perm[i]
        s = span[p]
        j = i - 1
        while j >= 0 and span[perm[j]] > s:
            perm[j + 1] = perm[j]
            j -= 1
        perm[j + 1] = p


@njit(cache=True)
def _forward(params, sizes, woff, boff, x, xscale, rows, ws, for_backward=True, aug=None,
             pos=0):
    """Activations of len(rows) samples; returns the offset of the output layer.

    acts holds layer l's activations as an (nb, sizes[l]) row-major block;
    layer 0 is the scaled input, hidden layers are post-ReLU, the last block
    holds the raw outputs (logits). With for_backward, leaves each layer
    input's column CSR in ws for `_backward`. With an Augment `aug`, layer 0
    is the augmented input of the samples visited at positions pos, pos+1, ...
    (without, numba compiles the plain gather alone: `aug is None` is decided
    at compile time).
    """
    acts, _, nz_idx, nz_val, nz_ptr, grp_idx, grp_val, perm = ws
    nb = rows.shape[0]
    d = sizes[0]
    if aug is None:
        for b in range(nb):
            xr = x[rows[b]]
            a = acts[b * d:(b + 1) * d]
            for k in range(d):
                a[k] = xr[k] * xscale
    else:
        _gather_augmented(acts, x, xscale, rows, aug, pos)
    _group_order(acts, nb, d, perm)
    a_off = np.int64(0)  # (np.int64: see _backward)
    p_off = np.int64(0)  # where this layer's CSR starts in nz_ptr / nz_idx
    q_off = np.int64(0)
    nlayers = sizes.shape[0] - 1
    for l in range(nlayers):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        z_off = a_off + nb * n_in
        for b0 in range(0, nb, GROUP):
            g = min(GROUP, nb - b0)
            cnt = _compress_group(acts, _group_rows(perm, b0, g, a_off, n_in), n_in, g,
                                  grp_idx, grp_val)
            _dense_group(params, woff[l], boff[l], n_out, grp_idx, grp_val, cnt, acts,
                         _group_rows(perm, b0, g, z_off, n_out), g, l < nlayers - 1)
        if for_backward:
            _compress(acts, a_off, nb, n_in, nz_idx, nz_val, nz_ptr, p_off, q_off)
            q_off = nz_ptr[p_off + n_in]
            p_off += n_in + 1
        a_off = z_off
    return a_off


@njit(cache=True)
def _loss_and_delta(acts, out_off, nb, ncls, y, rows, loss_kind, deltas, want_delta):
    """Sum of the losses of nb samples and, if wanted, dLoss/dOutput per sample.

    Also returns how many samples were classified correctly (argmax).
    """
    loss = 0.0
    correct = 0
    ld = _ld(ncls)
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
                    deltas[b * ld + c] = p - (1.0 if c == t else 0.0)
        else:
            s = 0.0
            for c in range(ncls):
                e = acts[o + c] - (1.0 if c == t else 0.0)
                s += e * e
                if want_delta:
                    deltas[b * ld + c] = 2.0 * e / ncls
            loss += s / ncls
    return loss, correct


@njit(cache=True)
def _delta_in(params, wo, n_in, n_out, nz_idx, nz_ptr, p_off, deltas, d_out, d_in, nb):
    """Input delta of one layer from its weights, only where the input is non-zero.

    deltas[d_in + b*ld(n_in) + k] = W[k] . delta_out[b] for every non-zero input
    (b, k) -- a zero input is a ReLU that did not fire, whose delta is zero.
    Four vector accumulators take vectors j = 0,1,2,3 mod 4 of the row, the
    tail goes into the first, and they are summed (a0+a1)+(a2+a3), then
    across lanes by `vsum`.
    """
    ld_in = _ld(n_in)
    ld_out = _ld(n_out)
    for i in range(nb * ld_in):
        deltas[np.uint64(d_in + i)] = 0.0
    for k in range(n_in):
        row = wo + k * n_out
        for q in range(nz_ptr[p_off + k], nz_ptr[p_off + k + 1]):
            b = nz_idx[np.uint64(q)]  # unsigned: no wraparound code
            dl = d_out + b * ld_out
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            j0 = 0
            while j0 + 4 * VW <= n_out:
                a0 = vmuladd(a0, vload(params, row + j0), vload(deltas, dl + j0))
                a1 = vmuladd(a1, vload(params, row + j0 + VW), vload(deltas, dl + j0 + VW))
                a2 = vmuladd(a2, vload(params, row + j0 + 2 * VW),
                              vload(deltas, dl + j0 + 2 * VW))
                a3 = vmuladd(a3, vload(params, row + j0 + 3 * VW),
                              vload(deltas, dl + j0 + 3 * VW))
                j0 += 4 * VW
            while j0 < n_out:
                m = n_out - j0
                a0 = vmuladd(a0, vload_m(params, row + j0, m), vload_m(deltas, dl + j0, m))
                j0 += VW
            deltas[np.uint64(d_in + b * ld_in + k)] = vsum(vadd(vadd(a0, a1), vadd(a2, a3)))


@njit(cache=True)
def _weight_update(target, wo, bo, n_in, n_out, nz_idx, nz_val, nz_ptr, p_off, deltas,
                   d_out, nb, scale):
    """target[W] += scale * a^T delta_out and target[b] += scale * sum delta_out.

    For each input unit k with a non-zero input in the minibatch, 64 floats of
    row k at a time are held in four vector registers while the samples with
    a non-zero input k are added in, in increasing sample order; rows whose
    input is zero in every sample are not touched at all.
    """
    ld = _ld(n_out)
    for k in range(n_in):
        q0 = nz_ptr[p_off + k]
        q1 = nz_ptr[p_off + k + 1]
        if q0 == q1:
            continue
        row = wo + k * n_out
        j0 = np.int64(0)  # (np.int64: see _backward)
        while j0 + 4 * VW <= n_out:
            t0 = vload(target, row + j0)
            t1 = vload(target, row + j0 + VW)
            t2 = vload(target, row + j0 + 2 * VW)
            t3 = vload(target, row + j0 + 3 * VW)
            for q in range(q0, q1):
                c = vsplat(scale * nz_val[np.uint64(q)])  # unsigned: no wraparound code
                dl = d_out + nz_idx[np.uint64(q)] * ld + j0
                t0 = vmuladd(t0, c, vload(deltas, dl))
                t1 = vmuladd(t1, c, vload(deltas, dl + VW))
                t2 = vmuladd(t2, c, vload(deltas, dl + 2 * VW))
                t3 = vmuladd(t3, c, vload(deltas, dl + 3 * VW))
            vstore(target, row + j0, t0)
            vstore(target, row + j0 + VW, t1)
            vstore(target, row + j0 + 2 * VW, t2)
            vstore(target, row + j0 + 3 * VW, t3)
            j0 += 4 * VW
        while j0 < n_out:
            m = n_out - j0
            t0 = vload_m(target, row + j0, m)
            for q in range(q0, q1):
                dl = d_out + nz_idx[np.uint64(q)] * ld + j0
                t0 = vmuladd(t0, vsplat(scale * nz_val[np.uint64(q)]), vload_m(deltas, dl, m))
            vstore_m(target, row + j0, t0, m)
            j0 += VW
    s = vsplat(scale)
    j0 = np.int64(0)  # (np.int64: see _backward)
    while j0 < n_out:
        m = n_out - j0
        t0 = vload_m(target, bo + j0, m)
        for b in range(nb):
            t0 = vmuladd(t0, s, vload_m(deltas, d_out + b * ld + j0, m))
        vstore_m(target, bo + j0, t0, m)
        j0 += VW


@njit(cache=True)
def _backward(params, sizes, woff, boff, nb, ws, target, scale):
    """Backpropagate the output deltas; add scale * gradient into `target`.

    `target` is either a gradient buffer (scale = 1/batch) or, for fused plain
    SGD, the parameters themselves (scale = -lr/batch). Layer l's input delta
    is computed from W_l before W_l is touched, so both uses are exact.
    Uses the CSR of each layer's inputs that `_forward` left in ws: an input
    that is zero contributes no gradient, and a hidden unit whose ReLU output
    is zero passes no delta back.
    """
    _, deltas, nz_idx, nz_val, nz_ptr, _, _, _ = ws
    nlayers = sizes.shape[0] - 1
    half = deltas.shape[0] // 2
    # offsets start as np.int64(0), not 0: a literal 0 reaching a callee makes numba
    # compile a second version of it for Literal[int](0) (~2 s more first-run compile)
    p_off = np.int64(0)  # start of the last layer's CSR in nz_ptr
    for l in range(nlayers - 1):
        p_off += sizes[l] + 1
    d_out = np.int64(0)  # offset of the current layer's output delta inside `deltas`
    for l in range(nlayers - 1, -1, -1):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        d_in = half - d_out  # the other half of the buffer
        if l > 0:
            _delta_in(params, woff[l], n_in, n_out, nz_idx, nz_ptr, p_off, deltas, d_out,
                      d_in, nb)
        _weight_update(target, woff[l], boff[l], n_in, n_out, nz_idx, nz_val, nz_ptr, p_off,
                       deltas, d_out, nb, scale)
        if l > 0:
            p_off -= sizes[l - 1] + 1
        d_out = d_in


@njit(cache=True, error_model="numpy")  # no ZeroDivisionError check: it blocks vectorisation
def _opt_step(params, grad, state, opt, lr, momentum, weight_decay, beta1, beta2,
              eps, step, prox_mu, anchor, correction):
    """One optimizer step over the flat vector.

    The gradient is first completed in `grad` (a scratch buffer) with weight
    decay (L2), the FedProx proximal term mu * (w - anchor) and a
    control-variate correction (SCAFFOLD), whichever are active; then SGD
    (optional heavy-ball momentum, PyTorch convention v = m v + g) or Adam
    (bias-corrected) steps. One branch-free loop per term and per optimizer:
    a loop with the choices inside is not vectorised (Adam's scalar square
    roots and divisions then cost more than the whole forward pass at B=10).
    """
    n = params.shape[0]
    if weight_decay != 0.0:
        for i in range(n):
            grad[i] += weight_decay * params[i]
    if anchor.shape[0] == n and prox_mu != 0.0:
        for i in range(n):
            grad[i] += prox_mu * (params[i] - anchor[i])
    if correction.shape[0] == n:
        for i in range(n):
            grad[i] += correction[i]
    if opt == OPT_SGD:
        if momentum != 0.0:
            for i in range(n):
                v = momentum * state[i] + grad[i]
                state[i] = v
                params[i] -= lr * v
        else:
            for i in range(n):
                params[i] -= lr * grad[i]
    else:
        bc1 = 1.0 - beta1 ** step
        bc2 = 1.0 - beta2 ** step
        m1 = state[:n]
        m2 = state[n:2 * n]
        for i in range(n):
            g = grad[i]
            m = beta1 * m1[i] + (1.0 - beta1) * g
            v = beta2 * m2[i] + (1.0 - beta2) * g * g
            m1[i] = m
            m2[i] = v
            params[i] -= lr * (m / bc1) / (np.sqrt(v / bc2) + eps)


@njit(cache=True)
def gradient(params, sizes, woff, boff, x, xscale, y, rows, loss_kind, grad, ws, aug=None,
             pos=0):
    """Mean-loss gradient over `rows` into `grad` (overwritten); returns the loss sum.

    aug, pos: `_forward`'s augmentation of the rows (visit positions pos, ...)."""
    grad[:] = 0.0
    n = rows.shape[0]
    ncls = sizes[sizes.shape[0] - 1]
    scale = np.float32(1.0 / n)
    loss = 0.0
    for t0 in range(0, n, TILE):
        tile = rows[t0:min(n, t0 + TILE)]
        nb = tile.shape[0]
        out = _forward(params, sizes, woff, boff, x, xscale, tile, ws, True, aug, pos + t0)
        l, _ = _loss_and_delta(ws[0], out, nb, ncls, y, tile, loss_kind, ws[1], True)
        loss += l
        _backward(params, sizes, woff, boff, nb, ws, grad, scale)
    return loss


def train_local(params, sizes, woff, boff, x, xscale, y, order, settings, anchor, correction,
                grad, state, ws, aug=None):
    """Run `settings.epochs` epochs of minibatch training in place on `params`.

    order: epochs * n sample indices; epoch e visits order[e*n:(e+1)*n] in
    that order, in minibatches of `settings.batch` (0 = the full n); the last
    minibatch of an epoch may be smaller. anchor (FedProx) and correction
    (SCAFFOLD) are used when they have the parameters' length (pass empty
    arrays otherwise). aug: an Augment (image shifts and noise per visited
    sample) or None. Returns (sum of per-sample losses seen before each
    step, number of samples seen, number of steps).
    """
    n = order.shape[0] // settings.epochs
    batch = n if settings.batch <= 0 or settings.batch > n else settings.batch
    # plain SGD steps straight from the backward pass into params (no gradient buffer);
    # a control-variate correction (SCAFFOLD) is then one more pass: w -= lr * correction
    fused = (settings.opt == OPT_SGD and settings.momentum == 0.0
             and settings.weight_decay == 0.0
             and (settings.prox_mu == 0.0 or anchor.shape[0] == 0) and batch <= TILE)
    # decided here, in Python: the fused loop gets state=None, and numba prunes the
    # branch on `state is None` at compile time, so a run compiles only the loop it
    # uses (the general one brings in the optimizer steps)
    return _train(params, sizes, woff, boff, x, xscale, y, order, settings, anchor, correction,
                  grad, None if fused else state, ws, aug)


@njit(cache=True)
def _train(params, sizes, woff, boff, x, xscale, y, order, settings, anchor, correction,
           grad, state, ws, aug):
    """train_local's loop; state None: the fused plain-SGD steps."""
    epochs, batch, loss_kind, opt = settings.epochs, settings.batch, settings.loss, settings.opt
    lr, momentum, weight_decay = settings.lr, settings.momentum, settings.weight_decay
    beta1, beta2, eps, prox_mu = settings.beta1, settings.beta2, settings.eps, settings.prox_mu
    n = order.shape[0] // epochs
    if batch <= 0 or batch > n:
        batch = n
    ncls = sizes[sizes.shape[0] - 1]
    corrected = correction.shape[0] == params.shape[0]
    if state is not None:
        state[:] = 0.0
    loss = 0.0
    steps = 0
    for e in range(epochs):
        for s0 in range(e * n, (e + 1) * n, batch):
            rows = order[s0:min((e + 1) * n, s0 + batch)]
            nb = rows.shape[0]
            if state is None:
                out = _forward(params, sizes, woff, boff, x, xscale, rows, ws, True, aug, s0)
                l, _ = _loss_and_delta(ws[0], out, nb, ncls, y, rows, loss_kind, ws[1], True)
                loss += l
                _backward(params, sizes, woff, boff, nb, ws, params,
                          np.float32(-lr / nb))
                if corrected:
                    for i in range(params.shape[0]):
                        params[i] -= lr * correction[i]
            else:
                loss += gradient(params, sizes, woff, boff, x, xscale, y, rows,
                                 loss_kind, grad, ws, aug, s0)
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
        out = _forward(params, sizes, woff, boff, x, xscale, tile, ws, False)
        l, c = _loss_and_delta(ws[0], out, tile.shape[0], ncls, y, tile, loss_kind, ws[1], False)
        loss += l
        correct += c
    return loss, correct


# ----------------------------------------------------------------------------
# Evaluation: forward only, samples grouped by their non-zero inputs
# ----------------------------------------------------------------------------
#
# The forward pass above is compute-bound at the group's union of non-zero
# inputs: the five samples of a group all multiply-add every input unit that
# is non-zero in any of them. Five consecutive Fashion-MNIST test images have
# 82% of the 784 pixels in that union, though each has only 50%. Evaluation
# needs no backward pass and its samples are fixed, so it can group samples
# that look alike instead: sorted by the bounding box of their non-zero
# inputs, five neighbours share 65% of the pixels, 21% fewer multiply-adds
# in the first layer (and similar activation patterns downstream).
#
# Bits: every output is still bias + sum over that sample's non-zero inputs k,
# in increasing k, each product rounded, then the sum -- only which samples
# share a loaded vector of weights changes (a term 0 * W[k] added for another
# sample of the group changes nothing, for finite weights). The loss is then
# summed in the chunk's sample order with the very code and tiling of
# `evaluate`, so `evaluate_grouped` returns the same bits as `evaluate`
# (tests/test_kernels.py checks that on every instruction set).


def eval_order(x: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of x (int64) in an order that puts samples with similar
    non-zero inputs next to each other: sorted by the bounding box of the non-zero
    features, read as a square image when the feature count is a square (a single
    row of features otherwise). Any order gives the same results; this one makes
    `evaluate_grouped`'s groups of GROUP samples share most of their non-zeros."""
    nz = np.asarray(x[start:stop]) != 0
    n, d = nz.shape
    side = int(round(np.sqrt(d)))
    shape = (side, side) if side * side == d else (1, d)
    img = nz.reshape(n, *shape)

    def extent(mask):  # first and one past the last True along axis 1 (0, 0 if none)
        lo = np.where(mask.any(axis=1), mask.argmax(axis=1), 0)
        hi = np.where(mask.any(axis=1), mask.shape[1] - mask[:, ::-1].argmax(axis=1), 0)
        return lo, hi

    left, right = extent(img.any(axis=1))
    top, bottom = extent(img.any(axis=2))
    return start + np.lexsort((bottom, top, right, left)).astype(np.int64)


def eval_workspace(sizes: np.ndarray, chunk: int):
    """Buffers of `evaluate_grouped` for chunks of up to `chunk` samples: every
    layer's outputs in grouped order, the logits back in row order, the group
    CSR of a layer's inputs and one group's scaled input rows."""
    ld = int(_ld(int(np.max(sizes[1:]))))
    n_layers = len(sizes) - 1
    outs = aligned_zeros(n_layers * chunk * ld)
    logits = aligned_zeros(chunk * int(sizes[-1]))
    max_in = int(np.max(sizes[:-1]))
    grp_idx = np.zeros(max_in, np.int32)
    grp_val = np.zeros(GROUP * max_in, np.float32)
    group_in = aligned_zeros(GROUP * int(sizes[0]))
    return outs, logits, grp_idx, grp_val, group_in


@njit(cache=True)
def evaluate_grouped(params, sizes, woff, boff, x, xscale, y, order, loss_kind, ews):
    """`evaluate` over the rows in `order` (a permutation of start..stop-1, e.g.
    `eval_order`'s): (sum of losses, number correct), the same bits as
    evaluate(..., start, stop, ...). Forward only, GROUP samples at a time in
    `order`; the losses are summed in row order, in tiles of TILE as `evaluate` does."""
    outs, logits, grp_idx, grp_val, group_in = ews
    nb = order.shape[0]
    if nb == 0:
        return 0.0, 0
    start = order.min()
    nlayers = sizes.shape[0] - 1
    ncls = sizes[nlayers]
    ld = _ld(np.max(sizes[1:]))
    seq = np.arange(nb)  # groups of consecutive rows of `order`
    if outs.shape[0] < nlayers * nb * ld or logits.shape[0] < nb * ncls:
        raise ValueError("evaluate_grouped: eval_workspace made for smaller chunks")
    z_prev = np.int64(0)  # (np.int64: see _backward)
    for l in range(nlayers):
        n_in = sizes[l]
        n_out = sizes[l + 1]
        z_off = l * nb * ld  # layer l's outputs in `order`, rows n_out apart
        for b0 in range(0, nb, GROUP):
            g = min(GROUP, nb - b0)
            if l == 0:  # the group's inputs, scaled exactly as `_forward` scales them
                for i in range(g):
                    xr = x[order[b0 + i]]
                    a = group_in[i * n_in:(i + 1) * n_in]
                    for k in range(n_in):
                        a[k] = xr[k] * xscale
                cnt = _compress_group(group_in, _group_rows(seq, 0, g, np.int64(0), n_in),
                                      n_in, g, grp_idx, grp_val)
            else:
                cnt = _compress_group(outs, _group_rows(seq, b0, g, z_prev, n_in), n_in, g,
                                      grp_idx, grp_val)
            _dense_group(params, woff[l], boff[l], n_out, grp_idx, grp_val, cnt, outs,
                         _group_rows(seq, b0, g, z_off, n_out), g, l < nlayers - 1)
        z_prev = z_off
    for p in range(nb):  # the logits back in row order
        o = z_prev + p * ncls
        r = (order[p] - start) * ncls
        for c in range(ncls):
            logits[r + c] = outs[o + c]
    loss = 0.0
    correct = 0
    for t0 in range(0, nb, TILE):
        m = min(nb, t0 + TILE) - t0
        l, c = _loss_and_delta(logits, t0 * ncls, m, ncls, y, np.arange(start + t0, start + t0 + m),
                               loss_kind, logits, False)
        loss += l
        correct += c
    return loss, correct
