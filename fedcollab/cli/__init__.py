"""The ``fedcollab`` command."""

from fedcollab.cli._app import app, main

# Command modules register themselves on `fedcollab audit` when imported (after _app exists).
import fedcollab.cli._audit_epsilon  # noqa: E402, F401  (registers `audit epsilon`)
import fedcollab.cli._audit_probe  # noqa: E402, F401  (registers `audit probe`)

__all__ = ["app", "main"]
