"""The partner's protections as Flower mods: they wrap every message the node's ClientApp answers.

``make_client_app`` is the node's one ClientApp; it routes each message by its kind to a protocol's
adapter. The training adapter is ``ClientApp(mods=[shell_mod(...), policy_mod, order_mod])``; Flower
wraps every registered handler (query, train, evaluate) in the same chain, outermost first:

* :func:`shell_mod` opens the node for the message (its own spec, policy and ledger: never a spec
  the message carries) and turns any failure below it into a closed code plus the node's new ledger
  entries (the recorded refusals); exception text stays in the node's log;
* :func:`policy_mod` checks the request against the node's policy on **every** message, before any
  handler runs (``NodeRuntime.check_policy``, then the custom-model allow-list: a target the policy
  does not list is refused as text, nothing is imported);
* :func:`order_mod` keeps the node's own record of where the run stands (setup done, last round
  trained and evaluated, the secure-aggregation stage of every open round, close) in the node's
  Flower context state, and refuses a message out of order with ``OUT_OF_ORDER``, recorded in the
  ledger, before anything is computed or released. :func:`order_problem` is the pure rule.

The node the shell opened travels to the inner mods and the handler in a context variable
(:func:`current`), set for exactly one message.

The statistics adapter (``fedcollab.node._analytics``) uses the same shell, with
:func:`analytics_order_mod` for its own order (checks, one query with its SecAgg+ stages or one
profile, the close); :func:`analytics_order_problem` is its pure rule. The vertical adapter
(``fedcollab.node._vertical``) uses the same shell and keeps its run's order itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcollab.core import FedcollabError, NodeCoded, NodeErrorCode, PolicyRefused, get_logger
from fedcollab.protocols.wire import MessageKind, RecordKey

if TYPE_CHECKING:
    from flwr.app import Context, Message

    from fedcollab.node._client import NodeRuntime
    from fedcollab.spec import Spec

log = get_logger("node")

#: The node's own protocol-order record in ``context.state`` (shared with the handlers' step counter).
STATE = "fedcollab"
#: Where the handlers keep a round's SecAgg+ node state (``{SECAGG_STATE}.{round}``).
SECAGG_STATE = "fedcollab.secagg.state"
#: Slots of a message that may carry a secagg stage, in the order they are answered.
SECAGG_SLOTS = ("secagg", "secagg.next")
#: The node's protocol stage a wire stage needs (``advertise`` needs no state for its round).
NEEDS_STAGE = {"share": "share", "masked": "masked-input", "consistency": "consistency", "unmask": "unmask"}
#: The node's protocol stage once a wire stage is answered (the consistency stage sits between masked input and unmask).
AFTER_STAGE = {"share": "masked-input", "masked": "consistency", "consistency": "unmask", "unmask": "done"}


Coded = NodeCoded  # a refusal that leaves as its code (fedcollab.core.NodeCoded)


@dataclass(frozen=True)
class Request:
    """What a message asks, read from its type and config only (the spec is the node's own)."""

    category: str  # train | evaluate | query
    kind: str  # fedcollab.kind (setup, close, secagg, he, ...) or ""
    run_id: str
    round: int | None  # server-round
    evaluate_round: int | None  # a previous round's evaluation riding on a train message
    stages: tuple[tuple[str, str, int], ...]  # (slot, wire stage, round)

    @property
    def what(self) -> str:
        """A short name for the ledger's refusal reason."""
        if self.category == "query":
            return self.kind or "query"
        return self.category


def _int_or_none(cfg: Any, key: str) -> int | None:
    if key not in cfg:
        return None
    value = cfg[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise Coded(NodeErrorCode.BAD_REQUEST)
    return int(value)


def read_request(msg: Message) -> Request:
    """The request a Flower message carries; a malformed config is ``BAD_REQUEST``."""
    from flwr.app import ConfigRecord

    cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
    stages = []
    for slot in SECAGG_SLOTS:
        if f"{slot}.stage" in cfg:
            rnd = _int_or_none(cfg, f"{slot}.round")
            if rnd is None:
                raise Coded(NodeErrorCode.BAD_REQUEST)
            stages.append((slot, str(cfg[f"{slot}.stage"]), rnd))
    return Request(category=msg.metadata.message_type.split(".")[0], kind=str(cfg.get("fedcollab.kind", "")),
                   run_id=str(cfg.get("fedcollab.run_id", "")), round=_int_or_none(cfg, "server-round"),
                   evaluate_round=_int_or_none(cfg, "fedcollab.evaluate_round"), stages=tuple(stages))


@dataclass(frozen=True)
class OrderState:
    """Where the run stands at this node (from its own context state)."""

    setup_done: bool = False
    run_id: str = ""
    closed: bool = False
    trained: int = 0  # last round trained
    evaluated: int = 0  # last round evaluated
    secagg_done: int = -1  # last secagg round unmasked (0 = the statistics round)
    secagg_stage: Callable[[int], str | None] = lambda rnd: None  # the node's protocol stage of an open round


def spec_rounds(spec: Spec) -> int:
    """The run's rounds as the order counts them: training rounds, or (gbdt) the model's tree steps."""
    if spec.model.kind == "gbdt":
        from fedcollab.protocols import gbdt

        return gbdt.max_steps(spec)
    return spec.training.rounds


#: The query kinds of a training run (its setup and close, its SecAgg+ and HE stages).
TRAINING_QUERY_KINDS = frozenset({str(MessageKind.SETUP), str(MessageKind.CLOSE), "secagg", "he"})


def order_problem(spec: Spec, req: Request, at: OrderState) -> tuple[NodeErrorCode, str] | None:
    """Why ``req`` is out of order at a node where the run stands at ``at`` (None: in order)."""
    out = NodeErrorCode.OUT_OF_ORDER
    rounds = spec_rounds(spec)
    if req.category == "query" and req.kind not in TRAINING_QUERY_KINDS:
        # Another protocol's message (a statistics query, a vertical stage) sent to a training run: not offered here.
        return NodeErrorCode.BAD_REQUEST, f"a query of kind {req.kind!r}, which a training run does not answer"
    if at.closed:
        return out, f"{req.what} after the run's close"
    if req.category == "query" and req.kind == MessageKind.SETUP:
        return (out, "a second setup") if at.setup_done else None
    if not at.setup_done:
        return out, f"{req.what} before setup"
    if req.run_id != at.run_id:
        return out, f"{req.what} of another run than the one set up"
    if req.category in {"train", "evaluate"}:
        r = req.round
        last = at.trained if req.category == "train" else at.evaluated
        if r is None or not 1 <= r <= rounds:
            return out, f"{req.category} of round {r}, outside the spec's rounds 1..{rounds}"
        if r <= last:
            return out, f"{req.category} of round {r}, already answered up to round {last}"
        if req.category == "train" and spec.aggregation == "secagg" and ("secagg", "masked", r) not in req.stages:
            # The update would wait at the node with nothing to release it: refuse before training (and charging).
            return out, f"train of round {r} without its masked-input stage"
    if req.evaluate_round is not None:
        e = req.evaluate_round
        if req.category != "train" or not (at.evaluated < e < (req.round or 0)):
            return out, f"evaluation of round {e} out of order"
    if req.stages and spec.aggregation != "secagg":
        return NodeErrorCode.POLICY_REFUSED, "secure-aggregation stages in a run without secagg"
    seen: dict[int, str | None] = {}
    for _slot, stage, rnd in req.stages:
        have = seen[rnd] if rnd in seen else at.secagg_stage(rnd)
        if stage == "advertise":
            if have is not None or rnd <= at.secagg_done or not 0 <= rnd <= rounds:
                return out, f"secagg advertise of round {rnd} after that round began or ended"
            seen[rnd] = "share"
        elif stage in NEEDS_STAGE:
            if have != NEEDS_STAGE[stage]:
                return out, f"secagg {stage} of round {rnd} before the round's earlier stages"
            if stage == "masked" and rnd > 0 and req.category != "train":
                return out, f"secagg masked input of round {rnd} without its training"
            seen[rnd] = AFTER_STAGE[stage]
        else:
            return NodeErrorCode.BAD_REQUEST, f"unknown secagg stage {stage!r}"
    return None


# --- the message-local node ------------------------------------------------------------------------------

_CURRENT: ContextVar[NodeRuntime | None] = ContextVar("fedcollab_node", default=None)


def current() -> NodeRuntime:
    """The node the shell opened for the message being answered."""
    node = _CURRENT.get()
    if node is None:
        raise RuntimeError("no node is open: the handler ran outside the node's shell mod")
    return node


@contextmanager
def _opened(node: NodeRuntime) -> Iterator[None]:
    token = _CURRENT.set(node)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def coded_reply(msg: Message, code: NodeErrorCode, lines: list[str], partner: str | None = None) -> Message:
    """The only reply a refusal gets: its code, the node's new ledger entries and (when known) its partner name.

    The partner's name is its public identity (as in its setup reply), so a refusal before setup is
    reported by partner, not by Flower node id; never the exception's text.
    """
    import json

    from flwr.app import ConfigRecord, Message, RecordDict

    err: dict[str, int | str] = {"code": int(code)}
    if partner is not None:
        err["partner"] = str(partner)
    content = RecordDict({RecordKey.ERROR: ConfigRecord(err)})
    if lines:
        content[RecordKey.RELEASES] = ConfigRecord({"lines": json.dumps(lines)})
    return Message(content=content, reply_to=msg)


def shell_mod(open_node: Callable[[Message, Context], NodeRuntime], code_for: Callable[[BaseException], NodeErrorCode],
              partner_of: Callable[[Context], str | None] = lambda ctxt: None) -> Any:
    """The outermost mod: open the node for the message; a failure below leaves as a code and its ledger entries.

    ``partner_of`` names this node's partner from its own configuration (None if it cannot tell),
    so a refusal raised while opening the node (its data unreadable, say) still says whose it is.
    """

    def mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
        node: NodeRuntime | None = None
        start = 0
        partner: str | None = None
        try:
            partner = partner_of(ctxt)
            node = open_node(msg, ctxt)
            start = node.gate.ledger.head()[0]
            with _opened(node):
                return call_next(msg, ctxt)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code
            code = code_for(exc)
            # Text and traceback stay in this node's log; only the code and ledger entries leave.
            log.error("node %s refused %s: %s (%s)", node.partner if node else (partner or "?"), msg.metadata.message_type, code.name, exc,
                      exc_info=not isinstance(exc, FedcollabError))
            new = []
            if node is not None:
                new = [ln.raw.decode() for ln in node.gate.ledger.lines()
                       if ln.entry.get("party") == node.partner and int(ln.entry.get("seq", -1)) >= start]
            return coded_reply(msg, code, new, partner=node.partner if node is not None else partner)

    return mod


def _refuse(node: NodeRuntime, code: NodeErrorCode, reason: str, round_: int) -> None:
    node.gate.refuse_request(run_id=node.run_id, round=round_, code=int(code), reason=reason)
    raise Coded(code)


def policy_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """The node's policy on every message: the spec against the policy, then the custom-model allow-list."""
    node = current()
    node.check_policy()  # records its refusal and raises PolicyRefused
    model = node.spec.model
    if model.kind == "custom" and not node.policy.allows_custom_model(model.target):
        # Compared as text: the module the target names is never imported.
        node.gate.refuse_request(run_id=node.run_id, round=0, code=int(NodeErrorCode.POLICY_REFUSED),
                                 reason="policy does not list the custom model target")
        raise PolicyRefused("custom model target not in the policy's allowed_custom_models")
    return call_next(msg, ctxt)


def _state(ctxt: Context) -> Any:
    from flwr.app import ConfigRecord

    if STATE not in ctxt.state.config_records:
        ctxt.state[STATE] = ConfigRecord({"steps": 0})
    return ctxt.state.config_records[STATE]


def order_state(ctxt: Context) -> OrderState:
    """Where the run stands at this node, from its Flower context state."""
    st = _state(ctxt)

    def secagg_stage(rnd: int) -> str | None:
        rec = ctxt.state.config_records.get(f"{SECAGG_STATE}.{rnd}")
        return None if rec is None else str(rec.get("stage", ""))

    return OrderState(setup_done=bool(st.get("setup_done", False)), run_id=str(st.get("order.run_id", "")),
                      closed=bool(st.get("order.closed", False)), trained=int(st.get("order.trained", 0)),
                      evaluated=int(st.get("order.evaluated", 0)), secagg_done=int(st.get("order.secagg_done", -1)),
                      secagg_stage=secagg_stage)


def order_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Refuse (and record) a message out of the run's order; advance the order after an answered one."""
    node = current()
    req = read_request(msg)
    problem = order_problem(node.spec, req, order_state(ctxt))
    if problem is not None:
        _refuse(node, problem[0], problem[1], req.round or 0)
    reply = call_next(msg, ctxt)
    if RecordKey.ERROR in reply.content.config_records:
        return reply
    st = _state(ctxt)
    if req.category == "query" and req.kind == MessageKind.SETUP:
        st["order.run_id"] = req.run_id
    elif req.category == "query" and req.kind == MessageKind.CLOSE:
        st["order.closed"] = True
    if req.category == "train" and req.round is not None:
        st["order.trained"] = req.round
    if req.category == "evaluate" and req.round is not None:
        st["order.evaluated"] = req.round
    elif req.evaluate_round is not None:
        st["order.evaluated"] = req.evaluate_round
    for _slot, stage, rnd in req.stages:
        if stage == "unmask":
            st["order.secagg_done"] = max(int(st.get("order.secagg_done", -1)), rnd)
    return reply


# --- analytics runs (query or profile): their own order ---------------------------------------------

#: Where an analytics run's order record lives in ``context.state``.
ANALYTICS_ORDER = "fedcollab.analytics.order"
#: The analytics kinds that release something about the node's rows (one of them per run).
ANALYTICS_RELEASES = ("analytics.query", "analytics.profile")


@dataclass(frozen=True)
class AnalyticsOrder:
    """Where an analytics run stands at this node: its run id, what it released, whether it closed."""

    run_id: str = ""
    released: str = ""  # the release kind answered ("analytics.query" / "analytics.profile"), or ""
    closed: bool = False


def analytics_order_problem(kind: str, run_id: str, round_: int | None, at: AnalyticsOrder) -> tuple[NodeErrorCode, str] | None:
    """Why an analytics message is out of order (``(OUT_OF_ORDER, reason)``), or None; the pure rule.

    An analytics run is one release: checks, then **one** query (with its SecAgg+ stages, all in
    round 1) or one profile, then the close. Nothing is answered after the close or under another
    run id than the run's first message's; a secure-aggregation stage needs the query answered; a
    second query or profile in the same run is refused (it would be a second release the
    coordinator's plan did not announce).
    """
    out = NodeErrorCode.OUT_OF_ORDER
    if at.closed:
        return out, "a message after the run's close"
    if at.run_id and run_id != at.run_id:
        return out, "a message of another run"
    if kind in ANALYTICS_RELEASES and at.released:
        return out, "a second release in one analytics run"
    if kind == "secagg":
        if at.released != "analytics.query":
            return out, "a secure-aggregation stage before the query"
        if round_ != 1:
            return out, "a secure-aggregation stage of another round than the query's"
    return None


def analytics_order_mod(msg: Message, ctxt: Context, call_next: Any) -> Message:
    """Refuse (and record) an analytics message out of the run's order; advance the order after an answered one."""
    from flwr.app import ConfigRecord

    node = current()
    cfg = msg.content.config_records.get(RecordKey.CONFIG)
    kind = str(cfg.get("fedcollab.kind", "")) if cfg is not None else ""
    run_id = str(cfg.get("fedcollab.run_id", "")) if cfg is not None else ""
    raw_round = cfg.get("secagg.round") if cfg is not None else None
    round_ = int(raw_round) if isinstance(raw_round, int) and not isinstance(raw_round, bool) else None
    rec = ctxt.state.config_records.get(ANALYTICS_ORDER)
    at = AnalyticsOrder(run_id=str(rec.get("run_id", "")), released=str(rec.get("released", "")), closed=bool(rec.get("closed", False))) \
        if rec is not None else AnalyticsOrder()
    problem = analytics_order_problem(kind, run_id, round_, at)
    if problem is not None:
        _refuse(node, problem[0], problem[1], 0)
    reply = call_next(msg, ctxt)
    if RecordKey.ERROR in reply.content.config_records:
        return reply
    ctxt.state[ANALYTICS_ORDER] = ConfigRecord({"run_id": at.run_id or run_id,
                                                "released": kind if kind in ANALYTICS_RELEASES else at.released,
                                                "closed": at.closed or kind == "analytics.close"})
    return reply


__all__ = ["AnalyticsOrder", "Coded", "OrderState", "Request", "analytics_order_mod", "analytics_order_problem", "current", "order_mod",
           "order_problem", "order_state", "policy_mod", "read_request", "shell_mod"]
