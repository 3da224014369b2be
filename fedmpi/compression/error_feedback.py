"""Error feedback (Seide et al. 2014; Stich et al. 2018; Karimireddy et al. 2019).

A client adds what compression dropped last time to its next update:

    corrected = x_t + e_t
    sent_t    = decode(encode(corrected))
    e_{t+1}   = corrected - sent_t

so sum_t sent_t + e_T = sum_t x_t: nothing is lost, only delayed. With a
biased compressor (topk, sign) this is what makes it converge (EF-SignSGD);
with an unbiased one (randk, qsgd) it is harmless but not needed.

The residual e_t is per-client state: it lives in a fedmpi.state.ClientStateStore
row, which is zero (absent) before the client's first round.
"""

from __future__ import annotations

import numpy as np

from fedmpi.compression.codecs import Key, decode


def compress_with_feedback(codec, update: np.ndarray, residual: np.ndarray | None,
                           key: Key) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(buffer, what the server will decode, new residual) for one client's update.

    `residual` None means zero (a client's first round). Inputs are not modified.
    """
    corrected = update.astype(np.float32, copy=True)
    if residual is not None:
        corrected += residual
    buf = codec.encode(corrected, key)
    sent = decode(buf)
    return buf, sent, corrected - sent


def needs_feedback(codec) -> bool:
    """Whether error feedback changes what a codec converges to (only biased ones)."""
    return codec is not None and codec.biased
