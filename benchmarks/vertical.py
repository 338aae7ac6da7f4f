"""Vertical collaboration benchmark: ECDH-PSI alignment of 2 x 1M ids, and SecureBoost / vertical LR on Heart.

PSI: two parties of ``--psi-n`` ids each (default 1,000,000), ``--psi-overlap`` of them common
(default 0.5), seeded synthetic ids, both parties in this one process on this machine's cores
(libsodium's ristretto255 through rbcl; its ctypes calls release the GIL, so each stage runs in a thread pool of
``--workers`` threads, default the number of cores, at most 8). Figures:

* ``psi_seconds_1m``: wall seconds of the whole protocol in-process (hash, blind and shuffle at
  both parties, re-blind, match, canonical order, notice), the acceptance figure (target <= 120 s
  on 2 cores); the key keeps its name whatever ``--psi-n`` is, ``psi_n`` says the size.
* ``psi_seconds_two_machines``: the same stages if each party had its own machine of this kind:
  both parties' first stage in parallel, then the reply, the match and the notice.
* ``psi_cpu_seconds``: CPU seconds of this process over all threads (``psi_cpu_seconds /
  psi_seconds_1m`` is how many cores it got: below 2 when another process shares the machine).
* ``psi_stage_seconds``: per stage; ``psi_wire_bytes``: the bytes of the three messages' payloads.

Vertical Heart (``specs/heart-disease-vertical.toml``: a clinic with the label and 4 columns,
a lab with 6; each misses a seeded 15 % of the other's patients), through ``run_vertical`` (what
``fedcollab run`` does: PSI, each node's policy and ledger, SecureBoost, joint evaluation):

* ``vertical_auc_joint``: SecureBoost's test AUC (the spec's 30 trees of depth 3, lr 0.2, 16 bins);
  ``vertical_auc_label_holder_only``: the same GBDT (same trees, same bins, same aligned train and
  test rows) on the clinic's columns alone; ``vertical_auc_central_joined``: the same GBDT on the
  joined columns centrally (same bins). Targets: joint - alone >= 0.03, |joint - central| <= 0.01.
* ``secureboost_vs_plain_seconds``: SecureBoost's training seconds over those of plain federated
  GBDT with the same trees (count, depth, lr, bins) through ``fedcollab.run`` (Flower's simulation
  engine, plain sums; the four Heart hospitals horizontally, 486 training rows). Target <= 10.
  ``secureboost_vs_central_inprocess_seconds``: over central in-process GBDT (no transport at
  all): the cost of the cryptography alone.
* ``vertical_lr_auc_joint`` / ``vertical_lr_auc_label_holder_only``: vertical logistic regression
  (``specs/heart-disease-vertical-lr.toml``) against the same Taylor-loss gradient descent on
  the clinic's columns alone; ``vertical_lr_seconds_per_iteration``. ``vertical_lr_relay_*``: the
  same spec as deployed nodes run it (PSI and training as sealed codec messages, relayed):
  its test AUC, its seconds over the in-process run's (alignment and training), its relay
  steps and relayed megabytes.
* ``vertical_lr_three_party_*``: the same rows with the lab's columns split between an ECG lab and
  a stress lab (two passive parties, the two-key-holder protocol), beside the two-party protocol
  in the same run: test AUC of each, the largest weight difference, seconds three over two, and
  seconds and megabytes per iteration.

Run:  .venv/bin/python benchmarks/vertical.py [--psi-only | --skip-psi] [--psi-n 1000000] [--psi-overlap 0.5] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from rich.console import Console

from fedcollab.protocols.psi import active_init, active_match, passive_finish, passive_init, passive_reply

TARGETS = {"psi_seconds_1m": 120.0, "vertical_joint_minus_alone": 0.03, "vertical_joint_minus_central": 0.01, "secureboost_vs_plain_seconds": 10.0}
ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=True)


def _ids(n: int, overlap: float, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    n_common = int(round(n * overlap))
    pool = [f"cust-{v:012x}" for v in rng.sample(range(1 << 44), 2 * n - n_common)]
    ids_a = pool[:n]
    ids_b = pool[:n_common] + pool[n:]
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    return ids_a, ids_b


def bench_primitive(n: int = 4000) -> dict[str, Any]:
    """One thread, the same points count: libsodium's ristretto255 multiplication (what the protocol uses, through
    rbcl) against edwards25519's ``scalarmult_ed25519_noclamp`` (the previous choice, through PyNaCl, when installed)."""
    import hashlib

    import rbcl

    from fedcollab.protocols.psi import hash_to_group, new_scalar

    pts = hash_to_group([f"p{i}" for i in range(n)], b"bench", workers=1)
    k = new_scalar(os.urandom)
    t = time.perf_counter()
    for q in pts:
        rbcl.crypto_scalarmult_ristretto255(k, q)
    out: dict[str, Any] = {"psi_mul_us_ristretto255": round((time.perf_counter() - t) / n * 1e6, 1)}
    try:
        from nacl import bindings as na
    except ImportError:
        return out
    ed = [na.crypto_core_ed25519_from_uniform(hashlib.sha512(q).digest()[:32]) for q in pts]
    t = time.perf_counter()
    for q in ed:
        na.crypto_scalarmult_ed25519_noclamp(k, q)
    out["psi_mul_us_ed25519_pynacl"] = round((time.perf_counter() - t) / n * 1e6, 1)
    out["psi_mul_ed25519_over_ristretto255"] = round(out["psi_mul_us_ed25519_pynacl"] / out["psi_mul_us_ristretto255"], 2)
    return out


def bench_psi(n: int, overlap: float, *, workers: int | None = None) -> dict[str, Any]:
    """Time one in-process PSI of two parties of ``n`` ids, ``overlap`` common; checks the result."""
    ids_a, ids_b = _ids(n, overlap)
    domain = os.urandom(16)
    stages: dict[str, float] = {}

    def timed(name: str, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        console.print(f"[cyan]psi[/] {name} ...")
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        stages[name] = time.perf_counter() - t
        console.print(f"[cyan]psi[/] {name}: {stages[name]:.1f} s")
        return out

    t0, c0 = time.perf_counter(), time.process_time()
    a, blinded = timed("active_init", active_init, ids_a, domain, reveal="both", workers=workers)
    p = timed("passive_init", passive_init, ids_b, domain, workers=workers)
    p, reply = timed("passive_reply", passive_reply, p, blinded, workers=workers)
    a, notice, _ = timed("active_match", active_match, a, reply, workers=workers)
    _, res_p, _ = timed("passive_finish", passive_finish, p, notice)
    total, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert a.result is not None
    ia, ib = a.result.rows, res_p.rows
    ok = len(ia) == int(round(n * overlap)) and all(ids_a[i] == ids_b[j] for i, j in zip(ia.tolist(), ib.tolist(), strict=True))
    if not ok:
        raise RuntimeError("psi: the aligned rows are wrong")
    two = max(stages["active_init"], stages["passive_init"]) + stages["passive_reply"] + stages["active_match"] + stages["passive_finish"]
    wire = len(blinded.points) + len(reply.reblinded) + len(reply.points) + (notice.positions.nbytes if notice.positions is not None else 0)
    return {"psi_seconds_1m": round(total, 2), "psi_seconds_two_machines": round(two, 2), "psi_cpu_seconds": round(cpu, 2), "psi_n": n, "psi_overlap": overlap,
            "psi_common": len(ia), "psi_backend": "libsodium-ristretto255", "psi_workers": workers or min(os.cpu_count() or 1, 8),
            "psi_cores": os.cpu_count(), "psi_wire_bytes": wire, "psi_stage_seconds": {k: round(v, 2) for k, v in stages.items()}}


def bench_secureboost(tmp: Path, *, n_trees: int | None = None, plain: bool = True) -> dict[str, Any]:
    """Vertical Heart: joint SecureBoost vs the label holder alone vs central GBDT on the joined rows; time vs plain federated GBDT."""
    import dataclasses

    from sklearn.metrics import roc_auc_score

    import fedcollab
    from fedcollab.protocols.gbdt import train_in_process
    from fedcollab.protocols.vertical import joint_layout
    from fedcollab.runner._vertical import run_vertical
    from fedcollab.spec import load_spec, tree_params

    spec = load_spec(ROOT / "specs" / "heart-disease-vertical.toml")
    params = tree_params(spec)
    if n_trees is not None:
        params = dataclasses.replace(params, n_trees=n_trees)
    res = run_vertical(spec, out=tmp / "vertical", params=params)
    o = res.outcome
    assert o is not None
    d = o.data
    lay_a, lay_p = o.layouts
    tr, te = d["train"], d["test"]
    y = d["y"]

    def central(x, layout) -> tuple[float, float]:
        t0 = time.perf_counter()
        m = train_in_process([("central", x[tr], y[tr])], layout=layout, params=params, plan=None, coordinator_rng=np.random.default_rng(0)).model
        return float(roc_auc_score(y[te], m.predict_proba(x[te]))), time.perf_counter() - t0

    auc_alone, _ = central(d["xa"], lay_a)
    auc_central, t_central = central(np.hstack([d["xa"], d["xp"]]), joint_layout(lay_a, lay_p))
    out: dict[str, Any] = {
        "vertical_auc_joint": round(o.test_auc, 4),
        "vertical_auc_label_holder_only": round(auc_alone, 4),
        "vertical_auc_central_joined": round(auc_central, 4),
        "vertical_joint_minus_alone": round(o.test_auc - auc_alone, 4),
        "vertical_joint_minus_central": round(o.test_auc - auc_central, 4),
        "vertical_intersection": o.intersection,
        "vertical_trees": params.n_trees,
        "vertical_depth": params.max_depth,
        "secureboost_seconds": round(o.seconds_train, 3),
        "secureboost_wire_mb": round(o.wire_bytes / 1e6, 2),
        "secureboost_vs_central_inprocess_seconds": round(o.seconds_train / t_central, 1),
    }
    if plain:
        # Plain federated GBDT with the same trees (count, depth, bins, learning rate) through fedcollab.run
        # (Flower's simulation engine, plain sums): the four Heart hospitals, horizontally.
        hspec = load_spec(ROOT / "specs" / "heart-disease-gbdt.toml")
        g = hspec.model.gbdt.model_copy(update={"n_trees": params.n_trees, "max_depth": params.max_depth, "learning_rate": params.learning_rate,
                                                "n_bins": params.n_bins})
        hspec = hspec.model_copy(update={"model": hspec.model.model_copy(update={"gbdt": g})})
        t0 = time.perf_counter()
        fedcollab.run(hspec, out=tmp / "plain-gbdt", progress=False)
        t_plain = time.perf_counter() - t0
        out["plain_federated_gbdt_seconds"] = round(t_plain, 3)
        out["secureboost_vs_plain_seconds"] = round(o.seconds_train / t_plain, 3)
    return out


def bench_vertical_lr(tmp: Path) -> dict[str, Any]:
    """Vertical LR on the Heart split: joint vs the label holder alone (same Taylor-loss gradient descent, same rows)."""
    from sklearn.metrics import roc_auc_score

    from fedcollab.runner._vertical import run_vertical
    from fedcollab.spec import load_spec

    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    res = run_vertical(spec, out=tmp / "vertical-lr")
    o = res.outcome
    assert o is not None
    d = o.data
    tr, te, y = d["train"], d["test"], d["y"]
    xa = np.hstack([d["xa"], np.ones((len(y), 1))])
    w = np.zeros(xa.shape[1])
    for _ in range(spec.training.rounds):  # the same loss, steps and learning rate, the clinic's columns only
        r = 0.25 * (xa[tr] @ w) + 0.5 - y[tr]
        w -= spec.training.learning_rate * (xa[tr].T @ r) / len(tr)
    alone = float(roc_auc_score(y[te], xa[te] @ w))
    relay = _vertical_lr_relay(spec)
    return {"vertical_lr_auc_joint": round(o.test_auc, 4), "vertical_lr_auc_label_holder_only": round(alone, 4),
            "vertical_lr_joint_minus_alone": round(o.test_auc - alone, 4), "vertical_lr_iterations": spec.training.rounds,
            "vertical_lr_seconds_per_iteration": round(o.seconds_train / spec.training.rounds, 4),
            "vertical_lr_wire_mb_per_iteration": round(o.wire_bytes / spec.training.rounds / 1e6, 2),
            "vertical_lr_relay_auc": round(relay["auc"], 4),
            "vertical_lr_relay_vs_inprocess_seconds": round(relay["seconds"] / max(o.seconds_align + o.seconds_train, 1e-9), 2),
            "vertical_lr_relay_steps": relay["steps"], "vertical_lr_relay_mb": round(relay["bytes"] / 1e6, 2)}


def bench_vertical_lr_multi(tmp: Path) -> dict[str, Any]:
    """Vertical LR with the lab's columns split between two passive parties, beside the two-party protocol on the same rows.

    The aligned, scaled rows of the two-party Heart run; the lab's columns split as an ECG lab
    (``cp``, ``fbs``, ``restecg``: its first 6 encoded columns) and a stress lab (``thalch``,
    ``exang``, ``oldpeak``). Both protocols in one process, same iterations and learning rate:
    the same model (up to the CKKS flooding noise), at the price of a third exchange and two
    public-key encryptions a party and iteration.
    """
    from sklearn.metrics import roc_auc_score

    from fedcollab.protocols.vertical import train_vertical_lr_in_process, train_vertical_lr_multi_in_process
    from fedcollab.runner._vertical import run_vertical
    from fedcollab.spec import load_spec

    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    o = run_vertical(spec, out=tmp / "vertical-lr-rows").outcome
    assert o is not None
    d = o.data
    tr, te, y = d["train"], d["test"], d["y"]
    xa, xp = d["xa"], d["xp"]
    ecg, stress = xp[:, :6], xp[:, 6:]
    kw = dict(iterations=spec.training.rounds, learning_rate=spec.training.learning_rate, rng=np.random.default_rng(0))
    t0 = time.perf_counter()
    two = train_vertical_lr_in_process(("clinic", xa[tr], y[tr]), ("lab", xp[tr]), **kw)  # type: ignore[arg-type]
    t_two = time.perf_counter() - t0
    t0 = time.perf_counter()
    three = train_vertical_lr_multi_in_process(("clinic", xa[tr], y[tr]), [("ecg", ecg[tr]), ("stress", stress[tr])], **kw)  # type: ignore[arg-type]
    t_three = time.perf_counter() - t0
    m2 = two.model
    w2 = np.concatenate([m2.active_weights, [m2.intercept], m2.passive_weights])
    w3 = np.concatenate([three.active_weights, [three.intercept], three.passive_weights["ecg"], three.passive_weights["stress"]])
    auc2 = float(roc_auc_score(y[te], xa[te] @ m2.active_weights + m2.intercept + xp[te] @ m2.passive_weights))
    auc3 = float(roc_auc_score(y[te], xa[te] @ three.active_weights + three.intercept + ecg[te] @ three.passive_weights["ecg"]
                               + stress[te] @ three.passive_weights["stress"]))
    it = spec.training.rounds
    return {"vertical_lr_three_party_auc": round(auc3, 4), "vertical_lr_two_party_auc_same_rows": round(auc2, 4),
            "vertical_lr_three_vs_two_party_max_weight_diff": float(f"{np.abs(w3 - w2).max():.2e}"),
            "vertical_lr_three_vs_two_party_seconds": round(t_three / max(t_two, 1e-9), 2),
            "vertical_lr_three_party_seconds_per_iteration": round(t_three / it, 4),
            "vertical_lr_three_party_wire_mb_per_iteration": round(three.wire_bytes / it / 1e6, 2)}


def _vertical_lr_relay(spec: Any) -> dict[str, Any]:
    """The same spec as the deployed nodes run it: PSI and training as codec messages sealed end to end, relayed.

    The label holder's generator and the lab's handler (``fedcollab.protocols.vertical``), each
    with its own per-run X25519 key signed by its own Ed25519 key; the relay only carries bytes
    (no Flower transport: what is timed is the protocol and its sealing, beside the in-process driver).
    """
    import time

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from fedcollab.crypto import SealKey
    from fedcollab.data import load_vertical_party
    from fedcollab.protocols.vertical import active_lr_protocol, decode_message, encode_message, passive_party, relay

    def hexkey(sk: Ed25519PrivateKey) -> str:
        return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()

    t0 = time.perf_counter()
    a, p = load_vertical_party(spec, "clinic"), load_vertical_party(spec, "lab")
    ska, skp = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ka, kp = SealKey.generate("bench", "clinic"), SealKey.generate("bench", "lab")
    ca, cp = ka.channel(kp.advert(skp), roster_key=hexkey(skp)), kp.channel(ka.advert(ska), roster_key=hexkey(ska))
    rng = np.random.default_rng()
    lab = passive_party(spec, p, active="clinic", run_id="bench", record=lambda r, b: None, rng=rng.spawn(1)[0])
    seen = {"steps": 0, "bytes": 0}

    def count(src: str, dst: str, wire: bytes) -> None:
        seen["bytes"] += len(wire)
        seen["steps"] += src == "label_holder"

    res = relay(active_lr_protocol(spec, a, ["lab"], run_id="bench", record=lambda r, b: None, rng=rng.spawn(1)[0]),
                {"lab": lambda w: cp.seal("vertical", encode_message(tuple(r for m in decode_message(cp.open("vertical", w)) for r in lab.handle(m))))},
                to_wire=lambda _p, m: ca.seal("vertical", encode_message(m)), from_wire=lambda _p, b: decode_message(ca.open("vertical", b)),
                seen=count)
    return {"auc": res.test_auc, "seconds": time.perf_counter() - t0, **seen}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--psi-n", type=int, default=1_000_000, help="ids per party")
    ap.add_argument("--psi-overlap", type=float, default=0.5, help="fraction of each party's ids that is common")
    ap.add_argument("--workers", type=int, default=None, help="threads per stage (default: cores, at most 8)")
    ap.add_argument("--psi-only", action="store_true", help="only the PSI figures")
    ap.add_argument("--skip-psi", action="store_true", help="only the Heart figures (SecureBoost, vertical LR)")
    ap.add_argument("--trees", type=int, default=None, help="SecureBoost trees (default: the spec's 30)")
    args = ap.parse_args()
    out: dict[str, Any] = {}
    if not args.psi_only:
        with tempfile.TemporaryDirectory(prefix="fedcollab-bench-vertical-") as tmp:
            console.print("[cyan]vertical[/] SecureBoost on the Heart split, then plain federated GBDT with the same trees ...")
            out |= bench_secureboost(Path(tmp), n_trees=args.trees)
            console.print("[cyan]vertical[/] vertical logistic regression ...")
            out |= bench_vertical_lr(Path(tmp))
            console.print("[cyan]vertical[/] vertical logistic regression with two passive parties ...")
            out |= bench_vertical_lr_multi(Path(tmp))
    if not args.skip_psi:
        out |= bench_primitive()
        out |= bench_psi(args.psi_n, args.psi_overlap, workers=args.workers)
    print(f"{'figure':40s} {'value':>14s} {'target':>8s}")
    for k, v in out.items():
        if not isinstance(v, dict):
            t = TARGETS.get(k)
            print(f"{k:40s} {v!s:>14s} {'' if t is None else t:>8}")
    verdict = {}
    if "psi_seconds_1m" in out and out["psi_n"] >= 1_000_000:
        verdict["psi_seconds_1m"] = out["psi_seconds_1m"] <= TARGETS["psi_seconds_1m"]
    if "vertical_auc_joint" in out:
        verdict["vertical_joint_minus_alone"] = out["vertical_joint_minus_alone"] >= TARGETS["vertical_joint_minus_alone"]
        verdict["vertical_joint_minus_central"] = abs(out["vertical_joint_minus_central"]) <= TARGETS["vertical_joint_minus_central"]
    if "secureboost_vs_plain_seconds" in out:
        verdict["secureboost_vs_plain_seconds"] = out["secureboost_vs_plain_seconds"] <= TARGETS["secureboost_vs_plain_seconds"]
    out["verdict"] = {k: "pass" if v else "fail" for k, v in verdict.items()}
    sys.stdout.flush()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
