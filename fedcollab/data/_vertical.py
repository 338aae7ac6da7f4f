"""A vertical party's own columns: validated, encoded, keyed by the join id. Never leaves the node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcollab.core import DataValidationError
from fedcollab.data._source import read_source
from fedcollab.data._validate import _check_column
from fedcollab.spec import SchemaSpec, SourceSpec, Spec


@dataclass(frozen=True)
class VerticalPartyData:
    """One vertical party's rows: join ids (exact text), encoded features, and the label at the label holder."""

    partner: str
    ids: tuple[str, ...]
    feature_names: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray | None
    rows_read: int
    rows_dropped_missing: int


def encoded_names(schema: SchemaSpec, features: list[str]) -> list[str]:
    """Encoded names of ``features`` (categories one-hot without the reference level), in schema order."""
    names: list[str] = []
    for f in features:
        col = schema.column(f)
        names.extend(f"{f}={lvl}" for lvl in (col.levels or [])[1:]) if col.type == "category" else names.append(f)
    return names


def _encode(typed: pd.DataFrame, schema: SchemaSpec, features: list[str]) -> np.ndarray:
    cols: list[np.ndarray] = []
    for f in features:
        col = schema.column(f)
        if col.type == "category":
            text = typed[f].astype(str).to_numpy()
            cols.extend((text == str(lvl)).astype(np.float64) for lvl in (col.levels or [])[1:])
        else:
            cols.append(typed[f].to_numpy(dtype=np.float64))
    return np.stack(cols, axis=1) if cols else np.zeros((len(typed), 0))


def party_features(spec: Spec, partner_name: str) -> list[str]:
    """The schema features ``partner_name`` holds, in schema order."""
    partner = next(p for p in spec.partners if p.name == partner_name)
    held = set(partner.columns or [])
    return [f for f in spec.data_schema.features if f in held]


def prepare_vertical_frame(df: pd.DataFrame, spec: Spec, partner_name: str, *, source: str = "data", scoring: bool = False) -> VerticalPartyData:
    """Check ``df`` holds exactly the id column and this partner's columns, drop rows missing one, encode.

    ``scoring``: rows to score with a trained model; the label holder's label column may be absent
    (and is ignored when present), ``y`` is None.
    """
    assert spec.vertical is not None, "a vertical spec"
    schema = spec.data_schema
    partner = next((p for p in spec.partners if p.name == partner_name), None)
    if partner is None:
        raise DataValidationError(f"unknown partner {partner_name!r}; the spec names {[p.name for p in spec.partners]}")
    id_col = spec.vertical.id_column
    expected = [id_col, *(partner.columns or [])]
    if scoring:
        expected = [c for c in expected if c != schema.label.column]
        df = df.drop(columns=[schema.label.column], errors="ignore")
    problems: list[str] = []
    missing_cols = [c for c in expected if c not in df.columns]
    extra_cols = [c for c in df.columns if c not in expected]
    if missing_cols:
        problems.append(f"missing columns: {missing_cols}")
    if extra_cols:
        problems.append(f"columns not held by partner {partner_name!r} in the spec: {extra_cols}")
    typed: dict[str, pd.Series] = {}
    for c in expected:
        if c in df.columns:
            typed[c] = _check_column(schema.column(c), df[c], problems)
    raw_ids = df[id_col].astype("string").str.strip() if id_col in df.columns else pd.Series([], dtype="string")
    if id_col in df.columns:
        if raw_ids.isna().any() or (raw_ids == "").any():
            problems.append(f"column `{id_col}` (the join id): {int((raw_ids.isna() | (raw_ids == '')).sum())} row(s) without an id")
        dupes = raw_ids[raw_ids.duplicated()].dropna().unique()
        if len(dupes):
            problems.append(f"column `{id_col}` (the join id): {len(dupes)} id(s) appear more than once")
    if problems:
        raise DataValidationError(f"{source} does not match the schema ({len(df)} rows):", problems=problems)
    frame = pd.DataFrame(typed, index=df.index)
    features = party_features(spec, partner_name)
    used = features + ([schema.label.column] if partner_name == spec.vertical.label_holder and not scoring else [])
    miss = frame[used].isna().any(axis=1)
    if miss.any() and schema.missing == "error":
        raise DataValidationError(f"{source}: {int(miss.sum())} row(s) miss a feature or the label (schema.missing = 'error')")
    kept = frame[~miss]
    ids = tuple(raw_ids[~miss].tolist())
    y = None
    if partner_name == spec.vertical.label_holder and not scoring:
        lab = schema.label
        s = kept[lab.column]
        if lab.positive_above is not None:
            y = (s.to_numpy(dtype=np.float64) > lab.positive_above).astype(np.float64)
        else:
            positives = {str(v) for v in lab.positive_levels or []}
            y = s.astype(str).isin(positives).to_numpy().astype(np.float64)
    return VerticalPartyData(partner=partner_name, ids=ids, feature_names=tuple(encoded_names(schema, features)),
                             x=_encode(kept, schema, features), y=y, rows_read=len(df), rows_dropped_missing=int(miss.sum()))


def load_vertical_party(spec: Spec, partner_name: str, *, source: SourceSpec | None = None, base_dir: str | Path | None = None,
                        scoring: bool = False) -> VerticalPartyData:
    """Load and prepare ``partner_name``'s columns (its spec source unless ``source`` is given; ``scoring``: no label)."""
    partner = next((p for p in spec.partners if p.name == partner_name), None)
    if partner is None:
        raise DataValidationError(f"unknown partner {partner_name!r}; the spec names {[p.name for p in spec.partners]}")
    src = source or partner.source
    if src is None:
        raise DataValidationError(f"partner {partner_name!r} has no data source (in deployment the node supplies it)")
    df = read_source(src, base_dir if base_dir is not None else spec.base_dir)
    return prepare_vertical_frame(df, spec, partner_name, source=f"partner {partner_name!r} data", scoring=scoring)
