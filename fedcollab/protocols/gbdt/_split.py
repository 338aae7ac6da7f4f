"""Split finding by the XGBoost gain, learned missing direction, leaf values (coordinator side).

Gain of splitting a node with gradient/hessian sums (G, H) into (G_L, H_L) and (G_R, H_R)
(Chen & Guestrin, KDD 2016, eq. 7)::

    gain = 1/2 [ G_L^2 / (H_L + lambda) + G_R^2 / (H_R + lambda) - G^2 / (H + lambda) ] - gamma

A candidate counts only if both children have ``H >= min_child_weight`` and ``gain > 0``. For
every threshold the missing bin is tried on the left and on the right; the better is the learned
default direction. Leaf value (eq. 5, shrunk): ``-G / (H + lambda) * learning_rate``. Hessian sums
are clamped at 0 first (a no-op without DP; with DP, noisy sums can be negative: post-processing).
Ties are broken deterministically: lowest feature, missing-left before missing-right, lowest
threshold, within a relative tolerance of 1e-9 so that sums added in another order pick the same split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcollab.protocols.gbdt._binning import BinLayout
from fedcollab.spec import TreeParams

_TIE = 1e-9


@dataclass(frozen=True)
class Split:
    """One chosen split: rows of ``node`` with ``bin <= bin_index`` of ``feature`` go left; missing go ``default_left``."""

    node: int
    feature: int
    bin_index: int
    threshold: float
    default_left: bool
    gain: float
    left: tuple[float, float]  # (G, H) of the left child (NaN when not known: random splits)
    right: tuple[float, float]


def split_gain(gl: np.ndarray | float, hl: np.ndarray | float, gr: np.ndarray | float, hr: np.ndarray | float, *, reg_lambda: float, gamma: float) -> np.ndarray:
    """The XGBoost gain of a split (vectorised)."""
    gl, hl, gr, hr = (np.asarray(v, dtype=np.float64) for v in (gl, hl, gr, hr))
    hl, hr = np.maximum(hl, 0.0), np.maximum(hr, 0.0)

    def score(g: np.ndarray, h: np.ndarray) -> np.ndarray:
        den = h + reg_lambda
        return np.divide(g * g, den, out=np.zeros_like(g), where=den > 0)

    return 0.5 * (score(gl, hl) + score(gr, hr) - score(gl + gr, hl + hr)) - gamma


def leaf_value(g: float, h: float, params: TreeParams) -> float:
    """``-G / (H + lambda) * learning_rate``, rounded to float32 (what XGBoost stores)."""
    den = max(float(h), 0.0) + params.reg_lambda
    raw = -float(g) / den if den > 0 else 0.0
    return float(np.float32(raw * params.learning_rate))


def best_split(node_hist: np.ndarray, *, node: int, layout: BinLayout, params: TreeParams) -> Split | None:
    """The best split of one node from its summed histogram ``(n_slots, 2)``, or None if no split gains."""
    cands: list[tuple[np.ndarray, int, bool, np.ndarray, np.ndarray]] = []
    for j, nb in enumerate(layout.n_bins):
        s = int(layout.offsets[j])
        vals = node_hist[s : s + nb]
        miss = node_hist[s + nb]
        total = vals.sum(axis=0) + miss
        cum = np.cumsum(vals, axis=0)[:-1]  # thresholds 0 .. nb-2
        for default_left in (True, False):
            left = cum + miss if default_left else cum
            right = total - left
            gain = split_gain(left[:, 0], left[:, 1], right[:, 0], right[:, 1], reg_lambda=params.reg_lambda, gamma=params.gamma)
            ok = (left[:, 1] >= params.min_child_weight) & (right[:, 1] >= params.min_child_weight)
            cands.append((np.where(ok, gain, -np.inf), j, default_left, left, right))
    best = max(float(np.max(c[0])) if c[0].size else -np.inf for c in cands)
    if not best > 0:
        return None
    floor = best - _TIE * (1.0 + abs(best))
    for gains, j, default_left, left, right in cands:
        hits = np.flatnonzero(gains >= floor)
        if hits.size:
            b = int(hits[0])
            return Split(node=node, feature=j, bin_index=b, threshold=layout.threshold(j, b), default_left=default_left,
                         gain=float(gains[b]), left=(float(left[b, 0]), float(left[b, 1])), right=(float(right[b, 0]), float(right[b, 1])))
    return None  # pragma: no cover - best came from some candidate


def random_split(*, node: int, layout: BinLayout, rng: np.random.Generator) -> Split:
    """A data-independent split: a feature and a threshold drawn uniformly from the public bins, a random missing direction."""
    j = int(rng.integers(layout.n_features))
    b = int(rng.integers(int(layout.n_bins[j]) - 1))
    return Split(node=node, feature=j, bin_index=b, threshold=layout.threshold(j, b), default_left=bool(rng.integers(2)),
                 gain=0.0, left=(math.nan, math.nan), right=(math.nan, math.nan))  # sums unknown until the leaf release
