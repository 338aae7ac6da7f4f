"""The coordinator: Flower ServerApp, the round loop over Message-API strategies, accounting of releases.

Never imports the data layer (import-linter contract): it sees only what nodes release.
Other packages import the coordinator through the names below, never its private modules; each
module loads on first use.
"""

from __future__ import annotations

from fedcollab.core import lazy_exports

_WHERE = {
    "PollingGrid": "_exchange",
    "privacy_section": "_guarantees",
    "COORDINATOR": "_ledger", "RunLedger": "_ledger",
    "CoordinatorRecorder": "_server", "RoundRecord": "_rounds", "make_server_app": "_server", "load_checkpoint": "_server",
    # cross-silo analytics
    "AnalyticsRecorder": "_analytics", "default_n_honest": "_analytics",
    "make_profile_server_app": "_analytics", "make_query_server_app": "_analytics",
    # deployment: the run config the ServerApp reads
    "RUN_CONFIG_RESUME": "_deploy", "RUN_CONFIG_SCORE": "_deploy", "RUN_CONFIG_SPEC": "_deploy", "RUN_CONFIG_TIMEOUT": "_deploy", "encode_spec": "_deploy",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
