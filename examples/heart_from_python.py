"""Drive the Heart Disease collaboration from Python with ``fedcollab.run``.

Four hospitals (the UCI Heart Disease data shipped with fedcollab) train a logistic regression
with FedAvg on Flower's simulation engine. Without ``--dp`` the spec is
``specs/heart-disease.toml`` (no privacy, exact federated statistics for scaling); with
``--dp`` it is ``specs/heart-disease-dp.toml`` (record-level DP-SGD at every hospital,
epsilon = 1, delta = 1e-3, scaling from public bounds). The script prints the pooled and
per-partner test metrics and, with DP, each partner's epsilon as reported in the summary and as
an auditor recomputes it from ``summary.json`` alone.

    python examples/heart_from_python.py [--dp] [--rounds N] [--out DIR] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPECS = {False: ROOT / "specs" / "heart-disease.toml", True: ROOT / "specs" / "heart-disease-dp.toml"}


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    """Run the collaboration and print what it produced."""
    parser = argparse.ArgumentParser(description="Run the four-hospital Heart Disease collaboration from Python.")
    parser.add_argument("--dp", action="store_true", help="record-level DP-SGD, epsilon = 1 per hospital (specs/heart-disease-dp.toml)")
    parser.add_argument("--rounds", type=int, default=None, help="override training.rounds (the DP plan is calibrated for the new count)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: runs/heart-python or runs/heart-python-dp)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    import fedcollab  # heavy modules (torch, flwr) load when the run starts
    from fedcollab.audit import recompute_summary_epsilons

    spec_path = SPECS[args.dp]
    out = args.out or ROOT / "runs" / ("heart-python-dp" if args.dp else "heart-python")
    spec = fedcollab.load_spec(spec_path)
    if args.rounds is not None:
        # Specs are frozen: rebuild from a dict so that the change is validated too.
        data = spec.model_dump(by_alias=True)
        data["training"]["rounds"] = args.rounds
        spec = type(spec).model_validate(data).with_base_dir(spec.base_dir)
        result = fedcollab.run(spec, out=out, progress=not args.quiet)
    else:
        result = fedcollab.run(spec_path, out=out, progress=not args.quiet)

    s = result.summary
    print(f"{s.spec.name}: {s.rounds} rounds, {s.strategy}, aggregation {s.aggregation}, scaling {s.scaling}, {s.wall_seconds:.1f} s")
    guarantee = s.privacy.guarantees[0] if s.privacy.guarantees else None
    for name, m in s.metrics.partners.items():
        line = f"  {name:<14} n_test={m.n:<4} accuracy {_fmt(m.accuracy)}  AUC {_fmt(m.auc)}"
        if guarantee is not None:
            g = guarantee.partners[name]
            line += f"  epsilon {_fmt(g.epsilon, 4)} (sigma {_fmt(g.noise_multiplier)}, q {_fmt(g.sample_rate)}, {g.steps} steps)"
        print(line)
    p = result.pooled
    print(f"  {'pooled':<14} n_test={p.n:<4} accuracy {_fmt(p.accuracy)}  AUC {_fmt(p.auc)}")

    if guarantee is None:
        print("privacy: none; every model update is a non-private release")
    else:
        print(f"privacy: record-level DP-SGD, observer {guarantee.observer}, delta {guarantee.delta:g}, {guarantee.accountant_version}")
        # What an auditor does: recompute epsilon from the recorded sigma, q and T.
        summary = json.loads((out / "summary.json").read_text())
        for name, r in recompute_summary_epsilons(summary).items():
            print(f"  audit {name:<14} claimed {_fmt(r['claimed'], 4)}  recomputed {_fmt(r['recomputed'], 4)}  target {_fmt(r['target'], 4)}")
    print(f"non-private releases: {len(s.privacy.non_private_releases)} (kinds: {sorted({r.kind for r in s.privacy.non_private_releases})})")
    print(f"wrote {out}/summary.json, metrics.jsonl, {s.model.path} (sha256 {s.model.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
