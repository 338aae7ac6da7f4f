"""Library logging: loggers under ``fedcollab``, a NullHandler only; the CLI adds handlers."""

from __future__ import annotations

import logging

logging.getLogger("fedcollab").addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """Return the logger ``fedcollab.<name>``."""
    return logging.getLogger(f"fedcollab.{name}")
