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
    mechanism_from_dict,
)
from fedcollab.privacy.accounting._validate import check_delta, check_epsilon, check_positive

__all__ = [
    "AccountantName",
    "EpsilonResult",
    "GaussianMechanism",
    "LaplaceMechanism",
    "Mechanism",
    "NonPrivate",
    "Observer",
    "PoissonSubsampledGaussian",
    "Release",
    "Unit",
    "accountant_version",
    "calibrate_noise_multiplier",
    "check_delta",
    "check_epsilon",
    "check_positive",
    "compute_epsilon",
    "mechanism_from_dict",
    "merge_mechanisms",
]
