"""Shamir secret sharing (Shamir 1979) over the Mersenne prime field p = 2^521 - 1.

A secret of up to 64 bytes is read as a big-endian integer s < 2^512 < p. ``split`` draws a
random polynomial f of degree t - 1 over GF(p) with f(0) = s and hands out (x, f(x)) for the
given x-coordinates; ``combine`` interpolates f(0) from any t of them (Lagrange at 0).
With fewer than t shares, every secret is equally likely: t - 1 shares say nothing about s.

The secret's length is not in the shares; the protocol fixes it (32 bytes for keys and seeds)
and passes it to :func:`combine`. A share value serialises to 66 bytes, big-endian.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from random import Random

from fedcollab.core import CryptoError

#: The field modulus, the Mersenne prime 2^521 - 1.
PRIME = (1 << 521) - 1
#: Longest secret, in bytes (2^512 < p).
MAX_SECRET_BYTES = 64
#: One share value on the wire (ceil(521 / 8) bytes, big-endian).
SHARE_BYTES = 66


def _check_int(name: str, value: object, *, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CryptoError(f"`{name}` must be an int (got {type(value).__name__}).")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise CryptoError(f"`{name}` must be {bound}, got {value}.")
    return value


def split(
    secret: bytes,
    *,
    threshold: int,
    xs: Iterable[int] | None = None,
    n_shares: int | None = None,
    rng: Random | None = None,
) -> dict[int, int]:
    """Split ``secret`` into shares ``{x: f(x)}``; any ``threshold`` of them give it back.

    Parameters
    ----------
    secret : bytes
        1 to 64 bytes.
    threshold : int
        t, the number of shares needed; ``1 <= t <= number of shares``.
    xs : iterable of int, optional
        The share x-coordinates (participant indices, distinct, in [1, p - 1]).
    n_shares : int, optional
        Shorthand for ``xs = 1..n_shares``; give exactly one of ``xs`` and ``n_shares``.
    rng : random.Random, optional
        Source of the polynomial's coefficients; defaults to ``secrets.SystemRandom()`` (OS CSPRNG).
        Pass another only in tests.
    """
    if not isinstance(secret, (bytes, bytearray)):
        raise CryptoError(f"`secret` must be bytes (got {type(secret).__name__}).")
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise CryptoError(f"`secret` must be 1 to {MAX_SECRET_BYTES} bytes, got {len(secret)}.")
    if (xs is None) == (n_shares is None):
        raise CryptoError("give exactly one of `xs` and `n_shares`.")
    if xs is None:
        n = _check_int("n_shares", n_shares, low=1)
        points = list(range(1, n + 1))
    else:
        points = [_check_int("xs[]", x, low=1, high=PRIME - 1) for x in xs]
        if len(set(points)) != len(points):
            raise CryptoError(f"`xs` must be distinct, got {sorted(points)}.")
    if not points:
        raise CryptoError("`xs` must not be empty.")
    t = _check_int("threshold", threshold, low=1, high=len(points))
    gen = rng if rng is not None else secrets.SystemRandom()
    coeffs = [int.from_bytes(secret, "big")] + [gen.randrange(PRIME) for _ in range(t - 1)]
    return {x: _evaluate(coeffs, x) for x in points}


def _evaluate(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def _lagrange_at(points: list[tuple[int, int]], at: int) -> int:
    """f(at) for the polynomial of degree len(points) - 1 through ``points``."""
    total = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (at - xm) % PRIME
                den = den * (xj - xm) % PRIME
        total = (total + yj * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(shares: Mapping[int, int], *, threshold: int, length: int) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares ``{x: f(x)}``.

    With more than t shares, the secret is interpolated from the t smallest x and every other
    share is checked against that polynomial: an altered share is detected, not silently used.

    Raises
    ------
    CryptoError
        Fewer than t shares; malformed shares; inconsistent shares; or a result that does not fit
        in ``length`` bytes (wrong shares or a wrong threshold).
    """
    t = _check_int("threshold", threshold, low=1)
    size = _check_int("length", length, low=1, high=MAX_SECRET_BYTES)
    if not isinstance(shares, Mapping):
        raise CryptoError(f"`shares` must be a mapping x -> share (got {type(shares).__name__}).")
    if len(shares) < t:
        raise CryptoError(f"fewer than t shares: need {t}, got {len(shares)}.")
    points = []
    for x, y in sorted(shares.items()):
        _check_int("share x", x, low=1, high=PRIME - 1)
        _check_int(f"share value at x={x}", y, low=0, high=PRIME - 1)
        points.append((x, y))
    base = points[:t]
    for x, y in points[t:]:
        if _lagrange_at(base, x) != y:
            raise CryptoError(f"inconsistent shares: the share at x={x} is not on the polynomial of the others.")
    value = _lagrange_at(base, 0)
    if value >> (8 * size):
        raise CryptoError(f"the shares do not give a {size}-byte secret (altered shares or a wrong threshold).")
    return value.to_bytes(size, "big")


def share_to_bytes(value: int) -> bytes:
    """A share value as 66 bytes, big-endian."""
    _check_int("share value", value, low=0, high=PRIME - 1)
    return value.to_bytes(SHARE_BYTES, "big")


def share_from_bytes(data: bytes) -> int:
    """Parse :func:`share_to_bytes`'s output (``CryptoError`` on a wrong length or a value >= p)."""
    if not isinstance(data, (bytes, bytearray)):
        raise CryptoError(f"a share must be bytes (got {type(data).__name__}).")
    if len(data) != SHARE_BYTES:
        raise CryptoError(f"a share must be {SHARE_BYTES} bytes, got {len(data)}.")
    value = int.from_bytes(data, "big")
    if value >= PRIME:
        raise CryptoError("a share value must be below p = 2^521 - 1.")
    return value
