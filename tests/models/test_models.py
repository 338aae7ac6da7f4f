"""Model construction and strategies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcollab.core import SpecError
from fedcollab.models import build_model, model_arrays, set_model_arrays
from fedcollab.spec import ModelSpec


class TestBuild:
    def test_seed_fixes_init_and_leaves_global_rng(self):
        """The same seed gives the same initial model, and global torch RNG state is untouched."""
        state = torch.random.get_rng_state()
        a = model_arrays(build_model(ModelSpec(), 13, seed=7))
        b = model_arrays(build_model(ModelSpec(), 13, seed=7))
        c = model_arrays(build_model(ModelSpec(), 13, seed=8))
        assert torch.equal(state, torch.random.get_rng_state())
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert not np.array_equal(a["linear.weight"], c["linear.weight"])

    def test_mlp_shapes(self):
        m = build_model(ModelSpec(kind="mlp", hidden=[8, 4]), 13, seed=0)
        assert m(torch.zeros(5, 13)).shape == (5,)

    def test_custom_model(self):
        m = build_model(ModelSpec(kind="custom", target="torch.nn:Identity"), 13, seed=0)
        assert isinstance(m, torch.nn.Identity)

    def test_custom_model_not_importable(self):
        with pytest.raises(SpecError, match="cannot import"):
            build_model(ModelSpec(kind="custom", target="no_such_pkg.mod:Net"), 13, seed=0)

    def test_set_arrays_checks_shapes(self):
        m = build_model(ModelSpec(), 13, seed=0)
        bad = dict(model_arrays(m))
        bad["linear.weight"] = np.zeros((1, 12), dtype=np.float32)
        with pytest.raises(ValueError, match="shapes"):
            set_model_arrays(m, bad)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedadam"])
def test_strategies(heart_spec, strategy):
    """Each spec strategy maps to the matching Flower Message-API strategy."""
    from fedcollab.coordinator._server import _strategy

    spec = heart_spec.model_copy(update={"training": heart_spec.training.model_copy(update={"strategy": strategy})})
    s = _strategy(spec, 4)
    assert type(s).__name__ == {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam"}[strategy]
    assert s.min_train_nodes == 4
