"""The model file every run writes, in simulation and deployment: ``model.safetensors`` with its metadata.

The tensors are the model's named parameters (``linear.weight (1, d)``, ``linear.bias (1,)`` for a
logistic regression; ``net.0.weight`` ... for an MLP). The safetensors header's ``__metadata__``
(string -> string, every value JSON) says how a raw row becomes the model's input::

    format         "fedcollab-model/1"
    model          {"kind": "logistic_regression", "hidden": []}
    feature_names  ["age", "sex=Male", ...]            encoded features, in the model's input order
    encoding       [{"column": "sex", "type": "category", "levels": [...], "reference": "Female",
                     "encoded": ["sex=Male"]}, {"column": "age", "type": "number", "encoded": ["age"]}, ...]
    scaling        {"method": "federated_statistics", "mean": [...], "std": [...]}   x -> (x - mean) / std
    schema         the spec's [schema] table (columns, features, label), to validate rows
    label          {"column": "num", "positive_above": 0}   what a score of 1 means
    run_id, spec   the run and spec name that produced the model

The coordinator writes it from the spec and the scaling it sent to every node: no data is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import ConfigError
from fedcollab.spec import SchemaSpec, Spec

MODEL_FORMAT = "fedcollab-model/1"
MODEL_FILE = "model.safetensors"
#: Model kinds whose forward pass :func:`model_logits` computes from the arrays alone (no code is imported).
SCORABLE_KINDS = ("logistic_regression", "mlp")


def encoding_of(schema: SchemaSpec) -> list[dict[str, Any]]:
    """Per feature column: its type, levels and reference (categories), and the encoded features it becomes."""
    out: list[dict[str, Any]] = []
    for f in schema.features:
        col = schema.column(f)
        if col.type == "category":
            levels = list(col.levels or [])
            out.append({"column": f, "type": "category", "levels": levels, "reference": levels[0],
                        "encoded": [f"{f}={lvl}" for lvl in levels[1:]], "rule": "one-hot, reference level dropped"})
        elif col.type == "bool":
            out.append({"column": f, "type": "bool", "encoded": [f], "rule": "true -> 1, false -> 0"})
        else:
            out.append({"column": f, "type": "number", "encoded": [f], "bounds": list(col.bounds or []), "rule": "as is"})
    return out


def model_metadata(spec: Spec, *, scaling_method: str, mean: Any, std: Any, run_id: str) -> dict[str, str]:
    """The safetensors metadata of a model trained under ``spec`` with the given global scaling."""
    schema = spec.data_schema
    names = schema.encoded_features()
    m = np.asarray(mean, dtype=np.float64).reshape(-1)
    s = np.asarray(std, dtype=np.float64).reshape(-1)
    if m.shape != (len(names),) or s.shape != (len(names),):
        raise ConfigError(f"scaling must give {len(names)} means and stds (one per encoded feature), got {m.size} and {s.size}")
    meta = {
        "format": MODEL_FORMAT,
        "model": {"kind": spec.model.kind, "hidden": list(spec.model.hidden), "target": spec.model.target},
        "feature_names": names,
        "encoding": encoding_of(schema),
        "scaling": {"method": scaling_method, "mean": m.tolist(), "std": s.tolist()},
        "schema": schema.model_dump(mode="json", by_alias=True),
        "label": schema.label.model_dump(mode="json", exclude_none=True),
        "run_id": run_id,
        "spec": spec.name,
    }
    return {k: json.dumps(v) for k, v in meta.items()}


def save_model(arrays: Mapping[str, np.ndarray], path: str | Path, metadata: Mapping[str, str]) -> str:
    """Write ``arrays`` with ``metadata`` as safetensors (atomically); returns the file's SHA-256."""
    from safetensors.numpy import save

    raw = save({k: np.ascontiguousarray(v) for k, v in arrays.items()}, metadata=dict(metadata))
    p = Path(path)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_bytes(raw)
    tmp.replace(p)
    return hashlib.sha256(raw).hexdigest()


def read_model(raw: bytes, *, source: str = "model") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays and the decoded metadata of a model file's bytes.

    Raises
    ------
    ConfigError
        If the bytes are not safetensors, or carry no fedcollab metadata (a model written before
        the metadata existed: rerun to get one).
    """
    from safetensors.numpy import load

    try:
        arrays = load(raw)
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError
        raise ConfigError(f"{source}: not a safetensors file ({type(exc).__name__})") from None
    # The metadata sits in the JSON header after an 8-byte little-endian length (the safetensors format).
    header_len = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8:8 + header_len])
    except ValueError:
        raise ConfigError(f"{source}: unreadable safetensors header") from None
    raw_meta = header.get("__metadata__") or {}
    try:
        meta = {k: json.loads(v) for k, v in raw_meta.items()}
    except ValueError:
        meta = {}
    if meta.get("format") != MODEL_FORMAT:
        raise ConfigError(f"{source}: no fedcollab model metadata (expected `format` {MODEL_FORMAT!r}, got {meta.get('format')!r}); "
                          "the model was written by an older fedcollab or another tool: rerun the collaboration")
    return arrays, meta


def model_logits(arrays: Mapping[str, np.ndarray], kind: str, x: np.ndarray) -> np.ndarray:
    """One logit per row of scaled, encoded ``x``, from the parameters alone (logistic regression or MLP)."""
    x = np.asarray(x, dtype=np.float64)
    if kind == "logistic_regression":
        w = np.asarray(arrays["linear.weight"], dtype=np.float64)
        b = np.asarray(arrays["linear.bias"], dtype=np.float64)
        return (x @ w.T + b).reshape(-1)
    if kind == "mlp":
        layers = sorted({int(k.split(".")[1]) for k in arrays if k.startswith("net.") and k.endswith(".weight")})
        h = x
        for i, idx in enumerate(layers):
            h = h @ np.asarray(arrays[f"net.{idx}.weight"], dtype=np.float64).T + np.asarray(arrays[f"net.{idx}.bias"], dtype=np.float64)
            if i < len(layers) - 1:
                h = np.maximum(h, 0.0)
        return h.reshape(-1)
    raise ConfigError(f"model.kind: scoring needs one of {list(SCORABLE_KINDS)} (a forward pass from the parameters alone), got {kind!r}; "
                      "a custom model: load the safetensors arrays into your own class")
