"""The accountant adapter over Google's dp-accounting (RDP and PLD).

dp-accounting is loaded lazily; no dp-accounting type leaves this module.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting._events import (
    GaussianMechanism,
    LaplaceMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
)
from fedcollab.privacy.accounting._validate import check_delta

AccountantName = Literal["rdp", "pld"]
_ACCOUNTANTS = ("rdp", "pld")
#: PLD discretisation; 1e-4 matches the reference values in shared/reference/dp-cases.json.
PLD_VALUE_DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class EpsilonResult:
    """An epsilon claim: the number and everything needed to recompute it."""

    epsilon: float
    delta: float
    accountant: str
    accountant_version: str
    optimal_order: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite epsilon as ``None``)."""
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "delta": self.delta,
            "accountant": self.accountant,
            "accountant_version": self.accountant_version,
            "optimal_order": self.optimal_order,
        }


@lru_cache(maxsize=1)
def _dpa() -> Any:
    try:
        import dp_accounting
        import dp_accounting.pld
        import dp_accounting.rdp
    except ImportError as exc:  # pragma: no cover - base dependency
        raise PrivacyError("dp-accounting is not installed: pip install fedcollab") from exc
    return dp_accounting


def accountant_version() -> str:
    """Version of the dp-accounting package backing every claim."""
    from importlib.metadata import version

    return f"dp-accounting {version('dp-accounting')}"


def _to_dp_event(m: Any) -> Any:
    dpa = _dpa()
    if isinstance(m, GaussianMechanism):
        return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(m.noise_multiplier), m.releases)
    if isinstance(m, PoissonSubsampledGaussian):
        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(m.sample_rate, dpa.GaussianDpEvent(m.noise_multiplier)), m.steps)
    if isinstance(m, LaplaceMechanism):
        return dpa.SelfComposedDpEvent(dpa.LaplaceDpEvent(m.scale_b / m.sensitivity_l1), m.releases)
    if isinstance(m, NonPrivate):
        return dpa.NonPrivateDpEvent()
    raise PrivacyError(f"unsupported mechanism {type(m).__name__}")


def _fresh(accountant: str) -> Any:
    dpa = _dpa()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    if accountant == "pld":
        return dpa.pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    raise PrivacyError(f"`accountant` must be one of {list(_ACCOUNTANTS)}, got {accountant!r}.")


def compose_event(mechanisms: Sequence[Any]) -> Any:
    """The dp-accounting event of ``mechanisms`` composed in order."""
    return _dpa().ComposedDpEvent([_to_dp_event(m) for m in mechanisms])


def compute_epsilon(mechanisms: Sequence[Any], *, delta: float, accountant: AccountantName) -> EpsilonResult:
    """Epsilon at ``delta`` of the mechanisms composed in order.

    A non-private mechanism makes epsilon infinite; an empty list gives 0.
    """
    delta = check_delta(delta)
    version = accountant_version()
    if any(isinstance(m, NonPrivate) for m in mechanisms):
        return EpsilonResult(math.inf, delta, accountant, version)
    acc = _fresh(accountant)
    event = compose_event(mechanisms)
    if not acc.supports(event):
        raise PrivacyError(f"the {accountant} accountant does not support these events")
    acc.compose(event)
    if accountant == "rdp":
        eps, order = acc.get_epsilon_and_optimal_order(delta)
        return EpsilonResult(float(eps), delta, accountant, version, float(order))
    return EpsilonResult(float(acc.get_epsilon(delta)), delta, accountant, version)


def merge_mechanisms(mechanisms: Iterable[object]) -> list[object]:
    """Merge consecutive DP-SGD events with equal sigma and q (summing steps): same epsilon, faster."""
    out: list[object] = []
    for m in mechanisms:
        prev = out[-1] if out else None
        if (
            isinstance(m, PoissonSubsampledGaussian)
            and isinstance(prev, PoissonSubsampledGaussian)
            and prev.noise_multiplier == m.noise_multiplier
            and prev.sample_rate == m.sample_rate
        ):
            out[-1] = prev.model_copy(update={"steps": prev.steps + m.steps})
        else:
            out.append(m)
    return out
