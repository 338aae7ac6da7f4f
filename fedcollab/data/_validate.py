"""Validate a silo's rows against the shared schema: every problem listed, one error."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedcollab.core import DataValidationError
from fedcollab.spec import ColumnSpec, SchemaSpec

_TRUE = {"true", "1", "yes", "t", "1.0"}
_FALSE = {"false", "0", "no", "f", "0.0"}


def _to_number(s: pd.Series) -> tuple[pd.Series, int]:
    if pd.api.types.is_bool_dtype(s):
        return s.astype(float), 0
    num = pd.to_numeric(s, errors="coerce")
    bad = int((num.isna() & s.notna()).sum())
    return num.astype(float), bad


_BOOL_TEXT = {**{t: 1.0 for t in _TRUE}, **{t: 0.0 for t in _FALSE}}


def _to_bool(s: pd.Series) -> tuple[pd.Series, int]:
    # Vectorised: true/false, 1/0, yes/no, t/f in any case, Python or numpy bools; NaN stays missing.
    if pd.api.types.is_bool_dtype(s):
        return s.astype(float), 0
    missing = s.isna()
    out = s.astype(str).str.strip().str.lower().map(_BOOL_TEXT).astype(float)
    bad = int((out.isna() & ~missing).sum())
    return out.where(~missing, np.nan), bad


def _check_column(col: ColumnSpec, s: pd.Series, problems: list[str]) -> pd.Series:
    name = col.name
    if col.type == "number":
        out, bad = _to_number(s)
        if bad:
            problems.append(f"column `{name}`: {bad} value(s) are not numbers")
        finite = out.dropna()
        if np.isinf(finite).any():
            problems.append(f"column `{name}`: {int(np.isinf(finite).sum())} infinite value(s)")
        whole = finite[np.isfinite(finite)]
        if col.integer and (whole != np.floor(whole)).any():
            problems.append(f"column `{name}`: expected integers, found fractional values")
        if col.bounds is not None:
            lo, hi = col.bounds
            outside = int(((finite < lo) | (finite > hi)).sum())
            if outside:
                problems.append(f"column `{name}`: {outside} value(s) outside the declared bounds [{lo:g}, {hi:g}]")
    elif col.type == "bool":
        out, bad = _to_bool(s)
        if bad:
            problems.append(f"column `{name}`: {bad} value(s) are not booleans (expected true/false)")
    else:
        levels = {str(v) for v in col.levels or []}
        text = s.where(s.isna(), s.astype(str))
        unknown = sorted({v for v in text.dropna().unique() if v not in levels})
        if unknown:
            shown = ", ".join(repr(u) for u in unknown[:5])
            problems.append(f"column `{name}`: unknown categories {shown}{' ...' if len(unknown) > 5 else ''} (declared levels: {sorted(levels)})")
        out = text
    missing = int(s.isna().sum())
    if missing and not col.nullable:
        problems.append(f"column `{name}`: {missing} missing value(s) but the column is not nullable")
    return out


def validate_frame(df: pd.DataFrame, schema: SchemaSpec, *, source: str = "data") -> pd.DataFrame:
    """Check ``df`` against ``schema`` and return it typed (numbers and bools as float).

    Raises
    ------
    DataValidationError
        Listing every problem: missing or extra columns, wrong types, unknown categories,
        values outside declared bounds, missing values where not allowed.
    """
    problems: list[str] = []
    declared = [c.name for c in schema.columns]
    missing_cols = [c for c in declared if c not in df.columns]
    extra_cols = [c for c in df.columns if c not in declared]
    if missing_cols:
        problems.append(f"missing columns: {missing_cols}")
    if extra_cols:
        problems.append(f"columns not in the schema: {extra_cols}")
    typed = {}
    for col in schema.columns:
        if col.name in df.columns:
            typed[col.name] = _check_column(col, df[col.name], problems)
    if problems:
        raise DataValidationError(f"{source} does not match the schema ({len(df)} rows):", problems=problems)
    return pd.DataFrame(typed, index=df.index)
