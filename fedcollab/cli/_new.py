"""``fedcollab new NAME [--spec SPEC]``: write a Flower app (``flwr run .``) that runs a fedcollab spec."""

from __future__ import annotations

import re
from pathlib import Path
from string import Template
from typing import Annotated

import typer
from rich.console import Console

from fedcollab.cli._errors import fail as _fail
from fedcollab.core import ConfigError, FedcollabError

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "flower_app"
DEFAULT_SPEC = Path(__file__).resolve().parents[1] / "specs" / "heart-disease.toml"
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def write_flower_app(name: str, *, spec: Path | None = None, into: Path = Path("."), out: Path | None = None) -> Path:
    """Write the app folder ``into/name`` (pyproject.toml, name/{__init__,server_app,client_app}.py, name/spec.toml)."""
    from fedcollab.spec import load_spec

    if not _NAME.match(name):
        raise ConfigError(f"`NAME` must be a Python package name (lowercase letters, digits, _; starting with a letter), got {name!r}")
    spec_path = Path(spec) if spec is not None else DEFAULT_SPEC
    s = load_spec(spec_path)  # a bad spec stops here, with its problems listed
    root = Path(into) / name
    if root.exists():
        raise ConfigError(f"`NAME`: {root} exists already; choose another name or remove it")
    out_dir = (Path(out) if out is not None else root / "runs").resolve()
    values = {
        "name": name,
        "spec_name": s.name,
        "out": str(out_dir),
        "out_repr": repr(str(out_dir)),
        "base_dir": repr(str(spec_path.resolve().parent)),
        "n_partners": str(len(s.partners)),
    }
    pkg = root / name
    pkg.mkdir(parents=True)
    files = {"pyproject.toml": root / "pyproject.toml", "README.md": root / "README.md", "__init__.py": pkg / "__init__.py",
             "server_app.py": pkg / "server_app.py", "client_app.py": pkg / "client_app.py"}
    for tmpl, dest in files.items():
        dest.write_text(Template((TEMPLATES / f"{tmpl}.tmpl").read_text()).substitute(values))
    (pkg / "spec.toml").write_bytes(spec_path.read_bytes())
    return root


def new(
    name: Annotated[str, typer.Argument(help="App (and Python package) name, e.g. heart_app.")],
    spec: Annotated[Path | None, typer.Option("--spec", help="Collaboration spec to ship in the app; default the Heart Disease example.")] = None,
    into: Annotated[Path, typer.Option("--into", help="Folder to create the app folder in.")] = Path("."),
) -> None:
    """Write a Flower app folder for `flwr run .`: pyproject.toml ([tool.flwr.app]), a ServerApp and a ClientApp built from a fedcollab spec."""
    try:
        root = write_flower_app(name, spec=spec, into=into)
    except FedcollabError as exc:
        raise _fail(exc) from None
    Console().print(f"wrote {root}: pyproject.toml, {name}/server_app.py, {name}/client_app.py, {name}/spec.toml\n"
                    f"run it with:  cd {root} && flwr run .   (docs/flower-apps.md)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``fedcollab new`` to ``app``."""
    app.command("new")(new)
