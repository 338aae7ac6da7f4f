"""Two short simulations: distributed DP under SecAgg+, and central DP with record-level DP-SGD on too."""

from __future__ import annotations

import json
import tomllib

import pytest

pytestmark = pytest.mark.slow


def _spec(mutate):
    from fedcollab.spec import parse_spec
    from tests.conftest import ROOT

    raw = tomllib.loads((ROOT / "specs" / "heart-disease-ddp.toml").read_text())
    raw["training"]["rounds"] = 2
    mutate(raw)
    return parse_spec(raw).with_base_dir(str(ROOT / "specs"))


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    import fedcollab

    out = tmp_path_factory.mktemp("ddp")
    return fedcollab.run(_spec(lambda raw: None), out=out), out


@pytest.fixture(scope="module")
def central(tmp_path_factory):
    import fedcollab

    def mutate(raw):
        raw["aggregation"] = "plain"
        raw["privacy"].update(mode="central", record_level=True, target_epsilon=1.0, delta=1e-3)

    out = tmp_path_factory.mktemp("central")
    return fedcollab.run(_spec(mutate), out=out), out


def _lines(out):
    return [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]


def _verify(out):
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    rep = verify_ledger(out / "ledger.jsonl", load_roster(out / "roster.json"))
    assert rep.exit_code == ExitCode.OK, [f.message for f in rep.findings]
    return rep


def test_distributed_guarantee_against_the_coordinator(distributed):
    """Partner level, observer coordinator, epsilon recomputed from the nodes' DDG releases within the 2-round target."""
    res, out = distributed
    (g,) = res.summary.privacy.guarantees
    assert (g.unit, g.observer, g.releases_included) == ("partner", "coordinator", ["ddg_update"])
    for p in g.partners.values():
        assert 7.9 < p.epsilon <= 8.0 and p.rounds == 2 and p.min_participants == 3 and p.wraparound_bound <= 1e-9
    # no update left in the clear: no non-private model_update release
    assert not [r for r in res.summary.privacy.non_private_releases if r.kind == "model_update"]


def test_distributed_ledger_records_every_round(distributed):
    """Each round: four DDG releases by the nodes and an aggregate entry with participants, dropouts and noise; the ledger verifies."""
    res, out = distributed
    lines = _lines(out)
    for rnd in (1, 2):
        rel = [e for e in lines if e["kind"] == "release" and e["round"] == rnd and e["body"]["release"]["kind"] == "ddg_update"]
        assert sorted(e["party"] for e in rel) == ["cleveland", "hungary", "switzerland", "va-long-beach"]
        (agg,) = [e for e in lines if e["kind"] == "aggregate" and e["round"] == rnd]
        b = agg["body"]
        assert len(b["summed"]) == 4 and b["dropped"] == [] and b["threshold"] == 2 and b["t_min"] == 3
        assert b["noise_std_on_sum"] == pytest.approx(b["sigma_total"] / 3**0.5 * 2)
    rep = _verify(out)
    spend = {(s.party, s.unit) for s in rep.spends if s.releases}
    assert ("hungary", "partner") in spend


def test_central_and_record_level_side_by_side(central):
    """Both guarantees listed, never added: record level toward the coordinator, partner level toward model recipients."""
    res, out = central
    gs = {(g.unit, g.observer): g for g in res.summary.privacy.guarantees}
    assert set(gs) == {("record", "coordinator"), ("partner", "model_recipients")}
    assert res.summary.privacy.record_level
    for p in gs[("record", "coordinator")].partners.values():
        assert 0 < p.epsilon <= 1.0
    for p in gs[("partner", "model_recipients")].partners.values():
        assert 7.9 < p.epsilon <= 8.0 and p.mechanism == "gaussian"


def test_central_releases_stay_off_the_nodes_budgets(central):
    """The coordinator records the central releases in its own chain; no node entry is at unit partner."""
    res, out = central
    lines = _lines(out)
    node_partner = [e for e in lines if e["kind"] == "release" and e["party"] != "coordinator" and e["body"]["release"]["unit"] == "partner"]
    assert node_partner == []
    coord = [e for e in lines if e["kind"] == "release" and e["party"] == "coordinator"]
    assert len(coord) == 8 and {e["body"]["release"]["observer"] for e in coord} == {"model_recipients"}
    _verify(out)


def test_report_shows_each_aggregation_round(distributed, tmp_path):
    """The auditor's report lists every round's aggregate: partners summed, dropouts, threshold, t_min and the noise."""
    from fedcollab.audit import write_report
    from fedcollab.spec import load_roster

    res, out = distributed
    write_report(out / "ledger.jsonl", load_roster(out / "roster.json"), tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Aggregation rounds" in md
    section = md.split("## Aggregation rounds", 1)[1].split("\n## ", 1)[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| ") and "distributed" in ln]
    assert len(rows) == 2 and all("| secagg | 4 | none | 2 | 3 | 0 |" in r for r in rows)
