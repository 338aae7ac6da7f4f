"""Local training and evaluation in torch; DP-SGD through Opacus.

Notes
-----
With privacy on, Poisson sampling uses Opacus's ``DPDataLoader`` built with q = expected
batch / N (not Opacus's default 1 / len(loader)), and it is handed to ``make_private`` with
``poisson_sampling=False`` so Opacus does not re-derive q; the optimizer's expected batch size is
set to q x N. The noise multiplier comes from fedcollab's accounting core; Opacus's accountant
never backs a claim. An empty Poisson batch still takes an optimizer step (noise only).
Noise comes from a torch generator seeded with 64 bits of OS entropy: Opacus's ``secure_mode``
needs torchcsprng, which no longer works with current torch (recorded in each release).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedcollab.protocols.dpsgd import DpPlan
from fedcollab.protocols.evaluation import score_histograms
from fedcollab.spec import TrainingSpec

NOISE_RNG = "torch.Generator seeded from os.urandom (64 bits); Opacus secure_mode unavailable"


@dataclass(frozen=True)
class TrainOutcome:
    """What local training did."""

    steps: int
    empty_batches: int
    mean_loss: float


def _secure_torch_generator() -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int.from_bytes(os.urandom(8), "little"))
    return g


def _optimizer(model: nn.Module, training: TrainingSpec) -> torch.optim.Optimizer:
    if training.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    return torch.optim.SGD(model.parameters(), lr=training.learning_rate, momentum=training.momentum)


def _proximal_step(model: nn.Module, global_params: list[torch.Tensor] | None, lr: float, mu: float) -> None:
    # FedProx: the gradient of (mu / 2) ||w - w_global||^2 depends only on public weights, so it
    # is applied after the (private) step; Opacus would otherwise drop it from per-sample grads.
    if global_params is None or mu <= 0:
        return
    with torch.no_grad():
        for p, g in zip(model.parameters(), global_params, strict=True):
            p.sub_(lr * mu * (p - g))


def train_model(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    *,
    training: TrainingSpec,
    plan: DpPlan | None,
    proximal_mu: float = 0.0,
    shuffle_seed: int = 0,
) -> TrainOutcome:
    """Train ``model`` in place for ``training.local_epochs`` epochs (DP-SGD when ``plan``)."""
    ds = TensorDataset(torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32))
    global_params = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    loss_fn = nn.BCEWithLogitsLoss()
    optimizer = _optimizer(model, training)
    model.train()
    if plan is None:
        g = torch.Generator()
        g.manual_seed(shuffle_seed)
        loader = DataLoader(ds, batch_size=training.batch_size, shuffle=True, generator=g)
        run_model, run_opt = model, optimizer
    else:
        from opacus import PrivacyEngine
        from opacus.data_loader import DPDataLoader

        loader = DPDataLoader(ds, sample_rate=plan.sample_rate, generator=_secure_torch_generator())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp", secure_mode=False)
            run_model, run_opt, _ = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=plan.noise_multiplier,
                max_grad_norm=plan.clip_norm,
                poisson_sampling=False,
                noise_generator=_secure_torch_generator(),
            )
        run_opt.expected_batch_size = plan.expected_batch
    steps = empty = seen = 0
    total_loss = 0.0
    with warnings.catch_warnings():
        # Opacus's per-sample hooks fire on a module whose inputs need no gradient: benign.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        for _ in range(training.local_epochs):
            for xb, yb in loader:
                run_opt.zero_grad(set_to_none=True)
                if len(yb) == 0:
                    # An empty Poisson batch: per-sample gradients are empty, the step adds noise only.
                    empty += 1
                    (run_model(xb).sum() * 0.0).backward()
                else:
                    loss = loss_fn(run_model(xb), yb)
                    loss.backward()
                    total_loss += float(loss.detach()) * len(yb)
                    seen += len(yb)
                run_opt.step()
                _proximal_step(model, global_params, training.learning_rate, proximal_mu)
                steps += 1
    return TrainOutcome(steps=steps, empty_batches=empty, mean_loss=total_loss / max(seen, 1))


def evaluate_model(model: nn.Module, x: np.ndarray, y: np.ndarray, *, bins: int | None = None,
                   loss_bound: float | None = None) -> dict[str, object]:
    """Counts and score histograms on ``x, y`` (what a node releases about its test split).

    ``bins``: histogram resolution (default :data:`HIST_BINS`); ``loss_bound``: clip each row's
    loss to it before summing (bounded sensitivity, for test metrics released with DP).
    """
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        yt = torch.as_tensor(y, dtype=torch.float32)
        if loss_bound is None:
            loss_sum = float(nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="sum"))
        else:
            losses = nn.functional.binary_cross_entropy_with_logits(logits, yt, reduction="none")
            loss_sum = float(torch.clamp(losses, max=loss_bound).sum())
        prob = torch.sigmoid(logits).numpy()
    pred = (prob >= 0.5).astype(np.float64)
    pos, neg = score_histograms(prob, y) if bins is None else score_histograms(prob, y, bins=bins)
    return {"n": len(y), "correct": float((pred == y).sum()), "loss_sum": loss_sum, "hist_pos": pos, "hist_neg": neg}


def evaluate_margin(margin: np.ndarray, y: np.ndarray, *, bins: int | None = None, loss_bound: float | None = None) -> dict[str, object]:
    """:func:`evaluate_model` from raw scores (log-odds), for models that are not torch modules (trees)."""
    m = np.asarray(margin, dtype=np.float64)
    yy = np.asarray(y, dtype=np.float64)
    losses = np.logaddexp(0.0, m) - yy * m  # binary cross-entropy with logits, stable
    if loss_bound is not None:
        losses = np.minimum(losses, loss_bound)
    prob = 1.0 / (1.0 + np.exp(-m))
    pred = (prob >= 0.5).astype(np.float64)
    pos, neg = score_histograms(prob, yy) if bins is None else score_histograms(prob, yy, bins=bins)
    return {"n": len(yy), "correct": float((pred == yy).sum()), "loss_sum": float(losses.sum()), "hist_pos": pos, "hist_neg": neg}


def per_example_losses(model: nn.Module, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Binary cross-entropy of every row (for the membership-inference check, run at the node)."""
    model.eval()
    with torch.no_grad():
        logits = model(torch.as_tensor(x, dtype=torch.float32))
        losses = nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(y, dtype=torch.float32), reduction="none")
    return losses.numpy().astype(np.float64)
