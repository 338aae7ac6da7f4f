"""``fedcollab predict``: score new rows with a run's model (docs/quickstart.md, "Using the model")."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fedcollab.cli._errors import fail as _fail
from fedcollab.core import ConfigError, FedcollabError


def predict(
    model: Annotated[Path, typer.Option("--model", help="A run folder (fedcollab run --out, with summary.json) or a model.safetensors file.")],
    data: Annotated[Path, typer.Option("--data", help="CSV or Parquet rows with the schema's feature columns (label and id columns optional).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write the scores here as CSV (id or row, score, predicted).")] = None,
    id_column: Annotated[str | None, typer.Option("--id", help="Column that identifies rows in the output; default `id` if present, else the row number.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="table or json (the scores on stdout).")] = "table",
) -> None:
    """Score rows with a trained model: validated against the model's recorded schema, encoded and scaled as in training."""
    from fedcollab.runner._predict import predict_file

    try:
        if fmt not in ("table", "json"):
            raise ConfigError(f"`--format` must be 'table' or 'json', got {fmt!r}")
        m, scores = predict_file(model, data, id_column=id_column)
    except FedcollabError as exc:
        raise _fail(exc) from None
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        scores.to_csv(out, index=False)
    if fmt == "json":
        id_col = scores.columns[0]
        rows = [{id_col: (v.item() if hasattr(v, "item") else v), "score": float(s), "predicted": int(p)}
                for v, s, p in zip(scores[id_col], scores["score"], scores["predicted"], strict=True)]
        sys.stdout.write(json.dumps({"model": m.source, "sha256": m.sha256, "features": m.feature_names, "rows": len(rows),
                                     "scores": rows, "out": str(out) if out else None}) + "\n")
        return
    con = Console()
    t = Table(title=f"{len(scores)} rows scored with {m.source}")
    for c in scores.columns:
        t.add_column(str(c), justify="right")
    for _, r in scores.head(20).iterrows():
        t.add_row(str(r.iloc[0]), f"{r['score']:.4f}", str(int(r["predicted"])))
    con.print(t)
    if len(scores) > 20:
        con.print(f"... {len(scores) - 20} more rows" + ("" if out else " (use --out FILE for all)"))
    if out is not None:
        con.print(f"wrote {out}")


def register(app: typer.Typer) -> None:
    """Add ``fedcollab predict`` to ``app``."""
    app.command("predict")(predict)
