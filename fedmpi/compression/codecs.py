"""Codecs: a float32 update (P,) -> a real byte buffer (np.uint8) -> back.

Every buffer starts with the same 8-byte header (codec id, bits, P), so
``decode(buf)`` needs nothing but the buffer: rank 0 decodes whatever the
ranks gathered without knowing how each was made, and the bytes a run logs
are ``len(buf)`` -- what actually crossed MPI, header included.

Codecs (settings in the constructor, no state between calls):

- ``topk``  keep the k = ceil(ratio * P) largest-magnitude coordinates;
            ties broken by lower index. Sent as float32 values plus the
            sorted indices delta-coded as LEB128 varints (about 1-2 bytes
            each at ratio 0.01 instead of 4 for uint32). Biased.
- ``randk`` k = ceil(ratio * P) coordinates drawn without replacement from
            the key's (seed, purpose, round, client) generator, values scaled
            by P/k so that the decode is unbiased. Only the values and the
            16-byte key travel: the decoder draws the same indices again.
- ``qsgd``  Alistarh et al. (NeurIPS 2017): stochastic quantisation to
            2^bits - 1 levels per bucket, unbiased (fedmpi/compression/qsgd.py).
- ``sign``  1 bit per coordinate and one float32 scale ||x||_1 / P
            (Karimireddy et al. 2019, EF-SignSGD); 0 is sent as +. Biased.
- ``fp16``  IEEE half precision, saturated at +-65504 so that a large
            coordinate stays finite.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fedmpi import rng as _rng
from fedmpi.compression.qsgd import DEFAULT_BUCKET, QSGD
from fedmpi.compression.wire import (HEADER_BYTES, Key, as_bytes, check_update, f32_bytes,
                                     header, num_kept, u32)

__all__ = ["Key", "NAMES", "decode", "make_codec", "read_header", "topk_indices"]

_F16_MAX = np.float32(65504.0)


def read_header(buf) -> tuple[str, int, int]:
    """(codec name, bits, P) of an encoded buffer."""
    buf = as_bytes(buf)
    if buf.size < HEADER_BYTES:
        raise ValueError(f"encoded update of {buf.size} bytes is shorter than its header")
    cid = int(buf[0])
    if cid not in _BY_ID:
        raise ValueError(f"unknown codec id {cid} in encoded update")
    return _BY_ID[cid].name, int(buf[1]), int(buf[4:8].view("<u4")[0])


# -- top-k --------------------------------------------------------------------

def topk_indices(x: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest |x_i|; among equal |x_i| the lower index wins."""
    return _topk(check_update(x).view(np.uint32), k)


@njit(cache=True)
def _topk(bits, k):
    # Radix select on the bit patterns of |x| (for non-negative floats the
    # integer order is the float order): a histogram of the high 16 bits
    # finds the bucket of the k-th largest, one of the low 16 bits within it
    # finds its exact pattern t; then one scan in index order takes every
    # |x| > t and the first k - (count above t) with |x| == t. O(P), no sort.
    n = bits.shape[0]
    if k >= n:
        return np.arange(n)
    hist = np.zeros(65536, np.int64)
    for i in range(n):
        hist[(bits[i] & 0x7FFFFFFF) >> 16] += 1
    need = k
    hi = 65535
    while hist[hi] < need:
        need -= hist[hi]
        hi -= 1
    hist[:] = 0
    for i in range(n):
        a = bits[i] & 0x7FFFFFFF
        if (a >> 16) == hi:
            hist[a & 0xFFFF] += 1
    lo = 65535
    while hist[lo] < need:
        need -= hist[lo]
        lo -= 1
    t = (np.uint32(hi) << 16) | np.uint32(lo)
    ties = need  # how many |x| == t to take, lowest indices first
    out = np.empty(k, np.int64)
    m = 0
    for i in range(n):
        a = bits[i] & 0x7FFFFFFF
        if a > t or (a == t and ties > 0):
            if a == t:
                ties -= 1
            out[m] = i
            m += 1
    return out


@njit(cache=True)
def _varint_encode(idx, out):
    """Gaps between ascending indices (first from -1, minus 1) as LEB128; returns bytes used."""
    n = 0
    prev = -1
    for i in range(idx.shape[0]):
        g = idx[i] - prev - 1
        prev = idx[i]
        while g >= 128:
            out[n] = (g & 127) | 128
            g >>= 7
            n += 1
        out[n] = g
        n += 1
    return n


@njit(cache=True)
def _varint_decode(data, k, idx):
    """Inverse of _varint_encode; returns bytes consumed (or -1 if data ran out)."""
    n = 0
    prev = -1
    for i in range(k):
        g = 0
        shift = 0
        while True:
            if n >= data.shape[0]:
                return -1
            b = data[n]
            n += 1
            g |= np.int64(b & 127) << shift
            if b < 128:
                break
            shift += 7
        prev = prev + g + 1
        idx[i] = prev
    return n


class TopK:
    name, id, biased = "topk", 1, True

    def __init__(self, ratio: float):
        self.ratio = float(ratio)

    def encode(self, x: np.ndarray, key: Key | None = None) -> np.ndarray:
        x = check_update(x)
        idx = topk_indices(x, num_kept(self.ratio, x.size))
        gaps = np.empty(5 * idx.size, np.uint8)  # a uint32 gap takes at most 5 varint bytes
        used = _varint_encode(idx, gaps)
        return np.concatenate([header(self.id, 0, x.size), u32(idx.size),
                               f32_bytes(x[idx]), gaps[:used]])

    @staticmethod
    def decode(buf: np.ndarray, num_params: int) -> np.ndarray:
        k = int(buf[8:12].view("<u4")[0])
        values = buf[12:12 + 4 * k].view("<f4")
        idx = np.empty(k, np.int64)
        used = _varint_decode(buf[12 + 4 * k:], k, idx)
        if used < 0 or 12 + 4 * k + used != buf.size or (k and idx[-1] >= num_params):
            raise ValueError("corrupt topk buffer")
        out = np.zeros(num_params, np.float32)
        out[idx] = values
        return out


# -- random-k -----------------------------------------------------------------

def randk_indices(key: Key, k: int, num_params: int) -> np.ndarray:
    """The k ascending coordinates randk sends for this (seed, purpose, round, client)."""
    return np.sort(key.generator().choice(num_params, size=k, replace=False))


class RandK:
    name, id, biased = "randk", 2, False

    def __init__(self, ratio: float):
        self.ratio = float(ratio)

    def encode(self, x: np.ndarray, key: Key) -> np.ndarray:
        x = check_update(x)
        k = num_kept(self.ratio, x.size)
        idx = randk_indices(key, k, x.size)
        values = x[idx] * np.float32(x.size / k)
        # The key travels (16 bytes; its purpose in the header) instead of k indices.
        return np.concatenate([header(self.id, 0, x.size, _rng.PURPOSES[key.purpose]), u32(k),
                               np.array([key.seed], "<u8").view(np.uint8),
                               u32(key.round, key.client), f32_bytes(values)])

    @staticmethod
    def decode(buf: np.ndarray, num_params: int) -> np.ndarray:
        k = int(buf[8:12].view("<u4")[0]) if buf.size >= 12 else -1
        purpose = _PURPOSE_NAMES.get(int(buf[2]))
        if buf.size != 28 + 4 * k or not 0 < k <= num_params or purpose is None:
            raise ValueError("corrupt randk buffer")
        seed = int(buf[12:20].view("<u8")[0])
        round_, client = (int(v) for v in buf[20:28].view("<u4"))
        out = np.zeros(num_params, np.float32)
        out[randk_indices(Key(seed, round_, client, purpose), k, num_params)] = \
            buf[28:].view("<f4")
        return out


_PURPOSE_NAMES = {code: name for name, code in _rng.PURPOSES.items()}


# -- sign ---------------------------------------------------------------------

class Sign:
    name, id, biased = "sign", 4, True

    def encode(self, x: np.ndarray, key: Key | None = None) -> np.ndarray:
        x = check_update(x)
        scale = np.float32(np.abs(x).sum(dtype=np.float64) / x.size) if x.size else np.float32(0)
        return np.concatenate([header(self.id, 1, x.size), f32_bytes(np.array([scale])),
                               np.packbits(x < 0, bitorder="little")])

    @staticmethod
    def decode(buf: np.ndarray, num_params: int) -> np.ndarray:
        if buf.size != 12 + -(-num_params // 8):
            raise ValueError("corrupt sign buffer")
        scale = buf[8:12].view("<f4")[0]
        neg = np.unpackbits(buf[12:], count=num_params, bitorder="little")
        return scale - np.float32(2) * scale * neg  # +scale, or -scale where the bit is 1


# -- fp16 ---------------------------------------------------------------------

class FP16:
    name, id, biased = "fp16", 5, False  # round to nearest: error ~1e-3 relative, no drift

    def encode(self, x: np.ndarray, key: Key | None = None) -> np.ndarray:
        x = check_update(x)
        half = np.clip(x, -_F16_MAX, _F16_MAX).astype("<f2")
        return np.concatenate([header(self.id, 16, x.size), half.view(np.uint8)])

    @staticmethod
    def decode(buf: np.ndarray, num_params: int) -> np.ndarray:
        if buf.size != HEADER_BYTES + 2 * num_params:
            raise ValueError("corrupt fp16 buffer")
        return buf[HEADER_BYTES:].view("<f2").astype(np.float32)


# -- registry -----------------------------------------------------------------

_BY_ID = {c.id: c for c in (TopK, RandK, QSGD, Sign, FP16)}
NAMES = ("none",) + tuple(c.name for c in _BY_ID.values())


def make_codec(name: str, *, ratio: float = 0.01, bits: int = 8, bucket: int = DEFAULT_BUCKET,
               coding: str = "elias"):
    """The codec `name` with its settings, or None for "none" (updates travel as float32)."""
    if name == "none":
        return None
    if name in ("topk", "randk"):
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"compression ratio must be in (0, 1], got {ratio:g}")
        return (TopK if name == "topk" else RandK)(ratio)
    if name == "qsgd":
        return QSGD(bits, bucket, coding)
    if name == "sign":
        return Sign()
    if name == "fp16":
        return FP16()
    raise ValueError(f"unknown compressor {name!r}; choose from {', '.join(NAMES)}")


def decode(buf) -> np.ndarray:
    """The float32 (P,) update an encoded buffer carries, whichever codec made it."""
    buf = as_bytes(buf)
    name, _, p = read_header(buf)
    return _BY_ID[int(buf[0])].decode(buf, p)
