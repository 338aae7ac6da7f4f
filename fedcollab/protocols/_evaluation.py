"""Federated evaluation: a node releases counts and score histograms, never rows.

Pooled accuracy comes from per-partner counts; pooled ROC AUC from the summed per-partner
histograms of predicted probabilities (positives and negatives), with ties within a bin
counted as one half (the Mann-Whitney form of the AUC).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

HIST_BINS = 2000


def score_histograms(prob: np.ndarray, y: np.ndarray, *, bins: int = HIST_BINS) -> tuple[list[int], list[int]]:
    """Histograms over [0, 1] of the predicted probabilities of positive and of negative rows."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    pos = np.histogram(np.clip(prob[y == 1], 0, 1), bins=edges)[0]
    neg = np.histogram(np.clip(prob[y == 0], 0, 1), bins=edges)[0]
    return pos.astype(int).tolist(), neg.astype(int).tolist()


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float | None:
    """P(score of a positive > score of a negative) + half the ties; None if a class is absent."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.cumsum(neg) - neg
    wins = float((pos * neg_below).sum()) + 0.5 * float((pos * neg).sum())
    return wins / float(n_pos * n_neg)


@dataclass(frozen=True)
class PooledMetrics:
    """Test metrics of one partner or of the union of test splits."""

    accuracy: float
    auc: float | None
    loss: float
    n: int

    def to_dict(self) -> dict[str, float | int | None]:
        """JSON-ready form."""
        return {"accuracy": self.accuracy, "auc": self.auc, "loss": self.loss, "n": self.n}


def pooled_metrics(parts: Sequence[dict[str, object]]) -> PooledMetrics:
    """Combine per-partner ``{"n", "correct", "loss_sum", "hist_pos", "hist_neg"}``."""
    n = int(sum(int(p["n"]) for p in parts))  # type: ignore[call-overload]
    correct = float(sum(float(p["correct"]) for p in parts))  # type: ignore[arg-type]
    loss = float(sum(float(p["loss_sum"]) for p in parts))  # type: ignore[arg-type]
    pos = np.sum([np.asarray(p["hist_pos"], dtype=np.int64) for p in parts], axis=0)
    neg = np.sum([np.asarray(p["hist_neg"], dtype=np.int64) for p in parts], axis=0)
    if n == 0:
        return PooledMetrics(accuracy=float("nan"), auc=None, loss=float("nan"), n=0)
    return PooledMetrics(accuracy=correct / n, auc=auc_from_histograms(pos, neg), loss=loss / n, n=n)
