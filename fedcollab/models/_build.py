"""Build the spec's torch model with a seeded initialisation that leaves global RNG state alone."""

from __future__ import annotations

import importlib
from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from fedcollab.core import SpecError
from fedcollab.spec import ModelSpec


class LogisticRegression(nn.Module):
    """One linear layer producing one logit per row."""

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(n_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.linear(x).squeeze(-1)


class MLP(nn.Module):
    """Fully connected ReLU network producing one logit per row."""

    def __init__(self, n_features: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.net(x).squeeze(-1)


def _custom(spec: ModelSpec, n_features: int) -> nn.Module:
    assert spec.target is not None
    module_name, _, attr = spec.target.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise SpecError(f"`model.target`: cannot import {spec.target!r} ({type(exc).__name__})") from None
    model = cls(n_features, **spec.options)
    if not isinstance(model, nn.Module):
        raise SpecError(f"`model.target`: {spec.target!r} did not build a torch.nn.Module (got {type(model).__name__})")
    return model


def build_model(spec: ModelSpec, n_features: int, *, seed: int) -> nn.Module:
    """The spec's model, initialised from ``seed`` (global RNG state is restored afterwards)."""
    if spec.kind == "gbdt":
        raise SpecError("model kind gbdt is a tree ensemble, not a torch module: it is built by fedcollab.protocols.gbdt")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec.kind == "logistic_regression":
            return LogisticRegression(n_features)
        if spec.kind == "mlp":
            return MLP(n_features, list(spec.hidden))
        return _custom(spec, n_features)


def _strip(key: str) -> str:
    # Opacus's GradSampleModule prefixes every key with "_module.".
    return key[len("_module.") :] if key.startswith("_module.") else key


def model_arrays(model: nn.Module) -> OrderedDict[str, np.ndarray]:
    """The model's state as named numpy arrays (Opacus's ``_module.`` prefix removed)."""
    return OrderedDict((_strip(k), v.detach().cpu().numpy().copy()) for k, v in model.state_dict().items())


def set_model_arrays(model: nn.Module, arrays: dict[str, np.ndarray]) -> None:
    """Load named arrays into ``model``; names and shapes must match exactly."""
    state = model.state_dict()
    if set(arrays) != set(state):
        raise ValueError("parameter names do not match the model")
    for k, v in arrays.items():
        if tuple(v.shape) != tuple(state[k].shape):
            raise ValueError("parameter shapes do not match the model")
    model.load_state_dict({k: torch.as_tensor(np.asarray(v), dtype=state[k].dtype) for k, v in arrays.items()})
