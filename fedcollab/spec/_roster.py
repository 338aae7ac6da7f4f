"""The roster: party name <-> Ed25519 signing key <-> Flower node key.

Partners and auditors obtain it out of band, never from the coordinator.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import Field

from fedcollab.core import ConfigError, FrozenModel, validate_config


class RosterEntry(FrozenModel):
    """One party's public keys."""

    signing_key: str = Field(pattern=r"^[0-9a-f]{64}$", description="Raw Ed25519 public key, lowercase hex.")
    role: str = Field(default="partner", pattern=r"^(partner|coordinator)$")
    flower_node_key: str | None = Field(default=None, description="The SuperNode's authentication public key (deployment).")


class Roster(FrozenModel):
    """Every party's public keys."""

    schema_version: int = 1
    parties: dict[str, RosterEntry]


def load_roster(path: str | Path) -> Roster:
    """Read a roster JSON file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read roster {p}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{p} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    return validate_config(Roster, data, what=f"{p} is not a valid roster")
