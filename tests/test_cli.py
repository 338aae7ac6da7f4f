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
    r = runner.invoke(app, ["spec", "validate", str(root / "specs" / "heart-disease.toml"), "--format", "json"])
    assert r.exit_code == 0
    assert json.loads(r.stdout) == {"valid": True, "name": "heart-disease", "partners": ["cleveland", "hungary", "switzerland", "va-long-beach"]}


def test_validate_bad(root, tmp_path):
    """A bad spec exits 2 and lists each problem with field and value."""
    text = (root / "specs" / "heart-disease-dp.toml").read_text().replace("target_epsilon = 1.0", "target_epsilon = -1.0")
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


@pytest.mark.parametrize("cmd", [["query"], ["profile"], ["score"]])
def test_analytics_and_scoring_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


def test_query_on_unknown_column_exits_before_simulating(root, tmp_path):
    """A query on a column the schema does not declare: exit 2, the field and value named, nothing written."""
    q = tmp_path / "q.toml"
    q.write_text('name = "bad"\nepsilon = 1.0\ndelta = 1e-6\n[[statistics]]\nkind = "mean"\ncolumn = "bmi"\n')
    out = tmp_path / "out"
    r = runner.invoke(app, ["query", str(root / "specs" / "heart-disease.toml"), "--query", str(q), "--out", str(out)])
    assert r.exit_code == 2
    assert "statistics[0].column" in r.output and "bmi" in r.output
    assert not out.exists()


def test_query_with_bad_epsilon_names_the_field(root, tmp_path):
    q = tmp_path / "q.toml"
    q.write_text('name = "bad"\nepsilon = -1.0\ndelta = 1e-6\n[[statistics]]\nkind = "count"\n')
    r = runner.invoke(app, ["query", str(root / "specs" / "heart-disease.toml"), "--query", str(q), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "epsilon" in r.output and "-1" in r.output


@pytest.mark.parametrize("cmd", [["submit", "spec.toml"], ["status"], ["coordinator", "nodes"]])
def test_deployment_commands_without_a_coordinator_folder(cmd, tmp_path):
    """--home without coordinator.json: exit 2 and the missing file named, no traceback."""
    r = runner.invoke(app, [*cmd, "--home", str(tmp_path)])
    assert r.exit_code == 2, r.output
    assert "coordinator.json" in r.output
    assert isinstance(r.exception, SystemExit)  # a clean exit, not a crash


def test_error_printer_shows_only_a_node_code_a_class_names():
    """The CLI prints the node code of scoring's holder refusals, not the core tree's ClientApp defaults."""
    from fedcollab.cli._errors import _own_node_code
    from fedcollab.core import ConfigError, NodeErrorCode, ProtocolError
    from fedcollab.protocols.scoring import ScoringReplayError

    assert _own_node_code(ScoringReplayError("replayed")) == NodeErrorCode.SCORING_REPLAYED
    assert _own_node_code(ConfigError("x")) is None and _own_node_code(ProtocolError("x")) is None
