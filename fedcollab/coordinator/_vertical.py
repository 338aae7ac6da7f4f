"""The coordinator's side of a vertical run in deployment: a relay of sealed messages.

The label holder drives the run (PSI, SecureBoost or vertical logistic regression, joint
evaluation); the coordinator only
carries each party's sealed bytes to the party they are addressed to (:mod:`fedcollab.node._vertical`):

1. ``hello`` to every connected node: the partners of the spec answer with their identity and
   a per-run X25519 key signed by their node key; a node that is not one of the spec's partners
   (another collaboration on the same SuperLink) refuses and is left alone;
2. ``keys``: every party gets the others' signed keys (each checks them against its own
   roster); the label holder answers with its first sealed outbox;
3. ``step`` until the label holder says it is done: its outbox to the passive parties, their
   sealed replies back to it, one exchange each way;
4. ``close``: the run ledger's close, countersigned by every party.

The coordinator sees who talks to whom and how many bytes, never what they say; every party's
ledger entries come back with its replies and go into the run ledger.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fedcollab.core import NodeError, NodeErrorCode, ProtocolError, get_logger
from fedcollab.coordinator._exchange import wait_for_nodes
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.protocols.wire import MessageKind, RecordKey
from fedcollab.spec import Spec

log = get_logger("coordinator.vertical")

KIND = "vertical"
#: Most relay exchanges one run may take (a run that does not end is stopped).
MAX_STEPS = 100_000


def run_vertical(spec: Spec, grid: Any, *, ledger: RunLedger, timeout: float, on_step: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run a vertical spec through ``grid``; returns the run's outcome (the label holder's report and each party's model part)."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    v = spec.vertical
    assert v is not None, "a vertical spec"
    names = [p.name for p in spec.partners]
    active = v.label_holder

    def cfg(stage: str | None, **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"fedcollab.kind": KIND, "fedcollab.run_id": ledger.run_id, **extra}
        if stage is not None:
            c["vertical.stage"] = stage
        return c

    def partner_of(m: Any) -> str | None:
        rec = m.content.config_records.get(RecordKey.ERROR) or m.content.config_records.get(RecordKey.INFO) if not m.has_error() else None
        return str(rec.get("partner", "")) if rec is not None else None

    def send(per_node: dict[int, dict[str, dict[str, Any]]], *, members: dict[int, str] | None) -> dict[int, Any]:
        msgs = [Message(content=RecordDict({k: ConfigRecord(r) for k, r in recs.items()}), message_type=MessageType.QUERY, dst_node_id=nid)
                for nid, recs in per_node.items()]
        # hello goes to every connected node; it is over once every partner of the spec has answered
        # (a node of another collaboration, or one that went away, is not waited for).
        until = (lambda got: set(names) <= {partner_of(m) for m in got}) if members is None else None
        replies = list(grid.send_and_receive(msgs, timeout=timeout, until=until))
        ok: dict[int, Any] = {}
        failed: dict[str, int] = {}
        for m in replies:
            nid = m.metadata.src_node_id
            name = members.get(nid) if members is not None else None
            if m.has_error():
                if name is not None:
                    failed[name] = int(m.error.code or NodeErrorCode.INTERNAL)
                continue
            err = m.content.config_records.get(RecordKey.ERROR)
            if err is not None:
                claimed = str(err.get("partner", ""))
                who = name or (claimed if claimed in names else None)
                if who is None:
                    log.info("node %s is not in this collaboration (code %s); left alone", nid, err.get("code"))
                    continue
                failed[who] = int(err["code"])
                _accept(ledger, m, who, 0, required=False)
                continue
            ok[nid] = m
        missing = [members[nid] for nid in per_node if members is not None and nid not in ok and members[nid] not in failed]
        for name in missing:
            failed[name] = int(NodeErrorCode.INTERNAL)
        if failed:
            raise NodeError(f"vertical run: {', '.join(sorted(failed))} did not answer", codes=failed,
                            problems=[f"{k}: code {c}" for k, c in sorted(failed.items())])
        return ok

    # --- hello --------------------------------------------------------------------------------
    node_ids = wait_for_nodes(grid, len(names), timeout)
    got = send({nid: {RecordKey.CONFIG: cfg("hello")} for nid in node_ids}, members=None)
    members: dict[int, str] = {}
    adverts: dict[str, dict[str, bytes]] = {}
    for nid, m in got.items():
        info = m.content.config_records.get(RecordKey.INFO)
        adv = m.content.config_records.get(KIND)
        name = str(info.get("partner", "")) if info is not None else ""
        if name not in names or name in adverts or adv is None:
            raise ProtocolError("vertical hello: an unknown or duplicate partner identity")
        members[nid] = name
        adverts[name] = {"public": bytes(adv["public"]), "signature": bytes(adv["signature"])}
        _accept(ledger, m, name, 0)
    absent = sorted(set(names) - set(adverts))
    if absent:
        raise NodeError(f"vertical run: no hello from {absent}", codes={n: int(NodeErrorCode.INTERNAL) for n in absent})
    by_name = {n: nid for nid, n in members.items()}

    # --- keys ---------------------------------------------------------------------------------
    flat = {f"{p}.{k}": b for p, a in adverts.items() for k, b in a.items()}
    got = send({nid: {RecordKey.CONFIG: cfg("keys"), "vertical.adverts": flat} for nid in members}, members=members)
    for nid, m in got.items():
        _accept(ledger, m, members[nid], 0)
    outbox = _records(got[by_name[active]], "vertical.out")

    # --- steps --------------------------------------------------------------------------------
    relayed = 0
    for step in range(MAX_STEPS):
        replies = send({by_name[p]: {RecordKey.CONFIG: cfg("step"), "vertical.in": {active: wire}} for p, wire in outbox.items()},
                       members=members) if outbox else {}
        inbox = {}
        for nid, m in replies.items():
            _accept(ledger, m, members[nid], 0)
            sealed = _records(m, "vertical.out")
            if set(sealed) != {active}:
                raise ProtocolError(f"vertical step: {members[nid]} replied to {sorted(sealed)}, not to the label holder")
            inbox[members[nid]] = sealed[active]
        (m,) = send({by_name[active]: {RecordKey.CONFIG: cfg("step"), "vertical.in": inbox}}, members=members).values()
        _accept(ledger, m, active, 0)
        relayed += sum(len(w) for w in inbox.values()) + sum(len(w) for w in outbox.values())
        if on_step is not None:
            on_step(step)
        done = m.content.config_records.get(KIND)
        if done is not None and done.get("done"):
            report = dict(m.content.config_records[RecordKey.INFO])
            parts = {active: {"model_part": str(report.pop("model_part")), "sha256": str(report.pop("sha256"))}}
            report.pop("partner", None)
            for nid, r in replies.items():
                info = r.content.config_records.get(RecordKey.INFO)
                if info is not None and "model_part" in info:
                    parts[members[nid]] = {"model_part": str(info["model_part"]), "sha256": str(info["sha256"])}
            break
        outbox = _records(m, "vertical.out")
    else:
        raise ProtocolError(f"vertical run: the label holder did not finish within {MAX_STEPS} steps")

    # --- close --------------------------------------------------------------------------------
    close = ledger.close(int(report.get("trees", report.get("iterations", 0))), partners=names)
    got = send({nid: {RecordKey.CONFIG: {"fedcollab.kind": str(MessageKind.CLOSE), "fedcollab.run_id": ledger.run_id, "close": close.decode()}}
                for nid in members}, members=members)
    for nid, m in got.items():
        _accept(ledger, m, members[nid], 0)
    return {"layout": "vertical", "label_holder": active, "passive_parties": [n for n in names if n != active], "steps": step + 1,
            "relayed_bytes": relayed, "model_parts": parts, **report}


def _records(m: Any, key: str) -> dict[str, bytes]:
    rec = m.content.config_records.get(key)
    if rec is None:
        raise ProtocolError(f"vertical: a reply without `{key}`")
    return {str(k): bytes(v) for k, v in rec.items()}


def _accept(ledger: RunLedger, m: Any, party: str, rnd: int, *, required: bool = True) -> None:
    rec = m.content.config_records.get(RecordKey.RELEASES)
    if rec is None:
        if required:
            raise ProtocolError("a reply without its ledger entries")
        return
    ledger.accept(json.loads(str(rec["lines"])), party=party, round=rnd)


__all__ = ["run_vertical"]
