"""``fedcollab audit``: the auditor's commands (verify, report, epsilon, probe).

Each command's module registers itself on :data:`audit_app`.
"""

from __future__ import annotations

import typer

audit_app = typer.Typer(
    help="Verify privacy claims offline: ledgers, epsilons, and what the noise really does.",
    no_args_is_help=True,
)

