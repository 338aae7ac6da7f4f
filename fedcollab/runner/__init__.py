"""Run a collaboration on Flower's simulation engine: ``fedcollab.run(spec) -> Result``.

The runner's modules load on first use, so the data and spec checks that come before a run
(``fedcollab.runner._preflight``) answer in a second, without importing torch or Flower.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FedcollabModel", "Result", "flower_client_app", "flower_server_app", "load_model", "run", "run_demo"]

_WHERE = {"Result": "_run", "run": "_run", "run_demo": "_run", "FedcollabModel": "_predict", "load_model": "_predict",
          "flower_client_app": "_flower_app", "flower_server_app": "_flower_app"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"fedcollab.runner.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fedcollab.runner' has no attribute {name!r}")
