"""The fedcollab error tree.

* FedcollabError
  * ConfigError
    * SpecError: a collaboration spec that does not validate (one line per problem)
  * DataValidationError: silo data that does not match the shared schema
    * DataUnreadable: the data source is missing or cannot be read (node code 110)
  * PrivacyError: invalid privacy parameters, unsupported events
    * BudgetExhausted: a release would exceed a budget (raised *before* the release)
  * PolicyRefused: a request the partner's policy forbids (refused at the node)
  * CryptoError
  * ProtocolError
    * UpdateError: a NaN or wrongly shaped model update
  * TransportError
  * NodeError: a node replied with an error code (never with text)
  * RunInterrupted: the person stopped the run (Ctrl-C); the ledger ends with a signed abort

Exceptions carry structured fields, never data values.
"""

from __future__ import annotations

from collections.abc import Sequence


class FedcollabError(Exception):
    """Root of every error fedcollab raises on purpose."""

    exit_code: int = 1

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(FedcollabError):
    """A configuration a user wrote is invalid."""

    exit_code = 2


class SpecError(ConfigError):
    """A collaboration spec is invalid."""


class DataValidationError(FedcollabError):
    """Silo data does not match the shared schema."""

    exit_code = 3


class DataUnreadable(DataValidationError):
    """A silo's data source is missing or cannot be read (node code 110, not 111)."""


class PrivacyError(FedcollabError):
    """Invalid privacy parameters or an event an accountant cannot handle."""

    exit_code = 4


class BudgetExhausted(PrivacyError):
    """A release would exceed a privacy budget."""

    exit_code = 5


class PolicyRefused(FedcollabError):
    """A request the partner's policy forbids."""

    exit_code = 11


class CryptoError(FedcollabError):
    """A cryptographic check failed."""

    exit_code = 6


class ProtocolError(FedcollabError):
    """A protocol message is malformed or out of order."""

    exit_code = 7


class UpdateError(ProtocolError):
    """A model update is NaN, infinite or wrongly shaped."""


class TransportError(FedcollabError):
    """The runtime failed to deliver messages."""

    exit_code = 8


class NodeError(FedcollabError):
    """One or more nodes replied with error codes."""

    exit_code = 9

    def __init__(self, message: str, *, codes: dict[str, int] | None = None, problems: Sequence[str] = ()) -> None:
        self.codes = dict(codes or {})
        super().__init__(message, problems=problems)


class RunInterrupted(FedcollabError):
    """The run was stopped by the person running it (SIGINT); it ends with a signed abort."""

    exit_code = 130
