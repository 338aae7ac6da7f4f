"""A white-box Dirac-canary audit of fedcollab's own clip-and-noise code (numpy only).

The mechanism under test is the Gaussian mechanism on a sum of clipped contributions, built from
:func:`fedcollab.privacy.mechanisms.clip_l2` and :func:`~fedcollab.privacy.mechanisms.gaussian_noise`.
It runs many times on two neighbouring inputs, a fixed background set without and with one canary
contribution (norm 3 C along a fixed direction, so clipping matters), and the runs are projected on
the canary's direction. :func:`fedcollab.privacy.empirical.audit_scores` turns the two samples into
a Gaussian-fit epsilon estimate and a rigorous lower bound, compared with what the accountant claims.

A mechanism whose noise is missing or too small, or whose clipping is missing, shows a lower bound
above the claim: FAIL. A PASS shows only that this test found no violation (it cannot prove that
the claim is tight or even correct).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import AccountantName, GaussianMechanism, check_positive, compute_epsilon
from fedcollab.privacy.empirical import ProbeResult, audit_scores
from fedcollab.privacy.mechanisms import clip_l2, gaussian_noise

#: A mechanism under test: contributions (n, d) -> ``repetitions`` independent outputs (repetitions, d).
SumMechanism = Callable[..., np.ndarray]


@dataclass(frozen=True)
class ClippedGaussianSum:
    """fedcollab's release path: clip each contribution to ``clip_norm``, sum, add Gaussian noise.

    ``noise_multiplier`` is the noise actually applied (std = ``noise_multiplier * clip_norm``);
    0 removes the noise, which is only useful to show what a FAIL looks like.
    """

    clip_norm: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        check_positive(self.clip_norm, "clip_norm")
        check_positive(self.noise_multiplier, "noise_multiplier", allow_zero=True)

    def __call__(self, contributions: np.ndarray, *, repetitions: int, generator: np.random.Generator) -> np.ndarray:
        """``repetitions`` independent releases of the noisy sum, shape ``(repetitions, d)``."""
        total = np.sum([clip_l2(x, self.clip_norm) for x in contributions], axis=0)
        if self.noise_multiplier == 0.0:
            return np.broadcast_to(total, (repetitions, total.shape[0])).copy()
        # One call draws every repetition's noise: the same distribution as `repetitions` calls.
        return total[None, :] + gaussian_noise((repetitions, total.shape[0]), std=self.noise_multiplier * self.clip_norm, generator=generator)


def probe_gaussian(
    *,
    noise_multiplier: float,
    generator: np.random.Generator,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    samples: int = 100_000,
    mechanism: SumMechanism | None = None,
    confidence: float = 0.95,
    accountant: AccountantName = "exact",
    dimension: int = 8,
    background: int = 4,
) -> ProbeResult:
    """Audit the Gaussian mechanism on a sum of clipped vectors against its claimed epsilon.

    Parameters
    ----------
    noise_multiplier : float
        The claimed noise multiplier (σ / C, unitless): the claim is one Gaussian release of it.
    generator : numpy.random.Generator
        Randomness for the background data and the mechanism's noise (seed it in tests).
    clip_norm : float
        C, the L2 clip norm (the sensitivity of the sum under add/remove one contribution).
    delta : float
        δ of the claim.
    samples : int
        Runs per neighbouring input (10^5 gives a lower bound near 2.6 for ε = 4.38).
    mechanism : callable, optional
        The code under test, ``mechanism(contributions, repetitions=, generator=)``; by default
        ``ClippedGaussianSum(clip_norm, noise_multiplier)``. Pass a broken one to see a FAIL.
    confidence : float
        Confidence of the lower bound.
    accountant : {"exact", "pld", "rdp"}
        Accountant of the claimed epsilon.
    dimension, background : int
        Size of the released vector and number of background contributions.
    """
    z = check_positive(noise_multiplier, "noise_multiplier")
    c = check_positive(clip_norm, "clip_norm")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 40:
        raise PrivacyError(f"`samples` must be an int >= 40, got {samples!r}.")
    if not isinstance(generator, np.random.Generator):
        raise PrivacyError("`generator` must be a numpy Generator (randomness is passed in, never global).")
    mech = mechanism if mechanism is not None else ClippedGaussianSum(clip_norm=c, noise_multiplier=z)
    claimed = compute_epsilon([GaussianMechanism(noise_multiplier=z)], delta=delta, accountant=accountant).epsilon

    # Background contributions of norm around 2C (most get clipped), and a canary of norm 3C
    # along the first axis: after clipping it moves the sum by exactly C along that axis.
    rows = generator.normal(size=(background, dimension)) * (2.0 * c / np.sqrt(dimension))
    direction = np.zeros(dimension)
    direction[0] = 1.0
    canary = 3.0 * c * direction
    without = np.asarray(mech(rows, repetitions=samples, generator=generator)) @ direction
    with_canary = np.asarray(mech(np.vstack([rows, canary]), repetitions=samples, generator=generator)) @ direction
    audit = audit_scores(without, with_canary, delta=delta, claimed_epsilon=claimed, confidence=confidence)
    label = "fedcollab clip_l2 + gaussian_noise" if isinstance(mech, ClippedGaussianSum) else getattr(mech, "__name__", type(mech).__name__)
    return ProbeResult(mechanism=label, noise_multiplier=z, clip_norm=c, accountant=accountant, audit=audit)
