"""The compression steps of a round, as pure objects the runtime calls.

Uplink (each client, on whichever rank trains it):
    update -> (+ error-feedback residual) -> codec.encode -> bytes
Uplink (rank 0): decode every client's bytes, in ascending client-id order,
    and sum them with the clients' weights in float64 -- a fixed order of
    fixed values, so the sum is the same for any rank count.
Downlink (rank 0, after the server step): prune (persistent mask), or
    compress the model change; the bytes each client would receive are
    counted from the real buffer.

No MPI and no I/O here: moving the buffers and the residual rows is the
runtime's job.
"""

from __future__ import annotations

import numpy as np

from fedmpi.compression import codecs, prune
from fedmpi.compression.error_feedback import compress_with_feedback
from fedmpi.compression.wire import Key
from fedmpi.model.mlp import MLP


def warnings_for(cfg) -> list[str]:
    """Settings that work but probably do not do what the user wants (printed by rank 0)."""
    out = []
    if cfg.error_feedback and cfg.compress in ("none", "randk", "qsgd", "fp16"):
        what = "no compressor" if cfg.compress == "none" else \
            f"--compress {cfg.compress}, which is unbiased or near-lossless"
        out.append(f"--error-feedback with {what}: harmless but it changes nothing that "
                   "matters; it is meant for the biased topk and sign")
    if cfg.compress in ("topk", "sign") and not cfg.error_feedback:
        out.append(f"--compress {cfg.compress} without --error-feedback is biased and may "
                   "converge to a worse model (Karimireddy et al. 2019)")
    return out


def uplink_codec(cfg):
    """The uplink codec of a config, or None for --compress none."""
    return codecs.make_codec(cfg.compress, ratio=cfg.compress_ratio, bits=cfg.compress_bits,
                             bucket=cfg.compress_bucket, coding=cfg.qsgd_coding)


class Uplink:
    """Client-side encoding (with optional error feedback) and server-side decoding."""

    def __init__(self, cfg):
        self.codec = uplink_codec(cfg)
        if self.codec is None:
            raise ValueError("Uplink needs a compressor (--compress is none)")
        self.error_feedback = bool(cfg.error_feedback)
        self.seed = int(cfg.seed)

    def client(self, update: np.ndarray, client_id: int, rnd: int,
               residual: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(bytes to send, new residual or None without error feedback)."""
        key = Key(self.seed, rnd, client_id, "compress")
        if not self.error_feedback:
            return self.codec.encode(np.ascontiguousarray(update, np.float32), key), None
        buf, _, new_residual = compress_with_feedback(self.codec, update, residual, key)
        return buf, new_residual

    @staticmethod
    def decode_all(buffers: list[np.ndarray]) -> np.ndarray:
        """float32 (n, P) decoded updates, in the order given."""
        return np.stack([codecs.decode(b) for b in buffers])

    @staticmethod
    def weighted_sum(buffers: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
        """sum_k weights[k] * decode(buffers[k]) in float64, k in the order given."""
        total = None
        for buf, w in zip(buffers, np.asarray(weights, np.float64)):
            dec = codecs.decode(buf)
            if total is None:
                total = np.zeros(dec.size, np.float64)
            total += w * dec.astype(np.float64)
        return total


class Downlink:
    """What the server broadcasts after its step: pruned model, or a compressed change."""

    def __init__(self, cfg, model: MLP):
        self.model = model
        self.seed = int(cfg.seed)
        self.prune_to = float(cfg.prune)
        self.prune_start, self.prune_end = int(cfg.prune_start), int(cfg.prune_end)
        self.codec = codecs.make_codec(cfg.compress_down, bits=cfg.compress_bits,
                                       bucket=cfg.compress_bucket, coding=cfg.qsgd_coding)
        self.mask: np.ndarray | None = None  # keep-mask once pruning has started
        self.sparsity = 0.0  # of the weights (biases excluded), as last pruned

    @property
    def active(self) -> bool:
        return self.prune_to > 0 or self.codec is not None

    def server(self, old: np.ndarray, new: np.ndarray, rnd: int) -> int:
        """Turn `new` (float32, in place) into what clients receive; returns its bytes per client."""
        if self.prune_to > 0:
            target = prune.sparsity_at(rnd, self.prune_to, self.prune_start, self.prune_end)
            if target > self.sparsity or (self.mask is None and target > 0):
                self.mask = prune.prune_mask(new, self.model, target, self.mask)
                self.sparsity = target
            if self.mask is not None:
                prune.apply_mask(new, self.mask)
                return int(prune.encode_masked(new, self.mask).size)
            return 4 * new.size
        if self.codec is not None:
            delta = new - old
            buf = self.codec.encode(delta, Key(self.seed, rnd, 0, "compress_down"))
            # Everyone, the server included, continues from what was received.
            new[:] = old + codecs.decode(buf)
            return int(buf.size)
        return 4 * new.size

    def mask_update(self, update: np.ndarray) -> None:
        """Zero a client's update where the model is pruned, so pruned weights stay zero."""
        if self.mask is not None:
            update[~self.mask] = 0.0

    def state(self) -> dict[str, np.ndarray]:
        if self.mask is None:
            return {}
        return {"prune_mask": np.packbits(self.mask, bitorder="little"),
                "prune_sparsity": np.array(self.sparsity)}

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "prune_mask" in arrays:
            self.mask = np.unpackbits(np.asarray(arrays["prune_mask"], np.uint8),
                                      count=self.model.num_params,
                                      bitorder="little").astype(bool)
            self.sparsity = float(arrays["prune_sparsity"])

    def weight_sparsity(self) -> float:
        """Fraction of weights (not biases) that are pruned, measured from the mask."""
        if self.mask is None:
            return 0.0
        pruned = total = 0
        for (w, _) in self.model.layers(self.mask):
            pruned += int(w.size - np.count_nonzero(w))
            total += w.size
        return pruned / total
