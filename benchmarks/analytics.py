"""Query latency on seeded synthetic silos with the Heart schema (4 and 16 silos of 100k rows).

Each silo is a Parquet file drawn from a fixed seed; the query (count, mean, variance, histogram
and quantiles, grouped by sex, filtered on age, epsilon 1) runs end to end on Flower's
simulation engine with SecAgg+ and the distributed discrete Gaussian. The time is the whole
`run_query` call: simulation start, node checks, local aggregates, secure sum, decoding, close.

    python benchmarks/analytics.py [--rows 100000] [--silos 4 16]

Ends with one JSON line {"query_seconds_4x100k", "query_seconds_16x100k"}; goal <= 30 s for 16.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _bench  # noqa: E402,F401 - sets Flower's offline environment first

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUERY = {
    "name": "bench", "epsilon": 1.0, "delta": 1e-6, "group_by": "sex", "where": [{"column": "age", "op": ">=", "value": 40}],
    "statistics": [{"kind": "count"}, {"kind": "mean", "column": "chol"}, {"kind": "variance", "column": "age"},
                   {"kind": "histogram", "column": "cp"}, {"kind": "quantiles", "column": "thalch", "bins": 20}],
}


def synthetic_silo(n: int, seed: int) -> pd.DataFrame:
    """``n`` rows with the Heart schema, drawn from ``seed`` (plausible marginals, no real patient)."""
    g = np.random.default_rng(seed)
    cat = lambda levels, p=None: g.choice(np.asarray(levels, dtype=object), size=n, p=p)  # noqa: E731
    return pd.DataFrame({
        "id": np.arange(n, dtype=float),
        "age": g.integers(29, 78, n).astype(float),
        "sex": cat(["Female", "Male"], [0.3, 0.7]),
        "dataset": cat(["Cleveland", "Hungary", "Switzerland", "VA Long Beach"]),
        "cp": cat(["typical angina", "atypical angina", "non-anginal", "asymptomatic"], [0.1, 0.2, 0.2, 0.5]),
        "trestbps": np.clip(g.normal(132, 18, n), 0, 250).round(),
        "chol": np.clip(g.normal(220, 50, n), 0, 700).round(),
        "fbs": g.random(n) < 0.15,
        "restecg": cat(["normal", "st-t abnormality", "lv hypertrophy"], [0.6, 0.2, 0.2]),
        "thalch": np.clip(g.normal(138, 25, n), 40, 250).round(),
        "exang": g.random(n) < 0.35,
        "oldpeak": np.clip(g.normal(0.9, 1.0, n), -4, 8).round(1),
        "slope": cat(["upsloping", "flat", "downsloping"]),
        "ca": g.integers(0, 4, n).astype(float),
        "thal": cat(["normal", "fixed defect", "reversable defect"]),
        "num": g.integers(0, 5, n).astype(float),
    })


def bench_spec(n_silos: int, rows: int, folder: Path):
    import tomllib

    from fedcollab.spec import parse_spec

    base = tomllib.loads((ROOT / "specs" / "heart-disease.toml").read_text())
    partners = []
    for i in range(n_silos):
        path = folder / f"silo{i}.parquet"
        synthetic_silo(rows, seed=1000 + i).to_parquet(path, index=False)
        partners.append({"name": f"silo{i}", "source": {"path": str(path)}, "split": {"test_fraction": 0.34, "seed": 43}})
    base.update({"name": f"bench-{n_silos}", "partners": partners})
    return parse_spec(base, base_dir=folder)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--silos", type=int, nargs="+", default=[4, 16])
    args = ap.parse_args()
    from fedcollab.runner._query import run_query
    from fedcollab.spec import parse_query

    q = parse_query(QUERY)
    out: dict[str, float] = {}
    for n in args.silos:
        with tempfile.TemporaryDirectory(prefix="fedcollab-bench-") as tmp:
            spec = bench_spec(n, args.rows, Path(tmp))
            t0 = time.perf_counter()
            res = run_query(spec, q, out=Path(tmp) / "out")
            wall = time.perf_counter() - t0
        key = f"query_seconds_{n}x{args.rows // 1000}k"
        out[key] = round(wall, 2)
        count = sum(r["value"] for r in res.rows if r["statistic"] == "count" and r["value"] is not None)
        print(f"{n:>3} silos x {args.rows} rows: query {wall:6.1f} s (node answer {res_seconds(res)}), "
              f"noisy count {count:.0f}, count noise std {res.privacy['count_noise_std']:.2f}", flush=True)
    print(json.dumps(out))
    return 0


def res_seconds(res) -> str:  # noqa: ANN001
    return f"{res.seconds:.1f} s total"


if __name__ == "__main__":
    raise SystemExit(main())
