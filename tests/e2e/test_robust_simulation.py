"""Short Heart simulations: plain aggregation with `strategy = "median"`, and secagg with `secagg.clip_l2`."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow

BOUND = 1e-3  # far below an honest Heart update's norm, so every node's clip is visible in the model


def _short(path: str, *, rounds: int = 2, training: dict | None = None, secagg: dict | None = None):
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    base = load_spec(ROOT / "specs" / path)
    update = {"training": base.training.model_copy(update={"rounds": rounds, **(training or {})})}
    if secagg:
        update["secagg"] = base.secagg.model_copy(update=secagg)
    return base.model_copy(update=update).with_base_dir(base.base_dir)


def test_median_run_completes(tmp_path):
    """Two rounds aggregated by Flower's FedMedian end with a model that learned something."""
    import fedcollab

    res = fedcollab.run(_short("heart-disease.toml", training={"strategy": "median"}), out=tmp_path)
    assert res.summary.strategy == "median"
    assert res.summary.metrics.pooled_test.accuracy > 0.6


def test_secagg_nodes_apply_their_clip(tmp_path):
    """Under secagg with clip_l2 = B each round's mean update has norm <= B: the model moves at most rounds * B."""
    import fedcollab
    from fedcollab.models import build_model, model_arrays

    spec = _short("heart-disease-secagg.toml", secagg={"clip_l2": BOUND})
    init = model_arrays(build_model(spec.model, len(spec.data_schema.encoded_features()), seed=spec.seed))
    res = fedcollab.run(spec, out=tmp_path)
    moved = np.sqrt(sum(float(np.sum((np.asarray(res.model[k], dtype=np.float64) - v) ** 2)) for k, v in init.items()))
    assert 0 < moved <= 2 * BOUND + 1e-5  # plus the fixed-point error (scale 2^20)
