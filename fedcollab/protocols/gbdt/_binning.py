"""Bin edges from the schema's public bounds, and binning of encoded rows.

A number feature gets ``n_bins`` equal-width bins over its public ``[min, max]``; a 0/1 feature
(bool, one-hot category level) gets two bins split at 0.5. Each feature has one more bin, the
last, for missing values (NaN). Bin ``b`` of feature ``j`` holds the values ``x`` with
``edges[b-1] <= x < edges[b]`` (first and last bins open-ended), comparing in float32 as XGBoost
does, so "bin <= b goes left" is exactly XGBoost's ``x < split_condition`` with
``split_condition = edges[b]``. Edges are float32 numbers; nothing here reads the data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.spec import SchemaSpec


@dataclass(frozen=True)
class BinLayout:
    """Bin edges of every encoded feature and where its bins sit in a flattened histogram."""

    feature_names: tuple[str, ...]
    edges: tuple[np.ndarray, ...]  # float64 arrays of float32-representable, increasing edges

    def __post_init__(self) -> None:
        if len(self.feature_names) != len(self.edges) or not self.edges:
            raise ProtocolError(f"a bin layout needs one edge array per feature, got {len(self.feature_names)} names and {len(self.edges)} edge arrays.")
        for name, e in zip(self.feature_names, self.edges):
            if e.ndim != 1 or e.size < 1 or not np.all(np.diff(e) > 0):
                raise ProtocolError(f"edges of feature `{name}` must be a non-empty increasing 1-D array, got {e!r}.")

    @property
    def n_features(self) -> int:
        """Number of encoded features."""
        return len(self.edges)

    @property
    def n_bins(self) -> np.ndarray:
        """Value bins per feature (the missing bin not counted)."""
        return np.array([e.size + 1 for e in self.edges], dtype=np.int64)

    @property
    def offsets(self) -> np.ndarray:
        """Start of each feature's slots in a flattened histogram (its bins, then its missing bin)."""
        return np.concatenate([[0], np.cumsum(self.n_bins + 1)[:-1]]).astype(np.int64)

    @property
    def n_slots(self) -> int:
        """Slots of one node's histogram: value bins plus one missing bin, over all features."""
        return int(np.sum(self.n_bins + 1))

    def threshold(self, feature: int, bin_index: int) -> float:
        """The split condition of "bins <= ``bin_index`` go left": ``x < threshold``."""
        return float(self.edges[feature][bin_index])


def _edges(lo: float, hi: float, n_bins: int) -> np.ndarray:
    raw = lo + (hi - lo) * np.arange(1, n_bins) / n_bins
    return np.unique(raw.astype(np.float32)).astype(np.float64)


def layout_from_bounds(names: Sequence[str], bounds: np.ndarray, *, n_bins: int, binary: Sequence[bool]) -> BinLayout:
    """Equal-width edges over public ``bounds`` (shape (d, 2)); a 0/1 feature is split at 0.5."""
    b = np.asarray(bounds, dtype=np.float64)
    if b.ndim != 2 or b.shape != (len(names), 2) or len(binary) != len(names):
        raise ProtocolError(f"`bounds` must have shape ({len(names)}, 2) and `binary` {len(names)} entries, got {b.shape} and {len(binary)}.")
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ProtocolError(f"`n_bins` must be an int >= 2, got {n_bins!r}.")
    edges = tuple(np.array([0.5]) if is01 else _edges(lo, hi, n_bins) for (lo, hi), is01 in zip(b, binary))
    return BinLayout(feature_names=tuple(names), edges=edges)


def binary_flags(schema: SchemaSpec) -> list[bool]:
    """For every encoded feature: whether it is 0/1 (a bool, or one level of a one-hot category)."""
    binary: list[bool] = []
    for f in schema.features:
        col = schema.column(f)
        if col.type == "category":
            binary.extend(True for _ in (col.levels or [])[1:])
        else:
            binary.append(col.type == "bool")
    return binary


def layout_from_schema(schema: SchemaSpec, *, n_bins: int) -> BinLayout:
    """The layout of the schema's encoded features (public bounds only)."""
    binary = binary_flags(schema)
    bounds = np.asarray(schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)  # public (no data layer: the coordinator calls this too)
    return layout_from_bounds(schema.encoded_features(), bounds, n_bins=n_bins, binary=binary)


def bin_rows(x: np.ndarray, layout: BinLayout) -> np.ndarray:
    """Bin index of every value, shape (n, d) int32; NaN goes to the feature's missing bin."""
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != layout.n_features:
        raise ProtocolError(f"rows must have shape (n, {layout.n_features}), got {arr.shape}.")
    x32 = arr.astype(np.float32)
    out = np.empty(arr.shape, dtype=np.int32, order="F")  # column-major: histograms read one feature at a time
    for j, e in enumerate(layout.edges):
        col = x32[:, j]
        b = np.searchsorted(e.astype(np.float32), col, side="right")
        out[:, j] = np.where(np.isnan(col), e.size + 1, b)
    return out
