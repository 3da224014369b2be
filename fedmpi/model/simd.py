"""Explicit SIMD for the layer loops: a 16 x float32 vector type and the few
operations the kernels need, as numba intrinsics emitting LLVM vector IR.

A vector value lives in registers (one zmm with AVX-512, two ymm with AVX2,
four xmm with SSE2); the arithmetic has no fast-math flags, so LLVM neither
contracts it into FMAs nor reorders it, and every lane computes the same
IEEE operations on every instruction set. No bounds checks: callers keep
every access inside its array, using the masked load/store (lanes >= n
untouched) for the last < 16 floats of a row.

`VECTOR_BITS` is the register width numba compiles for (it honours
NUMBA_CPU_NAME / NUMBA_CPU_FEATURES); the kernels read it as a compile-time
constant to choose their register blocking -- only how many independent
outputs are kept in registers at once, never the order of any output's sums.

numba's on-disk cache of the kernels is keyed on kernels.py (and the target
CPU), not on this file: after editing this file, touch kernels.py.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils, config
from numba.extending import intrinsic, models, register_model

VW = 16  # floats per vector


def _probe_vector_bits(cpu: str, features: str) -> int:
    """Widest float register LLVM uses for (cpu, features): compile a 16-float add
    and look at the registers in the assembly (asks LLVM itself, so CPU names
    that imply AVX-512 or AVX2 by default are handled without a table)."""
    import llvmlite.binding as llvm

    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    mod = llvm.parse_assembly(
        "define void @f(<16 x float>* %p) {\n"
        "  %a = load <16 x float>, <16 x float>* %p\n"
        "  %b = fadd <16 x float> %a, %a\n"
        "  store <16 x float> %b, <16 x float>* %p\n"
        "  ret void\n}\n")
    tm = llvm.Target.from_default_triple().create_target_machine(cpu=cpu, features=features,
                                                                 opt=2)
    asm = tm.emit_assembly(mod)
    return 512 if "zmm" in asm else 256 if "ymm" in asm else 128


def _target_vector_bits() -> int:
    """The SIMD width numba's code generator targets in this process."""
    import llvmlite.binding as llvm

    if config.CPU_FEATURES is None:  # numba then uses the host's features (any CPU name)
        feats = llvm.get_host_cpu_features()
        if feats.get("avx512f", False):
            return 512
        return 256 if feats.get("avx", False) else 128
    return _probe_vector_bits(config.CPU_NAME or llvm.get_host_cpu_name(), config.CPU_FEATURES)


try:
    VECTOR_BITS = _target_vector_bits()
except Exception:  # pragma: no cover - a non-x86 host or an llvmlite without the API
    VECTOR_BITS = 128  # the small blocking: correct everywhere, at worst slower


def aligned_zeros(n, dtype=np.float32):
    """Zeros starting on a 64-byte (cache line) boundary."""
    itemsize = np.dtype(dtype).itemsize
    buf = np.zeros(n + 64 // itemsize, dtype)
    off = (-buf.ctypes.data % 64) // itemsize
    return buf[off:off + n]


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
def vload(typingctx, arr, i):
    """arr[i:i+VW] as a vector."""
    if not _is_vec_array(arr):
        return None
    sig = f32vec(arr, types.intp)

    def codegen(context, builder, sig, args):
        return builder.load(_vaddr(context, builder, sig.args[0], args[0], args[1]), align=4)
    return sig, codegen


@intrinsic
def vstore(typingctx, arr, i, v):
    """arr[i:i+VW] = v."""
    if not _is_vec_array(arr):
        return None
    sig = types.void(arr, types.intp, f32vec)

    def codegen(context, builder, sig, args):
        builder.store(args[2], _vaddr(context, builder, sig.args[0], args[0], args[1]), align=4)
        return context.get_dummy_value()
    return sig, codegen


@intrinsic
def vload_m(typingctx, arr, i, n):
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
def vstore_m(typingctx, arr, i, v, n):
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
def vsplat(typingctx, x):
    """x in every lane."""
    sig = f32vec(types.float32)

    def codegen(context, builder, sig, args):
        v = builder.insert_element(ir.Constant(_VEC, None), args[0], ir.Constant(_I32, 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I32, VW), [0] * VW))
    return sig, codegen


@intrinsic
def vzero(typingctx):
    sig = f32vec()

    def codegen(context, builder, sig, args):
        return ir.Constant(_VEC, None)
    return sig, codegen


@intrinsic
def vmuladd(typingctx, acc, a, b):
    """acc + a * b, rounded after the multiply and after the add (never an FMA)."""
    sig = f32vec(f32vec, f32vec, f32vec)

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], builder.fmul(args[1], args[2]))
    return sig, codegen


@intrinsic
def vadd(typingctx, a, b):
    sig = f32vec(f32vec, f32vec)

    def codegen(context, builder, sig, args):
        return builder.fadd(args[0], args[1])
    return sig, codegen


@intrinsic
def vrelu(typingctx, v):
    """v where v >= 0 (or NaN), else 0."""
    sig = f32vec(f32vec)

    def codegen(context, builder, sig, args):
        z = ir.Constant(_VEC, None)
        return builder.select(builder.fcmp_ordered("<", args[0], z), z, args[0])
    return sig, codegen


@intrinsic
def vsum(typingctx, v):
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
