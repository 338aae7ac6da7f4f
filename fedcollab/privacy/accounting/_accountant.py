"""The accountant adapter: Google's dp-accounting (RDP and PLD) and fedcollab's closed forms.

dp-accounting is loaded lazily; no dp-accounting type leaves this module.

Which accountant can handle which event, and what its answer is:

================================  ====================  ====================  ======================
Event                             ``rdp``               ``pld``               ``exact``
================================  ====================  ====================  ======================
gaussian                          upper bound           upper bound           exact
poisson_subsampled_gaussian       upper bound           upper bound           unsupported
laplace                           upper bound           upper bound           exact (δ = 0, or k=1)
zcdp                              upper bound           unsupported           upper bound
non_private                       ε = ∞                 ε = ∞                 ε = ∞
================================  ====================  ====================  ======================

``upper_bound`` on :class:`EpsilonResult` says which: RDP's conversion to (ε, δ) is an upper
bound (Canonne, Kamath & Steinke 2020, Prop. 12); dp-accounting's PLD accountant uses its
pessimistic discretisation (``pessimistic_estimate=True``, its default), an upper bound up to
floating point; the closed forms in :mod:`._exact` are exact except where that module says not.

At ``delta = 0`` (only allowed when every event is pure DP, i.e. Laplace): the ``exact``
accountant returns the pure-DP epsilon; RDP and dp-accounting's PLD return infinity, a valid but
useless bound, which is reported as it is (use ``exact`` for pure DP).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal, cast

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting._events import (
    GaussianMechanism,
    LaplaceMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    ZCDPMechanism,
)
from fedcollab.privacy.accounting._validate import check_delta

AccountantName = Literal["rdp", "pld", "exact"]
_ACCOUNTANTS = ("rdp", "pld", "exact")
#: PLD discretisation; 1e-4 matches the reference values in shared/reference/dp-cases.json.
PLD_VALUE_DISCRETIZATION = 1e-4


@dataclass(frozen=True)
class EpsilonResult:
    """An epsilon claim: the number and everything needed to recompute it.

    ``upper_bound`` is True when the accountant's answer is an upper bound on the true epsilon
    (RDP, PLD, zCDP conversions), False when it is the exact value (closed forms, and an infinite
    epsilon for a release without noise).
    """

    epsilon: float
    delta: float
    accountant: str
    accountant_version: str
    optimal_order: float | None = None
    upper_bound: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinite epsilon as ``None``)."""
        return {
            "epsilon": self.epsilon if math.isfinite(self.epsilon) else None,
            "delta": self.delta,
            "accountant": self.accountant,
            "accountant_version": self.accountant_version,
            "optimal_order": self.optimal_order,
            "upper_bound": self.upper_bound,
        }


class _DropExcludedOrderNotices:
    """dp-accounting logs (through absl) every RDP order it excludes as numerically unstable.

    Excluding an order is conservative (the epsilon stays an upper bound), and the notice
    repeats for every computation, so it is dropped; every other absl record passes.
    """

    def filter(self, record: Any) -> bool:  # noqa: D102
        return "failed to converge" not in str(record.msg)


@lru_cache(maxsize=1)
def _dpa() -> Any:
    import logging

    logging.getLogger("absl").addFilter(_DropExcludedOrderNotices())
    try:
        import dp_accounting
        import dp_accounting.pld
        import dp_accounting.rdp
    except ImportError as exc:  # pragma: no cover - base dependency
        raise PrivacyError("dp-accounting is not installed: pip install fedcollab") from exc
    return dp_accounting


def accountant_version(accountant: str = "rdp") -> str:
    """Version of the code backing a claim: dp-accounting for RDP and PLD, fedcollab and scipy for ``exact``."""
    from importlib.metadata import PackageNotFoundError, version

    if accountant == "exact":
        try:
            ours = version("fedcollab")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree
            ours = "unknown"
        return f"fedcollab {ours} closed forms (scipy {version('scipy')})"
    return f"dp-accounting {version('dp-accounting')}"


def _to_dp_event(m: Any) -> Any:
    dpa = _dpa()
    if isinstance(m, GaussianMechanism):
        return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(m.noise_multiplier), m.releases)
    if isinstance(m, PoissonSubsampledGaussian):
        return dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(m.sample_rate, dpa.GaussianDpEvent(m.noise_multiplier)), m.steps)
    if isinstance(m, LaplaceMechanism):
        return dpa.SelfComposedDpEvent(dpa.LaplaceDpEvent(m.scale_b / m.sensitivity_l1), m.releases)
    if isinstance(m, ZCDPMechanism):
        return dpa.SelfComposedDpEvent(dpa.ZCDpEvent(m.rho), m.releases)
    if isinstance(m, NonPrivate):
        return dpa.NonPrivateDpEvent()
    raise PrivacyError(f"unsupported: mechanism {type(m).__name__} is not a fedcollab privacy event")


def _fresh(accountant: str) -> Any:
    dpa = _dpa()
    if accountant == "rdp":
        return dpa.rdp.RdpAccountant()
    if accountant == "pld":
        return dpa.pld.PLDAccountant(value_discretization_interval=PLD_VALUE_DISCRETIZATION)
    if accountant == "exact":
        raise PrivacyError("unsupported: the exact accountant is closed forms, not a dp-accounting backend.")
    raise PrivacyError(f"`accountant` must be one of {list(_ACCOUNTANTS)}, got {accountant!r}.")


def compose_event(mechanisms: Sequence[Any]) -> Any:
    """The dp-accounting event of ``mechanisms`` composed in order."""
    return _dpa().ComposedDpEvent([_to_dp_event(m) for m in mechanisms])


def _check_accountant(accountant: Any) -> AccountantName:
    if accountant not in _ACCOUNTANTS:
        raise PrivacyError(f"`accountant` must be one of {list(_ACCOUNTANTS)}, got {accountant!r}.")
    return cast(AccountantName, accountant)


def _is_pure(m: object) -> bool:
    return isinstance(m, LaplaceMechanism | NonPrivate)


def compute_epsilon(mechanisms: Sequence[Any], *, delta: float, accountant: AccountantName) -> EpsilonResult:
    """Epsilon at ``delta`` of the mechanisms composed in order.

    A non-private mechanism makes epsilon infinite; an empty list gives 0. ``delta = 0`` is
    accepted only when every mechanism is pure DP (Laplace). An event the accountant cannot
    handle raises :class:`PrivacyError` with a message starting "unsupported".
    """
    accountant = _check_accountant(accountant)
    delta = check_delta(delta, allow_zero=True)
    mechanisms = list(mechanisms)
    if delta == 0.0 and not all(_is_pure(m) for m in mechanisms):
        kinds = sorted({str(getattr(m, "mechanism", type(m).__name__)) for m in mechanisms if not _is_pure(m)})
        raise PrivacyError(
            f"`delta` must be in (0, 1) for events that are not pure DP ({', '.join(kinds)}), got {delta!r}; "
            "delta = 0 is only meaningful for laplace events."
        )
    version = accountant_version(accountant)
    if any(isinstance(m, NonPrivate) for m in mechanisms):
        # Infinite is the exact answer for a release without noise, whatever the accountant.
        return EpsilonResult(math.inf, delta, accountant, version, upper_bound=False)
    if accountant == "exact":
        from fedcollab.privacy.accounting._exact import exact_epsilon

        eps, upper = exact_epsilon(mechanisms, delta=delta)
        return EpsilonResult(eps, delta, accountant, version, upper_bound=upper)
    try:
        key = (tuple(mechanisms), delta, accountant)
        hash(key)
    except TypeError:
        return _numerical_epsilon(mechanisms, delta, accountant, version)
    return _cached_epsilon(*key, version)


@lru_cache(maxsize=2048)
def _cached_epsilon(mechanisms: tuple[Any, ...], delta: float, accountant: str, version: str) -> EpsilonResult:
    # Events are frozen values, so a composition seen before (a budget check followed by the
    # record of the same release, an audit recomputing prefixes) is not recomputed.
    return _numerical_epsilon(list(mechanisms), delta, accountant, version)


def _numerical_epsilon(mechanisms: list[Any], delta: float, accountant: str, version: str) -> EpsilonResult:
    acc = _fresh(accountant)
    event = compose_event(mechanisms)
    if not acc.supports(event):
        kinds = sorted({str(getattr(m, "mechanism", type(m).__name__)) for m in mechanisms})
        hint = " (zcdp: use accountant 'rdp' or 'exact')" if any(isinstance(m, ZCDPMechanism) for m in mechanisms) else ""
        raise PrivacyError(f"unsupported: the {accountant} accountant cannot account for these events ({', '.join(kinds)}){hint}.")
    try:
        acc.compose(event)
        if accountant == "rdp":
            eps, order = acc.get_epsilon_and_optimal_order(delta)
            return EpsilonResult(float(eps), delta, accountant, version, float(order))
        return EpsilonResult(float(acc.get_epsilon(delta)), delta, accountant, version)
    except (ValueError, OverflowError) as exc:
        raise PrivacyError(f"the {accountant} accountant failed on these events: {exc}") from None


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
