"""Foundation: config base, errors, exit codes, logging, owner-only files. Imports nothing from fedcollab."""

from fedcollab.core._config import FrozenModel, format_validation_error, validate_config
from fedcollab.core._errors import (
    BudgetExhausted,
    ConfigError,
    CryptoError,
    DataUnreadable,
    DataValidationError,
    FedcollabError,
    MissingExtra,
    NodeCoded,
    NodeError,
    PolicyRefused,
    PrivacyError,
    ProtocolError,
    RunInterrupted,
    SpecError,
    TransportError,
    UpdateError,
    node_code_for,
)
from fedcollab.core._exit_codes import EXIT_CODE_HELP, ExitCode
from fedcollab.core._files import write_private
from fedcollab.core._lazy import lazy_exports
from fedcollab.core._log import get_logger
from fedcollab.core._node_codes import NODE_ERROR_HELP, NodeErrorCode

__all__ = [
    "EXIT_CODE_HELP",
    "NODE_ERROR_HELP",
    "BudgetExhausted",
    "ConfigError",
    "CryptoError",
    "DataUnreadable",
    "DataValidationError",
    "ExitCode",
    "FedcollabError",
    "FrozenModel",
    "MissingExtra",
    "NodeCoded",
    "NodeError",
    "NodeErrorCode",
    "PolicyRefused",
    "PrivacyError",
    "ProtocolError",
    "RunInterrupted",
    "SpecError",
    "TransportError",
    "UpdateError",
    "format_validation_error",
    "get_logger",
    "lazy_exports",
    "node_code_for",
    "validate_config",
    "write_private",
]
