"""Per-silo statistics for global feature scaling (the exact part; noise lives in protocols)."""

from __future__ import annotations

import numpy as np


def exact_statistics(x: np.ndarray) -> dict[str, list[float]]:
    """Count, per-feature sum and sum of squares (no noise: a non-private release)."""
    return {
        "count": [float(len(x))],
        "sum": x.sum(axis=0).tolist(),
        "sumsq": (x * x).sum(axis=0).tolist(),
    }


def normalise_bounded(x: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Clamp each feature to its public bounds and map it to [-1, 1]."""
    c = (bounds[:, 0] + bounds[:, 1]) / 2.0
    r = (bounds[:, 1] - bounds[:, 0]) / 2.0
    return np.clip((x - c) / r, -1.0, 1.0)
