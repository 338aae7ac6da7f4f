"""Layering and the public surface."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = ["fedcollab.core", "fedcollab.spec", "fedcollab.privacy.accounting", "fedcollab.data", "fedcollab.protocols",
            "fedcollab.models", "fedcollab.node", "fedcollab.coordinator", "fedcollab.audit", "fedcollab.runner"]


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
