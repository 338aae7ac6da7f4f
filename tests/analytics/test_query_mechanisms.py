"""Query mechanisms in-process: noise distributions, exact results against pandas, bad input, policies, budgets."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedcollab.core import BudgetExhausted, ConfigError, NodeErrorCode, PolicyRefused
from fedcollab.node import init_node_home
from fedcollab.node._analytics import NodeAnalytics, load_frame, local_aggregates
from fedcollab.privacy.accounting import compute_epsilon, public_key_hex
from fedcollab.protocols.ddg import ddg_generator
from fedcollab.protocols.query import RESOLUTION, encode_query_vector, plan_query, query_result
from fedcollab.spec import BudgetSpec, NodePolicy, Roster, RosterEntry, StatisticsPolicy, check_query, parse_query
from tests.conftest import ROOT

HEART_CSV = ROOT / "fedcollab" / "data" / "embedded" / "heart_disease_uci.csv"  # CI has no ../shared


def _pooled(spec, query, plan, *, generator_factory=None):
    total = np.zeros(plan.layout.length, dtype=np.uint64)
    for p in spec.partners:
        agg = local_aggregates(load_frame(spec, p.name), query, plan.layout, spec.data_schema)
        gen = generator_factory() if generator_factory else None
        total = total + encode_query_vector(agg, plan, n_parties=len(spec.partners), max_rows=10**6, generator=gen)
    return total


def _node(spec, tmp_path, partner="cleveland", **policy_kw):
    policy = NodePolicy(partner=partner, **policy_kw)
    home = init_node_home(tmp_path / partner, partner=partner, policy=policy)
    return NodeAnalytics(spec, partner, home=home, run_id="run-a")


class TestNoise:
    def test_discrete_gaussian_shares_over_1e4_draws(self, heart_spec):
        """Each node's share is integer noise of variance sigma^2 / n_honest, centred, in 10^4 coordinates."""
        q = parse_query({"statistics": [{"kind": "histogram", "column": "age", "bins": 10}], "epsilon": 1.0, "group_by": "cp"})
        plan = plan_query(q, heart_spec.data_schema, n_honest=2)
        draws = []
        gen = ddg_generator()
        while sum(d.size for d in draws) < 10_000:
            v = encode_query_vector(np.zeros(plan.layout.length, dtype=np.int64), plan, n_parties=4, max_rows=10**6, generator=gen)
            draws.append(v.view(np.int64))
        x = np.concatenate(draws)[:10_000].astype(np.float64)
        want = plan.sigma / math.sqrt(2)
        assert abs(x.mean()) < 4 * want / 100  # 4 standard errors
        assert abs(x.std() / want - 1) < 0.04  # std of the std estimate is about 0.7 %
        assert len(np.unique(x)) > 1000  # integers, spread, not a constant

    def test_calibration_meets_epsilon_tightly(self, heart_spec):
        """The calibrated sigma spends at most epsilon, and not much less; rho = K / (2 z^2)."""
        q = parse_query({"statistics": [{"kind": "mean", "column": "chol"}, {"kind": "count"}], "epsilon": 1.0, "delta": 1e-6})
        plan = plan_query(q, heart_spec.data_schema, n_honest=3)
        eps = compute_epsilon([plan.mechanism], delta=1e-6, accountant="rdp").epsilon
        assert 0.9 < eps <= 1.0
        z = plan.sigma / RESOLUTION
        assert plan.mechanism.rho == pytest.approx(plan.layout.n_blocks / (2 * z * z), rel=1e-9)


class TestExactAgainstPandas:
    def test_grouped_filtered_statistics(self, heart_spec):
        """Without noise, count, sum, mean, variance, histogram and quantiles equal pandas on the pooled rows."""
        q = parse_query({
            "mode": "exact", "group_by": "sex", "where": [{"column": "age", "op": ">=", "value": 40}, {"column": "cp", "op": "!=", "value": "typical angina"}],
            "statistics": [{"kind": "count"}, {"kind": "sum", "column": "oldpeak"}, {"kind": "mean", "column": "chol"},
                           {"kind": "variance", "column": "thalch"}, {"kind": "histogram", "column": "restecg"},
                           {"kind": "quantiles", "column": "age", "bins": 82, "quantiles": [0.5]}],
        })
        check_query(q, heart_spec.data_schema)
        plan = plan_query(q, heart_spec.data_schema, n_honest=2)
        rows = {(r.group, r.statistic): r for r in query_result(q, plan, _pooled(heart_spec, q, plan), n_shares=4, min_group_size=10)}
        df = pd.read_csv(HEART_CSV)
        df = df[(df.age >= 40) & (df.cp != "typical angina")]
        for sex, g in df.groupby("sex"):
            assert rows[(sex, "count")].value == len(g)
            assert rows[(sex, "sum")].value == pytest.approx(g.oldpeak.sum(), abs=1e-3)
            assert rows[(sex, "mean")].value == pytest.approx(g.chol.mean(), rel=1e-6)
            assert rows[(sex, "variance")].value == pytest.approx(g.thalch.var(), rel=1e-5)
            levels = ["normal", "st-t abnormality", "lv hypertrophy"]
            assert rows[(sex, "histogram")].value == [float((g.restecg == lv).sum()) for lv in levels]
            assert abs(rows[(sex, "quantiles")].value[0] - g.age.median()) <= 1.0  # one-year bins
            assert rows[(sex, "count")].noise_std == 0.0

    def test_small_groups_are_suppressed_not_refused(self, heart_spec):
        """A group below the minimum size comes back suppressed; the others are answered."""
        q = parse_query({"mode": "exact", "group_by": "cp", "where": [{"column": "dataset", "op": "==", "value": "Switzerland"}],
                         "statistics": [{"kind": "count"}, {"kind": "mean", "column": "age"}]})
        plan = plan_query(q, heart_spec.data_schema, n_honest=2)
        rows = query_result(q, plan, _pooled(heart_spec, q, plan), n_shares=4, min_group_size=10)
        by = {(r.group, r.statistic): r for r in rows}
        assert by[("typical angina", "count")].suppressed and by[("typical angina", "count")].value is None  # 4 rows
        assert not by[("asymptomatic", "count")].suppressed and by[("asymptomatic", "count")].value == 98


class TestBadInput:
    @pytest.mark.parametrize("data, field", [
        ({"statistics": [{"kind": "mean", "column": "cholesterol"}], "epsilon": 1.0}, "statistics[0].column"),
        ({"statistics": [{"kind": "mean", "column": "cp"}], "epsilon": 1.0}, "statistics[0].column"),
        ({"statistics": [{"kind": "count"}], "epsilon": 1.0, "group_by": "age"}, "group_by"),
        ({"statistics": [{"kind": "count"}], "epsilon": 1.0, "where": [{"column": "sex", "op": "==", "value": "F"}]}, "where[0].value"),
    ])
    def test_schema_errors_name_the_field(self, heart_spec, data, field):
        """Unknown columns, kinds on the wrong column type, groups on numbers, unknown levels: the field is named."""
        with pytest.raises(ConfigError) as err:
            check_query(parse_query(data), heart_spec.data_schema)
        assert f"`{field}" in str(err.value) and "got" in str(err.value)

    def test_query_file_is_strict(self):
        """A misspelt key or a missing epsilon is a ConfigError naming the field."""
        with pytest.raises(ConfigError, match="epsilonn"):
            parse_query({"statistics": [{"kind": "count"}], "epsilonn": 1.0, "epsilon": 1.0})
        with pytest.raises(ConfigError, match="epsilon"):
            parse_query({"statistics": [{"kind": "count"}]})


class TestNodePolicy:
    def test_disallowed_kind_and_column_refused_and_recorded(self, heart_spec, tmp_path):
        """A kind outside allowed_queries or a column outside allowed_features is refused, recorded, nothing released."""
        node = _node(heart_spec, tmp_path, budgets=[BudgetSpec(dataset="cleveland", epsilon=8, delta=1e-5)],
                     statistics=StatisticsPolicy(allowed_queries=["count", "mean"]), allowed_features=["age", "sex", "chol"])
        with pytest.raises(PolicyRefused, match="quantiles"):
            node.answer_query(parse_query({"statistics": [{"kind": "quantiles", "column": "age"}], "epsilon": 1.0}), n_honest=2, n_parties=4,
                              generator=ddg_generator())
        with pytest.raises(PolicyRefused, match="thalch"):
            node.answer_query(parse_query({"statistics": [{"kind": "mean", "column": "thalch"}], "epsilon": 1.0}), n_honest=2, n_parties=4,
                              generator=ddg_generator())
        entries = [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]
        assert [e["kind"] for e in entries] == ["refusal", "refusal"]
        assert {e["body"]["code"] for e in entries} == {int(NodeErrorCode.POLICY_REFUSED)}

    def test_exact_mode_needs_an_unbudgeted_dataset(self, heart_spec, tmp_path):
        """Exact statistics are refused where the dataset has a budget."""
        node = _node(heart_spec, tmp_path, budgets=[BudgetSpec(dataset="cleveland", epsilon=8, delta=1e-5)], allow_non_private_training=True)
        with pytest.raises(PolicyRefused):
            node.answer_query(parse_query({"statistics": [{"kind": "count"}], "mode": "exact"}), n_honest=2, n_parties=4, generator=None)


class TestBudget:
    def test_queries_stop_at_the_budget_and_the_ledger_verifies(self, heart_spec, tmp_path):
        """Queries at epsilon 0.75 against a budget of 2: some pass, then a refusal; no claim exceeds 2; the ledger verifies."""
        from fedcollab.audit import verify_ledger

        node = _node(heart_spec, tmp_path, budgets=[BudgetSpec(dataset="cleveland", epsilon=2.0, delta=1e-5)])
        q = parse_query({"statistics": [{"kind": "mean", "column": "chol"}], "epsilon": 0.75, "delta": 1e-6})
        done = 0
        for _ in range(10):
            try:
                node.answer_query(q, n_honest=2, n_parties=4, generator=ddg_generator())
            except BudgetExhausted:
                break
            done += 1
        assert 1 <= done < 10
        with pytest.raises(BudgetExhausted):  # and it stays refused
            node.answer_query(q, n_honest=2, n_parties=4, generator=ddg_generator())
        entries = [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]
        releases = [e for e in entries if e["kind"] == "release"]
        assert len(releases) == done and all(e["body"]["release"]["kind"] == "query" for e in releases)
        assert max(e["body"]["claim"]["epsilon_total"] for e in releases) <= 2.0
        assert [e["body"]["code"] for e in entries if e["kind"] == "refusal"] == [int(NodeErrorCode.BUDGET_EXHAUSTED)] * 2
        roster = Roster(parties={"cleveland": RosterEntry(signing_key=public_key_hex(node.gate.ledger.key))})
        rep = verify_ledger(node.gate.ledger.path, roster)
        assert rep.findings == []
        assert rep.spends[0].epsilon <= 2.0 and rep.spends[0].releases == done
