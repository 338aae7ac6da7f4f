"""`fedcollab submit --resume` at the deployed coordinator: HE runs without a readable encrypted checkpoint, and
vertical runs that completed or changed spec, are refused before anything is sent.

Calls the ServerApp's body (`_main`) in-process with no grid at all: a refusal that came after any
message would fail on the missing grid with exit code 1, not the spec error's 2.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.coordinator import COORDINATOR
from fedcollab.coordinator._deploy import ENV_HOME, EXIT_PREFIX, RUN_CONFIG_RESUME, RUN_CONFIG_SPEC, _main, run_dir
from fedcollab.privacy.accounting import public_key_hex
from fedcollab.spec import Roster, RosterEntry

ROOT = Path(__file__).resolve().parents[2]


def _interrupted(home: Path, text: str) -> None:
    """An interrupted run 1 at the coordinator: status, spec, a round-1 checkpoint and a ledger file."""
    old = run_dir(home, 1)
    (old / "checkpoints").mkdir(parents=True)
    (old / "status.json").write_text(json.dumps({"state": "failed", "fedcollab_run_id": "r-old"}))
    (old / "spec.toml").write_text(text)
    np.savez(old / "checkpoints" / "checkpoint.npz", __round__=np.array(1), w=np.zeros(3))
    (old / "ledger.jsonl").write_text("")


def _submit_resume(tmp_path, monkeypatch, caplog, spec: str, he_checkpoint: str | None = None) -> dict:
    """Resume run 1 as run 2 with no grid; the ConfigError's exit code 2, the status it left."""
    key = Ed25519PrivateKey.generate()
    roster = Roster(parties={COORDINATOR: RosterEntry(signing_key=public_key_hex(key), role="coordinator")})
    (tmp_path / "roster.json").write_text(roster.model_dump_json())
    text = (ROOT / "specs" / spec).read_text()
    _interrupted(tmp_path, text)
    if he_checkpoint is not None:
        (run_dir(tmp_path, 1) / "checkpoints" / "checkpoint.he.json").write_text(he_checkpoint)
    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    ctx = SimpleNamespace(run_id=2, run_config={RUN_CONFIG_SPEC: base64.b64encode(text.encode()).decode("ascii"), RUN_CONFIG_RESUME: "1"})
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match=rf"^{EXIT_PREFIX}2: ConfigError"):
        _main(None, ctx)  # no grid: anything sent would fail with exit 1
    return json.loads((run_dir(tmp_path, 2) / "status.json").read_text())


@pytest.mark.parametrize("checkpoint, what", [
    (None, "no status, spec or checkpoint"),  # a plain checkpoint.npz is not an HE run's
    ('{"round": 1, "fingerprint": "f", "included": ["cleveland:00"], "signature": "zz", "ct": [], "uploads": {}}', "hex signatures"),
    ('{"round": 1, "fingerprint": "f", "included": ["cleveland:00"], "signature": "00", "ct": [], "uploads": {}}', "`uploads` must hold"),
    ('{"round": 0, "fingerprint": "f", "included": [], "signature": "00", "ct": [], "uploads": {}}', "`round` must be >= 1"),
])
def test_he_resume_needs_its_encrypted_checkpoint(tmp_path, monkeypatch, caplog, checkpoint, what):
    """An HE run resumes from its encrypted aggregate (checkpoint.he.json); without one, or with a malformed one, the
    coordinator stops with a spec error naming the field, before any message."""
    status = _submit_resume(tmp_path, monkeypatch, caplog, "heart-disease-he.toml", checkpoint)
    assert what in caplog.text
    assert status["state"] == "failed" and status["exit_code"] == 2 and status["error"] == "ConfigError"


@pytest.mark.parametrize("state, changed, what", [("completed", False, "that run completed"),
                                                    ("failed", True, "the submitted spec differs from the interrupted run's")])
def test_a_vertical_resume_is_refused_before_any_message(tmp_path, monkeypatch, caplog, state, changed, what):
    """A vertical run resumes from its nodes' checkpoints (tests/node/test_vertical_node.py); one that completed, or
    another spec than the interrupted run's, is refused before anything is sent, and the refusal says which."""
    key = Ed25519PrivateKey.generate()
    roster = Roster(parties={COORDINATOR: RosterEntry(signing_key=public_key_hex(key), role="coordinator")})
    (tmp_path / "roster.json").write_text(roster.model_dump_json())
    text = (ROOT / "specs" / "heart-disease-vertical-lr.toml").read_text()
    _interrupted(tmp_path, text.replace("rounds = 60", "rounds = 61") if changed else text)
    (run_dir(tmp_path, 1) / "status.json").write_text(json.dumps({"state": state, "fedcollab_run_id": "r-old"}))
    monkeypatch.setenv(ENV_HOME, str(tmp_path))
    ctx = SimpleNamespace(run_id=2, run_config={RUN_CONFIG_SPEC: base64.b64encode(text.encode()).decode("ascii"), RUN_CONFIG_RESUME: "1"})
    with caplog.at_level("ERROR"), pytest.raises(RuntimeError, match=rf"^{EXIT_PREFIX}2: ConfigError"):
        _main(None, ctx)  # no grid: anything sent would fail with exit 1
    assert what in caplog.text
    status = json.loads((run_dir(tmp_path, 2) / "status.json").read_text())
    assert status["state"] == "failed" and status["exit_code"] == 2 and status["error"] == "ConfigError"
    assert not (run_dir(tmp_path, 2) / "ledger.jsonl").exists() or not (run_dir(tmp_path, 2) / "ledger.jsonl").read_text()
