"""Federated evaluation: a node releases counts and score histograms, never rows.

Pooled accuracy comes from per-partner counts; pooled ROC AUC from the summed per-partner
histograms of predicted probabilities (positives and negatives), with ties within a bin
counted as one half (the Mann-Whitney form of the AUC).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.privacy.mechanisms import gaussian_noise

HIST_BINS = 2000
#: Per-row loss bound (nats) of test metrics released with DP: a row's binary cross-entropy is
#: clipped to it, so the loss sum has sensitivity LOSS_BOUND.
LOSS_BOUND = 10.0
#: L2 sensitivity of the DP test-metrics vector ``[n, correct, loss_sum / LOSS_BOUND, hist_pos, hist_neg]``
#: under adding or removing one test row: n, correct and the scaled loss each change by at most 1,
#: and one histogram bin by 1, so sqrt(1 + 1 + 1 + 1) = 2.
TEST_METRICS_SENSITIVITY = 2.0


def histogram_bins(cap: int) -> int:
    """The resolution a node releases: the largest divisor of :data:`HIST_BINS` at most ``cap``.

    A divisor, so that histograms of partners with different caps can be merged exactly into a
    common coarser grid (:func:`pooled_metrics`).
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"`cap` must be a positive int, got {cap!r}")
    return max(b for b in range(1, min(cap, HIST_BINS) + 1) if HIST_BINS % b == 0)


def dp_test_metrics(res: dict[str, object], *, noise_multiplier: float, generator: np.random.Generator) -> dict[str, object]:
    """Gaussian noise of std ``noise_multiplier x`` :data:`TEST_METRICS_SENSITIVITY` on every count.

    ``res`` must hold a loss sum of rows clipped to :data:`LOSS_BOUND`. The noised values are
    rounded and clipped to their ranges (post-processing, free of privacy cost).
    """
    if isinstance(noise_multiplier, bool) or not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise ValueError(f"`noise_multiplier` must be a positive finite float, got {noise_multiplier!r}")
    std = noise_multiplier * TEST_METRICS_SENSITIVITY
    pos = np.asarray(res["hist_pos"], dtype=np.float64)
    neg = np.asarray(res["hist_neg"], dtype=np.float64)
    head = np.asarray([float(res["n"]), float(res["correct"]), float(res["loss_sum"]) / LOSS_BOUND])  # type: ignore[arg-type]
    vec = np.concatenate([head, pos, neg])
    noisy = vec + gaussian_noise(vec.shape, std=std, generator=generator)
    n = max(0, int(round(noisy[0])))
    k = pos.size
    return {
        "n": n,
        "correct": float(min(max(0.0, round(noisy[1])), n)),
        "loss_sum": float(max(0.0, noisy[2]) * LOSS_BOUND),
        "hist_pos": np.clip(np.rint(noisy[3:3 + k]), 0, None).astype(int).tolist(),
        "hist_neg": np.clip(np.rint(noisy[3 + k:]), 0, None).astype(int).tolist(),
    }


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
    # Partners may release at different resolutions (divisors of HIST_BINS): merge onto the finest common grid.
    pos_l = [np.asarray(p["hist_pos"], dtype=np.int64) for p in parts]
    neg_l = [np.asarray(p["hist_neg"], dtype=np.int64) for p in parts]
    bins = math.gcd(*(h.size for h in pos_l + neg_l)) if pos_l else 0
    pos = np.sum([_coarsen(h, bins) for h in pos_l], axis=0) if pos_l else np.zeros(0, dtype=np.int64)
    neg = np.sum([_coarsen(h, bins) for h in neg_l], axis=0) if neg_l else np.zeros(0, dtype=np.int64)
    if n == 0:
        return PooledMetrics(accuracy=float("nan"), auc=None, loss=float("nan"), n=0)
    return PooledMetrics(accuracy=correct / n, auc=auc_from_histograms(pos, neg), loss=loss / n, n=n)


def _coarsen(hist: np.ndarray, bins: int) -> np.ndarray:
    """Sum adjacent bins of ``hist`` down to ``bins`` bins (``bins`` divides its length)."""
    if bins == 0 or hist.size == bins:
        return hist
    return hist.reshape(bins, hist.size // bins).sum(axis=1)
