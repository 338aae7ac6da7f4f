"""fedcollab: privacy-preserving cross-silo data collaboration on Flower.

``fedcollab.run(spec) -> Result`` runs a collaboration; ``fedcollab.load_spec(path)`` validates a
spec. Heavy modules (torch, flwr) load only when a run starts, so ``fedcollab.audit`` and the
accounting core install and import without them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Result", "Spec", "__version__", "load_spec", "run", "run_demo"]


def __getattr__(name: str) -> Any:
    if name in {"run", "run_demo", "Result"}:
        from fedcollab import runner

        return getattr(runner, name)
    if name in {"load_spec", "Spec"}:
        from fedcollab import spec

        return getattr(spec, name)
    raise AttributeError(f"module 'fedcollab' has no attribute {name!r}")
