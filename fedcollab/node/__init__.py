"""The partner's node: local training (Opacus DP-SGD), the Flower ClientApp.

Raw rows never leave the node; what does leave is listed as releases, each with its privacy
status, and errors leave as closed codes only.
"""

from fedcollab.node._client import make_client_app
from fedcollab.node._training import evaluate_model, train_model

__all__ = ["evaluate_model", "make_client_app", "train_model"]
