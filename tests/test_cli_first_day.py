"""A newcomer's first day (issue 17): errors that reach the person, honest failed runs, late failures caught early.

CLI through typer's runner where nothing runs; one subprocess simulation interrupted with SIGINT
and its in-process ``--resume`` are shared by the run-folder tests (module-scoped fixture).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedcollab.cli import app
from fedcollab.core import DataUnreadable, DataValidationError, NodeErrorCode

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
HEART = ROOT / "specs" / "heart-disease.toml"
CLEVELAND_SOURCE = 'source = { path = "embedded://heart_disease_uci.csv", where = { dataset = "Cleveland" } }'


def _cleveland_rows() -> pd.DataFrame:
    df = pd.read_csv(ROOT / "fedcollab" / "data" / "embedded" / "heart_disease_uci.csv", dtype=str, keep_default_na=False, na_values=[""])
    return df[df["dataset"] == "Cleveland"].reset_index(drop=True)


def _spec_with_local_cleveland(tmp_path: Path, df: pd.DataFrame | None, *, name: str = "cleveland.csv") -> Path:
    """The Heart spec with cleveland reading its own file (``df``, or none written: a missing file)."""
    if df is not None:
        df.to_csv(tmp_path / name, index=False)
    spec = tmp_path / "spec.toml"
    text = HEART.read_text()
    assert CLEVELAND_SOURCE in text
    spec.write_text(text.replace(CLEVELAND_SOURCE, f'source = {{ path = "{name}" }}'))
    return spec


class TestDataErrorsReachThePerson:
    def test_missing_file_is_data_unreadable_code_110(self, tmp_path):
        """A missing source raises DataUnreadable, which the node maps to 110, not 111."""
        from fedcollab.data import read_source
        from fedcollab.node._client import _code_for
        from fedcollab.spec import SourceSpec

        with pytest.raises(DataUnreadable) as exc:
            read_source(SourceSpec(path="nope.csv"), tmp_path)
        assert _code_for(exc.value) == NodeErrorCode.DATA_UNREADABLE
        assert _code_for(DataValidationError("schema")) == NodeErrorCode.DATA_SCHEMA_MISMATCH

    def test_run_names_partner_column_and_file_before_simulating(self, tmp_path):
        """A bad column ends `run` in seconds with exit 3 and the partner's own message, naming the file."""
        df = _cleveland_rows()
        df.loc[:2, "chol"] = "high"
        df.loc[3, "sex"] = "Unknown"
        spec = _spec_with_local_cleveland(tmp_path, df)
        t0 = time.perf_counter()
        r = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "out")])
        assert r.exit_code == 3, r.output
        assert time.perf_counter() - t0 < 15
        assert f"cleveland: column `chol`: 3 value(s) are not numbers (file {tmp_path / 'cleveland.csv'})" in " ".join(r.output.split())
        assert "cleveland: column `sex`: unknown categories 'Unknown'" in " ".join(r.output.split())
        assert "node-" not in r.output and "hungary" not in r.output
        assert not (tmp_path / "out" / "summary.json").exists()

    def test_run_missing_file_json_error_object(self, tmp_path):
        """`run --format json` prints one JSON error object naming the partner and the path."""
        spec = _spec_with_local_cleveland(tmp_path, None)
        r = runner.invoke(app, ["run", str(spec), "--out", str(tmp_path / "out"), "--format", "json"])
        assert r.exit_code == 3
        err = json.loads(r.stdout)
        assert err["exit_code"] == 3 and err["kind"] == "DataUnreadable"
        assert err["problems"] == [f"cleveland: data source not found: {tmp_path / 'cleveland.csv'}"]

    def test_data_check_ok_and_bad(self, tmp_path):
        """`data check` prints rows and columns; a bad file lists every problem and exits 3."""
        spec = _spec_with_local_cleveland(tmp_path, _cleveland_rows())
        ok = runner.invoke(app, ["data", "check", str(spec), "--partner", "cleveland", "--format", "json"])
        assert ok.exit_code == 0, ok.output
        rep = json.loads(ok.stdout)
        assert rep["ok"] and rep["rows"] == len(_cleveland_rows()) and "chol" in rep["columns"] and rep["n_train"] + rep["n_test"] <= 304
        df = _cleveland_rows().drop(columns=["chol"])
        df.loc[0, "age"] = "nan-ish"
        bad = tmp_path / "mine.csv"
        df.to_csv(bad, index=False)
        r = runner.invoke(app, ["data", "check", str(spec), "--partner", "cleveland", "--data", str(bad)])
        assert r.exit_code == 3
        text = " ".join(r.output.split())
        assert "missing columns: ['chol']" in text and "column `age`: 1 value(s) are not numbers" in text and f"rows {len(df)}" in text
        unknown = runner.invoke(app, ["data", "check", str(spec), "--partner", "nobody"])
        assert unknown.exit_code == 3 and "--partner" in unknown.output and "'nobody'" in unknown.output

    def test_spec_validate_checks_sources_exist(self, tmp_path):
        spec = _spec_with_local_cleveland(tmp_path, None)
        r = runner.invoke(app, ["spec", "validate", str(spec), "--format", "json"])
        assert r.exit_code == 2
        (line,) = json.loads(r.stdout)["problems"]
        assert line.startswith("`partners[0].source.path`: partner 'cleveland'") and str(tmp_path / "cleveland.csv") in line


class TestLateFailuresCaughtEarly:
    def _three(self, tmp_path: Path, extra: str = "") -> Path:
        text = HEART.read_text()
        start = text.index("[[partners]]\nname = \"va-long-beach\"")
        end = text.index("[schema]")
        spec = tmp_path / "three.toml"
        spec.write_text(text[:start] + extra + text[end:])
        return spec

    def test_secagg_threshold_names_max_dropouts(self, tmp_path):
        """3 partners with the default secagg.max_dropouts = 1: `spec validate` names the field, not <root>."""
        spec = self._three(tmp_path)
        spec.write_text(spec.read_text().replace('aggregation = "plain"', 'aggregation = "secagg"'))
        r = runner.invoke(app, ["spec", "validate", str(spec), "--format", "json"])
        assert r.exit_code == 2
        probs = json.loads(r.stdout)["problems"]
        assert any(p.startswith("`secagg.max_dropouts`: expected at most 0 with 3 partners") and "got 1" in p for p in probs), probs
        assert not any("<root>" in p for p in probs)

    def test_query_refuses_before_simulating(self, tmp_path):
        spec = self._three(tmp_path)
        t0 = time.perf_counter()
        r = runner.invoke(app, ["query", str(spec), "--query", str(ROOT / "examples" / "query-chol-by-sex.toml"), "--out", str(tmp_path / "q")])
        assert r.exit_code == 2 and time.perf_counter() - t0 < 15
        assert "secagg.max_dropouts" in r.output
        assert not (tmp_path / "q").exists()
        ok = runner.invoke(app, ["spec", "validate", str(spec)])
        assert ok.exit_code == 0 and "secagg.max_dropouts" in ok.output  # a note: the spec itself is valid

    def test_custom_model_importability(self, tmp_path):
        """A custom model that does not import fails validation naming model.target and where models are looked for."""
        good = runner.invoke(app, ["spec", "validate", str(ROOT / "examples" / "custom_model.toml")])
        assert good.exit_code == 0, good.output  # found in the spec's folder
        bad = tmp_path / "custom.toml"
        bad.write_text((ROOT / "examples" / "custom_model.toml").read_text().replace('"tiny_net:TinyNet"', '"no_such_net_module:Net"'))
        r = runner.invoke(app, ["spec", "validate", str(bad), "--format", "json"])
        assert r.exit_code == 2
        (msg,) = json.loads(r.stdout)["problems"]
        assert msg.startswith("`model.target`: expected an importable module") and "PYTHONPATH" in msg and str(tmp_path) in msg


def test_version():
    from fedcollab import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.stdout.strip() == f"fedcollab {__version__}"


def test_library_run_of_a_vertical_spec_says_where_it_runs(tmp_path):
    """`fedcollab.run` is the horizontal runner: a vertical spec is a ConfigError (exit 2) naming `layout` and the vertical
    runner, before any partner's data is read (its columns would otherwise be reported missing)."""
    import fedcollab
    from fedcollab.core import ConfigError

    with pytest.raises(ConfigError, match=r"^layout: .*got layout = 'vertical'; run it with fedcollab.runner.run_vertical") as e:
        fedcollab.run(ROOT / "specs" / "heart-disease-vertical.toml", out=tmp_path)
    assert e.value.exit_code == 2 and not any(tmp_path.iterdir())


def test_resume_of_a_folder_without_a_run(tmp_path):
    """Every mode resumes (tests/e2e/test_resume_modes.py, test_he_simulation.py, test_gbdt_simulation.py); a folder with no
    interrupted run in it is a spec error (exit 2) that says what `--resume` expected, before any node is started."""
    r = runner.invoke(app, ["run", str(ROOT / "specs" / "heart-disease-he.toml"), "--out", str(tmp_path), "--resume"])
    assert r.exit_code == 2 and "--resume" in r.output and "summary.json" in r.output
    assert not (tmp_path / "nodes").exists()


# --- an interrupted run, its abort, and its resumption ------------------------------------------------
def _verify(ledger: Path, roster: Path) -> dict:
    r = runner.invoke(app, ["audit", "verify", str(ledger), "--roster", str(roster), "--format", "json"])
    return {**json.loads(r.stdout), "rc": r.exit_code}


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """`fedcollab run` in a subprocess, SIGINT to its process group once round 1's checkpoint exists; then `run --resume`."""
    tmp = tmp_path_factory.mktemp("interrupt")
    spec = tmp / "spec.toml"
    spec.write_text(HEART.read_text().replace("rounds = 20", "rounds = 6"))
    out = tmp / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", "from fedcollab.cli import main; main()", "run", str(spec), "--out", str(out), "--format", "json"],
                            start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    t0 = time.monotonic()
    while not (out / "checkpoints" / "checkpoint.npz").exists() and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    t_sig = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        stdout, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail("the run hung after SIGINT")
    stopped = time.monotonic() - t_sig
    snap = tmp / "interrupted"
    snap.mkdir()
    for name in ("summary.json", "ledger.jsonl", "roster.json"):
        shutil.copy(out / name, snap / name)
    import fedcollab

    resumed = fedcollab.run(spec, out=out, resume=True)
    return {"rc": proc.returncode, "stopped": stopped, "stdout": stdout.decode(), "snap": snap, "out": out, "resumed": resumed, "spec": spec}


class TestHonestFailedRuns:
    def test_sigint_stops_within_seconds_with_an_abort(self, interrupted):
        """Ctrl-C: exit 130 within seconds, a JSON error, summary status interrupted, no model in the folder."""
        assert interrupted["rc"] == 130
        assert interrupted["stopped"] < 20, interrupted["stopped"]
        assert json.loads(interrupted["stdout"])["kind"] == "RunInterrupted"
        s = json.loads((interrupted["snap"] / "summary.json").read_text())
        assert s["status"] == "interrupted" and s["model"] is None and s["metrics"] is None
        assert s["error"]["exit_code"] == 130

    def test_abort_verifies_as_aborted_not_tampered(self, interrupted, tmp_path):
        snap = interrupted["snap"]
        rep = _verify(snap / "ledger.jsonl", snap / "roster.json")
        assert rep["rc"] == 25 and rep["status"] == "aborted" and rep["findings"] == []
        assert rep["abort"]["reason"] == "interrupted" and rep["abort"]["exit_code"] == 130
        # Without its abort the same ledger reads as cut short: tampered.
        lines = (snap / "ledger.jsonl").read_bytes().splitlines(keepends=True)
        assert json.loads(lines[-1])["kind"] == "abort"
        cut = tmp_path / "cut.jsonl"
        cut.write_bytes(b"".join(lines[:-1]))
        rep = _verify(cut, snap / "roster.json")
        assert rep["rc"] == 20 and any("no close entry" in f["message"] for f in rep["findings"])

    def test_resume_continues_from_the_checkpoint(self, interrupted):
        """`run --resume`: same run id, rounds after the checkpoint, a ledger (abort then close) that verifies."""
        res, out = interrupted["resumed"], interrupted["out"]
        old = json.loads((interrupted["snap"] / "summary.json").read_text())
        assert res.summary.status == "completed" and res.summary.run_id == old["run_id"]
        assert res.summary.resumed_after_round is not None and res.summary.resumed_after_round >= 1
        assert res.summary.rounds == 6 and (out / res.summary.model.path).exists()
        rep = _verify(out / "ledger.jsonl", out / "roster.json")
        assert rep["rc"] == 0 and rep["status"] == "completed", rep["findings"]
        again = runner.invoke(app, ["run", str(interrupted["spec"]), "--out", str(out), "--resume"])
        assert again.exit_code == 2 and "completed" in again.output

    def test_a_new_run_sets_the_previous_outputs_aside(self, interrupted):
        """Before a new run, the earlier run's summary, metrics, model, ledger and checkpoint move to previous/RUN_ID/."""
        from fedcollab.runner._run import _set_aside_previous

        out = interrupted["out"]
        run_id = interrupted["resumed"].summary.run_id
        dest = _set_aside_previous(out)
        assert dest == out / "previous" / run_id
        for name in ("summary.json", "metrics.jsonl", "ledger.jsonl", "checkpoints"):
            assert not (out / name).exists() and (dest / name).exists()
        assert _verify(dest / "ledger.jsonl", out / "roster.json")["rc"] == 0


class TestAbortEntry:
    """The verifier on a small real run ledger (Ed25519 keys, no simulation)."""

    def _ledger(self, tmp_path: Path):
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fedcollab.coordinator import COORDINATOR, RunLedger
        from fedcollab.privacy.accounting import PartyLedger, public_key_hex
        from fedcollab.spec import Roster, RosterEntry

        ckey, nkey = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
        roster = Roster(parties={COORDINATOR: RosterEntry(signing_key=public_key_hex(ckey), role="coordinator"),
                                 "cleveland": RosterEntry(signing_key=public_key_hex(nkey))})
        (tmp_path / "roster.json").write_text(roster.model_dump_json())
        ledger = RunLedger(tmp_path / "ledger.jsonl", key=ckey, roster=roster, run_id="r1")
        node = PartyLedger(tmp_path / "node.jsonl", party="cleveland", key=nkey)
        line = node.append(kind="refusal", run_id="r1", round=1, body={"dataset": "cleveland", "code": 131, "reason": "budget"})
        ledger.accept([line.decode()], party="cleveland", round=1)
        return ledger

    def test_abort_is_reported_as_aborted(self, tmp_path):
        ledger = self._ledger(tmp_path)
        ledger.abort(1, reason="NodeError", exit_code=9, codes={"cleveland": [131]})
        rep = _verify(tmp_path / "ledger.jsonl", tmp_path / "roster.json")
        assert rep["rc"] == 25 and rep["status"] == "aborted" and rep["verified"] is True
        assert rep["abort"]["codes"] == {"cleveland": [131]} and rep["abort"]["reason"] == "NodeError"
        r = runner.invoke(app, ["audit", "verify", str(tmp_path / "ledger.jsonl"), "--roster", str(tmp_path / "roster.json")])
        assert r.exit_code == 25 and "aborted" in r.output and "ledger_tampered" not in r.output

    def test_report_says_aborted(self, tmp_path):
        ledger = self._ledger(tmp_path)
        ledger.abort(1, reason="NodeError", exit_code=9, codes={"cleveland": [131]})
        r = runner.invoke(app, ["audit", "report", str(tmp_path / "ledger.jsonl"), "--roster", str(tmp_path / "roster.json"), "--out", str(tmp_path / "rep")])
        assert r.exit_code == 0, r.output
        assert "verified, run aborted" in (tmp_path / "rep" / "report.md").read_text()

    def test_abort_with_wrong_heads_is_tampered(self, tmp_path):
        ledger = self._ledger(tmp_path)
        ledger.heads["cleveland"] = "0" * 64  # as if an entry were removed before the abort
        ledger.abort(1, reason="NodeError", exit_code=9, codes={})
        rep = _verify(tmp_path / "ledger.jsonl", tmp_path / "roster.json")
        assert rep["rc"] == 20 and any("abort lists a head for cleveland" in f["message"] for f in rep["findings"])

    def test_no_close_and_no_abort_is_tampered(self, tmp_path):
        self._ledger(tmp_path)
        rep = _verify(tmp_path / "ledger.jsonl", tmp_path / "roster.json")
        assert rep["rc"] == 20 and rep["status"] == "cut_short"


def test_node_refusal_carries_code_110_and_partner_name_only(tmp_path, monkeypatch):
    """A node whose file is missing replies code 110 and its partner name (so the coordinator names it), never the text."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedcollab.node import init_node_home, make_client_app
    from fedcollab.privacy.accounting import public_key_hex
    from fedcollab.runner._run import simulated_policy
    from fedcollab.spec import load_spec

    monkeypatch.setattr(TaskIdentity, "_run_id", 7, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 2, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)
    spec = load_spec(_spec_with_local_cleveland(tmp_path, None))
    homes = {p.name: str(init_node_home(tmp_path / "nodes" / p.name, partner=p.name, policy=simulated_policy(spec, p.name)).root)
             for p in spec.partners}
    client = make_client_app(spec, homes, {"coordinator": public_key_hex(Ed25519PrivateKey.generate())})
    req = Message(content=RecordDict({"config": ConfigRecord({"fedcollab.kind": "setup", "fedcollab.run_id": "r1", "scaling": "none"})}),
                  dst_node_id=2, message_type="query")
    req.metadata.__dict__["_message_id"] = req.object_id
    ctx = Context(run_id=7, node_id=2, node_config={"partition-id": 0}, state=RecordDict(), run_config={})
    reply = client(req, ctx)
    err = dict(reply.content.config_records["fedcollab.error"])
    assert err == {"code": int(NodeErrorCode.DATA_UNREADABLE), "partner": "cleveland"}


def test_profile_names_the_partners_data_problem_before_simulating(tmp_path):
    df = _cleveland_rows()
    df.loc[0, "chol"] = "high"
    spec = _spec_with_local_cleveland(tmp_path, df)
    r = runner.invoke(app, ["profile", str(spec), "--out", str(tmp_path / "p")])
    assert r.exit_code == 3 and "cleveland: column `chol`: 1 value(s) are not numbers" in " ".join(r.output.split())
