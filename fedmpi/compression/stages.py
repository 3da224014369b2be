"""Compression as update-pipeline stages (fedmpi/pipeline.py): pure, no MPI, no I/O.

- ``Compress`` (client side, last stage): update (+ error-feedback residual)
  -> codec bytes in ctx.payload; the runtime gathers the bytes to rank 0,
  which decodes them in ascending client-id order. The residual is the
  client's row of a ClientStateStore (fedmpi/state.py) kept on rank 0.
- ``Broadcast`` (server side, after the step): magnitude pruning with a
  persistent mask (clients zero their updates where the model is pruned), or
  compression of the model change (--compress-down); either way the bytes
  per client come from the real buffer.
"""

from __future__ import annotations

import numpy as np

from fedmpi.compression import codecs, prune
from fedmpi.compression.error_feedback import compress_with_feedback
from fedmpi.compression.wire import Key
from fedmpi.model.mlp import MLP
from fedmpi.pipeline import Stage, restore
from fedmpi.state import ClientStateStore


def warnings_for(cfg) -> list[str]:
    """Settings that work but probably do not do what the user wants (printed by rank 0)."""
    out = []
    if cfg.error_feedback and cfg.compress in ("none", "randk", "qsgd", "fp16"):
        what = "no compressor" if cfg.compress == "none" else \
            f"--compress {cfg.compress}, which is unbiased or near-lossless"
        out.append(f"--error-feedback with {what}: harmless, but it is meant for the biased "
                   "topk and sign")
    if cfg.compress in ("topk", "sign") and not cfg.error_feedback:
        out.append(f"--compress {cfg.compress} without --error-feedback is biased and may "
                   "converge to a worse model (Karimireddy et al. 2019)")
    return out


def uplink_codec(cfg):
    """The uplink codec of a config, or None for --compress none."""
    return codecs.make_codec(cfg.compress, ratio=cfg.compress_ratio, bits=cfg.compress_bits,
                             bucket=cfg.compress_bucket, coding=cfg.qsgd_coding)


def _codec_label(cfg, name: str) -> str:
    if name in ("topk", "randk"):
        return f"{name} (ratio {cfg.compress_ratio:g})"
    if name == "qsgd":
        return f"qsgd ({cfg.compress_bits} bits, buckets of {cfg.compress_bucket}, " \
               f"{cfg.qsgd_coding} coding)"
    return name


class Compress(Stage):
    """Each client's update becomes the bytes of a codec; error feedback optional."""

    name = "compress"
    encodes = True

    def __init__(self, cfg, model: MLP):
        self.codec = uplink_codec(cfg)
        if self.codec is None:
            raise ValueError("Compress needs a compressor (--compress is none)")
        self.error_feedback = bool(cfg.error_feedback)
        self.description = f"uplink compression: {_codec_label(cfg, cfg.compress)}"
        self.store = None
        if self.error_feedback:
            self.client_state = "ef_residual"
            # Rows only for clients that have trained; used on rank 0 only.
            self.store = ClientStateStore(model.num_params, name=self.client_state,
                                          spill_dir=cfg.client_state_dir, max_rows=cfg.clients)
            self.description += (f", error feedback ({self.store.describe(cfg.clients)}; "
                                 "--client-state-dir DIR keeps them on disk)")

    def client(self, update: np.ndarray, ctx) -> None:
        key = Key(ctx.seed, ctx.rnd, ctx.client_id, "compress")
        if self.error_feedback:
            buf, _, residual = compress_with_feedback(self.codec, update, ctx.state, key)
            ctx.state[:] = residual
        else:
            buf = self.codec.encode(np.ascontiguousarray(update, np.float32), key)
        ctx.payload = buf

    def decode(self, payload: np.ndarray) -> np.ndarray:
        return codecs.decode(payload)

    def warm_up(self, update: np.ndarray) -> None:
        codecs.decode(self.codec.encode(update, Key(0, 0, 0)))

    def state(self) -> dict[str, np.ndarray]:
        return {} if self.store is None else self.store.checkpoint()

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if self.store is not None:
            self.store.restore(arrays, "error feedback")


class Broadcast(Stage):
    """What the server broadcasts after its step: pruned model, or a compressed change."""

    name = "broadcast"

    def __init__(self, cfg, model: MLP):
        self.model = model
        self.seed = int(cfg.seed)
        self.prune_to = float(cfg.prune)
        self.prune_start, self.prune_end = int(cfg.prune_start), int(cfg.prune_end)
        self.codec = codecs.make_codec(cfg.compress_down, bits=cfg.compress_bits,
                                       bucket=cfg.compress_bucket, coding=cfg.qsgd_coding)
        self.mask: np.ndarray | None = None  # keep-mask once pruning has started
        self.sparsity = 0.0  # target sparsity of the weights, as last pruned
        if self.prune_to > 0:
            self.round_columns = ("weight_sparsity",)
            when = (f"after round {self.prune_start}" if self.prune_start == self.prune_end
                    else f"from round {self.prune_start} to {self.prune_end} (Zhu & Gupta)")
            self.description = (f"pruning: {self.prune_to:g} of each layer's weights by "
                                f"magnitude {when}; broadcast as mask + surviving values")
        else:
            self.description = f"downlink compression: {_codec_label(cfg, cfg.compress_down)}"

    # -- clients: keep pruned weights at zero ----------------------------------------

    def round_params(self, rnd: int) -> dict:
        if self.mask is None:
            return {}
        return {"mask": np.packbits(self.mask, bitorder="little")}

    def client(self, update: np.ndarray, ctx) -> None:
        packed = ctx.params.get(self.name, {}).get("mask")
        if packed is not None:
            keep = np.unpackbits(packed, count=update.size, bitorder="little").astype(bool)
            update[~keep] = 0.0

    # -- server --------------------------------------------------------------------

    def server(self, mean: np.ndarray, ctx) -> np.ndarray:
        if self.prune_to > 0:  # the sparsity of the model this round's clients trained
            ctx.metrics["weight_sparsity"] = self.weight_sparsity()
        return mean

    def downlink(self, old: np.ndarray, new: np.ndarray, rnd: int) -> int | None:
        if self.prune_to > 0:
            target = prune.sparsity_at(rnd, self.prune_to, self.prune_start, self.prune_end)
            if target > self.sparsity:
                self.mask = prune.prune_mask(new, self.model, target, self.mask)
                self.sparsity = target
            if self.mask is None:
                return None
            prune.apply_mask(new, self.mask)
            return int(prune.encode_masked(new, self.mask).size)
        if self.codec is not None:
            buf = self.codec.encode(new - old, Key(self.seed, rnd, 0, "compress-down"))
            new[:] = old + codecs.decode(buf)  # everyone, server too, goes on from this
            return int(buf.size)
        return None

    def warm_up(self, update: np.ndarray) -> None:
        if self.codec is not None:
            codecs.decode(self.codec.encode(update, Key(0, 0, 0, "compress-down")))

    def weight_sparsity(self) -> float:
        """Fraction of weights (not biases) pruned, counted from the mask."""
        if self.mask is None:
            return 0.0
        pruned = total = 0
        for w, _ in self.model.layers(self.mask):
            pruned += int(w.size - np.count_nonzero(w))
            total += w.size
        return pruned / total

    def state(self) -> dict[str, np.ndarray]:
        if self.mask is None:
            return {}
        return {"prune_mask": np.packbits(self.mask, bitorder="little"),
                "prune_sparsity": np.array([self.sparsity])}  # 1-D: what checkpoints hold

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        if "prune_mask" in arrays:  # absent: pruning had not started at the checkpoint
            packed = np.zeros(-(-self.model.num_params // 8), np.uint8)
            restore(packed, arrays, "prune_mask", "pruning")
            sparsity = np.zeros(1, np.float64)
            restore(sparsity, arrays, "prune_sparsity", "pruning")
            self.mask = np.unpackbits(packed, count=self.model.num_params,
                                      bitorder="little").astype(bool)
            self.sparsity = float(sparsity[0])


def stages_for(cfg, model: MLP) -> tuple[list[Stage], list[Stage]]:
    """(stages before the others, stages after them) that the config asks for.

    Pruning's client side comes first (pruned coordinates are zero before
    clipping measures the norm); compression comes last (clip, then compress).
    """
    first = [Broadcast(cfg, model)] if cfg.prune > 0 or cfg.compress_down != "none" else []
    last = [Compress(cfg, model)] if cfg.compress != "none" else []
    return first, last
