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
    party_data: Annotated[list[str] | None, typer.Option("--party-data", help="Vertical runs: NAME=FILE, the other party's rows for the same "
                                                          "ids (--data is then the label holder's); records are aligned by PSI.")] = None,
    nodes: Annotated[Path | None, typer.Option("--nodes", help="Vertical runs: the folder holding each party's node folder (NODES/<partner>); "
                                               "default: where the run wrote them (fedcollab run --nodes, or OUT/nodes).")] = None,
) -> None:
    """Score rows with a trained model: validated against the model's recorded schema, encoded and scaled as in training.

    For a vertical run (layout = "vertical") scoring is joint: --data holds the label holder's rows,
    --party-data NAME=FILE the other party's; the common ids are found by PSI and each party
    evaluates its own part of the model at its own node (the passive party's thresholds never
    leave it; what it reveals is recorded in its ledger).
    """
    from fedcollab.runner import predict_file

    try:
        if fmt not in ("table", "json"):
            raise ConfigError(f"`--format` must be 'table' or 'json', got {fmt!r}")
        if _is_vertical(model) or party_data:
            m, scores = _predict_vertical(model, data, party_data or [], nodes)
        else:
            if nodes is not None:
                raise ConfigError(f"--nodes is for vertical runs; --model {model} is not a vertical run folder")
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


def _is_vertical(model: Path) -> bool:
    try:
        return model.is_dir() and json.loads((model / "summary.json").read_text()).get("layout") == "vertical"
    except (OSError, ValueError):
        return False


class _VerticalModelRef:
    def __init__(self, source: str, sha256: str, feature_names: list[str]) -> None:
        self.source, self.sha256, self.feature_names = source, sha256, feature_names


def _predict_vertical(model: Path, data: Path, party_data: list[str], nodes: Path | None = None):  # type: ignore[no-untyped-def]
    from fedcollab.runner import predict_vertical

    if not _is_vertical(model):
        raise ConfigError(f"--party-data is for vertical runs; --model {model} is not a vertical run folder")
    summary = json.loads((model / "summary.json").read_text())
    files: dict[str, str] = {summary["label_holder"]: str(data)}
    for item in party_data:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--party-data: expected NAME=FILE, got {item!r}")
        files[name] = path
    scores = predict_vertical(model, files, nodes=nodes)
    parts = summary["model_parts"][summary["label_holder"]]
    return _VerticalModelRef(str(model), parts["sha256"], []), scores


def register(app: typer.Typer) -> None:
    """Add ``fedcollab predict`` to ``app``."""
    app.command("predict")(predict)
