"""The ``[model.gbdt]`` table: federated histogram gradient-boosted trees (``[model] kind = "gbdt"``).

Every field is optional. Fields left out resolve to defaults measured on the Heart benchmark
(``benchmarks/trees.py``), with one set for runs without DP and one for record-level DP, where
shallower trees with a large learning rate and a large lambda spend the budget better (see docs/protocols/gbdt.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field

from fedcollab.core import FrozenModel


def _integral_float_to_int(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


# The same constraints as ``_models.Finite`` (that module imports this one).
Finite = Annotated[float, Field(allow_inf_nan=False)]
TreeCount = Annotated[int, Field(ge=1, le=10_000), BeforeValidator(_integral_float_to_int)]
Depth = Annotated[int, Field(ge=1, le=12), BeforeValidator(_integral_float_to_int)]
Bins = Annotated[int, Field(ge=2, le=1024), BeforeValidator(_integral_float_to_int)]


@dataclass(frozen=True)
class TreeParams:
    """Resolved tree parameters (every field set): what the protocol runs with."""

    n_trees: int
    max_depth: int
    learning_rate: float
    n_bins: int
    min_child_weight: float
    reg_lambda: float
    gamma: float
    base_score: float
    dp_split: Literal["random", "histogram"]
    dp_leaf_share: float
    grad_clip: float
    hess_clip: float
    bin_edges: Literal["public", "quantile"] = "public"
    dp_sketch_share: float = 0.1


#: Fine grid of the quantile sketch: equal-width cells over a feature's public bounds; the edges are
#: chosen among these cells' boundaries (public, so a node can check every edge it is sent).
SKETCH_GRID = 256

#: Defaults without DP and with record-level DP (measured: benchmarks/trees.py, docs/protocols/gbdt.md).
DEFAULTS_NO_DP: dict[str, Any] = {"n_trees": 50, "max_depth": 3, "learning_rate": 0.1, "reg_lambda": 1.0, "min_child_weight": 1.0}
DEFAULTS_DP: dict[str, Any] = {"n_trees": 50, "max_depth": 2, "learning_rate": 1.0, "reg_lambda": 500.0, "min_child_weight": 0.0}


class GbdtSpec(FrozenModel):
    """Histogram gradient-boosted trees (logistic loss), trained federated and exported as an XGBoost model."""

    n_trees: TreeCount | None = Field(default=None, description="Number of boosting rounds (one tree each); default 50 (with or without DP).")
    max_depth: Depth | None = Field(default=None, description="Depth of every tree (levels of splits); default 3 without DP, 2 with record-level DP.")
    learning_rate: Finite | None = Field(default=None, gt=0, le=1, description="Shrinkage eta applied to every leaf value; default 0.1 without DP, 1 with record-level DP.")
    n_bins: Bins = Field(default=32, description="Bins of a number feature, equal-width over its public schema bounds (0/1 features get two bins); one more bin holds missing values.")
    min_child_weight: Finite | None = Field(default=None, ge=0, description="Smallest hessian sum of a child for a split to count; default 1 without DP, 0 with record-level DP (noisy sums).")
    reg_lambda: Finite | None = Field(default=None, ge=0, description="L2 regularisation lambda of leaf values; default 1 without DP, 500 with record-level DP (averages the noise of many small steps).")
    gamma: Finite = Field(default=0.0, ge=0, description="Minimum loss reduction of a split (XGBoost's gamma).")
    base_score: Finite = Field(default=0.5, gt=0, lt=1, description="Initial prediction (a probability); 0.5 is margin 0 and uses no data.")
    dp_split: Literal["random", "histogram"] = Field(default="random", description="With record-level DP: `random` splits drawn from the public bins (no privacy cost, the whole budget on leaf sums) or `histogram` (noisy gradient histograms per level, `dp_leaf_share` of the budget on leaves).")
    dp_leaf_share: Finite = Field(default=0.8, gt=0, le=1, description="dp_split = 'histogram': share of the composed Gaussian precision (1/sigma^2) spent on leaf sums; 1 is only allowed with `random`.")
    grad_clip: Finite = Field(default=1.0, gt=0, description="With record-level DP: per-record bound on |gradient| (logistic loss: |p - y| <= 1 already).")
    hess_clip: Finite = Field(default=0.25, gt=0, description="With record-level DP: per-record bound on the hessian (logistic loss: p(1 - p) <= 1/4 already).")
    bin_edges: Literal["public", "quantile"] = Field(default="public", description="Bin edges of number features: `public` (equal-width over the schema bounds, no data, no cost) or `quantile` (each node releases a count sketch of its rows on a fine public grid, noisy and charged under record-level DP; the coordinator sets the edges at the pooled quantiles). Measured on Heart: public is as good (benchmarks/trees.py), hence the default; quantile is for skewed columns with wide bounds. Under aggregation = 'secagg' the sketches are summed in the run's first SecAgg+ round, so the coordinator sees only the pooled sketch.")
    dp_sketch_share: Finite = Field(default=0.1, gt=0, lt=1, description="bin_edges = 'quantile' with record-level DP: share of the composed Gaussian precision (1/sigma^2) spent on the sketch; the trees get the rest.")

    def resolved(self, *, record_dp: bool) -> TreeParams:
        """Every field set, defaults chosen by whether record-level DP is on."""
        base = DEFAULTS_DP if record_dp else DEFAULTS_NO_DP
        pick = {k: (getattr(self, k) if getattr(self, k) is not None else v) for k, v in base.items()}
        return TreeParams(
            n_bins=self.n_bins, gamma=self.gamma, base_score=self.base_score, dp_split=self.dp_split,
            dp_leaf_share=self.dp_leaf_share, grad_clip=self.grad_clip, hess_clip=self.hess_clip, bin_edges=self.bin_edges,
            dp_sketch_share=self.dp_sketch_share, **pick,
        )

    def problems(self) -> list[str]:
        """Cross-field problems of the table (one line each)."""
        out = []
        if self.dp_split == "histogram" and self.dp_leaf_share >= 1:
            out.append(f"model.gbdt.dp_leaf_share must be < 1 with dp_split = 'histogram' (some budget must go to the split histograms), got {self.dp_leaf_share}")
        return out


def gbdt_problems(spec: Any) -> list[str]:
    """Problems of a spec with ``[model] kind = "gbdt"`` outside the model table (one line each)."""
    out = []
    if spec.model.kind != "gbdt":
        return out
    if spec.aggregation == "he":
        out.append("model kind 'gbdt' is not offered with aggregation = 'he' (per-bin sums of every tree level do not fit the BFV budget); use 'plain' or 'secagg'")
    if spec.privacy.mode in ("distributed", "central"):
        out.append(f"model kind 'gbdt' offers privacy.mode 'none' or 'record', got {spec.privacy.mode!r}")
    table = spec.model.gbdt
    if table is not None and table.bin_edges == "quantile" and spec.layout == "vertical":
        out.append("model.gbdt.bin_edges = 'quantile' is for horizontal runs; a vertical run's passive parties bin their own columns (vertical.passive_bins)")
    return out


def tree_params(spec: Any) -> TreeParams:
    """The resolved tree parameters of a spec with ``[model] kind = "gbdt"`` (defaults by privacy mode)."""
    table = spec.model.gbdt if spec.model.gbdt is not None else GbdtSpec()
    return table.resolved(record_dp=spec.privacy.record_dp)
