"""Partner-level DP on Heart: distributed DP under SecAgg+ and central DP, beside record-level DP-SGD.

Side by side in one run, for several model-initialisation seeds:

* ``record_eps1``            specs/heart-disease-dp.toml: record-level DP-SGD, epsilon = 1 per
                             hospital toward the coordinator (the foundation's DP configuration);
* ``distributed_eps{1,3,8}`` specs/heart-disease-ddp.toml: partner-level distributed discrete
                             Gaussian under SecAgg+, epsilon against the coordinator;
* ``central_eps{1,3,8}``     the same spec with ``aggregation = "plain"``, ``privacy.mode = "central"``:
                             Gaussian noise added by the coordinator, epsilon against model recipients.

Partner-level DP protects a hospital's whole contribution; with four partners the mean of
clipped updates carries noise of std sigma / 4 per coordinate, so utility drops (no bar). It also
measures the bytes a node uploads in one SecAgg+ round (every stage's messages, through the wire
format) with the DDG vector against plain SecAgg's weighted fixed-point vector, for the Heart
model (14 parameters) and a 100k-parameter model.

Run:  .venv/bin/python benchmarks/distributed_dp.py [--seeds 3] [--quick]
Ends with one JSON line: {"heart_auc_distributed_eps8", "heart_auc_central_eps8", "ddp_bytes_vs_secagg", ...}.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _bench  # noqa: F401  (sets Flower's offline environment before flwr is imported)

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DP_SPEC = ROOT / "specs" / "heart-disease-dp.toml"
DDP_SPEC = ROOT / "specs" / "heart-disease-ddp.toml"


@dataclass(frozen=True)
class Config:
    key: str
    label: str
    spec_path: Path
    mode: str | None = None  # override privacy.mode (distributed / central)
    epsilon: float | None = None  # partner-level epsilon


CONFIGS = [
    Config("record_eps1", "record-level DP-SGD, eps 1 (vs coordinator)", DP_SPEC),
    *[Config(f"distributed_eps{e:g}", f"distributed DDG, partner eps {e:g} (vs coordinator)", DDP_SPEC, "distributed", e) for e in (1.0, 3.0, 8.0)],
    *[Config(f"central_eps{e:g}", f"central Gaussian, partner eps {e:g} (vs model recipients)", DDP_SPEC, "central", e) for e in (1.0, 3.0, 8.0)],
]


def build_spec(config: Config, seed: int) -> Any:
    from fedcollab.spec import load_spec, parse_spec

    base = load_spec(config.spec_path)
    raw = base.model_dump(by_alias=True, exclude_none=True)
    raw["seed"] = seed
    if config.mode is not None:
        raw["privacy"]["mode"] = config.mode
        raw["privacy"]["partner"]["epsilon"] = config.epsilon
        if config.mode == "central":
            raw["aggregation"] = "plain"
    return parse_spec(raw).with_base_dir(base.base_dir)


def run_one(config: Config, seed: int) -> dict[str, Any]:
    import fedcollab

    s = fedcollab.run(build_spec(config, seed)).summary
    eps = [p.epsilon for g in s.privacy.guarantees for p in g.partners.values()]
    return {"acc": s.metrics.pooled_test.accuracy, "auc": s.metrics.pooled_test.auc, "max_eps": max(e if e is not None else math.inf for e in eps),
            "observer": ",".join(sorted({g.observer for g in s.privacy.guarantees})), "seconds": s.wall_seconds}


def _wire_bytes(wire: Any) -> int:
    """Payload bytes of a wire record: bytes as is, numbers 8, strings their UTF-8 length, lists summed."""
    if isinstance(wire, dict):
        return sum(len(str(k)) + _wire_bytes(v) for k, v in wire.items())
    if isinstance(wire, (list, tuple)):
        return sum(_wire_bytes(v) for v in wire)
    if isinstance(wire, bytes):
        return len(wire)
    if isinstance(wire, str):
        return len(wire.encode())
    return 8


def upload_bytes(vectors: dict[str, np.ndarray]) -> float:
    """Mean bytes a node sends in one real SecAgg+ round (all four stages, wire format)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcollab.protocols import secagg

    names = tuple(sorted(vectors))
    length = next(iter(vectors.values())).size
    cfg = secagg.SecAggConfig(run_id="bench", round=1, participants=names, k=1000, threshold=2, max_dropouts=1, bits=32, length=length)
    keys = {n: Ed25519PrivateKey.generate() for n in names}
    transcript: list[tuple[Any, str, Any]] = []
    secagg.run_round_in_memory(vectors, cfg=cfg, signing_keys=keys, transcript=transcript)
    return sum(_wire_bytes(m.to_wire()) for _, _, m in transcript) / len(names)


def bytes_ratio(d: int, spec: Any) -> tuple[float, float, float]:
    """(DDG bytes, plain SecAgg bytes, ratio) per node and round for a model of ``d`` parameters."""
    from fedcollab.protocols.ddg import ddg_encode, ddg_generator
    from fedcollab.protocols.partner_dp import plan_distributed
    from fedcollab.protocols.quantize import encode_update

    rng = np.random.default_rng(0)
    updates = {p: rng.normal(0, 0.01, d) for p in ("a", "b", "c", "d")}
    plan = plan_distributed(spec, d=d)
    ddg = {p: ddg_encode(u, clip_l2=plan.clip, gamma=plan.gamma, beta=plan.beta, n_noise_shares=plan.n_honest, sigma_total=plan.sigma_total,
                         bits=32, generator=ddg_generator()) for p, u in updates.items()}
    plain = {p: encode_update(u, weight=100.0, max_weight=200.0, clip=spec.secagg.clip, scale=spec.secagg.scale, bits=32, n_parties=4)
             for p, u in updates.items()}
    a, b = upload_bytes(ddg), upload_bytes(plain)
    return a, b, a / b


def mean_sd(xs: list[float]) -> tuple[float, float]:
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="model-initialisation seeds per configuration (default 3)")
    ap.add_argument("--quick", action="store_true", help="one seed, epsilon 8 only (a smoke run)")
    args = ap.parse_args(argv)
    out = Console()
    err = Console(stderr=True)
    configs = [c for c in CONFIGS if not args.quick or c.key in ("record_eps1", "distributed_eps8", "central_eps8")]
    seeds = [43 + i for i in range(1 if args.quick else args.seeds)]
    results: dict[str, list[dict[str, Any]]] = {c.key: [] for c in configs}
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err) as progress:
        task = progress.add_task("Heart runs", total=len(configs) * len(seeds))
        for seed in seeds:
            for c in configs:
                r = run_one(c, seed)
                results[c.key].append(r)
                progress.console.print(f"  {c.key:<18} seed {seed}: acc {r['acc']:.3f}  auc {r['auc']:.3f}  max eps {r['max_eps']:.3f}")
                progress.advance(task)

    table = Table(title=f"Heart, pooled test (254 rows), {len(seeds)} seed(s)")
    for col in ("configuration", "observer", "accuracy", "AUC", "max eps"):
        table.add_column(col)
    summary: dict[str, Any] = {}
    for c in configs:
        rs = results[c.key]
        acc, acc_sd = mean_sd([r["acc"] for r in rs])
        auc, auc_sd = mean_sd([r["auc"] for r in rs])
        summary[c.key] = (acc, auc)
        table.add_row(c.label, rs[0]["observer"], f"{acc:.3f} ± {acc_sd:.3f}", f"{auc:.3f} ± {auc_sd:.3f}", f"{max(r['max_eps'] for r in rs):.4f}")
    out.print(table)

    from fedcollab.spec import load_spec

    spec = load_spec(DDP_SPEC)
    btable = Table(title="Bytes a node uploads in one SecAgg+ round (all stages)")
    for col in ("parameters", "distributed DDG", "plain SecAgg", "ratio"):
        btable.add_column(col)
    ratios = {}
    for d in (14, 100_000):
        a, b, r = bytes_ratio(d, spec)
        ratios[d] = r
        btable.add_row(f"{d:,}", f"{a:,.0f}", f"{b:,.0f}", f"{r:.4f}")
    out.print(btable)
    line = {
        "heart_auc_distributed_eps8": round(summary["distributed_eps8"][1], 4),
        "heart_auc_central_eps8": round(summary["central_eps8"][1], 4),
        "ddp_bytes_vs_secagg": round(ratios[100_000], 4),
        "heart_acc_distributed_eps8": round(summary["distributed_eps8"][0], 4),
        "heart_acc_central_eps8": round(summary["central_eps8"][0], 4),
        "heart_auc_record_eps1": round(summary["record_eps1"][1], 4),
        "ddp_bytes_vs_secagg_heart": round(ratios[14], 4),
        "seeds": len(seeds),
    }
    for k in ("distributed_eps1", "distributed_eps3", "central_eps1", "central_eps3"):
        if k in summary:
            line[f"heart_auc_{k}"] = round(summary[k][1], 4)
    sys.stdout.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
