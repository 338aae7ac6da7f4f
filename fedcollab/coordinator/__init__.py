"""The coordinator: Flower ServerApp, the round loop over Message-API strategies, accounting of releases.

Never imports the data layer (import-linter contract): it sees only what nodes release.
"""

from fedcollab.coordinator._exchange import PollingGrid
from fedcollab.coordinator._guarantees import privacy_section
from fedcollab.coordinator._ledger import COORDINATOR, RunLedger
from fedcollab.coordinator._server import CoordinatorRecorder, RoundRecord, make_server_app

__all__ = ["COORDINATOR", "CoordinatorRecorder", "PollingGrid", "RoundRecord", "RunLedger", "make_server_app", "privacy_section"]
