"""Reading a silo's data source (CSV or Parquet)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedcollab.core import DataUnreadable, DataValidationError
from fedcollab.spec import SourceSpec

EMBEDDED_PREFIX = "embedded://"


def embedded_path(name: str) -> Path:
    """Path of a data file shipped inside the fedcollab package."""
    here = Path(__file__).resolve().parent / "embedded"
    path = (here / name).resolve()
    if here not in path.parents or not path.is_file():
        raise DataUnreadable(f"no embedded data file {name!r}; available: {sorted(p.name for p in here.glob('*.csv'))}")
    return path


def resolve_path(path: str, base_dir: str | Path) -> Path:
    """Resolve a spec path: ``embedded://NAME`` or relative to the spec's folder."""
    if path.startswith(EMBEDDED_PREFIX):
        return embedded_path(path[len(EMBEDDED_PREFIX) :])
    p = Path(path)
    return p if p.is_absolute() else Path(base_dir) / p


def read_source(source: SourceSpec, base_dir: str | Path = ".") -> pd.DataFrame:
    """Read the rows of a source, applying its ``where`` filter."""
    path = resolve_path(source.path, base_dir)
    fmt = source.format or ("parquet" if path.suffix.lower() in {".parquet", ".pq"} else "csv")
    try:
        if fmt == "parquet":
            df = pd.read_parquet(path)
        else:
            # Read everything as text first: types are checked against the schema, not guessed.
            df = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    except FileNotFoundError:
        raise DataUnreadable(f"data source not found: {path}") from None
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataUnreadable(f"cannot read data source {path} as {fmt}: {type(exc).__name__}") from None
    for column, value in source.where.items():
        if column not in df.columns:
            raise DataValidationError(f"source.where: column `{column}` is not in {path.name}")
        df = df[df[column].astype(str) == str(value)]
    return df.reset_index(drop=True)
