"""A canary audit of the real Opacus DP-SGD step (per-sample clipping, then noise).

One DP-SGD step on a tiny model (``Linear(2, 1)``, squared loss) with Opacus's own
``GradSampleModule`` and ``DPOptimizer``, on a fixed batch without and with one canary example
whose gradient is far larger than the clip norm, so that after clipping it moves the summed
gradient by exactly C. The released noisy gradient is projected on the canary's gradient direction
and :func:`fedcollab.privacy.empirical.audit_scores` compares what it sees with the epsilon claimed
for one unsampled Gaussian step of the same noise multiplier.

Notes
-----
Per-sample clipping is deterministic, so Opacus's ``clip_and_accumulate`` runs once per batch
(the real code, on real per-sample gradients); the randomness is the noise, so the optimizer's
own ``add_noise`` and ``scale_grad`` then run once per repetition on a fresh copy of the clipped
sum, which is what ``DPOptimizer.pre_step`` does within one step. The probe fixes the batch: it
tests the Gaussian step, not the amplification by Poisson sampling that DP-SGD's accounting adds.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from fedcollab.core import PrivacyError
from fedcollab.node._training import _secure_torch_generator
from fedcollab.privacy.accounting import AccountantName, GaussianMechanism, check_positive, compute_epsilon
from fedcollab.privacy.empirical import ProbeResult, audit_scores


def _tiny_model() -> nn.Module:
    # skip_init: no draw from torch's global generator (randomness is passed in, never global).
    model = nn.utils.skip_init(nn.Linear, 2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.1, -0.1]]))
        model.bias.zero_()
    return model


def probe_dpsgd(
    *,
    noise_multiplier: float,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    samples: int = 10_000,
    generator: torch.Generator | None = None,
    applied_noise_multiplier: float | None = None,
    batch_size: int = 8,
    confidence: float = 0.95,
    accountant: AccountantName = "exact",
) -> ProbeResult:
    """Audit one Opacus DP-SGD step against the epsilon claimed for ``noise_multiplier``.

    Parameters
    ----------
    noise_multiplier : float
        The claimed noise multiplier (σ / C, unitless).
    clip_norm : float
        C, Opacus's ``max_grad_norm``.
    delta : float
        δ of the claim.
    samples : int
        Steps per neighbouring batch (10^4 takes one to two seconds on a laptop CPU).
    generator : torch.Generator, optional
        Source of the background batch and of Opacus's noise; seeded from OS entropy if omitted.
    applied_noise_multiplier : float, optional
        The noise multiplier handed to Opacus, by default ``noise_multiplier``; set it lower
        (or 0) to see the audit catch missing noise.
    batch_size : int
        Background examples in the batch (the canary is one more).
    confidence : float
        Confidence of the lower bound.
    accountant : {"exact", "pld", "rdp"}
        Accountant of the claimed epsilon.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    z = check_positive(noise_multiplier, "noise_multiplier")
    c = check_positive(clip_norm, "clip_norm")
    applied = z if applied_noise_multiplier is None else check_positive(applied_noise_multiplier, "applied_noise_multiplier", allow_zero=True)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 40:
        raise PrivacyError(f"`samples` must be an int >= 40, got {samples!r}.")
    gen = generator if generator is not None else _secure_torch_generator()
    claimed = compute_epsilon([GaussianMechanism(noise_multiplier=z)], delta=delta, accountant=accountant).epsilon

    x = torch.randn(batch_size, 2, generator=gen) * 0.5
    y = torch.randn(batch_size, 1, generator=gen) * 0.5
    # The canary: a far-away input with a far-off label, so its gradient norm is >> C.
    x_c = torch.tensor([[100.0, 0.0]])
    y_c = torch.tensor([[-100.0]])

    model = _tiny_model()
    params = list(model.parameters())
    # Its direction, from plain autograd (clipping rescales a gradient, it never turns it).
    loss_c = nn.functional.mse_loss(model(x_c), y_c)
    grads = torch.autograd.grad(loss_c, params)
    flat = torch.cat([g.reshape(-1) for g in grads])
    if float(flat.norm()) <= 10.0 * c:
        raise PrivacyError(f"the canary's gradient norm {float(flat.norm()):.3g} is not >> clip_norm {c:g}; lower `clip_norm`.")
    unit = (flat / flat.norm()).detach()

    with warnings.catch_warnings():
        # Opacus warns about secure_mode being off; the probe audits the noise, not the RNG.
        warnings.simplefilter("ignore", UserWarning)
        gsm = GradSampleModule(model, loss_reduction="mean")
        optimizer = DPOptimizer(
            torch.optim.SGD(params, lr=0.1),
            noise_multiplier=applied,
            max_grad_norm=c,
            expected_batch_size=batch_size,
            loss_reduction="mean",
            generator=gen,
        )

    def scores(xb: torch.Tensor, yb: torch.Tensor) -> np.ndarray:
        optimizer.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            nn.functional.mse_loss(gsm(xb), yb).backward()
        optimizer.clip_and_accumulate()  # Opacus's per-sample clipping, once: it is deterministic
        clipped = [p.summed_grad.detach().clone() for p in params]
        released = []
        with torch.no_grad():
            for _ in range(samples):
                for p, s in zip(params, clipped, strict=True):
                    p.summed_grad = s.clone()
                optimizer.add_noise()
                optimizer.scale_grad()
                released.append(torch.cat([p.grad.reshape(-1) for p in params]))
        optimizer.zero_grad(set_to_none=True)
        return (torch.stack(released) @ unit).numpy().astype(float)

    without = scores(x, y)
    with_canary = scores(torch.cat([x, x_c]), torch.cat([y, y_c]))
    audit = audit_scores(without, with_canary, delta=delta, claimed_epsilon=claimed, confidence=confidence)
    return ProbeResult(mechanism="opacus DPOptimizer step", noise_multiplier=z, clip_norm=c, accountant=accountant, audit=audit)
