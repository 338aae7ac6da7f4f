"""Deployment across organisations: the processes and the Control API calls behind the CLI.

* :func:`coordinator_command` - ``flower-superlink`` with TLS, node authentication, a persistent
  state database, runtime dependency installation off, and the coordinator's folder in its
  environment (``fedcollab coordinator start`` replaces itself with it);
* :func:`register_node`, :func:`list_nodes`, :func:`submit`, :func:`run_status` - the Control API,
  called in-process over TLS;
* :func:`start_node` - a partner's ``flower-supernode`` (``--isolation process``) and, in this
  process, the executor that answers its tasks with the node's installed ClientApp
  (:mod:`fedcollab.node._deploy`).

See docs/deployment.md.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollab.core import ConfigError, ExitCode, FedcollabError, TransportError, get_logger, write_private
from fedcollab.runner._run import FLOWER_ENV

log = get_logger("runner.deploy")

ENV_COORDINATOR_HOME = "FEDCOLLAB_COORDINATOR_HOME"  # same value as fedcollab.coordinator._deploy.ENV_HOME
#: Exit code of ``flower-supernode`` when it cannot connect (flwr.supercore.exit); with "Failed to
#: activate SuperNode" in its log, the SuperLink answered and refused the node's key.
FLOWER_NODE_AUTH_FAILED = 305
EXIT_PREFIX = "fedcollab exit "


class NodeRejected(TransportError):
    """The SuperLink refused this node's authentication key (not registered)."""

    exit_code = ExitCode.NODE_REJECTED


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every Flower process fedcollab starts: offline, quiet, this Python first on PATH."""
    env = dict(os.environ)
    env.update(FLOWER_ENV)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra or {})
    return env


def _flower_bin(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if not found:
        raise ConfigError(f"`{name}` is not installed (pip install 'fedcollab[node,coordinator]')")
    return found


# --- coordinator --------------------------------------------------------------------------------
@dataclass(frozen=True)
class CoordinatorConfig:
    """Where the coordinator's SuperLink listens and what it trusts."""

    home: Path
    certs: Path  # holds ca.crt, server.crt, server.key
    host: str = "127.0.0.1"
    port: int = 9093

    @property
    def address(self) -> str:
        """host:port of the SuperLink (Fleet, Control and Runtime APIs share it)."""
        return f"{self.host}:{self.port}"


def coordinator_command(cfg: CoordinatorConfig) -> tuple[list[str], dict[str, str]]:
    """The SuperLink command line and environment; prepares the coordinator's folder."""
    for name in ("ca.crt", "server.crt", "server.key"):
        if not (cfg.certs / name).is_file():
            raise ConfigError(f"{cfg.certs / name} is missing (create trial certificates with `fedcollab certs`)")
    home = cfg.home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "roster.json").is_file():
        raise ConfigError(f"{home / 'roster.json'} is missing: the roster of partners' signing keys, exchanged out of band")
    if not (home / "signing_key.pem").exists():
        from fedcollab.crypto import generate_signing_key

        generate_signing_key(home / "signing_key.pem")
    (home / "flwr").mkdir(exist_ok=True)
    certs = cfg.certs.resolve()
    cmd = [
        _flower_bin("flower-superlink"),
        "--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile", str(certs / "server.key"),
        "--host", cfg.host, "--port", str(cfg.port),
        "--database", str(home / "state.db"),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
    ]
    env = flower_env({ENV_COORDINATOR_HOME: str(home), "FLWR_HOME": str(home / "flwr"),
                      # Flower's SuperExec picks up the ServerApp task every 1 s by default.
                      "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"})
    info = {"address": cfg.address, "ca_cert": str(certs / "ca.crt"), "database": str(home / "state.db"), "pid": os.getpid()}
    (home / "coordinator.json").write_text(json.dumps(info, indent=2) + "\n")
    return cmd, env


# --- Control API ---------------------------------------------------------------------------------
@contextmanager
def control_client(address: str, ca_cert: str | Path) -> Iterator[Any]:
    """A Control API client over TLS (the CA's certificate is the only trust anchor)."""
    from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
    from flwr.supercore.control import ControlHttpClient
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

    client = ControlHttpClient.from_server_address(
        server_address=address, insecure=False, root_certificates=Path(ca_cert).read_bytes(),
        interceptors=[CliClientHttpInterceptor(), RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
    )
    try:
        yield client
    except FedcollabError:
        raise
    except Exception as exc:  # noqa: BLE001 - one error for any transport failure
        raise TransportError(f"Control API at {address}: {type(exc).__name__}: {str(exc)[:200]}") from exc
    finally:
        client.close()


def register_node(address: str, ca_cert: str | Path, public_key: str | Path, *, name: str | None = None) -> int:
    """Register a partner's node key (OpenSSH EC public key); returns Flower's node id."""
    from flwr.proto.control_pb2 import RegisterNodeRequest  # pylint: disable=E0611

    from fedcollab.crypto import load_node_auth_public_key

    key = load_node_auth_public_key(public_key)
    with control_client(address, ca_cert) as c:
        res = c.RegisterNode(RegisterNodeRequest(public_key=key, name=name))
    if not res.node_id:
        raise TransportError("the SuperLink did not register the key")
    return int(res.node_id)


def list_nodes(address: str, ca_cert: str | Path) -> list[dict[str, Any]]:
    """Registered nodes: id, name, status, last activation."""
    from flwr.proto.control_pb2 import ListNodesRequest  # pylint: disable=E0611

    with control_client(address, ca_cert) as c:
        res = c.ListNodes(ListNodesRequest())
    return [{"node_id": int(n.node_id), "name": n.name, "status": n.status, "last_activated_at": n.last_activated_at,
             "online_until": n.online_until} for n in res.nodes_info]


def _run_row(run: Any) -> dict[str, Any]:
    st = run.status
    out: dict[str, Any] = {"run_id": int(run.run_id), "status": st.status, "sub_status": st.sub_status, "details": st.details,
                           "fab_id": run.fab_id, "fab_hash": run.fab_hash, "pending_at": run.pending_at, "running_at": run.running_at,
                           "finished_at": run.finished_at, "bytes_sent": int(run.bytes_sent), "bytes_recv": int(run.bytes_recv)}
    out["exit_code"] = outcome_code(out)
    return out


def outcome_code(row: dict[str, Any]) -> int | None:
    """fedcollab's exit code for a run row: 0 completed, N from ``fedcollab exit N`` in a failure, None while running."""
    if row["status"] != "finished":
        return None
    if row["sub_status"] == "completed":
        return 0
    details = str(row.get("details", ""))
    i = details.find(EXIT_PREFIX)
    if i >= 0:
        digits = details[i + len(EXIT_PREFIX):].split(":", 1)[0].strip()
        if digits.isdigit():
            return int(digits)
    return int(TransportError.exit_code)


def run_status(address: str, ca_cert: str | Path, run_id: int | None = None) -> list[dict[str, Any]]:
    """Runs known to the SuperLink (one if ``run_id`` is given), with fedcollab's exit code."""
    from flwr.common.serde import run_from_proto
    from flwr.proto.control_pb2 import ListRunsRequest  # pylint: disable=E0611

    with control_client(address, ca_cert) as c:
        res = c.ListRuns(ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest())
    rows = [_run_row(run_from_proto(p)) for p in res.run_dict.values()]
    return sorted(rows, key=lambda r: r["pending_at"])


def submit(address: str, ca_cert: str | Path, spec_path: str | Path, *, wait: bool = True, timeout: float = 1800.0,
           run_timeout: float = 600.0, on_status: Callable[[dict[str, Any]], None] | None = None, poll: float = 1.0,
           resume: int | None = None, score: str | None = None) -> dict[str, Any]:
    """Start a run of the spec on the deployment; with ``wait``, block until it finishes and return its outcome.

    ``resume`` is the Flower run id of a run interrupted by a coordinator restart: the new run
    continues it from its last checkpoint (same fedcollab run id and ledger). ``score`` (a vertical
    spec) is the fedcollab run id of a completed run: the nodes score their current records jointly
    with its model, the scores staying at the label holder's node.
    """
    from flwr.common.serde import fab_to_proto, user_config_to_proto
    from flwr.proto.control_pb2 import StartRunRequest  # pylint: disable=E0611
    from flwr.supercore.fab import Fab

    from fedcollab.coordinator import RUN_CONFIG_RESUME, RUN_CONFIG_SCORE, RUN_CONFIG_SPEC, RUN_CONFIG_TIMEOUT, encode_spec
    from fedcollab.node import build_bundle
    from fedcollab.spec import load_spec

    p = Path(spec_path)
    load_spec(p)  # fail here, not at the coordinator, on an invalid spec
    fab, sha = build_bundle()
    req = StartRunRequest(fab=fab_to_proto(Fab(sha, fab, {})),
                          override_config=user_config_to_proto({RUN_CONFIG_SPEC: encode_spec(p.read_text()), RUN_CONFIG_TIMEOUT: float(run_timeout),
                                                                            RUN_CONFIG_RESUME: str(resume) if resume is not None else "",
                                                                            RUN_CONFIG_SCORE: score or ""}))
    with control_client(address, ca_cert) as c:
        res = c.StartRun(req)
    if not res.HasField("run_id"):
        raise TransportError("the SuperLink did not start the run")
    run_id = int(res.run_id)
    row: dict[str, Any] = {"run_id": run_id, "status": "pending", "sub_status": "", "details": "", "exit_code": None, "bundle_sha256": sha}
    if not wait:
        return row
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        rows = run_status(address, ca_cert, run_id)
        if rows:
            row = {**rows[0], "bundle_sha256": sha}
            if on_status and (row["status"], row["sub_status"]) != last:
                on_status(row)
                last = (row["status"], row["sub_status"])
            if row["exit_code"] is not None:
                return row
        time.sleep(poll)
    raise TransportError(f"run {run_id} did not finish within {timeout:.0f} s")


# --- node ----------------------------------------------------------------------------------------
#: Flower's SuperNode sleeps 3 s when the SuperLink has no message for it and polls its own reply
#: queue every 0.5 s (``flwr.supernode.start_client_internal``, hard-coded): on average 2 s of idle
#: wait per message exchange. ``fedcollab node start --poll S`` starts the same SuperNode through
#: this launcher, which caps those two sleeps at S seconds (each poll is one HTTPS request to the
#: SuperLink); ``--poll 0`` runs ``flower-supernode`` unchanged.
_SUPERNODE_LAUNCHER = """
import sys, time as _time
import flwr.supernode.start_client_internal as _sci
class _CappedSleep:
    def __init__(self, cap):
        self.cap = cap
    def __getattr__(self, name):
        return getattr(_time, name)
    def sleep(self, seconds):
        _time.sleep(min(seconds, self.cap))
_sci.time = _CappedSleep(float(sys.argv[1]))
from flwr.supernode.cli import flower_supernode
sys.argv = ["flower-supernode", *sys.argv[2:]]
flower_supernode()
"""
DEFAULT_NODE_POLL = 0.3


@dataclass(frozen=True)
class NodeConfig:
    """A partner's node: its folder, its data, its roster and where the coordinator is."""

    home: Path
    data: Path
    roster: Path
    superlink: str
    ca_cert: Path
    auth_key: Path | None = None  # default HOME/flower_auth_key
    approved_bundles: tuple[str, ...] = ()  # default: the bundle this installation builds
    poll: float = DEFAULT_NODE_POLL  # cap on the SuperNode's idle sleeps; 0 = Flower's own (3 s)
    dataset: str | None = None  # the data file's dataset id (stored in HOME/node.json); None keeps the folder's

    @property
    def auth_key_path(self) -> Path:
        """The node-authentication private key (OpenSSH P-384)."""
        return self.auth_key or self.home / "flower_auth_key"


def node_auth_key(home: Path) -> tuple[Path, str]:
    """The node's authentication key (created if missing) and its public line, to register at the coordinator."""
    from fedcollab.crypto import generate_node_auth_key

    path = home / "flower_auth_key"
    if not path.exists():
        pub = generate_node_auth_key(path)
    else:
        pub = path.with_name(path.name + ".pub").read_text().strip()
    return path, pub


def _node_setup(cfg: NodeConfig) -> tuple[Any, list[str], dict[str, str]]:
    from fedcollab.node import NodeHome
    from fedcollab.node import NodeDeployment, approved_bundle_sha256
    from fedcollab.spec import Roster

    home = NodeHome(cfg.home.resolve())
    if not home.exists():
        raise ConfigError(f"{home.root} is not a node folder (create it with `fedcollab node init`)")
    policy = home.policy()
    if cfg.dataset is not None:
        home.set_dataset(cfg.dataset)  # node-local: the spec never selects the budget
    if not cfg.data.is_file():
        raise ConfigError(f"data file {cfg.data} does not exist")
    try:
        roster = Roster.model_validate_json(cfg.roster.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read roster {cfg.roster}: {type(exc).__name__}") from None
    keys = {k: v.signing_key for k, v in roster.parties.items()}
    if keys.get(policy.partner) != home.public_key():
        raise ConfigError(f"the roster does not list this node's signing key for partner {policy.partner!r}")
    if "coordinator" not in keys:
        raise ConfigError("the roster has no coordinator key")
    if not cfg.auth_key_path.is_file():
        raise ConfigError(f"{cfg.auth_key_path} is missing (create it with `fedcollab node keygen`)")
    approved = frozenset(cfg.approved_bundles) or frozenset({approved_bundle_sha256()})
    node = NodeDeployment(home=home.root, partner=policy.partner, data=cfg.data.resolve(), roster=keys, approved_bundles=approved)
    runtime_port = free_port()
    secret_path = home.root / "superexec.secret"
    write_private(secret_path, secrets.token_hex(32).encode())
    data_value = str(cfg.data.resolve()).replace("\\", "\\\\").replace('"', '\\"')
    launcher = [sys.executable, "-c", _SUPERNODE_LAUNCHER, repr(float(cfg.poll))] if cfg.poll > 0 else [_flower_bin("flower-supernode")]
    cmd = [
        *launcher,
        "--root-certificates", str(cfg.ca_cert.resolve()), "--superlink", cfg.superlink,
        "--auth-supernode-private-key", str(cfg.auth_key_path.resolve()),
        "--node-config", f'partner="{policy.partner}" data="{data_value}"',
        "--isolation", "process", "--host", "127.0.0.1", "--port", str(runtime_port),
        "--superexec-auth-secret-file", str(secret_path),
    ]
    return node, cmd, {"runtime": f"127.0.0.1:{runtime_port}", "secret": str(secret_path)}


def start_node(cfg: NodeConfig, *, on_ready: Callable[[dict[str, Any]], None] | None = None, stop: threading.Event | None = None) -> int:
    """Run the partner's node until stopped (SIGTERM, SIGINT or ``stop``); returns 0, or raises.

    Raises :class:`NodeRejected` when the SuperLink refuses the node's key.
    """
    from fedcollab.node import serve

    node, cmd, extra = _node_setup(cfg)
    stop = stop or threading.Event()
    log_path = node.home / "supernode.log"
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(cmd, env=flower_env({"FLWR_HOME": str(node.home / "flwr")}), stdout=logf, stderr=subprocess.STDOUT)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    secret = Path(extra["secret"]).read_bytes()
    worker = threading.Thread(target=serve, kwargs={"node": node, "runtime_address": extra["runtime"], "secret": secret, "stop": stop},
                              name="fedcollab-executor", daemon=True)
    worker.start()
    if on_ready:
        on_ready({"partner": node.partner, "supernode_pid": proc.pid, "runtime": extra["runtime"], "egress_log": str(node.home / "egress.jsonl"),
                  "approved_bundles": sorted(node.approved_bundles), "supernode_log": str(log_path)})
    try:
        while not stop.is_set():
            rc = proc.poll()
            if rc is not None:
                tail = log_path.read_text(errors="replace")[-4000:]
                if rc == FLOWER_NODE_AUTH_FAILED or (f"Exit Code: {FLOWER_NODE_AUTH_FAILED}" in tail and "Failed to activate SuperNode" in tail):
                    raise NodeRejected("the SuperLink refused this node's key: ask the coordinator to register it "
                                       "(`fedcollab coordinator register-node`)")
                raise TransportError(f"flower-supernode exited with code {rc} (see {log_path})")
            stop.wait(0.5)
        return 0
    finally:
        stop.set()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        worker.join(3)  # a daemon thread: it must not hold the node open


__all__ = ["CoordinatorConfig", "NodeConfig", "NodeRejected", "coordinator_command", "free_port", "list_nodes", "node_auth_key",
           "outcome_code", "register_node", "run_status", "start_node", "submit"]
