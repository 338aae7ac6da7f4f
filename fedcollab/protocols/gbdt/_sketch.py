"""Quantile bin edges from a count sketch (``[model.gbdt] bin_edges = "quantile"``).

Equal-width edges over the schema's public bounds waste bins on a skewed column with wide bounds.
With ``bin_edges = "quantile"`` a run starts with one *sketch* step: every node counts its
training rows of each number feature in the cells of a fine public grid (``SKETCH_GRID``
equal-width cells over the feature's public bounds), adds Gaussian noise under record-level DP,
and releases the counts; the coordinator sums them and puts each feature's ``n_bins - 1`` edges
at the pooled quantiles ``k / n_bins``, chosen among the grid's cell boundaries. The edges travel
back to the nodes as grid *indices* with the first tree's first step; a node checks them (strictly
increasing, on the grid, at most ``n_bins - 1``) and bins its rows with them from then on.

Privacy: a record is counted once in each of the ``k`` number features' sketches (a missing value
in none), so adding or removing it changes at most ``k`` counts by 1: L2 sensitivity ``sqrt(k)``.
The sketch is one Gaussian release in the whole model's plan (``dp_sketch_share`` of its
precision, :mod:`fedcollab.protocols.gbdt._dp`). The edges are a function of the noisy release
only, so everything the trees release stays as private as with public edges (post-processing):
the edge choice changes which cells are summed, never how much one record adds to a cell. Without
DP the sketch is a non-private release like the histograms, which the node's policy must allow.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.protocols.gbdt._binning import BinLayout, _edges, binary_flags
from fedcollab.spec import SKETCH_GRID, SchemaSpec

@dataclass(frozen=True)
class SketchLayout:
    """Which encoded features are sketched (the number features) and each one's fine public grid."""

    features: tuple[int, ...]
    grids: tuple[np.ndarray, ...]  # increasing float32-representable boundaries; cell c holds grid[c-1] <= x < grid[c]

    @property
    def n_cells(self) -> int:
        """Cells per feature in a sketch (features with a coarser grid leave their last cells empty)."""
        return SKETCH_GRID


def sketch_layout_from_schema(schema: SchemaSpec) -> SketchLayout:
    """The number features of the schema's encoding and their grids (public bounds only)."""
    binary = binary_flags(schema)
    bounds = np.asarray(schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)
    feats = tuple(j for j, b in enumerate(binary) if not b)
    return SketchLayout(features=feats, grids=tuple(_edges(float(bounds[j, 0]), float(bounds[j, 1]), SKETCH_GRID) for j in feats))


def sketch_counts(x: np.ndarray, sk: SketchLayout) -> np.ndarray:
    """Counts of the rows' values in every grid cell, shape ``(len(features), SKETCH_GRID)``; NaN counted nowhere."""
    arr = np.asarray(x, dtype=np.float64)
    out = np.zeros((len(sk.features), sk.n_cells), dtype=np.float64)
    for i, (j, grid) in enumerate(zip(sk.features, sk.grids)):
        if not 0 <= j < arr.shape[1]:
            raise ProtocolError(f"sketch feature {j} outside the rows' {arr.shape[1]} columns.")
        col = arr[:, j].astype(np.float32)
        col = col[~np.isnan(col)]
        cells = np.searchsorted(grid.astype(np.float32), col, side="right")
        out[i, :] = np.bincount(cells, minlength=sk.n_cells)[: sk.n_cells]
    return out


def edges_from_sketch(total: np.ndarray, sk: SketchLayout, *, n_bins: int) -> tuple[tuple[int, ...], ...]:
    """Grid indices of each feature's edges at the pooled quantiles ``k / n_bins`` of the (noisy) summed counts.

    Negative noisy counts count as 0; a feature whose counts sum to nothing gets evenly spaced grid edges.
    """
    t = np.asarray(total, dtype=np.float64)
    if t.shape != (len(sk.features), sk.n_cells) or not np.all(np.isfinite(t)):
        raise ProtocolError(f"a summed sketch must be {(len(sk.features), sk.n_cells)} finite counts, got {t.shape}.")
    out = []
    qs = np.arange(1, n_bins) / n_bins
    for i, grid in enumerate(sk.grids):
        m = grid.size  # boundaries; cells 0..m
        c = np.clip(t[i, : m + 1], 0.0, None)
        if c.sum() <= 0:
            idx = np.unique(np.round(qs * (m - 1)).astype(np.int64))
        else:
            cum = np.cumsum(c) / c.sum()
            idx = np.unique(np.clip(np.searchsorted(cum, qs, side="left"), 0, m - 1))
        out.append(tuple(int(v) for v in idx))
    return tuple(out)


def layout_from_sketch(public: BinLayout, sk: SketchLayout, indices: Sequence[Sequence[int]], *, n_bins: int) -> BinLayout:
    """The public layout with each sketched feature's edges replaced by the grid boundaries ``indices`` names.

    Raises
    ------
    ProtocolError
        If the indices are not, for every sketched feature, 1 to ``n_bins - 1`` strictly increasing grid indices.
    """
    if len(indices) != len(sk.features):
        raise ProtocolError(f"quantile edges: expected edges of {len(sk.features)} features, got {len(indices)}.")
    edges = list(public.edges)
    for j, grid, idx in zip(sk.features, sk.grids, indices):
        ints = list(idx)
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in ints):
            raise ProtocolError(f"quantile edges of feature `{public.feature_names[j]}` must be grid indices (ints).")
        arr = np.asarray(ints, dtype=np.int64)
        if not (1 <= arr.size <= n_bins - 1 and arr[0] >= 0 and arr[-1] < grid.size and np.all(np.diff(arr) > 0)):
            raise ProtocolError(f"quantile edges of feature `{public.feature_names[j]}` must be 1 to {n_bins - 1} increasing indices "
                                f"into its {grid.size}-boundary grid, got {ints[:8]}{'...' if len(ints) > 8 else ''}.")
        edges[j] = grid[arr]
    return BinLayout(feature_names=public.feature_names, edges=tuple(edges))
