"""Server-blind aggregation under HE: the fixed-point encodings nodes encrypt (pure functions).

Model (see ``docs/he.md``): every node pre-weights its whole model, ``w_k = n_k / W`` with ``W``
the public total of training rows, and encodes ``round(w_k * clip(x_k) * scale)`` followed by
``round(w_k * scale)`` as one flat integer vector; the coordinator adds ciphertexts only, and a
node that decrypts the sum reads ``(Σ w_k x_k, Σ w_k)`` and divides. BFV addition is exact
modulo t, so the aggregate equals the integer sum of the encoded vectors; the only error is the
rounding, at most ``n / (2 scale)`` per coordinate of the weighted sum (:func:`quantisation_bound`).

Statistics (count, sums, sums of squares) need more than the 24-bit plaintext: each value is
fixed point (scale 2^12, |value| < 2^40, as under secure aggregation) written in base 2^12 limbs,
five to a value; limb sums of up to 2^11 nodes stay below t / 2.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcollab.core import ProtocolError, UpdateError
from fedcollab.protocols.quantize import _positive_finite

#: Statistics under HE: fixed point and limbs.
HE_STATS_SCALE = float(2**12)
HE_STATS_CLIP = float(2**40)
STATS_LIMB_BITS = 12
STATS_LIMBS = 5


def check_he_headroom(*, clip: float, scale: float, n_parties: int, max_abs: int) -> None:
    """Refuse an encoding whose sum over ``n_parties`` could leave [-max_abs, max_abs].

    Pre-weighted values sum to at most ``clip * scale`` (weights sum to at most 1), plus
    ``n_parties / 2`` of rounding; the weight slot to at most ``scale`` plus the same.
    """
    need = max(clip, 1.0) * scale + n_parties
    if need > max_abs:
        raise ProtocolError(f"`he.clip * he.scale` must leave room in the plaintext modulus: need {need:.0f} <= {max_abs}.")


def encode_weighted(x: np.ndarray, *, weight: float, clip: float, scale: float, max_abs: int) -> np.ndarray:
    """``[round(w * clip(x) * scale)..., round(w * scale)]`` as int64, for encryption.

    Parameters
    ----------
    x : numpy.ndarray
        The flat model (float), all parameters in order.
    weight : float
        ``n_k / W`` in (0, 1]: this node's rows over the public total.
    clip : float
        Bound on |x| per coordinate (values beyond are clipped, as under secure aggregation).
    scale : float
        Fixed-point scale (units per 1.0).
    max_abs : int
        (t - 1) / 2 of the HE parameters.
    """
    w = _positive_finite("weight", weight)
    if w > 1.0:
        raise ProtocolError(f"`weight` must be in (0, 1], got {weight!r}.")
    c = _positive_finite("clip", clip)
    s = _positive_finite("scale", scale)
    v = np.asarray(x, dtype=np.float64).ravel()
    if not np.isfinite(v).all():
        raise UpdateError("a non-finite update cannot be encoded")
    out = np.empty(v.size + 1, dtype=np.int64)
    out[:-1] = np.rint(np.clip(v, -c, c) * (w * s))
    out[-1] = int(round(w * s))
    if np.abs(out).max() > max_abs:
        raise ProtocolError(f"an encoded value exceeds the plaintext range {max_abs}")
    return out


def decode_weighted(total: np.ndarray, *, scale: float) -> tuple[np.ndarray, float]:
    """``(Σ w_k x_k / Σ w_k, Σ w_k)`` from the decrypted integer sum."""
    s = _positive_finite("scale", scale)
    t = np.asarray(total, dtype=np.int64)
    if t.ndim != 1 or t.size < 2:
        raise ProtocolError(f"`aggregate` must be a vector of at least 2 integers, got shape {t.shape}.")
    weight = float(t[-1])
    if weight <= 0:
        raise ProtocolError(f"the aggregate's weight must be > 0, got {weight / s}")
    return t[:-1].astype(np.float64) / weight, weight / s


def quantisation_bound(*, n_parties: int, scale: float) -> float:
    """Largest |decoded weighted sum - float weighted sum| per coordinate: n / (2 scale)."""
    return n_parties / (2.0 * scale)


def encode_statistics_limbs(stats: dict[str, list[float]]) -> np.ndarray:
    """count, sums and sums of squares as fixed point (2^12), in base-2^12 limbs (5 per value)."""
    x = np.asarray([*stats["count"], *stats["sum"], *stats["sumsq"]], dtype=np.float64)
    if not np.isfinite(x).all() or np.abs(x).max() >= HE_STATS_CLIP:
        raise ProtocolError(f"statistics must be finite and below {HE_STATS_CLIP:.0f} in absolute value")
    q = np.rint(x * HE_STATS_SCALE).astype(np.int64)
    base = 1 << STATS_LIMB_BITS
    limbs = np.empty((q.size, STATS_LIMBS), dtype=np.int64)
    rest = q
    for i in range(STATS_LIMBS - 1):
        rest, limbs[:, i] = np.divmod(rest, base)
    limbs[:, -1] = rest  # signed top limb
    return limbs.ravel()


def decode_statistics_limbs(total: np.ndarray, *, n_features: int) -> dict[str, list[float]]:
    """The summed statistics from the decrypted limb sums (one part, as ``combine_statistics`` takes them)."""
    t = np.asarray(total, dtype=np.int64)
    n_values = 1 + 2 * n_features
    if t.size != n_values * STATS_LIMBS:
        raise ProtocolError(f"summed statistics must be {n_values * STATS_LIMBS} limbs, got {t.size}")
    limbs = t.reshape(n_values, STATS_LIMBS)
    vals = [sum(int(limbs[j, i]) * (1 << (STATS_LIMB_BITS * i)) for i in range(STATS_LIMBS)) / HE_STATS_SCALE for j in range(n_values)]
    return {"count": [float(round(vals[0]))], "sum": vals[1:1 + n_features], "sumsq": vals[1 + n_features:]}


def flatten_per_party(per: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """``{partner: {field: v}}`` -> ``{"partner/field": v}`` (Flower ConfigRecords hold no nested maps)."""
    return {f"{p}/{f}": v for p, d in per.items() for f, v in d.items()}


def unflatten_per_party(rec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The inverse of :func:`flatten_per_party`."""
    out: dict[str, dict[str, Any]] = {}
    for k, v in rec.items():
        p, _, f = str(k).rpartition("/")
        out.setdefault(p, {})[f] = v
    return out
