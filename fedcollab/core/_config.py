"""A frozen, closed, strict pydantic base and one error-message format."""

from __future__ import annotations

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


def format_validation_error(exc: ValidationError, *, prefix: str = "") -> list[str]:
    """One line per problem: the field, what was expected, what was got."""
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
            lines.extend(f"`{loc}`: {part}." for part in text.split("; "))
        else:
            lines.append(f"`{loc}`: {msg.rstrip('.')}; got {_got(err.get('input'))}.")
    return lines


def validate_config(model: type[ModelT], data: Any, *, what: str, error: type[Exception] | None = None) -> ModelT:
    """``model.model_validate(data)``, or ``error`` (default ConfigError) listing each problem."""
    from fedcollab.core._errors import ConfigError

    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise (error or ConfigError)(f"{what}:", problems=format_validation_error(exc)) from None
