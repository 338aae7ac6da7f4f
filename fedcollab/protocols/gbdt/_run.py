"""What both roles derive from the spec for a GBDT run (public parameters only), and the model's wire form.

Node and coordinator call these with their own copy of the spec: the tree parameters, the bin
layout, the DP plan, the steps of a tree and the secure-aggregation round of every step, the
releases the whole model makes (the node's setup preflight) and the secagg encoding bound.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import Release
from fedcollab.protocols.gbdt._binning import BinLayout, layout_from_schema
from fedcollab.protocols.gbdt._dp import GbdtDpPlan, plan_gbdt_dp, sketch_release, tree_releases
from fedcollab.protocols.gbdt._histogram import histogram_bound
from fedcollab.protocols.gbdt._model import Ensemble, Tree
from fedcollab.protocols.gbdt._protocol import split_levels
from fedcollab.protocols.gbdt._sketch import SketchLayout, sketch_layout_from_schema
from fedcollab.spec import SchemaSpec, Spec, TreeParams, tree_params

#: Fixed-point scale of the secagg encoding of the sums (2^24: far below the noise, far from wrapping).
SECAGG_SCALE = float(2**24)


def params_of(spec: Spec) -> TreeParams:
    """The resolved tree parameters of ``spec``."""
    return tree_params(spec)


@lru_cache(maxsize=16)
def _layout(schema_json: str, n_bins: int) -> BinLayout:
    return layout_from_schema(SchemaSpec.model_validate_json(schema_json), n_bins=n_bins)


def layout_of(spec: Spec) -> BinLayout:
    """The public bin layout of the spec's schema."""
    return _layout(spec.data_schema.model_dump_json(by_alias=True), params_of(spec).n_bins)


@lru_cache(maxsize=16)
def _sketch(schema_json: str) -> SketchLayout:
    return sketch_layout_from_schema(SchemaSpec.model_validate_json(schema_json))


def sketch_of(spec: Spec) -> SketchLayout | None:
    """The quantile sketch's features and grids (None with ``bin_edges = "public"`` or no number feature)."""
    if params_of(spec).bin_edges != "quantile":
        return None
    sk = _sketch(spec.data_schema.model_dump_json(by_alias=True))
    return sk if sk.features else None


@lru_cache(maxsize=16)
def _plan(params: TreeParams, n_features: int, eps: float, delta: float, accountant: str, sketch_features: int) -> GbdtDpPlan:
    return plan_gbdt_dp(params, n_features=n_features, target_epsilon=eps, delta=delta, accountant=accountant,  # type: ignore[arg-type]
                        sketch_features=sketch_features)


def plan_of(spec: Spec) -> GbdtDpPlan | None:
    """The record-level DP plan of the whole model (None without record-level DP)."""
    if not spec.privacy.record_dp:
        return None
    p = spec.privacy
    assert p.target_epsilon is not None and p.delta is not None
    sk = sketch_of(spec)
    return _plan(params_of(spec), layout_of(spec).n_features, float(p.target_epsilon), float(p.delta), p.accountant,
                 len(sk.features) if sk is not None else 0)


def steps_per_tree(spec: Spec) -> int:
    """Exchanges per tree: the split-histogram steps, then the leaves."""
    return split_levels(params_of(spec), plan_of(spec)) + 1


def sketch_steps(spec: Spec) -> int:
    """1 with a quantile sketch (the run's step 1), else 0."""
    return 1 if sketch_of(spec) is not None else 0


def max_steps(spec: Spec) -> int:
    """Most exchanges of the whole model: its steps are numbered 1..max_steps (a tree that stops early skips none)."""
    return sketch_steps(spec) + params_of(spec).n_trees * steps_per_tree(spec)


def secagg_length(spec: Spec) -> int:
    """The fixed length of every step's secagg vector: the largest release (the sketch included), shorter ones zero-padded.

    Fixed because under pipelined SecAgg+ the next step's round opens before its release is known
    (a tree may stop splitting early, and then the leaves come at an earlier step).
    """
    params, layout, sk = params_of(spec), layout_of(spec), sketch_of(spec)
    levels = split_levels(params, plan_of(spec))
    hist = (2 ** (levels - 1)) * layout.n_slots * 2 if levels > 0 else 0
    sketch = len(sk.features) * sk.n_cells if sk is not None else 0
    return max(hist, (2 ** params.max_depth) * 2, sketch)


def sketch_bound(spec: Spec, max_rows: int) -> float:
    """The bound on every cell of one node's count sketch that the secagg encoding checks: its rows, plus 12 sigma of noise."""
    plan = plan_of(spec)
    return float(max_rows) + 12.0 * (plan.sigma_sketch if plan is not None else 0.0)


def planned_releases(spec: Spec, party: str, *, after_trees: int = 0) -> list[Release]:
    """Every release the whole model makes about ``party``'s training rows, in order.

    ``after_trees = k`` (a run resumed after its k-th tree): the releases still to come, the
    trees from k on (the sketch and the earlier trees are in the ledger already).
    """
    params, plan = params_of(spec), plan_of(spec)
    levels = split_levels(params, plan)
    k = max(0, min(int(after_trees), params.n_trees))
    out: list[Release] = [sketch_release(plan, party=party)] if sketch_of(spec) is not None and k == 0 else []
    for t in range(k, params.n_trees):
        out += tree_releases(plan, party=party, tree=t, split_levels=levels)
    return out


def cell_bound(spec: Spec, max_rows: int) -> float:
    """The bound on every summed cell that the secagg encoding checks (clipping, rows, 12 sigma of noise)."""
    params, plan = params_of(spec), plan_of(spec)
    sigma = 0.0 if plan is None else max(plan.sigma_split, plan.sigma_leaf)
    return histogram_bound(max_rows=max_rows, grad_clip=min(params.grad_clip, 1.0), hess_clip=min(params.hess_clip, 0.25),
                           noise_margin=12.0 * sigma)


def ensemble_to_wire(model: Ensemble) -> dict[str, Any]:
    """The model as one flat record (coordinator -> node, for evaluation)."""
    return {"trees": json.dumps([t.to_wire() for t in model.trees]), "base_score": float(model.base_score)}


def ensemble_from_wire(wire: Any, spec: Spec) -> Ensemble:
    """Parse a model record against the spec's layout (every split on a schema feature)."""
    try:
        trees = json.loads(str(wire["trees"]))
        base = float(wire["base_score"])
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("gbdt: a model record needs `trees` (JSON) and `base_score`") from None
    if not isinstance(trees, list) or not math.isfinite(base) or not 0 < base < 1:
        raise ProtocolError("gbdt: malformed model record")
    layout = layout_of(spec)
    model = Ensemble(trees=tuple(Tree.from_wire(t) for t in trees), base_score=base, feature_names=layout.feature_names)
    if any(f >= layout.n_features for t in model.trees for f in t.feature):
        raise ProtocolError("gbdt: a tree splits on a feature outside the schema")
    return model


def checkpoint_arrays(trees: Sequence[Tree], *, step: int, edges: dict[str, Any] | None) -> dict[str, np.ndarray]:
    """The coordinator's checkpoint after a tree: the finished trees, the last step number, the quantile edges (if any)."""
    doc = {"protocol": "fedcollab.gbdt.checkpoint.v1", "trees": [t.to_wire() for t in trees], "step": int(step), "edges": edges}
    return {"gbdt": np.frombuffer(json.dumps(doc).encode(), dtype=np.uint8).copy()}


def from_checkpoint(arrays: Mapping[str, np.ndarray], spec: Spec, *, trees_done: int) -> tuple[list[Tree], int, dict[str, Any] | None]:
    """Read :func:`checkpoint_arrays` back: ``(trees, last step, edges record or None)``, checked against the spec.

    Raises
    ------
    ProtocolError
        If the checkpoint is not a gbdt checkpoint of ``trees_done`` trees of this spec.
    """
    try:
        doc = json.loads(np.asarray(arrays["gbdt"], dtype=np.uint8).tobytes())
        if doc.get("protocol") != "fedcollab.gbdt.checkpoint.v1":
            raise ValueError("not a gbdt checkpoint")
        model = ensemble_from_wire({"trees": json.dumps(doc["trees"]), "base_score": params_of(spec).base_score}, spec)
        step = doc["step"]
        edges = doc["edges"]
        if not isinstance(step, int) or isinstance(step, bool) or not (isinstance(edges, dict) or edges is None):
            raise ValueError("malformed step or edges")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"gbdt checkpoint: expected the trees, step and edges of a gbdt run, got a malformed checkpoint ({type(exc).__name__})") from None
    trees = list(model.trees)
    if len(trees) != trees_done or not 0 < trees_done < params_of(spec).n_trees or not 0 < step <= max_steps(spec):
        raise ProtocolError(f"gbdt checkpoint: expected {trees_done} of {params_of(spec).n_trees} trees within "
                            f"{max_steps(spec)} steps, got {len(trees)} trees at step {step}")
    if (edges is None) != (sketch_of(spec) is None):
        raise ProtocolError("gbdt checkpoint: quantile edges must be there exactly when the spec's bin_edges is 'quantile'")
    return trees, step, edges
