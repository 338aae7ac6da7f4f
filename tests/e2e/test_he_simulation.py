"""One short Flower simulation of Heart with aggregation = "he" (2 rounds): server-blind end to end.

The run fails after round 1 (its encrypted checkpoint written) and is resumed (``run --resume``):
the partners reload the run's key from their folders, the coordinator sends them the checkpointed
aggregate, and every test below reads the resumed run's results.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

import numpy as np
import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def he_parts(tmp_path_factory):
    """``(spec, resumed Result, failed summary.json, ledger lines before the resume)``."""
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT, fail_after_round_one_then_resume

    base = load_spec(ROOT / "specs" / "heart-disease-he.toml")
    spec = base.model_copy(update={"training": base.training.model_copy(update={"rounds": 2})}).with_base_dir(base.base_dir)
    failed, before, result = fail_after_round_one_then_resume(spec, tmp_path_factory.mktemp("he"))
    return spec, result, failed, before


@pytest.fixture(scope="module")
def he_run(he_parts):
    return he_parts[:2]


def _entries(result):
    return [json.loads(x) for x in (result.out_dir / "ledger.jsonl").read_text().splitlines()]


def test_he_model_equals_plain_fedavg(he_run):
    """The model the writer decrypted equals plain FedAvg of the same local training (in-process), within 1e-4."""
    from fedcollab.data import exact_statistics, load_partner_data
    from fedcollab.models import build_model, model_arrays, set_model_arrays
    from fedcollab.node._training import train_model
    from fedcollab.protocols.statistics import combine_statistics

    spec, result = he_run
    assert result.summary.aggregation == "he" and [r.round for r in result.rounds] == [2] and not result.summary.failures
    assert result.summary.resumed_after_round == 1 and result.summary.rounds == 2
    names = [p.name for p in spec.partners]
    data = {n: load_partner_data(spec, n) for n in names}
    scaling = combine_statistics([exact_statistics(d.x_train) for d in data.values()])
    glob = OrderedDict(model_arrays(build_model(spec.model, 13, seed=spec.seed)))
    for rnd in (1, 2):
        acc = {k: 0.0 for k in glob}
        for n in names:
            m = build_model(spec.model, 13, seed=spec.seed)
            set_model_arrays(m, dict(glob))
            train_model(m, scaling.apply(data[n].x_train), data[n].y_train, training=spec.training, plan=None, shuffle_seed=spec.seed * 1000 + rnd)
            for k, v in model_arrays(m).items():
                acc[k] = acc[k] + data[n].n_train * v.astype(np.float64)
        total = sum(d.n_train for d in data.values())
        glob = OrderedDict((k, (v / total).astype(np.float32)) for k, v in acc.items())
    for k, v in glob.items():
        np.testing.assert_allclose(result.model[k], v, atol=1e-4)
    assert result.summary.metrics.pooled_test.n > 0


def test_coordinator_saw_no_plaintext(he_run):
    """Checkpoints are encrypted aggregates, the statistics never reached the coordinator, and its custody entry says so."""
    _, result = he_run
    ckpt = result.out_dir / "checkpoints"
    assert (ckpt / "checkpoint.he.json").exists() and not (ckpt / "checkpoint.npz").exists()
    doc = json.loads((ckpt / "checkpoint.he.json").read_text())
    assert doc["round"] == 2 and len(doc["included"]) == 4 and len(doc["ct"]) == 1
    assert result.summary.scaling == "federated_statistics" and result.summary.scaling_parameters == {"mean": [], "std": []}
    coord = [e for e in _entries(result) if e["party"] == "coordinator" and e["kind"] == "key_custody"]
    assert coord[0]["body"]["can_decrypt"] is False and "no secret key" in coord[0]["body"]["holds"]


def test_key_custody_in_the_verified_ledger(he_run):
    """Every partner signed a key_custody entry with one fingerprint; the run ledger verifies; the writer's model is the one recorded."""
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    spec, result = he_run
    rep = verify_ledger(result.out_dir / "ledger.jsonl", load_roster(result.out_dir / "roster.json"))
    assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings][:3]
    custody = [e for e in _entries(result) if e["kind"] == "key_custody"]
    by_party = {e["party"]: e["body"] for e in custody if e["party"] != "coordinator"}
    assert set(by_party) == {p.name for p in spec.partners}
    assert len({b["fingerprint"] for b in by_party.values()}) == 1 and by_party["cleveland"]["generated_by"] == "cleveland"
    final = [e for e in custody if e["party"] == "coordinator" and e["body"].get("model_sha256")]
    model_file = result.out_dir / "nodes" / "cleveland" / "he" / f"{result.summary.run_id}-model.npz"
    assert final[0]["body"]["model_sha256"] == hashlib.sha256(model_file.read_bytes()).hexdigest()


def test_resumed_run_reloads_the_key_and_charges_round_two_once_more(he_parts):
    """The resume kept the failed part's ledger lines, reloaded one key at every partner (signed), generated none, and re-ran only round 2.

    Round 1's training release is in the ledger once (from the failed part), round 2's once (the
    resumed part: the failed part stopped after round 1), the statistics twice (setup runs again).
    """
    from fedcollab.audit import verify_ledger
    from fedcollab.core import ExitCode
    from fedcollab.spec import load_roster

    spec, result, failed, before = he_parts
    assert failed["status"] == "failed" and failed["run_id"] == result.summary.run_id
    lines = (result.out_dir / "ledger.jsonl").read_bytes().splitlines()
    assert lines[:len(before)] == before
    rep = verify_ledger(result.out_dir / "ledger.jsonl", load_roster(result.out_dir / "roster.json"))
    assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings][:3]
    entries = _entries(result)
    custody = [e for e in entries if e["kind"] == "key_custody"]
    reloads = {e["party"]: e["body"] for e in custody if "reloaded" in e["body"].get("event", "")}
    assert set(reloads) == {p.name for p in spec.partners}
    fp = {e["body"]["fingerprint"] for e in custody if e["body"].get("fingerprint")}
    assert len(fp) == 1  # one key, generated once, before the failure
    assert [e["party"] for e in custody if e["body"].get("event", "").startswith("generated")] == ["cleveland"]
    assert any(e["party"] == "coordinator" and e["body"]["event"].startswith("resumed after round 1") for e in custody)
    for p in spec.partners:
        rel = [e["body"]["release"] for e in entries if e["kind"] == "release" and e["party"] == p.name]
        assert sorted(r["round"] for r in rel if r["kind"] == "model_update") == [1, 2], p.name
        assert [r["round"] for r in rel if r["kind"] == "statistics"] == [0, 0], p.name
    assert [r.round for r in result.rounds] == [2]  # the resumed part
