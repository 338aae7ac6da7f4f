"""The trained ensemble and fedcollab's own scorer (the same routing and float32 values as XGBoost).

Trees are stored as XGBoost stores them: node 0 is the root, ``left[i] == -1`` marks a leaf,
``value[i]`` is the leaf value (learning rate applied, float32) or, for an inner node, its base
weight. A row goes left at an inner node when its value, as float32, is ``< threshold``
(float32); a missing value (NaN) goes ``default_left``. The margin is
``logit(base_score) + sum of leaf values``; ``predict_proba`` is its sigmoid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcollab.core import ProtocolError


@dataclass(frozen=True)
class Tree:
    """One regression tree (arrays indexed by node id)."""

    left: tuple[int, ...]
    right: tuple[int, ...]
    feature: tuple[int, ...]
    bin_index: tuple[int, ...]
    threshold: tuple[float, ...]
    default_left: tuple[bool, ...]
    value: tuple[float, ...]
    gain: tuple[float, ...]
    hessian: tuple[float, ...]

    @property
    def n_nodes(self) -> int:
        """Number of nodes."""
        return len(self.left)

    @property
    def depth(self) -> int:
        """Longest root-to-leaf path (in splits)."""
        def d(i: int) -> int:
            return 0 if self.left[i] < 0 else 1 + max(d(self.left[i]), d(self.right[i]))
        return d(0)

    def _route(self, go_left_of: Any, n: int) -> np.ndarray:
        left = np.asarray(self.left)
        right = np.asarray(self.right)
        node = np.zeros(n, dtype=np.int64)
        for _ in range(self.depth):
            inner = left[node] >= 0
            if not inner.any():
                break
            gl = go_left_of(node)
            node = np.where(inner, np.where(gl, left[node], right[node]), node)
        return node

    def leaf_of_rows(self, x: np.ndarray) -> np.ndarray:
        """Leaf node id of every encoded row (NaN = missing), routed as XGBoost routes."""
        x32 = np.asarray(x, dtype=np.float64).astype(np.float32)
        feat = np.maximum(np.asarray(self.feature), 0)
        thr = np.asarray(self.threshold, dtype=np.float32)
        dl = np.asarray(self.default_left)
        rows = np.arange(x32.shape[0])

        def go_left(node: np.ndarray) -> np.ndarray:
            v = x32[rows, feat[node]]
            return np.where(np.isnan(v), dl[node], v < thr[node])

        return self._route(go_left, x32.shape[0])

    def leaf_of_bins(self, bins: np.ndarray, missing_bin: np.ndarray) -> np.ndarray:
        """Leaf node id of every binned row (``missing_bin[j]``: the missing bin of feature j)."""
        feat = np.maximum(np.asarray(self.feature), 0)
        bidx = np.asarray(self.bin_index)
        dl = np.asarray(self.default_left)
        rows = np.arange(bins.shape[0])

        def go_left(node: np.ndarray) -> np.ndarray:
            f = feat[node]
            b = bins[rows, f]
            return np.where(b == missing_bin[f], dl[node], b <= bidx[node])

        return self._route(go_left, bins.shape[0])

    def to_wire(self) -> dict[str, Any]:
        """Flat record (coordinator -> node, once the tree is finished)."""
        return {
            "left": list(self.left), "right": list(self.right), "feature": list(self.feature),
            "bin_index": list(self.bin_index), "threshold": list(self.threshold),
            "default_left": [int(v) for v in self.default_left], "value": list(self.value),
            "gain": list(self.gain), "hessian": list(self.hessian),
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Tree:
        """Parse and check the arrays (equal lengths, child ids in range)."""
        try:
            t = cls(
                left=tuple(int(v) for v in wire["left"]), right=tuple(int(v) for v in wire["right"]),
                feature=tuple(int(v) for v in wire["feature"]), bin_index=tuple(int(v) for v in wire["bin_index"]),
                threshold=tuple(float(v) for v in wire["threshold"]), default_left=tuple(bool(v) for v in wire["default_left"]),
                value=tuple(float(v) for v in wire["value"]), gain=tuple(float(v) for v in wire["gain"]),
                hessian=tuple(float(v) for v in wire["hessian"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"gbdt tree: malformed record ({type(exc).__name__}: {exc}).") from None
        n = len(t.left)
        if n == 0 or any(len(getattr(t, f)) != n for f in ("right", "feature", "bin_index", "threshold", "default_left", "value", "gain", "hessian")):
            raise ProtocolError(f"gbdt tree: every array must have the same non-zero length, got {n} left children.")
        for i in range(n):
            if (t.left[i] < 0) != (t.right[i] < 0) or not (t.left[i] < n and t.right[i] < n) or (t.left[i] >= 0 and t.left[i] <= i):
                raise ProtocolError(f"gbdt tree: node {i} has invalid children ({t.left[i]}, {t.right[i]}) for {n} nodes.")
        if not all(math.isfinite(v) for v in t.value):
            raise ProtocolError("gbdt tree: leaf values must be finite.")
        return t


@dataclass(frozen=True)
class Ensemble:
    """A boosted ensemble for binary classification (logistic loss)."""

    trees: tuple[Tree, ...]
    base_score: float
    feature_names: tuple[str, ...]

    @property
    def base_margin(self) -> float:
        """``logit(base_score)``."""
        return math.log(self.base_score / (1.0 - self.base_score))

    def predict_margin(self, x: np.ndarray) -> np.ndarray:
        """Raw scores (log-odds) of encoded rows; NaN is a missing value."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 2 or arr.shape[1] != len(self.feature_names):
            raise ProtocolError(f"rows must have shape (n, {len(self.feature_names)}), got {arr.shape}.")
        out = np.full(arr.shape[0], self.base_margin)
        for t in self.trees:
            out += np.asarray(t.value, dtype=np.float32).astype(np.float64)[t.leaf_of_rows(arr)]
        return out

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probability of the positive class."""
        return 1.0 / (1.0 + np.exp(-self.predict_margin(x)))
