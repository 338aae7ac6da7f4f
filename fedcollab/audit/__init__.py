"""Offline verification of privacy claims (the ledger and auditor's toolkit build on this).

Imports no torch, opacus, tenseal or flwr (import-linter contract).
"""

from fedcollab.audit._recompute import recompute_summary_epsilons
from fedcollab.audit._verify import Finding, GroupSpend, Report, verify_ledger, verify_lines

__all__ = [
    "Finding",
    "GroupSpend",
    "Report",
    "recompute_summary_epsilons",
    "verify_ledger",
    "verify_lines",
]
