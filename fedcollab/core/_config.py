"""A frozen, closed, strict pydantic base and one error-message format."""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError


ModelT = TypeVar("ModelT", bound=BaseModel)


class FrozenModel(BaseModel):
    """Base for every config a user writes.

    Notes
    -----
    ``extra="forbid"`` so a misspelt ``noise_multipler`` is an error, not silently dropped;
    ``strict=True`` so ``epsilon = true`` is not turned into ``1.0``; ``frozen=True`` so a
    validated config cannot drift afterwards (use ``model_copy(update=...)``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<root>"


def _got(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


#: A cross-field problem that starts with the field it is about: ``secagg.max_dropouts: ...``,
#: ``partners[0].source.where: ...``, ``privacy.mode = 'distributed' needs ...``.
_LEADING_FIELD = re.compile(r"`?([A-Za-z_]\w*(?:\[\d+\])*(?:\.[A-Za-z_]\w*(?:\[\d+\])*)*)`?")


def _located(part: str, loc: str, fields: Collection[str]) -> str:
    """``part`` of a cross-field problem, under the field it names when a model-level check found it (never ``<root>``)."""
    if loc != "<root>":
        return f"`{loc}`: {part}."
    m = _LEADING_FIELD.match(part)
    if m and re.split(r"[.\[]", m.group(1))[0] in fields and (m.end() == len(part) or part[m.end()] in ": "):
        rest = part[m.end():]
        if rest.startswith(":"):
            return f"`{m.group(1)}`: {rest[1:].strip()}."
    # The problem names its field in its own words (``he.key_holder = 'x' is not a partner``).
    return f"{part}."


def format_validation_error(exc: ValidationError, *, prefix: str = "", fields: Collection[str] = ()) -> list[str]:
    """One line per problem: the field, what was expected, what was got.

    ``fields`` are the top-level field names (and aliases) of the model: a model-level check's
    problem that starts with one of them is reported under that field, never under ``<root>``.
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = _loc(tuple(err["loc"]))
        if prefix:
            loc = f"{prefix}.{loc}" if loc != "<root>" else prefix
        msg = err["msg"]
        if err["type"] == "missing":
            lines.append(f"`{loc}` is required but missing.")
        elif err["type"] == "extra_forbidden":
            lines.append(f"`{loc}` is not a known field (got {_got(err.get('input'))}).")
        elif err["type"] == "value_error":
            # Cross-field checks raise one ValueError listing problems separated by "; ".
            text = msg.removeprefix("Value error, ")
            lines.extend(_located(part, loc, fields) for part in text.split("; "))
        else:
            lines.append(f"`{loc}`: {msg.rstrip('.')}; got {_got(err.get('input'))}.")
    return lines


def validate_config(model: type[ModelT], data: Any, *, what: str, error: type[Exception] | None = None) -> ModelT:
    """``model.model_validate(data)``, or ``error`` (default ConfigError) listing each problem."""
    from fedcollab.core._errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        fields = {*model.model_fields, *(f.alias for f in model.model_fields.values() if f.alias)}
        raise (error or ConfigError)(f"{what}:", problems=format_validation_error(exc, fields=fields)) from None
