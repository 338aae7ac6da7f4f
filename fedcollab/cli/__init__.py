"""The ``fedcollab`` command."""

from fedcollab.cli._app import app, main

__all__ = ["app", "main"]
