"""Malicious clients, to exercise the Byzantine-robust aggregators.

A seeded fraction f of the clients, round(f N) of them (at least one), are
attackers for the whole run, drawn once from the (seed, "attackers")
generator. What they do (--attack):
- signflip: send -scale * (their honest update);
- gaussian: send N(0, scale^2) noise per coordinate instead of an update,
  drawn from the (seed, "attack-noise", round, client) generator;
- labelflip: train honestly on flipped labels C - 1 - y (data poisoning;
  the update itself is left alone).
signflip and gaussian act on the update after training, as the client side
of a pipeline stage; labelflip changes local training through the stage's
`local_work`. Each client reports the column `attacker` (0/1).
"""

from __future__ import annotations

import numpy as np

from fedmpi.pipeline import ClientContext, Stage
from fedmpi.rng import generator


def choose_attackers(num_clients: int, fraction: float, seed: int) -> np.ndarray:
    """Ids of the malicious clients, ascending; the same for the whole run."""
    count = min(num_clients, max(1, int(round(fraction * num_clients))))
    ids = generator(seed, "attackers").choice(num_clients, size=count, replace=False)
    return np.sort(ids).astype(np.int64)


class Attack(Stage):
    name = "attack"
    client_columns = ("attacker",)

    def __init__(self, cfg):
        self.kind = cfg.attack
        self.scale = float(cfg.attack_scale)
        self.ids = choose_attackers(cfg.clients, cfg.attackers, cfg.seed)
        self._aggregator = cfg.aggregator
        self._clients = cfg.clients

    def is_attacker(self, client_id: int) -> bool:
        i = int(np.searchsorted(self.ids, client_id))
        return i < self.ids.shape[0] and int(self.ids[i]) == client_id

    @property
    def description(self) -> str:
        what = {"signflip": f"send -{self.scale:g} x their update",
                "gaussian": f"send N(0, {self.scale:g}^2) noise",
                "labelflip": "train on labels C-1-y"}[self.kind]
        defence = ("no defence (--aggregator mean): the undefended baseline"
                   if self._aggregator == "mean" else f"defence: --aggregator {self._aggregator}")
        return (f"attack: {self.ids.shape[0]} of {self._clients} clients are malicious "
                f"({self.kind}: {what}); {defence}")

    def attrs(self) -> dict:
        return {"attack": self.kind, "num_attackers": int(self.ids.shape[0])}

    def local_work(self, rnd: int, client_id: int) -> dict:
        if self.kind == "labelflip" and self.is_attacker(client_id):
            return {"flip_labels": True}
        return {}

    def client(self, update: np.ndarray, ctx: ClientContext) -> None:
        bad = self.is_attacker(ctx.client_id)
        ctx.metrics["attacker"] = float(bad)
        if not bad:
            return
        if self.kind == "signflip":
            update *= np.float32(-self.scale)
        elif self.kind == "gaussian":
            noise = generator(ctx.seed, "attack-noise", ctx.rnd, ctx.client_id)
            update[:] = self.scale * noise.standard_normal(update.shape[0])
