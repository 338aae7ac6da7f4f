"""``fedcollab audit verify`` and ``fedcollab audit report``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcollab.cli._audit import audit_app
from fedcollab.core import EXIT_CODE_HELP, ExitCode, FedcollabError

_VERIFY_HELP = "\n\n".join(
    f"{int(c)}: {EXIT_CODE_HELP[c]}"
    for c in (ExitCode.OK, ExitCode.LEDGER_TAMPERED, ExitCode.CLAIM_MISMATCH, ExitCode.LEDGER_BUDGET_EXCEEDED, ExitCode.LEDGER_UNREADABLE,
              ExitCode.LEDGER_ABORTED)
)


@audit_app.command("verify", epilog="Exit codes:\n\n" + _VERIFY_HELP)
def verify(
    ledger: Annotated[Path, typer.Argument(help="A run ledger (OUT/ledger.jsonl) or a node's ledger (NODE/ledger.jsonl).")],
    roster: Annotated[Path, typer.Option("--roster", help="The parties' public keys (obtained out of band, not from the coordinator).")],
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    run_ledger: Annotated[Path | None, typer.Option("--run-ledger", help="A run ledger the node took part in: every entry it "
                                                    "sent there must still be in its own ledger (detects a rolled-back node ledger).")] = None,
) -> None:
    """Check every chain, signature and countersignature; recompute every epsilon; check budgets."""
    from fedcollab.audit import Report, verify_ledger, verify_with_run
    from fedcollab.audit import Finding
    from fedcollab.spec import load_roster

    try:
        keys = load_roster(roster)
        rep = verify_ledger(ledger, keys) if run_ledger is None else verify_with_run(ledger, run_ledger, keys)
    except FedcollabError as exc:
        rep = Report(findings=[Finding(ExitCode.LEDGER_UNREADABLE, None, str(exc))])
    if fmt == "json":
        sys.stdout.write(json.dumps(rep.to_dict(), indent=2) + "\n")
        raise typer.Exit(int(rep.exit_code))
    out = Console()
    t = Table(title=f"{ledger}: {rep.lines} entries" + (" (run ledger)" if rep.run_ledger else ""))
    # Party names are never cut: their column keeps its full width and the others wrap (80-column terminals).
    party_width = max([len(str(n)) for n in rep.fingerprints] + [len(g.party) for g in rep.spends] + [5])
    t.add_column("party", no_wrap=True, min_width=party_width)
    t.add_column("key fingerprint", overflow="fold")
    for name, fp in rep.fingerprints.items():
        t.add_row(name, fp)
    out.print(t)
    if rep.spends:
        s = Table(title="spend recomputed from the recorded events")
        s.add_column("party", no_wrap=True, min_width=party_width)
        for col in ("dataset", "unit", "observer", "releases", "ε", "δ", "accountant", "budget", "history"):
            s.add_column(col, overflow="fold")
        for g in rep.spends:
            eps = "∞" if g.epsilon is None else f"{g.epsilon:.6f}"
            s.add_row(g.party, g.dataset, g.unit, g.observer, str(g.releases), eps, f"{g.delta:g}", g.accountant,
                      "none" if g.budget is None else f"{g.budget:g}", "complete" if g.complete_history else "partial")
        out.print(s)
    for f in rep.findings:
        where = f"line {f.line}: " if f.line is not None else ""
        out.print(f"[red]{f.code.name.lower()}[/] {escape(where + f.message)}")
    if rep.exit_code == ExitCode.OK:
        out.print("[green]verified[/]: every chain, signature, claim and budget checks out")
    elif rep.exit_code == ExitCode.LEDGER_ABORTED and rep.abort is not None:
        a = rep.abort
        codes = ", ".join(f"{k}: {v}" for k, v in sorted((a.get("codes") or {}).items())) or "none"
        out.print(f"[yellow]aborted[/]: the run ended with the coordinator's signed abort at line {a['line']} (round {a['round']}, "
                  f"reason {escape(str(a['reason']))}, exit {a['exit_code']}; partner error codes: {escape(codes)}); "
                  "every chain, signature, claim and budget before it checks out")
    raise typer.Exit(int(rep.exit_code))


@audit_app.command("report")
def report(
    ledger: Annotated[Path, typer.Argument(help="A run ledger or a node's ledger.")],
    roster: Annotated[Path, typer.Option("--roster", help="The parties' public keys.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.html, report.md and the plots.")] = Path("audit-report"),
) -> None:
    """An HTML and Markdown report: epsilon over rounds against budgets, mechanisms, non-private releases, key custody."""
    from fedcollab.audit import write_report
    from fedcollab.spec import load_roster

    try:
        paths = write_report(ledger, load_roster(roster), out)
    except FedcollabError as exc:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    for p in paths:
        Console().print(f"wrote {p}")
