"""The ensemble as XGBoost's JSON model format (``doc/model.schema`` of dmlc/xgboost, version 3.x).

fedcollab writes the JSON itself (xgboost is only a test / optional dependency): ``gbtree``
booster, ``binary:logistic`` objective, ``base_score`` as a probability, one tree per boosting
round. Per tree, XGBoost's parallel arrays: ``left_children`` / ``right_children`` (-1 at a
leaf), ``parents`` (2147483647 at the root), ``split_indices``, ``split_conditions`` (the
threshold, or the leaf value at a leaf), ``default_left``, ``base_weights``, ``loss_changes``,
``sum_hessian``; numerical splits only (``split_type`` 0), no categories (one-hot columns are
split at 0.5). Loaded by ``xgboost.Booster(model_file="model.json")``, it predicts what
:meth:`Ensemble.predict_proba` predicts (the same float32 thresholds and leaf values).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from fedcollab.protocols.gbdt._model import Ensemble, Tree

_ROOT_PARENT = 2147483647
XGBOOST_VERSION = [3, 2, 0]


def _tree_json(tree: Tree, index: int, n_features: int) -> dict[str, Any]:
    n = tree.n_nodes
    parents = [_ROOT_PARENT] * n
    for i in range(n):
        if tree.left[i] >= 0:
            parents[tree.left[i]] = i
            parents[tree.right[i]] = i
    leaf = [tree.left[i] < 0 for i in range(n)]
    return {
        "base_weights": list(tree.value),
        "categories": [], "categories_nodes": [], "categories_segments": [], "categories_sizes": [],
        "default_left": [int(bool(tree.default_left[i]) and not leaf[i]) for i in range(n)],
        "id": index,
        "left_children": list(tree.left),
        "loss_changes": [0.0 if leaf[i] else float(tree.gain[i]) for i in range(n)],
        "parents": parents,
        "right_children": list(tree.right),
        "split_conditions": [tree.value[i] if leaf[i] else tree.threshold[i] for i in range(n)],
        "split_indices": [0 if leaf[i] else int(tree.feature[i]) for i in range(n)],
        "split_type": [0] * n,
        "sum_hessian": list(tree.hessian),
        "tree_param": {"num_deleted": "0", "num_feature": str(n_features), "num_nodes": str(n), "size_leaf_vector": "1"},
    }


def to_xgboost_json(model: Ensemble) -> dict[str, Any]:
    """The model as an XGBoost JSON document (a dict)."""
    d = len(model.feature_names)
    t = len(model.trees)
    return {
        "learner": {
            "attributes": {},
            "feature_names": list(model.feature_names),
            "feature_types": ["float"] * d,
            "gradient_booster": {
                "model": {
                    "cats": {"enc": [], "feature_segments": [], "sorted_idx": []},
                    "gbtree_model_param": {"num_parallel_tree": "1", "num_trees": str(t)},
                    "iteration_indptr": list(range(t + 1)),
                    "tree_info": [0] * t,
                    "trees": [_tree_json(tree, i, d) for i, tree in enumerate(model.trees)],
                },
                "name": "gbtree",
            },
            "learner_model_param": {"base_score": f"[{model.base_score:.9E}]", "boost_from_average": "0", "num_class": "0",
                                    "num_feature": str(d), "num_target": "1"},
            "objective": {"name": "binary:logistic", "reg_loss_param": {"scale_pos_weight": "1"}},
        },
        "version": XGBOOST_VERSION,
    }


def write_xgboost_json(model: Ensemble, path: str | Path) -> str:
    """Write ``model.json`` (compact, sorted keys) and return its SHA-256 (hex) for the summary."""
    data = xgboost_json_bytes(model)
    Path(path).write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def xgboost_json_bytes(model: Ensemble, attributes: dict[str, str] | None = None) -> bytes:
    """The model file's bytes (compact, sorted keys); ``attributes`` go to XGBoost's string attributes (``Booster.attributes()``)."""
    doc = to_xgboost_json(model)
    if attributes:
        doc["learner"]["attributes"] = {str(k): str(v) for k, v in attributes.items()}
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def from_xgboost_json(raw: bytes | str, *, source: str = "model.json") -> tuple[Ensemble, dict[str, str]]:
    """Read a model written by :func:`xgboost_json_bytes` back: the ensemble (for scoring) and its attributes."""
    from fedcollab.core import ProtocolError

    try:
        doc = json.loads(raw)
        learner = doc["learner"]
        trees_json = learner["gradient_booster"]["model"]["trees"]
        base = float(str(learner["learner_model_param"]["base_score"]).strip("[]"))
        names = tuple(str(n) for n in learner.get("feature_names", []))
        trees = []
        for tj in trees_json:
            n = len(tj["left_children"])
            trees.append(Tree(left=tuple(int(v) for v in tj["left_children"]), right=tuple(int(v) for v in tj["right_children"]),
                              feature=tuple(int(v) for v in tj["split_indices"]), bin_index=(0,) * n,
                              threshold=tuple(float(v) for v in tj["split_conditions"]), default_left=tuple(bool(v) for v in tj["default_left"]),
                              value=tuple(float(v) for v in tj["base_weights"]), gain=tuple(float(v) for v in tj["loss_changes"]),
                              hessian=tuple(float(v) for v in tj["sum_hessian"])))
        attributes = {str(k): str(v) for k, v in learner.get("attributes", {}).items()}
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"{source}: not an XGBoost JSON model of fedcollab ({type(exc).__name__})") from None
    return Ensemble(trees=tuple(trees), base_score=base, feature_names=names), attributes


def write_tree_model(model: Ensemble, path: str | Path, metadata: dict[str, str]) -> str:
    """A run's ``model.json``, written atomically: XGBoost's format, fedcollab's model metadata as
    ``fedcollab.<key>`` string attributes. Returns its SHA-256 (simulation and deployment write the same file)."""
    import os
    import tempfile

    data = xgboost_json_bytes(model, {f"fedcollab.{k}": v for k, v in metadata.items()})
    target = Path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".json.tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    return hashlib.sha256(data).hexdigest()
