"""Privacy accounting core: events in dp-accounting terms, epsilon, calibration.

Imports no torch, opacus, tenseal or flwr, so auditors can install and run it alone.
This is the only code in fedcollab that calibrates a noise multiplier or reports an epsilon.
"""

from fedcollab.privacy.accounting._accountant import (
    AccountantName,
    EpsilonResult,
    accountant_version,
    compute_epsilon,
    merge_mechanisms,
)
from fedcollab.privacy.accounting._budget import BudgetGate
from fedcollab.privacy.accounting._calibration import calibrate_noise_multiplier
from fedcollab.privacy.accounting._events import (
    GaussianMechanism,
    LaplaceMechanism,
    Mechanism,
    NonPrivate,
    Observer,
    PoissonSubsampledGaussian,
    Release,
    Unit,
    ZCDPMechanism,
    event_json_schema,
    mechanism_from_dict,
)
from fedcollab.privacy.accounting._ledger import (
    GENESIS,
    LEDGER_SCHEMA_VERSION,
    LedgerError,
    LedgerLine,
    LedgerRolledBack,
    PartyLedger,
    counts_toward_budget,
    key_fingerprint,
    line_hash,
    parse_lines,
    public_key_hex,
    read_ledger,
    sign_entry,
    verify_signature,
)
from fedcollab.privacy.accounting._validate import check_delta, check_epsilon, check_positive

__all__ = [
    "AccountantName",
    "BudgetGate",
    "EpsilonResult",
    "GENESIS",
    "GaussianMechanism",
    "LEDGER_SCHEMA_VERSION",
    "LaplaceMechanism",
    "LedgerError",
    "LedgerLine",
    "LedgerRolledBack",
    "Mechanism",
    "NonPrivate",
    "Observer",
    "PartyLedger",
    "PoissonSubsampledGaussian",
    "Release",
    "Unit",
    "ZCDPMechanism",
    "accountant_version",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_epsilon",
    "check_positive",
    "compute_epsilon",
    "counts_toward_budget",
    "event_json_schema",
    "key_fingerprint",
    "line_hash",
    "mechanism_from_dict",
    "merge_mechanisms",
    "parse_lines",
    "public_key_hex",
    "read_ledger",
    "sign_entry",
    "verify_signature",
]
