"""A vertical collaboration simulated on one machine: align by PSI, split, SecureBoost, joint evaluation.

Both parties run here as their nodes would (each reads only its own file, checks its own policy,
records every release in its own signed ledger through its budget gate *before* the message
carrying it is handed over; the label holder owns the HE key, the passive party keeps its
thresholds), but they talk by function calls, not Flower messages. In deployment the same
protocol runs as sealed Flower messages between the nodes (``fedcollab.node._vertical``, relayed
by ``fedcollab.coordinator._vertical``; docs/vertical.md, "Deployment"). The run ledger (``ledger.jsonl``)
collects both parties' entries with the runner's receipts and a countersigned close, so
``fedcollab audit verify`` checks a vertical run like any other.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import BudgetExhausted, ConfigError, ExitCode, NodeErrorCode, PolicyRefused, ProtocolError, RunInterrupted
from fedcollab.data import VerticalPartyData, load_vertical_party
from fedcollab.privacy.accounting import NonPrivate, Release, compute_epsilon
from fedcollab.protocols.gbdt import BinLayout
from fedcollab.protocols.vertical import (
    CHECKPOINT_FORMAT,
    LookupEntry,
    VerticalModel,
    LrStart,
    MultiLrDpPlan,
    MultiLrStart,
    Recorder,
    SecureBoostStart,
    VerticalDpPlan,
    active_layout,
    active_margin,
    checkpoint_rows,
    lookup_document,
    model_document,
    model_from_document,
    passive_decisions,
    lr_model_document,
    passive_layout,
    plan_vertical_dp,
    release_test_metrics,
    rows_body,
    scale_to_unit,
    spec_split,
    table_from_document,
    train_vertical_in_process,
    vertical_domain,
)
from fedcollab.protocols.summary import VerticalSummary
from fedcollab.node import psi_runs_joined, vertical_policy_problem
from fedcollab.spec import Spec, TreeParams, tree_params

#: The vertical demo (``fedcollab demo --vertical``): a clinic and a lab, embedded Heart data.
VERTICAL_DEMO_SPEC = Path(__file__).resolve().parents[1] / "specs" / "heart-disease-vertical.toml"

Aligner = Callable[[Sequence[str], Sequence[str], bytes], tuple[np.ndarray, np.ndarray, list[Release]]]


def plain_align(ids_a: Sequence[str], ids_b: Sequence[str], domain: bytes) -> tuple[np.ndarray, np.ndarray, list[Release]]:
    """Reference alignment (tests, benchmarks): both sides' row indices of the common ids, in a canonical order.

    Not private: a run aligns with PSI. The canonical order is that of a keyed hash of the id, so it
    reveals nothing about either side's file order.
    """
    common = set(ids_a) & set(ids_b)
    order = sorted(common, key=lambda i: hashlib.sha256(domain + i.encode()).digest())
    ia = {k: n for n, k in enumerate(ids_a)}
    ib = {k: n for n, k in enumerate(ids_b)}
    return np.array([ia[k] for k in order], dtype=np.int64), np.array([ib[k] for k in order], dtype=np.int64), []


@dataclass(frozen=True)
class VerticalOutcome:
    """What a simulated vertical run produced (``kind`` gbdt: SecureBoost; logistic_regression: HE vertical LR)."""

    model: Any  # VerticalModel (gbdt) or VerticalLrModel
    table: dict[tuple[int, int], LookupEntry]  # the passive party's lookup table (gbdt; empty for LR)
    layouts: tuple[BinLayout, ...] | None  # the label holder's, then each passive party's (gbdt)
    plan: Any  # VerticalDpPlan, VerticalLrDpPlan or None
    releases: dict[str, list[Release]]
    intersection: int
    n_train: int
    n_test: int
    test_auc: float
    test_accuracy: float
    seconds_align: float
    seconds_train: float
    wire_bytes: int
    data: dict[str, Any]
    kind: str = "gbdt"
    feature_names: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())
    tables: dict[str, dict[tuple[int, int], LookupEntry]] = dataclasses.field(default_factory=dict)  # per passive party (gbdt)
    passive_features: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


def align_parties(active: VerticalPartyData, passives: Sequence[VerticalPartyData], domain: bytes, *, align: Aligner | None,
                  reveal: str = "both") -> tuple[np.ndarray, dict[str, np.ndarray], list[Release]]:
    """The label holder's rows and each passive party's rows of the records common to all, in one order.

    One PSI per passive party, in turn, over the label holder's records still common (a per-party
    domain separator each); a passive party aligned before the last then learns which of its
    common records survive the later PSIs: a declared release by the label holder to it.
    ``align`` (tests, benchmarks) replaces PSI with another aligner of the same signature.
    """
    import functools

    from fedcollab.protocols.psi import psi_align

    sel = np.arange(len(active.ids), dtype=np.int64)
    rows: dict[str, np.ndarray] = {}
    releases: list[Release] = []
    for p in passives:
        fn = align or functools.partial(psi_align, reveal=reveal, active=active.partner, passive=p.partner)
        ia, ip, rel = fn([active.ids[i] for i in sel], p.ids, domain + b"|" + p.partner.encode())
        sel = sel[np.asarray(ia, dtype=np.int64)]
        for name in rows:
            rows[name] = rows[name][np.asarray(ia, dtype=np.int64)]
        rows[p.partner] = np.asarray(ip, dtype=np.int64)
        releases.extend(rel)
    if len(passives) > 1:
        for p in passives[:-1]:
            releases.append(Release(kind="psi_intersection", about="train+test", unit="record", observer="passive_party", added_by=active.partner,
                                    party=active.partner, round=0, mechanism=NonPrivate(), declared_public=True,
                                    details={"size": int(len(sel)), "membership": True, "ids_in": int(len(active.ids)), "to": p.partner,
                                             "common_to_all": True}))
    return sel, rows, releases


def simulate_vertical(spec: Spec, *, align: Aligner | None = plain_align, rng: np.random.Generator | None = None,
                      params: TreeParams | None = None, record: Recorder | None = None,
                      after_align: Callable[[int, list[Release]], None] | None = None,
                      on_tree: Callable[[int], None] | None = None, min_node_rows: int | dict[str, int] = 1,
                      run_id: str | None = None, checkpoint: Callable[[int, dict[str, dict[str, Any]]], None] | None = None,
                      resume: Mapping[str, Mapping[str, Any]] | None = None) -> VerticalOutcome:
    """Run the vertical spec on this machine (every party's data read from its source).

    ``align``: None = ECDH-PSI (what a run does); ``plain_align`` (the default here, for tests and
    benchmarks) = a plain set intersection. ``after_align(intersection, psi releases)`` runs before
    training (the nodes' PSI caps and minimum intersection); ``record`` sees every release before
    its message is handed over; ``min_node_rows``: each passive party's policy minimum.
    ``checkpoint(done, party -> its checkpoint body)`` is called after every tree (iteration) but
    the last; ``resume`` (party -> the body of its last checkpoint) continues from them with no new
    PSI: each party's aligned rows come from its own checkpoint.
    """
    v = spec.vertical
    assert v is not None, "a vertical spec"
    if params is None and spec.model.kind == "gbdt":
        params = tree_params(spec)
    active_name = v.label_holder
    a = load_vertical_party(spec, active_name)
    ps = [load_vertical_party(spec, pp.name) for pp in spec.partners if pp.name != active_name]
    assert a.y is not None
    # Per-run domain separator for hashing ids to the group: a run's blinded points mean nothing in another run.
    run_id = run_id or uuid.uuid4().hex[:16]
    domain = vertical_domain(spec, run_id)
    if resume is not None:
        ia, rows, _done = resumed_rows(resume, a, ps)  # the alignment of the interrupted run: no second PSI
        psi_releases: list[Release] = []
        t_align = 0.0
    else:
        t0 = time.perf_counter()
        ia, rows, psi_releases = align_parties(a, ps, domain, align=align, reveal=v.psi_reveal)
        t_align = time.perf_counter() - t0
        if after_align is not None:
            after_align(len(ia), list(psi_releases))
    if len(ia) < v.min_intersection:
        raise PolicyRefused(f"vertical.min_intersection: the parties share {len(ia)} record(s), fewer than the {v.min_intersection} the spec requires")
    train, test = spec_split(spec, [a.ids[i] for i in ia])
    xa, y = a.x[ia], a.y[ia]
    xps = {p.partner: p.x[rows[p.partner]] for p in ps}
    own_rows = {active_name: rows_body(a, ia), **{p.partner: rows_body(p, rows[p.partner]) for p in ps}}
    if spec.model.kind == "logistic_regression" and len(ps) > 1:
        multi_start = None
        if resume is not None:
            multi_start = MultiLrStart(iterations=int(resume[active_name]["done"]), active_weights=_floats(resume[active_name], "weights"),
                                       passive_weights={q.partner: _floats(resume[q.partner], "weights") for q in ps})

        def multi_checkpoint(st: MultiLrStart) -> None:
            if checkpoint is not None:
                checkpoint(st.iterations, {active_name: {**own_rows[active_name], "weights": st.active_weights.tolist()},
                                           **{q: {**own_rows[q], "weights": w.tolist()} for q, w in st.passive_weights.items()}})

        return _simulate_lr_multi(spec, (a, xa, y), [(q, xps[q.partner]) for q in ps], train, test, psi_releases=list(psi_releases),
                                  t_align=t_align, record=record, rng=rng, on_tree=on_tree, start=multi_start, on_checkpoint=multi_checkpoint)
    if spec.model.kind == "logistic_regression":
        p = ps[0]
        lr_start = None
        if resume is not None:
            lr_start = LrStart(iterations=int(resume[active_name]["done"]), active_weights=_floats(resume[active_name], "weights"),
                               passive_weights=_floats(resume[p.partner], "weights"))

        def lr_checkpoint(st: LrStart) -> None:
            if checkpoint is not None:
                checkpoint(st.iterations, {active_name: {**own_rows[active_name], "weights": st.active_weights.tolist()},
                                           p.partner: {**own_rows[p.partner], "weights": st.passive_weights.tolist()}})

        return _simulate_lr(spec, (a, xa, y), (p, xps[p.partner]), train, test, psi_releases=list(psi_releases), t_align=t_align, record=record,
                            rng=rng, on_tree=on_tree, start=lr_start, on_checkpoint=lr_checkpoint)
    assert params is not None
    lay_a = active_layout(spec, a, params)
    lays = {p.partner: passive_layout(spec, p, xps[p.partner][train], params) for p in ps}
    start = None
    if resume is not None:
        start = SecureBoostStart(trees=model_from_document(resume[active_name].get("model"), what=f"{active_name}'s checkpoint: model").trees,
                                 margin=_floats(resume[active_name], "margin"),
                                 tables={p.partner: table_from_document(resume[p.partner].get("lookup"), what=f"{p.partner}'s checkpoint: lookup")
                                         for p in ps})

    def tree_checkpoint(st: SecureBoostStart) -> None:
        if checkpoint is not None:
            part = VerticalModel(trees=st.trees, base_score=params.base_score, active_features=lay_a.feature_names)
            checkpoint(len(st.trees), {active_name: {**own_rows[active_name], "model": model_document(part), "margin": st.margin.tolist()},
                                       **{p.partner: {**own_rows[p.partner], "lookup": lookup_document(st.tables[p.partner], k + 1)}
                                          for k, p in enumerate(ps)}})

    plans: list[VerticalDpPlan | None] = [None] * len(ps)
    if spec.privacy.mode == "record":
        assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
        plans = [plan_vertical_dp(params, n_features=lays[p.partner].n_features, target_epsilon=spec.privacy.target_epsilon, delta=spec.privacy.delta)
                 for p in ps]
        if rng is None:
            rng = np.random.default_rng(np.random.SeedSequence(entropy=int.from_bytes(os.urandom(32), "big")))
    mins = [min_node_rows.get(p.partner, 1) if isinstance(min_node_rows, dict) else int(min_node_rows) for p in ps]
    t0 = time.perf_counter()
    res = train_vertical_in_process((active_name, xa[train], y[train], lay_a), [(p.partner, xps[p.partner][train], lays[p.partner]) for p in ps],
                                    params=params, plan=plans, rng=rng, record=record, on_tree=on_tree, min_node_rows=mins,
                                    start=start, on_checkpoint=tree_checkpoint)
    t_train = time.perf_counter() - t0
    releases: dict[str, list[Release]] = {active_name: [], **{p.partner: [] for p in ps}}
    for r in psi_releases:
        releases.setdefault(r.party, []).append(r)
    for k, vv in res.releases.items():
        releases[k].extend(vv)
    # Joint prediction on the test rows: each passive party decides its own splits and tells the
    # label holder only left/right per row and split (its thresholds stay with it).
    dec: dict[tuple[int, int], np.ndarray] = {}
    for p in ps:
        mine = passive_decisions(res.tables[p.partner], xps[p.partner][test])
        ev = Release(kind="vertical_partition", about="test", unit="record", observer="label_holder", added_by=p.partner, party=p.partner,
                     round=params.n_trees, mechanism=NonPrivate(), declared_public=True,
                     details={"rows": int(len(test)), "splits": len(mine), "joint_prediction": True})
        if record is not None:
            record(ev, b"".join(np.asarray(v, dtype=bool).tobytes() for _, v in sorted(mine.items())))
        releases[p.partner].append(ev)
        dec.update(mine)
    margin = active_margin(res.model, xa[test], lay_a, dec)
    prob = 1.0 / (1.0 + np.exp(-margin))
    auc, acc = _test_metrics(active_name, y[test], prob, round_=params.n_trees, record=record, releases=releases)
    first = ps[0].partner
    return VerticalOutcome(model=res.model, table=dict(res.table), layouts=(lay_a, *(lays[p.partner] for p in ps)), plan=plans[0], releases=releases,
                           intersection=len(ia), n_train=len(train), n_test=len(test), test_auc=auc, test_accuracy=acc,
                           seconds_align=t_align, seconds_train=t_train, wire_bytes=res.wire_bytes,
                           data={"xa": xa, "xp": xps[first], "xps": xps, "y": y, "train": train, "test": test}, kind="gbdt",
                           feature_names=(tuple(a.feature_names), tuple(ps[0].feature_names)), tables=dict(res.tables),
                           passive_features={p.partner: tuple(p.feature_names) for p in ps})


def _floats(doc: Mapping[str, Any], key: str) -> np.ndarray:
    try:
        arr = np.asarray(doc[key], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        raise ProtocolError(f"checkpoint: {key}: expected a list of numbers, got {type(doc.get(key)).__name__}") from None
    if arr.ndim != 1 or not np.isfinite(arr).all():
        raise ProtocolError(f"checkpoint: {key}: expected a list of finite numbers, got shape {arr.shape}")
    return arr


def resumed_rows(resume: Mapping[str, Mapping[str, Any]], active: VerticalPartyData,
                 passives: Sequence[VerticalPartyData]) -> tuple[np.ndarray, dict[str, np.ndarray], int]:
    """Each party's aligned rows from its own checkpoint, checked against its file (the same ids) and the others (the same count, the same step)."""
    out: dict[str, np.ndarray] = {}
    done: dict[str, int] = {}
    for party in (active, *passives):
        doc = resume.get(party.partner)
        if doc is None:
            raise ConfigError(f"--resume: no checkpoint of {party.partner} (expected one per party)")
        try:
            done[party.partner] = int(doc["done"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"--resume: {party.partner}'s checkpoint: done: expected the number of trees or iterations done, got a malformed one") from None
        out[party.partner] = checkpoint_rows(party, doc, error=ConfigError, what=f"--resume: {party.partner}'s checkpoint")
    if len({len(r) for r in out.values()}) != 1 or len(set(done.values())) != 1:
        raise ConfigError("--resume: the parties' checkpoints disagree (rows " + ", ".join(f"{k} {len(r)}" for k, r in out.items())
                          + "; done " + ", ".join(f"{k} {d}" for k, d in done.items()) + ")")
    return out.pop(active.partner), out, next(iter(done.values()))


def _test_metrics(active_name: str, y: np.ndarray, prob: np.ndarray, *, round_: int, record: Recorder | None,
                  releases: dict[str, list[Release]]) -> tuple[float, float]:
    """The label holder's test AUC and accuracy on its own labels, released to the coordinator (recorded first)."""
    ev, auc, acc = release_test_metrics(active_name, y, prob, round_=round_, record=record)
    releases[active_name].append(ev)
    return auc, acc


def _simulate_lr(spec: Spec, active: tuple[VerticalPartyData, np.ndarray, np.ndarray], passive: tuple[VerticalPartyData, np.ndarray],
                 train: np.ndarray, test: np.ndarray, *, psi_releases: list[Release], t_align: float, record: Recorder | None,
                 rng: np.random.Generator | None, on_tree: Callable[[int], None] | None, start: LrStart | None = None,
                 on_checkpoint: Callable[[LrStart], None] | None = None) -> VerticalOutcome:
    """Vertical logistic regression on the aligned rows (two CKKS keys, masked gradients; docs/vertical-lr.md)."""
    from fedcollab.protocols.vertical import GradientAnswer, lr_setup, predict_vertical_lr_in_process, train_vertical_lr_in_process

    a, xa_raw, y = active
    p, xp_raw = passive
    xa, xp = scale_to_unit(spec, a, xa_raw), scale_to_unit(spec, p, xp_raw)
    params, plan = lr_setup(spec)  # from the spec, as each node derives them in deployment
    iterations = params.iterations
    done = [start.iterations if start is not None else 0]

    def seen(_to: str, msg: object) -> None:
        if isinstance(msg, GradientAnswer) and on_tree is not None:
            on_tree(done[0])
            done[0] += 1

    t0 = time.perf_counter()
    res = train_vertical_lr_in_process((a.partner, xa[train], y[train]), (p.partner, xp[train]), iterations=iterations,
                                       learning_rate=params.learning_rate, rng=rng, record=record, plan=plan, on_message=seen,
                                       start=start, on_checkpoint=on_checkpoint)
    t_train = time.perf_counter() - t0
    releases: dict[str, list[Release]] = {a.partner: [], p.partner: []}
    for r in psi_releases:
        releases.setdefault(r.party, []).append(r)
    for k, vv in res.releases.items():
        releases[k].extend(vv)
    prob, ev = predict_vertical_lr_in_process(res.model, xa[test], (p.partner, xp[test]), record=record)
    releases[p.partner].append(ev)
    auc, acc = _test_metrics(a.partner, y[test], prob, round_=iterations, record=record, releases=releases)
    return VerticalOutcome(model=res.model, table={}, layouts=None, plan=plan, releases=releases, intersection=len(train) + len(test),
                           n_train=len(train), n_test=len(test), test_auc=auc, test_accuracy=acc, seconds_align=t_align, seconds_train=t_train,
                           wire_bytes=res.wire_bytes, data={"xa": xa, "xp": xp, "y": y, "train": train, "test": test}, kind="logistic_regression",
                           feature_names=(tuple(a.feature_names), tuple(p.feature_names)))


def _simulate_lr_multi(spec: Spec, active: tuple[VerticalPartyData, np.ndarray, np.ndarray], passives: Sequence[tuple[VerticalPartyData, np.ndarray]],
                       train: np.ndarray, test: np.ndarray, *, psi_releases: list[Release], t_align: float, record: Recorder | None,
                       rng: np.random.Generator | None, on_tree: Callable[[int], None] | None, start: MultiLrStart | None = None,
                       on_checkpoint: Callable[[MultiLrStart], None] | None = None) -> VerticalOutcome:
    """Vertical logistic regression with several passive parties (two key holders; docs/vertical-lr.md, "Several passive parties")."""
    from fedcollab.protocols.vertical import (
        GradientAnswer,
        PartialLogits,
        VerticalLrModel,
        active_lr_predict,
        lr_setup,
        passive_lr_predict,
        train_vertical_lr_multi_in_process,
    )

    a, xa_raw, y = active
    xa = scale_to_unit(spec, a, xa_raw)
    xps = {p.partner: scale_to_unit(spec, p, x) for p, x in passives}
    params, plan = lr_setup(spec)
    done = [start.iterations if start is not None else 0]

    def seen(_to: str, msg: object) -> None:
        if isinstance(msg, GradientAnswer) and _to == passives[-1][0].partner and on_tree is not None:
            on_tree(done[0])
            done[0] += 1

    t0 = time.perf_counter()
    res = train_vertical_lr_multi_in_process((a.partner, xa[train], y[train]), [(p, x[train]) for p, x in xps.items()],
                                             iterations=params.iterations, learning_rate=params.learning_rate, rng=rng, record=record,
                                             plan=plan, on_message=seen, start=start, on_checkpoint=on_checkpoint)  # type: ignore[arg-type]
    t_train = time.perf_counter() - t0
    releases: dict[str, list[Release]] = {a.partner: [], **{p: [] for p in xps}}
    for r in psi_releases:
        releases.setdefault(r.party, []).append(r)
    for k, vv in res.releases.items():
        releases[k].extend(vv)
    total = np.zeros(len(test))
    for p, x in xps.items():  # joint prediction: each passive party's partial logits on the test rows (recorded first)
        msg, ev = passive_lr_predict(p, res.passive_weights[p], x[test], round_=params.iterations)
        if record is not None:
            record(ev, msg.values.tobytes())
        releases[p].append(ev)
        total += msg.values
    w_a = np.append(res.active_weights, res.intercept)
    prob = active_lr_predict(w_a, xa[test], PartialLogits(rows=len(test), values=total))
    auc, acc = _test_metrics(a.partner, y[test], prob, round_=params.iterations, record=record, releases=releases)
    first = passives[0][0].partner
    model = VerticalLrModel(active_weights=res.active_weights, intercept=res.intercept, passive_weights=res.passive_weights[first],
                            parts=dict(res.passive_weights))
    return VerticalOutcome(model=model, table={}, layouts=None, plan=plan, releases=releases, intersection=len(train) + len(test),
                           n_train=len(train), n_test=len(test), test_auc=auc, test_accuracy=acc, seconds_align=t_align, seconds_train=t_train,
                           wire_bytes=res.wire_bytes, data={"xa": xa, "xp": xps[first], "xps": xps, "y": y, "train": train, "test": test},
                           kind="logistic_regression", feature_names=(tuple(a.feature_names), tuple(passives[0][0].feature_names)),
                           passive_features={p.partner: tuple(p.feature_names) for p, _ in passives})


def releases_summary(spec: Spec, outcome: VerticalOutcome) -> dict[str, Any]:
    """Per party: its releases by kind and observer, and the epsilon of its noisy ones (per unit and observer)."""
    out: dict[str, Any] = {}
    delta = spec.privacy.delta or 0.0
    for party, rels in outcome.releases.items():
        kinds: dict[str, int] = {}
        for r in rels:
            kinds[f"{r.kind}->{r.observer}"] = kinds.get(f"{r.kind}->{r.observer}", 0) + 1
        entry: dict[str, Any] = {"releases": kinds, "non_private": sum(1 for r in rels if r.non_private),
                                 "declared": sum(1 for r in rels if r.declared_public)}
        eps: dict[str, float | None] = {}
        for obs in sorted({r.observer for r in rels if not r.declared_public and r.about != "test"}):
            group = [r for r in rels if r.observer == obs and not r.declared_public and r.about != "test"]
            if any(r.non_private for r in group):
                eps[obs] = None  # a non-private release about training rows: epsilon is infinite
            elif delta > 0:
                eps[obs] = compute_epsilon([r.mechanism for r in group], delta=delta, accountant="rdp").epsilon
        entry["epsilon"] = eps  # per observer, over the charged releases (None = infinite)
        out[party] = entry
    return out


def _model_json(outcome: VerticalOutcome) -> dict[str, Any]:
    return model_document(outcome.model)


def _lr_json(outcome: VerticalOutcome, *, active: bool, party: str | None = None) -> dict[str, Any]:
    m = outcome.model
    if active:
        return lr_model_document(outcome.feature_names[0], m.active_weights, m.intercept)
    if party is not None and party in m.parts:
        return lr_model_document(outcome.passive_features.get(party, outcome.feature_names[1]), m.parts[party])
    return lr_model_document(outcome.feature_names[1], m.passive_weights)


def _plan_json(outcome: VerticalOutcome) -> dict[str, Any] | None:
    plan = outcome.plan
    if plan is None:
        return None
    if outcome.kind == "gbdt":
        return {"z": plan.z, "sigma": plan.sigma, "epsilon": plan.epsilon, "delta": plan.delta, "unit": "record", "observer": "label_holder",
                "covers": "the per-bin sums the label holder decrypts (not the split partitions)"}
    if isinstance(plan, MultiLrDpPlan):
        return {"z": plan.z, "epsilon": plan.epsilon, "delta": plan.delta, "unit": "record", "observer": "each other party",
                "covers": "every other party's gradient, which each party's residual share feeds (noised by the key holder that decrypts it); "
                          "epsilon composes all of a party's releases, whoever observes them"}
    return {"z": plan.z, "epsilon": plan.epsilon, "delta": plan.delta, "unit": "record", "observer": "each other party",
            "covers": "each party's gradient released to the other (X_a^T d by the passive party, X_p^T d by the label holder)"}


def _lookup_json(outcome: VerticalOutcome, party: str | None = None) -> dict[str, Any]:
    tb = outcome.tables.get(party, outcome.table) if party is not None else outcome.table
    owner = 1 + list(outcome.tables).index(party) if party in outcome.tables else 1
    return lookup_document(tb, owner)


@dataclass(frozen=True)
class VerticalResult:
    """What ``fedcollab run`` returns for a vertical spec: the summary (as written) and where."""

    summary: dict[str, Any]
    out_dir: Path | None
    outcome: VerticalOutcome | None


class _Books:
    """Both simulated nodes' budget gates and the run ledger: check, record, then send."""

    def __init__(self, spec: Spec, homes: dict[str, Any], ledger: Any, run_id: str) -> None:
        self.spec, self.homes, self.ledger, self.run_id = spec, homes, ledger, run_id
        self.gates = {name: h.gate(name, h.dataset()) for name, h in homes.items()}
        self.last_round = 0

    def record(self, release: Release, payload: bytes) -> None:
        line = self.gates[release.party].record(release, run_id=self.run_id, payload=payload)
        self.ledger.accept([line.decode()], party=release.party, round=release.round)
        self.last_round = max(self.last_round, release.round)

    def refuse(self, party: str, *, code: NodeErrorCode, reason: str) -> None:
        line = self.gates[party].refuse_request(run_id=self.run_id, round=self.last_round, code=int(code), reason=reason)
        self.ledger.accept([line.decode()], party=party, round=self.last_round)

    def preflight(self, *, after: int = 0) -> None:
        """Each node's own policy, before any record of it is touched (PSI included).

        ``after``: a resumed run's finished trees (iterations): it runs no new PSI (no PSI cap to
        check) and plans only the releases still to come.
        """
        v = self.spec.vertical
        assert v is not None
        for p in self.spec.partners:
            pol = self.homes[p.name].policy()
            problem = vertical_policy_problem(self.spec, p.name, pol)
            if problem is None and not after:
                runs = psi_runs_joined(self.gates[p.name])
                if runs >= pol.vertical.max_psi_runs:
                    problem = f"the node already joined {runs} PSI run(s) on this dataset; its policy allows {pol.vertical.max_psi_runs}"
            if problem is not None:
                self.refuse(p.name, code=NodeErrorCode.POLICY_REFUSED, reason=problem)
                raise PolicyRefused(f"{p.name}: {problem}")
        for p in self.spec.partners:  # each node's whole planned spend against what is left of its budget, before the PSI
            from fedcollab.node import refuse_over_budget
            from fedcollab.protocols.vertical import planned_releases

            try:
                refuse_over_budget(self.gates[p.name], planned_releases(self.spec, p.name, after=after), run_id=self.run_id, partner=p.name)
            except BudgetExhausted:
                ln = self.gates[p.name].ledger.lines()[-1]
                self.ledger.accept([ln.raw.decode()], party=p.name, round=self.last_round)  # the node's refusal into the run ledger
                raise

    def after_align(self, intersection: int, psi_releases: list[Release]) -> None:
        for r in psi_releases:
            self.record(r, json.dumps(r.details, sort_keys=True).encode())
        for p in self.spec.partners:
            need = self.homes[p.name].policy().vertical.min_intersection
            if intersection < need:
                self.refuse(p.name, code=NodeErrorCode.POLICY_REFUSED, reason="intersection below the policy's vertical.min_intersection")
                raise PolicyRefused(f"{p.name}: the parties share {intersection} record(s), fewer than the {need} its policy requires")

    def close(self) -> None:
        from fedcollab.node import countersign_close

        close = self.ledger.close(self.last_round, partners=[p.name for p in self.spec.partners])
        coord = self.ledger.roster.parties["coordinator"].signing_key
        for name, gate in self.gates.items():
            line = countersign_close(gate.ledger, party=name, run_id=self.run_id, close_line=close, coordinator_key=coord,
                                     partners=[p.name for p in self.spec.partners])
            self.ledger.accept([line], party=name, round=self.last_round)


def run_vertical(spec: Spec, *, out: str | Path | None = None, nodes: str | Path | None = None, spec_path: str | Path | None = None,
                 progress: bool = False, align: Aligner | None = None, rng: np.random.Generator | None = None,
                 params: TreeParams | None = None, resume: bool = False) -> VerticalResult:
    """Run a vertical spec on this machine with both parties' node folders, ledgers and budgets.

    Writes ``summary.json``, ``ledger.jsonl``, ``roster.json`` into ``out`` and each party's part
    of the model into its node folder (``nodes/<label holder>/vertical/<run>/model.json``,
    ``nodes/<passive>/vertical/<run>/lookup.json``: the passive party's thresholds never leave it).
    After every tree (iteration) but the last, each party writes its own checkpoint in its node
    folder (``vertical/<run>/checkpoint.json``); ``resume`` continues the failed or interrupted run
    in ``out`` from them, under the same run id and ledger, with no new PSI (docs/vertical.md, "Resume").
    """
    import tempfile

    from fedcollab.runner._run import (
        _carry_unsent_entries,
        _coordinator_and_roster,
        _earlier_releases,
        _ledger_ref,
        _node_heads,
        _set_aside_previous,
        _spec_ref,
        _versions,
        prepare_simulated_nodes,
    )
    from fedcollab.coordinator import RunLedger

    v = spec.vertical
    assert v is not None, "a vertical spec"
    if resume and out is None:
        raise ConfigError("--resume: expected --out, the folder of the interrupted run, got none")
    tmp = tempfile.TemporaryDirectory(prefix="fedcollab-vertical-") if out is None else None
    out_dir = Path(out) if out is not None else Path(tmp.name)  # type: ignore[union-attr]
    out_dir.mkdir(parents=True, exist_ok=True)
    spec_ref = _spec_ref(spec, Path(spec_path) if spec_path is not None else None)
    if resume:
        run_id = _resume_point(out_dir, spec_ref.sha256)
    else:
        _set_aside_previous(out_dir)
        run_id = uuid.uuid4().hex[:16]
    homes = prepare_simulated_nodes(spec, Path(nodes) if nodes is not None else out_dir / "nodes")
    checkpoints = _Checkpoints(homes, run_id, spec_ref.sha256)
    resume_docs = checkpoints.read([p.name for p in spec.partners]) if resume else None
    done = int(next(iter(resume_docs.values()))["done"]) if resume_docs else 0
    key, roster = _coordinator_and_roster(out_dir, homes)
    ledger_path = out_dir / "ledger.jsonl"
    ledger = RunLedger(ledger_path, key=key, roster=roster, run_id=run_id)
    earlier: list[Release] = []
    if resume:
        ledger.heads.update(_node_heads(ledger_path))
        earlier = _earlier_releases(ledger_path, run_id)
        ledger.releases.extend(earlier)
        _carry_unsent_entries(ledger, homes, done)
        earlier = _earlier_releases(ledger_path, run_id)  # with the entries the interruption left at the nodes
    books = _Books(spec, homes, ledger, run_id)
    books.last_round = done
    lr = spec.model.kind == "logistic_regression"
    if params is None and not lr:
        params = tree_params(spec)
    steps = spec.training.rounds if lr else params.n_trees  # type: ignore[union-attr]
    t0 = time.perf_counter()
    base = {"run_id": run_id, "layout": "vertical", "spec": spec_ref.model_dump(mode="json"), "versions": _versions(),
            "label_holder": v.label_holder, "passive_party": next(p.name for p in spec.partners if p.name != v.label_holder),
            "passive_parties": [p.name for p in spec.partners if p.name != v.label_holder], "psi_reveal": v.psi_reveal,
            **({"resumed_after": done} if resume else {})}
    try:
        books.preflight(after=done)
        aligner = align  # None: ECDH-PSI with each passive party
        with _TreeProgress(steps, progress, label="vertical LR" if lr else "SecureBoost", unit="iterations" if lr else "trees") as prog:
            if done:
                prog.tree(done - 1)
            outcome = simulate_vertical(spec, align=aligner, rng=rng, params=params, record=books.record, after_align=books.after_align,
                                        on_tree=prog.tree, run_id=run_id, checkpoint=checkpoints.write, resume=resume_docs,
                                        min_node_rows={n: homes[n].policy().vertical.min_node_rows for n in base["passive_parties"]})
        books.close()
    except BaseException as exc:  # Ctrl-C included: the summary says the run failed or was interrupted, so that --resume can continue it
        stopped = isinstance(exc, (KeyboardInterrupt, RunInterrupted))
        err = RunInterrupted if stopped else type(exc)
        code = int(ExitCode.INTERRUPTED) if stopped else int(getattr(exc, "exit_code", 1))
        try:
            ledger.abort(books.last_round, reason=err.__name__, exit_code=code, codes={})
        except Exception:  # noqa: BLE001 - the original error matters more
            pass
        summary = {**base, "status": "interrupted" if stopped else "failed", "wall_seconds": round(time.perf_counter() - t0, 3),
                   "error": {"exit_code": code, "error": err.__name__}, "ledger": _ledger_ref(ledger).model_dump(mode="json")}
        VerticalSummary.model_validate(summary)  # the published format (schemas/vertical-summary.schema.json)
        _write(out_dir / "summary.json", json.dumps(summary, indent=2))
        if isinstance(exc, KeyboardInterrupt):
            raise RunInterrupted(f"the run was interrupted (Ctrl-C) after {books.last_round} tree(s) or iteration(s); "
                                 f"continue it with `fedcollab run SPEC --out {out_dir} --resume`") from None
        raise
    for r in earlier:  # the interrupted part's releases count in the summary's privacy section
        outcome.releases.setdefault(r.party, [])
    for party, rels in outcome.releases.items():
        rels[:0] = [r for r in earlier if r.party == party]
    checkpoints.remove([p.name for p in spec.partners])
    a_name = base["label_holder"]
    parts = {}
    docs = ((a_name, _model_json(outcome), "model.json"), *((n, _lookup_json(outcome, n), "lookup.json") for n in base["passive_parties"])) if not lr \
        else ((a_name, _lr_json(outcome, active=True), "model.json"),
              *((n, _lr_json(outcome, active=False, party=n), "weights.json") for n in base["passive_parties"]))
    for name, doc, fname in docs:
        d = homes[name].root / "vertical" / run_id
        d.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, allow_nan=True)
        _write(d / fname, text)
        parts[name] = {"path": str(d / fname), "sha256": hashlib.sha256(text.encode()).hexdigest()}
    summary = {
        **base, "status": "completed", "wall_seconds": round(time.perf_counter() - t0, 3),
        "intersection": outcome.intersection, "n_train": outcome.n_train, "n_test": outcome.n_test,
        "metrics": {"test_auc": outcome.test_auc, "test_accuracy": outcome.test_accuracy},
        "model": "secureboost" if not lr else "vertical-logistic-regression",
        **({"trees": len(outcome.model.trees), "passive_splits": len(outcome.table)} if not lr else {"iterations": steps}),
        "seconds": {"align": round(outcome.seconds_align, 3), "train": round(outcome.seconds_train, 3)}, "wire_bytes": outcome.wire_bytes,
        "privacy": {"mode": spec.privacy.mode, "parties": releases_summary(spec, outcome), "plan": _plan_json(outcome)},
        "model_parts": parts,
        "ledger": _ledger_ref(ledger).model_dump(mode="json"),
        "transport": "in-process (fedcollab run; a deployed run relays sealed Flower messages, docs/vertical.md)",
    }
    # The spec as run (validated JSON), so that `fedcollab predict` can score new ids jointly later.
    _write(out_dir / "spec.json", spec.model_dump_json(by_alias=True, exclude_none=True, indent=2))
    VerticalSummary.model_validate(summary)  # the published format (schemas/vertical-summary.schema.json)
    _write(out_dir / "summary.json", json.dumps(summary, indent=2, allow_nan=True))
    return VerticalResult(summary=summary, out_dir=out_dir if tmp is None else None, outcome=outcome)


class _Checkpoints:
    """Each simulated party's own checkpoint, written in its own node folder (never in the run folder)."""

    def __init__(self, homes: dict[str, Any], run_id: str, spec_sha256: str) -> None:
        self.homes, self.run_id, self.spec_sha256 = homes, run_id, spec_sha256

    def path(self, party: str) -> Path:
        return Path(self.homes[party].root) / "vertical" / self.run_id / "checkpoint.json"

    def write(self, done: int, bodies: dict[str, dict[str, Any]]) -> None:
        for party, body in bodies.items():
            path = self.path(party)
            path.parent.mkdir(parents=True, exist_ok=True)
            doc = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "spec_sha256": self.spec_sha256, "party": party, "done": int(done), **body}
            _write(path, json.dumps(doc))

    def read(self, parties: Sequence[str]) -> dict[str, dict[str, Any]]:
        docs = {}
        for party in parties:
            path = self.path(party)
            try:
                doc = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise ConfigError(f"--resume: no checkpoint of {party} at {path} ({type(exc).__name__}); the run stopped before its first tree "
                                  "(iteration) ended: run it again") from None
            want = {"format": CHECKPOINT_FORMAT, "run_id": self.run_id, "spec_sha256": self.spec_sha256, "party": party}
            for k, w in want.items():
                got = doc.get(k) if isinstance(doc, dict) else None
                if got != w:
                    raise ConfigError(f"--resume: {path}: {k}: expected {w!r}, got {got!r}")
            if isinstance(doc.get("done"), bool) or not isinstance(doc.get("done"), int) or doc["done"] < 1:
                raise ConfigError(f"--resume: {path}: done: expected an int >= 1, got {doc.get('done')!r}")
            docs[party] = doc
        return docs

    def remove(self, parties: Sequence[str]) -> None:
        for party in parties:
            self.path(party).unlink(missing_ok=True)


def _resume_point(out_dir: Path, spec_sha256: str) -> str:
    """The run id of the failed or interrupted vertical run in ``out_dir`` (refused if it completed or ran another spec)."""
    try:
        old = VerticalSummary.model_validate_json((out_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: expected the summary.json of a failed or interrupted vertical run in {out_dir}, got none "
                          f"({type(exc).__name__})") from None
    if old.status == "completed":
        raise ConfigError(f"--resume: the run {old.run_id} in {out_dir} completed; there is nothing to resume")
    if old.spec.sha256 != spec_sha256:
        raise ConfigError(f"--resume: the spec differs from the interrupted run's (spec.sha256 {old.spec.sha256[:12]}..., got {spec_sha256[:12]}...)")
    return old.run_id


class _TreeProgress:
    def __init__(self, n: int, show: bool, *, label: str = "SecureBoost", unit: str = "trees") -> None:
        self.n, self.show, self.label, self.unit = n, show, label, unit
        self._p: Any = None

    def __enter__(self) -> _TreeProgress:
        if self.show:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._p = Progress(TextColumn(self.label), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit), TimeElapsedColumn(), transient=True)
            self._p.start()
            self._task = self._p.add_task("trees", total=self.n)
        return self

    def tree(self, t: int) -> None:
        if self._p is not None:
            self._p.update(self._task, completed=t + 1)

    def __exit__(self, *exc: object) -> None:
        if self._p is not None:
            self._p.stop()


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------ scoring


def predict_vertical(run_dir: str | Path, files: dict[str, str | Path], *, nodes: str | Path | None = None) -> Any:
    """Score new records jointly with a vertical run's model: PSI on the new ids, then each party's part.

    ``files``: party -> its file of new rows (the id column and its own columns; no label needed).
    Each party's part of the model is read from its own node folder; the passive party evaluates
    its own splits (or its partial logits) and only that leaves it, recorded in its node's ledger
    (and the PSI releases in both), checked against its policy as in training. Returns a
    DataFrame (id, score, predicted) of the common ids, at the label holder.
    """
    import pandas as pd

    from fedcollab.core import ConfigError, validate_config
    from fedcollab.node import NodeHome
    from fedcollab.protocols.vertical import PartialLogits, active_lr_predict, passive_lr_predict
    from fedcollab.spec import SourceSpec, parse_spec

    run = Path(run_dir)
    try:
        summary = json.loads((run / "summary.json").read_text())
        spec = parse_spec(json.loads((run / "spec.json").read_text()), source=str(run / "spec.json"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--model: expected a vertical run folder with summary.json and spec.json, got {run} ({type(exc).__name__})") from None
    if not isinstance(summary, dict) or summary.get("layout") != "vertical" or summary.get("status") != "completed":
        got = (summary.get("layout"), summary.get("status")) if isinstance(summary, dict) else (None, None)
        raise ConfigError(f"--model: {run} is not a completed vertical run (layout {got[0]!r}, status {got[1]!r})")
    validate_config(VerticalSummary, summary, what=f"--model: {run / 'summary.json'}")  # each problem by field
    v = spec.vertical
    assert v is not None
    a_name = summary["label_holder"]
    p_names = summary.get("passive_parties") or [summary["passive_party"]]
    if set(files) != {a_name, *p_names}:
        raise ConfigError(f"--data / --party-data: expected files for {a_name!r} (label holder) and {p_names}, got {sorted(files)}")
    a = load_vertical_party(spec, a_name, source=SourceSpec(path=str(Path(files[a_name]).resolve())), scoring=True)
    ps = [load_vertical_party(spec, n, source=SourceSpec(path=str(Path(files[n]).resolve())), scoring=True) for n in p_names]
    parts = summary["model_parts"]
    trained = summary["run_id"]  # letters, digits and dashes: checked by VerticalSummary above
    homes = {name: NodeHome(Path(nodes) / name if nodes is not None else Path(parts[name]["path"]).parents[2]) for name in (a_name, *p_names)}
    docs = {}
    for name in (a_name, *p_names):
        # Each part is read from its party's node folder (``--nodes`` or where the run wrote it), never from elsewhere.
        path = homes[name].root / "vertical" / trained / Path(parts[name]["path"]).name
        if Path(parts[name]["path"]).name not in ("model.json", "lookup.json", "weights.json"):
            raise ConfigError(f"--model: model_parts.{name}.path: expected model.json, lookup.json or weights.json, got {Path(parts[name]['path']).name!r}")
        if not path.is_file():
            raise ConfigError(f"{name}: no model part at {path} (is --nodes the folder holding {name}'s node?)")
        text = path.read_text()
        if hashlib.sha256(text.encode()).hexdigest() != parts[name]["sha256"]:
            raise ConfigError(f"{path}: the model part differs from the one the run wrote (sha256 mismatch)")
        docs[name] = json.loads(text)
    run_id = "score-" + uuid.uuid4().hex[:10]
    gates = {name: h.gate(name, h.dataset()) for name, h in homes.items()}
    for name, h in homes.items():
        pol = h.policy()
        gate = gates[name]
        runs = psi_runs_joined(gate)
        if not pol.vertical.allowed or runs >= pol.vertical.max_psi_runs:
            gate.refuse_request(run_id=run_id, round=0, code=int(NodeErrorCode.POLICY_REFUSED), reason="vertical scoring refused by the policy")
            raise PolicyRefused(f"{name}: the policy refuses this scoring run (vertical.allowed, or {runs} PSI runs of "
                                f"{pol.vertical.max_psi_runs} allowed)")
    domain = b"fedcollab/vertical-score/v1|" + spec.name.encode() + b"|" + run_id.encode()
    ia, rows, psi_rel = align_parties(a, ps, domain, align=None)
    for r in psi_rel:
        gates[r.party].record(r, run_id=run_id, payload=json.dumps(r.details, sort_keys=True).encode())
    # As in training: a party answers for no fewer common records than its policy's minimum (a batch of
    # one or two ids would single out those people's splits), refused before any decision leaves it.
    # Every party whose policy refuses records its own refusal.
    need_by = {name: h.policy().vertical.min_intersection for name, h in homes.items()}
    short = {name: need for name, need in need_by.items() if len(ia) < need}
    for name in short:
        gates[name].refuse_request(run_id=run_id, round=0, code=int(NodeErrorCode.POLICY_REFUSED),
                                   reason="scoring intersection below the policy's vertical.min_intersection")
    if short:
        name, need = next(iter(short.items()))
        raise PolicyRefused(f"{name}: vertical.min_intersection: the scoring files share {len(ia)} id(s), "
                            f"fewer than the {need} {name}'s policy requires" + (f" (also refused by {', '.join(list(short)[1:])})" if len(short) > 1 else ""))
    xa = a.x[ia]
    if docs[a_name]["format"] == "fedcollab-secureboost-v1":
        model = model_from_document(docs[a_name], what=f"{a_name}'s model.json")
        dec: dict[tuple[int, int], np.ndarray] = {}
        for q in ps:  # each passive party evaluates its own splits at its own node; only left/right leaves it
            table = table_from_document(docs[q.partner], what=f"{q.partner}'s lookup.json")
            mine = passive_decisions(table, q.x[rows[q.partner]])
            ev = Release(kind="vertical_partition", about="test", unit="record", observer="label_holder", added_by=q.partner, party=q.partner,
                         round=0, mechanism=NonPrivate(), declared_public=True, details={"rows": int(len(ia)), "splits": len(mine), "joint_prediction": True})
            gates[q.partner].record(ev, run_id=run_id, payload=b"".join(np.asarray(x, dtype=bool).tobytes() for _, x in sorted(mine.items())))
            dec.update(mine)
        prob = 1.0 / (1.0 + np.exp(-active_margin(model, xa, None, dec)))
    else:
        total = np.zeros(len(ia))
        for q in ps:  # each passive party's partial logits on the common records, recorded at its node first
            msg, ev = passive_lr_predict(q.partner, np.array(docs[q.partner]["weights"]), scale_to_unit(spec, q, q.x[rows[q.partner]]))
            gates[q.partner].record(ev, run_id=run_id, payload=msg.values.tobytes())
            total += msg.values
        prob = active_lr_predict(np.append(np.array(docs[a_name]["weights"]), docs[a_name]["intercept"]), scale_to_unit(spec, a, xa),
                                 PartialLogits(rows=len(ia), values=total))
    ids = [a.ids[i] for i in ia]
    return pd.DataFrame({v.id_column: ids, "score": prob, "predicted": (prob >= 0.5).astype(int)})
