"""The coordinator's exchanges: one way to wait for replies (:class:`PollingGrid`) and one exchange helper (:class:`Link`).

:class:`Link` is how every training protocol's coordinator side talks to the nodes: one message
per partner, replies by partner, coded refusals and dropouts recorded once, every reply's ledger
entries accepted into the run ledger. The round loop, its strategies (plain, SecAgg+, HE), the
tree steps, the statistics runs and the vertical relay all use it.

:class:`PollingGrid`: push, then poll with a short interval that grows.

Flower's own ``send_and_receive`` sleeps a fixed interval between polls (0.1 s in the simulation
engine's in-memory Grid, 3 s in the deployment Grid), so every exchange costs at least that much
however fast the nodes answer; protocols with several exchanges per round (SecAgg+, the tree
steps) paid it several times. :class:`PollingGrid` wraps any Grid: the first poll comes after
``first`` seconds, each later one after 1.5 times the last, up to ``longest``. A reply that is in
after a few milliseconds is picked up after a few milliseconds; a slow stage costs at most
``longest`` of extra wait. ``check`` is called before every push and between polls (a raise stops
the exchange: Ctrl-C in simulation).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

#: The first wait between polls, and the growth factor of later ones.
FIRST_POLL_SECONDS = 0.002
POLL_GROWTH = 1.5


class PollingGrid:
    """A Grid whose ``send_and_receive`` polls for replies with a short, growing interval."""

    def __init__(self, grid: Any, *, longest: float = 0.05, first: float = FIRST_POLL_SECONDS,
                 check: Callable[[], None] | None = None) -> None:
        if not (0 < first <= longest):
            raise ValueError(f"poll intervals: expected 0 < first <= longest, got first={first!r}, longest={longest!r}")
        self._grid, self._first, self._longest, self._check = grid, first, longest, check

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> Any:  # noqa: D102
        if self._check is not None:
            self._check()
        return self._grid.get_node_ids()

    def send_and_receive(self, messages: Any, *, timeout: float | None = None, until: Callable[[list[Any]], bool] | None = None) -> list[Any]:
        """Push, then pull until every reply is in, ``until(replies so far)`` holds, or ``timeout`` passes (``None``: no limit)."""
        if self._check is not None:
            self._check()
        ids = set(self._grid.push_messages(messages))
        end = time.monotonic() + timeout if timeout is not None else None
        wait = self._first
        out: list[Any] = []
        while ids:
            got = list(self._grid.pull_messages(ids))
            out.extend(got)
            ids.difference_update(m.metadata.reply_to_message_id for m in got)
            if not ids or (until is not None and until(out)):
                break
            if self._check is not None:
                self._check()
            now = time.monotonic()
            if end is not None and now >= end:
                break
            time.sleep(wait if end is None else min(wait, max(end - now, 0.0)))
            wait = min(wait * POLL_GROWTH, self._longest)
        return out


class Link:
    """One run's exchanges with its nodes, written once for every protocol's coordinator side.

    ``exchange(rnd, message_type, {partner: (arrays, config, extra records)})`` pushes one message
    per partner, waits ``timeout`` for the replies and returns them by partner; a failed, refused
    or missing reply is a dropout (logged, recorded in ``recorder.failures``, absent from the
    result). Every reply's ledger entries are accepted into the run ledger (``collect_lines``).
    ``node_names`` (Flower node id -> partner) is filled once setup has named the nodes.
    """

    def __init__(self, grid: Any, *, ledger: Any, recorder: Any, timeout: float, partner_names: set[str]) -> None:
        self.grid, self.ledger, self.recorder, self.timeout = grid, ledger, recorder, timeout
        self.partner_names = partner_names
        self.node_names: dict[int, str] = {}

    def collect_lines(self, m: Any, party: str, rnd: int) -> None:
        """Accept a reply's ledger entries (verified against the party's roster key) into the run ledger."""
        from fedcollab.core import ProtocolError
        from fedcollab.protocols.wire import RecordKey

        rec = m.content.config_records.get(RecordKey.RELEASES)
        if rec is None:
            if RecordKey.ERROR in m.content.config_records:
                return
            raise ProtocolError("a reply without its ledger entries")
        self.ledger.accept(json.loads(str(rec["lines"])), party=party, round=rnd)

    def split_replies(self, replies: list[Any], rnd: int, node_names: dict[int, str] | None = None) -> tuple[list[Any], dict[str, int]]:
        """``(answered replies, {partner: code})``: Flower errors and nodes' coded refusals are failures, recorded once."""
        from fedcollab.core import NodeErrorCode, get_logger
        from fedcollab.protocols.wire import RecordKey

        names = self.node_names if node_names is None else node_names
        ok: list[Any] = []
        failed: dict[str, int] = {}
        for m in replies:
            name = names.get(m.metadata.src_node_id, f"node-{m.metadata.src_node_id}")
            if m.has_error():
                failed[name] = int(m.error.code) if m.error.code else int(NodeErrorCode.INTERNAL)
                continue
            if RecordKey.ERROR in m.content.config_records:
                err = m.content.config_records[RecordKey.ERROR]
                claimed = str(err.get("partner", ""))
                if m.metadata.src_node_id not in names and claimed in self.partner_names and claimed not in failed:
                    name = claimed  # before setup: the refusing node's partner name instead of its Flower node id
                failed[name] = int(err["code"])
                if name in names.values():
                    self.collect_lines(m, name, rnd)  # the node's refusal entries
            else:
                ok.append(m)
        for name, code in failed.items():
            self.recorder.failures.setdefault(name, []).append(code)
            get_logger("coordinator").warning("partner %s replied with error code %d (%s)", name, code, code_name(code))
        return ok, failed

    def send_and_split(self, msgs: list[Any], rnd: int, node_names: dict[int, str] | None = None) -> tuple[list[Any], dict[str, int]]:
        """Push ``msgs``, wait for the replies, split them (``split_replies``)."""
        return self.split_replies(list(self.grid.send_and_receive(msgs, timeout=self.timeout)), rnd, node_names)

    def exchange(self, rnd: int, message_type: str, per_node: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]]) -> dict[str, Any]:
        """One exchange with per-node content (arrays or None, config, extra ConfigRecords); replies by partner."""
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedcollab.core import get_logger
        from fedcollab.protocols.wire import RecordKey

        by_name = {v: k for k, v in self.node_names.items()}
        msgs = []
        for p, (arr, cfg, extra) in per_node.items():
            content = RecordDict({RecordKey.CONFIG: ConfigRecord(cfg), **{k: ConfigRecord(v) for k, v in extra.items()}})
            if arr is not None:
                content[RecordKey.ARRAYS] = arr
            msgs.append(Message(content=content, message_type=message_type, dst_node_id=by_name[p]))
        got, failed = self.send_and_split(msgs, rnd)
        if failed:
            get_logger("coordinator").warning("round %d %s: no answer from %s", rnd, message_type, sorted(failed))
        return self._by_partner(got, rnd)

    def _by_partner(self, got: list[Any], rnd: int) -> dict[str, Any]:
        """Answered replies by partner, their ledger entries accepted; a reply from an unnamed node is a ProtocolError."""
        from fedcollab.core import ProtocolError
        from fedcollab.protocols.wire import RecordKey

        out = {}
        for m in got:
            name = self.node_names.get(m.metadata.src_node_id)
            if name is None:
                raise ProtocolError("a reply from a node that did not name its partner")
            if RecordKey.RELEASES in m.content.config_records:
                self.collect_lines(m, name, rnd)
            out[name] = m
        return out

    def identify(self, replies: list[Any], *, strangers: bool = False) -> None:
        """Name the nodes from the partner their replies state (an INFO or ERROR record's ``partner``).

        For protocols without a setup stage (analytics, vertical): the first exchange names the
        nodes. A name outside the spec's partners, or one a second node claims, stops the run
        (ProtocolError); a node claiming another's name still cannot sign that party's ledger
        entries. With ``strangers`` a refusal from a node that names no partner of the spec (a
        node of another collaboration on the same SuperLink) leaves that node unnamed instead.
        """
        from fedcollab.core import ProtocolError
        from fedcollab.protocols.wire import RecordKey

        for m in replies:
            nid = m.metadata.src_node_id
            if m.has_error() or nid in self.node_names:
                continue
            recs = m.content.config_records
            info = recs.get(RecordKey.INFO) or recs.get(RecordKey.ERROR)
            if info is None or "partner" not in info:
                continue
            name = str(info["partner"])
            if strangers and name not in self.partner_names and RecordKey.ERROR in recs:
                continue
            if name not in self.partner_names or name in self.node_names.values():
                raise ProtocolError("unknown or duplicate partner identity")
            self.node_names[nid] = name

    def broadcast(self, rnd: int, message_type: str, cfg: dict[str, Any], node_ids: list[int], *,
                  strangers: bool = False) -> tuple[dict[str, Any], dict[str, int]]:
        """The same config to ``node_ids``: ``(replies by partner, {partner: code})``, the nodes named from their replies.

        A node that does not answer is a failure here (code INTERNAL, recorded like a refusal): the
        caller needs every partner's answer, not a quorum. Every reply's ledger entries are accepted.
        With ``strangers`` (every connected node asked, some of other collaborations): the exchange
        ends once every partner of the spec has answered, and a node that did not name one of them
        (refused, or silent) is left alone: not a failure, not named.
        """
        from flwr.app import ConfigRecord, Message, RecordDict

        from fedcollab.core import NodeErrorCode, get_logger
        from fedcollab.protocols.wire import RecordKey

        msgs = [Message(content=RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.run_id": self.ledger.run_id, **cfg})}),
                        message_type=message_type, dst_node_id=nid) for nid in node_ids]
        if strangers:  # (a PollingGrid's ``until``: the exchange is over once every partner of the spec has answered)
            replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout, until=lambda got: self.partner_names <= {_claimed(m) for m in got}))
        else:
            replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        self.identify(replies, strangers=strangers)
        if strangers:
            replies = [m for m in replies if m.metadata.src_node_id in self.node_names or _claimed(m) in self.partner_names]
        got, failed = self.split_replies(replies, rnd)
        out = self._by_partner(got, rnd)
        if strangers:
            silent = self.partner_names - set(out) - set(failed)  # a partner of the spec that never answered
        else:
            silent = {self.node_names.get(nid, f"node-{nid}") for nid in node_ids} - set(out) - set(failed)
        for name in sorted(silent):
            failed[name] = int(NodeErrorCode.INTERNAL)
            self.recorder.failures.setdefault(name, []).append(failed[name])
            get_logger("coordinator").warning("round %d %s: no answer from %s", rnd, message_type, name)
        return out, failed

    def secagg_sender(self, rnd: int) -> Callable[[str, dict[str, dict[str, Any]]], dict[str, dict[str, Any]]]:
        """``send(stage, {partner: request}) -> {partner: reply}``: one stand-alone exchange of a SecAgg+ stage of round ``rnd``."""
        from flwr.app import MessageType

        def send(stage: str, requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            cfg = {"fedcollab.kind": "secagg", "fedcollab.run_id": self.ledger.run_id, "secagg.stage": stage, "secagg.round": rnd}
            got = self.exchange(rnd, MessageType.QUERY, {p: (None, cfg, {"secagg": r}) for p, r in requests.items()})
            return {p: dict(m.content.config_records["secagg"]) for p, m in got.items() if "secagg" in m.content.config_records}

        return send

    def roster_keys(self) -> dict[str, str]:
        """Every roster party's Ed25519 public key (hex)."""
        return {k: v.signing_key for k, v in self.ledger.roster.parties.items()}


def _claimed(m: Any) -> str | None:
    """The partner a reply names (its INFO or ERROR record's ``partner``), None if it names none."""
    from fedcollab.protocols.wire import RecordKey

    if m.has_error():
        return None
    recs = m.content.config_records
    rec = recs.get(RecordKey.INFO) or recs.get(RecordKey.ERROR)
    return str(rec["partner"]) if rec is not None and "partner" in rec else None


def wait_for_nodes(grid: Any, n: int, timeout: float) -> list[int]:
    """The Flower node ids connected once at least ``n`` are (sorted); TransportError after ``timeout`` seconds."""
    import time

    from fedcollab.core import TransportError

    deadline = time.monotonic() + timeout
    while len(node_ids := sorted(grid.get_node_ids())) < n:
        if time.monotonic() > deadline:
            raise TransportError(f"only {len(node_ids)} of {n} nodes connected")
        time.sleep(0.1)
    return node_ids


def code_name(code: int) -> str:
    """The node error code's name (``FLOWER_ERROR`` for a Flower error code)."""
    from fedcollab.core import NodeErrorCode

    try:
        return NodeErrorCode(code).name
    except ValueError:
        return "FLOWER_ERROR"
