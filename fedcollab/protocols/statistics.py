"""The statistics round for global feature scaling.

Per-silo standardisation costs about 0.05 accuracy on Heart; scaling is therefore global:
* ``federated_statistics``: each node releases exact count, sum and sum of squares;
* ``dp_statistics``: each node releases sums of bounded, normalised features with Gaussian
  noise added at the node (charged to its budget); counts are declared public;
* ``public_bounds``: no release at all, scaling from the schema's public bounds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.privacy.mechanisms import gaussian_noise

#: Public-bounds scaling maps [min, max] to [-BOUNDS_SPREAD, BOUNDS_SPREAD].
BOUNDS_SPREAD = 2.0
_MIN_STD = 1e-3
#: DP statistics: the noisy std of a feature is at least this share of its public half-range.
DP_MIN_STD_SHARE = 0.1


@dataclass(frozen=True)
class Scaling:
    """x -> (x - mean) / std, per encoded feature."""

    mean: np.ndarray
    std: np.ndarray
    method: str

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Scale rows ``x``."""
        return (x - self.mean) / self.std

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return {"method": self.method, "mean": self.mean.tolist(), "std": self.std.tolist()}


def statistics_sensitivity(n_features: int) -> float:
    """L2 sensitivity of (sums, sums of squares) of values in [-1, 1] under add/remove of one row."""
    return math.sqrt(2.0 * n_features)


def _normalise(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    c = (bounds[:, 0] + bounds[:, 1]) / 2.0
    r = (bounds[:, 1] - bounds[:, 0]) / 2.0
    return np.clip((x - c) / r, -1.0, 1.0)


def dp_statistics(x: np.ndarray, bounds: np.ndarray, *, noise_multiplier: float, generator: np.random.Generator) -> dict[str, list[float]]:
    """Noised sums and sums of squares of bounded features, in u = (x - c) / r in [-1, 1].

    Noise std = ``noise_multiplier`` x sqrt(2 d), the L2 sensitivity (Gaussian mechanism,
    Dwork & Roth 2014, Thm A.1; accounted with dp-accounting as ``GaussianDpEvent``).
    The count is not noised: row counts are declared public (they weight FedAvg).
    """
    u = _normalise(x, bounds)
    d = x.shape[1]
    std = noise_multiplier * statistics_sensitivity(d)
    return {
        "count": [float(len(x))],
        "sum": (u.sum(axis=0) + gaussian_noise((d,), std=std, generator=generator)).tolist(),
        "sumsq": ((u * u).sum(axis=0) + gaussian_noise((d,), std=std, generator=generator)).tolist(),
    }


def scaling_from_bounds(bounds: np.ndarray) -> Scaling:
    """Scaling from public bounds alone (no release)."""
    c = (bounds[:, 0] + bounds[:, 1]) / 2.0
    r = (bounds[:, 1] - bounds[:, 0]) / (2.0 * BOUNDS_SPREAD)
    return Scaling(mean=c, std=r, method="public_bounds")


def combine_statistics(parts: Sequence[dict[str, list[float]]], *, bounds: np.ndarray | None = None) -> Scaling:
    """Global mean and std from per-silo statistics.

    With ``bounds`` the parts are DP statistics in the normalised space and the result is mapped
    back; the noisy mean is clamped to the bounds and the variance to (0, 1].
    """
    if not parts:
        raise ProtocolError("no statistics to combine")
    d = len(parts[0]["sum"])
    for p in parts:
        if len(p["sum"]) != d or len(p["sumsq"]) != d or len(p["count"]) != 1:
            raise ProtocolError("statistics of different shapes")
        if not all(math.isfinite(v) for v in [*p["sum"], *p["sumsq"], *p["count"]]):
            raise ProtocolError("non-finite statistics")
    n = sum(p["count"][0] for p in parts)
    if n <= 0:
        raise ProtocolError("statistics over zero rows")
    s = np.sum([p["sum"] for p in parts], axis=0)
    ss = np.sum([p["sumsq"] for p in parts], axis=0)
    mean = s / n
    if bounds is None:
        var = np.maximum(ss / n - mean**2, 0.0)
        std = np.sqrt(var)
        std = np.where(std < _MIN_STD, 1.0, std)
        return Scaling(mean=mean, std=std, method="federated_statistics")
    mean_u = np.clip(mean, -1.0, 1.0)
    # Noise can make the variance tiny or negative; a floor from the public bounds (std at least
    # DP_MIN_STD_SHARE of the half-range) keeps one noisy feature from being blown up.
    var_u = np.clip(ss / n - mean_u**2, DP_MIN_STD_SHARE**2, 1.0)
    c = (bounds[:, 0] + bounds[:, 1]) / 2.0
    r = (bounds[:, 1] - bounds[:, 0]) / 2.0
    return Scaling(mean=c + r * mean_u, std=r * np.sqrt(var_u), method="dp_statistics")


#: Statistics under secure aggregation travel modulo 2^64 with this fixed-point scale; every
#: count, sum and sum of squares must stay below STATS_CLIP in absolute value (checked at the node).
STATS_BITS = 64
STATS_SCALE = float(2**12)
STATS_CLIP = float(2**40)


def encode_statistics(stats: dict[str, list[float]], *, n_parties: int) -> np.ndarray:
    """count, sums and sums of squares as one uint64 fixed-point vector (for secure aggregation)."""
    from fedcollab.protocols.quantize import quantize

    x = np.asarray([*stats["count"], *stats["sum"], *stats["sumsq"]], dtype=np.float64)
    if not np.isfinite(x).all() or np.abs(x).max() > STATS_CLIP:
        raise ProtocolError("statistics out of the range secure aggregation can carry")
    return quantize(x, clip=STATS_CLIP, scale=STATS_SCALE, bits=STATS_BITS, n_parties=n_parties)


def decode_statistics(total: np.ndarray, *, n_features: int) -> dict[str, list[float]]:
    """The summed statistics (one part, as :func:`combine_statistics` takes them)."""
    from fedcollab.protocols.quantize import dequantize

    x = dequantize(total, scale=STATS_SCALE, bits=STATS_BITS)
    if x.size != 1 + 2 * n_features:
        raise ProtocolError("summed statistics of the wrong length")
    return {"count": [float(round(x[0]))], "sum": x[1 : 1 + n_features].tolist(), "sumsq": x[1 + n_features :].tolist()}
