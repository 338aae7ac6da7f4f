"""``fedcollab audit probe``: a canary audit of what the noise really does.

``--mechanism gaussian`` probes fedcollab's own clip + Gaussian noise code (numpy, base install);
``--mechanism dpsgd`` probes one real Opacus DP-SGD step (needs ``fedcollab[node]``).
"""

from __future__ import annotations

import json
import sys
from typing import Annotated, Any

import click
import typer
from rich.console import Console
from rich.table import Table

from fedcollab.cli._app import _fail, _setup_logging
from fedcollab.cli._audit import audit_app
from fedcollab.core import ConfigError, ExitCode, FedcollabError, MissingExtra, PrivacyError

_DEFAULT_SAMPLES = {"gaussian": 100_000, "dpsgd": 10_000}

_EPILOG = """The verdict: FAIL when the lower bound (at 95% confidence) exceeds the claimed epsilon;
INCONCLUSIVE when the claim is above the largest bound these many runs can show; else PASS, which
only means this test found no violation. Examples:

  fedcollab audit probe --noise-multiplier 1 --delta 1e-5 --seed 0

  fedcollab audit probe --mechanism dpsgd --noise-multiplier 1 --format table"""


def _probe_gaussian(*, noise_multiplier: float, clip_norm: float, delta: float, samples: int, seed: int | None, no_noise: bool) -> Any:
    import numpy as np

    from fedcollab.audit import ClippedGaussianSum, probe_gaussian
    from fedcollab.privacy.mechanisms import fresh_generator

    generator = np.random.default_rng(seed) if seed is not None else fresh_generator()
    mechanism = ClippedGaussianSum(clip_norm=clip_norm, noise_multiplier=0.0) if no_noise else None
    return probe_gaussian(
        noise_multiplier=noise_multiplier, clip_norm=clip_norm, delta=delta, samples=samples, generator=generator, mechanism=mechanism
    )


def _probe_dpsgd(*, noise_multiplier: float, clip_norm: float, delta: float, samples: int, seed: int | None, no_noise: bool) -> Any:
    try:
        import torch

        from fedcollab.node import probe_dpsgd
    except ImportError as exc:
        raise MissingExtra(f"`--mechanism dpsgd` needs torch and opacus ({exc.name} is missing): pip install 'fedcollab[node]'.") from None
    generator = None
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(seed)
    return probe_dpsgd(
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        delta=delta,
        samples=samples,
        generator=generator,
        applied_noise_multiplier=0.0 if no_noise else None,
    )


def _print_table(report: dict[str, Any]) -> None:
    def num(v: Any) -> str:
        return "inf" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    t = Table("", "value", title=f"canary audit: {report['mechanism']}")
    t.add_row("claimed epsilon", num(report["claimed_epsilon"]))
    t.add_row("Gaussian-fit estimate", num(report["estimate"]))
    t.add_row(f"lower bound ({report['confidence']:.0%})", num(report["lower_bound"]))
    t.add_row("largest provable bound", num(report["max_lower_bound"]))
    t.add_row("delta", num(report["delta"]))
    t.add_row("runs (both inputs)", str(report["runs"]))
    colour = {"PASS": "green", "FAIL": "bold red", "INCONCLUSIVE": "yellow"}[report["verdict"]]
    t.add_row("verdict", f"[{colour}]{report['verdict']}[/]")
    Console().print(t)


@audit_app.command("probe", epilog=_EPILOG)
def probe(
    mechanism: Annotated[
        str,
        typer.Option("--mechanism", click_type=click.Choice(["gaussian", "dpsgd"]), help="gaussian (fedcollab's clip + noise) or dpsgd (an Opacus step)."),
    ] = "gaussian",
    noise_multiplier: Annotated[float, typer.Option("--noise-multiplier", help="The claimed noise multiplier (sigma / C).")] = 1.0,
    clip_norm: Annotated[float, typer.Option("--clip-norm", help="C, the L2 clip norm.")] = 1.0,
    delta: Annotated[float, typer.Option("--delta", help="delta of the claim, in (0, 1).")] = 1e-5,
    samples: Annotated[int | None, typer.Option("--samples", help="Runs per neighbouring input (default 100000 gaussian, 10000 dpsgd).")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed for a reproducible audit (default: OS entropy).")] = None,
    fmt: Annotated[str, typer.Option("--format", click_type=click.Choice(["json", "table"]), help="json (default) or table.")] = "json",
    no_noise: Annotated[bool, typer.Option("--no-noise", hidden=True, help="Debug: remove the noise to see a FAIL.")] = False,
) -> None:
    """Run the mechanism many times with and without a canary; compare the epsilon it shows with the claim."""
    _setup_logging(False)
    n = samples if samples is not None else _DEFAULT_SAMPLES[mechanism]
    run = _probe_gaussian if mechanism == "gaussian" else _probe_dpsgd
    try:
        if n < 40:
            raise PrivacyError(f"`--samples` must be >= 40, got {n}.")
        if seed is not None and seed < 0:
            raise ConfigError(f"`--seed` must be >= 0, got {seed}.")
        result = run(noise_multiplier=noise_multiplier, clip_norm=clip_norm, delta=delta, samples=n, seed=seed, no_noise=no_noise)
    except FedcollabError as exc:
        if fmt == "json":
            sys.stdout.write(json.dumps({"error": str(exc), "problems": exc.problems, "exit_code": exc.exit_code}) + "\n")
        raise _fail(exc) from None
    report = {**result.to_dict(), "seed": seed, "noise_removed": no_noise}
    if fmt == "json":
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        _print_table(report)
    if report["verdict"] == "FAIL":
        raise typer.Exit(int(ExitCode.PROBE_FAILED))
