"""Federated histogram gradient-boosted trees (horizontal), exported as an XGBoost model.

Pure functions and records; the Flower wiring (node adapter, coordinator strategy) calls them.
See docs/protocols/gbdt.md for the protocol, its messages, the DP sensitivity and the threat model.

* binning: public bin edges from the schema bounds, binning of encoded rows (missing bin per feature)
* sketch: quantile bin edges from the nodes' (noisy) count sketch on a fine public grid
* histogram: per-node, per-feature, per-bin (G, H) sums, their sum, their secagg fixed-point encoding
* split: the XGBoost gain, the learned missing direction, leaf values, random splits
* dp: record-level clipping, Gaussian noise, the calibrated plan and the release events
* protocol: messages and the node / coordinator stage functions; train: the in-process run
* run: what node and coordinator derive from the spec (plan, layout, rounds, releases, wire model)
* model / xgboost: the ensemble, its scorer, and XGBoost's JSON model format
"""

from fedcollab.protocols.gbdt._binning import BinLayout, bin_rows, layout_from_bounds, layout_from_schema
from fedcollab.protocols.gbdt._dp import GbdtDpPlan, add_noise, clip_gradients, plan_gbdt_dp, release_event, sketch_release, tree_releases
from fedcollab.protocols.gbdt._histogram import (
    build_histograms,
    decode_histograms,
    encode_histograms,
    histogram_bound,
    leaf_sums,
    sum_histograms,
)
from fedcollab.protocols.gbdt._model import Ensemble, Tree
from fedcollab.protocols.gbdt._protocol import (
    PROTOCOL,
    GrowingTree,
    HistogramReply,
    LevelRequest,
    NodeSplit,
    NodeState,
    coordinator_start_tree,
    coordinator_step,
    edges_from_wire,
    edges_to_wire,
    is_sketch_request,
    logistic_gradients,
    node_apply_tree,
    node_init,
    node_reply,
    node_resume,
    node_set_edges,
    node_sketch,
    sketch_reply_from_wire,
    sketch_reply_wire,
    sketch_request_wire,
    split_levels,
    tree_digest,
)
from fedcollab.protocols.gbdt._run import (
    SECAGG_SCALE,
    cell_bound,
    checkpoint_arrays,
    ensemble_from_wire,
    ensemble_to_wire,
    from_checkpoint,
    layout_of,
    max_steps,
    params_of,
    plan_of,
    planned_releases,
    secagg_length,
    sketch_bound,
    sketch_of,
    sketch_steps,
    steps_per_tree,
)
from fedcollab.protocols.gbdt._sketch import SketchLayout, edges_from_sketch, layout_from_sketch, sketch_counts, sketch_layout_from_schema
from fedcollab.protocols.gbdt._split import Split, best_split, leaf_value, random_split, split_gain
from fedcollab.protocols.gbdt._train import TrainResult, train_in_process
from fedcollab.protocols.gbdt._xgboost import from_xgboost_json, to_xgboost_json, write_tree_model, write_xgboost_json, xgboost_json_bytes

__all__ = [
    "BinLayout",
    "Ensemble",
    "GbdtDpPlan",
    "GrowingTree",
    "HistogramReply",
    "LevelRequest",
    "NodeSplit",
    "NodeState",
    "PROTOCOL",
    "SECAGG_SCALE",
    "SketchLayout",
    "Split",
    "TrainResult",
    "Tree",
    "add_noise",
    "best_split",
    "bin_rows",
    "build_histograms",
    "cell_bound",
    "checkpoint_arrays",
    "clip_gradients",
    "coordinator_start_tree",
    "coordinator_step",
    "decode_histograms",
    "edges_from_sketch",
    "edges_from_wire",
    "edges_to_wire",
    "encode_histograms",
    "ensemble_from_wire",
    "ensemble_to_wire",
    "from_checkpoint",
    "from_xgboost_json",
    "histogram_bound",
    "is_sketch_request",
    "layout_from_bounds",
    "layout_from_schema",
    "layout_from_sketch",
    "layout_of",
    "leaf_sums",
    "leaf_value",
    "logistic_gradients",
    "max_steps",
    "node_apply_tree",
    "node_init",
    "node_reply",
    "node_resume",
    "node_set_edges",
    "node_sketch",
    "params_of",
    "plan_gbdt_dp",
    "plan_of",
    "planned_releases",
    "random_split",
    "release_event",
    "secagg_length",
    "sketch_bound",
    "sketch_counts",
    "sketch_layout_from_schema",
    "sketch_of",
    "sketch_release",
    "sketch_reply_from_wire",
    "sketch_reply_wire",
    "sketch_request_wire",
    "sketch_steps",
    "split_gain",
    "split_levels",
    "steps_per_tree",
    "sum_histograms",
    "to_xgboost_json",
    "train_in_process",
    "tree_digest",
    "tree_releases",
    "write_tree_model",
    "write_xgboost_json",
    "xgboost_json_bytes",
]
