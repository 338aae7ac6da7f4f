"""The fedcollab error tree.

Every exception fedcollab raises on purpose is one of these (or a subclass defined next to the
code that raises it); each class carries the command's exit code and the code a node replies with
when it fails that way, both as class attributes (``[exit code / node code]``):

* FedcollabError [1 ERROR / 100 INTERNAL]
  * ConfigError [2 CONFIG_INVALID / 120 BAD_REQUEST]
    * SpecError: a collaboration spec that does not validate (one line per problem)
    * MissingExtra [10 MISSING_EXTRA / 100 INTERNAL]: a needed extra is not installed
  * DataValidationError [3 DATA_INVALID / 111 DATA_SCHEMA_MISMATCH]: silo data that does not match the shared schema
    * DataUnreadable [3 DATA_INVALID / 110 DATA_UNREADABLE]: the data source is missing or cannot be read
  * PrivacyError [4 PRIVACY_INVALID / 130 PRIVACY_INVALID]: invalid privacy parameters, unsupported events
    * BudgetExhausted [5 BUDGET_EXHAUSTED / 131 BUDGET_EXHAUSTED]: a release would exceed a budget (raised *before* the release)
      * ScoringBudgetExhausted [134] (protocols)
  * PolicyRefused [11 POLICY_REFUSED / 132 POLICY_REFUSED]: a request the partner's policy forbids (refused at the node)
  * CryptoError [6 CRYPTO_FAILED / 140 CRYPTO_REFUSED]
    * ScoringAuthError [136] (protocols)
  * ProtocolError [7 PROTOCOL_FAILED / 120 BAD_REQUEST]: a message malformed or out of order
    * UpdateError [121 BAD_MODEL_UPDATE]: a NaN or wrongly shaped model update (sent or received)
    * ScoringRequestError [135], ScoringReplayError [137] (protocols)
  * TransportError [8 TRANSPORT_FAILED]
    * NodeRejected [12 NODE_REJECTED] (runner)
  * NodeError [9 NODE_FAILED]: a node replied with an error code (never with text)
  * RunInterrupted [130 INTERRUPTED]: the person stopped the run (Ctrl-C); the ledger ends with a signed abort
  * LedgerError [20 LEDGER_TAMPERED] (privacy.accounting)
  * NodeCoded [its own node code]: a refusal a node decides by code (wrong partner, out of order)

:func:`node_code_for` is the one map from an exception to the code a node replies with; every
ClientApp uses it. Exceptions carry structured fields, never data values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from fedcollab.core._exit_codes import ExitCode
from fedcollab.core._node_codes import NodeErrorCode


class FedcollabError(Exception):
    """Root of every error fedcollab raises on purpose."""

    exit_code: ClassVar[ExitCode] = ExitCode.ERROR
    node_code: ClassVar[NodeErrorCode] = NodeErrorCode.INTERNAL

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        self.problems = list(problems)
        if self.problems:
            message = message + "\n" + "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(message)


class ConfigError(FedcollabError):
    """A configuration a user wrote is invalid."""

    exit_code = ExitCode.CONFIG_INVALID
    node_code = NodeErrorCode.BAD_REQUEST  # at a node, a config error is in what the coordinator sent


class SpecError(ConfigError):
    """A collaboration spec is invalid."""


class MissingExtra(ConfigError):
    """A needed extra (Flower, torch, TenSEAL...) is not installed; the message names the pip command."""

    exit_code = ExitCode.MISSING_EXTRA
    node_code = NodeErrorCode.INTERNAL  # the node's installation, not the request


class DataValidationError(FedcollabError):
    """Silo data does not match the shared schema."""

    exit_code = ExitCode.DATA_INVALID
    node_code = NodeErrorCode.DATA_SCHEMA_MISMATCH


class DataUnreadable(DataValidationError):
    """A silo's data source is missing or cannot be read (node code 110, not 111)."""

    node_code = NodeErrorCode.DATA_UNREADABLE


class PrivacyError(FedcollabError):
    """Invalid privacy parameters or an event an accountant cannot handle."""

    exit_code = ExitCode.PRIVACY_INVALID
    node_code = NodeErrorCode.PRIVACY_INVALID


class BudgetExhausted(PrivacyError):
    """A release would exceed a privacy budget."""

    exit_code = ExitCode.BUDGET_EXHAUSTED
    node_code = NodeErrorCode.BUDGET_EXHAUSTED


class PolicyRefused(FedcollabError):
    """A request the partner's policy forbids."""

    exit_code = ExitCode.POLICY_REFUSED
    node_code = NodeErrorCode.POLICY_REFUSED


class CryptoError(FedcollabError):
    """A cryptographic check failed."""

    exit_code = ExitCode.CRYPTO_FAILED
    node_code = NodeErrorCode.CRYPTO_REFUSED


class ProtocolError(FedcollabError):
    """A protocol message is malformed or out of order."""

    exit_code = ExitCode.PROTOCOL_FAILED
    node_code = NodeErrorCode.BAD_REQUEST


class UpdateError(ProtocolError):
    """A model update (or the global model a node receives) is NaN, infinite or wrongly shaped."""

    node_code = NodeErrorCode.BAD_MODEL_UPDATE


class TransportError(FedcollabError):
    """The runtime failed to deliver messages."""

    exit_code = ExitCode.TRANSPORT_FAILED


class NodeError(FedcollabError):
    """One or more nodes replied with error codes."""

    exit_code = ExitCode.NODE_FAILED

    def __init__(self, message: str, *, codes: dict[str, int] | None = None, problems: Sequence[str] = ()) -> None:
        self.codes = dict(codes or {})
        super().__init__(message, problems=problems)


class NodeCoded(FedcollabError):
    """A refusal a node decides by its code alone (unknown partner, a message out of order...).

    The code is per instance (``code``); the message is the code's name, so the node's log says
    what was refused and nothing else leaves.
    """

    def __init__(self, code: NodeErrorCode) -> None:
        super().__init__(code.name)
        self.code = NodeErrorCode(code)


def node_code_for(exc: BaseException) -> NodeErrorCode:
    """The one code a node replies with for ``exc``: its class's ``node_code``; ``INTERNAL`` for anything else.

    Every ClientApp's error path calls this (never its own map), so the same exception gives the
    same code whatever the protocol.
    """
    if isinstance(exc, NodeCoded):
        return exc.code
    if isinstance(exc, FedcollabError):
        return type(exc).node_code
    return NodeErrorCode.INTERNAL


class RunInterrupted(FedcollabError):
    """The run was stopped by the person running it (SIGINT); it ends with a signed abort."""

    exit_code = ExitCode.INTERRUPTED
    node_code = NodeErrorCode.INTERNAL
