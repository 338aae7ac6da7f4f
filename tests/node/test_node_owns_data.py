"""The node owns its dataset id, its split and its budget plan (issue 13 attacks 2 and 5, issue 17 item 2).

Each attack is replayed against the node's logic as plain functions: a coded refusal, recorded in
the node's ledger, an unchanged budget and nothing released.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from fedcollab.core import BudgetExhausted, NodeErrorCode
from fedcollab.models import build_model, model_arrays
from fedcollab.node import NodeHome, init_node_home
from fedcollab.node._client import NodeRuntime, _code_for
from fedcollab.privacy.accounting import GaussianMechanism, PoissonSubsampledGaussian, Release
from fedcollab.protocols.evaluation import HIST_BINS, dp_test_metrics, histogram_bins, pooled_metrics
from fedcollab.protocols.statistics import scaling_from_bounds
from fedcollab.spec import BudgetSpec, NodePolicy


def _variant(spec, **changes):
    """A validated copy of ``spec`` with nested changes (``partners`` a function of the raw partner list)."""
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    for key, value in changes.items():
        if callable(value):
            raw[key] = value(raw[key])
        elif isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    return type(spec).model_validate(raw).with_base_dir(spec.base_dir)


def _with_partner(name, **fields):
    def edit(partners):
        return [{**p, **fields} if p["name"] == name else p for p in partners]
    return edit


def _home(root, partner, policy, dataset=None) -> NodeHome:
    home = NodeHome(root / partner)
    if not home.exists():
        init_node_home(home.root, partner=partner, policy=policy, dataset=dataset)
    return home


def _entries(home: NodeHome) -> list[dict]:
    return [json.loads(x) for x in home.ledger_path.read_text().splitlines()]


def _probe(partner: str) -> Release:
    return Release(party=partner, added_by=partner, kind="dpsgd_training", about="train", unit="record", observer="coordinator", round=1,
                   mechanism=PoissonSubsampledGaussian(noise_multiplier=1.0, sample_rate=0.1, steps=10))


def _eval_args(spec):
    arrays = dict(model_arrays(build_model(spec.model, 13, seed=spec.seed)))
    return arrays, scaling_from_bounds(np.asarray(spec.data_schema.encoded_bounds()))


def _budgeted(partner: str, epsilon: float = 1.0, **kw) -> NodePolicy:
    return NodePolicy(partner=partner, budgets=[BudgetSpec(dataset=partner, epsilon=epsilon, delta=1e-3)], **kw)


class TestDatasetIdIsNodeLocal:
    """Attack 5: a spec naming another dataset cannot select another budget."""

    def test_public_demo_dataset_refused(self, heart_spec, tmp_path):
        """`dataset = "public-demo"` in the spec: refused with DATASET_MISMATCH, recorded, nothing released, budget unchanged."""
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", allow_non_private_training=True))
        gate = home.gate("cleveland", home.dataset())
        before = gate.would_spend(_probe("cleveland"), run_id="r")
        spec = _variant(heart_spec, partners=_with_partner("cleveland", dataset="public-demo"))
        with pytest.raises(Exception) as exc:
            NodeRuntime(spec, "cleveland", home=home, run_id="r")
        assert _code_for(exc.value) == NodeErrorCode.DATASET_MISMATCH
        (e,) = _entries(home)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.DATASET_MISMATCH)
        assert e["body"]["dataset"] == "cleveland"  # recorded under the node's own dataset
        assert "public-demo" not in json.dumps(e)  # the spec's value does not enter the signed record
        assert gate.would_spend(_probe("cleveland"), run_id="r") == before
        assert not home.split_path.exists()  # refused before the split was even pinned

    def test_analytics_node_refuses_another_dataset(self, heart_spec, tmp_path):
        """The analytics node (queries, profiles) takes its dataset id from the node folder too."""
        from fedcollab.core import PolicyRefused
        from fedcollab.node._analytics import NodeAnalytics

        home = _home(tmp_path, "cleveland", _budgeted("cleveland"))
        spec = _variant(heart_spec, partners=_with_partner("cleveland", dataset="public-demo"))
        with pytest.raises(PolicyRefused):
            NodeAnalytics(spec, "cleveland", home=home, run_id="q")
        (e,) = _entries(home)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.DATASET_MISMATCH) and e["body"]["dataset"] == "cleveland"

    def test_spec_without_dataset_uses_the_node_folder(self, heart_spec, tmp_path):
        """The node folder's dataset id selects the budget, whatever the partner is called in the spec."""
        home = _home(tmp_path, "cleveland", NodePolicy(partner="cleveland", allow_non_private_training=True), dataset="cleveland-2020")
        node = NodeRuntime(heart_spec, "cleveland", home=home, run_id="r")
        assert node.dataset == node.gate.dataset == "cleveland-2020"
        assert json.loads(home.config_path.read_text())["dataset"] == "cleveland-2020"

    def test_same_dataset_named_in_spec_is_accepted(self, heart_spec, tmp_path):
        home = _home(tmp_path, "cleveland", NodePolicy(partner="cleveland", allow_non_private_training=True), dataset="cleveland-2020")
        spec = _variant(heart_spec, partners=_with_partner("cleveland", dataset="cleveland-2020"))
        assert NodeRuntime(spec, "cleveland", home=home, run_id="r").dataset == "cleveland-2020"

    def test_simulation_node_folders_take_the_spec_partner_dataset(self, heart_spec, tmp_path):
        from fedcollab.runner._run import prepare_simulated_nodes

        spec = _variant(heart_spec, partners=_with_partner("hungary", dataset="hungary-1988"))
        homes = prepare_simulated_nodes(spec, tmp_path)
        assert homes["hungary"].dataset() == "hungary-1988" and homes["cleveland"].dataset() == "cleveland"
        assert homes["hungary"].policy().resolved_test_metrics == "public"


class TestSplitIsPinned:
    """Attack 2: the coordinator cannot move the train/test split after the node pinned it."""

    def _node(self, spec, tmp_path, policy=None, partner="cleveland"):
        home = _home(tmp_path, partner, policy or NodePolicy(partner=partner, allow_non_private_training=True))
        return home, NodeRuntime(spec, partner, home=home, run_id="r")

    def test_first_use_pins_the_split(self, heart_spec, tmp_path):
        home, node = self._node(heart_spec, tmp_path)
        pinned = json.loads(home.split_path.read_text())["splits"]["cleveland"]
        assert pinned == {"test_fraction": 0.34, "stratify": True, "column": None, "test_value": "test", "seed": 43}
        assert node.data.n_test > 0

    @pytest.mark.parametrize("split", [{"test_fraction": 0.99, "seed": 43}, {"column": "id", "test_value": 1}, {"test_fraction": 0.34, "seed": 7}])
    def test_a_changed_split_is_refused(self, heart_spec, tmp_path, split):
        """test_fraction 0.99, a split on `id` (one chosen patient) or another split seed: SPLIT_CHANGED, recorded, nothing released."""
        home, _ = self._node(heart_spec, tmp_path)
        pinned = home.split_path.read_bytes()
        spec = _variant(heart_spec, partners=_with_partner("cleveland", split=split))
        with pytest.raises(Exception) as exc:
            NodeRuntime(spec, "cleveland", home=home, run_id="r2")
        assert _code_for(exc.value) == NodeErrorCode.SPLIT_CHANGED
        (e,) = _entries(home)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.SPLIT_CHANGED) and e["run_id"] == "r2"
        assert home.split_path.read_bytes() == pinned

    def test_spec_seed_alone_does_not_move_the_test_rows(self, heart_spec, tmp_path):
        """A split without its own seed follows the pinned one, not the spec's seed (sweeps keep the same test rows)."""
        first = _variant(heart_spec, partners=_with_partner("cleveland", split={"test_fraction": 0.34}))
        home, a = self._node(first, tmp_path)
        b = NodeRuntime(_variant(first, seed=7), "cleveland", home=home, run_id="r2")
        assert np.array_equal(a.data.x_test, b.data.x_test) and np.array_equal(a.data.y_test, b.data.y_test)

    def test_one_row_test_split_is_refused_at_evaluation(self, heart_spec, tmp_path):
        """A first spec splitting on `id` = one patient: evaluation is refused (min_test_rows), recorded, nothing released."""
        spec = _variant(heart_spec, partners=_with_partner("cleveland", split={"column": "id", "test_value": 1}))
        home, node = self._node(spec, tmp_path, NodePolicy(partner="cleveland", allow_non_private_training=True, test_metrics="public"))
        assert node.data.n_test == 1
        arrays, scaling = _eval_args(spec)
        res, (line,) = node.evaluate(arrays, scaling=scaling, server_round=1)
        assert res == {"n": 0, "correct": 0.0, "loss_sum": 0.0, "hist_pos": [0] * 20, "hist_neg": [0] * 20}  # about no row
        (e,) = _entries(home)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.TEST_SPLIT_TOO_SMALL)
        assert json.loads(line) == e  # the signed refusal is the reply's only ledger line


class TestTestMetrics:
    """Test-split releases are bounded by the policy: off, public (capped resolution) or DP and charged."""

    def test_off_by_default_with_a_budget(self, heart_dp_spec, tmp_path):
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=5))
        node = NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="r")
        assert node.policy.resolved_test_metrics == "off"
        arrays, scaling = _eval_args(heart_dp_spec)
        res, (line,) = node.evaluate(arrays, scaling=scaling, server_round=1)
        assert res["n"] == 0 and not any(res["hist_pos"] + res["hist_neg"]) and res["correct"] == res["loss_sum"] == 0.0
        (e,) = _entries(home)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.POLICY_REFUSED)
        assert json.loads(line) == e

    def test_public_metrics_have_capped_resolution(self, heart_dp_spec, tmp_path):
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=5, test_metrics="public", max_histogram_bins=30))
        node = NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="r")
        arrays, scaling = _eval_args(heart_dp_spec)
        res, (line,) = node.evaluate(arrays, scaling=scaling, server_round=1)
        assert len(res["hist_pos"]) == len(res["hist_neg"]) == 25  # the largest divisor of 2000 that is <= 30
        assert sum(res["hist_pos"]) + sum(res["hist_neg"]) == res["n"] == node.data.n_test
        body = json.loads(line)["body"]
        assert body["non_private"] and not body["counted"]

    def test_dp_metrics_are_noised_charged_and_planned(self, heart_dp_spec, tmp_path):
        """Under "dp" the release is a Gaussian event in the ledger, counted toward the budget; more evaluations than planned are refused."""
        spec = _variant(heart_dp_spec, training={"rounds": 2})
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=5, test_metrics="dp", test_metrics_epsilon=0.5))
        node = NodeRuntime(spec, "cleveland", home=home, run_id="r")
        z = node.test_metrics_plan()
        assert z is not None and node.evaluations_planned() == 2
        arrays, scaling = _eval_args(spec)
        before = node.gate.would_spend(_probe("cleveland"), run_id="r")[1]
        res, (line,) = node.evaluate(arrays, scaling=scaling, server_round=1)
        body = json.loads(line)["body"]
        assert body["counted"] and not body["non_private"]
        assert body["release"]["mechanism"] == {"mechanism": "gaussian", "noise_multiplier": z, "releases": 1}
        assert 0 < body["claim"]["epsilon_total"] <= 0.5
        assert node.gate.would_spend(_probe("cleveland"), run_id="r")[1] > before  # charged
        node.evaluate(arrays, scaling=scaling, server_round=2)
        res, (line,) = node.evaluate(arrays, scaling=scaling, server_round=3)  # beyond the plan: withheld
        assert res["n"] == 0 and json.loads(line)["body"]["code"] == int(NodeErrorCode.BUDGET_EXHAUSTED)
        assert [e["body"]["release"]["kind"] for e in _entries(home) if e["kind"] == "release"] == ["test_metrics", "test_metrics"]
        # The two planned evaluations together cost at most test_metrics_epsilon.
        from fedcollab.privacy.accounting import compute_epsilon

        assert compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=2)], delta=1e-3, accountant="rdp").epsilon <= 0.5 + 1e-9

    def test_dp_noise_has_the_calibrated_scale(self):
        res = {"n": 50, "correct": 40.0, "loss_sum": 20.0, "hist_pos": [10] * 20, "hist_neg": [15] * 20}
        gen = np.random.default_rng(1)
        draws = np.array([dp_test_metrics(res, noise_multiplier=3.0, generator=gen)["hist_pos"] for _ in range(400)], dtype=float)
        # std 3 x sensitivity 2 = 6 (clipping at 0 is far from the mean of 10 +/- 6 only at the tail)
        assert 5.0 < draws.std() < 7.0
        assert abs(draws.mean() - 10) < 1.0

    def test_histograms_of_different_resolutions_pool(self):
        fine = np.zeros(HIST_BINS, dtype=int)
        fine[[10, 1500]] = 1
        coarse_neg = [0] * 20
        coarse_neg[0] = 1
        parts = [{"n": 2, "correct": 2, "loss_sum": 0.1, "hist_pos": fine.tolist(), "hist_neg": [0] * HIST_BINS},
                 {"n": 1, "correct": 1, "loss_sum": 0.1, "hist_pos": [0] * 20, "hist_neg": coarse_neg}]
        m = pooled_metrics(parts)
        assert m.n == 3 and m.auc == pytest.approx(0.75)  # row 10 ties the negative's bin (half), row 1500 beats it
        from fedcollab.node._client import _zero_metrics

        assert pooled_metrics([*parts, _zero_metrics(20)]) == m  # a withheld evaluation adds nothing
        assert histogram_bins(20) == 20 and histogram_bins(2000) == 2000 and histogram_bins(3) == 2


@pytest.mark.filterwarnings("ignore::fedcollab.spec.PolicyWarning")  # delta 1e-3 on Cleveland's 199 rows, as in the demo spec
class TestBudgetPreflight:
    """Issue 17 item 2: the whole run's planned spend is checked at setup, before anything is spent."""

    def test_plan_beyond_the_budget_is_refused_at_setup(self, heart_dp_spec, tmp_path):
        spec = _variant(heart_dp_spec, privacy={"target_epsilon": 2.0})
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=1.0))
        node = NodeRuntime(spec, "cleveland", home=home, run_id="r")
        before = node.gate.would_spend(_probe("cleveland"), run_id="r")
        with pytest.raises(BudgetExhausted) as exc:
            node.setup("public_bounds")
        assert _code_for(exc.value) == NodeErrorCode.BUDGET_EXHAUSTED
        assert re.match(r"plan needs (2\.0|1\.99\d*), 1\.0 left of 1\.0 for dataset cleveland; budgets carry over", str(exc.value))
        assert "--nodes DIR, default OUT/nodes" in str(exc.value) and "delete a simulated partner's node folder" in str(exc.value)
        (e,) = _entries(home)  # the refusal and nothing else (no row counts, no statistics)
        assert e["kind"] == "refusal" and e["body"]["code"] == int(NodeErrorCode.BUDGET_EXHAUSTED)
        assert node.gate.would_spend(_probe("cleveland"), run_id="r") == before

    def test_plan_that_fits_is_accepted(self, heart_dp_spec, tmp_path):
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=1.0))
        NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="r").setup("public_bounds")
        assert [e["kind"] for e in _entries(home)] == ["release"]  # row counts

    def test_dp_test_metrics_count_in_the_plan(self, heart_dp_spec, tmp_path):
        """Training fits epsilon 1.0 on its own; with DP test metrics of 0.5 on top, the plan does not."""
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=1.0, test_metrics="dp", test_metrics_epsilon=0.5))
        with pytest.raises(BudgetExhausted, match="plan needs"):
            NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="r").setup("public_bounds")
        assert [e["kind"] for e in _entries(home)] == ["refusal"]

    def test_earlier_runs_count(self, heart_dp_spec, tmp_path):
        """What earlier runs spent (the on-disk ledger) is composed with the plan: the message says what is left."""
        home = _home(tmp_path, "cleveland", _budgeted("cleveland", epsilon=1.2))
        gate = home.gate("cleveland", "cleveland")
        node = NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="old")
        plan = node.plan()
        gate.record(Release(party="cleveland", added_by="cleveland", kind="dpsgd_training", about="train", unit="record", observer="coordinator",
                            round=1, mechanism=PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                                                         steps=plan.total_steps)),
                    run_id="old", payload=b"")
        with pytest.raises(BudgetExhausted, match=r"plan needs 1\.0, 0\.\d+ left of 1\.2 for dataset cleveland"):
            NodeRuntime(heart_dp_spec, "cleveland", home=home, run_id="new").setup("public_bounds")


@pytest.mark.filterwarnings("ignore::fedcollab.spec.PolicyWarning")
def test_simulation_stops_before_round_one_when_a_partner_refuses_its_plan(heart_dp_spec, tmp_path):
    """A partner whose node folder has too little budget left refuses at setup: the run stops before round 1, naming it."""
    import fedcollab
    from fedcollab.core import NodeError

    spec = _variant(heart_dp_spec, training={"rounds": 1})
    nodes = tmp_path / "nodes"
    _home(nodes, "hungary", _budgeted("hungary", epsilon=0.5))
    with pytest.raises(NodeError) as exc:
        fedcollab.run(spec, out=tmp_path / "out", nodes=nodes)
    assert exc.value.codes == {"hungary": int(NodeErrorCode.BUDGET_EXHAUSTED)}
    assert "stopped before round 1" in str(exc.value)
    # The signed refusal's reason reaches the person, with how budgets carry over.
    assert re.search(r"hungary: code 131 \(BUDGET_EXHAUSTED\): the run's plan needs epsilon 1\.0 \(unit record\), 0\.5 left of 0\.5", str(exc.value))
    assert "--nodes DIR, default OUT/nodes" in str(exc.value) and str(nodes / "hungary") in str(exc.value)
    ledger = [json.loads(x) for x in (tmp_path / "out" / "ledger.jsonl").read_text().splitlines()]
    assert any(e.get("party") == "hungary" and e["kind"] == "refusal" for e in ledger)
    assert not any(e.get("kind") == "release" and e["body"]["release"]["kind"] == "dpsgd_training" for e in ledger)


@pytest.mark.filterwarnings("ignore::fedcollab.spec.PolicyWarning")
def test_simulation_with_dp_test_metrics_charges_them_and_verifies(heart_dp_spec, tmp_path):
    """One partner opts in to DP test metrics: its evaluations are Gaussian events in the run's epsilon, and the run ledger verifies."""
    import fedcollab
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.runner._run import simulated_policy
    from fedcollab.spec import load_roster

    spec = _variant(heart_dp_spec, training={"rounds": 1})
    nodes = tmp_path / "nodes"
    policy = simulated_policy(spec, "cleveland").model_copy(update={"test_metrics": "dp", "test_metrics_epsilon": 0.5})
    _home(nodes, "cleveland", policy)
    result = fedcollab.run(spec, out=tmp_path / "out", nodes=nodes)
    (g,) = result.summary.privacy.guarantees
    assert "test_metrics" in g.releases_included
    assert g.partners["cleveland"].epsilon > g.partners["hungary"].epsilon  # training at the same target, plus test metrics
    assert not any(r.party == "cleveland" and r.kind == "test_metrics" for r in result.summary.privacy.non_private_releases)
    rep = verify_ledger(tmp_path / "out" / "ledger.jsonl", load_roster(tmp_path / "out" / "roster.json"))
    assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings][:3]
