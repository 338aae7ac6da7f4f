"""`run --resume` under secure aggregation with partner-level distributed DP: fresh SecAgg+ keys for the
resumed rounds, no ledger line lost, every release (the interrupted part's and the resumed part's) in
the summary's epsilon.

The failure is injected in-process: the run's own ``on_round`` callback raises after round 1 (its
checkpoint written), which fails the run as any coordinator-side error would.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

ROUNDS = 3


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT, fail_after_round_one_then_resume

    spec = load_spec(ROOT / "specs" / "heart-disease-ddp.toml").replace(training={"rounds": ROUNDS})
    out = tmp_path_factory.mktemp("ddp-resume")
    failed, lines_before, res = fail_after_round_one_then_resume(spec, out)
    return spec, out, failed, lines_before, res


def test_resumed_run_completes_with_the_same_run_id(resumed):
    spec, out, failed, _, res = resumed
    assert failed["status"] == "failed"
    assert res.summary.status == "completed" and res.summary.run_id == failed["run_id"]
    assert res.summary.resumed_after_round == 1 and res.summary.rounds == ROUNDS
    assert [r.round for r in res.rounds] == [2, 3]


def test_no_ledger_line_lost_and_the_ledger_verifies(resumed):
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    _, out, _, before, res = resumed
    after = (out / "ledger.jsonl").read_bytes().splitlines()
    assert after[: len(before)] == before  # the interrupted part's lines are all still there, in order
    rep = verify_ledger(out / "ledger.jsonl", load_roster(out / "roster.json"))
    assert rep.exit_code == ExitCode.OK


def test_every_round_charged_once_and_counted(resumed):
    """ddg_update releases: rounds 1 (before the failure), 2 and 3 (resumed), once each per partner; the summary counts all three."""
    spec, out, _, _, res = resumed
    entries = [json.loads(x) for x in (out / "ledger.jsonl").read_text().splitlines()]
    for p in spec.partners:
        rounds = sorted(e["body"]["release"]["round"] for e in entries
                        if e.get("kind") == "release" and e["party"] == p.name and e["body"]["release"]["kind"] == "ddg_update")
        assert rounds == [1, 2, 3], (p.name, rounds)
    (g,) = [g for g in res.summary.privacy.guarantees if g.unit == "partner"]
    assert all(pg.rounds == ROUNDS for pg in g.partners.values()), {k: pg.rounds for k, pg in g.partners.items()}
