"""Empirical privacy: turn a distinguishing test's error rates into an epsilon lower bound.

Shared by the auditor's probe of fedcollab's own clip-and-noise code
(:mod:`fedcollab.audit`) and the node's probe of the Opacus DP-SGD step
(:mod:`fedcollab.node`); numpy and scipy only.

The test (Jagielski, Ullman & Oprea 2020; Nasr et al. 2021): a mechanism ran many times on two
neighbouring inputs, without and with one canary. A threshold on a score (the output projected on
the canary's direction) guesses "canary present". For an (ε, δ)-DP mechanism, every such test has

    FPR + e^ε FNR ≥ 1 − δ   and   FNR + e^ε FPR ≥ 1 − δ

(Kairouz, Oh & Viswanath 2015, Theorem 2.1), so

    ε ≥ max(log((1 − δ − FNR) / FPR), log((1 − δ − FPR) / FNR)).

Using Clopper–Pearson upper confidence bounds for FPR and FNR makes this a rigorous lower bound
at the stated confidence. The threshold is chosen on one half of the runs and the bound computed
on the other half, so choosing it does not bias the bound.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
from scipy import stats

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import GaussianMechanism, check_delta, compute_epsilon

Verdict = Literal["PASS", "FAIL", "INCONCLUSIVE"]
_CANDIDATES = 2001


def clopper_pearson_upper(successes: np.ndarray | int, trials: int, *, alpha: float) -> np.ndarray:
    """One-sided Clopper–Pearson upper bound (level ``1 − alpha``) on a binomial rate.

    ``Beta(1 − alpha; k + 1, n − k)``, and 1 when ``k = n`` (Clopper & Pearson 1934).
    """
    k = np.asarray(successes, dtype=float)
    if trials <= 0:
        raise PrivacyError(f"`trials` must be >= 1, got {trials!r}.")
    full = k >= trials
    upper = stats.beta.ppf(1.0 - alpha, k + 1.0, np.maximum(trials - k, 1.0))
    return np.where(full, 1.0, upper)


def epsilon_lower_bound(fpr: np.ndarray | float, fnr: np.ndarray | float, *, delta: float) -> np.ndarray:
    """ε ≥ max(log((1 − δ − FNR)/FPR), log((1 − δ − FPR)/FNR)), clipped at 0 (see module docstring)."""
    fpr = np.asarray(fpr, dtype=float)
    fnr = np.asarray(fnr, dtype=float)

    def one(num_rate: np.ndarray, den_rate: np.ndarray) -> np.ndarray:
        num = 1.0 - delta - num_rate
        ok = (num > 0.0) & (den_rate > 0.0)
        safe_num = np.where(ok, num, 1.0)
        safe_den = np.where(ok, den_rate, 1.0)
        # den_rate == 0 with num > 0 only happens for point estimates: the ratio is unbounded.
        unbounded = (num > 0.0) & (den_rate <= 0.0)
        return np.where(ok, np.log(safe_num / safe_den), np.where(unbounded, np.inf, 0.0))

    return np.maximum(np.maximum(one(fnr, fpr), one(fpr, fnr)), 0.0)


@dataclass(frozen=True)
class CanaryAudit:
    """What one canary audit found.

    ``lower_bound`` holds with probability at least ``confidence``; ``estimate`` is the epsilon of
    a Gaussian mechanism with the observed separation (a point estimate, no guarantee);
    ``max_lower_bound`` is the largest lower bound these many runs could ever show (perfect
    separation), so a claimed epsilon above it cannot be refuted by this audit. ``runs`` counts
    both sides; ``fpr`` and ``fnr`` are measured on the evaluation half.
    """

    claimed_epsilon: float
    estimate: float
    lower_bound: float
    max_lower_bound: float
    delta: float
    confidence: float
    runs: int
    mu_estimate: float
    threshold: float
    fpr: float
    fnr: float
    verdict: Verdict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinities as ``None``)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _gaussian_fit(without: np.ndarray, with_: np.ndarray, *, delta: float) -> tuple[float, float]:
    """(μ̂, ε̂): separation in pooled standard deviations and the epsilon of μ̂-GDP at ``delta``."""
    shift = float(with_.mean() - without.mean())
    if np.ptp(without) == 0.0 and np.ptp(with_) == 0.0:
        spread = 0.0  # no noise at all (var() of a constant array can come out as 1e-32)
    else:
        spread = math.sqrt(0.5 * (float(without.var(ddof=1)) + float(with_.var(ddof=1))))
    if spread == 0.0:
        mu = math.inf if shift > 0.0 else 0.0
    else:
        mu = max(shift, 0.0) / spread
    if mu == 0.0:
        return 0.0, 0.0
    if math.isinf(mu) or 1.0 / mu == 0.0:
        return math.inf, math.inf
    # For a Gaussian mechanism the privacy curve is mu-GDP with mu = sensitivity / sigma, which
    # is the Gaussian mechanism of noise multiplier 1 / mu (Dong, Roth & Su 2022, Cor. 2.13).
    eps = compute_epsilon([GaussianMechanism(noise_multiplier=1.0 / mu)], delta=delta, accountant="exact").epsilon
    return mu, eps


def audit_scores(
    without: np.ndarray,
    with_canary: np.ndarray,
    *,
    delta: float,
    claimed_epsilon: float,
    confidence: float = 0.95,
) -> CanaryAudit:
    """Audit scores of runs without and with the canary (higher score: canary more likely).

    Parameters
    ----------
    without, with_canary : numpy.ndarray
        One score per run (1-D), e.g. the released vector projected on the canary's direction.
    delta : float
        The delta of the claim, in (0, 1).
    claimed_epsilon : float
        The epsilon the accountant claims for one run.
    confidence : float
        Joint confidence of the two Clopper–Pearson bounds (each at ``1 − (1 − confidence) / 2``,
        a union bound).

    Notes
    -----
    The first half of each array picks the threshold (maximising the bound computed on that half);
    the second half, untouched by the choice, gives the reported rates and bound. The verdict is
    FAIL when the lower bound exceeds the claim, INCONCLUSIVE when the claim is above what these
    many runs can ever refute, else PASS. PASS is "no evidence of a violation", never a proof.
    """
    delta = check_delta(delta)
    if not 0.5 <= confidence < 1.0:
        raise PrivacyError(f"`confidence` must be in [0.5, 1), got {confidence!r}.")
    without = np.asarray(without, dtype=float).ravel()
    with_canary = np.asarray(with_canary, dtype=float).ravel()
    if min(len(without), len(with_canary)) < 20:
        raise PrivacyError(f"an audit needs >= 20 runs per side, got {len(without)} and {len(with_canary)}.")
    if not (np.all(np.isfinite(without)) and np.all(np.isfinite(with_canary))):
        raise PrivacyError("audit scores must be finite (the mechanism returned NaN or inf).")
    alpha = (1.0 - confidence) / 2.0
    h0, h1 = len(without) // 2, len(with_canary) // 2
    sel0, ev0 = np.sort(without[:h0]), np.sort(without[h0:])
    sel1, ev1 = np.sort(with_canary[:h1]), np.sort(with_canary[h1:])

    # Pick the threshold on the selection half: guess "canary" when score > t.
    pooled = np.concatenate([sel0, sel1])
    candidates = np.unique(np.quantile(pooled, np.linspace(0.0, 1.0, _CANDIDATES)))
    fp = len(sel0) - np.searchsorted(sel0, candidates, side="right")
    fn = np.searchsorted(sel1, candidates, side="right")
    sel_bound = epsilon_lower_bound(
        clopper_pearson_upper(fp, len(sel0), alpha=alpha), clopper_pearson_upper(fn, len(sel1), alpha=alpha), delta=delta
    )
    threshold = float(candidates[int(np.argmax(sel_bound))])

    # Evaluate it on the other half.
    fp_e = int(len(ev0) - np.searchsorted(ev0, threshold, side="right"))
    fn_e = int(np.searchsorted(ev1, threshold, side="right"))
    fpr_u = clopper_pearson_upper(fp_e, len(ev0), alpha=alpha)
    fnr_u = clopper_pearson_upper(fn_e, len(ev1), alpha=alpha)
    lower = float(epsilon_lower_bound(fpr_u, fnr_u, delta=delta))
    best = float(
        epsilon_lower_bound(clopper_pearson_upper(0, len(ev0), alpha=alpha), clopper_pearson_upper(0, len(ev1), alpha=alpha), delta=delta)
    )
    mu, estimate = _gaussian_fit(without, with_canary, delta=delta)
    if lower > claimed_epsilon:
        verdict: Verdict = "FAIL"
    elif claimed_epsilon >= best:
        verdict = "INCONCLUSIVE"
    else:
        verdict = "PASS"
    return CanaryAudit(
        claimed_epsilon=float(claimed_epsilon),
        estimate=estimate,
        lower_bound=lower,
        max_lower_bound=best,
        delta=delta,
        confidence=confidence,
        runs=len(without) + len(with_canary),
        mu_estimate=mu,
        threshold=threshold,
        fpr=fp_e / len(ev0),
        fnr=fn_e / len(ev1),
        verdict=verdict,
    )


@dataclass(frozen=True)
class ProbeResult:
    """A canary audit of one mechanism (a code path) against the epsilon claimed for it."""

    mechanism: str
    noise_multiplier: float
    clip_norm: float
    accountant: str
    audit: CanaryAudit

    @property
    def verdict(self) -> Verdict:
        """PASS, FAIL or INCONCLUSIVE (see :func:`audit_scores`)."""
        return self.audit.verdict

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: what was probed, then the audit's figures."""
        return {
            "mechanism": self.mechanism,
            "noise_multiplier": self.noise_multiplier,
            "clip_norm": self.clip_norm,
            "accountant": self.accountant,
            **self.audit.to_dict(),
        }
