"""The partner's node: local training (Opacus DP-SGD), the Flower ClientApp.

Raw rows never leave the node; what does leave is listed as releases, each with its privacy
status, and errors leave as closed codes only.

Other packages import the node through the names below, never its private modules. Each module
loads on first use: ``fedcollab node init`` reads the node folder (``NodeHome``) without importing
torch or Flower, and the DP-SGD probe's scipy.stats is never loaded by a message handler.
"""

from __future__ import annotations

from fedcollab.core import lazy_exports

_WHERE = {
    # the node folder: policy, keys, ledger, rollback anchor
    "ANCHOR_DIR_ENV": "_home", "NodeHome": "_home", "countersign_close": "_home", "init_node_home": "_home",
    # the ClientApp and local training
    "NodeRuntime": "_client", "make_client_app": "_client", "refuse_over_budget": "_client",
    "evaluate_model": "_training", "per_example_losses": "_training", "train_model": "_training",
    # the other ClientApps and their node-side state
    "make_analytics_client_app": "_analytics",
    "read_model": "_he", "read_model_scaling": "_he",
    "psi_runs_joined": "_vertical", "vertical_policy_problem": "_vertical",
    # deployment: the approved bundle and the SuperNode
    "NodeDeployment": "_deploy", "approved_bundle_sha256": "_deploy", "build_bundle": "_deploy", "serve": "_deploy",
    # the empirical DP-SGD audit
    "probe_dpsgd": "_probe",
}

__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
