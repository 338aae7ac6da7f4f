"""The node's side of a vertical run in deployment: a thin adapter over :mod:`fedcollab.protocols.vertical._party`.

Every message of a vertical run is a Flower ``query`` with ``fedcollab.kind = "vertical"`` and a
``vertical.stage``; the node answers it only after checking, on every message, its own policy
(:func:`vertical_policy_problem`: vertical runs allowed, the privacy mode, the model kind, the
columns) and where the run stands (a stage out of order is refused with ``OUT_OF_ORDER``):

1. ``hello``: the PSI cap (``vertical.max_psi_runs``), the whole run's planned noisy releases
   against what is left of the budget (:func:`~fedcollab.protocols.vertical.planned_releases`;
   ``BUDGET_EXHAUSTED``), then a fresh per-run X25519 key signed with the node's Ed25519 key
   (:class:`fedcollab.crypto.SealAdvert`);
2. ``keys``: the other parties' adverts, each checked against the node's own roster; the
   label holder starts its run (:func:`active_protocol` for SecureBoost, :func:`active_lr_protocol`
   for logistic regression) and returns its first outbox;
3. ``step``: sealed messages in, sealed messages out (the label holder: ``{passive: bytes}``;
   a passive party: ``{label holder: bytes}``); when the label holder's run ends, each node
   writes its own part of the model in its folder (``vertical/<run>/model.json`` at the label
   holder; at a passive party ``vertical/<run>/lookup.json`` for SecureBoost, the thresholds
   staying there, or ``vertical/<run>/weights.json`` for vertical logistic regression);
4. ``close``: the node countersigns the coordinator's close and forgets the run.

Resume: after every tree (iteration) but the last, each node writes its own state of the run in
its folder (``vertical/<run>/checkpoint.json``: its aligned rows and their ids' digest; the label
holder's trees and margins or weights; a passive party's lookup table or weights). A ``hello``
with ``vertical.resume`` (``submit --resume``) starts the run again from that checkpoint, with no
PSI: only the releases after it are preflighted, and the label holder's ``ResumeRows`` opening
must name the rows of each passive party's own checkpoint. The checkpoint is removed when the
node writes its part of the model.

Scoring (``submit --score RUN``): a ``hello`` with ``vertical.score = RUN`` makes the node read its
own part of the trained run ``RUN`` from its folder (refused with ``BAD_REQUEST`` if it has none)
and run :func:`~fedcollab.protocols.vertical.active_score_protocol` (the label holder, which
writes ``vertical/<run>/scores.csv`` and reports only the count) or
:class:`~fedcollab.protocols.vertical.PassiveScorer` on its current records: a fresh PSI, then
its decisions or partial logits on every common record, recorded first. No noisy release, so
nothing is preflighted against the budget; the PSI cap and minimum intersection apply.

The coordinator relays sealed bytes only. Every release is checked and recorded by the node's
budget gate before the message carrying it leaves; the new ledger lines travel with the reply.
Per-run state lives in memory: the deployment executor is one long-lived process.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import BudgetExhausted, NodeCoded, NodeErrorCode, PolicyRefused, ProtocolError, get_logger, node_code_for
from fedcollab.protocols.wire import MessageKind, RecordKey

log = get_logger("node.vertical")

KIND = "vertical"
STAGES = ("hello", "keys", "step")

SEAL_KIND = "vertical"  # the message kind bound into every sealed message's associated data


def vertical_policy_problem(spec: Any, partner: str, policy: Any) -> str | None:
    """Why this node's policy refuses the vertical ``spec`` (None if it does not); checked on every message."""
    v = spec.vertical
    entry = next((p for p in spec.partners if p.name == partner), None)
    if v is None or entry is None:
        return "the spec is not a vertical spec naming this partner"
    if not policy.vertical.allowed:
        return "the policy does not join vertical collaborations (vertical.allowed = false)"
    if spec.privacy.mode not in policy.allowed_privacy_modes:
        return f"privacy mode {spec.privacy.mode!r} is not in the policy's allowed_privacy_modes"
    if spec.model.kind not in policy.allowed_model_kinds:
        return f"model kind {spec.model.kind!r} is not in the policy's allowed_model_kinds"
    if policy.allowed_features is not None and set(entry.columns or []) - set(policy.allowed_features) - {v.id_column, spec.data_schema.label}:
        return "the spec uses columns the policy's allowed_features does not list"
    return None


def psi_runs_joined(gate: Any) -> int:
    """How many PSI runs (run ids with a ``psi_intersection`` release) a node's ledger holds for the gate's dataset."""
    return len({str(ln.entry["run_id"]) for ln in gate.ledger.lines()
                if ln.entry.get("kind") == "release" and ln.entry["body"].get("dataset") == gate.dataset
                and ln.entry["body"]["release"].get("kind") == "psi_intersection"})


@dataclass
class _Run:
    """One vertical run at this node (in memory)."""

    role: str  # "active" | "passive"
    key: Any  # SealKey
    channels: dict[str, Any] = field(default_factory=dict)
    engine: Any = None  # the label holder's generator, or the passive party's PassiveParty
    resume: dict[str, Any] | None = None  # the body of its checkpoint, when the run resumes
    part: dict[str, Any] | None = None  # a scoring run: its own part of the trained model
    lines: list[str] = field(default_factory=list)  # ledger lines recorded while answering the current message
    done: bool = False
    result: dict[str, Any] | None = None


class VerticalNode:
    """A node's vertical runs for one (approved) spec: what the ClientApp calls for each message."""

    def __init__(self, spec: Any, partner: str, home: Path, roster: dict[str, str]) -> None:
        from fedcollab.node._home import NodeHome

        self.spec, self.partner, self.roster = spec, partner, roster
        self.home = NodeHome(Path(home))
        self.dataset = self.home.dataset()
        self.gate = self.home.gate(partner, self.dataset)
        self.runs: dict[str, _Run] = {}
        assert spec.vertical is not None
        self.active = spec.vertical.label_holder
        self.passives = [p.name for p in spec.partners if p.name != self.active]

    # --- the checks every message gets ----------------------------------------------------
    def refuse(self, run_id: str, code: NodeErrorCode, reason: str) -> None:
        """Record the refusal in the node's ledger and raise its code."""
        self.gate.refuse_request(run_id=run_id or "-", round=0, code=int(code), reason=reason)
        log.error("partner %s refused a vertical message: %s", self.partner, reason)
        raise NodeCoded(code)

    def check(self, run_id: str) -> None:
        pol = self.gate.policy
        if pol.partner != self.partner:
            self.refuse(run_id, NodeErrorCode.POLICY_REFUSED, "the node's policy belongs to another partner")
        problem = vertical_policy_problem(self.spec, self.partner, pol)
        if problem is not None:
            self.refuse(run_id, NodeErrorCode.POLICY_REFUSED, problem)
        entry = next(p for p in self.spec.partners if p.name == self.partner)
        if entry.dataset is not None and entry.dataset != self.dataset:
            self.refuse(run_id, NodeErrorCode.DATASET_MISMATCH, "the spec names another dataset id for this partner than the node's")

    # --- one message ------------------------------------------------------------------------
    def answer(self, stage: str, run_id: str, cfg: Any, records: Any) -> tuple[dict[str, Any], list[str]]:
        """``(records to reply with, new ledger lines)`` for one message; raises a coded refusal otherwise."""
        if not run_id or len(run_id) > 64:
            raise NodeCoded(NodeErrorCode.BAD_REQUEST)
        self.check(run_id)
        run = self.runs.get(run_id)
        if stage == "hello":
            resume = bool(cfg.get("vertical.resume", False))
            if run is not None and not resume:
                self.refuse(run_id, NodeErrorCode.OUT_OF_ORDER, "a second hello in the same vertical run")
            # A resumed run starts again from this node's checkpoint on disk, whatever it still held in memory
            # (the coordinator restarted while this node ran on): the steps after it are executed, and charged, again.
            heads = json.loads(str(cfg.get("vertical.heads", "{}"))) if resume else {}
            score = str(cfg.get("vertical.score", "") or "")
            if score and resume:
                self.refuse(run_id, NodeErrorCode.BAD_REQUEST, "a scoring run is not resumed (score again)")
            return (self._hello(run_id, resume=resume, score=score or None),
                    self._unsent(run_id, heads.get(self.partner) if isinstance(heads, dict) else None) if resume else [])
        if run is None or (stage == "keys") != (run.engine is None) or run.done:
            self.refuse(run_id, NodeErrorCode.OUT_OF_ORDER, f"vertical stage {stage!r} out of order")
        assert run is not None
        run.lines = []
        try:
            out = self._keys(run_id, run, records) if stage == "keys" else self._step(run_id, run, records)
        except Exception as exc:
            # The run cannot go on: its state is dropped, the refusal recorded, only the code leaves.
            self.runs.pop(run_id, None)
            code = node_code_for(exc)
            self.gate.refuse_request(run_id=run_id, round=0, code=int(code), reason=f"vertical {stage}: {type(exc).__name__}")
            log.error("partner %s: vertical %s failed: %s", self.partner, stage, exc, exc_info=not isinstance(exc, (ProtocolError, PolicyRefused)))
            raise NodeCoded(code) from None
        return out, list(run.lines)

    def _record(self, run_id: str, run: _Run) -> Any:
        def record(release: Any, payload: bytes) -> None:
            run.lines.append(self.gate.record(release, run_id=run_id, payload=payload).decode())

        return record

    # --- checkpoints: this node's own state of a run, in its own folder ------------------------
    def _checkpoint_path(self, run_id: str) -> Path:
        if not run_id.replace("-", "").isalnum():
            raise ProtocolError("vertical: a run id must be letters, digits and dashes")
        return self.home.root / "vertical" / run_id / "checkpoint.json"

    def _spec_digest(self) -> str:
        return hashlib.sha256(self.spec.model_dump_json(by_alias=True).encode()).hexdigest()

    def _checkpointer(self, run_id: str) -> Any:
        from fedcollab.node._home import _write_atomic

        path = self._checkpoint_path(run_id)

        def write(done: int, body: dict[str, Any]) -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            from fedcollab.protocols.vertical import CHECKPOINT_FORMAT

            doc = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "party": self.partner, "spec_sha256": self._spec_digest(), "done": int(done), **body}
            _write_atomic(path, json.dumps(doc))

        return write

    def _read_checkpoint(self, run_id: str) -> dict[str, Any]:
        """Its checkpoint of ``run_id`` (a resumed run), refused with a code if absent or not this run's, party's or spec's."""
        path = self._checkpoint_path(run_id)
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            self.refuse(run_id, NodeErrorCode.BAD_REQUEST, "a resumed vertical run without this node's checkpoint of it")
        from fedcollab.protocols.vertical import CHECKPOINT_FORMAT

        want = {"format": CHECKPOINT_FORMAT, "run_id": run_id, "party": self.partner, "spec_sha256": self._spec_digest()}
        done = doc.get("done") if isinstance(doc, dict) else None
        if not isinstance(doc, dict) or any(doc.get(k) != v for k, v in want.items()) or isinstance(done, bool) or not isinstance(done, int) or done < 1:
            self.refuse(run_id, NodeErrorCode.BAD_REQUEST, "the node's checkpoint is not of this run, party and spec")
        return doc

    def _unsent(self, run_id: str, head: object) -> list[str]:
        """This node's entries of ``run_id`` after ``head`` (the run ledger's last of them): those whose reply an interruption lost.

        Only the contiguous entries of this run right after the head (the run ledger must keep the
        node's chain unbroken); none when the head is not in this node's ledger.
        """
        lines = [ln for ln in self.gate.ledger.lines() if ln.entry.get("party") == self.partner]
        if head is None:
            start = next((i for i, ln in enumerate(lines) if ln.entry.get("run_id") == run_id), len(lines))
        else:
            start = next((i + 1 for i, ln in enumerate(lines) if ln.hash == head), len(lines))
        out = []
        for ln in lines[start:]:
            if ln.entry.get("run_id") != run_id:
                break
            out.append(ln.raw.decode())
        return out

    def _read_part(self, run_id: str, trained: str) -> dict[str, Any]:
        """Its own part of the trained run ``trained`` (a scoring run), from its own folder; refused with a code if absent."""
        name = "model.json" if self.partner == self.active else "weights.json" if self.spec.model.kind == "logistic_regression" else "lookup.json"
        if not trained.replace("-", "").isalnum() or len(trained) > 64:
            self.refuse(run_id, NodeErrorCode.BAD_REQUEST, "a scoring run names a trained run id that is not letters, digits and dashes")
        try:
            doc = json.loads((self.home.root / "vertical" / trained / name).read_text())
        except (OSError, ValueError):
            self.refuse(run_id, NodeErrorCode.BAD_REQUEST, f"a scoring run of a model this node holds no part of (vertical/{trained}/{name})")
        if not isinstance(doc, dict):
            self.refuse(run_id, NodeErrorCode.BAD_REQUEST, "the node's model part is malformed")
        return doc

    def _hello(self, run_id: str, *, resume: bool = False, score: str | None = None) -> dict[str, Any]:
        from fedcollab.crypto import SealKey

        pol = self.gate.policy
        doc = self._read_checkpoint(run_id) if resume else None
        part = self._read_part(run_id, score) if score else None
        runs = psi_runs_joined(self.gate)
        if doc is None and runs >= pol.vertical.max_psi_runs:  # a resumed run runs no PSI
            self.refuse(run_id, NodeErrorCode.POLICY_REFUSED,
                        f"the node already joined {runs} PSI run(s) on this dataset; its policy allows {pol.vertical.max_psi_runs}")
        # The whole run's planned noisy releases against what is left of the budget, before the PSI spends anything
        # (a resumed run: those after its checkpoint; a passive party's may be a step ahead of the label holder's).
        from fedcollab.node._client import refuse_over_budget
        from fedcollab.protocols.vertical import planned_releases

        after = 0 if doc is None else int(doc["done"]) - (0 if self.partner == self.active else 1)
        planned = [] if part is not None else planned_releases(self.spec, self.partner, after=after)  # scoring: declared releases only
        try:
            refuse_over_budget(self.gate, planned, run_id=run_id, partner=self.partner)
        except BudgetExhausted:
            raise NodeCoded(NodeErrorCode.BUDGET_EXHAUSTED) from None
        if len(self.runs) >= 8:
            self.runs.pop(next(iter(self.runs)))  # abandoned runs do not pile up
        self.runs.pop(run_id, None)
        key = SealKey.generate(run_id, self.partner)
        self.runs[run_id] = _Run(role="active" if self.partner == self.active else "passive", key=key, resume=doc, part=part)
        adv = key.advert(self.home.key())
        return {RecordKey.INFO: {"partner": self.partner, "role": self.runs[run_id].role, **({"resume_after": int(doc["done"])} if doc else {})},
                KIND: {"public": adv.public, "signature": adv.signature}}

    def _keys(self, run_id: str, run: _Run, records: Any) -> dict[str, Any]:
        from fedcollab.crypto import SealAdvert
        from fedcollab.data import load_vertical_party
        from fedcollab.protocols.vertical import active_lr_protocol, active_protocol, passive_party

        rec = records.get("vertical.adverts")
        peers = self.passives if run.role == "active" else [self.active]
        if rec is None:
            raise ProtocolError("vertical keys: no adverts")
        for peer in peers:
            if peer not in self.roster:
                raise ProtocolError(f"vertical keys: {peer!r} is not in this node's roster")
            adv = SealAdvert(party=peer, public=bytes(rec[f"{peer}.public"]), signature=bytes(rec[f"{peer}.signature"]))
            run.channels[peer] = run.key.channel(adv, roster_key=self.roster[peer])
        data = load_vertical_party(self.spec, self.partner, scoring=run.part is not None)  # scoring: no label needed
        pol = self.gate.policy.vertical
        record = self._record(run_id, run)
        if run.part is not None:
            from fedcollab.protocols.vertical import PassiveScorer, active_score_protocol

            if run.role == "active":
                run.engine = active_score_protocol(self.spec, data, self.passives, run_id=run_id, record=record, part=run.part,
                                                   min_intersection=pol.min_intersection)
                return self._outbox(run, next(run.engine))
            run.engine = PassiveScorer(self.spec, data, active=self.active, run_id=run_id, record=record, part=run.part,
                                       min_intersection=pol.min_intersection)
            return {KIND: {"ready": True}}
        # The node's own noise generator (flooding, DP), seeded from the OS CSPRNG for this run.
        rng = np.random.default_rng(np.random.SeedSequence(entropy=int.from_bytes(os.urandom(32), "big")))
        ck = {"checkpoint": self._checkpointer(run_id), "resume": run.resume}
        if run.role == "active":
            if self.spec.model.kind == "logistic_regression":
                run.engine = active_lr_protocol(self.spec, data, self.passives, run_id=run_id, record=record, rng=rng,
                                                min_intersection=pol.min_intersection, **ck)
            else:
                run.engine = active_protocol(self.spec, data, self.passives, run_id=run_id, record=record, min_intersection=pol.min_intersection,
                                             **ck)
            return self._outbox(run, next(run.engine))
        run.engine = passive_party(self.spec, data, active=self.active, run_id=run_id, record=record, rng=rng,
                                   min_intersection=pol.min_intersection, min_node_rows=pol.min_node_rows, **ck)
        return {KIND: {"ready": True}}

    def _outbox(self, run: _Run, outbox: dict[str, tuple[object, ...]]) -> dict[str, Any]:
        from fedcollab.protocols.vertical import encode_message

        return {"vertical.out": {p: run.channels[p].seal(SEAL_KIND, encode_message(tuple(msgs))) for p, msgs in outbox.items()}}

    def _inbox(self, run: _Run, records: Any) -> dict[str, tuple[object, ...]]:
        from fedcollab.protocols.vertical import decode_message

        rec = records.get("vertical.in")
        if rec is None:
            raise ProtocolError("vertical step: no sealed messages")
        out = {}
        for sender in rec.keys():
            if sender not in run.channels:
                raise ProtocolError(f"vertical step: a message from {sender!r}, who is not this node's peer in the run")
            value = decode_message(run.channels[sender].open(SEAL_KIND, bytes(rec[sender])))
            out[sender] = value if isinstance(value, tuple) else (value,)
        return out

    def _step(self, run_id: str, run: _Run, records: Any) -> dict[str, Any]:
        inbox = self._inbox(run, records)
        if run.role == "active":
            try:
                return self._outbox(run, run.engine.send(inbox))
            except StopIteration as stop:
                return self._finish_active(run_id, run, stop.value)
        (msgs,) = [inbox[self.active]] if set(inbox) == {self.active} else [None]
        if msgs is None:
            raise ProtocolError("vertical step: a passive party takes one message, from the label holder")
        replies = tuple(r for m in msgs for r in run.engine.handle(m))
        out = self._outbox(run, {self.active: replies})
        if run.engine.finished and run.part is not None:
            out[RecordKey.INFO] = {"partner": self.partner, "scored": int(run.engine.scored)}
            run.done = True
        elif run.engine.finished:
            out[RecordKey.INFO] = self._write_part(run_id, *run.engine.document())  # lookup.json (its thresholds) or weights.json
            self._checkpoint_path(run_id).unlink(missing_ok=True)
            run.done = True
        return out

    def _finish_active(self, run_id: str, run: _Run, result: Any) -> dict[str, Any]:
        from fedcollab.protocols.vertical import ActiveLrResult, ScoreResult, lr_model_document, model_document

        if isinstance(result, ScoreResult):
            # The scores stay here (vertical/<run>/scores.csv); the coordinator learns how many records were scored.
            info = self._write_scores(run_id, result)
            info.update(model="scoring", scored=result.intersection, intersection=result.intersection)
            run.done = True
            return {RecordKey.INFO: info, KIND: {"done": True}}
        if isinstance(result, ActiveLrResult):
            info = self._write_part(run_id, "model.json", lr_model_document(result.features, result.weights, result.intercept))
            info.update(model="vertical-logistic-regression", iterations=result.iterations)
        else:
            info = self._write_part(run_id, "model.json", model_document(result.model))
            info.update(model="secureboost", trees=len(result.model.trees), passive_splits=result.passive_splits)
        info.update(intersection=result.intersection, n_train=result.n_train, n_test=result.n_test, test_accuracy=result.test_accuracy)
        if np.isfinite(result.test_auc):
            info["test_auc"] = result.test_auc
        self._checkpoint_path(run_id).unlink(missing_ok=True)
        run.done = True
        return {RecordKey.INFO: info, KIND: {"done": True}}

    def _write_scores(self, run_id: str, result: Any) -> dict[str, Any]:
        import csv
        import io

        from fedcollab.node._home import _write_atomic

        if not run_id.replace("-", "").isalnum():
            raise ProtocolError("vertical: a run id must be letters, digits and dashes")
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        assert self.spec.vertical is not None
        w.writerow([self.spec.vertical.id_column, "score", "predicted"])
        for i, p in zip(result.ids, result.scores):
            w.writerow([i, repr(float(p)), int(p >= 0.5)])
        folder = self.home.root / "vertical" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        text = buf.getvalue()
        _write_atomic(folder / "scores.csv", text)
        return {"partner": self.partner, "model_part": f"vertical/{run_id}/scores.csv", "sha256": hashlib.sha256(text.encode()).hexdigest()}

    def _write_part(self, run_id: str, name: str, doc: dict[str, Any]) -> dict[str, Any]:
        from fedcollab.node._home import _write_atomic

        if not run_id.replace("-", "").isalnum():
            raise ProtocolError("vertical: a run id must be letters, digits and dashes")
        folder = self.home.root / "vertical" / run_id
        folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps(doc, allow_nan=True)
        _write_atomic(folder / name, text)
        return {"partner": self.partner, "model_part": f"vertical/{run_id}/{name}", "sha256": hashlib.sha256(text.encode()).hexdigest()}

    def countersign(self, run_id: str, close_line: bytes, coordinator_key: str) -> str:
        from fedcollab.node._home import countersign_close

        self.runs.pop(run_id, None)
        return countersign_close(self.gate.ledger, party=self.partner, run_id=run_id, close_line=close_line, coordinator_key=coordinator_key,
                                 partners=[p.name for p in self.spec.partners])


def _new_lines(node: VerticalNode, start: int) -> list[str]:
    return [ln.raw.decode() for ln in node.gate.ledger.lines() if ln.entry.get("party") == node.partner and int(ln.entry.get("seq", -1)) >= start]


def make_vertical_client_app(spec: Any, homes: dict[str, str], roster: dict[str, str]) -> Any:
    """The ClientApp of a node in a vertical ``spec`` (deployment): every message checked, answered or refused by code.

    Behind the training app's shell mod (``fedcollab.node._mods.shell_mod``): a failure leaves as
    its code and the node's new ledger entries, never text. The order of the vertical stages is the
    node's own (``VerticalNode.answer`` refuses a stage out of order, recorded).
    """
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedcollab.node._client import _partner_name
    from fedcollab.node._mods import current, shell_mod

    nodes: dict[str, VerticalNode] = {}

    def partner_of(context: Context) -> str | None:
        try:
            return _partner_name(spec, context.node_config)
        except Exception:  # noqa: BLE001 - unknown: the shell reports the refusal without a partner name
            return None

    def open_node(msg: Message, context: Context) -> VerticalNode:
        partner = _partner_name(spec, context.node_config)
        if partner not in homes:
            raise NodeCoded(NodeErrorCode.UNKNOWN_PARTNER)
        if partner not in nodes:
            nodes[partner] = VerticalNode(spec, partner, Path(homes[partner]), roster)
        node = nodes[partner]
        node.gate = node.home.gate(partner, node.dataset)  # the policy and ledger as they are now
        return node

    app = ClientApp(mods=[shell_mod(open_node, node_code_for, partner_of)])  # type: ignore[arg-type]

    def refuse_other(msg: Message, context: Context) -> Message:
        raise NodeCoded(NodeErrorCode.BAD_REQUEST)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node: VerticalNode = current()  # type: ignore[assignment]
        start = node.gate.ledger.head()[0]
        cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
        kind, run_id = str(cfg.get("fedcollab.kind", "")), str(cfg.get("fedcollab.run_id", ""))
        if kind == MessageKind.CLOSE:
            node.check(run_id)
            line = node.countersign(run_id, str(cfg["close"]).encode(), roster["coordinator"])
            return Message(content=RecordDict({RecordKey.RELEASES: ConfigRecord({"lines": json.dumps([line])})}), reply_to=msg)
        stage = str(cfg.get("vertical.stage", ""))
        if kind != KIND or stage not in STAGES:
            node.refuse(run_id, NodeErrorCode.BAD_REQUEST, f"not a vertical message (kind {kind!r}, stage {stage!r})")
        out, lines = node.answer(stage, run_id, cfg, msg.content.config_records)
        # A resumed run's hello also carries the entries an interruption kept from the run ledger (older than any new one).
        carried = lines if stage == "hello" else []
        content = RecordDict({k: ConfigRecord(v) for k, v in out.items()})
        content[RecordKey.RELEASES] = ConfigRecord({"lines": json.dumps(carried + _new_lines(node, start))})
        return Message(content=content, reply_to=msg)

    # train and evaluate are not vertical messages: refused with a code (through the same shell).
    app.train()(refuse_other)
    app.evaluate()(refuse_other)
    return app


__all__ = ["VerticalNode", "make_vertical_client_app", "psi_runs_joined", "vertical_policy_problem"]
