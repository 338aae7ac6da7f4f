"""Layering and the public surface."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["fedcollab.core", "fedcollab.spec", "fedcollab.privacy.accounting", "fedcollab.data", "fedcollab.crypto",
            "fedcollab.protocols", "fedcollab.protocols.gbdt", "fedcollab.protocols.vertical", "fedcollab.models",
            "fedcollab.node", "fedcollab.coordinator", "fedcollab.audit", "fedcollab.runner"]


@pytest.mark.parametrize("name", PACKAGES)
def test_all_is_sorted_and_exported(name):
    """Each public package has a sorted __all__ naming only what it exports."""
    mod = importlib.import_module(name)
    names = list(mod.__all__)
    assert names == sorted(names, key=lambda s: (not s.isupper(), s)) or names == sorted(names)
    for n in names:
        assert hasattr(mod, n), n


def test_auditor_imports_no_ml_stack():
    """fedcollab.audit and the accounting core import without torch, opacus, tenseal or flwr."""
    code = (
        "import sys, fedcollab.audit, fedcollab.privacy.accounting as a;"
        "a.compute_epsilon([a.GaussianMechanism(noise_multiplier=2.0)], delta=1e-5, accountant='rdp');"
        "bad=[m for m in ('torch','opacus','tenseal','flwr','grpc','pandas') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_import_contracts_hold():
    """The import-linter contracts in pyproject.toml pass (layers, coordinator without data, small audit)."""
    import shutil
    from pathlib import Path

    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent))
    assert exe, "import-linter is a dev dependency"
    r = subprocess.run([exe], capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stdout[-3000:]
    assert "Contracts: 3 kept, 0 broken" in r.stdout


def _private_imports_across_packages() -> list[str]:
    """Every ``importer -> imported`` where the imported module is private (a ``_name`` part) to a package outside the importer."""
    import grimp

    graph = grimp.build_graph("fedcollab", include_external_packages=False)
    found = []
    for importer in sorted(graph.modules):
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            parts = imported.split(".")
            private = next((i for i, p in enumerate(parts) if p.startswith("_") and not p.startswith("__")), None)
            if private is None:
                continue
            owner = ".".join(parts[:private])
            if importer != owner and not importer.startswith(owner + "."):
                lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
                found.append(f"{importer} -> {imported} (line {', '.join(map(str, lines))})")
    return found


def test_no_package_imports_another_packages_private_modules():
    """A package is used through its ``__init__`` (or a public slice such as ``fedcollab.protocols.secagg``), never its ``_modules``."""
    found = _private_imports_across_packages()
    assert not found, "import the package's exported name instead:\n" + "\n".join(found)


def test_protocols_are_slices():
    """``fedcollab.protocols`` exports no flat names: each protocol is imported from its own slice."""
    import fedcollab.protocols as protocols

    assert protocols.__all__ == []
    for slice_ in ("ddg", "dpsgd", "evaluation", "he", "model_file", "partner_dp", "profile", "quantize", "query", "scoring",
                   "secagg", "statistics", "summary", "wire"):
        mod = importlib.import_module(f"fedcollab.protocols.{slice_}")
        assert mod.__doc__, slice_


def test_node_folder_commands_import_no_ml_stack():
    """``fedcollab.node``'s names load lazily: reading a node folder imports neither torch nor Flower."""
    code = (
        "import sys; from fedcollab.node import NodeHome, init_node_home;"
        "bad=[m for m in ('torch','opacus','tenseal','flwr') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
