"""``fedcollab audit membership``: the loss-threshold membership-inference check, run by a partner."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from fedcollab.cli._audit import audit_app
from fedcollab.core import FedcollabError


@audit_app.command("membership")
def membership(
    run_dir: Annotated[Path, typer.Argument(help="A run's output folder (summary.json and the model).")],
    partner: Annotated[str, typer.Option("--partner", help="Whose training rows to test (run it at that partner's node: it reads their data).")],
    spec: Annotated[Path | None, typer.Option("--spec", help="The spec (default: the path recorded in summary.json).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json.")] = "table",
) -> None:
    """How well a loss-threshold attacker tells the partner's training rows from its held-out rows, beside the claimed ε."""
    import numpy as np

    from fedcollab.audit import membership_inference_check
    from fedcollab.data import load_partner_data
    from fedcollab.models import build_model, set_model_arrays
    from fedcollab.node import per_example_losses
    from fedcollab.spec import load_spec

    try:
        summary = json.loads((run_dir / "summary.json").read_text())
        s = load_spec(spec or summary["spec"]["path"])
        data = load_partner_data(s, partner)
        from safetensors.numpy import load_file

        model = build_model(s.model, len(data.feature_names), seed=s.seed)
        set_model_arrays(model, load_file(str(run_dir / summary["model"]["path"])))
        sc = summary.get("scaling_parameters") or {"mean": [0.0] * len(data.feature_names), "std": [1.0] * len(data.feature_names)}
        mean, std = np.asarray(sc["mean"]), np.asarray(sc["std"])
        members = per_example_losses(model, (data.x_train - mean) / std, data.y_train)
        held_out = per_example_losses(model, (data.x_test - mean) / std, data.y_test)
        eps = delta = None
        for g in summary["privacy"]["guarantees"]:
            if g["unit"] == "record" and partner in g["partners"]:
                eps, delta = g["partners"][partner]["epsilon"], g["delta"]
                eps = float("inf") if eps is None else eps
        res = membership_inference_check(members, held_out, epsilon=eps, delta=delta)
    except (OSError, KeyError, ValueError) as exc:
        Console(stderr=True).print(f"[red]error:[/] cannot read the run in {escape(str(run_dir))}: {escape(type(exc).__name__)} {escape(str(exc))}")
        raise typer.Exit(23) from None
    except FedcollabError as exc:
        Console(stderr=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(exc.exit_code) from None
    if fmt == "json":
        sys.stdout.write(json.dumps({"partner": partner, **res.to_dict()}, indent=2) + "\n")
        return
    Console().print(escape(res.summary), highlight=False)
