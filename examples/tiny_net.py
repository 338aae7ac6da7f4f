"""A custom model for ``examples/custom_model.toml``: one hidden ReLU layer.

fedcollab builds a custom model as ``TinyNet(n_features, **options)`` (``[model] options`` in the
spec) and expects one logit per row, shape ``[batch]``. The node and the coordinator both import
it by module name (``target = "tiny_net:TinyNet"``), so the folder holding this file must be on
``sys.path`` in every process that runs them (see ``examples/custom_model.py``).

With ``privacy.mode = "record"`` the layers must be ones Opacus can compute per-sample gradients
for (``nn.Linear`` and activations are; ``nn.BatchNorm`` is not).
"""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """``n_features -> hidden -> 1`` with a ReLU; returns logits of shape ``[batch]``."""

    def __init__(self, n_features: int, hidden: int = 8) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_features, hidden)
        self.out = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits, one per row."""
        return self.out(torch.relu(self.hidden(x))).squeeze(-1)
