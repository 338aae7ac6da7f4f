"""The node's adapter for federated GBDT (``[model] kind = "gbdt"``): thin, over ``fedcollab.protocols.gbdt``.

Per tree step the coordinator sends a ``query`` of kind ``gbdt`` carrying a level request (and,
on a tree's first step after the first tree, the previous finished tree, which the node adds to
its margins). The node checks the request against its own plan (``node_reply`` refuses a
repeated, skipped or unplanned step), builds the (noisy) per-bin sums, records the release in its
ledger against its budget, and only then answers and advances its state. Under
``aggregation = "secagg"`` the sums never leave in the clear: they are fixed-point encoded and
wait in the node folder for the step's SecAgg+ stages (the step number is the secure-aggregation round;
every step's vector has the fixed length ``secagg_length``, zero-padded).

The node's tree state (margins, row positions, gradients, steps answered) lives in its folder
(``gbdt/<run id>.npz``, mode 0600), so the same code serves simulation and deployment. The DP
plan comes from the node's own spec (public parameters only), never from the request; the noise
from a generator seeded from OS entropy.
"""

from __future__ import annotations

import io
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


def load_state(home: Path, run_id: str, x_train: np.ndarray, y_train: np.ndarray, spec: Spec) -> gbdt.NodeState:
    """This run's state at the node, or a fresh one (binned rows, margin ``logit(base_score)``)."""
    fresh = gbdt.node_init(x_train, y_train, layout=gbdt.layout_of(spec), base_score=gbdt.params_of(spec).base_score)
    path = _state_path(home, run_id)
    if not path.exists():
        return fresh
    with np.load(path) as z:
        steps = frozenset((int(a), int(b)) for a, b in z["steps_done"].reshape(-1, 2))
        return replace(fresh, margin=z["margin"], position=z["position"], g=z["g"], h=z["h"], trees_done=int(z["trees_done"]),
                       steps_done=steps, leaves_released=bool(z["leaves_released"]))


def save_state(home: Path, run_id: str, state: gbdt.NodeState) -> None:
    """Write the state (mode 0600; the rows' bins are recomputed from the data, never stored)."""
    buf = io.BytesIO()
    steps = np.array(sorted(state.steps_done), dtype=np.int64).reshape(-1, 2)
    np.savez(buf, margin=state.margin, position=state.position, g=state.g, h=state.h, trees_done=np.asarray(state.trees_done),
             steps_done=steps, leaves_released=np.asarray(state.leaves_released))
    write_private(_state_path(home, run_id), buf.getvalue())


def drop_state(home: Path, run_id: str) -> None:
    """Forget the run's tree state (at close)."""
    _state_path(home, run_id).unlink(missing_ok=True)


def step(node: Any, request_wire: dict[str, Any], apply_wire: dict[str, Any] | None, *, max_rows: float | None = None,
         n_parties: int | None = None) -> tuple[dict[str, Any], list[str], np.ndarray | None]:
    """Answer one level request: ``(reply record, ledger lines, secagg vector or None)``.

    ``apply_wire``: the previous finished tree (required with the first step of every tree but
    the first). With ``max_rows`` and ``n_parties`` (secagg) the values are encoded for SecAgg+
    and the reply holds only the header. The release is recorded (policy and budget checked)
    before the state advances or anything leaves.
    """
    spec, d, home = node.spec, node.data, Path(node.home.root)
    layout, params, plan = gbdt.layout_of(spec), gbdt.params_of(spec), gbdt.plan_of(spec)
    state = load_state(home, node.run_id, d.x_train, d.y_train, spec)
    try:
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
        assert n_parties is not None
        if not (d.n_train <= max_rows and 3 <= n_parties <= len(spec.partners)):
            raise ProtocolError("gbdt: secagg encoding parameters out of range")
        encoded = gbdt.encode_histograms(reply.values, bound=gbdt.cell_bound(spec, int(max_rows)), scale=gbdt.SECAGG_SCALE, n_parties=n_parties)
        length = gbdt.secagg_length(spec)
        if encoded.size > length:
            raise ProtocolError("gbdt: a release longer than the secagg length")
        vector = np.zeros(length, dtype=np.uint64)
        vector[:encoded.size] = encoded
        wire = {**reply.to_wire(), "values": []}
        payload = vector.tobytes()
    else:
        wire = reply.to_wire()
        payload = np.ascontiguousarray(reply.values).tobytes()
    release = release.model_copy(update={"details": {**release.details, "aggregation": spec.aggregation}})
    line = node.gate.record(release, run_id=node.run_id, payload=payload).decode()
    save_state(home, node.run_id, state)
    return wire, [line], vector


__all__ = ["drop_state", "load_state", "save_state", "step"]
