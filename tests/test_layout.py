"""The repository's folders hold what their names say, and the documents' links resolve."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "fedcollab" / "specs"
#: Folders that are not the source tree (environments, outputs, build products).
NOT_SOURCE = {".venv", ".git", "runs", "build", "dist", ".hypothesis"}
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_specs_ship_once_as_package_data():
    """The shipped specs live in one folder inside the package; `specs/` at the root is a link to it, not a copy."""
    assert (ROOT / "specs").is_symlink() and (ROOT / "specs").resolve() == SPECS
    shipped = sorted(p.name for p in SPECS.glob("*.toml"))
    assert "heart-disease.toml" in shipped and "heart-disease-dp.toml" in shipped and len(shipped) == 9
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["fedcollab"]
    assert "specs/*.toml" in package_data
    assert not (ROOT / "protocols").exists() and not (ROOT / "fedcollab" / "protocols_dist").exists()
    # No second copy of a shipped spec anywhere else in the tree (examples are their own specs).
    texts = {p.read_bytes() for p in SPECS.glob("*.toml")}
    others = [p for p in ROOT.rglob("*.toml") if not NOT_SOURCE & set(p.relative_to(ROOT).parts)
              and p.resolve().parent != SPECS and p.read_bytes() in texts]
    assert others == []


@pytest.mark.parametrize("name", sorted(p.name for p in SPECS.glob("*.toml")))
def test_every_shipped_spec_is_valid(name):
    """Each spec under specs/ loads (their comments name `specs/...` in their run lines)."""
    from fedcollab.spec import load_spec

    load_spec(ROOT / "specs" / name)
    text = (SPECS / name).read_text()
    assert not re.search(r"(?<![\w/])protocols/", text)


def test_schemas_live_in_one_folder():
    """Every published JSON Schema is in schemas/, nowhere else in the tree."""
    from fedcollab.cli._schemas import schemas

    assert sorted(schemas()) == sorted(p.name for p in (ROOT / "schemas").glob("*.json"))
    stray = [p for p in ROOT.rglob("*.schema.json") if p.parent != ROOT / "schemas" and not NOT_SOURCE & set(p.relative_to(ROOT).parts)]
    assert stray == []


def _documents() -> list[Path]:
    return [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("doc", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    """Every relative Markdown link in the README and docs names a file or folder that exists."""
    broken = [target for target in LINK.findall(doc.read_text())
              if "://" not in target and not target.startswith("mailto:") and not (doc.parent / target).exists()]
    assert broken == []


def test_paths_named_in_commands_exist():
    """Every `specs/...`, `schemas/...` or `docs/protocols/...` path the README and docs name exists."""
    pattern = re.compile(r"(?<![\w/.\-])((?:specs|schemas|docs/protocols)/[a-z0-9_.\-]+\.(?:toml|json|md))")  # NAME: a placeholder
    missing = sorted({m for doc in _documents() for m in pattern.findall(doc.read_text()) if not (ROOT / m).exists()})
    assert missing == []
