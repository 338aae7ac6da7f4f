"""Partner-level DP plans: distributed (noise shares under SecAgg+) and central (noise at the coordinator).

Both are calibrated from the spec alone, so every node and the coordinator derive the same
plan and no party can ask another for less noise. The unit is a partner: its whole clipped
update of a round. Every partner's update is clipped to L2 norm ``C`` and the aggregate is the
unweighted mean (sum / number of partners summed, a public count); weighting by row counts would
let a large partner's update exceed the sensitivity.

* Distributed (:func:`plan_distributed`): the distributed discrete Gaussian of KLS21
  (``fedcollab.protocols.ddg``). ``sigma_total`` (real units, on the sum) is calibrated so that
  ``rounds`` releases of ``ddg_zcdp(...)`` stay within the partner-level target in RDP. The
  granularity ``gamma = C / 2^j`` is the finest one whose wrap-around bound modulo 2^32, for
  all partners summed, stays within the spec's limit. Shares are sized for
  ``n_honest = t_min - colluders``.
* Central (:func:`plan_central`): ``rounds`` Gaussian releases on the sum of clipped updates
  (L2 sensitivity ``C``), noise std ``z * C``, calibrated by the accounting core.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import GaussianMechanism, ZCDPMechanism, calibrate_noise_multiplier, compute_epsilon
from fedcollab.protocols.ddg import ddg_norm_bound, ddg_zcdp, wraparound_probability
from fedcollab.spec import Spec

#: The modulus of model-update vectors under secure aggregation.
DDG_BITS = 32
#: Granularities tried, finest first: gamma = C / 2^j.
_GAMMA_EXPONENTS = range(26, 0, -1)
#: Partner-level epsilons are always accounted in RDP (zCDP has no PLD form).
PARTNER_ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class DdgPlan:
    """The distributed discrete Gaussian of a run: identical at every node and at the coordinator."""

    clip: float
    gamma: float
    beta: float
    bits: int
    d: int
    n_parties: int
    t_min: int
    colluders: int
    n_honest: int
    rounds: int
    sigma_total: float
    rho_round: float
    wraparound_bound: float
    epsilon: float
    delta: float

    @property
    def sigma_share(self) -> float:
        """Std of one node's share in real units: ``sigma_total / sqrt(n_honest)``."""
        return self.sigma_total / math.sqrt(self.n_honest)

    def mechanism(self) -> ZCDPMechanism:
        """One round's release, as the accounting core sees it."""
        return ZCDPMechanism(rho=self.rho_round, releases=1)

    def effective_std(self, summed: int) -> float:
        """Std of the noise on the sum when ``summed`` nodes contributed (real units)."""
        return self.sigma_share * math.sqrt(summed)

    def details(self) -> dict[str, float | int | str]:
        """What a ledger release records about the mechanism."""
        d: dict[str, Any] = {k: v for k, v in asdict(self).items() if k not in ("epsilon", "delta")}
        d["sigma_share"] = self.sigma_share
        d["noise_rng"] = "os.urandom (SystemRandomSource)"
        return d


@dataclass(frozen=True)
class CentralPlan:
    """Central DP of a run: Gaussian noise of std ``noise_multiplier * clip`` on the sum of clipped updates."""

    clip: float
    noise_multiplier: float
    rounds: int
    epsilon: float
    delta: float

    def mechanism(self) -> GaussianMechanism:
        """One round's release."""
        return GaussianMechanism(noise_multiplier=self.noise_multiplier, releases=1)


def _ddg_epsilon(rho: float, rounds: int, delta: float) -> float:
    return compute_epsilon([ZCDPMechanism(rho=rho, releases=rounds)], delta=delta, accountant=PARTNER_ACCOUNTANT).epsilon


def _calibrate_sigma(*, clip: float, gamma: float, beta: float, d: int, n_honest: int, rounds: int, epsilon: float, delta: float) -> tuple[float, float]:
    """Smallest sigma_total (bisection on log sigma) whose ``rounds`` releases stay within epsilon: (sigma, rho)."""

    def rho(sigma: float) -> float:
        return ddg_zcdp(clip_l2=clip, gamma=gamma, beta=beta, d=d, sigma_total=sigma, n_honest=n_honest).rho

    lo, hi = math.log(clip * 1e-3), math.log(clip * 1e5)
    if _ddg_epsilon(rho(math.exp(hi)), rounds, delta) > epsilon:
        raise PrivacyError(f"no noise up to {math.exp(hi):g} reaches partner-level epsilon {epsilon:g} at delta {delta:g} over {rounds} rounds")
    for _ in range(80):
        mid = (lo + hi) / 2
        if _ddg_epsilon(rho(math.exp(mid)), rounds, delta) > epsilon:
            lo = mid
        else:
            hi = mid
    sigma = math.exp(hi)
    return sigma, rho(sigma)


@lru_cache(maxsize=64)
def _plan_distributed(clip: float, beta: float, d: int, n_parties: int, t_min: int, colluders: int, rounds: int, epsilon: float,
                      delta: float, limit: float) -> DdgPlan:
    n_honest = t_min - colluders
    if n_honest < 1:
        raise PrivacyError(f"t_min = {t_min} with {colluders} colluders leaves no honest share to carry the noise")
    for j in _GAMMA_EXPONENTS:
        gamma = clip / 2.0**j
        sigma, rho = _calibrate_sigma(clip=clip, gamma=gamma, beta=beta, d=d, n_honest=n_honest, rounds=rounds, epsilon=epsilon, delta=delta)
        bound = ddg_norm_bound(clip_l2=clip, gamma=gamma, beta=beta, d=d)
        sigma_share_int = sigma / gamma / math.sqrt(n_honest)
        p = wraparound_probability(d=d, n=n_parties, max_abs_per_party=math.floor(bound), sigma_share=sigma_share_int, bits=DDG_BITS)
        if p <= limit:
            return DdgPlan(clip=clip, gamma=gamma, beta=beta, bits=DDG_BITS, d=d, n_parties=n_parties, t_min=t_min, colluders=colluders,
                           n_honest=n_honest, rounds=rounds, sigma_total=sigma, rho_round=rho, wraparound_bound=p, epsilon=epsilon, delta=delta)
    raise PrivacyError(f"no granularity keeps the wrap-around bound within {limit:g} modulo 2^{DDG_BITS} for d = {d}")


def plan_distributed(spec: Spec, *, d: int) -> DdgPlan:
    """The run's DDG plan for a model update of ``d`` coordinates (``privacy.mode = "distributed"``)."""
    pp = spec.privacy.partner
    if spec.privacy.mode != "distributed" or pp is None:
        raise PrivacyError(f"a distributed-DP plan needs privacy.mode = 'distributed', got {spec.privacy.mode!r}")
    return _plan_distributed(pp.clip, pp.rounding_beta, int(d), len(spec.partners), spec.min_participants, pp.colluders,
                             spec.training.rounds, pp.epsilon, pp.delta, pp.wraparound_limit)


def plan_central(spec: Spec) -> CentralPlan:
    """The run's central-DP plan (``privacy.mode = "central"``)."""
    pp = spec.privacy.partner
    if spec.privacy.mode != "central" or pp is None:
        raise PrivacyError(f"a central-DP plan needs privacy.mode = 'central', got {spec.privacy.mode!r}")
    z = _central_z(pp.epsilon, pp.delta, spec.training.rounds)
    return CentralPlan(clip=pp.clip, noise_multiplier=z, rounds=spec.training.rounds, epsilon=pp.epsilon, delta=pp.delta)


@lru_cache(maxsize=64)
def _central_z(epsilon: float, delta: float, rounds: int) -> float:
    return calibrate_noise_multiplier(target_epsilon=epsilon, delta=delta, sample_rate=None, steps=rounds, accountant=PARTNER_ACCOUNTANT)
