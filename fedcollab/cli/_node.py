"""``fedcollab node``: a partner's node folder (identity, policy, ledger)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.core import FedcollabError

node_app = typer.Typer(help="A partner's node: keys, policy and ledger.", no_args_is_help=True)


@node_app.command("anchor")
def anchor(
    folder: Annotated[Path, typer.Argument(help="The node folder.")],
    to: Annotated[Path, typer.Option("--to", help="A folder outside the node folder (another volume, one a backup restore does not touch).")],
    passphrase_env: Annotated[str | None, typer.Option("--passphrase-env", help="The signing key's passphrase is in this environment variable.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Move the ledger anchor out of the node folder, so that restoring an old copy of the whole folder is refused.

    Checks the ledger against its anchor first. Then start the node with ``--anchor-dir DIR`` (or
    ``FEDCOLLAB_ANCHOR_DIR=DIR`` in its service's environment): a node that is started without it
    finds no anchor next to a non-empty ledger and refuses every release.
    """
    from fedcollab.core import ConfigError
    from fedcollab.node import NodeHome

    passphrase = os.environ.get(passphrase_env, "").encode() or None if passphrase_env else None
    try:
        if fmt not in ("table", "json"):
            raise ConfigError(f"`--format` must be 'table' or 'json', got {fmt!r}")
        home = NodeHome(folder)
        if not home.exists():
            raise ConfigError(f"{folder}: not a node folder (no signing_key.pem and policy.toml)")
        target = home.move_anchor(to.resolve(), passphrase=passphrase)
    except FedcollabError as exc:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(int(exc.exit_code)) from None
    info = {"folder": str(folder), "anchor": str(target), "start_with": f"--anchor-dir {to.resolve()}"}
    if fmt == "json":
        sys.stdout.write(json.dumps(info) + "\n")
        return
    Console().print(f"anchor moved to {escape(str(target))}; start the node with --anchor-dir {escape(str(to.resolve()))}", highlight=False)


@node_app.command("init")
def init(
    folder: Annotated[Path, typer.Argument(help="The node folder to create.")],
    partner: Annotated[str, typer.Option("--partner", help="The partner's name, as in specs and the roster.")],
    dataset: Annotated[str | None, typer.Option("--dataset", help="Dataset id of this node's data and budget, kept in the node folder (node.json); the spec cannot change it (default: the partner's name).")] = None,
    epsilon: Annotated[float, typer.Option("--budget-epsilon", help="Lifetime epsilon budget of the dataset (record level).")] = 8.0,
    delta: Annotated[float, typer.Option("--budget-delta", help="Delta of the budget.")] = 1e-5,
    passphrase_env: Annotated[str | None, typer.Option("--passphrase-env", help="Encrypt the signing key with the passphrase in this environment variable.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Create the node's Ed25519 signing key (mode 0600), a policy template and an empty ledger."""
    from fedcollab.node import init_node_home
    from fedcollab.privacy.accounting import key_fingerprint
    from fedcollab.spec import BudgetSpec, NodePolicy

    passphrase = None
    if passphrase_env:
        value = os.environ.get(passphrase_env)
        if not value:
            Console(stderr=True).print(f"[red]error:[/] environment variable {escape(passphrase_env)} is empty or unset")
            raise typer.Exit(2)
        passphrase = value.encode()
    try:
        policy = NodePolicy(partner=partner, budgets=[BudgetSpec(dataset=dataset or partner, epsilon=epsilon, delta=delta)])
        home = init_node_home(folder, partner=partner, policy=policy, passphrase=passphrase, dataset=dataset or partner)
    except FedcollabError as exc:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    except ValueError as exc:  # pydantic: a bad budget
        Console(stderr=True).print(f"[red]error:[/] invalid budget: {escape(str(exc).splitlines()[0])}")
        raise typer.Exit(2) from None
    pub = home.public_key()
    info = {"folder": str(home.root), "partner": partner, "signing_key": pub, "fingerprint": key_fingerprint(pub),
            "policy": str(home.policy_path), "ledger": str(home.ledger_path), "dataset": home.dataset(),
            "roster_entry": {partner: {"signing_key": pub, "role": "partner"}}}
    if fmt == "json":
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    c = Console()
    c.print(f"created node [bold]{escape(partner)}[/] in {escape(str(home.root))}")
    c.print(f"  signing key fingerprint {info['fingerprint']} (public key {pub})")
    c.print(f"  edit {escape(str(home.policy_path))}; give this roster entry to the other parties out of band:")
    c.print(json.dumps(info["roster_entry"]), highlight=False, markup=False)
