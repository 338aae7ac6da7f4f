"""Load a spec from TOML with one clear message per problem."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path
from typing import Any

from fedcollab.core import SpecError, validate_config
from fedcollab.spec._models import Spec


def parse_spec(data: dict[str, Any], *, base_dir: str | Path = ".", source: str = "spec") -> Spec:
    """Validate a spec given as a mapping (as parsed from TOML).

    Raises
    ------
    SpecError
        With one line per problem: the field, what was expected, what was got.
    """
    spec = validate_config(Spec, data, what=f"{source} is not a valid collaboration spec", error=SpecError)
    return spec.with_base_dir(str(base_dir))


def load_spec(path: str | Path) -> Spec:
    """Read and validate ``path`` (TOML)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise SpecError(f"cannot read spec {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise SpecError(f"{p} is not valid TOML: {exc}") from None
    return parse_spec(data, base_dir=p.resolve().parent, source=str(p))


def spec_sha256(path: str | Path) -> str:
    """SHA-256 (hex) of the spec file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
