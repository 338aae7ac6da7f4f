"""``fedcollab``: run collaborations, validate specs, export schemas.

Library functions do the work; this module maps :class:`FedcollabError` to exit codes.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedcollab.cli._audit import audit_app
from fedcollab.cli._errors import fail as _fail
from fedcollab.cli._errors import fail_json as _fail_json
from fedcollab.cli._node import node_app
from fedcollab.cli._score import score_app
from fedcollab.core import EXIT_CODE_HELP, FedcollabError

app = typer.Typer(
    help="fedcollab: privacy-preserving cross-silo collaboration on Flower.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
spec_app = typer.Typer(help="Validate collaboration specs and export their JSON Schema.", no_args_is_help=True)
app.add_typer(spec_app, name="spec")
app.add_typer(audit_app, name="audit")
app.add_typer(node_app, name="node")
app.add_typer(score_app, name="score")
console = Console(stderr=True)
Format = Literal["table", "json"]


def _version(value: bool) -> None:
    if value:
        from fedcollab import __version__

        sys.stdout.write(f"fedcollab {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """fedcollab: privacy-preserving cross-silo collaboration on Flower."""


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}"


def print_result_table(summary: Any) -> None:
    """The final table: per-partner and pooled metrics and each partner's epsilon under every guarantee.

    Each guarantee's column names its unit (record-level, partner-level) and observer; record-level
    DP-SGD shows sigma and the DP-SGD steps, a partner-level guarantee the rounds its update was released in.
    """
    out = Console()
    gs = list(summary.privacy.guarantees)
    title = f"{summary.spec.name}: {summary.rounds} rounds, {summary.strategy}, {summary.aggregation}, scaling {summary.scaling}"
    t = Table(title=title)
    for col in ("partner", "n test", "accuracy", "AUC"):
        t.add_column(col, justify="right" if col != "partner" else "left")
    for g in gs:
        t.add_column(f"ε {g.unit}-level vs {g.observer.replace('_', ' ')} (δ={g.delta:g}, {g.accountant})", justify="right")
        if g.unit == "record":
            t.add_column("σ", justify="right")
            t.add_column("steps", justify="right")
        else:
            t.add_column("rounds", justify="right")
    for name, m in summary.metrics.partners.items():
        row = [name, str(m.n), _fmt(m.accuracy), _fmt(m.auc)]
        for g in gs:
            pg = g.partners.get(name)
            row.append(_fmt(pg.epsilon, 4) if pg else "")
            if g.unit == "record":
                row += [_fmt(pg.noise_multiplier, 3) if pg else "", str(pg.steps) if pg else ""]
            else:
                row.append(str(pg.rounds) if pg and pg.rounds is not None else "")
        t.add_row(*row)
    p = summary.metrics.pooled_test
    row = ["[bold]pooled[/]", str(p.n), f"[bold]{_fmt(p.accuracy)}[/]", f"[bold]{_fmt(p.auc)}[/]"]
    row += [""] * sum(3 if g.unit == "record" else 2 for g in gs)
    t.add_row(*row)
    out.print(t)
    if not gs:
        out.print("[yellow]privacy: none[/] (every model update is a non-private release)")
    out.print(f"non-private releases: {len(summary.privacy.non_private_releases)} (see summary.json)  wall {summary.wall_seconds:.1f} s")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # dp-accounting logs, through absl, each RDP order it excludes as numerically unstable; the
    # exclusion is conservative (the bound stays valid), so it is noise for a user.
    logging.getLogger("absl").setLevel(logging.INFO if verbose else logging.ERROR)


@app.command()
def run(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).", exists=False)],
    out: Annotated[Path | None, typer.Option("--out", help="Folder for summary.json, metrics.jsonl, ledger.jsonl, roster.json and the model.")] = None,
    nodes: Annotated[Path | None, typer.Option("--nodes", help="Simulated partners' node folders (keys, policies, ledgers); reuse it to keep budgets across runs. Default OUT/nodes.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json (the summary on stdout; on failure a JSON error object).")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log node and coordinator events.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the failed or interrupted run in OUT from its last checkpoint (every aggregation mode, with or without DP, trees and vertical runs included).")] = False,
) -> None:
    """Run a collaboration on Flower's simulation engine (one machine, offline).

    Every partner's data is checked first (each problem named by partner, column and file). A
    failed or interrupted (Ctrl-C) run writes summary.json with status failed/interrupted and ends
    its ledger with a signed abort; an earlier run's outputs are moved to OUT/previous/RUN_ID/.
    """
    _setup_logging(verbose)
    from fedcollab.runner import check_simulation_data
    from fedcollab.spec import load_spec

    try:
        loaded = load_spec(spec)
        if loaded.layout == "vertical":
            _run_vertical(loaded, spec, out=out or Path("runs") / spec.stem, nodes=nodes, fmt=fmt, resume=resume)
            return
        # Before torch and Flower load: a data problem is named (partner, column, file) in a second.
        check_simulation_data(loaded)
        from fedcollab.runner import run as run_spec

        result = run_spec(spec, out=out or Path("runs") / spec.stem, nodes=nodes, progress=fmt == "table", resume=resume)
    except FedcollabError as exc:
        if fmt == "json":
            raise _fail_json(exc) from None
        raise _fail(exc) from None
    _emit(result, fmt)


def _run_vertical(spec: Any, spec_path: Path | None, *, out: Path, nodes: Path | None, fmt: str, resume: bool = False) -> None:
    """A vertical spec: PSI alignment, SecureBoost or vertical LR, joint evaluation (fedcollab.runner._vertical)."""
    from fedcollab.runner import run_vertical

    try:
        result = run_vertical(spec, out=out, nodes=nodes, spec_path=spec_path, progress=fmt == "table", resume=resume)
    except FedcollabError as exc:
        if fmt == "json":
            raise _fail_json(exc) from None
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(result.summary, indent=2) + "\n")
        return
    print_vertical_table(result.summary)
    Console().print(f"wrote {out}/summary.json, ledger.jsonl, roster.json; model parts at each party's node folder", highlight=False, soft_wrap=True)


def print_vertical_table(summary: dict[str, Any]) -> None:
    """The vertical run at a glance: alignment, metrics, each party's releases."""
    c = Console()
    what = f"SecureBoost, {summary['trees']} trees" if "trees" in summary else f"logistic regression, {summary['iterations']} iterations"
    t = Table(title=f"{summary['spec']['name']}: vertical {what}, {summary['intersection']} common records "
                    f"({summary['n_train']} train / {summary['n_test']} test)")
    t.add_column("party", no_wrap=True)
    t.add_column("role")
    t.add_column("releases (kind -> observer)", overflow="fold")
    t.add_column("ε record-level, per observer (charged releases)", overflow="fold")
    for name in (summary["label_holder"], *(summary.get("passive_parties") or [summary["passive_party"]])):
        p = summary["privacy"]["parties"].get(name, {})
        rel = ", ".join(f"{k} ×{v}" for k, v in sorted(p.get("releases", {}).items()))
        eps = ", ".join(f"{obs}: {'∞' if e is None else f'{e:.3f}'}" for obs, e in sorted((p.get("epsilon") or {}).items())) or "-"
        role = "label holder (active)" if name == summary["label_holder"] else "passive"
        t.add_row(name, role, rel, eps)
    c.print(t)
    m = summary["metrics"]
    c.print(f"test AUC {_fmt(m['test_auc'])}, accuracy {_fmt(m['test_accuracy'])}; PSI {summary['seconds']['align']:.2f} s, "
            f"training {summary['seconds']['train']:.1f} s, {summary['wire_bytes'] / 1e6:.1f} MB on the wire", highlight=False)


@app.command()
def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("runs/demo"),
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    vertical: Annotated[bool, typer.Option("--vertical", help="Run the vertical demo instead: a clinic (label) and a lab hold different "
                                           "columns about partly overlapping patients (specs/heart-disease-vertical.toml).")] = False,
) -> None:
    """Four hospitals train on the embedded Heart Disease data with record-level DP-SGD (ε = 1).

    With --vertical: a clinic and a lab align their patients by PSI and train SecureBoost trees.
    """
    _setup_logging(verbose)
    if vertical:
        from fedcollab.runner import VERTICAL_DEMO_SPEC
        from fedcollab.spec import load_spec

        try:
            loaded = load_spec(VERTICAL_DEMO_SPEC)
        except FedcollabError as exc:
            raise _fail(exc) from None
        _run_vertical(loaded, VERTICAL_DEMO_SPEC, out=out if out != Path("runs/demo") else Path("runs/demo-vertical"), nodes=None, fmt=fmt)
        return
    from fedcollab.runner import run_demo

    try:
        result = run_demo(out=out, progress=fmt == "table")
    except FedcollabError as exc:
        raise _fail(exc) from None
    _emit(result, fmt)


def _emit(result: Any, fmt: str) -> None:
    if fmt == "json":
        sys.stdout.write(result.summary.model_dump_json(indent=2) + "\n")
    else:
        print_result_table(result.summary)
        if result.out_dir is not None:
            ledger = result.summary.ledger
            extra = f", {ledger.path}, {ledger.roster}" if ledger is not None else ""
            Console().print(f"wrote {result.out_dir}/summary.json, metrics.jsonl, {result.summary.model.path}{extra}", highlight=False, soft_wrap=True)


@spec_app.command("validate")
def spec_validate(
    spec: Annotated[Path, typer.Argument(help="Collaboration spec (TOML).")],
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """Check a spec; every problem names the field, the expectation and the value."""
    from fedcollab.core import SpecError
    from fedcollab.runner import check_model_target, missing_sources
    from fedcollab.spec import load_spec

    notes: list[str] = []
    try:
        s = load_spec(spec)
        # Beyond the schema: simulation sources exist, a custom model imports (here, at the spec author's).
        missing = missing_sources(s)
        if missing:
            raise SpecError(f"{spec}: {len(missing)} simulation data source(s) not found:", problems=missing)
        check_model_target(s)
        if s.aggregation != "secagg" and len(s.partners) >= 3:
            notes = [f"`fedcollab query` sums under secure aggregation and would refuse: {p}" for p in s.secagg.problems(len(s.partners))]
    except FedcollabError as exc:
        if fmt == "json":
            sys.stdout.write(json.dumps({"valid": False, "problems": exc.problems or [str(exc)]}) + "\n")
            raise typer.Exit(exc.exit_code) from None
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps({"valid": True, "name": s.name, "partners": [p.name for p in s.partners], **({"notes": notes} if notes else {})}) + "\n")
    else:
        for n in notes:
            Console(stderr=True).print(f"[yellow]note:[/] {escape(n)}")
        if s.vertical is not None:
            model = "SecureBoost" if s.model.kind == "gbdt" else "vertical logistic regression"
            Console().print(f"[green]valid[/]: {s.name}, vertical, {len(s.partners)} partners (label holder {s.vertical.label_holder}), {model}, "
                            f"PSI on `{s.vertical.id_column}` (reveal {s.vertical.psi_reveal}), privacy {s.privacy.mode}")
            return
        Console().print(f"[green]valid[/]: {s.name}, {len(s.partners)} partners, privacy {s.privacy.mode}{' + record-level DP-SGD' if s.privacy.record_level else ''}, scaling {s.resolved_scaling}")


@spec_app.command("schema")
def spec_schema(out: Annotated[Path, typer.Option("--out", help="Folder to write the JSON Schemas to.")] = Path("schemas")) -> None:
    """Write the JSON Schemas of the spec and of summary.json."""
    from fedcollab.cli._schemas import write_schemas

    for path in write_schemas(out):
        Console().print(f"wrote {path}")


@app.command("exit-codes")
def exit_codes(fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table") -> None:
    """List the exit codes and what each means."""
    if fmt == "json":
        sys.stdout.write(json.dumps({int(k): v for k, v in EXIT_CODE_HELP.items()}) + "\n")
        return
    t = Table("code", "meaning")
    for k, v in EXIT_CODE_HELP.items():
        t.add_row(str(int(k)), escape(v))
    Console().print(t)


def main() -> None:
    """Entry point of the ``fedcollab`` script."""
    app()


def _register_audit_commands() -> None:
    # Command modules register themselves on `fedcollab audit` when imported; they import this
    # module's helpers, so they are loaded once it is complete.
    import fedcollab.cli._audit_epsilon  # noqa: F401
    import fedcollab.cli._audit_ledger  # noqa: F401
    import fedcollab.cli._audit_membership  # noqa: F401
    import fedcollab.cli._audit_probe  # noqa: F401


_register_audit_commands()
import fedcollab.cli._analytics  # noqa: E402,F401 - registers `fedcollab query` and `fedcollab profile`
import fedcollab.cli._data  # noqa: E402,F401 - registers `fedcollab data check`


def _register_deploy_commands() -> None:
    # Deployment across organisations: certs, coordinator, node keygen/start, submit, status.
    from fedcollab.cli._deploy import register

    register(app, node_app)


_register_deploy_commands()


def _register_model_commands() -> None:
    # Using and packaging models: `fedcollab predict` (score rows), `fedcollab new` (a Flower app).
    from fedcollab.cli._new import register as register_new
    from fedcollab.cli._predict import register as register_predict

    register_predict(app)
    register_new(app)


_register_model_commands()
