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

