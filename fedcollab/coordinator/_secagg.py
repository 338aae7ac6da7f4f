"""The coordinator's side of secure aggregation: drive the five SecAgg+ stages over Flower.

A node that does not answer a stage (a dropout) is simply missing from the next one; the pure
protocol functions decide whether the round can still complete (``fedcollab.protocols.secagg``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from fedcollab.core import NodeError, ProtocolError, get_logger
from fedcollab.coordinator._rounds import Trained, flat_of, metric_parts, numpy_of, record_from_flat, write_checkpoint
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


class SecaggRounds:
    """Rounds under SecAgg+ (the round loop's strategy, ``fedcollab.coordinator._rounds``), pipelined: four exchanges a round.

    Round r: train + MASKED_INPUT (with the shares routed for r), CONSISTENCY (the survivors sign
    the survivor set), UNMASK + ADVERTISE(r + 1), evaluate + SHARE(r + 1). The first round's
    ADVERTISE and SHARE run on their own (a resumed run: fresh keys from its first new round).
    With partner-level DP (central or distributed) the mean comes from ``PartnerDp``.
    """

    def __init__(self, spec: Spec, link: Any, arrays: Any, scaling_config: Callable[[int], Any], *, first: int, max_weight: float,
                 min_partners: int) -> None:
        from fedcollab.coordinator._partner_dp import PartnerDp
        self.spec, self.link, self.arrays, self.scaling_config = spec, link, arrays, scaling_config
        self.names = list(arrays.keys())
        n_params = int(flat_of(arrays, self.names).size)
        self.pdp = PartnerDp(spec, link.ledger, d=n_params)
        self.length = n_params + self.pdp.extra_coordinates
        self.max_weight, self.min_partners = max_weight, min_partners
        self.nxt: tuple[Any, dict[str, Any]] | None = None
        self.share_req: dict[str, dict[str, Any]] = {}
        self.next_state: Any = None
        self.state, request = self.open_round(first, sorted(link.node_names.values()))
        send = link.secagg_sender(first)
        ads = send("advertise", {p: request for p in self.state.cfg.participants})
        self.state, per_node = secagg.coord_collect_advertisements(self.state, {p: secagg.Advertisement.from_wire(w) for p, w in ads.items()})
        bundles = send("share", {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()})
        self.state, self.routed = secagg.coord_route_shares(self.state, {p: secagg.ShareBundle.from_wire(w) for p, w in bundles.items()})

    def open_round(self, rnd: int, participants: list[str]) -> tuple[Any, dict[str, Any]]:
        return start_round(self.spec, run_id=self.link.ledger.run_id, round_=rnd, participants=participants, length=self.length, bits=32,
                           roster_keys=self.link.roster_keys())

    def base_cfg(self, rnd: int) -> dict[str, Any]:
        cfg = dict(self.scaling_config(rnd))
        cfg["secagg.max_weight"] = self.max_weight
        cfg["secagg.n_parties"] = len(self.link.node_names)
        if self.spec.training.strategy == "fedprox":
            cfg["proximal-mu"] = self.spec.training.proximal_mu
        return cfg

    def train(self, rnd: int, evaluate_previous: int | None) -> Any:
        from flwr.app import MessageType

        link, run_id, rounds = self.link, self.link.ledger.run_id, self.spec.training.rounds
        # train + MASKED_INPUT
        cfg = {**self.base_cfg(rnd), "secagg.stage": "masked", "secagg.round": rnd}
        got = link.exchange(rnd, MessageType.TRAIN, {p: (self.arrays, cfg, {"secagg": m.to_wire()}) for p, m in self.routed.items()})
        masked = {p: secagg.MaskedInput.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items() if "secagg" in m.content.config_records}
        failed = {p: c[-1] for p, c in link.recorder.failures.items() if p not in masked and p in self.routed}
        if len(masked) < self.min_partners:
            raise NodeError(f"round {rnd}: {len(masked)} partner(s) sent a masked update, at least {self.min_partners} needed", codes=failed)
        state, checks = secagg.coord_collect_masked(self.state, masked)
        # CONSISTENCY: every survivor signs the one survivor set; the unmask request carries the signatures
        signed = link.secagg_sender(rnd)("consistency", {p: c.to_wire() for p, c in checks.items()})
        state, requests = secagg.coord_collect_signatures(state, {p: secagg.ConsistencySignature.from_wire(w) for p, w in signed.items()})
        # UNMASK + the next round's ADVERTISE
        self.nxt = self.open_round(rnd + 1, sorted(requests)) if rnd < rounds else None
        per: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]] = {}
        for p, req in requests.items():
            c = {"fedcollab.kind": "secagg", "fedcollab.run_id": run_id, "secagg.stage": "unmask", "secagg.round": rnd}
            extra = {"secagg": req.to_wire()}
            if self.nxt is not None:
                c.update({"secagg.next.stage": "advertise", "secagg.next.round": rnd + 1})
                extra["secagg.next"] = self.nxt[1]
            per[p] = (None, c, extra)
        got = link.exchange(rnd, MessageType.QUERY, per)
        revealed = {p: secagg.RevealedShares.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items() if "secagg" in m.content.config_records}
        state, total = secagg.coord_unmask(state, revealed)
        self.state = state
        trained = sorted(state.survivors)
        flat = flat_of(self.arrays, self.names)
        if self.pdp.active:
            new = flat + self.pdp.secure_mean(total, rnd, participants=sorted(state.cfg.participants), summed=trained)
        else:
            new = flat + decode_mean_update(self.spec, total, max_weight=self.max_weight)
        self.arrays = record_from_flat(new, self.arrays, self.names)
        self.share_req = {}
        if self.nxt is not None:
            ads = {p: secagg.Advertisement.from_wire(dict(m.content.config_records["secagg.next"])) for p, m in got.items() if "secagg.next" in m.content.config_records}
            self.next_state, per_node = secagg.coord_collect_advertisements(self.nxt[0], ads)
            self.share_req = {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()}
        return Trained(trained, failed, numpy_of(self.arrays, self.names))

    def checkpoint(self, directory: Any, rnd: int) -> None:
        write_checkpoint(directory, rnd, numpy_of(self.arrays, self.names))

    def evaluate(self, rnd: int, evaluating: bool, failed: dict[str, int]) -> dict[str, dict[str, Any]]:
        """Evaluate (on the cadence) with the next round's SHARE riding on it, or the SHARE alone."""
        from flwr.app import MessageType

        from fedcollab.protocols.wire import RecordKey

        share_req, parts = self.share_req, {}
        if not (evaluating or share_req):
            return parts
        targets = sorted(set(share_req) | (set(self.link.node_names.values()) if evaluating else set()))
        per = {}
        for p in targets:
            c = dict(self.scaling_config(rnd))
            if not evaluating:
                c["fedcollab.kind"] = "secagg"
            extra = {}
            if p in share_req:
                c.update({"secagg.stage" if not evaluating else "secagg.next.stage": "share",
                          "secagg.round" if not evaluating else "secagg.next.round": rnd + 1})
                extra["secagg" if not evaluating else "secagg.next"] = share_req[p]
            per[p] = (self.arrays if evaluating else None, c, extra)
        got = self.link.exchange(rnd, MessageType.EVALUATE if evaluating else MessageType.QUERY, per)
        slot = "secagg.next" if evaluating else "secagg"
        if share_req:
            bundles = {p: secagg.ShareBundle.from_wire(dict(m.content.config_records[slot])) for p, m in got.items() if slot in m.content.config_records}
            self.state, self.routed = secagg.coord_route_shares(self.next_state, bundles)
        if evaluating:
            parts = {p: metric_parts(m.content.metric_records[RecordKey.METRICS]) for p, m in got.items()}
        return parts

    def finish(self, last_round: int) -> None:
        return None
