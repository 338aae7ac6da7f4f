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
ledger entries come back with its replies and go into the run ledger. Every exchange goes through
the coordinator's one exchange helper (:class:`~fedcollab.coordinator._exchange.Link`).
"""

from __future__ import annotations

import json

from collections.abc import Callable
from typing import Any

from fedcollab.core import NodeError, NodeErrorCode, ProtocolError, get_logger
from fedcollab.coordinator._exchange import Link, wait_for_nodes
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.protocols.wire import MessageKind, RecordKey
from fedcollab.spec import Spec

log = get_logger("coordinator.vertical")

KIND = "vertical"
#: Most relay exchanges one run may take (a run that does not end is stopped).
MAX_STEPS = 100_000


class _Failures:
    """What :class:`~fedcollab.coordinator._exchange.Link` records of refusals and dropouts (partner -> codes)."""

    def __init__(self) -> None:
        self.failures: dict[str, list[int]] = {}


def run_vertical(spec: Spec, grid: Any, *, ledger: RunLedger, timeout: float, on_step: Callable[[int], None] | None = None,
                 resume: bool = False, score: str | None = None) -> dict[str, Any]:
    """Run a vertical spec through ``grid``; returns the run's outcome (the label holder's report and each party's model part).

    ``resume``: the run (``ledger.run_id``) was interrupted; every node goes on from its own
    checkpoint of it (the hello says so; no PSI runs again). ``score``: the fedcollab run id of a
    completed run of this spec: score the nodes' current records jointly with its model (each node
    uses its own part; the scores stay at the label holder, ``vertical/<run>/scores.csv``).
    """
    from flwr.app import MessageType

    v = spec.vertical
    assert v is not None, "a vertical spec"
    names = [p.name for p in spec.partners]
    active = v.label_holder
    link = Link(grid, ledger=ledger, recorder=_Failures(), timeout=timeout, partner_names=set(names))

    def cfg(stage: str | None, **extra: Any) -> dict[str, Any]:
        c: dict[str, Any] = {"fedcollab.kind": KIND, "fedcollab.run_id": ledger.run_id, **extra}
        if stage is not None:
            c["vertical.stage"] = stage
        return c

    def stop_on(failed: dict[str, int]) -> None:
        if failed:
            raise NodeError(f"vertical run: {', '.join(sorted(failed))} did not answer", codes=failed,
                            problems=[f"{k}: code {c}" for k, c in sorted(failed.items())])

    def send(per_party: dict[str, dict[str, dict[str, Any]]]) -> dict[str, Any]:
        """One exchange with the named parties (records by party); every one of them must answer."""
        got = link.exchange(0, MessageType.QUERY, {p: (None, dict(recs[RecordKey.CONFIG]), {k: r for k, r in recs.items() if k != RecordKey.CONFIG})
                                                   for p, recs in per_party.items()})
        stop_on({p: link.recorder.failures.get(p, [int(NodeErrorCode.INTERNAL)])[-1] for p in per_party if p not in got})
        return got

    # --- hello: every connected node; the spec's partners name themselves, other collaborations' nodes are left alone
    node_ids = wait_for_nodes(grid, len(names), timeout)
    # A resumed run's hello names the run ledger's last entry of each party: each node returns what came after it.
    again = {"vertical.resume": True, "vertical.heads": json.dumps(dict(ledger.heads))} if resume else {}
    if score is not None:
        again["vertical.score"] = score
    got, failed = link.broadcast(0, MessageType.QUERY, cfg("hello", **again), node_ids, strangers=True)
    stop_on(failed)
    adverts: dict[str, dict[str, bytes]] = {}
    for name, m in got.items():
        adv = m.content.config_records.get(KIND)
        if adv is None:
            raise ProtocolError("vertical hello: a reply without its key advert")
        adverts[name] = {"public": bytes(adv["public"]), "signature": bytes(adv["signature"])}

    # --- keys ---------------------------------------------------------------------------------
    flat = {f"{p}.{k}": b for p, a in adverts.items() for k, b in a.items()}
    got = send({p: {RecordKey.CONFIG: cfg("keys"), "vertical.adverts": flat} for p in names})
    outbox = _records(got[active], "vertical.out")

    # --- steps --------------------------------------------------------------------------------
    relayed = 0
    for step in range(MAX_STEPS):
        replies = send({p: {RecordKey.CONFIG: cfg("step"), "vertical.in": {active: wire}} for p, wire in outbox.items()}) if outbox else {}
        inbox = {}
        for name, m in replies.items():
            sealed = _records(m, "vertical.out")
            if set(sealed) != {active}:
                raise ProtocolError(f"vertical step: {name} replied to {sorted(sealed)}, not to the label holder")
            inbox[name] = sealed[active]
        m = send({active: {RecordKey.CONFIG: cfg("step"), "vertical.in": inbox}})[active]
        relayed += sum(len(w) for w in inbox.values()) + sum(len(w) for w in outbox.values())
        if on_step is not None:
            on_step(step)
        done = m.content.config_records.get(KIND)
        if done is not None and done.get("done"):
            report = dict(m.content.config_records[RecordKey.INFO])
            parts = {active: {"model_part": str(report.pop("model_part")), "sha256": str(report.pop("sha256"))}}
            report.pop("partner", None)
            for name, r in replies.items():
                info = r.content.config_records.get(RecordKey.INFO)
                if info is not None and "model_part" in info:
                    parts[name] = {"model_part": str(info["model_part"]), "sha256": str(info["sha256"])}
            break
        outbox = _records(m, "vertical.out")
    else:
        raise ProtocolError(f"vertical run: the label holder did not finish within {MAX_STEPS} steps")

    # --- close --------------------------------------------------------------------------------
    close = ledger.close(int(report.get("trees", report.get("iterations", 0))), partners=names)
    send({p: {RecordKey.CONFIG: {"fedcollab.kind": str(MessageKind.CLOSE), "fedcollab.run_id": ledger.run_id, "close": close.decode()}}
          for p in names})
    return {"layout": "vertical", "label_holder": active, "passive_parties": [n for n in names if n != active], "steps": step + 1,
            "relayed_bytes": relayed, "model_parts": parts, **({"resumed": True} if resume else {}),
            **({"scored_with": score} if score is not None else {}), **report}


def _records(m: Any, key: str) -> dict[str, bytes]:
    rec = m.content.config_records.get(key)
    if rec is None:
        raise ProtocolError(f"vertical: a reply without `{key}`")
    return {str(k): bytes(v) for k, v in rec.items()}


__all__ = ["run_vertical"]
