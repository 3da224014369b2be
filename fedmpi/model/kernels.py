"""Numba kernels: forward, backward and optimizer steps of the MLP, on flat vectors.

No MPI, no I/O. One call of `train_local` runs a client's whole local
training (all epochs, all minibatches), so Python is entered once per client,
not once per step.

Why these loops are fast at the small batches federated learning uses:
- Zero inputs are skipped. About half of Fashion-MNIST's pixels and half of
  the ReLU outputs are exactly zero; each layer's input is compressed to its
  non-zero entries and only those rows of W_l are touched: in the forward
  pass (rows that are zero for all of a group of 4 samples), in the weight
  update and in the input delta (per sample and input unit).
- The layer loops are register-blocked with explicit SIMD (the `_v*`
  intrinsics below), because the loops LLVM vectorises by itself load and
  store the accumulator for every input (the previous version of these
  kernels; 1.5-1.8x slower overall). The forward pass keeps 32 outputs of 4
  samples in 8 vector registers, so each vector of W_l loaded from L2 serves
  four samples; the weight update keeps 64 floats of one row of W_l in 4
  registers while it adds in every sample whose input is non-zero, so a row
  is loaded and stored once per minibatch.
- The delta buffers are cache-line aligned with rows padded to whole vectors:
  a vector load that straddles two cache lines costs about twice as much.
- For plain SGD the weight update is fused into the backward pass: layer l's
  gradient is added into the parameters right after layer l's input delta
  has been computed from the old weights, so no gradient vector is written,
  zeroed or read back.
- Minibatches larger than TILE are processed TILE samples at a time with the
  gradient accumulated in a buffer, so the activations stay in cache.

Determinism: every loop runs in a fixed order, nothing is compiled with
fast-math, and the SIMD code spells out its arithmetic (a separate multiply
and add, never a fused multiply-add; dot products reduced lane-wise, then by
a fixed halving tree). The results are therefore bitwise repeatable on a
machine and across ranks, and do not depend on the CPU's vector width:
AVX-512, AVX2 and plain SSE2 code (NUMBA_CPU_NAME=generic) give the same bits
(checked for train_local; exp/log come from the C library, so use the same
software stack on every node).
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

LOSS_CE = 0  # softmax cross-entropy
LOSS_MSE = 1  # mean over classes of (output - one_hot)^2, linear outputs
LOSSES = {"cross_entropy": LOSS_CE, "mse": LOSS_MSE}

OPT_SGD = 0
OPT_ADAM = 1
OPTIMIZERS = {"sgd": OPT_SGD, "adam": OPT_ADAM}

TILE = 64  # samples per pass through the layers; bigger minibatches are tiled

# ----------------------------------------------------------------------------
# Explicit SIMD: a 16 x float32 vector type and the few operations the layer
# loops need, as numba intrinsics emitting LLVM vector IR. A vector value lives
# in a register (one zmm with AVX-512, two ymm with AVX2); the arithmetic has
# no fast-math flags, so LLVM neither contracts it into FMAs nor reorders it.
# No bounds checks: callers keep every access inside its array, using the
# masked load/store (lanes >= n untouched) for the last < 16 floats of a row.
# ----------------------------------------------------------------------------

VW = 16  # floats per vector
_F32 = ir.FloatType()
_I32 = ir.IntType(32)
_VEC = ir.VectorType(_F32, VW)
_VPTR = _VEC.as_pointer()
_MASK = ir.VectorType(ir.IntType(1), VW)


class _F32Vec(types.Type):
    def __init__(self):
        super().__init__(name=f"float32x{VW}")


f32vec = _F32Vec()


@register_model(_F32Vec)
class _F32VecModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _VEC)


def _is_vec_array(arr):
    """Only contiguous 1-D float32 arrays: the element address is data + i."""
    return (isinstance(arr, types.Array) and arr.ndim == 1 and arr.layout == "C"
            and arr.dtype == types.float32)


def _vaddr(context, builder, arrty, arr, i):
    a = context.make_array(arrty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [i], inbounds=True), _VPTR)


def _vmask(builder, n):
    """Lanes 0..n-1 on (all of them for n >= VW)."""
    n = builder.select(builder.icmp_signed(">", n, ir.Constant(n.type, VW)),
                       ir.Constant(n.type, VW), n)
    n = builder.trunc(n, _I32)
    nv = builder.insert_element(ir.Constant(ir.VectorType(_I32, VW), None), n,
                                ir.Constant(_I32, 0))
    nv = builder.shuffle_vector(nv, nv, ir.Constant(ir.VectorType(_I32, VW), [0] * VW))
    lanes = ir.Constant(ir.VectorType(_I32, VW), list(range(VW)))
    return builder.icmp_signed("<", lanes, nv)


@intrinsic
def _vload(typingctx, arr, i):
    """arr[i:i+VW] as a vector."""
    if not _is_vec_array(arr):
        return None
    sig = f32vec(arr, types.intp)

    def codegen(context, builder, sig, args):
        return builder.load(_vaddr(context, builder, sig.args[0], args[0], args[1]), align=4)
    return sig, codegen


@intrinsic
def _vstore(typingctx, arr, i, v):
    """arr[i:i+VW] = v."""
    if not _is_vec_array(arr):
        return None
    sig = types.void(arr, types.intp, f32vec)

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vaddr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _vload_m(typingctx, arr, i, n):
    """arr[i:i+n] in lanes 0..n-1, zeros above; reads nothing past arr[i+n-1]."""
    if not _is_vec_array(arr):
        return None
    sig = f32vec(arr, types.intp, types.intp)

    def codegen(context, builder, sig, args):
        p = _vaddr(context, builder, sig.args[0], args[0], args[1])
        fnty = ir.FunctionType(_VEC, [_VPTR, _I32, _MASK, _VEC])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.load.v{VW}f32.p0")
        return builder.call(fn, [p, ir.Constant(_I32, 4), _vmask(builder, args[2]),
                                 ir.Constant(_VEC, None)])
    return sig, codegen


@intrinsic
def _vstore_m(typingctx, arr, i, v, n):
    """arr[i:i+n] = lanes 0..n-1 of v; writes nothing else."""
    if not _is_vec_array(arr):
        return None
    sig = types.void(arr, types.intp, f32vec, types.intp)

    def codegen(context, builder, sig, args):
        p = _vaddr(context, builder, sig.args[0], args[0], args[1])
        fnty = ir.FunctionType(ir.VoidType(), [_VEC, _VPTR, _I32, _MASK])
        fn = cgutils.get_or_insert_function(builder.module, fnty, f"llvm.masked.store.v{VW}f32.p0")
        builder.call(fn, [args[2], p, ir.Constant(_I32, 4), _vmask(builder, args[3])])
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def _vsplat(typingctx, x):
    """x in every lane."""
    sig = f32vec(types.float32)

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_VEC, None), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, VW), [0] * VW))
    return sig, codegen


@intrinsic
def _vzero(typingctx):
    sig = f32vec()

    def codegen(context, builder, sig, args):
        return ir.Constant(_VEC, None)
    return sig, codegen


@intrinsic
def _vmuladd(typingctx, acc, a, b):
    """acc + a * b, rounded after the multiply and after the add (never an FMA)."""
    sig = f32vec(f32vec, f32vec, f32vec)

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2]))
    return sig, codegen


@intrinsic
def _vadd(typingctx, a, b):
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return sig, codegen


@intrinsic
def _vrelu(typingctx, v):
    """v where v >= 0 (or NaN), else 0."""
    sig = f32vec(f32vec)

    def codegen(context, builder, sig, args):
        z = ir.Constant(_VEC, None)
        return builder.select(builder.fcmp_ordered("<", args[0], z), z, args[0])
    return sig, codegen


@intrinsic
def _vsum(typingctx, v):
    """Sum of the lanes by a fixed halving tree: (lanes 0-7 + 8-15), then 0-3 + 4-7, ..."""
    sig = types.float32(f32vec)

    def codegen(context, builder, sig, args):
        v = args[0]
        w = VW
        while w > 1:
            h = w // 2
            half_t = ir.VectorType(_I32, h)
            lo = builder.shuffle_vector(v, v, ir.Constant(half_t, list(range(h))))
            hi = builder.shuffle_vector(v, v, ir.Constant(half_t, list(range(h, w))))
            v = builder.fadd(lo, hi)
            w = h
        return builder.extract_element(v, ir.Constant(_I32, 0))
    return sig, codegen


# ----------------------------------------------------------------------------
# Layer kernels
# ----------------------------------------------------------------------------

def aligned_zeros(n, dtype=np.float32):
    """Zeros starting on a 64-byte (cache line) boundary."""
    itemsize = np.dtype(dtype).itemsize
    buf = np.zeros(n + 64 // itemsize, dtype)
    off = (-buf.ctypes.data % 64) // itemsize
    return buf[off:off + n]


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
    a group of four samples and those samples' inputs, for the forward pass.
    """
    n_inputs = int(np.sum(sizes[:-1]))
    max_in = int(np.max(sizes[:-1]))
    acts = aligned_zeros(TILE * int(np.sum(sizes)))
    deltas = aligned_zeros(2 * TILE * int(_ld(int(np.max(sizes)))))
    nz_idx = np.zeros(TILE * n_inputs, np.int32)
    nz_val = np.zeros(TILE * n_inputs, np.float32)
    nz_ptr = np.zeros(n_inputs + len(sizes), np.int64)
    grp_idx = np.zeros(max_in, np.int32)
    grp_val = np.zeros(4 * max_in, np.float32)
    return acts, deltas, nz_idx, nz_val, nz_ptr, grp_idx, grp_val


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


@njit(cache=True)
def _compress_group(acts, a_off, n_in, b0, g, grp_idx, grp_val):
    """The input units k that are non-zero in any of samples b0..b0+g-1 (g <= 4).

    grp_idx[c] = k and grp_val[4c:4c+4] = the g samples' inputs k (0 for the
    missing samples of a short group), for c < the returned count; branch-free
    like `_compress`.
    """
    z = np.float32(0.0)
    o0 = a_off + b0 * n_in
    cnt = 0
    for k in range(n_in):
        v0 = acts[o0 + k]
        v1 = acts[o0 + n_in + k] if g > 1 else z
        v2 = acts[o0 + 2 * n_in + k] if g > 2 else z
        v3 = acts[o0 + 3 * n_in + k] if g > 3 else z
        grp_idx[cnt] = k
        grp_val[4 * cnt] = v0
        grp_val[4 * cnt + 1] = v1
        grp_val[4 * cnt + 2] = v2
        grp_val[4 * cnt + 3] = v3
        cnt += (v0 != 0.0) | (v1 != 0.0) | (v2 != 0.0) | (v3 != 0.0)
    return cnt


@njit(cache=True)
def _dense_group(params, wo, bo, n_out, grp_idx, grp_val, cnt, acts, zo, g, relu):
    """Outputs of a group of g <= 4 samples (rows zo, zo+n_out, ... of acts).

    z = bias + sum over the group's non-zero inputs k of a_k * W[k], in
    increasing k; 32 outputs of each of the 4 samples stay in 8 vector
    registers, so each loaded vector of W serves four samples (W_1 does not
    fit in L1: loading it once per sample made the forward pass L2-bound).
    A sample whose input k is zero adds 0 * W[k], which changes nothing (for
    finite weights); a row-wise skip per sample would need a branch or
    W loaded once per sample, both slower.
    """
    j0 = 0
    while j0 + 2 * VW <= n_out:
        c0 = _vload(params, bo + j0)
        c1 = _vload(params, bo + j0 + VW)
        a00, a01, a10, a11, a20, a21, a30, a31 = c0, c1, c0, c1, c0, c1, c0, c1
        for q in range(cnt):
            o = wo + np.int64(grp_idx[q]) * n_out + j0
            w0 = _vload(params, o)
            w1 = _vload(params, o + VW)
            s = _vsplat(grp_val[4 * q])
            a00 = _vmuladd(a00, s, w0)
            a01 = _vmuladd(a01, s, w1)
            s = _vsplat(grp_val[4 * q + 1])
            a10 = _vmuladd(a10, s, w0)
            a11 = _vmuladd(a11, s, w1)
            s = _vsplat(grp_val[4 * q + 2])
            a20 = _vmuladd(a20, s, w0)
            a21 = _vmuladd(a21, s, w1)
            s = _vsplat(grp_val[4 * q + 3])
            a30 = _vmuladd(a30, s, w0)
            a31 = _vmuladd(a31, s, w1)
        if relu:
            a00, a01, a10, a11 = _vrelu(a00), _vrelu(a01), _vrelu(a10), _vrelu(a11)
            a20, a21, a30, a31 = _vrelu(a20), _vrelu(a21), _vrelu(a30), _vrelu(a31)
        _vstore(acts, zo + j0, a00)
        _vstore(acts, zo + j0 + VW, a01)
        if g > 1:
            _vstore(acts, zo + n_out + j0, a10)
            _vstore(acts, zo + n_out + j0 + VW, a11)
        if g > 2:
            _vstore(acts, zo + 2 * n_out + j0, a20)
            _vstore(acts, zo + 2 * n_out + j0 + VW, a21)
        if g > 3:
            _vstore(acts, zo + 3 * n_out + j0, a30)
            _vstore(acts, zo + 3 * n_out + j0 + VW, a31)
        j0 += 2 * VW
    while j0 < n_out:
        m = n_out - j0
        c0 = _vload_m(params, bo + j0, m)
        a0, a1, a2, a3 = c0, c0, c0, c0
        for q in range(cnt):
            w0 = _vload_m(params, wo + np.int64(grp_idx[q]) * n_out + j0, m)
            a0 = _vmuladd(a0, _vsplat(grp_val[4 * q]), w0)
            a1 = _vmuladd(a1, _vsplat(grp_val[4 * q + 1]), w0)
            a2 = _vmuladd(a2, _vsplat(grp_val[4 * q + 2]), w0)
            a3 = _vmuladd(a3, _vsplat(grp_val[4 * q + 3]), w0)
        if relu:
            a0, a1, a2, a3 = _vrelu(a0), _vrelu(a1), _vrelu(a2), _vrelu(a3)
        _vstore_m(acts, zo + j0, a0, m)
        if g > 1:
            _vstore_m(acts, zo + n_out + j0, a1, m)
        if g > 2:
            _vstore_m(acts, zo + 2 * n_out + j0, a2, m)
        if g > 3:
            _vstore_m(acts, zo + 3 * n_out + j0, a3, m)
        j0 += VW


@njit(cache=True)
def _forward(params, sizes, woff, boff, x, xscale, rows, ws, for_backward=True):
    """Activations of len(rows) samples; returns the offset of the output layer.

    acts holds layer l's activations as an (nb, sizes[l]) row-major block;
    layer 0 is the scaled input, hidden layers are post-ReLU, the last block
    holds the raw outputs (logits). With for_backward, leaves each layer
    input's column CSR in ws for `_backward`.
    """
    acts, _, nz_idx, nz_val, nz_ptr, grp_idx, grp_val = ws
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
        for b0 in range(0, nb, 4):
            g = min(4, nb - b0)
            cnt = _compress_group(acts, a_off, n_in, b0, g, grp_idx, grp_val)
            _dense_group(params, woff[l], boff[l], n_out, grp_idx, grp_val, cnt, acts,
                         z_off + b0 * n_out, g, l < nlayers - 1)
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
    across lanes by `_vsum`.
    """
    ld_in = _ld(n_in)
    ld_out = _ld(n_out)
    for i in range(nb * ld_in):
        deltas[d_in + i] = 0.0
    for k in range(n_in):
        row = wo + k * n_out
        for q in range(nz_ptr[p_off + k], nz_ptr[p_off + k + 1]):
            b = nz_idx[q]
            dl = d_out + b * ld_out
            a0 = _vzero()
            a1 = _vzero()
            a2 = _vzero()
            a3 = _vzero()
            j0 = 0
            while j0 + 4 * VW <= n_out:
                a0 = _vmuladd(a0, _vload(params, row + j0), _vload(deltas, dl + j0))
                a1 = _vmuladd(a1, _vload(params, row + j0 + VW), _vload(deltas, dl + j0 + VW))
                a2 = _vmuladd(a2, _vload(params, row + j0 + 2 * VW),
                              _vload(deltas, dl + j0 + 2 * VW))
                a3 = _vmuladd(a3, _vload(params, row + j0 + 3 * VW),
                              _vload(deltas, dl + j0 + 3 * VW))
                j0 += 4 * VW
            while j0 < n_out:
                m = n_out - j0
                a0 = _vmuladd(a0, _vload_m(params, row + j0, m), _vload_m(deltas, dl + j0, m))
                j0 += VW
            deltas[d_in + b * ld_in + k] = _vsum(_vadd(_vadd(a0, a1), _vadd(a2, a3)))


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
        j0 = 0
        while j0 + 4 * VW <= n_out:
            t0 = _vload(target, row + j0)
            t1 = _vload(target, row + j0 + VW)
            t2 = _vload(target, row + j0 + 2 * VW)
            t3 = _vload(target, row + j0 + 3 * VW)
            for q in range(q0, q1):
                c = _vsplat(scale * nz_val[q])
                dl = d_out + nz_idx[q] * ld + j0
                t0 = _vmuladd(t0, c, _vload(deltas, dl))
                t1 = _vmuladd(t1, c, _vload(deltas, dl + VW))
                t2 = _vmuladd(t2, c, _vload(deltas, dl + 2 * VW))
                t3 = _vmuladd(t3, c, _vload(deltas, dl + 3 * VW))
            _vstore(target, row + j0, t0)
            _vstore(target, row + j0 + VW, t1)
            _vstore(target, row + j0 + 2 * VW, t2)
            _vstore(target, row + j0 + 3 * VW, t3)
            j0 += 4 * VW
        while j0 < n_out:
            m = n_out - j0
            t0 = _vload_m(target, row + j0, m)
            for q in range(q0, q1):
                dl = d_out + nz_idx[q] * ld + j0
                t0 = _vmuladd(t0, _vsplat(scale * nz_val[q]), _vload_m(deltas, dl, m))
            _vstore_m(target, row + j0, t0, m)
            j0 += VW
    s = _vsplat(scale)
    j0 = 0
    while j0 < n_out:
        m = n_out - j0
        t0 = _vload_m(target, bo + j0, m)
        for b in range(nb):
            t0 = _vmuladd(t0, s, _vload_m(deltas, d_out + b * ld + j0, m))
        _vstore_m(target, bo + j0, t0, m)
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
    _, deltas, nz_idx, nz_val, nz_ptr, _, _ = ws
    nlayers = sizes.shape[0] - 1
    half = deltas.shape[0] // 2
    p_off = 0  # start of the last layer's CSR in nz_ptr
    for l in range(nlayers - 1):
        p_off += sizes[l] + 1
    d_out = 0  # offset of the current layer's output delta inside `deltas`
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
        out = _forward(params, sizes, woff, boff, x, xscale, tile, ws, False)
        l, c = _loss_and_delta(ws[0], out, tile.shape[0], ncls, y, tile, loss_kind, ws[1], False)
        loss += l
        correct += c
    return loss, correct
