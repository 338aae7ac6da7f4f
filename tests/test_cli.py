"""The command line: help, exit codes, JSON output."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedcollab.cli import app

runner = CliRunner()


@pytest.mark.parametrize("cmd", [[], ["run"], ["demo"], ["spec"], ["spec", "validate"], ["spec", "schema"], ["exit-codes"]])
def test_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_validate_good(root):
    r = runner.invoke(app, ["spec", "validate", str(root / "protocols" / "heart-disease.toml"), "--format", "json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {"valid": True, "name": "heart-disease", "partners": ["cleveland", "hungary", "switzerland", "va-long-beach"]}


def test_validate_bad(root, tmp_path):
    """A bad spec exits 2 and lists each problem with field and value."""
    text = (root / "protocols" / "heart-disease-dp.toml").read_text().replace("target_epsilon = 1.0", "target_epsilon = -1.0")
    bad = tmp_path / "bad.toml"
    bad.write_text(text)
    r = runner.invoke(app, ["spec", "validate", str(bad), "--format", "json"])
    assert r.exit_code == 2
    out = json.loads(r.stdout)
    assert out["valid"] is False
    assert any("privacy.target_epsilon" in p and "-1.0" in p for p in out["problems"])


def test_run_bad_spec_exits_before_simulating(root, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\n")
    r = runner.invoke(app, ["run", str(bad), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert not (tmp_path / "o" / "summary.json").exists()


def test_exit_codes_json():
    r = runner.invoke(app, ["exit-codes", "--format", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["5"].startswith("A release would exceed")
