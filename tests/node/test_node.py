"""The node's logic as plain functions: DP-SGD plan, budget fail-closed, hostile input, codes."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from fedcollab.core import BudgetExhausted, DataValidationError, NodeErrorCode, PrivacyError, ProtocolError, UpdateError
from fedcollab.models import build_model, model_arrays
from fedcollab.node import train_model
from fedcollab.node._client import NodeRuntime, _code_for
from fedcollab.privacy.accounting import PoissonSubsampledGaussian, Release, compute_epsilon
from fedcollab.protocols.statistics import Scaling, scaling_from_bounds


def make_node(spec, partner, root, *, run_id="run-1", policy=None) -> NodeRuntime:
    from fedcollab.node import NodeHome, init_node_home
    from fedcollab.runner._run import simulated_policy

    home = NodeHome(root / partner)
    if not home.exists():
        init_node_home(home.root, partner=partner, policy=policy or simulated_policy(spec, partner))
    return NodeRuntime(spec, partner, home=home, run_id=run_id)


@pytest.fixture(scope="module")
def swiss(heart_dp_spec, tmp_path_factory) -> NodeRuntime:
    return make_node(heart_dp_spec, "switzerland", tmp_path_factory.mktemp("nodes"))


def _release(line: str) -> Release:
    return Release.model_validate(json.loads(line)["body"]["release"])


def _init(spec) -> dict[str, np.ndarray]:
    return dict(model_arrays(build_model(spec.model, 13, seed=spec.seed)))


def _scaling(spec) -> Scaling:
    return scaling_from_bounds(np.asarray(spec.data_schema.encoded_bounds()))


class TestDpPlan:
    def test_plan_follows_the_spec(self, swiss, heart_dp_spec):
        """q = expected batch / N (capped at 1), T = rounds x epochs x floor(1/q), epsilon <= target."""
        plan = swiss.plan()
        assert plan.n_train == 30 and plan.expected_batch == 30.0 and plan.sample_rate == 1.0
        assert plan.total_steps == heart_dp_spec.training.rounds * 1 * 1
        eps = compute_epsilon(plan.mechanisms(), delta=plan.delta, accountant=plan.accountant).epsilon
        assert 0.99 < eps <= 1.0

    def test_cleveland_plan(self, heart_dp_spec, tmp_path):
        plan = make_node(heart_dp_spec, "cleveland", tmp_path).plan()
        assert plan.sample_rate == pytest.approx(32 / 199)
        assert plan.steps_per_epoch == 6 and plan.total_steps == 120

    def test_setup_releases(self, swiss):
        """Setup declares row counts public and releases no statistics under public-bounds scaling."""
        info, stats, releases = swiss.setup("public_bounds")
        assert stats is None
        assert info["n_train"] == 30 and "plan" in info
        (r,) = [_release(x) for x in releases]
        assert r.kind == "row_counts" and r.declared_public and r.non_private

    def test_exact_statistics_refused_under_dp(self, swiss):
        with pytest.raises(Exception) as exc:
            swiss.setup("federated_statistics")
        assert _code_for(exc.value) == NodeErrorCode.POLICY_REFUSED

    def test_train_round_release(self, swiss, heart_dp_spec):
        """A DP round releases a Poisson-subsampled Gaussian event with the plan's sigma and q, and no training metrics."""
        plan = swiss.plan()
        arrays, metrics, releases, steps = swiss.train(_init(heart_dp_spec), scaling=_scaling(heart_dp_spec), server_round=1, steps_so_far=0, proximal_mu=0.0)
        assert steps == plan.steps_per_epoch
        assert set(metrics) == {"num-examples"}
        (r,) = [_release(x) for x in releases]
        assert r.kind == "dpsgd_training" and r.unit == "record" and r.observer == "coordinator" and r.added_by == "switzerland"
        assert r.mechanism == PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=steps)
        assert all(np.isfinite(v).all() for v in arrays.values())

    def test_fail_closed_beyond_plan(self, swiss, heart_dp_spec):
        """A round that would take the node past its calibrated plan is refused before training."""
        plan = swiss.plan()
        with pytest.raises(BudgetExhausted):
            swiss.train(_init(heart_dp_spec), scaling=_scaling(heart_dp_spec), server_round=21, steps_so_far=plan.total_steps, proximal_mu=0.0)

    def test_plan_survives_in_state(self, heart_dp_spec, swiss, tmp_path):
        """A node restored from its state reuses the calibrated plan."""
        from dataclasses import asdict

        from fedcollab.node import NodeHome

        from fedcollab.node import _client

        plan = swiss.plan()
        # A fresh process: nothing calibrated yet, only the node's state carries the plan.
        _client._PLAN_CACHE.clear()
        again = NodeRuntime(heart_dp_spec, "switzerland", home=NodeHome(swiss.gate.ledger.path.parent), run_id="r",
                            plan_json=json.dumps(asdict(plan)))
        assert again.plan() == plan
        # The plan is read from the state, not calibrated again: a marked copy comes back as stored.
        _client._PLAN_CACHE.clear()
        marked = replace(plan, noise_multiplier=plan.noise_multiplier * 2)
        restored = NodeRuntime(heart_dp_spec, "switzerland", home=NodeHome(swiss.gate.ledger.path.parent), run_id="r",
                               plan_json=json.dumps(asdict(marked)))
        assert restored.plan() == marked
        _client._PLAN_CACHE.clear()  # the marked plan must not serve the tests that follow


class TestHostileInput:
    @pytest.mark.parametrize("mutate", ["nan", "shape", "missing"])
    def test_bad_global_model(self, swiss, heart_dp_spec, mutate):
        arrays = _init(heart_dp_spec)
        if mutate == "nan":
            arrays["linear.weight"] = np.full_like(arrays["linear.weight"], np.nan)
        elif mutate == "shape":
            arrays["linear.weight"] = np.zeros((2, 13), dtype=np.float32)
        else:
            del arrays["linear.bias"]
        with pytest.raises(UpdateError):  # code 121, BAD_MODEL_UPDATE
            swiss.train(arrays, scaling=_scaling(heart_dp_spec), server_round=1, steps_so_far=0, proximal_mu=0.0)

    def test_codes_not_text(self):
        """Exceptions map to closed codes; their text is never part of the code."""
        assert _code_for(DataValidationError("patient_123 is odd")) == NodeErrorCode.DATA_SCHEMA_MISMATCH
        assert _code_for(BudgetExhausted("x")) == NodeErrorCode.BUDGET_EXHAUSTED
        assert _code_for(PrivacyError("x")) == NodeErrorCode.PRIVACY_INVALID
        assert _code_for(ProtocolError("x")) == NodeErrorCode.BAD_REQUEST
        assert _code_for(UpdateError("x")) == NodeErrorCode.BAD_MODEL_UPDATE
        assert _code_for(KeyError("patient_123")) == NodeErrorCode.INTERNAL

    def test_unknown_partner(self, heart_dp_spec, swiss):
        from fedcollab.core import PolicyRefused
        from fedcollab.node import NodeHome

        with pytest.raises(PolicyRefused, match="another partner"):
            NodeRuntime(heart_dp_spec, "atlantis", home=NodeHome(swiss.gate.ledger.path.parent), run_id="r")


class TestDpSgd:
    def test_empty_poisson_batches_are_noise_steps(self, heart_dp_spec, swiss):
        """With q tiny, most Poisson batches are empty; each still takes a (noise-only) step."""
        plan = replace(swiss.plan(), sample_rate=0.01, expected_batch=0.3, steps_per_epoch=100, noise_multiplier=1.0)
        model = build_model(heart_dp_spec.model, 13, seed=0)
        before = model_arrays(model)
        d = swiss.data
        out = train_model(model, _scaling(heart_dp_spec).apply(d.x_train), d.y_train, training=heart_dp_spec.training, plan=plan)
        assert out.steps == 100
        assert out.empty_batches > 50
        after = model_arrays(model)
        assert not np.allclose(before["linear.weight"], after["linear.weight"])

    def test_without_noise_the_update_is_deterministic_and_clipped(self, heart_dp_spec, swiss):
        """Sanity of the Opacus wiring: tiny noise + q = 1 gives a clipped full-batch gradient step."""
        plan = replace(swiss.plan(), sample_rate=1.0, expected_batch=30.0, steps_per_epoch=1, noise_multiplier=1e-9, clip_norm=0.01)
        model = build_model(heart_dp_spec.model, 13, seed=0)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        d = swiss.data
        train_model(model, _scaling(heart_dp_spec).apply(d.x_train), d.y_train, training=heart_dp_spec.training, plan=plan)
        after = torch.cat([p.detach().flatten() for p in model.parameters()])
        # Mean of 30 per-example gradients each clipped to 0.01: the step is at most lr * 0.01.
        assert float((after - before).norm()) <= heart_dp_spec.training.learning_rate * 0.01 * 1.0001
        assert float((after - before).norm()) > 0
