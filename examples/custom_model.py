"""Train the Heart collaboration with a custom torch model (``examples/tiny_net.py``).

The spec ``examples/custom_model.toml`` names the model as ``target = "tiny_net:TinyNet"``.
fedcollab imports that module by name wherever the model is built: in the coordinator (this
process) and in every node. In simulation the nodes run in Ray worker processes. Flower 1.42's
Ray backend copies the driver's ``sys.path`` into the workers' ``PYTHONPATH`` when it starts Ray,
so putting the examples folder on ``sys.path`` is enough today; this script also puts it on
``PYTHONPATH`` (inherited by subprocesses) so that it does not depend on that behaviour.
In a deployment the module has to be installed at every partner's node.

Run from anywhere::

    python examples/custom_model.py [--out runs/custom-model] [--quiet]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _put_examples_on_path() -> None:
    """Make ``tiny_net`` importable here and in the Ray workers that run the nodes."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(EXAMPLES) not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(EXAMPLES), *parts])


def main(argv: list[str] | None = None) -> int:
    """Run the spec and print the pooled and per-partner test metrics."""
    parser = argparse.ArgumentParser(description="Run the Heart collaboration with the custom model examples/tiny_net.py:TinyNet.")
    parser.add_argument("--spec", type=Path, default=EXAMPLES / "custom_model.toml", help="spec to run (default: examples/custom_model.toml)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "custom-model", help="output folder (default: runs/custom-model)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    _put_examples_on_path()
    import fedcollab  # after the path is set; heavy modules load when the run starts

    result = fedcollab.run(args.spec, out=args.out, progress=not args.quiet)
    s = result.summary
    print(f"{s.spec.name}: {s.rounds} rounds, model {s.model.n_parameters} parameters, scaling {s.scaling}")
    for name, m in s.metrics.partners.items():
        auc = f"{m.auc:.3f}" if m.auc is not None else "n/a"
        print(f"  {name:<14} n={m.n:<4} accuracy {m.accuracy:.3f}  AUC {auc}")
    p = result.pooled
    auc = f"{p.auc:.3f}" if p.auc is not None else "n/a"
    print(f"  {'pooled':<14} n={p.n:<4} accuracy {p.accuracy:.3f}  AUC {auc}")
    print(f"wrote {args.out}/summary.json, metrics.jsonl, {s.model.path} (sha256 {s.model.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
