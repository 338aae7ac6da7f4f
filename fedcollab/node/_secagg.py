"""The node's side of secure aggregation: encode the update, then answer the five SecAgg+ stages.

The protocol itself is pure (``fedcollab.protocols.secagg``); this module keeps its state in the
node's own Flower context and checks every coordinator request against the node's own copy of
the spec, so a coordinator cannot lower the threshold, shrink the group or replay a round.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcollab.core import PolicyRefused, ProtocolError
from fedcollab.protocols import secagg
from fedcollab.protocols.quantize import clip_vector, encode_update, flatten_arrays
from fedcollab.spec import Spec

BITS = 32


def encode_for_secagg(spec: Spec, *, new: dict[str, np.ndarray], old: dict[str, np.ndarray], weight: float, max_weight: float,
                      n_parties: int, clip_l2: float | None = None) -> np.ndarray:
    """The clipped, weighted, fixed-point update (new - old) with its weight as the last coordinate.

    ``clip_l2`` first clips the update to that L2 norm: ``privacy.partner.clip`` under partner-level
    central DP, ``secagg.clip_l2`` (norm bounding) otherwise. The caller passes the node's own spec
    values, never a coordinator's request.
    """
    names = list(old)
    update = flatten_arrays(new, names) - flatten_arrays(old, names)
    if clip_l2 is not None:
        update = clip_vector(update, bound=clip_l2, norm="l2")
    return encode_update(update, weight=weight, max_weight=max_weight, clip=spec.secagg.clip, scale=spec.secagg.scale,
                         bits=BITS, n_parties=n_parties)


def check_config(spec: Spec, cfg: secagg.SecAggConfig, *, me: str, run_id: str, round_: int, length: int, min_partners: int,
                 bits: int = BITS) -> None:
    """Refuse a round whose public parameters differ from what the spec and the policy allow."""
    n = len(spec.partners)
    problems = []
    if cfg.run_id != run_id or cfg.round != round_:
        problems.append("run or round")
    if me not in cfg.participants or not set(cfg.participants) <= {p.name for p in spec.partners}:
        problems.append("participants")
    # The threshold is the spec's, never lower; fewer tolerated dropouts only make a round abort sooner.
    if cfg.k != spec.secagg.neighbours or cfg.threshold != spec.secagg.resolved_threshold(n) or cfg.max_dropouts > spec.secagg.max_dropouts:
        problems.append("graph or threshold")
    if cfg.bits != bits or cfg.length != length:
        problems.append("encoding")
    if problems:
        raise ProtocolError("secagg parameters differ from the spec: " + ", ".join(problems))
    if len(cfg.participants) < min_partners:
        raise PolicyRefused("fewer partners in the round than the policy's minimum")


def handle_stage(
    kind: str,
    request: dict[str, Any],
    *,
    vector: np.ndarray | None,
    length: int,
    bits: int,
    round_: int,
    state_wire: dict[str, Any] | None,
    spec: Spec,
    me: str,
    run_id: str,
    identity: secagg.NodeIdentity,
    roster_keys: dict[str, str],
    min_partners: int,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Answer one stage of round ``round_``: (new protocol state, reply).

    ``length`` and ``bits`` are what this node expects the round's vector to be (checked at
    ADVERTISE, before the vector exists); ``vector`` is needed only for MASKED_INPUT.
    """
    if kind == "advertise":
        cfg = secagg.SecAggConfig.from_wire(request)
        check_config(spec, cfg, me=me, run_id=run_id, round_=round_, length=length, min_partners=min_partners, bits=bits)
        state, ad = secagg.node_advertise(cfg, identity)
        return state.to_wire(), ad.to_wire()
    if state_wire is None:
        raise ProtocolError("secagg stage out of order")
    state = secagg.NodeState.from_wire(state_wire)
    if state.cfg.round != round_:
        raise ProtocolError("secagg request for another round")
    if kind == "share":
        state, out = secagg.node_share(state, secagg.advertisements_from_wire(request), roster_keys)
    elif kind == "masked":
        if vector is None or vector.size != length:
            raise ProtocolError("no encoded update of the round's length to mask")
        state, out = secagg.node_masked_input(state, secagg.SharesForNode.from_wire(request), vector)
    elif kind == "consistency":
        state, out = secagg.node_consistency(state, secagg.ConsistencyRequest.from_wire(request), identity)
    elif kind == "unmask":
        # Only for the survivor set this node signed, with a quorum of roster signatures on it.
        state, out = secagg.node_unmask(state, secagg.UnmaskRequest.from_wire(request), roster_keys)
    else:
        raise ProtocolError(f"unknown secagg stage {kind!r}")
    return state.to_wire(), out.to_wire()
