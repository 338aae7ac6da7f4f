"""Immutable privacy events.

A :class:`Mechanism` is what was done, in dp-accounting terms; a :class:`Release` is one
release of a party, with its unit, observer and who added the noise.

Mapping to dp-accounting (``dp_accounting.dp_event``):

* ``GaussianMechanism(z, k)``  -> ``SelfComposedDpEvent(GaussianDpEvent(z), k)``
* ``PoissonSubsampledGaussian(z, q, T)`` ->
  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), T)`` (DP-SGD, Abadi et al. 2016)
* ``LaplaceMechanism(b, s, k)`` -> ``SelfComposedDpEvent(LaplaceDpEvent(b / s), k)``
* ``ZCDPMechanism(rho, k)``   -> ``SelfComposedDpEvent(ZCDpEvent(rho), k)`` (RDP only; Bun & Steinke 2016)
* ``NonPrivate()``             -> ``NonPrivateDpEvent()`` (epsilon = infinity)

The same events, as JSON, are described by :func:`event_json_schema` (published as
``schemas/event.schema.json`` and shared with the ledger).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from fedcollab.core import PrivacyError

Unit = Literal["record", "partner"]
Observer = Literal["coordinator", "model_recipients", "label_holder", "passive_party"]


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class GaussianMechanism(_Event):
    """``releases`` Gaussian releases with noise std = ``noise_multiplier`` x L2 sensitivity."""

    mechanism: Literal["gaussian"] = "gaussian"
    noise_multiplier: float = Field(gt=0)
    releases: int = Field(default=1, ge=1)


class PoissonSubsampledGaussian(_Event):
    """DP-SGD: ``steps`` steps, each on a Poisson sample of rate ``sample_rate``."""

    mechanism: Literal["poisson_subsampled_gaussian"] = "poisson_subsampled_gaussian"
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=0)


class LaplaceMechanism(_Event):
    """``releases`` Laplace releases of scale ``scale_b`` on a query of L1 sensitivity ``sensitivity_l1``."""

    mechanism: Literal["laplace"] = "laplace"
    scale_b: float = Field(gt=0)
    sensitivity_l1: float = Field(gt=0)
    releases: int = Field(default=1, ge=1)


class ZCDPMechanism(_Event):
    """``releases`` releases, each ``rho``-zCDP (Bun & Steinke 2016, Definition 1.1).

    For mechanisms accounted in zCDP, such as the distributed discrete Gaussian or Skellam
    noise under secure aggregation. zCDP composes by adding rho (Bun & Steinke 2016, composition lemma).
    """

    mechanism: Literal["zcdp"] = "zcdp"
    rho: float = Field(gt=0, description="zCDP parameter per release (unitless).")
    releases: int = Field(default=1, ge=1)


class NonPrivate(_Event):
    """A release without noise: epsilon is infinite."""

    mechanism: Literal["non_private"] = "non_private"


Mechanism = Annotated[
    GaussianMechanism | PoissonSubsampledGaussian | LaplaceMechanism | ZCDPMechanism | NonPrivate,
    Field(discriminator="mechanism"),
]
_MECHANISM = TypeAdapter(Mechanism)


def mechanism_from_dict(
    data: dict[str, Any], *, prefix: str = "event"
) -> GaussianMechanism | PoissonSubsampledGaussian | LaplaceMechanism | ZCDPMechanism | NonPrivate:
    """Parse a mechanism from JSON-like data, with a clear error (fields named under ``prefix``)."""
    from pydantic import ValidationError

    from fedcollab.core import format_validation_error

    try:
        return _MECHANISM.validate_python(data)
    except ValidationError as exc:
        raise PrivacyError("invalid privacy event:", problems=format_validation_error(exc, prefix=prefix)) from None


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of one privacy event (a :data:`Mechanism`), shared by the ledger and the CLI.

    Published as ``schemas/event.schema.json`` by ``fedcollab spec schema``.
    """
    schema = _MECHANISM.json_schema()
    schema["$id"] = "https://fedcollab.dev/schema/event.schema.json"
    schema["title"] = "fedcollab privacy event"
    schema["description"] = (
        "One privacy event (what was released and with which noise), discriminated by `mechanism`. "
        "Epsilon is never stored: an accountant recomputes it from the events."
    )
    return schema


class Release(_Event):
    """One release a party makes: what, about which data, protected how, against whom.

    ``epsilon`` is not stored here: it is recomputed from the mechanisms by the accountant.
    """

    kind: Literal["dpsgd_training", "statistics", "test_metrics", "row_counts", "model_update", "ddg_update", "central_dp_update", "query", "profile", "gbdt_histogram", "vertical_histogram", "vertical_partition", "vertical_gradient", "vertical_logit", "psi_intersection"]
    about: Literal["train", "test", "train+test"]
    unit: Unit
    observer: Observer
    added_by: str = Field(description="Party that added the noise (or that released without noise).")
    party: str = Field(description="Party whose data the release is about.")
    round: int = Field(ge=0)
    mechanism: Mechanism
    declared_public: bool = Field(default=False, description="A non-private release the collaboration declares public (e.g. row counts).")
    details: dict[str, float | int | str | bool] = Field(default_factory=dict)

    @property
    def non_private(self) -> bool:
        """Whether the release carries no noise."""
        return isinstance(self.mechanism, NonPrivate)
