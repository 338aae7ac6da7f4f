"""Message kinds and record keys shared by node and coordinator."""

from __future__ import annotations

from enum import StrEnum


class MessageKind(StrEnum):
    """What the coordinator asks (carried in the message config as ``fedcollab.kind``)."""

    SETUP = "setup"
    CLOSE = "close"


class RecordKey(StrEnum):
    """Keys of records in messages."""

    ARRAYS = "arrays"
    CONFIG = "config"
    METRICS = "metrics"
    RELEASES = "fedcollab.releases"
    INFO = "fedcollab.info"
    ERROR = "fedcollab.error"
