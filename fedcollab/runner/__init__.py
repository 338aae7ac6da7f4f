"""Run a collaboration on Flower's simulation engine: ``fedcollab.run(spec) -> Result``.

The runner's modules load on first use, so the data and spec checks that come before a run
(``check_partner_data`` and the other preflight checks) answer in a second, without importing
torch or Flower. The command line imports the runner through the names below, never its private
modules.
"""

from __future__ import annotations

from fedcollab.core import lazy_exports

_WHERE = {
    "Result": "_run", "run": "_run", "run_demo": "_run",
    "FedcollabModel": "_predict", "load_model": "_predict", "predict_file": "_predict",
    "flower_client_app": "_flower_app", "flower_server_app": "_flower_app",
    # checks before a run: no torch, no Flower
    "check_model_target": "_preflight", "check_partner_data": "_preflight", "check_simulation_data": "_preflight",
    "missing_sources": "_preflight",
    # cross-silo analytics
    "run_profile": "_query", "run_query": "_query",
    # vertical collaboration
    "VERTICAL_DEMO_SPEC": "_vertical", "predict_vertical": "_vertical", "run_vertical": "_vertical",
    # deployment
    "CoordinatorConfig": "_deploy", "NodeConfig": "_deploy", "coordinator_command": "_deploy", "list_nodes": "_deploy",
    "node_auth_key": "_deploy", "register_node": "_deploy", "run_status": "_deploy", "start_node": "_deploy",
    "submit": "_deploy",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
