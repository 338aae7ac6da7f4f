"""``fedcollab query SPEC --query FILE`` and ``fedcollab profile SPEC``: federated analytics on the simulation engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcollab.cli._app import _fail, _setup_logging, app
from fedcollab.core import FedcollabError


def _num(v: object) -> str:
    if v is None:
        return "—"
    if isinstance(v, list):
        return "[" + ", ".join(_num(x) for x in v) + "]"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


@app.command("query")
def query_cmd(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).")],
    query: Annotated[Path, typer.Option("--query", help="Query file (TOML): statistics, group_by, where, epsilon, delta.")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for query.json, ledger.jsonl and roster.json.")] = None,
    nodes: Annotated[Path | None, typer.Option("--nodes", help="Simulated partners' node folders (keys, policies, ledgers); reuse it to keep budgets.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Cross-silo statistics with distributed DP noise, summed under secure aggregation."""
    _setup_logging(verbose)
    from fedcollab.runner import run_query

    try:
        res = run_query(spec, query, out=out or Path("runs") / f"query-{spec.stem}", nodes=nodes, progress=fmt == "table")
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(res.to_dict()) + "\n")
        return
    pv = res.privacy
    title = f"{res.query.name}: {len(res.participants)} partners, " + (
        f"ε = {pv['epsilon']:g}, δ = {pv['delta']:g} (record level, against the coordinator)" if pv["mode"] == "dp" else "exact (no noise)")
    t = Table(title=title)
    for c in ("group", "statistic", "column", "value", "± noise std"):
        t.add_column(c, justify="left" if c in ("group", "statistic", "column") else "right")
    for r in res.rows:
        t.add_row(r["group"], r["statistic"], r["column"] or "", "suppressed" if r["suppressed"] else _num(r["value"]), _num(r["noise_std"]))
    Console().print(t)
    Console().print(f"groups with a noisy count below {res.min_group_size} are suppressed; wall {res.seconds:.1f} s")


@app.command("profile")
def profile_cmd(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).")],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for profile.html, profile.json and the ledger.")] = None,
    nodes: Annotated[Path | None, typer.Option("--nodes", help="Simulated partners' node folders; reuse it to keep budgets.")] = None,
    epsilon: Annotated[float, typer.Option("--epsilon", help="Epsilon per silo for its noisy figures.")] = 4.0,
    delta: Annotated[float, typer.Option("--delta")] = 1e-6,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """AI-readiness report across silos (HTML): sizes, missing values, labels, distributions, drift, findings."""
    _setup_logging(verbose)
    from fedcollab.runner import run_profile

    try:
        res = run_profile(spec, out=out or Path("runs") / f"profile-{spec.stem}", nodes=nodes, epsilon=epsilon, delta=delta,
                          progress=fmt == "table")
    except FedcollabError as exc:
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(res.profile.to_dict()) + "\n")
        return
    con = Console()
    for f in res.profile.findings:
        con.print(f"[{'yellow' if f['level'] == 'warning' else 'red' if f['level'] == 'error' else 'cyan'}]{f['level']}[/]: {f['message']}",
                  highlight=False)
    if res.report is not None:
        con.print(f"wrote {res.report}")
