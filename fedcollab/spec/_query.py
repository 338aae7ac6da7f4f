"""A federated statistics query (``fedcollab query SPEC --query FILE``), strictly validated.

A query file is TOML::

    name = "cholesterol by sex"
    epsilon = 1.0          # per query, record level, against the coordinator
    delta = 1e-6
    group_by = "sex"       # optional: a category or bool column; groups = its declared levels
    where = [{ column = "age", op = ">=", value = 50 }]

    [[statistics]]
    kind = "mean"
    column = "chol"

The model knows nothing about data; :func:`check_query` checks it against the shared schema
(columns exist, have public bounds, group domains are declared levels). Each node checks it
again against its own copy of the schema and its policy.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, model_validator

from fedcollab.core import ConfigError, FrozenModel, validate_config
from fedcollab.spec._models import Finite, Scalar, SchemaSpec, _integral_float_to_int

QUERY_SCHEMA_VERSION = 1
QueryKind = Literal["count", "sum", "mean", "variance", "histogram", "quantiles"]
#: Kinds that need a number (or bool) column with public bounds.
NUMERIC_KINDS = frozenset({"sum", "mean", "variance", "quantiles"})
MAX_BINS = 1000
PosInt = Annotated[int, Field(gt=0), BeforeValidator(_integral_float_to_int)]


class Predicate(FrozenModel):
    """Keep a row when ``column op value`` holds (rows missing ``column`` are dropped)."""

    column: str = Field(min_length=1)
    op: Literal["==", "!=", "<", "<=", ">", ">=", "in", "not_in"]
    value: Scalar | list[Scalar]

    @model_validator(mode="after")
    def _shape(self) -> Predicate:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"op `{self.op}` needs a list `value`")
        if self.op not in ("in", "not_in") and isinstance(self.value, list):
            raise ValueError(f"op `{self.op}` needs a single `value`, not a list")
        return self


class StatisticSpec(FrozenModel):
    """One statistic of the query."""

    kind: QueryKind
    column: str | None = Field(default=None, min_length=1, description="Column the statistic is about (not for `count`).")
    bins: PosInt = Field(default=10, description="Histogram bins over the column's public bounds (histogram, quantiles).")
    quantiles: list[Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)]] = Field(
        default_factory=lambda: [0.25, 0.5, 0.75], description="Quantiles to read from the DP histogram (kind = quantiles)."
    )

    @model_validator(mode="after")
    def _consistent(self) -> StatisticSpec:
        if self.kind == "count" and self.column is not None:
            raise ValueError("`count` counts rows; it takes no `column`")
        if self.kind != "count" and self.column is None:
            raise ValueError(f"`{self.kind}` needs a `column`")
        if self.bins > MAX_BINS:
            raise ValueError(f"`bins` must be <= {MAX_BINS}, got {self.bins}")
        return self


class QuerySpec(FrozenModel):
    """A declarative cross-silo query."""

    schema_version: Literal[1] = QUERY_SCHEMA_VERSION
    name: str = Field(default="query", min_length=1, max_length=128)
    statistics: list[StatisticSpec] = Field(min_length=1, max_length=64)
    group_by: str | None = Field(default=None, min_length=1, description="A category or bool column; groups are its declared levels, never values read from the data.")
    where: list[Predicate] = Field(default_factory=list, description="Predicates on schema columns, all of which must hold.")
    mode: Literal["dp", "exact"] = Field(default="dp", description="dp: distributed discrete Gaussian noise; exact: no noise (only where every node's policy allows non-private statistics).")
    epsilon: Finite | None = Field(default=None, gt=0, description="Epsilon of the whole query (record level, observer: the coordinator), split equally across its statistics.")
    delta: Finite = Field(default=1e-6, gt=0, lt=1)
    min_honest: PosInt | None = Field(default=None, description="Fewest honest participants the noise is sized for; default the secure aggregation threshold.")

    @model_validator(mode="after")
    def _privacy(self) -> QuerySpec:
        if self.mode == "dp" and self.epsilon is None:
            raise ValueError("mode = 'dp' needs `epsilon`")
        if self.mode == "exact" and self.epsilon is not None:
            raise ValueError("mode = 'exact' adds no noise; remove `epsilon`")
        return self

    def columns(self) -> list[str]:
        """Every column the query reads (statistics, group, predicates), in order, once."""
        out: list[str] = []
        for c in [*(s.column for s in self.statistics), self.group_by, *(p.column for p in self.where)]:
            if c is not None and c not in out:
                out.append(c)
        return out

    def kinds(self) -> list[str]:
        """The statistic kinds the query asks for, once each."""
        return sorted({s.kind for s in self.statistics})


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def check_query(query: QuerySpec, schema: SchemaSpec) -> None:
    """Check ``query`` against the shared schema; raise :class:`ConfigError` listing every problem.

    Each problem names the field, what was expected and what was got.
    """
    cols = {c.name: c for c in schema.columns}
    known = sorted(cols)
    problems: list[str] = []
    for i, s in enumerate(query.statistics):
        if s.column is None:
            continue
        col = cols.get(s.column)
        where = f"`statistics[{i}].column`"
        if col is None:
            problems.append(f"{where}: expected a schema column, got unknown column {s.column!r} (columns: {known}).")
        elif s.kind in NUMERIC_KINDS and not (col.type == "bool" or (col.type == "number" and col.bounds is not None)):
            problems.append(f"{where}: `{s.kind}` needs a number column with public `bounds` (or a bool), got {col.type} column {s.column!r}"
                            f"{' without bounds' if col.type == 'number' else ''}.")
        elif s.kind == "histogram" and col.type == "number" and col.bounds is None:
            problems.append(f"{where}: a histogram needs public `bounds`, got number column {s.column!r} without bounds.")
    if query.group_by is not None:
        col = cols.get(query.group_by)
        if col is None:
            problems.append(f"`group_by`: expected a schema column, got unknown column {query.group_by!r} (columns: {known}).")
        elif col.type not in ("category", "bool"):
            problems.append(f"`group_by`: expected a category or bool column (groups come from declared levels), got {col.type} column {query.group_by!r}.")
    for i, p in enumerate(query.where):
        col = cols.get(p.column)
        where = f"where[{i}]"
        if col is None:
            problems.append(f"`{where}.column`: expected a schema column, got unknown column {p.column!r} (columns: {known}).")
            continue
        values = p.value if isinstance(p.value, list) else [p.value]
        if col.type == "category":
            if p.op not in ("==", "!=", "in", "not_in"):
                problems.append(f"`{where}.op`: category column {p.column!r} takes ==, !=, in or not_in, got {p.op!r}.")
            levels = {str(x) for x in col.levels or []}
            bad = [v for v in values if str(v) not in levels]
            if bad:
                problems.append(f"`{where}.value`: expected levels of {p.column!r} {sorted(levels)}, got {bad}.")
        elif col.type == "bool":
            if p.op not in ("==", "!="):
                problems.append(f"`{where}.op`: bool column {p.column!r} takes == or !=, got {p.op!r}.")
            if not all(isinstance(v, bool) for v in values):
                problems.append(f"`{where}.value`: expected true or false for bool column {p.column!r}, got {values}.")
        elif not all(_is_number(v) for v in values):
            problems.append(f"`{where}.value`: expected numbers for number column {p.column!r}, got {values}.")
    if problems:
        raise ConfigError(f"query {query.name!r} does not fit the schema:", problems=problems)


def parse_query(data: dict, *, source: str = "query") -> QuerySpec:
    """Validate a query given as a mapping (as parsed from TOML)."""
    return validate_config(QuerySpec, data, what=f"{source} is not a valid query")


def load_query(path: str | Path) -> QuerySpec:
    """Read and validate a query TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read query {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return parse_query(data, source=str(p))
