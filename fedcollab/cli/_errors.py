"""How every command reports a fedcollab error: the message, the node's code if any, the exit code's meaning."""

from __future__ import annotations

import json
import sys

import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.core import EXIT_CODE_HELP, ExitCode, FedcollabError, NodeErrorCode

console = Console(stderr=True)


def fail(exc: FedcollabError) -> typer.Exit:
    """Print ``exc`` on stderr and return the ``typer.Exit`` with its exit code, for ``raise fail(exc) from None``."""
    console.print(f"[bold red]error:[/] {escape(str(exc))}", markup=True, highlight=False)
    code = int(getattr(exc, "exit_code", 1))
    node_code = _own_node_code(exc)
    if node_code is not None:
        console.print(f"[dim]node code {int(node_code)} ({node_code.name.lower()})[/]")
    try:
        console.print(f"[dim]exit {code}: {escape(EXIT_CODE_HELP[ExitCode(code)])}[/]")
    except ValueError:
        pass
    return typer.Exit(code)


def _own_node_code(exc: FedcollabError) -> NodeErrorCode | None:
    """The node code of a class that names its own (scoring's holder refusals), else None.

    Every error carries a node code, but the core tree's defaults say what a ClientApp would reply;
    at the command line they would only add noise, so only a code a subclass sets is printed.
    """
    for cls in type(exc).__mro__:
        if "node_code" in vars(cls):
            return None if cls.__module__ == FedcollabError.__module__ else cls.node_code  # type: ignore[attr-defined]
    return None


def fail_json(exc: FedcollabError) -> typer.Exit:
    """Write ``exc`` as one JSON error object on stdout (as ``audit epsilon`` does) and return the ``typer.Exit``."""
    code = int(getattr(exc, "exit_code", 1))
    obj = {"error": str(exc).split("\n", 1)[0], "kind": type(exc).__name__, "problems": list(exc.problems), "exit_code": code}
    codes = getattr(exc, "codes", None)
    if codes:
        obj["node_codes"] = {str(k): int(v) for k, v in codes.items()}
    sys.stdout.write(json.dumps(obj) + "\n")
    return typer.Exit(code)
