"""Issue 13, attacks 8-10 replayed on real signed ledgers (in-process, no simulation).

8. a run ledger whose close leaves out a partner; 9. a node ledger rolled back to its first
entries; 10. signed but malformed bodies fed to ``audit verify``.
"""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from fedcollab.audit import verify_ledger, verify_with_run
from fedcollab.cli import app
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.core import BudgetExhausted, ExitCode, ProtocolError
from fedcollab.node._home import countersign_close, init_node_home
from fedcollab.privacy.accounting import GaussianMechanism as Gaussian, LedgerRolledBack, PartyLedger, Release, public_key_hex
from fedcollab.spec import BudgetSpec, NodePolicy, Roster, RosterEntry

RUN = "run-1"


def _roster(keys: dict[str, Ed25519PrivateKey]) -> Roster:
    return Roster(parties={n: RosterEntry(signing_key=public_key_hex(k), role="coordinator" if n == "coordinator" else "partner")
                           for n, k in keys.items()})


def _release(party: str, rnd: int) -> Release:
    return Release(party=party, added_by=party, kind="statistics", about="train", unit="record", observer="coordinator", round=rnd,
                   mechanism=Gaussian(noise_multiplier=5.0))


def _write_roster(tmp_path, roster: Roster):
    p = tmp_path / "roster.json"
    p.write_text(roster.model_dump_json())
    return p


@pytest.fixture
def keys():
    return {n: Ed25519PrivateKey.generate() for n in ("a", "b", "coordinator")}


def _run(tmp_path, keys, *, close_partners=None, forge_close=None):
    """Two partners each send a key_custody entry; the coordinator closes; every listed partner countersigns."""
    roster = _roster(keys)
    run = RunLedger(tmp_path / "run.jsonl", key=keys["coordinator"], roster=roster, run_id=RUN)
    nodes = {p: PartyLedger(tmp_path / f"{p}.jsonl", party=p, key=keys[p]) for p in ("a", "b")}
    for p, led in nodes.items():
        line = led.append(kind="key_custody", run_id=RUN, round=0, body={"key": "x", "party": p})
        run.accept([line.decode()], party=p, round=0)
    if forge_close is not None:
        close = run.own.append(kind="close", run_id=RUN, round=1, body=forge_close(run))
    else:
        close = run.close(1, partners=close_partners)
    for p, led in nodes.items():
        try:
            line = countersign_close(led, party=p, run_id=RUN, close_line=close, coordinator_key=public_key_hex(keys["coordinator"]),
                                     partners=["a", "b"])
        except ProtocolError:
            continue
        run.accept([line], party=p, round=1)
    return run, roster, nodes


class TestCloseListsEveryPartner:
    """Attack 8: a close that leaves out a partner who released in the run."""

    def test_honest_close_verifies(self, tmp_path, keys):
        """The close lists both partners, both countersign: verified."""
        run, roster, _ = _run(tmp_path, keys)
        rep = verify_ledger(run.path, roster)
        assert rep.exit_code == ExitCode.OK, [f.to_dict() for f in rep.findings]
        close = [json.loads(x) for x in run.path.read_text().splitlines() if json.loads(x)["kind"] == "close"][0]
        assert close["body"]["partners"] == ["a", "b"]

    def test_close_omitting_a_partner_is_tampering(self, tmp_path, keys):
        """The coordinator signs a close naming only `a`: `b` refuses to countersign and verify reports `b` missing (exit 20)."""
        run, roster, nodes = _run(tmp_path, keys, forge_close=lambda r: {"heads": {"a": r.heads["a"]}, "partners": ["a"]})
        text = run.path.read_text()
        assert '"party":"b","prev"' in text and text.count('"kind":"countersign"') == 0  # a and b both refuse (partners != spec)
        rep = verify_ledger(run.path, roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED
        msgs = " ".join(f.message for f in rep.findings)
        assert "close omits partner b" in msgs or "close omits b" in msgs

    def test_node_refuses_a_close_without_its_partners(self, tmp_path, keys):
        """countersign_close checks the close's partners against the node's own spec."""
        roster = _roster(keys)
        run = RunLedger(tmp_path / "run.jsonl", key=keys["coordinator"], roster=roster, run_id=RUN)
        led = PartyLedger(tmp_path / "a.jsonl", party="a", key=keys["a"])
        run.accept([led.append(kind="key_custody", run_id=RUN, round=0, body={}).decode()], party="a", round=0)
        close = run.close(1, partners=["a"])
        with pytest.raises(ProtocolError, match="partners"):
            countersign_close(led, party="a", run_id=RUN, close_line=close, coordinator_key=public_key_hex(keys["coordinator"]),
                              partners=["a", "b"])

    def test_listed_partner_without_countersignature(self, tmp_path, keys):
        """A close that lists every roster partner but one never countersigned fails."""
        roster = _roster(keys)
        run = RunLedger(tmp_path / "run.jsonl", key=keys["coordinator"], roster=roster, run_id=RUN)
        led = PartyLedger(tmp_path / "a.jsonl", party="a", key=keys["a"])
        run.accept([led.append(kind="key_custody", run_id=RUN, round=0, body={}).decode()], party="a", round=0)
        close = run.close(1)
        run.accept([countersign_close(led, party="a", run_id=RUN, close_line=close, coordinator_key=public_key_hex(keys["coordinator"]))],
                   party="a", round=1)
        rep = verify_ledger(run.path, roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED
        assert any("countersignature of the close by b" in f.message for f in rep.findings)


class TestRollback:
    """Attack 9: truncating the node's ledger to its first entries."""

    def _home(self, tmp_path, epsilon=3.0):
        policy = NodePolicy(partner="a", budgets=[BudgetSpec(dataset="a", epsilon=epsilon, delta=1e-5)])
        return init_node_home(tmp_path / "a", partner="a", policy=policy)

    def _spend(self, gate, n, *, start=1):
        done = 0
        for r in range(start, start + n):
            try:
                gate.record(_release("a", r), run_id=RUN, payload=b"x")
                done += 1
            except BudgetExhausted:
                break
        return done

    def test_truncated_ledger_is_refused_at_startup_and_in_flight(self, tmp_path):
        home = self._home(tmp_path)
        gate = home.gate("a", "a")
        spent = self._spend(gate, 50)
        assert 0 < spent < 50  # the budget stopped it
        data = home.ledger_path.read_bytes()
        first = b"".join(data.splitlines(keepends=True)[:2])
        home.ledger_path.write_bytes(first)
        # In flight: the next release is refused, nothing is appended.
        with pytest.raises(LedgerRolledBack):
            gate.record(_release("a", 99), run_id=RUN, payload=b"x")
        assert home.ledger_path.read_bytes() == first
        # At start-up: the gate cannot be built over the rolled-back file.
        with pytest.raises(LedgerRolledBack) as exc:
            home.gate("a", "a")
        assert isinstance(exc.value, BudgetExhausted) and exc.value.exit_code == 20
        # Deleting the anchor too is no way out.
        home.anchor_path.unlink()
        with pytest.raises(LedgerRolledBack, match="anchor is missing"):
            home.gate("a", "a")

    def test_restoring_a_copy_of_the_whole_folder_is_refused_with_the_anchor_outside(self, tmp_path, monkeypatch):
        """The anchor in the folder rolls back with the folder (a snapshot restore); one kept in FEDCOLLAB_ANCHOR_DIR does not."""
        import shutil

        from fedcollab.node._home import ANCHOR_DIR_ENV

        home = self._home(tmp_path, epsilon=100.0)
        self._spend(home.gate("a", "a"), 2)
        snapshot = tmp_path / "snapshot"
        shutil.copytree(home.root, snapshot)
        self._spend(home.gate("a", "a"), 3, start=3)
        # Without an outside anchor the restored folder is self-consistent: the rollback goes unseen.
        shutil.rmtree(home.root)
        shutil.copytree(snapshot, home.root)
        assert self._spend(home.gate("a", "a"), 1, start=3) == 1
        # Move the anchor out; then restoring the folder copy taken before is refused.
        outside = tmp_path / "anchors"
        target = home.move_anchor(outside)
        assert target.parent == outside and not (home.root / "ledger.anchor.json").exists()
        monkeypatch.setenv(ANCHOR_DIR_ENV, str(outside))
        assert home.anchor_path == target
        self._spend(home.gate("a", "a"), 2, start=4)
        shutil.rmtree(home.root)
        shutil.copytree(snapshot, home.root)
        before = home.ledger_path.read_bytes()
        with pytest.raises(LedgerRolledBack, match="rolled back"):
            home.gate("a", "a")
        assert home.ledger_path.read_bytes() == before  # nothing appended
        # A node started without the setting, on a folder whose anchor was moved out, refuses too.
        monkeypatch.delenv(ANCHOR_DIR_ENV)
        (home.root / "ledger.anchor.json").unlink()
        with pytest.raises(LedgerRolledBack, match="anchor is missing"):
            home.gate("a", "a")

    def test_moving_the_anchor_checks_the_ledger_first(self, tmp_path):
        """`node anchor` refuses a ledger already behind its anchor, and a target inside the node folder."""
        from typer.testing import CliRunner

        from fedcollab.cli import app

        home = self._home(tmp_path, epsilon=100.0)
        self._spend(home.gate("a", "a"), 3)
        r = CliRunner().invoke(app, ["node", "anchor", str(home.root), "--to", str(home.root / "sub"), "--format", "json"])
        assert r.exit_code == int(ExitCode.CONFIG_INVALID) and "outside the node folder" in " ".join(r.output.split())
        home.ledger_path.write_bytes(b"".join(home.ledger_path.read_bytes().splitlines(keepends=True)[:1]))
        r = CliRunner().invoke(app, ["node", "anchor", str(home.root), "--to", str(tmp_path / "anchors")])
        assert r.exit_code == 20 and "rolled back" in " ".join(r.output.split())
        assert (home.root / "ledger.anchor.json").exists() and not (tmp_path / "anchors").exists()

    def test_untouched_ledger_keeps_working(self, tmp_path):
        home = self._home(tmp_path, epsilon=100.0)
        assert self._spend(home.gate("a", "a"), 3) == 3
        assert self._spend(home.gate("a", "a"), 2, start=4) == 2  # a restart with an intact ledger is accepted
        anchor = json.loads(home.anchor_path.read_text())["heads"]["a"]
        assert anchor["seq"] == 4 and anchor["hash"] == home.gate("a", "a").ledger.lines()[-1].hash

    def test_run_ledger_detects_a_shorter_node_ledger(self, tmp_path, keys):
        """A node ledger cut behind entries it sent (and countersigned) in a run: verify --run-ledger exits 20."""
        run, roster, nodes = _run(tmp_path, keys)
        node = nodes["a"]
        assert verify_with_run(node.path, run.path, roster).exit_code == ExitCode.OK
        raw = node.path.read_bytes().splitlines(keepends=True)
        node.path.write_bytes(raw[0])
        assert verify_ledger(node.path, roster).exit_code == ExitCode.OK  # alone, the cut file still verifies
        rep = verify_with_run(node.path, run.path, roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED
        assert any("rolled back" in f.message for f in rep.findings)
        r = CliRunner().invoke(app, ["audit", "verify", str(node.path), "--roster", str(_write_roster(tmp_path, roster)),
                                     "--run-ledger", str(run.path)])
        assert r.exit_code == int(ExitCode.LEDGER_TAMPERED), r.output


def _signed_ledger(tmp_path, key, entries: list[tuple[str, object]]):
    led = PartyLedger(tmp_path / "n.jsonl", party="a", key=key)
    for kind, body in entries:
        led.append(kind=kind, run_id=RUN, round=0, body=body)  # type: ignore[arg-type]
    return led.path


GOOD_BODY = {"dataset": "a", "release": _release("a", 1).model_dump(mode="json"), "non_private": False, "counted": True,
             "claim": None, "budget": None, "commitment": "0" * 64}


class TestMalformedBodies:
    """Attack 10: signed bodies that do not follow the schema give exit 20 and the field, never a traceback."""

    @pytest.mark.parametrize(("kind", "body", "field"), [
        ("release", {k: v for k, v in GOOD_BODY.items() if k != "release"}, "body"),
        ("release", {**GOOD_BODY, "claim": {"epsilon_run": "1", "epsilon_total": 1.0, "delta": 1e-5, "accountant": "rdp",
                                            "accountant_version": "x"}}, "body.claim"),
        ("release", {**GOOD_BODY, "release": {"release": GOOD_BODY["release"]}}, "body.release"),
        ("release", {**GOOD_BODY, "budget": {"epsilon": "lots", "delta": 1e-5}}, "body.budget"),
        ("release", {**GOOD_BODY, "release": {**GOOD_BODY["release"], "mechanism": {"mechanism": "gaussian", "noise_multiplier": -1}}},
         "body.release"),
        ("scoring", {"querier": "q"}, "body"),
        ("countersign", {"close": 5}, "body.close"),
    ])
    def test_cli_exit_20_names_line_and_field(self, tmp_path, kind, body, field):
        key = Ed25519PrivateKey.generate()
        path = _signed_ledger(tmp_path, key, [("key_custody", {}), (kind, body)])
        roster = Roster(parties={"a": RosterEntry(signing_key=public_key_hex(key))})
        r = CliRunner().invoke(app, ["audit", "verify", str(path), "--roster", str(_write_roster(tmp_path, roster)), "--format", "json"])
        assert r.exit_code == int(ExitCode.LEDGER_TAMPERED), r.output
        assert "Traceback" not in r.output
        (f,) = json.loads(r.stdout)["findings"]
        assert f["line"] == 2 and f"field `{field}" in f["message"] and f["kind"] == "ledger_tampered"

    def test_close_with_heads_list_in_a_run_ledger(self, tmp_path, keys):
        roster = _roster(keys)
        run = RunLedger(tmp_path / "run.jsonl", key=keys["coordinator"], roster=roster, run_id=RUN)
        run.own.append(kind="close", run_id=RUN, round=0, body={"heads": ["a"], "partners": "a"})
        rep = verify_ledger(run.path, roster)
        assert rep.exit_code == ExitCode.LEDGER_TAMPERED and rep.findings[0].line == 1 and "body" in rep.findings[0].message

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(kind=st.sampled_from(["release", "refusal", "receipt", "close", "countersign", "scoring", "aggregate", "key_custody"]),
           body=st.recursive(st.none() | st.booleans() | st.integers(-3, 2**40) | st.floats(allow_nan=False, allow_infinity=False)
                             | st.text(max_size=8),
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                                 st.sampled_from(["dataset", "release", "claim", "budget", "heads", "close", "entries", "rows",
                                                  "partners", "mechanism", "x"]), inner, max_size=4), max_leaves=12))
    def test_random_bodies_never_crash(self, tmp_path, keys, kind, body):
        """Any signed JSON body, in a node or a run ledger, is verified or reported with a code; never an exception."""
        if not isinstance(body, dict):
            body = {"x": body}
        roster = _roster(keys)
        for party in ("a", "coordinator"):
            led = PartyLedger(tmp_path / f"h-{party}.jsonl", party=party, key=keys[party])
            led.path.unlink(missing_ok=True)
            led.append(kind=kind, run_id=RUN, round=0, body=body)  # type: ignore[arg-type]
            rep = verify_ledger(led.path, roster)
            assert rep.exit_code in {ExitCode.OK, ExitCode.LEDGER_TAMPERED, ExitCode.CLAIM_MISMATCH, ExitCode.LEDGER_BUDGET_EXCEEDED}
