"""Federated GBDT benchmark: Heart AUC with and without record-level DP, against scikit-learn, and time.

First **in-process**: the four Heart hospitals (embedded data, FLamby split) answer as nodes
would, through the protocol's stage functions (``fedcollab.protocols.gbdt``: node_reply,
coordinator_step, ...), called as plain functions, so no transport, serialisation or SecAgg+
masking cost is in those figures. Then through Flower (``fedcollab.run``, the simulation engine
in-process, real SecAgg+): the ``sim_*`` figures, ``gbdt_secagg_vs_plain_round`` and
``gbdt_seconds_4x100k_sim``. ``secagg`` sums go through the fixed-point encoding modulo 2^64 that
SecAgg+ would sum (the masks cancel in that sum, so the decoded totals are what the coordinator
would see).

Figures (mean over ``--seeds``, default 3; a seed sets the coordinator's random splits; DP noise
comes from OS entropy, as at a node, so DP figures vary from run to run):

* ``heart_auc_gbdt_nodp``: ``specs/heart-disease-gbdt.toml`` (defaults: 50 trees, depth 3,
  lr 0.1, 32 bins, lambda 1, min child weight 1); pooled test AUC (254 rows). Deterministic.
* ``heart_auc_gbdt_dp_eps1``: ``specs/heart-disease-gbdt-dp.toml`` (record-level epsilon = 1,
  delta = 1e-3 per hospital, RDP; DP defaults: 50 random trees of depth 2, lr 1, lambda 500,
  Gaussian leaf sums); ``heart_auc_gbdt_secagg_dp_eps1``: the same with secagg-encoded sums.
* ``heart_auc_sklearn_central`` / ``heart_auc_sklearn_local_only``: scikit-learn's
  ``HistGradientBoostingClassifier`` with the same trees (50 iterations, depth 3, lr 0.1, 32 bins,
  lambda 1) on the pooled training rows, and on each hospital alone (each scores its own test rows;
  AUC over the pooled test rows). ``gbdt_vs_central_auc`` / ``gbdt_vs_local_only_auc``: the no-DP
  federated AUC minus those.
* ``gbdt_seconds_4x100k``: wall seconds to train 50 trees of depth 4 on a synthetic task of
  4 partners x 100k rows x 20 features (seeded, 32 bins, in-process, this machine), with its test AUC.

Run:  .venv/bin/python benchmarks/trees.py [--seeds 3] [--skip-large] [--skip-simulation]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.metrics import roc_auc_score

from fedcollab.data import load_partner_data
from fedcollab.protocols.gbdt import layout_from_bounds, layout_from_schema, train_in_process
from fedcollab.spec import load_spec, tree_params

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"heart_auc_gbdt_nodp": 0.86, "heart_auc_gbdt_dp_eps1": 0.80, "gbdt_seconds_4x100k": 120.0, "gbdt_secagg_vs_plain_round": 1.5,
           "gbdt_seconds_4x100k_sim": 120.0, "gbdt_secagg_minus_plain_dp_auc": "|.| <= 0.01"}


def _heart(spec_name: str):
    spec = load_spec(ROOT / "specs" / spec_name)
    data = [load_partner_data(spec, p.name) for p in spec.partners]
    return spec, data


def _fed_auc(spec, data, *, seed: int, secagg: bool = False) -> float:
    from fedcollab.protocols.gbdt import plan_of, sketch_of

    params = tree_params(spec)
    layout = layout_from_schema(spec.data_schema, n_bins=params.n_bins)
    plan = plan_of(spec)  # with bin_edges = "quantile" the plan also charges the sketch
    res = train_in_process([(d.partner, d.x_train, d.y_train) for d in data], layout=layout, params=params, plan=plan,
                           coordinator_rng=np.random.default_rng(seed),
                           # Seeded per (seed, node), so that the plain and secagg runs of one seed draw the same noise:
                           # their difference is then the secagg encoding's alone, not a different draw.
                           node_rngs=[np.random.default_rng([seed, i]) for i in range(len(data))] if plan else None,
                           secagg=secagg, sketch=sketch_of(spec))
    x = np.concatenate([d.x_test for d in data])
    y = np.concatenate([d.y_test for d in data])
    return float(roc_auc_score(y, res.model.predict_proba(x)))


def _hgb(seed: int) -> HistGradientBoostingClassifier:
    return HistGradientBoostingClassifier(max_iter=50, max_depth=3, learning_rate=0.1, max_bins=32, l2_regularization=1.0,
                                          min_samples_leaf=1, early_stopping=False, random_state=seed)


def _sklearn(data, seed: int) -> tuple[float, float]:
    x = np.concatenate([d.x_train for d in data])
    y = np.concatenate([d.y_train for d in data])
    xt = np.concatenate([d.x_test for d in data])
    yt = np.concatenate([d.y_test for d in data])
    central = float(roc_auc_score(yt, _hgb(seed).fit(x, y).predict_proba(xt)[:, 1]))
    local = np.concatenate([_hgb(seed).fit(d.x_train, d.y_train).predict_proba(d.x_test)[:, 1] for d in data])
    return central, float(roc_auc_score(yt, local))


def _large(seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    d, n, parts = 20, 100_000, 4
    w = rng.normal(size=d)

    def make(m: int):
        x = np.clip(rng.normal(size=(m, d)), -4, 4)
        logit = x @ w * 0.5 + np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]
        return x, (rng.random(m) < 1 / (1 + np.exp(-logit))).astype(float)

    partners = [(f"p{i}", *make(n)) for i in range(parts)]
    xt, yt = make(20_000)
    layout = layout_from_bounds([f"x{j}" for j in range(d)], np.tile([-4.0, 4.0], (d, 1)), n_bins=32, binary=[False] * d)
    params = dataclasses.replace(load_spec(ROOT / "specs" / "heart-disease-gbdt.toml").model.gbdt.resolved(record_dp=False),
                                 n_trees=50, max_depth=4)
    t0 = time.perf_counter()
    res = train_in_process(partners, layout=layout, params=params, plan=None, coordinator_rng=np.random.default_rng(seed))
    return time.perf_counter() - t0, float(roc_auc_score(yt, res.model.predict_proba(xt)))


def _simulate(spec, out: Path, data=None):
    """One ``fedcollab.run`` (the Flower simulation engine, in-process): (pooled AUC, mean seconds per tree, wall seconds)."""
    import fedcollab

    t0 = time.perf_counter()
    res = fedcollab.run(spec, out=out, data=data, progress=False)
    wall = time.perf_counter() - t0
    per_tree = statistics.fmean(r.seconds for r in res.rounds[:-1])  # the last round also evaluates
    return res.pooled.auc, per_tree, wall


def _simulation_figures(tmp: Path, *, large: bool) -> dict[str, float]:
    """Heart through Flower: plain vs secagg round time (same trees), the DP model under secagg; optionally 4 x 100k."""
    spec = load_spec(ROOT / "specs" / "heart-disease-gbdt.toml")
    dp_spec = load_spec(ROOT / "specs" / "heart-disease-gbdt-dp.toml")
    auc_plain, t_plain, _ = _simulate(spec, tmp / "plain")
    auc_sec, t_sec, _ = _simulate(spec.replace(aggregation="secagg"), tmp / "secagg")
    auc_dp_sec, _, _ = _simulate(dp_spec.replace(aggregation="secagg"), tmp / "secagg-dp")
    out = {
        "sim_heart_auc_gbdt_nodp": round(auc_plain, 4),
        "sim_heart_auc_gbdt_secagg_nodp": round(auc_sec, 4),
        "sim_heart_auc_gbdt_secagg_dp_eps1": round(auc_dp_sec, 4),
        "sim_gbdt_round_seconds_plain": round(t_plain, 4),
        "sim_gbdt_round_seconds_secagg": round(t_sec, 4),
        "gbdt_secagg_vs_plain_round": round(t_sec / t_plain, 3),
    }
    if large:
        out |= _simulation_large(tmp)
    return out


def _simulation_large(tmp: Path, seed: int = 0) -> dict[str, float]:
    """The synthetic 4 x 100k x 20 task through Flower (fedcollab.run with DataFrames): 50 trees of depth 4, plain and secagg."""
    import pandas as pd

    from fedcollab.spec import parse_spec

    rng = np.random.default_rng(seed)
    d, n = 20, 100_000
    w = rng.normal(size=d)

    def make(m: int) -> pd.DataFrame:
        x = np.clip(rng.normal(size=(m, d)), -4, 4)
        logit = x @ w * 0.5 + np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]
        df = pd.DataFrame(x, columns=[f"x{j}" for j in range(d)])
        df["y"] = (rng.random(m) < 1 / (1 + np.exp(-logit))).astype(int)
        return df

    raw = {
        "schema_version": 1, "name": "synthetic-4x100k", "seed": seed, "aggregation": "plain",
        "partners": [{"name": f"p{i}", "split": {"test_fraction": 0.1, "seed": seed}} for i in range(4)],
        "schema": {"features": [f"x{j}" for j in range(d)], "label": {"column": "y", "positive_above": 0},
                   "columns": [{"name": f"x{j}", "type": "number", "bounds": [-4, 4]} for j in range(d)]
                   + [{"name": "y", "type": "number", "bounds": [0, 1], "integer": True}]},
        "model": {"kind": "gbdt", "gbdt": {"n_trees": 50, "max_depth": 4}},
    }
    spec = parse_spec(raw)
    frames = {f"p{i}": make(n) for i in range(4)}
    auc, t_plain, wall = _simulate(spec, tmp / "large-plain", data=frames)
    _, t_sec, wall_sec = _simulate(spec.replace(aggregation="secagg"), tmp / "large-secagg", data=frames)
    return {"gbdt_seconds_4x100k_sim": round(wall, 2), "gbdt_seconds_4x100k_sim_secagg": round(wall_sec, 2),
            "gbdt_auc_4x100k_sim": round(auc, 4), "gbdt_secagg_vs_plain_round_4x100k": round(t_sec / t_plain, 3)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--skip-large", action="store_true", help="skip the 4 x 100k timing")
    ap.add_argument("--skip-simulation", action="store_true", help="skip the Flower simulations (round-time ratio, DP under secagg)")
    args = ap.parse_args()
    seeds = list(range(args.seeds))
    spec, data = _heart("heart-disease-gbdt.toml")
    dp_spec, dp_data = _heart("heart-disease-gbdt-dp.toml")
    runs: dict[str, list[float]] = {k: [] for k in ("nodp", "dp", "secagg_dp", "nodp_quantile", "dp_quantile", "central", "local")}
    quantile = {"gbdt": {"bin_edges": "quantile"}}
    for s in seeds:
        runs["nodp"].append(_fed_auc(spec, data, seed=s))
        runs["dp"].append(_fed_auc(dp_spec, dp_data, seed=s))
        runs["nodp_quantile"].append(_fed_auc(spec.replace(model=quantile), data, seed=s))
        runs["dp_quantile"].append(_fed_auc(dp_spec.replace(model=quantile), dp_data, seed=s))
        runs["secagg_dp"].append(_fed_auc(dp_spec, dp_data, seed=s, secagg=True))
        c, lo = _sklearn(data, s)
        runs["central"].append(c)
        runs["local"].append(lo)
        print(f"seed {s}: " + ", ".join(f"{k} {v[-1]:.4f}" for k, v in runs.items()), file=sys.stderr)
    m = {k: statistics.fmean(v) for k, v in runs.items()}
    out = {
        "heart_auc_gbdt_nodp": round(m["nodp"], 4),
        "heart_auc_gbdt_dp_eps1": round(m["dp"], 4),
        "heart_auc_gbdt_dp_eps1_sd": round(statistics.stdev(runs["dp"]), 4) if len(seeds) > 1 else None,
        "heart_auc_gbdt_secagg_dp_eps1": round(m["secagg_dp"], 4),
        # the same seeds and noise draws, histograms through the secagg fixed point: target |difference| <= 0.01
        "gbdt_secagg_minus_plain_dp_auc": round(m["secagg_dp"] - m["dp"], 4),
        # bin_edges = "quantile" (the DP count sketch, charged) against the default public edges, same seeds
        "heart_auc_gbdt_nodp_quantile": round(m["nodp_quantile"], 4),
        "heart_auc_gbdt_dp_eps1_quantile": round(m["dp_quantile"], 4),
        "gbdt_quantile_minus_public_dp_auc": round(m["dp_quantile"] - m["dp"], 4),
        "heart_auc_sklearn_central": round(m["central"], 4),
        "heart_auc_sklearn_local_only": round(m["local"], 4),
        "gbdt_vs_central_auc": round(m["nodp"] - m["central"], 4),
        "gbdt_vs_local_only_auc": round(m["nodp"] - m["local"], 4),
        "seeds": len(seeds),
    }
    if not args.skip_large:
        secs, auc = _large()
        out |= {"gbdt_seconds_4x100k": round(secs, 2), "gbdt_auc_4x100k": round(auc, 4)}
    if not args.skip_simulation:
        import tempfile

        sys.path.insert(0, str(ROOT / "benchmarks"))
        import _bench  # noqa: F401 - sets Flower's offline environment

        with tempfile.TemporaryDirectory() as tmp:
            out |= _simulation_figures(Path(tmp), large=not args.skip_large)
    print(f"{'figure':34s} {'value':>9s} {'target':>8s}")
    for k, v in out.items():
        t = TARGETS.get(k)
        print(f"{k:34s} {v!s:>9s} {'' if t is None else t:>8}")
    # One verdict per acceptance figure measured in this run (issue 15): the AUC bars, the paired secagg-minus-plain
    # DP difference, and the times; the round-time ratio is transport-bound (docs/protocols/gbdt.md) and reported as it is.
    checks = {"heart_auc_gbdt_nodp": lambda v: v >= 0.86, "heart_auc_gbdt_dp_eps1": lambda v: v >= 0.80,
              "gbdt_secagg_minus_plain_dp_auc": lambda v: abs(v) <= 0.01, "gbdt_seconds_4x100k": lambda v: v <= 120,
              "gbdt_seconds_4x100k_sim": lambda v: v <= 120, "gbdt_secagg_vs_plain_round": lambda v: v <= 1.5}
    out["verdict"] = {k: "pass" if f(out[k]) else "fail" for k, f in checks.items() if k in out}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
