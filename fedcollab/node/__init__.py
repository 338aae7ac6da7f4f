"""The partner's node: local training (Opacus DP-SGD), the Flower ClientApp.

Raw rows never leave the node; what does leave is listed as releases, each with its privacy
status, and errors leave as closed codes only.
"""

from fedcollab.node._client import NodeRuntime, make_client_app
from fedcollab.node._home import NodeHome, init_node_home
from fedcollab.node._training import evaluate_model, train_model

__all__ = ["NodeHome", "NodeRuntime", "evaluate_model", "init_node_home", "make_client_app", "train_model"]
