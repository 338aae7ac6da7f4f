"""Scoring new rows with a run's model: validate against the recorded schema, encode, scale, score.

Everything needed comes from the model file's metadata (``fedcollab/protocols/model_file.py``):
no spec, no data of the partners, and no code is imported (logistic regression and MLP only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import ConfigError, DataValidationError
from fedcollab.protocols.model_file import MODEL_FILE, model_logits, read_model
from fedcollab.spec import SchemaSpec

#: The column of the output that numbers rows when they carry no id column.
ROW_COLUMN = "row"


@dataclass(frozen=True)
class FedcollabModel:
    """A model and its metadata: feature names, encoding, scaling and the schema rows must follow."""

    arrays: dict[str, np.ndarray]
    metadata: dict[str, Any]
    sha256: str | None
    source: str
    #: ``kind = "gbdt"``: the tree ensemble (fedcollab.protocols.gbdt.Ensemble); ``arrays`` is then empty.
    ensemble: Any = None

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], metadata: dict[str, str], *, source: str) -> FedcollabModel:
        """From in-memory arrays and the raw (JSON-valued) metadata, as :class:`~fedcollab.runner.Result` holds them."""
        if not metadata:
            raise ConfigError(f"{source}: no model metadata (the run produced no model file)")
        if not isinstance(arrays, dict):  # a gbdt run's Result.model is the ensemble
            return cls(arrays={}, metadata={k: json.loads(v) for k, v in metadata.items()}, sha256=None, source=source, ensemble=arrays)
        return cls(arrays=dict(arrays), metadata={k: json.loads(v) for k, v in metadata.items()}, sha256=None, source=source)

    @property
    def schema(self) -> SchemaSpec:
        """The data schema recorded with the model."""
        return SchemaSpec.model_validate(self.metadata["schema"], strict=False)

    @property
    def feature_names(self) -> list[str]:
        """Encoded feature names, in the model's input order."""
        return list(self.metadata["feature_names"])

    def encode(self, frame: Any) -> tuple[np.ndarray, Any]:
        """Validated, encoded and scaled rows of ``frame``; also the frame's columns kept for the output."""
        import pandas as pd

        from fedcollab.data import FeatureEncoder, validate_frame

        if not isinstance(frame, pd.DataFrame):
            raise ConfigError(f"rows must be a pandas DataFrame, got {type(frame).__name__}")
        schema = self.schema
        declared = {c.name for c in schema.columns}
        extra = [c for c in frame.columns if c not in declared]
        if extra:
            raise DataValidationError(f"{self.source}: rows do not match the model's schema:",
                                      problems=[f"columns not in the schema: {extra}"])
        # Every feature column is required; other declared columns (label, id) are checked if present.
        needed = set(schema.features) | set(frame.columns)
        sub = schema.model_copy(update={"columns": [c for c in schema.columns if c.name in needed]})
        typed = validate_frame(frame, sub, source="rows to score")
        missing = typed[schema.features].isna().any(axis=1)
        if missing.any():
            rows = [int(i) for i in np.flatnonzero(missing.to_numpy())]
            shown = ", ".join(map(str, rows[:10])) + (" ..." if len(rows) > 10 else "")
            raise DataValidationError(f"rows to score: {len(rows)} row(s) miss a feature value (rows {shown}); a model cannot score them")
        x = FeatureEncoder(schema).features(typed)
        if x.shape[1] != len(self.feature_names):
            raise ConfigError(f"{self.source}: encoding gives {x.shape[1]} features, the model has {len(self.feature_names)}")
        sc = self.metadata["scaling"]
        return (x - np.asarray(sc["mean"], dtype=np.float64)) / np.asarray(sc["std"], dtype=np.float64), frame

    def logits(self, frame: Any) -> np.ndarray:
        """One logit per row of ``frame``."""
        x, _ = self.encode(frame)
        if self.ensemble is not None:
            return np.asarray(self.ensemble.predict_margin(x), dtype=np.float64)
        return model_logits(self.arrays, str(self.metadata["model"]["kind"]), x)

    def predict(self, frame: Any, *, id_column: str | None = None) -> Any:
        """A DataFrame of [id column, ``score``, ``predicted``] for the rows of ``frame``."""
        import pandas as pd

        z = self.logits(frame)
        score = 1.0 / (1.0 + np.exp(-z))
        if id_column is not None and id_column not in frame.columns:
            raise ConfigError(f"`id_column`: expected a column of the rows, got {id_column!r} (columns: {list(frame.columns)})")
        col = id_column or ("id" if "id" in frame.columns else None)
        ids = frame[col].to_numpy() if col else np.arange(len(frame))
        return pd.DataFrame({col or ROW_COLUMN: ids, "score": score, "predicted": (score >= 0.5).astype(int)})


def load_model(path: str | Path) -> FedcollabModel:
    """The model of a run folder (``summary.json`` names the file and its SHA-256) or a ``model.safetensors`` file."""
    p = Path(path)
    expected = None
    if p.is_dir():
        summary_path = p / "summary.json"
        if summary_path.exists():
            try:
                ref = json.loads(summary_path.read_text()).get("model") or {}
            except ValueError:
                raise ConfigError(f"{summary_path}: not JSON") from None
            expected = ref.get("sha256")
            p = p / str(ref.get("path", MODEL_FILE))
        else:
            p = p / MODEL_FILE
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"--model: cannot read {p} ({exc.strerror}); expected a run folder or a model.safetensors file") from None
    sha = hashlib.sha256(raw).hexdigest()
    if expected and sha != expected:
        raise ConfigError(f"{p}: SHA-256 differs from summary.json's model.sha256 (the model file was changed)")
    if p.suffix == ".json":
        from fedcollab.core import ProtocolError
        from fedcollab.protocols.gbdt import from_xgboost_json

        try:
            ensemble, attrs = from_xgboost_json(raw, source=str(p))
            meta = {k.removeprefix("fedcollab."): json.loads(v) for k, v in attrs.items() if k.startswith("fedcollab.")}
        except (ProtocolError, ValueError):
            raise ConfigError(f"{p}: not a fedcollab gbdt model (XGBoost JSON with fedcollab metadata)") from None
        if not meta:
            raise ConfigError(f"{p}: an XGBoost model without fedcollab's metadata (schema, encoding); cannot validate rows for it")
        return FedcollabModel(arrays={}, metadata=meta, sha256=sha, source=str(p), ensemble=ensemble)
    arrays, meta = read_model(raw, source=str(p))
    return FedcollabModel(arrays=arrays, metadata=meta, sha256=sha, source=str(p))


def read_rows(path: str | Path) -> Any:
    """Rows to score from CSV or Parquet, read as text (types are checked against the schema)."""
    from fedcollab.data import read_source
    from fedcollab.spec import SourceSpec

    p = Path(path)
    return read_source(SourceSpec(path=str(p.resolve())), ".")


def predict_file(model: str | Path, data: str | Path, *, id_column: str | None = None) -> tuple[FedcollabModel, Any]:
    """Load ``model`` and score the rows of ``data``."""
    m = load_model(model)
    return m, m.predict(read_rows(data), id_column=id_column)
