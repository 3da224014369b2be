"""What every encoded update shares: the 8-byte header and little-endian byte views.

Header: byte 0 codec id, byte 1 bits (codec-specific), byte 2 variant
(codec-specific, e.g. qsgd's coding), byte 3 zero, bytes 4-7 P as uint32.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

HEADER_BYTES = 8


class Key(NamedTuple):
    """Which update this is: names the random draws of randk and qsgd.

    purpose: "compress" for client uplinks, "compress-down" for the server's
    broadcast (fedmpi.rng.PURPOSES), so the two never share a stream.
    """

    seed: int
    round: int
    client: int
    purpose: str = "compress"

    def generator(self):
        from fedmpi.rng import generator

        return generator(self.seed, self.purpose, self.round, self.client)


def header(codec_id: int, bits: int, num_params: int, variant: int = 0) -> np.ndarray:
    h = np.zeros(HEADER_BYTES, np.uint8)
    h[0], h[1], h[2] = codec_id, bits, variant
    h[4:8] = np.array([num_params], "<u4").view(np.uint8)
    return h


def as_bytes(buf) -> np.ndarray:
    """A flat uint8 view of an ndarray, bytes or buffer-protocol object."""
    return buf.reshape(-1).view(np.uint8) if isinstance(buf, np.ndarray) \
        else np.frombuffer(buf, np.uint8)


def u32(*values) -> np.ndarray:
    return np.array(values, "<u4").view(np.uint8)


def f32_bytes(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, "<f4").view(np.uint8)


def num_kept(ratio: float, num_params: int) -> int:
    """k = ceil(ratio * P), at least 1 (P > 0)."""
    return max(1, min(num_params, math.ceil(ratio * num_params)))


def check_update(x: np.ndarray) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 1 or x.dtype != np.float32:
        raise ValueError(f"codecs take a flat float32 update, got {getattr(x, 'dtype', x)!r}")
    if x.size >= 2**32:
        raise ValueError("updates of 2^32 or more parameters do not fit the 32-bit header")
    return x
