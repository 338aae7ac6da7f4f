"""Run a collaboration on Flower's simulation engine: ``fedcollab.run(spec) -> Result``.

The runner's modules load on first use, so the data and spec checks that come before a run
(``fedcollab.runner._preflight``) answer in a second, without importing torch or Flower.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Result", "run", "run_demo"]


def __getattr__(name: str) -> Any:
    if name in {"Result", "run", "run_demo"}:
        from fedcollab.runner import _run

        return getattr(_run, name)
    raise AttributeError(f"module 'fedcollab.runner' has no attribute {name!r}")
