"""``audit verify`` on the session's DP run: the untouched ledger verifies, every mutation is caught and located."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcollab.audit import verify_ledger
from fedcollab.core import ExitCode
from fedcollab.spec import load_roster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_files(dp_run):
    return dp_run.out_dir / "ledger.jsonl", load_roster(dp_run.out_dir / "roster.json")


def _verify_bytes(tmp_path, data: bytes, roster):
    p = tmp_path / "mutated.jsonl"
    p.write_bytes(data)
    return verify_ledger(p, roster)


class TestUntouched:
    def test_run_ledger_verifies(self, run_files, dp_run):
        """The run ledger verifies, and its recomputed spends equal the summary's epsilons."""
        path, roster = run_files
        rep = verify_ledger(path, roster)
        assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings]
        assert rep.run_ledger
        (g,) = dp_run.summary.privacy.guarantees
        spends = {s.party: s for s in rep.spends}
        for name, p in g.partners.items():
            assert spends[name].epsilon == pytest.approx(p.epsilon, rel=1e-9)
            assert spends[name].releases == 3 and spends[name].complete_history

    def test_node_ledgers_verify(self, dp_run, run_files):
        _, roster = run_files
        for node in (dp_run.out_dir / "nodes").iterdir():
            rep = verify_ledger(node / "ledger.jsonl", roster)
            assert rep.exit_code == ExitCode.OK and not rep.run_ledger

    def test_wrong_roster_key(self, run_files, tmp_path):
        """A roster with another key for one party: every entry of that party fails."""
        path, roster = run_files
        other = roster.model_copy(update={"parties": {**roster.parties, "hungary": roster.parties["cleveland"]}})
        rep = verify_ledger(path, other)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED
        assert any("hungary" in f.message and "signature" in f.message for f in rep.findings)

    def test_unreadable(self, tmp_path, run_files):
        _, roster = run_files
        assert verify_ledger(tmp_path / "missing.jsonl", roster).exit_code == ExitCode.LEDGER_UNREADABLE


class TestMutations:
    @settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_single_byte(self, run_files, tmp_path, data):
        """Changing any one byte is detected at the line that holds it."""
        path, roster = run_files
        raw = bytearray(path.read_bytes())
        i = data.draw(st.integers(0, len(raw) - 2))
        if raw[i] == ord("\n"):
            i -= 1
        new = data.draw(st.integers(0, 255).filter(lambda b: b != raw[i] and b != ord("\n")))
        raw[i] = new
        line = raw[:i].count(b"\n") + 1
        rep = _verify_bytes(tmp_path, bytes(raw), roster)
        assert rep.exit_code != ExitCode.OK
        assert min(f.line for f in rep.findings if f.line is not None) == line

    @settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_line_edits(self, run_files, tmp_path, data):
        """Deleting, duplicating or swapping lines is detected at (or right after) the edit."""
        path, roster = run_files
        lines = path.read_bytes().splitlines(keepends=True)
        op = data.draw(st.sampled_from(["delete", "duplicate", "swap"]))
        i = data.draw(st.integers(0, len(lines) - 2))
        if op == "delete":
            del lines[i]
            # Caught at the successor, or (a receipt deleted) at the next receipt just after it.
            where = {i + 1, i + 2}
        elif op == "duplicate":
            lines.insert(i + 1, lines[i])
            where = {i + 2}
        else:
            j = data.draw(st.integers(i + 1, len(lines) - 1))
            if lines[i] == lines[j]:
                return
            lines[i], lines[j] = lines[j], lines[i]
            # Caught between the two swapped lines: an entry moved early is only wrong once the
            # receipt that should follow it is missing.
            where = set(range(i + 1, j + 2))
        rep = _verify_bytes(tmp_path, b"".join(lines), roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED, op
        first = min(f.line for f in rep.findings if f.line is not None)
        assert first in where, (op, i, first, [f.to_dict() for f in rep.findings][:3])

    def test_last_line_removed(self, run_files, tmp_path):
        """Removing the last entry (the receipt of the last countersignature) is detected, pointing past the end."""
        path, roster = run_files
        lines = path.read_bytes().splitlines(keepends=True)
        rep = _verify_bytes(tmp_path, b"".join(lines[:-1]), roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED
        assert any(f.line == len(lines) and "cut short" in f.message for f in rep.findings)

    def test_tail_cut_before_close(self, run_files, tmp_path):
        path, roster = run_files
        lines = path.read_bytes().splitlines(keepends=True)
        close_at = next(i for i, ln in enumerate(lines) if json.loads(ln)["kind"] == "close")
        rep = _verify_bytes(tmp_path, b"".join(lines[:close_at]), roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED and any("no close entry" in f.message for f in rep.findings)


class TestClaims:
    def test_resigned_false_claim_is_a_mismatch(self, run_files, tmp_path, dp_run):
        """A party that signs a false epsilon (valid signature) is caught by recomputation."""
        from fedcollab.crypto import load_signing_key
        from fedcollab.privacy.accounting import sign_entry

        _, roster = run_files
        node = dp_run.out_dir / "nodes" / "switzerland"
        key = load_signing_key(node / "signing_key.pem")
        lines = (node / "ledger.jsonl").read_bytes().splitlines()
        # Rebuild the chain with the first DP-SGD claim halved, re-signed and re-linked.
        import hashlib

        out, prev = [], "0" * 64
        lied = False
        for raw in lines:
            e = json.loads(raw)
            e["prev"] = prev
            if not lied and e["kind"] == "release" and e["body"]["counted"]:
                e["body"]["claim"]["epsilon_run"] /= 2
                lied = True
            line = sign_entry(e, key)
            prev = hashlib.sha256(line).hexdigest()
            out.append(line)
        rep = _verify_bytes(tmp_path, b"\n".join(out) + b"\n", roster)
        assert rep.exit_code == ExitCode.CLAIM_MISMATCH

    def test_budget_exceeded_is_reported(self, run_files, tmp_path, dp_run):
        """Entries whose recorded budget is below the spend fail with the budget code."""
        import hashlib

        from fedcollab.crypto import load_signing_key
        from fedcollab.privacy.accounting import sign_entry

        _, roster = run_files
        node = dp_run.out_dir / "nodes" / "cleveland"
        key = load_signing_key(node / "signing_key.pem")
        out, prev = [], "0" * 64
        for raw in (node / "ledger.jsonl").read_bytes().splitlines():
            e = json.loads(raw)
            e["prev"] = prev
            if e["kind"] == "release" and e["body"]["budget"]:
                e["body"]["budget"]["epsilon"] = 0.1
            line = sign_entry(e, key)
            prev = hashlib.sha256(line).hexdigest()
            out.append(line)
        rep = _verify_bytes(tmp_path, b"\n".join(out) + b"\n", roster)
        assert rep.exit_code == ExitCode.LEDGER_BUDGET_EXCEEDED


def test_cli_verify_json(run_files):
    """`fedcollab audit verify --format json` exits 0 and lists fingerprints and spends."""
    from typer.testing import CliRunner

    from fedcollab.cli import app

    path, _ = run_files
    r = CliRunner().invoke(app, ["audit", "verify", str(path), "--roster", str(path.parent / "roster.json"), "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["verified"] and set(out["parties"]) == {"cleveland", "hungary", "switzerland", "va-long-beach", "coordinator"}


def test_cli_verify_tampered(run_files, tmp_path):
    path, _ = run_files
    bad = tmp_path / "l.jsonl"
    shutil.copy(path, bad)
    data = bad.read_bytes().splitlines(keepends=True)
    bad.write_bytes(b"".join(data[:2] + data[3:]))
    from typer.testing import CliRunner

    from fedcollab.cli import app

    r = CliRunner().invoke(app, ["audit", "verify", str(bad), "--roster", str(path.parent / "roster.json")])
    assert r.exit_code == int(ExitCode.LEDGER_TAMPERED)
    assert "line 3" in r.output


def test_ledger_lines_follow_published_schema(run_files, dp_run):
    """Every line of the run ledger and of a node ledger validates against schemas/ledger.schema.json."""
    import jsonschema

    from tests.conftest import ROOT

    schema = json.loads((ROOT / "schemas" / "ledger.schema.json").read_text())
    path, _ = run_files
    kinds = set()
    for f in (path, dp_run.out_dir / "nodes" / "hungary" / "ledger.jsonl"):
        for raw in f.read_bytes().splitlines():
            e = json.loads(raw)
            jsonschema.validate(e, schema)
            kinds.add(e["kind"])
    assert kinds == {"release", "receipt", "close", "countersign"}


def test_membership_check_on_the_run(dp_run):
    """The partner-side membership check reads the run and stays within the DP cap, in plain words."""
    from typer.testing import CliRunner

    from fedcollab.cli import app
    from tests.conftest import ROOT

    r = CliRunner().invoke(app, ["audit", "membership", str(dp_run.out_dir), "--partner", "hungary",
                                 "--spec", str(ROOT / "specs" / "heart-disease-dp.toml"), "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["members"] == 172 and out["non_members"] == 89
    assert out["bound"] == pytest.approx((2.718281828 ** out["epsilon"] - 1 + 2e-3) / (2.718281828 ** out["epsilon"] + 1), rel=1e-6)
    assert not out["exceeds_bound"] and "coin flip" in out["summary"]
