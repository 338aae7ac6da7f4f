"""The node in deployment: a task executor the partner runs, with code the partner installed.

``fedcollab node start`` starts Flower's SuperNode with ``--isolation process``: the SuperNode
talks to the SuperLink (TLS, node authentication) and queues each incoming message as a task on
its loopback Runtime API; it starts nothing itself. :func:`serve` is the only executor that may
take those tasks (the Runtime API's ``AcquireTask`` is authenticated with a secret the node
writes at start). For each task it

1. pulls the message, the run's context and its bundle (FAB) from the SuperNode;
2. checks the bundle: its SHA-256 must be one the partner approved (by default the bundle its
   own fedcollab builds, :func:`approved_bundle_sha256`) — otherwise it answers with code
   ``UNAPPROVED_BUNDLE`` and nothing else;
3. checks the spec: the SHA-256 of the spec bytes in the run config must name a spec the
   partner approved (``fedcollab node approve``: ``HOME/approved/<sha256>.toml``) — otherwise
   every message of the run is answered with code ``SPEC_NOT_APPROVED`` and nothing else,
   before any data is read;
4. answers with the ClientApp of the fedcollab **installed at the node** (never code from the
   bundle, which is not even unpacked), built from the node's **own approved copy** of the
   spec, the node's folder, its data path (node config ``data``) and its roster; the policy
   checks, the budget gate and the ledger are those of :mod:`fedcollab.node._client`;
5. writes one line per outgoing message to the egress log (``HOME/egress.jsonl``): time, run,
   message type, round, size in bytes, SHA-256 commitment of the content (Flower's object id of
   the record dict), the record names, the error code if any, and the kinds of ledger entries
   it carries;
6. pushes the reply and the updated context back to the SuperNode.

One long-lived process answers every message: torch is imported once, not once per message as
with Flower's own ``flwr-clientapp`` processes.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollab.core import ConfigError, NodeErrorCode, get_logger, node_code_for
from fedcollab.protocols.wire import RecordKey

log = get_logger("node.deploy")

#: The Flower app the node serves (publisher/name in the bundle's pyproject.toml).
FAB_ID = "fedcollab/fedcollab-deploy"
RUN_CONFIG_SPEC = "fedcollab-spec"  # the run config key carrying the spec (base64 TOML)
DEPLOY_APP_TOML = Path(__file__).resolve().parents[1] / "templates" / "deploy-app.toml"


def build_bundle() -> tuple[bytes, str]:
    """The deployment bundle built from this installation's ``deploy-app.toml`` (deterministic), and its SHA-256."""
    import warnings

    from flwr.cli.build import build_fab_from_files

    with warnings.catch_warnings():
        # Flower's file filter uses pathspec's deprecated 'gitwildmatch' patterns (not ours to fix).
        warnings.simplefilter("ignore", DeprecationWarning)
        fab, _ = build_fab_from_files({"pyproject.toml": DEPLOY_APP_TOML.read_bytes()})
    return fab, hashlib.sha256(fab).hexdigest()


def approved_bundle_sha256() -> str:
    """SHA-256 of the bundle this node's own fedcollab builds: the default pin."""
    return build_bundle()[1]


@dataclass
class EgressLog:
    """Append-only log of every message that leaves the node (``egress.jsonl``)."""

    path: Path
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, reply: Any, *, flower_run_id: int, fab_sha256: str | None) -> dict[str, Any]:
        """Describe ``reply`` (a Flower Message) in one line; returns the entry."""
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

        entry: dict[str, Any] = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "flower_run_id": flower_run_id,
                                 "message_type": reply.metadata.message_type, "bundle_sha256": fab_sha256}
        if reply.has_error():
            entry.update(run_id=None, round=None, bytes=0, content_sha256=None, records=[], error_code=int(reply.error.code), ledger_kinds=[])
        else:
            content = reply.content
            objects = get_all_nested_objects(content)
            cfgs = content.config_records
            err = cfgs.get(RecordKey.ERROR)
            kinds: list[str] = []
            rel = cfgs.get(RecordKey.RELEASES)
            if rel is not None:
                kinds = [str(json.loads(line).get("kind")) for line in json.loads(str(rel["lines"]))]
            entry.update(
                run_id=_run_id_of(reply),
                round=_round_of(reply),
                bytes=int(sum(len(o.deflate()) for o in objects.values())),
                content_sha256=content.object_id,
                records=sorted(content.keys()),
                error_code=int(err["code"]) if err is not None else None,
                ledger_kinds=kinds,
            )
        line = json.dumps(entry, sort_keys=True)
        with self._lock, open(self.path, "a") as fh:
            fh.write(line + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        return entry


_REQUEST: dict[str, Any] = {}  # message_id -> (fedcollab run id, round) of the request being answered


def _run_id_of(reply: Any) -> str | None:
    return _REQUEST.get(reply.metadata.reply_to_message_id, (None, None))[0]


def _round_of(reply: Any) -> int | None:
    return _REQUEST.get(reply.metadata.reply_to_message_id, (None, None))[1]


def _remember_request(message: Any) -> None:
    cfg = message.content.config_records.get(RecordKey.CONFIG) if message.has_content() else None
    run_id = str(cfg.get("fedcollab.run_id")) if cfg is not None and "fedcollab.run_id" in cfg else None
    rnd: int | None = None
    if cfg is not None:
        for k in ("server-round", "secagg.round"):
            if k in cfg:
                rnd = int(cfg[k])
                break
    if rnd is None and message.metadata.group_id.isdigit():
        rnd = int(message.metadata.group_id)
    if rnd is None and cfg is not None and "fedcollab.kind" in cfg:
        rnd = 0
    _REQUEST.clear()
    _REQUEST[message.metadata.message_id] = (run_id, rnd)


@dataclass
class NodeDeployment:
    """What a deployed node knows about itself (all local, none of it from the coordinator)."""

    home: Path
    partner: str
    data: Path
    roster: dict[str, str]  # party -> Ed25519 public key (hex), the coordinator included
    approved_bundles: frozenset[str]
    _apps: dict[str, Any] = field(default_factory=dict)
    _refused: set[tuple[int, str]] = field(default_factory=set)  # (Flower run id, spec key) refused in that run

    def client_app(self, run_config: Any, *, flower_run_id: int | None = None) -> Any:
        """The installed ClientApp for the spec in ``run_config``, built from the node's OWN approved copy.

        The SHA-256 of the spec bytes the run config carries selects ``approved/<sha256>.toml`` in
        the node folder (:func:`approved_run_spec`); the ClientApp is built from that copy, once per
        spec. A spec the partner has not approved gets :func:`refusing_app`: every message is
        answered with ``SPEC_NOT_APPROVED`` alone, before any data is read. A refusal is remembered
        for its Flower run only (``flower_run_id``): the rest of that run is refused as well, and a
        spec approved afterwards is checked afresh, and accepted, in the next run.
        """
        from fedcollab.core import NodeCoded

        value = str(run_config.get(RUN_CONFIG_SPEC, ""))
        key = hashlib.sha256(value.encode()).hexdigest()
        if key in self._apps:
            if self._still_approved(value):
                return self._apps[key]
            self._apps.clear()  # the partner withdrew the approval: checked afresh below, and refused
        if flower_run_id is not None and (flower_run_id, key) in self._refused:
            return refusing_app(NodeErrorCode.SPEC_NOT_APPROVED, self.partner)
        try:
            own = approved_run_spec(self.home, value)
        except NodeCoded as exc:
            if flower_run_id is not None:
                if len(self._refused) >= 64:
                    self._refused.clear()
                self._refused.add((flower_run_id, key))
            return refusing_app(exc.code, self.partner)
        from fedcollab.node._client import make_client_app

        spec = local_spec(own, self.partner, self.data)
        self._apps.clear()
        self._apps[key] = make_client_app(spec, {self.partner: str(self.home)}, self.roster)
        return self._apps[key]


    def _still_approved(self, value: str) -> bool:
        """Whether the approved copy of the run config's spec is still in the node folder (an approval can be withdrawn)."""
        import base64
        import binascii

        from fedcollab.node._home import NodeHome

        try:
            sent = base64.b64decode(value.encode("ascii"), validate=True)
        except (ValueError, binascii.Error):
            return False
        return NodeHome(Path(self.home)).approved_spec(sent) is not None


def refusing_app(code: NodeErrorCode, partner: str | None = None) -> Any:
    """A ClientApp that answers every message with ``code`` alone (and the partner's public name), computing nothing.

    The reply is the node's usual coded refusal (:func:`fedcollab.node._mods.coded_reply`, with no
    ledger entries); each refused message is logged here, and the executor logs it in the egress log.
    """
    from flwr.app import Context, Message
    from flwr.clientapp import ClientApp

    from fedcollab.node._mods import coded_reply

    app = ClientApp()

    def _refuse(msg: Message, context: Context) -> Message:
        log.error("node %s refused %s: %s", partner or "?", msg.metadata.message_type, code.name)
        return coded_reply(msg, code, [], partner=partner)

    app.query()(_refuse)
    app.train()(_refuse)
    app.evaluate()(_refuse)
    return app


def local_spec(spec: Any, partner: str, data: Path) -> Any:
    """The spec with this partner's data source replaced by the node's own file (other partners' untouched)."""
    from fedcollab.spec import SourceSpec

    partners = [p.model_copy(update={"source": SourceSpec(path=str(data.resolve()))}) if p.name == partner else p for p in spec.partners]
    return spec.model_copy(update={"partners": partners})


def approved_run_spec(home: Path, value: str) -> Any:
    """The node's OWN approved copy of the spec the run config names (issue 14 item 1), parsed.

    The SHA-256 of the coordinator's spec bytes selects ``approved/<sha256>.toml`` in the node
    folder; if there is none the refusal is logged here and ``NodeCoded(SPEC_NOT_APPROVED)`` is
    raised (:meth:`NodeDeployment.client_app` then answers with that code alone).
    """
    import base64
    import binascii

    from fedcollab.core import NodeCoded
    from fedcollab.node._home import NodeHome

    try:
        sent = base64.b64decode(value.encode("ascii"), validate=True)
    except (ValueError, binascii.Error):
        raise ConfigError(f"run config `{RUN_CONFIG_SPEC}` must be base64 UTF-8 TOML") from None
    own = NodeHome(Path(home)).approved_spec(sent)
    if own is None:
        get_logger(__name__).warning("refused a run: spec sha256 %s is not approved in %s",
                                     hashlib.sha256(sent).hexdigest(), home)
        raise NodeCoded(NodeErrorCode.SPEC_NOT_APPROVED)
    return decode_run_spec(base64.b64encode(own).decode("ascii"))


def decode_run_spec(value: str) -> Any:
    """The spec carried by the run config (base64 TOML, as ``fedcollab submit`` sends it)."""
    import base64
    import tomllib

    from fedcollab.spec import parse_spec

    try:
        data = tomllib.loads(base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8"))
    except ValueError as exc:  # binascii, Unicode and TOML errors are all ValueErrors
        raise ConfigError(f"run config `{RUN_CONFIG_SPEC}` must be base64 UTF-8 TOML, got {len(value)} characters that are not "
                          f"({type(exc).__name__})") from None
    return parse_spec(data, source="the run's spec")




def _coded_reply(message: Any, code: NodeErrorCode) -> Any:
    from flwr.app import ConfigRecord, Message, RecordDict

    return Message(content=RecordDict({RecordKey.ERROR: ConfigRecord({"code": int(code)})}), reply_to=message)


#: One ClientApp call at a time: the node's ledger is appended by one writer (an abandoned task
#: still computing finishes before the next one starts).
_APP_LOCK = threading.Lock()
#: Seconds a task may wait for its input. A message whose run was interrupted (the SuperLink
#: restarted while the SuperNode was pulling it) never completes; its task is abandoned.
PULL_TIMEOUT = 20.0


def task_heartbeat(client: Any, gone: threading.Event) -> Callable[[], bool]:
    """A task's heartbeat to the SuperNode, as Flower's ``make_task_heartbeat_fn_http`` but without its SIGINT.

    Flower's raises SIGINT in the whole process when the SuperNode no longer knows the task (it
    has finished, or its run was interrupted and the task abandoned). In a ClientApp process of
    its own that ends one task; here the tasks run in the node's process, whose SIGINT handler
    stops the node, so a heartbeat racing a finished or abandoned task would shut the partner's
    node down. This one only sets ``gone``; transport errors and 503/504 are retried (False).
    """
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest  # pylint: disable=E0611

    req = SendTaskHeartbeatRequest()

    def fn() -> bool:
        try:
            res = client.SendTaskHeartbeat(req)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as err:
            if err.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            gone.set()  # e.g. the task's token is no longer valid: the task is over
            return True
        if not res.success:
            gone.set()
        return True

    return fn


def handle_task(node: NodeDeployment, egress: EgressLog, *, runtime_address: str, token: str, pulled: threading.Event | None = None,
                stale: threading.Event | None = None) -> None:
    """Answer one task: pull, check the bundle, run the installed ClientApp, log egress, push.

    A task marked ``stale`` before its reply is ready (the SuperNode moved on to a newer message:
    the task's run was interrupted) pushes no reply; whatever it charged stays charged.
    """
    from flwr.common.constant import SubStatus
    from flwr.supercore.heartbeat import HeartbeatSender
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"), RuntimeTokenHttpInterceptor(token)],
        retry_invoker=make_simple_http_retry_invoker(),
    )
    heartbeat = HeartbeatSender(task_heartbeat(client, threading.Event()))
    heartbeat.start()
    context = None
    sub_status, details = SubStatus.FAILED, "fedcollab node: task failed"
    try:
        message, context, run, fab = pull_task_input(client)
        if pulled is not None:
            pulled.set()
        _remember_request(message)
        fab_sha = hashlib.sha256(fab.content).hexdigest()
        if fab_sha != fab.hash_str or fab_sha not in node.approved_bundles or run.fab_id != FAB_ID:
            # The bundle is never unpacked; its hash is not one the partner approved.
            log.error("run %s: bundle %s (%s) is not approved; refused", run.run_id, fab_sha[:12], run.fab_id)
            reply = _coded_reply(message, NodeErrorCode.UNAPPROVED_BUNDLE)
        else:
            try:
                with _APP_LOCK:
                    app = node.client_app(context.run_config, flower_run_id=int(run.run_id))
                    reply = app(message=message, context=context)
            except Exception as exc:  # noqa: BLE001 - text stays here; a code leaves
                log.error("run %s: the ClientApp could not answer: %s", run.run_id, type(exc).__name__, exc_info=True)
                reply = _coded_reply(message, node_code_for(exc))  # a spec that does not decode or parse: BAD_REQUEST
        if stale is not None and stale.is_set():
            log.warning("run %s: a newer message arrived before this reply was ready (run interrupted); reply dropped", run.run_id)
            return
        entry = egress.record(reply, flower_run_id=int(run.run_id), fab_sha256=fab_sha)
        log.info("egress: %s round %s, %d bytes, code %s", entry["message_type"], entry["round"], entry["bytes"], entry["error_code"])
        push_message(client, reply, context)
        sub_status, details = SubStatus.COMPLETED, ""
    finally:
        # The heartbeat stops before the task's output is pushed: after it, the SuperNode no longer knows the task.
        if heartbeat.is_running:
            heartbeat.stop()
        push_task_output(client=client, context=context, sub_status=sub_status, details=details)
        client.close()


def serve(node: NodeDeployment, *, runtime_address: str, secret: bytes, stop: threading.Event, poll: float = 0.1) -> None:
    """Take the SuperNode's tasks one at a time until ``stop`` is set."""
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    egress = EgressLog(node.home / "egress.jsonl")
    import fedcollab.node._client  # noqa: F401 - torch and the node's code, imported once, before the first message
    import fedcollab.node._training  # noqa: F401

    client = RuntimeHttpClient.from_server_address(
        server_address=runtime_address, insecure=True, root_certificates=None,
        interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                      SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods=frozenset({"/flwr.proto.Runtime/AcquireTask"}))],
        retry_invoker=make_simple_http_retry_invoker(),
    )

    def run_task(token: str, pulled: threading.Event, stale: threading.Event) -> None:
        try:
            handle_task(node, egress, runtime_address=runtime_address, token=token, pulled=pulled, stale=stale)
        except Exception:  # noqa: BLE001 - one failed task must not stop the node
            log.exception("task failed")

    current: threading.Thread | None = None
    pulled, stale = threading.Event(), threading.Event()
    started = 0.0
    try:
        while not stop.is_set():
            busy = current is not None and current.is_alive()
            if busy and not pulled.is_set() and time.monotonic() - started < PULL_TIMEOUT:
                stop.wait(poll)
                continue
            # The SuperNode hands over one message at a time and waits for its reply, so a task
            # that appears while another is still running means the SuperNode gave up on the
            # older one (its run was interrupted while the message was in transit).
            try:
                res = client.AcquireTask(AcquireTaskRequest(supported_task_types=[str(TaskType.CLIENT_APP)]))
            except Exception as exc:  # noqa: BLE001 - the SuperNode may still be starting
                log.debug("AcquireTask failed: %s", type(exc).__name__)
                stop.wait(0.5)
                continue
            if res.HasField("task") and res.token:
                if busy:
                    log.warning("a newer message arrived while a task was %s: the older run was interrupted; it is abandoned",
                                "running" if pulled.is_set() else "waiting for its input")
                    stale.set()
                pulled, stale = threading.Event(), threading.Event()
                started = time.monotonic()
                current = threading.Thread(target=run_task, args=(res.token, pulled, stale), name="fedcollab-task", daemon=True)
                current.start()
                continue
            stop.wait(poll if not busy else 2 * poll)
    finally:
        client.close()


def _build_placeholder_app() -> Any:
    # The bundle names ``fedcollab.node._deploy:app``. A node started by ``fedcollab node start``
    # never loads it (it answers from :func:`serve`); a SuperNode run without fedcollab's
    # executor would, and gets a ClientApp that refuses every message with a code.
    return refusing_app(NodeErrorCode.UNAPPROVED_BUNDLE)


def __getattr__(name: str) -> Any:
    if name == "app":
        global app
        app = _build_placeholder_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["EgressLog", "NodeDeployment", "approved_bundle_sha256", "approved_run_spec", "build_bundle", "handle_task", "local_spec", "refusing_app",
           "serve"]
