"""``fedcollab audit epsilon``: recompute (or calibrate) epsilon from privacy events.

The events are the ledger's (``schemas/event.schema.json``), so an auditor can check any
claim with nothing but the base install.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, cast

import click
import typer
from rich.console import Console
from rich.table import Table

from fedcollab.cli._app import _fail, _setup_logging
from fedcollab.cli._audit import audit_app
from fedcollab.core import ConfigError, FedcollabError, PrivacyError
from fedcollab.privacy.accounting import AccountantName

_CALIBRATABLE = ("gaussian", "poisson_subsampled_gaussian")

_EPILOG = """Examples:

  fedcollab audit epsilon --event '{"mechanism": "poisson_subsampled_gaussian", "noise_multiplier": 1.5, "sample_rate": 0.04, "steps": 2250}' --delta 1e-5

  fedcollab audit epsilon --event '{"mechanism": "gaussian", "noise_multiplier": 5.0, "releases": 20}' --delta 1e-5 --accountant exact

  fedcollab audit epsilon --calibrate --target-epsilon 1 --event '{"mechanism": "poisson_subsampled_gaussian", "sample_rate": 0.16, "steps": 120}' --delta 1e-3

Exit codes: 2 unreadable JSON or wrong options; 4 invalid privacy parameters or an unsupported event."""


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise ConfigError(f"{where}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); got {shown!r}.") from None


def load_events(events: list[str] | None, events_file: Path | None) -> list[Any]:
    """The raw event objects from ``--event`` (in order) or ``--events-file`` (a JSON list)."""
    if events and events_file is not None:
        raise ConfigError("give `--event` (repeatable) or `--events-file`, not both.")
    if events_file is not None:
        try:
            text = events_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"`--events-file`: cannot read {events_file} ({getattr(exc, 'strerror', None) or exc}).") from None
        data = _parse_json(text, f"`--events-file` {events_file}")
        if not isinstance(data, list):
            raise ConfigError(f"`--events-file` must hold a JSON list of events, got a {type(data).__name__}.")
        return data
    if not events:
        raise ConfigError("give at least one `--event JSON` or an `--events-file PATH`.")
    return [_parse_json(text, f"`--event` #{i + 1}") for i, text in enumerate(events)]


def _mechanisms(raw: list[Any]) -> list[Any]:
    from fedcollab.privacy.accounting import mechanism_from_dict

    out, problems = [], []
    for i, item in enumerate(raw):
        try:
            out.append(mechanism_from_dict(item, prefix=f"events[{i}]"))
        except PrivacyError as exc:
            problems.extend(exc.problems or [str(exc)])
    if problems:
        raise PrivacyError("invalid privacy event:", problems=problems)
    return out


def epsilon_report(raw: list[Any], *, delta: float, accountant: AccountantName) -> dict[str, Any]:
    """``{"epsilon", "delta", "accountant", "accountant_version", "optimal_order", "upper_bound"}``."""
    from fedcollab.privacy.accounting import compute_epsilon

    mechs = _mechanisms(raw)
    return compute_epsilon(mechs, delta=delta, accountant=accountant).to_dict()


def calibration_report(raw: list[Any], *, delta: float, accountant: AccountantName, target_epsilon: float) -> dict[str, Any]:
    """Solve the last event's ``noise_multiplier`` so that all events stay within ``target_epsilon``.

    The events before the last are releases already made (composed first, never changed).
    """
    from fedcollab.privacy.accounting import (
        GaussianMechanism,
        PoissonSubsampledGaussian,
        calibrate_noise_multiplier,
        compute_epsilon,
        mechanism_from_dict,
    )

    if not raw:
        raise ConfigError("`--calibrate` needs one event template.")
    i = len(raw) - 1
    template = raw[-1]
    where = f"events[{i}]"
    if not isinstance(template, dict):
        raise PrivacyError(f"`{where}` must be a JSON object (an event template), got {type(template).__name__}.")
    kind = template.get("mechanism")
    if kind not in _CALIBRATABLE:
        raise PrivacyError(f"unsupported: `{where}.mechanism` must be one of {list(_CALIBRATABLE)} to calibrate, got {kind!r}.")
    if "noise_multiplier" in template:
        raise PrivacyError(
            f"`{where}.noise_multiplier` must be absent with --calibrate (it is what is solved for), got {template['noise_multiplier']!r}."
        )
    prior = _mechanisms(raw[:-1])
    # Validate the rest of the template (names every bad field) with a placeholder multiplier.
    checked = mechanism_from_dict({**template, "noise_multiplier": 1.0}, prefix=where)
    sample_rate: float | None
    if isinstance(checked, PoissonSubsampledGaussian):
        sample_rate, steps = checked.sample_rate, checked.steps
    elif isinstance(checked, GaussianMechanism):
        sample_rate, steps = None, checked.releases
    else:  # pragma: no cover - kind was checked above
        raise PrivacyError(f"unsupported: cannot calibrate {kind!r}.")
    z = calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=accountant, prior=prior
    )
    event = checked.model_copy(update={"noise_multiplier": z})
    result = compute_epsilon([*prior, event], delta=delta, accountant=accountant).to_dict()
    return {"noise_multiplier": z, "target_epsilon": target_epsilon, "event": event.model_dump(), **result}


def _print_table(report: dict[str, Any]) -> None:
    t = Table("field", "value", title="fedcollab audit epsilon")
    for k, v in report.items():
        if k == "epsilon" and v is None:
            v = "inf"
        t.add_row(k, json.dumps(v) if isinstance(v, dict) else str(v))
    Console().print(t)


@audit_app.command("epsilon", epilog=_EPILOG)
def epsilon(
    event: Annotated[
        list[str] | None,
        typer.Option("--event", help="One privacy event as JSON (repeatable; composed in the order given)."),
    ] = None,
    events_file: Annotated[Path | None, typer.Option("--events-file", help="A JSON list of events, composed in order.")] = None,
    delta: Annotated[float | None, typer.Option("--delta", help="delta, in [0, 1) (0 only for pure-DP events such as laplace).")] = None,
    accountant: Annotated[
        str,
        typer.Option("--accountant", click_type=click.Choice(["rdp", "pld", "exact"]), help="rdp (default), pld (tight), exact (closed forms)."),
    ] = "rdp",
    fmt: Annotated[str, typer.Option("--format", click_type=click.Choice(["json", "table"]), help="json (default) or table.")] = "json",
    calibrate: Annotated[
        bool, typer.Option("--calibrate", help="Solve the last event's noise_multiplier (leave it out) for --target-epsilon.")
    ] = False,
    target_epsilon: Annotated[float | None, typer.Option("--target-epsilon", help="With --calibrate: the epsilon to reach.")] = None,
) -> None:
    """Epsilon at --delta of the given privacy events, or (--calibrate) the noise multiplier for a target."""
    _setup_logging(False)
    try:
        if delta is None:
            raise ConfigError("`--delta` is required (a number in [0, 1)).")
        if target_epsilon is not None and not calibrate:
            raise ConfigError("`--target-epsilon` only applies with `--calibrate`.")
        raw = load_events(event, events_file)
        acc = cast(AccountantName, accountant)  # click.Choice has checked it
        if calibrate:
            if target_epsilon is None:
                raise ConfigError("`--target-epsilon` is required with `--calibrate`.")
            report = calibration_report(raw, delta=delta, accountant=acc, target_epsilon=target_epsilon)
        else:
            report = epsilon_report(raw, delta=delta, accountant=acc)
    except FedcollabError as exc:
        if fmt == "json":
            sys.stdout.write(json.dumps({"error": str(exc), "problems": exc.problems, "exit_code": exc.exit_code}) + "\n")
        raise _fail(exc) from None
    if fmt == "json":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_table(report)
