"""Offline verification of privacy claims (the ledger and auditor's toolkit build on this).

Imports no torch, opacus, tenseal or flwr (import-linter contract).
"""

from fedcollab.audit._mia import MiaResult, advantage_bound, membership_inference_check
from fedcollab.audit._probe import ClippedGaussianSum, probe_gaussian
from fedcollab.audit._recompute import recompute_summary_epsilons
from fedcollab.audit._report import write_report
from fedcollab.audit._verify import Finding, GroupSpend, Report, verify_ledger, verify_lines, verify_with_run

__all__ = [
    "ClippedGaussianSum",
    "Finding",
    "GroupSpend",
    "MiaResult",
    "Report",
    "advantage_bound",
    "membership_inference_check",
    "probe_gaussian",
    "recompute_summary_epsilons",
    "verify_ledger",
    "verify_lines",
    "verify_with_run",
    "write_report",
]
