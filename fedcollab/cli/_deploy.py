"""Deployment commands: ``fedcollab certs``, ``coordinator start|register-node|nodes``,
``node keygen|start``, ``submit`` and ``status``. See docs/deployment.md."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcollab.cli._errors import fail as _fail
from fedcollab.core import ConfigError, FedcollabError

coordinator_app = typer.Typer(help="The coordinator's SuperLink: start it, register partners' node keys, list nodes.", no_args_is_help=True)
err = Console(stderr=True)


def _connection(superlink: str | None, ca: Path | None, home: Path | None) -> tuple[str, Path]:
    """The SuperLink address and CA: given, or from the coordinator folder's coordinator.json."""
    if home is not None and (superlink is None or ca is None):
        path = home / "coordinator.json"
        try:
            info = json.loads(path.read_text())
            superlink = superlink or str(info["address"])
            ca = ca or Path(info["ca_cert"])
        except (OSError, ValueError, KeyError, TypeError):
            raise _fail(ConfigError(f"--home: expected {path} written by `fedcollab coordinator start` "
                                    "(with `address` and `ca_cert`), but it is missing or unreadable")) from None
    if superlink is None or ca is None:
        err.print("[red]error:[/] give --superlink and --ca (or --home of a coordinator started on this machine)")
        raise typer.Exit(2)
    return superlink, ca


Superlink = Annotated[str | None, typer.Option("--superlink", help="SuperLink address host:port.")]
Ca = Annotated[Path | None, typer.Option("--ca", help="The CA certificate that signed the SuperLink's certificate.")]
Home = Annotated[Path | None, typer.Option("--home", help="The coordinator's folder (reads address and CA from coordinator.json).")]
Fmt = Annotated[str, typer.Option("--format", help="table or json.")]


def certs(
    out: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.crt, server.key.")],
    host: Annotated[list[str] | None, typer.Option("--host", help="Extra DNS name or IP address the SuperLink is reached at (repeatable).")] = None,
    days: Annotated[int, typer.Option("--days", help="Validity in days.")] = 365,
    fmt: Fmt = "table",
) -> None:
    """A local CA and a SuperLink certificate (SANs: localhost, 127.0.0.1 and every --host), for trials."""
    from fedcollab.crypto import make_trial_certificates

    try:
        c = make_trial_certificates(out, hosts=host or [], days=days)
    except FedcollabError as exc:
        raise _fail(exc) from None
    info = {"ca_cert": str(c.ca_cert), "ca_key": str(c.ca_key), "server_cert": str(c.server_cert), "server_key": str(c.server_key), "sans": list(c.sans)}
    if fmt == "json":
        sys.stdout.write(json.dumps(info) + "\n")
        return
    Console().print(f"wrote {escape(str(out))}/ca.crt, ca.key, server.crt, server.key (SANs: {', '.join(c.sans)})")
    Console().print("give ca.crt to every partner; keep ca.key offline")


@coordinator_app.command("start")
def coordinator_start(
    home: Annotated[Path, typer.Option("--home", help="The coordinator's folder (roster.json, signing key, runs/, state.db).")],
    certs_dir: Annotated[Path, typer.Option("--certs", help="Folder with ca.crt, server.crt and server.key.")],
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (Fleet, Control and Runtime APIs share it; put the proxy in front).")] = 9093,
) -> None:
    """Start the SuperLink: TLS, node authentication, a state database, no runtime installs, no telemetry.

    The process becomes ``flower-superlink`` (same PID): stop it with SIGTERM.
    """
    from fedcollab.runner import CoordinatorConfig, coordinator_command

    try:
        cmd, env = coordinator_command(CoordinatorConfig(home=home, certs=certs_dir, host=host, port=port))
    except FedcollabError as exc:
        raise _fail(exc) from None
    err.print(f"coordinator: SuperLink on {host}:{port} (TLS, node authentication), state {home / 'state.db'}")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(cmd[0], cmd, env)


@coordinator_app.command("register-node")
def coordinator_register_node(
    public_keys: Annotated[list[Path], typer.Argument(help="Partners' node-authentication public keys (`fedcollab node keygen` writes FOLDER/flower_auth_key.pub).")],
    name: Annotated[list[str] | None, typer.Option("--name", help="A name per key, in the same order (repeatable).")] = None,
    superlink: Superlink = None, ca: Ca = None, home: Home = None, fmt: Fmt = "table",
) -> None:
    """Register partners' node keys: only registered nodes may connect."""
    from fedcollab.runner import register_node

    names = list(name or [])
    if names and len(names) != len(public_keys):
        err.print("[red]error:[/] give one --name per key, or none")
        raise typer.Exit(2)
    addr, cafile = _connection(superlink, ca, home)
    out = []
    try:
        for i, key in enumerate(public_keys):
            out.append({"key": str(key), "node_id": register_node(addr, cafile, key, name=names[i] if names else None)})
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(out) + "\n")
    else:
        for r in out:
            Console().print(f"registered node {r['node_id']} ({escape(r['key'])})")


@coordinator_app.command("nodes")
def coordinator_nodes(superlink: Superlink = None, ca: Ca = None, home: Home = None, fmt: Fmt = "table") -> None:
    """List registered nodes and whether they are online."""
    from fedcollab.runner import list_nodes

    addr, cafile = _connection(superlink, ca, home)
    try:
        nodes = list_nodes(addr, cafile)
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(nodes) + "\n")
        return
    t = Table("node id", "name", "status", "last activated")
    for n in nodes:
        t.add_row(str(n["node_id"]), escape(n["name"] or ""), n["status"], n["last_activated_at"])
    Console().print(t)


def node_keygen(
    folder: Annotated[Path, typer.Argument(help="The node folder (from `fedcollab node init`).")],
    fmt: Fmt = "table",
) -> None:
    """Create the node's authentication key (P-384, OpenSSH) if missing and print its public key for the coordinator."""
    from fedcollab.runner import node_auth_key

    path, pub = node_auth_key(folder)
    if fmt == "json":
        sys.stdout.write(json.dumps({"private_key": str(path), "public_key_file": str(path) + ".pub", "public_key": pub}) + "\n")
        return
    Console().print(f"node authentication key {escape(str(path))} (mode 0600); give the coordinator {escape(str(path))}.pub:")
    # Raw on stdout, one line: rich would wrap the OpenSSH key at the terminal width and break copy-paste.
    sys.stdout.write(pub.strip() + "\n")


def node_approve(
    spec: Annotated[Path, typer.Argument(help="The spec TOML the partner approves (stored byte for byte).")],
    home: Annotated[Path, typer.Option("--home", help="The node folder (from `fedcollab node init`).")],
    fmt: Fmt = "table",
) -> None:
    """Approve a spec: store it as approved/<sha256>.toml in the node folder; the node runs only specs approved this way.

    A deployed run whose spec bytes do not hash to an approved spec is refused by the node with
    code 142 (SPEC_NOT_APPROVED); an approved run is built from this stored copy.
    """
    import tomllib

    from fedcollab.node import NodeHome
    from fedcollab.spec import parse_spec

    try:
        raw = spec.read_bytes()
    except OSError as exc:
        raise _fail(ConfigError(f"spec {spec} is not a readable file ({exc.strerror or type(exc).__name__})")) from None
    if not home.is_dir():
        raise _fail(ConfigError(f"node folder {home} does not exist; create it with `fedcollab node init`")) from None
    try:
        # Checked as the node will read it (the run config's bytes, no folder to resolve against).
        parse_spec(tomllib.loads(raw.decode("utf-8")), source=str(spec))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise _fail(ConfigError(f"spec {spec} is not UTF-8 TOML: {exc}")) from None
    except FedcollabError as exc:
        raise _fail(exc) from None
    node = NodeHome(home)
    digest = node.approve_spec(raw)
    path = node.approved_dir / f"{digest}.toml"
    if fmt == "json":
        sys.stdout.write(json.dumps({"sha256": digest, "path": str(path)}) + "\n")
        return
    sys.stdout.write(f"approved {spec}: sha256 {digest}\nstored as {path}\n")  # unwrapped: the hash is copied from here


def node_start(
    folder: Annotated[Path, typer.Argument(help="The node folder (key, policy, ledger, egress log).")],
    data: Annotated[Path, typer.Option("--data", help="This partner's data file (CSV or Parquet); passed to the node as node config.")],
    roster: Annotated[Path, typer.Option("--roster", help="roster.json: every party's signing key, exchanged out of band.")],
    superlink: Annotated[str, typer.Option("--superlink", help="The coordinator's SuperLink address host:port.")],
    ca: Annotated[Path, typer.Option("--ca", help="The CA certificate that signed the SuperLink's certificate.")],
    policy: Annotated[Path | None, typer.Option("--policy", help="Install this policy (validated) as FOLDER/policy.toml before starting.")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset id of the data file (selects the budget); stored in FOLDER/node.json. Default: the one already there.")] = None,
    approve: Annotated[list[str] | None, typer.Option("--approve-bundle", help="SHA-256 of an approved bundle (repeatable; default: the bundle this fedcollab builds).")] = None,
    poll: Annotated[float, typer.Option("--poll", help="Cap in seconds on the SuperNode's idle polling (Flower's is 3 s); 0 runs flower-supernode unchanged.")] = 0.3,
    anchor_dir: Annotated[Path | None, typer.Option("--anchor-dir", help="Where the ledger's anchor lives, outside FOLDER (see `fedcollab node anchor`); "
                                                    "default: $FEDCOLLAB_ANCHOR_DIR, else FOLDER/ledger.anchor.json.")] = None,
    fmt: Fmt = "table",
) -> None:
    """Run this partner's node: a SuperNode over TLS with node authentication, answering only with the installed fedcollab.

    Every message that leaves is logged in FOLDER/egress.jsonl. Stop with SIGTERM or Ctrl-C.
    """
    import logging

    from fedcollab.runner import NodeConfig, start_node
    from fedcollab.spec import load_policy, policy_toml

    # The node's own log (refusals with their reasons stay here): fedcollab's logger only.
    folder.mkdir(parents=True, exist_ok=True)
    fc_log = logging.getLogger("fedcollab")
    fc_log.setLevel(logging.INFO)
    fmt_ = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    for h in (logging.FileHandler(folder / "node.log"), logging.StreamHandler(sys.stderr)):
        h.setFormatter(fmt_)
        fc_log.addHandler(h)
    if anchor_dir is not None:  # inherited by the SuperNode and the ClientApp processes it starts
        from fedcollab.node import ANCHOR_DIR_ENV

        os.environ[ANCHOR_DIR_ENV] = str(anchor_dir.resolve())
    try:
        if policy is not None:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "policy.toml").write_text(policy_toml(load_policy(policy)))

        def ready(info: dict[str, Any]) -> None:
            if fmt == "json":
                sys.stdout.write(json.dumps({"state": "ready", **info}) + "\n")
                sys.stdout.flush()
            else:
                err.print(f"node {escape(info['partner'])}: SuperNode pid {info['supernode_pid']}, egress log {escape(info['egress_log'])}")

        start_node(NodeConfig(home=folder, data=data, roster=roster, superlink=superlink, ca_cert=ca, approved_bundles=tuple(approve or ()), poll=poll,
                              dataset=dataset), on_ready=ready)
        code = 0
    except FedcollabError as exc:
        err.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        code = int(getattr(exc, "exit_code", 1))
    # The SuperNode is stopped; Flower's heartbeat threads of an abandoned task must not keep the process alive.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def submit(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).")],
    superlink: Superlink = None, ca: Ca = None, home: Home = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait for the run to finish and exit with its outcome.")] = True,
    timeout: Annotated[float, typer.Option("--timeout", help="Seconds to wait for the run.")] = 1800.0,
    resume: Annotated[int | None, typer.Option("--resume", help="Continue this interrupted run (Flower run id) from its last checkpoint.")] = None,
    score: Annotated[str | None, typer.Option("--score", help="A vertical spec: score the nodes' current records jointly with the model of this "
                                              "completed run (its fedcollab run id, status.json's fedcollab_run_id); the scores stay at the "
                                              "label holder's node (vertical/<run>/scores.csv).")] = None,
    fmt: Fmt = "table",
) -> None:
    """Start a run on the deployment; exits with the run's true outcome (0 completed, else fedcollab's code)."""
    from fedcollab.runner import submit as do_submit

    addr, cafile = _connection(superlink, ca, home)

    def show(row: dict[str, Any]) -> None:
        if fmt != "json":
            err.print(f"run {row['run_id']}: {row['status']}{':' + row['sub_status'] if row['sub_status'] else ''}")

    try:
        with Console(stderr=True).status("waiting for the run", spinner="dots") if (wait and fmt != "json") else _null():
            row = do_submit(addr, cafile, spec, wait=wait, timeout=timeout, on_status=show, resume=resume, score=score)
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(row) + "\n")
    else:
        Console().print(f"run {row['run_id']}: {row['status']} {row.get('sub_status', '')} {escape(str(row.get('details') or ''))}")
    code = row.get("exit_code")
    raise typer.Exit(int(code) if code is not None else 0)


def status(
    run_id: Annotated[int | None, typer.Argument(help="A run id (default: every run).")] = None,
    superlink: Superlink = None, ca: Ca = None, home: Home = None, fmt: Fmt = "table",
) -> None:
    """Runs on the deployment, their status and fedcollab's exit code for finished ones."""
    from fedcollab.runner import run_status

    addr, cafile = _connection(superlink, ca, home)
    try:
        rows = run_status(addr, cafile, run_id)
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    t = Table("run", "status", "exit code", "details")
    for r in rows:
        t.add_row(str(r["run_id"]), f"{r['status']}:{r['sub_status']}", "" if r["exit_code"] is None else str(r["exit_code"]), escape(r["details"][:80]))
    Console().print(t)


class _null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def register(app: typer.Typer, node_app: typer.Typer) -> None:
    """Add the deployment commands to the ``fedcollab`` and ``fedcollab node`` apps."""
    app.command("certs")(certs)
    app.add_typer(coordinator_app, name="coordinator")
    app.command("submit")(submit)
    app.command("status")(status)
    node_app.command("keygen")(node_keygen)
    node_app.command("start")(node_start)
    node_app.command("approve")(node_approve)
