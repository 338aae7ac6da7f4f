"""The coordinator's side of secure aggregation: drive the five SecAgg+ stages over Flower.

A node that does not answer a stage (a dropout) is simply missing from the next one; the pure
protocol functions decide whether the round can still complete (``fedcollab.protocols.secagg``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedcollab.core import ProtocolError, get_logger
from fedcollab.protocols import secagg
from fedcollab.protocols.quantize import decode_update
from fedcollab.spec import Spec

log = get_logger("coordinator.secagg")
BITS = 32

#: send(stage, {partner: request wire}) -> {partner: reply wire}; missing partners dropped out.
Send = Callable[[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]


def start_round(spec: Spec, *, run_id: str, round_: int, participants: list[str], length: int, bits: int,
                roster_keys: dict[str, str]) -> tuple[Any, dict[str, Any]]:
    """Open a round: the coordinator's state and the ADVERTISE request (the public config) for every participant."""
    t = spec.secagg.resolved_threshold(len(spec.partners))
    # The threshold never changes; with fewer participants (earlier dropouts) the graph's degree
    # shrinks, and so do the dropouts the round can still absorb (t > degree / 2 still holds).
    degree = min(spec.secagg.neighbours, len(participants) - 1)
    tolerated = min(spec.secagg.max_dropouts, degree - t)
    if tolerated < 0:
        raise ProtocolError(f"round {round_}: {len(participants)} participants cannot meet the threshold t = {t}; the run stops")
    cfg = secagg.SecAggConfig(
        run_id=run_id, round=round_, participants=tuple(sorted(participants)), k=spec.secagg.neighbours,
        threshold=t, max_dropouts=tolerated, bits=bits, length=length,
    )
    return secagg.coord_start(cfg, {k: roster_keys[k] for k in participants})


def finish_round(state: Any, advertisements: dict[str, dict[str, Any]], send: Send) -> tuple[np.ndarray, list[str]]:
    """SHARE, MASKED_INPUT, CONSISTENCY and UNMASK after the advertisements came in: (modular sum, partners in it)."""
    ads = {p: secagg.Advertisement.from_wire(w) for p, w in advertisements.items()}
    state, per_node = secagg.coord_collect_advertisements(state, ads)
    replies = send("share", {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()})
    bundles = {p: secagg.ShareBundle.from_wire(w) for p, w in replies.items()}
    state, routed = secagg.coord_route_shares(state, bundles)
    replies = send("masked", {p: m.to_wire() for p, m in routed.items()})
    masked = {p: secagg.MaskedInput.from_wire(w) for p, w in replies.items()}
    state, checks = secagg.coord_collect_masked(state, masked)
    replies = send("consistency", {p: c.to_wire() for p, c in checks.items()})
    signed = {p: secagg.ConsistencySignature.from_wire(w) for p, w in replies.items()}
    state, requests = secagg.coord_collect_signatures(state, signed)
    replies = send("unmask", {p: r.to_wire() for p, r in requests.items()})
    revealed = {p: secagg.RevealedShares.from_wire(w) for p, w in replies.items()}
    state, total = secagg.coord_unmask(state, revealed)
    return total, sorted(state.survivors)


def decode_mean_update(spec: Spec, total: np.ndarray, *, max_weight: float) -> np.ndarray:
    """The weighted mean update from the modular sum of encoded updates."""
    mean, _ = decode_update(total, max_weight=max_weight, scale=spec.secagg.scale, bits=BITS)
    if not np.isfinite(mean).all():
        raise ProtocolError("the decoded aggregate is not finite")
    return mean


def secure_sum(
    spec: Spec,
    *,
    run_id: str,
    round_: int,
    participants: list[str],
    length: int,
    bits: int,
    roster_keys: dict[str, str],
    send: Send,
) -> tuple[np.ndarray, list[str]]:
    """The modular sum of the participants' vectors in five exchanges, learning nothing else."""
    state, request = start_round(spec, run_id=run_id, round_=round_, participants=participants, length=length, bits=bits,
                                 roster_keys=roster_keys)
    replies = send("advertise", {p: request for p in state.cfg.participants})
    return finish_round(state, replies, send)
