"""Budgets enforced at the node, fail-closed, across runs; policy refusals recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fedcollab.audit import verify_ledger
from fedcollab.core import BudgetExhausted, ExitCode, NodeErrorCode, PolicyRefused
from fedcollab.models import build_model, model_arrays
from fedcollab.privacy.accounting import public_key_hex
from fedcollab.protocols.statistics import scaling_from_bounds
from fedcollab.spec import BudgetSpec, NodePolicy, Roster, RosterEntry
from tests.node.test_node import make_node


def _roster(node) -> Roster:
    return Roster(parties={node.partner: RosterEntry(signing_key=public_key_hex(node.gate.ledger.key))})


def _train_rounds(node, spec, rounds: int, *, setup: bool = True) -> int:
    """Train up to ``rounds`` rounds; returns how many were released before a refusal."""
    arrays = dict(model_arrays(build_model(spec.model, 13, seed=spec.seed)))
    scaling = scaling_from_bounds(np.asarray(spec.data_schema.encoded_bounds()))
    if setup:
        node.setup("public_bounds")
    steps = 0
    for r in range(1, rounds + 1):
        try:
            arrays, _, _, s = node.train(arrays, scaling=scaling, server_round=r, steps_so_far=steps, proximal_mu=0.0)
        except BudgetExhausted:
            return r - 1
        steps += s
    return rounds


class TestAcrossRuns:
    def test_second_run_stops_at_the_budget(self, heart_dp_spec, tmp_path):
        """Two runs of 20 rounds at epsilon 1 each against a lifetime budget of 1.5: the second is refused at setup
        (its plan does not fit) and, sent train messages without setup, stops early; nothing exceeds 1.5."""
        policy = NodePolicy(partner="switzerland", budgets=[BudgetSpec(dataset="switzerland", epsilon=1.5, delta=1e-3)])
        first = make_node(heart_dp_spec, "switzerland", tmp_path, run_id="run-a", policy=policy)
        assert _train_rounds(first, heart_dp_spec, 20) == 20
        second = make_node(heart_dp_spec, "switzerland", tmp_path, run_id="run-b")
        with pytest.raises(BudgetExhausted, match="plan needs"):
            second.setup("public_bounds")
        done = _train_rounds(second, heart_dp_spec, 20, setup=False)
        assert 0 < done < 20
        _, total, budget = second.gate.would_spend(_dpsgd_probe(second), run_id="run-b")
        entries = [json.loads(x) for x in second.gate.ledger.path.read_text().splitlines()]
        claims = [e["body"]["claim"]["epsilon_total"] for e in entries if e["kind"] == "release" and e["body"]["counted"]]
        assert max(claims) <= 1.5
        refusals = [e for e in entries if e["kind"] == "refusal"]
        assert refusals and refusals[-1]["body"]["code"] == int(NodeErrorCode.BUDGET_EXHAUSTED)
        assert refusals[-1]["run_id"] == "run-b" and refusals[-1]["body"]["would_be_epsilon"] > 1.5
        import jsonschema

        from tests.conftest import ROOT

        schema = json.loads((ROOT / "schemas" / "ledger.schema.json").read_text())
        for e in entries:
            jsonschema.validate(e, schema)
        # Nothing was released after the refusal, and the node's ledger verifies with its budget intact.
        assert entries[-1]["kind"] == "refusal"
        rep = verify_ledger(second.gate.ledger.path, _roster(second))
        assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings]
        (spend,) = rep.spends
        assert spend.epsilon <= 1.5 and spend.complete_history
        assert total > budget["epsilon"]


def _dpsgd_probe(node):
    from fedcollab.privacy.accounting import PoissonSubsampledGaussian, Release

    plan = node.plan()
    return Release(party=node.partner, added_by=node.partner, kind="dpsgd_training", about="train", unit="record", observer="coordinator",
                   round=99, mechanism=PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=1))


class TestPolicy:
    def test_forbidden_model_kind_refused_and_recorded(self, heart_dp_spec, tmp_path):
        spec = heart_dp_spec.model_copy(update={"model": heart_dp_spec.model.model_copy(update={"kind": "mlp", "hidden": [4]})})
        policy = NodePolicy(partner="switzerland", budgets=[BudgetSpec(dataset="switzerland", epsilon=5, delta=1e-3)],
                            allowed_model_kinds=["logistic_regression"])
        node = make_node(spec, "switzerland", tmp_path, policy=policy)
        with pytest.raises(PolicyRefused, match="model kind"):
            node.setup("public_bounds")
        (e,) = [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.POLICY_REFUSED)

    def test_forbidden_privacy_mode_refused_and_recorded(self, heart_dp_spec, tmp_path):
        """A partner that takes part only with record-level DP refuses a run in another privacy mode, before any release."""
        policy = NodePolicy(partner="switzerland", budgets=[BudgetSpec(dataset="switzerland", epsilon=5, delta=1e-3)],
                            allowed_privacy_modes=["record"])
        node = make_node(heart_dp_spec, "switzerland", tmp_path / "ok", policy=policy)
        node.setup("public_bounds")  # mode "record": accepted
        raw = heart_dp_spec.model_dump(by_alias=True, exclude_none=True)
        raw["privacy"] = {"mode": "central", "partner": {"epsilon": 8.0, "delta": 1e-3}}
        central = type(heart_dp_spec).model_validate(raw).with_base_dir(heart_dp_spec.base_dir)
        node = make_node(central, "switzerland", tmp_path / "no", policy=policy)
        with pytest.raises(PolicyRefused, match="privacy mode"):
            node.setup("public_bounds")
        (e,) = [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.POLICY_REFUSED)

    def test_no_budget_no_private_release(self, heart_dp_spec, tmp_path):
        """A dataset without a budget gets no DP release at all (fail-closed)."""
        node = make_node(heart_dp_spec, "switzerland", tmp_path, policy=NodePolicy(partner="switzerland"))
        with pytest.raises(BudgetExhausted, match="no budget|needs a budget"):
            node.setup("public_bounds")  # refused up front: the plan needs a budget
        assert _train_rounds(node, heart_dp_spec, 1, setup=False) == 0

    def test_non_private_training_needs_permission(self, heart_spec, tmp_path):
        node = make_node(heart_spec, "switzerland", tmp_path, policy=NodePolicy(partner="switzerland"))
        with pytest.raises(PolicyRefused, match="non-private"):
            node.setup("federated_statistics")

    def test_non_private_test_metrics_can_be_forbidden(self, heart_dp_spec, tmp_path):
        policy = NodePolicy(partner="switzerland", budgets=[BudgetSpec(dataset="switzerland", epsilon=5, delta=1e-3)],
                            allow_non_private_test_metrics=False)
        node = make_node(heart_dp_spec, "switzerland", tmp_path, policy=policy)
        arrays = dict(model_arrays(build_model(heart_dp_spec.model, 13, seed=0)))
        res, (line,) = node.evaluate(arrays, scaling=scaling_from_bounds(np.asarray(heart_dp_spec.data_schema.encoded_bounds())), server_round=1)
        # Withheld: a constant zero record, and the signed refusal as the only ledger line.
        assert res["n"] == 0 and not any(res["hist_pos"]) and not any(res["hist_neg"])
        e = json.loads(line)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.POLICY_REFUSED) and "test metrics" in e["body"]["reason"]

    def test_delta_warning(self):
        from fedcollab.spec import PolicyWarning

        policy = NodePolicy(partner="a", budgets=[BudgetSpec(dataset="a", epsilon=1, delta=1e-3)])
        with pytest.warns(PolicyWarning, match="1/\\(10 n\\)"):
            policy.warn_delta("a", 199)

    def test_policy_file_errors_name_the_field(self, tmp_path):
        from fedcollab.core import ConfigError
        from fedcollab.spec import load_policy

        p = tmp_path / "policy.toml"
        p.write_text('partner = "a"\n[[budgets]]\ndataset = "a"\nepsilon = -1\ndelta = 1e-3\n')
        with pytest.raises(ConfigError) as exc:
            load_policy(p)
        assert any("budgets[0].epsilon" in x and "-1" in x for x in exc.value.problems)
