"""Offline verification of privacy claims (the ledger and auditor's toolkit build on this).

Imports no torch, opacus, tenseal or flwr (import-linter contract).
"""

from fedcollab.audit._recompute import recompute_summary_epsilons

__all__ = ["recompute_summary_epsilons"]
