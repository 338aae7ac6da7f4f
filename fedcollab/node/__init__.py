"""The partner's node: local training (Opacus DP-SGD), the Flower ClientApp.

Raw rows never leave the node; what does leave is listed as releases, each with its privacy
status, and errors leave as closed codes only.
"""

from fedcollab.node._client import NodeRuntime, make_client_app
from fedcollab.node._home import NodeHome, init_node_home
from fedcollab.node._training import evaluate_model, per_example_losses, train_model

__all__ = ["NodeHome", "NodeRuntime", "evaluate_model", "init_node_home", "make_client_app", "per_example_losses", "probe_dpsgd", "train_model"]


def __getattr__(name: str) -> object:
    # The DP-SGD probe pulls in scipy.stats (about 1 s): loaded only when asked for, never in a
    # node's message handlers.
    if name == "probe_dpsgd":
        from fedcollab.node._probe import probe_dpsgd

        return probe_dpsgd
    raise AttributeError(f"module 'fedcollab.node' has no attribute {name!r}")
