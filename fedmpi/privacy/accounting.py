"""Privacy accounting for DP-FedAvg with Google's dp-accounting package.

One round of user-level DP-FedAvg is a sampled Gaussian mechanism: each
client is in the round with probability q (Poisson sampling) or the round is
a fixed-size sample of K of the N clients without replacement, and the sum of
the clipped updates gets Gaussian noise of standard deviation z * S. Every
round is the same event, so epsilon after r rounds is that event composed r
times. The accountant must match the sampling the run used:
- poisson: PoissonSampledDpEvent, add-or-remove-one neighbours (PLD or RDP);
- fixed:   SampledWithoutReplacementDpEvent, replace-one neighbours (RDP only:
           dp-accounting's PLD accountant does not support it). Accounting a
           fixed-size sample as Poisson would understate epsilon.

Per-round cost: RDP composes by scaling the single round's RDP curve
(microseconds); PLD self-composes the single round's privacy-loss
distribution, discretised at 1e-3 (pessimistic, so an upper bound; within
1e-4 of dp-accounting's default 1e-4 discretisation on the settings we
checked, at a tenth of the cost), which still takes 15-70 ms an evaluation:
`prefetch` computes the rounds ahead in a background thread on rank 0.
"""

from __future__ import annotations

import math
import threading

PLD_DISCRETISATION = 1e-3


def _lib():
    try:
        import dp_accounting
        from dp_accounting.pld import privacy_loss_distribution
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError:  # pragma: no cover - a declared dependency
        from fedmpi.errors import UserError
        raise UserError("differential privacy needs the dp-accounting package: "
                        "pip install dp-accounting") from None
    return dp_accounting, rdp_privacy_accountant, privacy_loss_distribution


def resolve_accountant(kind: str, sampling: str) -> str:
    """The accountant `auto` stands for: PLD where it supports the sampling, else RDP."""
    if kind == "auto":
        return "pld" if sampling == "poisson" else "rdp"
    return kind


class Accountant:
    """epsilon(r) at a fixed delta for r rounds of the same sampled Gaussian round."""

    def __init__(self, kind: str, sampling: str, num_clients: int, per_round: int,
                 noise_multiplier: float, delta: float):
        self.kind = resolve_accountant(kind, sampling)
        self.sampling, self.z, self.delta = sampling, float(noise_multiplier), float(delta)
        self.q = per_round / num_clients
        if self.kind == "pld" and sampling != "poisson":
            raise ValueError("the PLD accountant supports Poisson sampling only")
        self._round = None
        if self.z == 0:
            return  # no noise: no privacy, epsilon is infinite
        dpa, rdp_mod, pld_mod = _lib()
        if self.kind == "rdp":
            gauss = dpa.GaussianDpEvent(self.z)
            if sampling == "poisson":
                event = dpa.PoissonSampledDpEvent(self.q, gauss)
                acc = rdp_mod.RdpAccountant()
            else:
                event = dpa.SampledWithoutReplacementDpEvent(num_clients, per_round, gauss)
                acc = rdp_mod.RdpAccountant(
                    neighboring_relation=dpa.NeighboringRelation.REPLACE_ONE)
            acc.compose(event, 1)
            self._orders, self._rdp = list(acc.orders), list(acc.rdp)
            self._compute_epsilon = rdp_mod.compute_epsilon
        else:
            self._round = pld_mod.from_gaussian_mechanism(
                self.z, sampling_prob=self.q,
                value_discretization_interval=PLD_DISCRETISATION)
        self._cache: dict[int, float] = {}
        self._ready = threading.Condition()
        self._ahead: range | None = None

    def prefetch(self, first: int, last: int) -> None:
        """Compute epsilon for rounds first..last in a background thread, in order.

        A PLD evaluation costs tens of milliseconds; computed ahead while the
        clients of the next rounds train, it stays off the round's critical
        path. The values are the same as computed on demand.
        """
        if self._round is None or self._ahead is not None or first > last:
            return
        self._ahead = range(first, last + 1)
        self._thread = threading.Thread(target=self._fill, args=(self._ahead,), daemon=True,
                                        name="fedmpi-accountant")
        self._thread.start()

    def join(self) -> None:
        """Wait for the background thread (if any) to end: before the process exits."""
        if getattr(self, "_thread", None) is not None:
            self._thread.join()

    def _fill(self, rounds: range) -> None:
        for r in rounds:
            eps = self._epsilon(r)
            with self._ready:
                self._cache[r] = eps
                self._ready.notify_all()

    def epsilon(self, rounds: int) -> float:
        """Epsilon after `rounds` rounds (0 rounds: 0; no noise: inf)."""
        if self.z == 0:
            return math.inf if rounds > 0 else 0.0
        with self._ready:
            if rounds in self._cache:
                return self._cache[rounds]
            if self._ahead is not None and rounds in self._ahead:
                self._ready.wait_for(lambda: rounds in self._cache)
                return self._cache[rounds]
        eps = self._epsilon(rounds)
        with self._ready:
            self._cache[rounds] = eps
        return eps

    def _epsilon(self, rounds: int) -> float:
        if rounds <= 0:
            return 0.0
        if self._round is not None:
            return float(self._round.self_compose(rounds).get_epsilon_for_delta(self.delta))
        eps, _ = self._compute_epsilon(self._orders, [rounds * r for r in self._rdp], self.delta)
        return float(eps)


def solve_noise_multiplier(target_epsilon: float, rounds: int, *, kind: str, sampling: str,
                           num_clients: int, per_round: int, delta: float,
                           z_max: float = 1000.0) -> float:
    """Smallest z, to 3 significant digits rounded up, with epsilon(rounds) <= target.

    epsilon falls as z grows, so bisection on z brackets the answer; the
    result is rounded up to 3 significant digits and checked again.
    Raises ValueError when even z_max does not reach the target.
    """
    def eps(z):
        return Accountant(kind, sampling, num_clients, per_round, z, delta).epsilon(rounds)

    if eps(z_max) > target_epsilon:
        raise ValueError(f"no noise multiplier up to {z_max:g} reaches epsilon "
                         f"{target_epsilon:g} in {rounds} rounds")
    lo, hi = 0.0, z_max
    while hi - lo > 1e-4 * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    z = _round_up_3(hi)
    while eps(z) > target_epsilon:  # rounding up keeps it; guard against discretisation
        z = _round_up_3(z * (1 + 1e-3))
    return z


def _round_up_3(x: float) -> float:
    """x rounded up to 3 significant digits."""
    e = math.floor(math.log10(x)) - 2
    return float(f"{math.ceil(round(x / 10.0 ** e, 9))}e{e}")  # no binary tail such as 1.2300000000000002
