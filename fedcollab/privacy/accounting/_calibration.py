"""Calibration of a DP-SGD noise multiplier to a target (epsilon, delta)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting._accountant import AccountantName, _dpa, _fresh, compose_event, compute_epsilon
from fedcollab.privacy.accounting._events import GaussianMechanism, PoissonSubsampledGaussian
from fedcollab.privacy.accounting._validate import check_count, check_delta, check_epsilon, check_rate

_MAX_SIGMA = 1e4


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float | None,
    steps: int,
    accountant: AccountantName,
    prior: Sequence[Any] = (),
) -> float:
    """Smallest noise multiplier such that ``prior`` then the mechanism stays within epsilon.

    With ``sample_rate`` the mechanism is DP-SGD (``PoissonSubsampledGaussian(z, q, steps)``);
    with ``sample_rate=None`` it is ``steps`` plain Gaussian releases.

    Notes
    -----
    Bisection by ``dp_accounting.calibrate_dp_mechanism``; the result is re-checked with
    :func:`compute_epsilon` and never exceeds the target. With ``accountant="exact"`` (plain
    Gaussian releases only; DP-SGD is "unsupported") the closed form is solved with
    :func:`scipy.optimize.brentq` on ``log z`` instead.
    """
    target_epsilon = check_epsilon(target_epsilon, "target_epsilon")
    delta = check_delta(delta)
    steps = check_count(steps, "steps")
    if sample_rate is not None:
        sample_rate = check_rate(sample_rate)
    if steps == 0:
        raise PrivacyError("`steps` must be >= 1 to calibrate a mechanism, got 0.")
    dpa = _dpa()

    def mech(z: float) -> Any:
        if sample_rate is None:
            return GaussianMechanism(noise_multiplier=z, releases=steps)
        return PoissonSubsampledGaussian(noise_multiplier=z, sample_rate=sample_rate, steps=steps)

    prior = list(prior)
    prior_eps = compute_epsilon(prior, delta=delta, accountant=accountant).epsilon if prior else 0.0
    if prior_eps >= target_epsilon:
        raise PrivacyError(
            f"earlier releases already spend epsilon {prior_eps:.4g} >= target_epsilon {target_epsilon:.4g}; no noise multiplier can fit."
        )
    worst = compute_epsilon([*prior, mech(_MAX_SIGMA)], delta=delta, accountant=accountant).epsilon
    if worst > target_epsilon:
        raise PrivacyError(f"no noise multiplier <= {_MAX_SIGMA:g} reaches target_epsilon {target_epsilon:.4g} at delta {delta:g}.")

    def solve(name: str, low: float, high: float) -> float:
        try:
            return float(
                dpa.calibrate_dp_mechanism(
                    lambda: _fresh(name),
                    lambda z: compose_event([*prior, mech(z)]),
                    target_epsilon,
                    delta,
                    bracket_interval=dpa.ExplicitBracketInterval(low, high),
                    tol=1e-4,
                )
            )
        except (ValueError, RuntimeError, MemoryError) as exc:
            raise PrivacyError(f"calibration failed: {exc}") from None

    if accountant == "exact":
        z = _solve_exact(lambda z: compute_epsilon([*prior, mech(z)], delta=delta, accountant="exact").epsilon, target_epsilon)
    else:
        # RDP first: cheap and robust over a wide bracket. PLD is tighter (its epsilon is at most
        # RDP's), so its answer lies below RDP's; a narrow bracket keeps PLD's grids small.
        z = solve("rdp", 1e-3, _MAX_SIGMA)
    if accountant == "pld":
        low = max(z / 3.0, 0.3)
        if low < z:
            z = solve("pld", low, z)
    # Never trust the root finding alone: the claim is what the accountant says.
    while compute_epsilon([*prior, mech(z)], delta=delta, accountant=accountant).epsilon > target_epsilon:
        z *= 1.0001
    return z


def _solve_exact(epsilon_of: Any, target_epsilon: float) -> float:
    """Root of ``epsilon_of(z) = target`` on ``log z`` in [1e-3, _MAX_SIGMA] (epsilon falls as z grows)."""
    from scipy.optimize import brentq  # lazy, like dp-accounting: importing the package stays cheap

    def f(log_z: float) -> float:
        eps = epsilon_of(math.exp(log_z))
        return (eps if math.isfinite(eps) else 1e300) - target_epsilon

    low, high = math.log(1e-3), math.log(_MAX_SIGMA)
    if f(low) <= 0.0:
        return 1e-3
    log_z = float(brentq(f, low, high, xtol=1e-12))
    step = 1e-12
    while f(log_z) > 0.0:  # round up to the first z whose epsilon is within the target
        log_z += step
        step *= 2.0
    return math.exp(log_z)
