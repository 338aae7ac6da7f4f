"""`fedcollab node approve` (issue 14 item 1): the partner pins the exact spec its node will run."""

from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from fedcollab.cli import app

runner = CliRunner()


@pytest.fixture
def home(tmp_path):
    from fedcollab.node import init_node_home

    return init_node_home(tmp_path / "node", partner="hungary").root


def test_approve_stores_the_spec_byte_for_byte_and_prints_its_hash(root, home):
    """The spec lands as approved/<sha256>.toml, unchanged; the hash is printed on one line."""
    spec = root / "specs" / "heart-disease.toml"
    digest = hashlib.sha256(spec.read_bytes()).hexdigest()
    r = runner.invoke(app, ["node", "approve", str(spec), "--home", str(home)])
    assert r.exit_code == 0, r.output
    assert f"sha256 {digest}" in r.stdout
    assert (home / "approved" / f"{digest}.toml").read_bytes() == spec.read_bytes()
    again = runner.invoke(app, ["node", "approve", str(spec), "--home", str(home)])  # idempotent
    assert again.exit_code == 0 and sorted(p.name for p in (home / "approved").iterdir()) == [f"{digest}.toml"]


def test_approve_json_output_parses(root, home):
    """--format json: one object with the hash and the stored path."""
    spec = root / "specs" / "heart-disease.toml"
    r = runner.invoke(app, ["node", "approve", str(spec), "--home", str(home), "--format", "json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out == {"sha256": hashlib.sha256(spec.read_bytes()).hexdigest(), "path": str(home / "approved" / f"{out['sha256']}.toml")}


@pytest.mark.parametrize("what", ["missing", "directory", "not-toml", "not-a-spec"])
def test_a_bad_spec_is_a_clear_error_and_nothing_is_approved(what, home, tmp_path):
    """A path that is not a readable spec: exit 2, the path named, no traceback, nothing stored."""
    path = {"missing": tmp_path / "nope.toml", "directory": tmp_path}.get(what, tmp_path / "bad.toml")
    if what == "not-toml":
        path.write_text("x = [")
    elif what == "not-a-spec":
        path.write_text('[run]\nname = "demo"\n')
    r = runner.invoke(app, ["node", "approve", str(path), "--home", str(home)])
    assert r.exit_code == 2, r.output
    assert isinstance(r.exception, SystemExit)  # a clean exit, not a crash
    assert str(path) in "".join(r.output.split())  # named (rich may wrap a long path)
    assert not (home / "approved").exists() or not list((home / "approved").iterdir())


def test_a_missing_node_folder_is_a_clear_error(root, tmp_path):
    """--home that does not exist: exit 2 and `fedcollab node init` suggested."""
    r = runner.invoke(app, ["node", "approve", str(root / "specs" / "heart-disease.toml"), "--home", str(tmp_path / "none")])
    assert r.exit_code == 2, r.output
    assert "node init" in r.output
