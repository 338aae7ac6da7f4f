"""One short simulation of Heart with aggregation = "secagg", beside the same spec with plain FedAvg."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(plain, secagg) results of the same 2-round no-DP spec."""
    import fedcollab
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    base = load_spec(ROOT / "specs" / "heart-disease-secagg.toml")
    short = base.training.model_copy(update={"rounds": 2})
    secagg = base.model_copy(update={"training": short}).with_base_dir(base.base_dir)
    plain = base.model_copy(update={"training": short, "aggregation": "plain"}).with_base_dir(base.base_dir)
    return (
        fedcollab.run(plain, out=tmp_path_factory.mktemp("plain")),
        fedcollab.run(secagg, out=tmp_path_factory.mktemp("secagg")),
    )


def test_secagg_model_equals_plain(pair):
    """The securely aggregated model equals plain FedAvg within the fixed-point error (scale 2^20)."""
    plain, sec = pair
    assert sec.summary.aggregation == "secagg"
    for k, v in plain.model.items():
        np.testing.assert_allclose(sec.model[k], v, atol=1e-5)
    assert sec.summary.metrics.pooled_test.accuracy == pytest.approx(plain.summary.metrics.pooled_test.accuracy, abs=0.01)


def test_secagg_run_ledger_verifies(pair):
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    _, sec = pair
    rep = verify_ledger(sec.out_dir / "ledger.jsonl", load_roster(sec.out_dir / "roster.json"))
    assert rep.exit_code == ExitCode.OK
    details = [r for r in sec.summary.privacy.non_private_releases if r.kind == "model_update"]
    assert {r.party for r in details} == {"cleveland", "hungary", "switzerland", "va-long-beach"}


def test_statistics_summed_under_secagg(pair):
    """The scaling statistics went through secure aggregation (mod 2^64) and match the plain round's."""
    plain, sec = pair
    for key in ("mean", "std"):
        np.testing.assert_allclose(sec.summary.scaling_parameters[key], plain.summary.scaling_parameters[key], rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def dropout_run(tmp_path_factory):
    """DP + secagg, 3 rounds, where Switzerland lowers its budget after round 1 (the whole plan passed its
    check at setup): its gate refuses round 2, a real dropout."""
    import fedcollab
    from fedcollab.node import init_node_home
    from fedcollab.privacy.accounting import compute_epsilon
    from fedcollab.protocols.dpsgd import plan_dp
    from fedcollab.runner._run import simulated_policy
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    base = load_spec(ROOT / "specs" / "heart-disease-secagg.toml")
    dp = load_spec(ROOT / "specs" / "heart-disease-dp.toml")
    spec = base.model_copy(update={
        "training": base.training.model_copy(update={"rounds": 3, "min_partners": 3}),
        "privacy": dp.privacy,
        "preprocessing": dp.preprocessing,
    }).with_base_dir(base.base_dir)
    spec = type(spec).model_validate(spec.model_dump(by_alias=True)).with_base_dir(base.base_dir)
    plan = plan_dp(spec, n_train=30, n_features=13)
    eps = [compute_epsilon(plan.mechanisms(steps=s), delta=plan.delta, accountant=plan.accountant).epsilon for s in (1, 2)]
    from fedcollab.spec import policy_toml

    nodes = tmp_path_factory.mktemp("nodes")
    for p in spec.partners:
        init_node_home(nodes / p.name, partner=p.name, policy=simulated_policy(spec, p.name))

    def lower_switzerlands_budget(record):
        if record.round == 1:
            policy = simulated_policy(spec, "switzerland")
            budget = policy.budgets[0].model_copy(update={"epsilon": (eps[0] + eps[1]) / 2})
            (nodes / "switzerland" / "policy.toml").write_text(policy_toml(policy.model_copy(update={"budgets": [budget]})))

    return fedcollab.run(spec, out=tmp_path_factory.mktemp("dropout"), nodes=nodes, on_round=lower_switzerlands_budget), eps


def test_dropout_at_masked_input_survives(dropout_run):
    """Switzerland refuses round 2 (its budget): the round completes with the other three, and so does round 3."""
    from fedcollab.core import NodeErrorCode

    result, eps = dropout_run
    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.rounds[0].partners_trained == ["cleveland", "hungary", "switzerland", "va-long-beach"]
    assert result.rounds[1].partners_trained == ["cleveland", "hungary", "va-long-beach"]
    assert result.rounds[2].partners_trained == ["cleveland", "hungary", "va-long-beach"]
    assert int(NodeErrorCode.BUDGET_EXHAUSTED) in result.summary.failures["switzerland"]
    assert all(np.isfinite(v).all() for v in result.model.values())
    assert result.summary.metrics.pooled_test.n > 0  # evaluated; utility under random DP noise is benchmarks/secagg.py's
    (g,) = result.summary.privacy.guarantees
    assert g.partners["switzerland"].steps == 1 and g.partners["switzerland"].epsilon == pytest.approx(eps[0], rel=1e-9)


def test_dropout_run_ledger_verifies_with_the_refusal(dropout_run):
    import json

    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    result, _ = dropout_run
    rep = verify_ledger(result.out_dir / "ledger.jsonl", load_roster(result.out_dir / "roster.json"))
    assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings][:3]
    entries = [json.loads(x) for x in (result.out_dir / "ledger.jsonl").read_text().splitlines()]
    assert any(e["kind"] == "refusal" and e["party"] == "switzerland" for e in entries)
