"""Closed forms: exact (ε, δ) where one exists, and a clear "unsupported" where none does.

What the ``exact`` accountant can do, and what it says about its answer:

=========================================  ==========================================  ===============
Events (all of one kind)                   Answer                                      ``upper_bound``
=========================================  ==========================================  ===============
Gaussian releases (any z, any count)       analytic Gaussian, Balle & Wang 2018 Thm 8  False
Laplace releases, δ = 0                    pure DP, Σ k·s/b (Dwork et al. 2006)       False
one Laplace release, δ > 0                 ε0 + 2 ln(1 − δ) (hockey-stick, see below)  False
several Laplace releases, δ > 0            the pure bound Σ k·s/b                      True
zCDP releases                              Canonne, Kamath & Steinke 2020 conversion   True
Poisson-subsampled Gaussian (DP-SGD)       unsupported (no closed form)                --
a mix of kinds                             unsupported (no exact composition)          --
=========================================  ==========================================  ===============

Imports numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import optimize, special

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting._events import (
    GaussianMechanism,
    LaplaceMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    ZCDPMechanism,
)

#: Root-finding tolerance on epsilon; the answer is then rounded *up* until it is a valid epsilon.
_XTOL = 1e-13


def gaussian_log_delta(epsilon: float, mu: float) -> float:
    """``log δ(ε)`` of the Gaussian mechanism with ``mu = Δ / σ`` (equivalently μ-GDP).

    δ(ε) = Φ(μ/2 − ε/μ) − e^ε Φ(−μ/2 − ε/μ)   (Balle & Wang 2018, Theorem 8, with μ = Δ/σ;
    the same curve is μ-GDP, Dong, Roth & Su 2022, Corollary 2.13).

    Notes
    -----
    Both terms are computed in log space (``scipy.special.log_ndtr``) and subtracted as
    ``log Φ(a) + log(−expm1(log e^ε Φ(b) − log Φ(a)))``, so δ down to 1e-300 keeps its relative
    precision where a plain difference of ``ndtr`` values would cancel to 0.
    """
    if mu == 0.0:
        return -math.inf
    if math.isinf(mu):
        return 0.0  # no noise: delta(eps) = 1 for every eps
    a = mu / 2.0 - epsilon / mu
    b = -mu / 2.0 - epsilon / mu
    log_a = float(special.log_ndtr(a))
    log_b = epsilon + float(special.log_ndtr(b))
    diff = log_b - log_a
    if diff >= 0.0:  # only reachable through rounding when delta is ~0 relative to Phi(a)
        return -math.inf
    return log_a + math.log(-math.expm1(diff))


def gaussian_epsilon(*, mu: float, delta: float) -> float:
    """Smallest ε with δ(ε) ≤ ``delta`` for the Gaussian mechanism of ``mu = Δ / σ``.

    Solved with :func:`scipy.optimize.brentq` on ``log δ(ε) − log δ``, then rounded up until
    ``δ(ε) ≤ delta`` holds in floating point, so the answer is never below the exact value.
    """
    if delta <= 0.0:
        return math.inf
    if math.isinf(mu):
        return math.inf
    log_target = math.log(delta)

    def f(eps: float) -> float:
        return gaussian_log_delta(eps, mu) - log_target

    if f(0.0) <= 0.0:
        return 0.0
    hi = max(1.0, mu * mu)
    while f(hi) > 0.0:
        hi *= 2.0
        if hi > 1e12:  # pragma: no cover - delta is bounded below by float precision
            raise PrivacyError(f"cannot bracket the Gaussian epsilon for mu={mu!r}, delta={delta!r}.")
    eps = float(optimize.brentq(f, 0.0, hi, xtol=_XTOL, rtol=4 * np.finfo(float).eps, maxiter=500))
    step = max(_XTOL, abs(eps) * 1e-15)
    while f(eps) > 0.0:
        eps += step
        step *= 2.0
    return eps


def laplace_epsilon(*, epsilon0: float, delta: float) -> float:
    """Exact ε at ``delta`` of ONE Laplace release whose pure-DP epsilon is ``epsilon0 = s / b``.

    δ(ε) = 1 − exp((ε − ε0) / 2) for 0 ≤ ε ≤ ε0 (the hockey-stick divergence of two Laplace
    densities a distance s apart; integrate (p − e^ε q)₊ over x ≤ (s − ε b) / 2), so
    ε(δ) = max(0, ε0 + 2 ln(1 − δ)).
    """
    if delta <= 0.0:
        return epsilon0
    return max(0.0, epsilon0 + 2.0 * math.log1p(-delta))


def zcdp_epsilon_bun_steinke(*, rho: float, delta: float) -> float:
    """ε = ρ + 2 √(ρ ln(1/δ)) for ρ-zCDP (Bun & Steinke 2016, Proposition 1.3)."""
    return rho + 2.0 * math.sqrt(rho * math.log(1.0 / delta))


def _cks_epsilon(alpha: float, rho: float, log_delta: float) -> float:
    # Canonne, Kamath & Steinke 2020, Proposition 12 / Corollary 13 (arXiv:2004.00010v4), applied
    # to the RDP curve of rho-zCDP, eps_alpha = rho * alpha:
    #   eps = rho*alpha + log(1 - 1/alpha) - (log(delta) + log(alpha)) / (alpha - 1).
    return rho * alpha + math.log1p(-1.0 / alpha) - (log_delta + math.log(alpha)) / (alpha - 1.0)


def zcdp_epsilon(*, rho: float, delta: float) -> float:
    """ε at ``delta`` of a ρ-zCDP guarantee: the tighter of two valid conversions.

    The Canonne, Kamath & Steinke (2020) conversion, minimised over the Rényi order α > 1, and
    Bun & Steinke's Proposition 1.3. Both are upper bounds, so their minimum is one too.

    Notes
    -----
    The minimisation runs over ``log(α − 1)`` on a grid (so it cannot miss the basin), then
    refines with a bounded Brent search around the best grid point. Any α > 1 gives a valid bound,
    so an imperfect minimisation can only make the answer larger, never invalid.
    """
    if rho == 0.0:
        return 0.0
    if delta <= 0.0:
        return math.inf
    log_delta = math.log(delta)
    grid = np.linspace(-12.0, 12.0, 241)
    values = [_cks_epsilon(1.0 + math.exp(t), rho, log_delta) for t in grid]
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    res = optimize.minimize_scalar(
        lambda t: _cks_epsilon(1.0 + math.exp(t), rho, log_delta), bounds=(lo, hi), method="bounded", options={"xatol": 1e-10}
    )
    cks = min(values[i], float(res.fun))
    return max(0.0, min(cks, zcdp_epsilon_bun_steinke(rho=rho, delta=delta)))


def exact_epsilon(mechanisms: Sequence[object], *, delta: float) -> tuple[float, bool]:
    """``(epsilon, upper_bound)`` of ``mechanisms`` composed, by closed forms only.

    ``delta`` is already validated. Raises :class:`PrivacyError` ("unsupported: ...") for an
    event without a closed form or for kinds that cannot be composed exactly.
    """
    mechanisms = list(mechanisms)
    if any(isinstance(m, NonPrivate) for m in mechanisms):
        return math.inf, False
    if not mechanisms:
        return 0.0, False
    kinds = {type(m) for m in mechanisms}
    if PoissonSubsampledGaussian in kinds:
        raise PrivacyError(
            "unsupported: the exact accountant has no closed form for poisson_subsampled_gaussian "
            "(DP-SGD); use accountant 'pld' (tight) or 'rdp'."
        )
    if len(kinds) > 1:
        names = sorted(str(getattr(m, "mechanism", type(m).__name__)) for m in {type(m): m for m in mechanisms}.values())
        raise PrivacyError(
            f"unsupported: the exact accountant cannot compose different mechanisms exactly (got {', '.join(names)}); "
            "use accountant 'pld' or 'rdp'."
        )
    gaussian = [m for m in mechanisms if isinstance(m, GaussianMechanism)]
    laplace = [m for m in mechanisms if isinstance(m, LaplaceMechanism)]
    zcdp = [m for m in mechanisms if isinstance(m, ZCDPMechanism)]
    if len(gaussian) == len(mechanisms):
        # Gaussian releases compose exactly into one Gaussian: mu^2 adds up (Dong, Roth & Su 2022,
        # Corollary 3.3); k releases of multiplier z are one release of multiplier z / sqrt(k).
        mu = math.sqrt(math.fsum(m.releases / m.noise_multiplier**2 for m in gaussian))
        return gaussian_epsilon(mu=mu, delta=delta), False
    if len(laplace) == len(mechanisms):
        pure = math.fsum(m.releases * m.sensitivity_l1 / m.scale_b for m in laplace)
        if delta == 0.0:
            return pure, False
        if sum(m.releases for m in laplace) == 1:
            return laplace_epsilon(epsilon0=pure, delta=delta), False
        # No closed form for k > 1 Laplace releases at delta > 0: report the pure bound.
        return pure, True
    if len(zcdp) == len(mechanisms):
        rho = math.fsum(m.rho * m.releases for m in zcdp)  # zCDP composes additively
        return zcdp_epsilon(rho=rho, delta=delta), True
    raise PrivacyError(f"unsupported: the exact accountant does not know mechanism {type(mechanisms[0]).__name__}.")
