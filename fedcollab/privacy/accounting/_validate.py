"""Checks for privacy parameters: reject bool, NaN and inf, then check the range."""

from __future__ import annotations

import math
from typing import Any

from fedcollab.core import PrivacyError


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PrivacyError(f"`{name}` must be a number, got {value!r} ({type(value).__name__}).")
    if not math.isfinite(value):
        raise PrivacyError(f"`{name}` must be finite, got {value!r}.")
    return float(value)


def check_epsilon(value: Any, name: str = "epsilon") -> float:
    """``epsilon`` must be a finite number > 0."""
    v = _number(name, value)
    if v <= 0:
        raise PrivacyError(f"`{name}` must be > 0, got {value!r}.")
    return v


def check_delta(value: Any, name: str = "delta", *, allow_zero: bool = False) -> float:
    """``delta`` must be in (0, 1), or [0, 1) where pure DP is meant."""
    v = _number(name, value)
    if not (0.0 <= v < 1.0) or (v == 0.0 and not allow_zero):
        expected = "[0, 1)" if allow_zero else "(0, 1)"
        raise PrivacyError(f"`{name}` must be in {expected}, got {value!r}.")
    return v


def check_positive(value: Any, name: str, *, allow_zero: bool = False) -> float:
    """A finite number > 0 (or >= 0)."""
    v = _number(name, value)
    if v < 0 or (v == 0 and not allow_zero):
        raise PrivacyError(f"`{name}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}.")
    return v


def check_rate(value: Any, name: str = "sample_rate") -> float:
    """A sampling probability in (0, 1]."""
    v = _number(name, value)
    if not 0.0 < v <= 1.0:
        raise PrivacyError(f"`{name}` must be in (0, 1], got {value!r}.")
    return v


def check_count(value: Any, name: str) -> int:
    """A whole number >= 0."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise PrivacyError(f"`{name}` must be an int >= 0, got {value!r} ({type(value).__name__}).")
    if value < 0:
        raise PrivacyError(f"`{name}` must be an int >= 0, got {value!r}.")
    return value
