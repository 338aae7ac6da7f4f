"""``fedcollab data check SPEC --partner NAME [--data FILE]``: a partner checks their file before joining."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.cli._app import _fail, app
from fedcollab.core import ExitCode, FedcollabError

data_app = typer.Typer(help="Check a partner's data against a spec's schema, locally (nothing is sent).", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("check")
def data_check(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).")],
    partner: Annotated[str, typer.Option("--partner", help="Which partner of the spec the data belongs to.")],
    data: Annotated[Path | None, typer.Option("--data", help="The file the node will read (its --data); default the spec's source of the partner.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Read the partner's file as its node would and list every problem (columns, types, categories, missing values).

    Exit 0 when the data can be used, 3 (data invalid) otherwise.
    """
    from fedcollab.runner import check_partner_data
    from fedcollab.spec import load_spec

    try:
        s = load_spec(spec)
        res = check_partner_data(s, partner, data=data)
    except FedcollabError as exc:
        if fmt == "json":
            sys.stdout.write(json.dumps({"ok": False, "error": str(exc).split("\n", 1)[0], "problems": exc.problems, "exit_code": exc.exit_code}) + "\n")
            raise typer.Exit(exc.exit_code) from None
        raise _fail(exc) from None
    code = 0 if res.ok else int(ExitCode.DATA_INVALID)
    if fmt == "json":
        sys.stdout.write(json.dumps({**res.to_dict(), "exit_code": code}, indent=2) + "\n")
        raise typer.Exit(code)
    out = Console(highlight=False)
    out.print(f"partner [bold]{escape(res.partner)}[/], file {escape(res.path or '(none)')}")
    if res.rows is not None:
        out.print(f"rows {res.rows}, columns {len(res.columns)}: {escape(', '.join(res.columns))}")
    if res.ok:
        out.print(f"[green]ok[/]: matches the schema of {escape(s.name)}; {res.n_train} train and {res.n_test} test rows")
        return
    err = Console(stderr=True, highlight=False)
    for p in res.problems:
        err.print(f"[red]{escape(res.partner)}:[/] {escape(p)}")
    err.print(f"[dim]exit {code}: data invalid; fix the file or the spec's schema before joining[/]")
    raise typer.Exit(code)
