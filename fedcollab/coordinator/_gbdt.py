"""The coordinator's adapter for federated GBDT: drive the tree steps of ``fedcollab.protocols.gbdt`` over Flower.

One tree is one *round* of the run (one line of metrics.jsonl). Each tree takes a few *steps*
(numbered 1, 2, ... across the run); a step is one ``train`` message per node carrying a level
request (and, on a tree's first step, the previous finished tree), answered with the node's
(noisy) per-bin sums. With ``aggregation = "plain"`` the coordinator sums the replies; with
``"secagg"`` the sums ride masked on the same message (the step is the SecAgg+ round) and the
coordinator only ever sees their total, in three exchanges a step: train + MASKED_INPUT + the next
step's ADVERTISE, CONSISTENCY + the next step's SHARE, UNMASK.

With ``bin_edges = "quantile"`` step 1 asks every node for its count sketch (under secagg the
step's SecAgg+ round, so the coordinator sees only the pooled sketch); it sets the edges at the
pooled quantiles and sends them with the first tree's first step (``gbdt.edges``); the trees'
steps then start at 2.

After every tree but the last the coordinator checkpoints the finished trees, the step number and
the edges. A resumed run (``--resume``) continues from there under the same run id: its first
step carries the trees back (``gbdt.resume``), each node rebuilds its margins from the trees it
recognises, and the steps after the checkpoint are answered again as new, charged releases.

A node that fails or does not answer a step drops out (its tree state no longer matches the
trees); the run goes on while ``training.min_partners`` are left. Under plain aggregation a node
that went *silent* (no reply, no error code) is asked again at every next tree's first step, with
every finished tree (``gbdt.catchup``) so that it rebuilds its margins; if it answers, it is back
for the rest of the run (a node that refused with a code is not asked again; under secagg a
dropped node stays out: the next SecAgg+ round opens before the tree starts). After the last tree
every node evaluates the finished model on its test split, as for the other models.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from fedcollab.core import NodeError, ProtocolError, get_logger
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols import gbdt, secagg
from fedcollab.protocols.wire import RecordKey
from fedcollab.coordinator._secagg import start_round
from fedcollab.spec import Spec

log = get_logger("coordinator.gbdt")

_METRICS = ("n", "correct", "loss_sum", "hist_pos", "hist_neg")


def gbdt_rounds(spec: Spec, *, node_names: dict[int, str], exchange: Callable[..., dict[str, Any]], send_stage: Callable[[int], Any],
                roster_keys: dict[str, str], run_id: str, max_rows: float, min_partners: int, message_type: Any,
                record: Callable[[int, float, list[str], dict[str, int], dict[str, dict[str, Any]]], None],
                failures: dict[str, list[int]], checkpoint: Callable[[int, dict[str, np.ndarray]], None] | None = None,
                resume: tuple[int, dict[str, np.ndarray]] | None = None) -> gbdt.Ensemble:
    """Build every tree, evaluate the model, and return it.

    ``exchange(rnd, message_type, {partner: (arrays, cfg, extra records)}) -> {partner: reply}``;
    ``send_stage(rnd)`` -> ``send(stage, {partner: request})`` for a stand-alone secagg stage;
    ``record(tree, t0, trained, failed, parts)`` writes one round record per tree;
    ``checkpoint(trees_done, arrays)`` keeps the finished trees after each tree but the last (``gbdt.checkpoint_arrays``).
    ``resume = (k, arrays)``: continue after the k-th tree from such a checkpoint; the first step
    brings the k trees back to every node (``gbdt.resume``), which rebuilds its margins from them.
    """
    params, layout, plan = gbdt.params_of(spec), gbdt.layout_of(spec), gbdt.plan_of(spec)
    rng = fresh_generator()  # random splits (dp_split = "random") come from the coordinator's CSPRNG-seeded generator
    secure = spec.aggregation == "secagg"
    length = gbdt.secagg_length(spec)
    n_parties = len(node_names)
    active = sorted(node_names.values())
    trees: list[gbdt.Tree] = []
    readmit: set[str] = set()  # plain: nodes that went silent at a tree step, asked again at each next tree's first step
    step = 0
    routed: dict[str, Any] = {}
    state: Any = None

    def open_round(rnd: int, participants: list[str]) -> tuple[Any, dict[str, Any]]:
        return start_round(spec, run_id=run_id, round_=rnd, participants=participants, length=length, bits=64, roster_keys=roster_keys)

    def shares_for(rnd: int, st: Any, advertised: dict[str, dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
        st, per_node = secagg.coord_collect_advertisements(st, {p: secagg.Advertisement.from_wire(w) for p, w in advertised.items()})
        bundles = send_stage(rnd)("share", {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()})
        return secagg.coord_route_shares(st, {p: secagg.ShareBundle.from_wire(w) for p, w in bundles.items()})

    def dropped(rnd: int, answered: set[str], why: str) -> dict[str, int]:
        nonlocal active
        gone = {p: (failures.get(p) or [0])[-1] for p in active if p not in answered}
        active = sorted(answered)
        if len(active) < min_partners:
            raise NodeError(f"gbdt step {rnd}: {len(active)} partner(s) {why}, at least {min_partners} needed", codes=gone,
                            problems=[f"{k}: code {v}" for k, v in gone.items()])
        return gone

    def secure_step(step: int, cfg: dict[str, Any], extra: dict[str, dict[str, Any]], *, last: bool) -> tuple[np.ndarray, dict[str, int]]:
        """One step's sums under SecAgg+, in three exchanges: train + MASKED_INPUT(step) + ADVERTISE(step + 1);
        CONSISTENCY(step) + SHARE(step + 1); UNMASK(step). The next step's keys are fresh and its shares are
        routed before its masked input, as in a stand-alone round; only the messages are shared."""
        nonlocal state, routed, active
        failed: dict[str, int] = {}
        nxt = None if last else open_round(step + 1, sorted(routed))
        cfg = cfg | {"secagg.stage": "masked", "secagg.round": step, "secagg.max_weight": max_rows, "secagg.n_parties": n_parties}
        per: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]] = {}
        for p, m in routed.items():
            c: dict[str, Any] = dict(cfg)
            ex: dict[str, dict[str, Any]] = {**extra, "secagg": m.to_wire()}
            if nxt is not None:
                c |= {"secagg.next.stage": "advertise", "secagg.next.round": step + 1}
                ex["secagg.next"] = nxt[1]
            per[p] = (None, c, ex)
        got = exchange(step, message_type.TRAIN, per)
        masked = {p: secagg.MaskedInput.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items()
                  if "secagg" in m.content.config_records}
        failed |= dropped(step, set(masked), "sent masked sums")
        state, checks = secagg.coord_collect_masked(state, masked)
        share_req: dict[str, dict[str, Any]] = {}
        if nxt is not None:
            ads = {p: secagg.Advertisement.from_wire(dict(m.content.config_records["secagg.next"])) for p, m in got.items()
                   if p in masked and "secagg.next" in m.content.config_records}
            next_state, per_node = secagg.coord_collect_advertisements(nxt[0], ads)
            share_req = {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()}
        per = {}
        for p, chk in checks.items():
            c = {"fedcollab.kind": "secagg", "fedcollab.run_id": run_id, "secagg.stage": "consistency", "secagg.round": step}
            ex = {"secagg": chk.to_wire()}
            if p in share_req:
                c |= {"secagg.next.stage": "share", "secagg.next.round": step + 1}
                ex["secagg.next"] = share_req[p]
            per[p] = (None, c, ex)
        got = exchange(step, message_type.QUERY, per)
        signed = {p: secagg.ConsistencySignature.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items()
                  if "secagg" in m.content.config_records}
        bundles = {p: secagg.ShareBundle.from_wire(dict(m.content.config_records["secagg.next"])) for p, m in got.items()
                   if "secagg.next" in m.content.config_records}
        state, requests = secagg.coord_collect_signatures(state, signed)
        per = {}
        for p, r in requests.items():
            c = {"fedcollab.kind": "secagg", "fedcollab.run_id": run_id, "secagg.stage": "unmask", "secagg.round": step}
            per[p] = (None, c, {"secagg": r.to_wire()})
        got = exchange(step, message_type.QUERY, per)
        revealed = {p: secagg.RevealedShares.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items()
                    if "secagg" in m.content.config_records}
        state, total_q = secagg.coord_unmask(state, revealed)
        failed |= dropped(step, set(state.survivors), "are in the secure sum")
        if nxt is not None:
            state, routed = secagg.coord_route_shares(next_state, bundles)
            active = sorted(set(active) & set(routed))
            routed = {p: routed[p] for p in active}
        return np.asarray(total_q), failed

    sketch = gbdt.sketch_of(spec)
    edges_wire: dict[str, Any] | None = None
    pre_failed: dict[str, int] = {}
    if resume is not None:
        done, step, edges_wire = gbdt.from_checkpoint(resume[1], spec, trees_done=int(resume[0]))
        trees.extend(done)
        if edges_wire is not None:
            layout = gbdt.layout_from_sketch(layout, sketch, gbdt.edges_from_wire(edges_wire), n_bins=params.n_bins)  # type: ignore[arg-type]
    if secure:
        # The first SecAgg+ round opens stand-alone (later ones ride on the previous step); a resumed run's with fresh keys.
        state, request = open_round(step + 1, active)
        state, routed = shares_for(step + 1, state, send_stage(step + 1)("advertise", {p: request for p in state.cfg.participants}))
        active = sorted(routed)
    if sketch is not None and resume is None:
        # Step 1: every node's (noisy) count sketch; summed in the clear, or under secagg as the step's SecAgg+ round.
        step = 1
        cfg0: dict[str, Any] = {"fedcollab.kind": "gbdt", "fedcollab.run_id": run_id, "server-round": step}
        extra0 = {"gbdt": gbdt.sketch_request_wire()}
        shape0 = (len(sketch.features), sketch.n_cells)
        if secure:
            total_q, pre_failed = secure_step(step, cfg0, extra0, last=False)
            total0 = gbdt.decode_histograms(total_q[:int(np.prod(shape0))], shape=shape0, scale=gbdt.SECAGG_SCALE)
        else:
            got = exchange(step, message_type.TRAIN, {p: (None, cfg0, extra0) for p in active})
            counts = {}
            for p, m in got.items():
                try:
                    counts[p] = gbdt.sketch_reply_from_wire(dict(m.content.config_records["gbdt"]), sketch)
                except (KeyError, ProtocolError):
                    log.warning("partner %s sent a malformed gbdt sketch; it is left out", p)
            pre_failed = dropped(step, set(counts), "sent their sketch")
            total0 = np.sum([counts[p] for p in sorted(counts)], axis=0)
        if not np.all(np.isfinite(total0)):
            raise ProtocolError("gbdt step 1: the summed sketch is not finite")
        indices = gbdt.edges_from_sketch(total0, sketch, n_bins=params.n_bins)
        layout = gbdt.layout_from_sketch(layout, sketch, indices, n_bins=params.n_bins)
        edges_wire = gbdt.edges_to_wire(indices)

    def trees_wire() -> dict[str, Any]:
        """Every finished tree as one ensemble record (a resumed run's gbdt.resume, a re-admitted node's gbdt.catchup)."""
        return gbdt.ensemble_to_wire(gbdt.Ensemble(trees=tuple(trees), base_score=params.base_score, feature_names=layout.feature_names))

    first_tree = len(trees)  # 0, or the trees a resumed run brings back
    for t in range(first_tree, params.n_trees):
        t0 = time.perf_counter()
        failed: dict[str, int] = dict(pre_failed) if t == 0 else {}
        resuming = resume is not None and t == first_tree
        gt, req = gbdt.coordinator_start_tree(t, layout=layout, params=params, plan=plan, rng=rng)
        tree = None
        first = True
        while req is not None:
            step += 1
            cfg: dict[str, Any] = {"fedcollab.kind": "gbdt", "fedcollab.run_id": run_id, "server-round": step}
            extra: dict[str, dict[str, Any]] = {"gbdt": req.to_wire()}
            if first and resuming:
                extra["gbdt.resume"] = trees_wire()
            elif first and trees:
                extra["gbdt.apply"] = trees[-1].to_wire()
            if first and t == 0 and edges_wire is not None:
                extra["gbdt.edges"] = edges_wire
            if req.release == "leaves":
                shape: tuple[int, ...] = (len(req.open), 2)
            else:
                shape = (len(req.open), layout.n_slots, 2)
            if not secure:
                per = {p: (None, cfg, extra) for p in active}
                if first and trees and not resuming:
                    # Re-admission: a node that went silent gets every finished tree (gbdt.catchup) instead of the last.
                    rest = {k: v for k, v in extra.items() if k != "gbdt.apply"}
                    per |= {p: (None, cfg, {**rest, "gbdt.catchup": trees_wire()}) for p in sorted(readmit)}
                codes_before = {p: len(failures.get(p, [])) for p in per}
                got = exchange(step, message_type.TRAIN, per)
                replies = {}
                for p, m in got.items():
                    try:
                        rep = gbdt.HistogramReply.from_wire(dict(m.content.config_records["gbdt"]))
                        if (rep.tree, rep.level, rep.release, rep.values.shape) != (req.tree, req.level, req.release, shape):
                            raise ProtocolError("a reply to another step")
                    except (KeyError, ProtocolError):
                        log.warning("partner %s sent a malformed gbdt reply at step %d; it is left out", p, step)
                        continue
                    replies[p] = rep.values
                # Silent (no reply, no code) nodes may come back; a node that answered with a code does not.
                silent = {p for p in per if p not in got and len(failures.get(p, [])) == codes_before[p]}
                back = readmit & set(replies)
                readmit = (readmit | (silent & set(active))) - set(replies) - {p for p in per if p not in silent and p not in replies}
                if back:
                    log.info("gbdt step %d: %s re-admitted after catching up on %d trees", step, sorted(back), len(trees))
                failed |= dropped(step, set(replies), "answered")
                total = gbdt.sum_histograms([replies[p] for p in sorted(replies)])
            else:
                last = req.release == "leaves" and t == params.n_trees - 1
                total_q, gone = secure_step(step, cfg, extra, last=last)
                failed |= gone
                total = gbdt.decode_histograms(total_q[:int(np.prod(shape))], shape=shape, scale=gbdt.SECAGG_SCALE)
            if not np.all(np.isfinite(total)):
                raise ProtocolError(f"gbdt step {step}: the summed histograms are not finite")
            gt, req, tree = gbdt.coordinator_step(gt, req, total, layout=layout, params=params, plan=plan)
            first = False
        assert tree is not None
        trees.append(tree)
        if checkpoint is not None and t < params.n_trees - 1:
            checkpoint(t + 1, gbdt.checkpoint_arrays(trees, step=step, edges=edges_wire))
        parts: dict[str, dict[str, Any]] = {}
        model = gbdt.Ensemble(trees=tuple(trees), base_score=params.base_score, feature_names=layout.feature_names)
        if t == params.n_trees - 1:
            # The finished model, evaluated once at every node (its test metrics, as the node's policy bounds them).
            rnd = gbdt.max_steps(spec)
            cfg = {"fedcollab.run_id": run_id, "server-round": rnd}
            got = exchange(rnd, message_type.EVALUATE, {p: (None, cfg, {"gbdt.model": gbdt.ensemble_to_wire(model)}) for p in node_names.values()})
            for p, m in got.items():
                mr = m.content.metric_records.get(RecordKey.METRICS)
                if mr is not None:
                    parts[p] = {k: mr[k] for k in _METRICS}
        record(t + 1, t0, list(active), failed, parts)
    return gbdt.Ensemble(trees=tuple(trees), base_score=params.base_score, feature_names=layout.feature_names)


def empty_arrays() -> OrderedDict[str, np.ndarray]:
    """The round record's model arrays for trees (the model is the ensemble, not arrays)."""
    return OrderedDict()
