"""Shamir t-of-n secret sharing of 32-byte secrets over a prime field.

A secret s is the constant term of a random polynomial f of degree t-1
over GF(p); the share of holder x (a nonzero field element) is f(x). Any t
shares determine f and so s = f(0) by Lagrange interpolation; t-1 shares are
consistent with every secret equally (each value of f(0) is matched by
exactly one polynomial through them), so they reveal nothing.

p = 2**256 + 297 is the smallest prime above 2**256, so every 32-byte
secret (an X25519 private key, a mask seed) is a field element as it is,
and a share fits in 33 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  # a field element < 2**257


def _field_element(random_bytes: Callable[[int], bytes]) -> int:
    """Uniform in [0, p) by rejection: 257 random bits, redrawn when >= p."""
    while True:
        v = int.from_bytes(random_bytes(SHARE_BYTES), "big") & ((1 << 257) - 1)
        if v < PRIME:
            return v


def split(secret: bytes, threshold: int, xs: Sequence[int],
          random_bytes: Callable[[int], bytes]) -> list[int]:
    """Shares f(x) for each holder x of a fresh random polynomial with f(0) = secret.

    random_bytes(n) must return n uniformly random bytes (a CSPRNG in a
    deployment; a seeded stream in the simulation, for reproducible runs).
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a secret is {SECRET_BYTES} bytes, not {len(secret)}")
    _check_holders(xs)
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold {threshold} not in 1..{len(xs)} holders")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [_field_element(random_bytes) for _ in range(threshold - 1)]
    return [_evaluate(coeffs, x) for x in xs]


def _evaluate(coeffs: list[int], x: int) -> int:
    # Horner without a reduction per step: x is a small holder id, so each
    # step only multiplies by a small int (linear time) and one modulo at the
    # end replaces t of them -- the sharing of large groups is dominated by this.
    acc = 0
    for c in reversed(coeffs):
        acc = acc * x + c
    return acc % PRIME


def combine(xs: Sequence[int], ys: Sequence[int]) -> bytes:
    """f(0) from the shares (x, y): the secret if there are at least t of them.

    With fewer than t shares the result is a field element that says
    nothing about the secret (garbage); callers count shares first.
    """
    if len(xs) != len(ys) or not xs:
        raise ValueError("combine needs one y per x and at least one share")
    lam = lagrange_at_zero(tuple(xs))
    s = sum(l * y for l, y in zip(lam, ys)) % PRIME
    # A value >= 2**256 cannot be a 32-byte secret; it comes from too few
    # shares or corrupted ones (rarely detectable: probability ~ 2**-248).
    if s >= 1 << (8 * SECRET_BYTES):
        raise ValueError("the shares do not reconstruct a 32-byte secret")
    return s.to_bytes(SECRET_BYTES, "big")


@lru_cache(maxsize=256)
def lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange basis at 0: lambda_i = prod_{j != i} x_j / (x_j - x_i) mod p.

    Cached: the server reconstructs many secrets from the same set of
    holders, so the O(t^2) coefficients are computed once per set.
    """
    _check_holders(xs)
    lam = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        lam.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(lam)


def _check_holders(xs: Sequence[int]) -> None:
    if len(set(xs)) != len(xs):
        raise ValueError("holder ids must be distinct")
    if any(not 0 < x < PRIME for x in xs):
        raise ValueError("holder ids must be nonzero field elements")


def encode(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def decode(b: bytes) -> int:
    y = int.from_bytes(b, "big")
    if len(b) != SHARE_BYTES or y >= PRIME:
        raise ValueError("not a share")
    return y
