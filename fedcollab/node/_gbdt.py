"""The node's adapter for federated GBDT (``[model] kind = "gbdt"``): thin, over ``fedcollab.protocols.gbdt``.

Per tree step the coordinator sends a ``query`` of kind ``gbdt`` carrying a level request (and,
on a tree's first step after the first tree, the previous finished tree, which the node adds to
its margins). The node checks the request against its own plan (``node_reply`` refuses a
repeated, skipped or unplanned step), builds the (noisy) per-bin sums, records the release in its
ledger against its budget, and only then answers and advances its state. Under
``aggregation = "secagg"`` the sums never leave in the clear: they are fixed-point encoded and
wait in the node folder for the step's SecAgg+ stages (the step number is the secure-aggregation round;
every step's vector has the fixed length ``secagg_length``, zero-padded).

With ``bin_edges = "quantile"`` the run's first step is a ``gbdt`` record of kind
``sketch_request``: the node releases its (noisy) count sketch once (under secagg masked, as the
run's first SecAgg+ round, like a step's sums), and the first tree's first
step carries the coordinator's edges (``gbdt.edges``), which the node checks against the public
grid before re-binning its rows; any other order is refused.

The node's tree state (margins, row positions, gradients, steps answered, quantile edges) lives in its folder
(``gbdt/<run id>.npz``, mode 0600), so the same code serves simulation and deployment. The DP
plan comes from the node's own spec (public parameters only), never from the request; the noise
from a generator seeded from OS entropy.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import NodeErrorCode, ProtocolError, write_private
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols import gbdt
from fedcollab.spec import Spec


def _state_path(home: Path, run_id: str) -> Path:
    return home / "gbdt" / f"{run_id}.npz"


def layout_of_edges(spec: Spec, edge_index: tuple[tuple[int, ...], ...] | None) -> gbdt.BinLayout:
    """The bins the node uses: the public layout, or the quantile edges (grid indices) it accepted."""
    public = gbdt.layout_of(spec)
    sk = gbdt.sketch_of(spec)
    if edge_index is None or sk is None:
        return public
    return gbdt.layout_from_sketch(public, sk, edge_index, n_bins=gbdt.params_of(spec).n_bins)


def load_state(home: Path, run_id: str, x_train: np.ndarray, y_train: np.ndarray, spec: Spec) -> gbdt.NodeState:
    """This run's state at the node, or a fresh one (binned rows, margin ``logit(base_score)``)."""
    base = gbdt.params_of(spec).base_score
    path = _state_path(home, run_id)
    if not path.exists():
        return gbdt.node_init(x_train, y_train, layout=gbdt.layout_of(spec), base_score=base)
    with np.load(path) as z:
        steps = frozenset((int(a), int(b)) for a, b in z["steps_done"].reshape(-1, 2))
        raw = json.loads(str(z["edge_index"])) if "edge_index" in z.files else None
        saved = dict(margin=z["margin"], position=z["position"], g=z["g"], h=z["h"], trees_done=int(z["trees_done"]),
                     steps_done=steps, leaves_released=bool(z["leaves_released"]),
                     sketched=bool(z["sketched"]) if "sketched" in z.files else False,
                     edge_index=tuple(tuple(i) for i in raw) if raw is not None else None,
                     tree_digests=tuple(json.loads(str(z["tree_digests"]))) if "tree_digests" in z.files else ())
    # The rows are binned once, with the edges this node accepted (or the public ones).
    layout = layout_of_edges(spec, saved["edge_index"])
    return replace(gbdt.node_init(x_train, y_train, layout=layout, base_score=base), **saved)


def save_state(home: Path, run_id: str, state: gbdt.NodeState) -> None:
    """Write the state (mode 0600; the rows' bins are recomputed from the data, never stored)."""
    buf = io.BytesIO()
    steps = np.array(sorted(state.steps_done), dtype=np.int64).reshape(-1, 2)
    np.savez(buf, margin=state.margin, position=state.position, g=state.g, h=state.h, trees_done=np.asarray(state.trees_done),
             steps_done=steps, leaves_released=np.asarray(state.leaves_released), sketched=np.asarray(state.sketched),
             edge_index=np.asarray(json.dumps(state.edge_index)), tree_digests=np.asarray(json.dumps(list(state.tree_digests))))
    write_private(_state_path(home, run_id), buf.getvalue())


def drop_state(home: Path, run_id: str) -> None:
    """Forget the run's tree state (at close)."""
    _state_path(home, run_id).unlink(missing_ok=True)


def step(node: Any, request_wire: dict[str, Any], apply_wire: dict[str, Any] | None, *, max_rows: float | None = None,
         n_parties: int | None = None, edges_wire: dict[str, Any] | None = None, resume_wire: dict[str, Any] | None = None,
         resume_after: int = 0, catchup_wire: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str], np.ndarray | None]:
    """Answer one level request: ``(reply record, ledger lines, secagg vector or None)``.

    ``apply_wire``: the previous finished tree (required with the first step of every tree but
    the first). With ``max_rows`` and ``n_parties`` (secagg) the values are encoded for SecAgg+
    and the reply holds only the header. ``edges_wire``: the quantile edges, with the first tree's
    first step. ``resume_after = k``: this Flower run resumes the run after its k-th tree (the
    node's own setup said so), so this first step must carry the k checkpointed trees
    (``resume_wire``, an ensemble record) instead of a finished tree; the node rebuilds its
    margins from them if it recognises them (:func:`fedcollab.protocols.gbdt.node_resume`). A
    resume record at any other step is refused. ``catchup_wire``: every finished tree, sent to a
    node the coordinator re-admits at a tree's first step after it went silent (plain aggregation);
    accepted only at level 0 of the tree after them, and never with fewer trees than the node
    applied. The release is recorded (policy and budget checked) before the state advances or
    anything leaves.
    """
    spec, d, home = node.spec, node.data, Path(node.home.root)
    params, plan, sk = gbdt.params_of(spec), gbdt.plan_of(spec), gbdt.sketch_of(spec)
    state = load_state(home, node.run_id, d.x_train, d.y_train, spec)
    layout = layout_of_edges(spec, state.edge_index)
    if gbdt.is_sketch_request(request_wire):
        try:
            if sk is None or apply_wire is not None or edges_wire is not None:
                raise ProtocolError("gbdt: a sketch request where the node's spec has no quantile sketch")
            state, values, release = gbdt.node_sketch(state, d.x_train, party=node.partner, sketch=sk, plan=plan,
                                                      rng=fresh_generator() if plan is not None else None)
        except ProtocolError as exc:
            node._refuse_coded(NodeErrorCode.BAD_REQUEST, "gbdt request outside the node's plan", log_text=str(exc))
        if max_rows is not None:
            # Under secagg the sketch leaves only masked, in the step's SecAgg+ round, like the histograms.
            vector = _secagg_vector(spec, values, bound=gbdt.sketch_bound(spec, int(max_rows)), n_rows=d.n_train,
                                    max_rows=max_rows, n_parties=n_parties)
            wire, payload = {**gbdt.sketch_reply_wire(values), "values": []}, vector.tobytes()
        else:
            vector, wire, payload = None, gbdt.sketch_reply_wire(values), np.ascontiguousarray(values).tobytes()
        release = release.model_copy(update={"details": {**release.details, "aggregation": spec.aggregation}})
        line = node.gate.record(release, run_id=node.run_id, payload=payload).decode()
        save_state(home, node.run_id, state)
        return wire, [line], vector
    try:
        if resume_after:
            if resume_wire is None or apply_wire is not None or edges_wire is not None:
                raise ProtocolError("gbdt: a resumed run's first tree step must carry the checkpointed trees, and only them")
            trees = gbdt.ensemble_from_wire(resume_wire, spec).trees
            if len(trees) != resume_after:
                raise ProtocolError(f"gbdt: the run resumes after {resume_after} trees, the request carries {len(trees)}")
            state = gbdt.node_resume(state, trees, layout=layout, base_score=params.base_score)
        elif resume_wire is not None:
            raise ProtocolError("gbdt: checkpointed trees arrive only with a resumed run's first tree step")
        if catchup_wire is not None:
            request0 = gbdt.LevelRequest.from_wire(request_wire)
            trees = gbdt.ensemble_from_wire(catchup_wire, spec).trees
            if resume_after or apply_wire is not None or edges_wire is not None or request0.level != 0 or len(trees) != request0.tree:
                raise ProtocolError("gbdt: the finished trees of a catch-up come alone, with the first step of the tree after them")
            state = gbdt.node_resume(state, trees, layout=layout, base_score=params.base_score, catch_up=True)
        if sk is not None and state.edge_index is None:
            # The first tree step of a quantile run must carry the edges (checked on the public grid).
            if edges_wire is None:
                raise ProtocolError("gbdt: the first tree step of a quantile run must carry the edges")
            state, layout = gbdt.node_set_edges(state, d.x_train, gbdt.edges_from_wire(edges_wire), public=gbdt.layout_of(spec), sketch=sk,
                                                n_bins=params.n_bins)
        elif edges_wire is not None:
            raise ProtocolError("gbdt: edges arrive once, with the first tree step of a quantile run")
        request = gbdt.LevelRequest.from_wire(request_wire)
        if apply_wire is not None:
            if request.level != 0 or state.trees_done != request.tree - 1 or not state.leaves_released:
                raise ProtocolError("gbdt: a finished tree arrives only with the next tree's first step")
            state = gbdt.node_apply_tree(state, gbdt.Tree.from_wire(apply_wire), layout=layout)
        elif state.leaves_released:
            raise ProtocolError("gbdt: the next tree's first step must carry the finished tree")
        rng = fresh_generator() if plan is not None else None
        state, reply, release = gbdt.node_reply(state, request, party=node.partner, layout=layout, params=params, plan=plan, rng=rng)
    except ProtocolError as exc:
        # Out of the node's plan (a repeat, a skipped step, a histogram the plan does not make, a malformed
        # request): a recorded refusal; the details stay in this node's log.
        node._refuse_coded(NodeErrorCode.BAD_REQUEST, "gbdt request outside the node's plan", log_text=str(exc))
    vector = None
    if max_rows is not None:
        vector = _secagg_vector(spec, reply.values, bound=gbdt.cell_bound(spec, int(max_rows)), n_rows=d.n_train,
                                max_rows=max_rows, n_parties=n_parties)
        wire = {**reply.to_wire(), "values": []}
        payload = vector.tobytes()
    else:
        wire = reply.to_wire()
        payload = np.ascontiguousarray(reply.values).tobytes()
    release = release.model_copy(update={"details": {**release.details, "aggregation": spec.aggregation}})
    line = node.gate.record(release, run_id=node.run_id, payload=payload).decode()
    save_state(home, node.run_id, state)
    return wire, [line], vector


def _secagg_vector(spec: Any, values: np.ndarray, *, bound: float, n_rows: int, max_rows: float, n_parties: int | None) -> np.ndarray:
    """A release as its SecAgg+ input: fixed point modulo 2^64, zero-padded to the run's fixed ``secagg_length``."""
    if n_parties is None or not (n_rows <= max_rows and 3 <= n_parties <= len(spec.partners)):
        raise ProtocolError("gbdt: secagg encoding parameters out of range")
    encoded = gbdt.encode_histograms(values, bound=bound, scale=gbdt.SECAGG_SCALE, n_parties=n_parties)
    length = gbdt.secagg_length(spec)
    if encoded.size > length:
        raise ProtocolError("gbdt: a release longer than the secagg length")
    vector = np.zeros(length, dtype=np.uint64)
    vector[:encoded.size] = encoded
    return vector


__all__ = ["drop_state", "layout_of_edges", "load_state", "save_state", "step"]
