"""The node's side of distributed DP as plain functions: refuse below t_min, charge the partner-level budget."""

from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest

from fedcollab.core import BudgetExhausted, NodeErrorCode
from fedcollab.models import build_model, model_arrays
from fedcollab.node._client import NodeRuntime, _code_for
from fedcollab.privacy.accounting import ZCDPMechanism, read_ledger
from fedcollab.protocols.partner_dp import plan_distributed
from fedcollab.spec import BudgetSpec, NodePolicy, parse_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def spec():
    raw = tomllib.loads((ROOT / "specs" / "heart-disease-ddp.toml").read_text())
    return parse_spec(raw).with_base_dir(str(ROOT / "specs"))


def node(spec, root, *, budget=8.0, run_id="run-ddp") -> NodeRuntime:
    from fedcollab.node import NodeHome, init_node_home

    policy = NodePolicy(partner="hungary", allow_non_private_training=True,
                        budgets=[BudgetSpec(dataset="hungary", unit="partner", epsilon=budget, delta=1e-3)])
    home = NodeHome(root / "hungary")
    if not home.exists():
        init_node_home(home.root, partner="hungary", policy=policy)
    return NodeRuntime(spec, "hungary", home=home, run_id=run_id)


def arrays(spec, shift=0.0):
    m = model_arrays(build_model(spec.model, len(spec.data_schema.encoded_features()), seed=0))
    return {k: v + shift for k, v in m.items()}


def entries(n):
    return [ln.entry for ln in read_ledger(n.gate.ledger.path)]


def test_too_few_participants_refused_before_release(spec, tmp_path):
    """Two partners left (t_min = 3): a coded refusal is recorded and no release is made."""
    n = node(spec, tmp_path)
    with pytest.raises(Exception) as exc:
        n.release_ddg(arrays(spec, 0.1), arrays(spec), server_round=1, participants=2)
    assert _code_for(exc.value) == NodeErrorCode.TOO_FEW_PARTICIPANTS
    kinds = [e["kind"] for e in entries(n)]
    assert kinds == ["refusal"] and entries(n)[0]["body"]["code"] == int(NodeErrorCode.TOO_FEW_PARTICIPANTS)


def test_release_records_the_round_and_charges_the_partner_budget(spec, tmp_path):
    """A DDG release: unit partner, observer coordinator, the plan's zCDP event, participants and noise recorded."""
    n = node(spec, tmp_path)
    vec, line = n.release_ddg(arrays(spec, 0.1), arrays(spec), server_round=1, participants=3)
    assert vec.dtype == np.uint32 and vec.size == 14
    (e,) = entries(n)
    r = e["body"]["release"]
    plan = plan_distributed(spec, d=14)
    assert (r["kind"], r["unit"], r["observer"]) == ("ddg_update", "partner", "coordinator")
    assert ZCDPMechanism.model_validate(r["mechanism"]) == plan.mechanism()
    det = r["details"]
    assert det["participants"] == 3 and det["t_min"] == 3 and det["threshold"] == 2
    assert det["sigma_total"] == pytest.approx(plan.sigma_total) and det["wraparound_bound"] <= 1e-9
    assert e["body"]["budget"]["epsilon"] == 8.0 and 0 < e["body"]["claim"]["epsilon_total"] < 8.0


def test_budget_exhausted_refuses_before_release(spec, tmp_path):
    """A budget below one round's spend: refused, recorded, nothing released."""
    n = node(spec, tmp_path, budget=0.05)
    with pytest.raises(BudgetExhausted):
        n.release_ddg(arrays(spec, 0.1), arrays(spec), server_round=1, participants=4)
    assert [e["kind"] for e in entries(n)] == ["refusal"]


def test_unmask_check_counts_survivors(spec, tmp_path):
    """At the unmask stage the node counts the survivors the coordinator names (itself included)."""
    n = node(spec, tmp_path)
    n.check_participants(3, server_round=1, stage="unmask")  # fine
    with pytest.raises(Exception) as exc:
        n.check_participants(2, server_round=1, stage="unmask")
    assert _code_for(exc.value) == NodeErrorCode.TOO_FEW_PARTICIPANTS
