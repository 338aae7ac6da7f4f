"""How every command reports a fedcollab error: the message, the node's code if any, the exit code's meaning."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.core import EXIT_CODE_HELP, ExitCode, FedcollabError

console = Console(stderr=True)


def fail(exc: FedcollabError) -> typer.Exit:
    """Print ``exc`` on stderr and return the ``typer.Exit`` with its exit code, for ``raise fail(exc) from None``."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
    code = int(getattr(exc, "exit_code", 1))
    node_code = getattr(exc, "node_code", None)
    if node_code is not None:
        console.print(f"[dim]node code {int(node_code)} ({node_code.name.lower()})[/]")
    try:
        console.print(f"[dim]exit {code}: {escape(EXIT_CODE_HELP[ExitCode(code)])}[/]")
    except ValueError:
        pass
    return typer.Exit(code)


def fail_json(exc: FedcollabError) -> typer.Exit:
    """Write ``exc`` as one JSON error object on stdout (as ``audit epsilon`` does) and return the ``typer.Exit``."""
    code = int(getattr(exc, "exit_code", 1))
    obj = {"error": str(exc).split("\n", 1)[0], "kind": type(exc).__name__, "problems": list(exc.problems), "exit_code": code}
    codes = getattr(exc, "codes", None)
    if codes:
        obj["node_codes"] = {str(k): int(v) for k, v in codes.items()}
    sys.stdout.write(json.dumps(obj) + "\n")
    return typer.Exit(code)
