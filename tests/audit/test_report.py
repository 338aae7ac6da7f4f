"""``audit report`` on a small ledger built in process (no Flower): verdict, plot, tables, key custody, tampering."""

from __future__ import annotations

import base64
import re

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.audit import write_report
from fedcollab.core import BudgetExhausted
from fedcollab.privacy.accounting import (
    BudgetGate,
    NonPrivate,
    PartyLedger,
    PoissonSubsampledGaussian,
    Release,
    key_fingerprint,
    public_key_hex,
)
from fedcollab.spec import BudgetSpec, NodePolicy, Roster

PARTY, RUN = "alpha-hospital", "run-0001"
PNG_MAGIC_B64 = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


def _release(round: int, mechanism, **kw) -> Release:
    base = {"kind": "dpsgd_training", "about": "train", "unit": "record", "observer": "coordinator"}
    return Release(**{**base, **kw}, added_by=PARTY, party=PARTY, round=round, mechanism=mechanism)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    """A node ledger: row counts, two DP-SGD rounds with test metrics, one refusal (budget), then one more entry."""
    home = tmp_path_factory.mktemp("node")
    key = Ed25519PrivateKey.generate()
    ledger = PartyLedger(home / "ledger.jsonl", party=PARTY, key=key)
    policy = NodePolicy(partner=PARTY, budgets=[BudgetSpec(dataset=PARTY, epsilon=2.0, delta=1e-5)], test_metrics="public")
    gate = BudgetGate(ledger, policy, dataset=PARTY, nonce_path=home / "nonces.jsonl")
    gate.record(_release(0, NonPrivate(), kind="row_counts", about="train+test", declared_public=True, details={"n_train": 100, "n_test": 50}),
                run_id=RUN, payload=b"counts")
    for rnd in (1, 2):
        gate.record(_release(rnd, PoissonSubsampledGaussian(noise_multiplier=8.0, sample_rate=1.0, steps=5), details={"clip_norm": 1.0}),
                    run_id=RUN, payload=b"update %d" % rnd)
        gate.record(_release(rnd, NonPrivate(), kind="test_metrics", about="test", details={"what": "count, correct"}),
                    run_id=RUN, payload=b"metrics %d" % rnd)
    with pytest.raises(BudgetExhausted):
        gate.record(_release(3, PoissonSubsampledGaussian(noise_multiplier=4.0, sample_rate=1.0, steps=10)), run_id=RUN, payload=b"too much")
    roster = Roster.model_validate({"parties": {PARTY: {"signing_key": public_key_hex(key)}}})
    return ledger, roster


@pytest.fixture(scope="module")
def report(node, tmp_path_factory):
    ledger, roster = node
    out = tmp_path_factory.mktemp("report")
    paths = write_report(ledger.path, roster, out)
    return out, paths


def test_files_written(report):
    out, paths = report
    assert {p.name for p in paths} == {"report.html", "report.md", "epsilon.png"}
    for p in paths:
        assert p.exists() and p.parent == out and p.stat().st_size > 0
    assert (out / "epsilon.png").read_bytes().startswith(b"\x89PNG")


def test_html_content(report, node):
    out, _ = report
    _, roster = node
    html = (out / "report.html").read_text()
    assert PARTY in html
    assert 'class="verdict ok"' in html and "verified: every chain" in html
    assert re.search(r'<img [^>]*src="data:image/png;base64,' + re.escape(PNG_MAGIC_B64[:8]), html)
    assert "budget would be exceeded" in html and "BUDGET_EXHAUSTED" in html  # the refusal
    assert key_fingerprint(roster.parties[PARTY].signing_key) in html
    assert "poisson_subsampled_gaussian" in html and "test_metrics" in html and "row_counts" in html
    assert "the coordinator sees each partner&#x27;s (noised) update" in html


def test_markdown_mirrors_html(report, node):
    out, _ = report
    _, roster = node
    md = (out / "report.md").read_text()
    assert "![" in md and "(epsilon.png)" in md and "base64" not in md
    assert "verified: every chain" in md and "budget would be exceeded" in md
    assert key_fingerprint(roster.parties[PARTY].signing_key) in md
    # Mechanisms: sigma 8, q 1 (full batches keep the accountant fast), 5 + 5 steps in 2 entries over rounds 1-2.
    row = next(line for line in md.splitlines() if "poisson" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5:11] == ["8", "1", "—", "10", "2", "1–2"]
    # Spend: claimed and recomputed totals agree, budget 2.
    spend = next(line for line in md.splitlines() if line.startswith(f"| {PARTY} |") and "| rdp |" in line and "poisson" not in line)
    cells = [c.strip() for c in spend.strip("|").split("|")]
    assert cells[4] == "2" and cells[5] == cells[6] and cells[7] == "yes" and cells[10] == "2"


def test_tampered_signature(node, tmp_path):
    """One flipped hex digit in a signature: the report says so, with the line and the exit code."""
    ledger, roster = node
    lines = ledger.path.read_bytes().split(b"\n")
    i = lines[1].index(b'"signature":"') + len(b'"signature":"') + 5
    lines[1] = lines[1][:i] + (b"0" if lines[1][i:i + 1] != b"0" else b"1") + lines[1][i + 1:]
    bad = tmp_path / "ledger.jsonl"
    bad.write_bytes(b"\n".join(lines))
    write_report(bad, roster, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert 'class="verdict bad"' in html and "NOT verified" in html and "LEDGER_TAMPERED" in html
    assert re.search(r"<td>2</td><td>ledger_tampered</td><td>20</td><td>missing or invalid signature", html)
    assert 'class="verdict ok"' not in html
    assert "what the ledger says" in html  # the tables are still there, marked as unverified


def test_unknown_kinds_listed_and_escaped(node, tmp_path):
    """Key custody records and unknown kinds are listed as they are; ledger text is escaped."""
    ledger, roster = node
    copy = PartyLedger(tmp_path / "ledger.jsonl", party=PARTY, key=ledger.key)
    copy.path.write_bytes(ledger.path.read_bytes())
    copy.append(kind="key_custody", run_id=RUN, round=0, body={"key": "he-secret", "held_by": [PARTY], "note": "<b>bold</b>"})  # type: ignore[arg-type]
    copy.append(kind="mystery", run_id=RUN, round=4, body={"what": "<script>alert(1)</script>"})  # type: ignore[arg-type]
    write_report(copy.path, roster, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    md = (tmp_path / "out" / "report.md").read_text()
    assert "unknown entry kind" in html  # verify rejects kinds it does not know; the report still lists them
    assert "he-secret" in html and "Other entries" in html and "mystery" in html
    assert "<script>" not in html and "&lt;script&gt;" in html and "<b>bold" not in html
    assert "<script>" not in md and "\\<script\\>" in md


def test_missing_ledger(node, tmp_path):
    _, roster = node
    paths = write_report(tmp_path / "nope.jsonl", roster, tmp_path / "out")
    html = (tmp_path / "out" / "report.html").read_text()
    assert [p.name for p in paths] == ["report.html", "report.md"]
    assert "LEDGER_UNREADABLE" in html
