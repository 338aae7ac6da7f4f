"""The published ``summary.json`` format (JSON Schema in ``schemas/summary.schema.json``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

SUMMARY_SCHEMA_VERSION = 1


class _M(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MetricsEntry(_M):
    """Test metrics of one partner, or pooled over every partner's test split."""

    accuracy: float
    auc: float | None = Field(description="ROC AUC from score histograms; null when a class is absent.")
    loss: float
    n: int


class Metrics(_M):
    """Final federated evaluation."""

    pooled_test: MetricsEntry
    partners: dict[str, MetricsEntry]


class PartnerGuarantee(_M):
    """One partner's spend under a guarantee."""

    epsilon: float | None = Field(description="Recomputed by fedcollab's accountant from the recorded events; null = infinite.")
    target_epsilon: float | None
    noise_multiplier: float | None = Field(description="DP-SGD's noise multiplier; gbdt: the leaf sums' (sigma / sensitivity).")
    clip_norm: float | None
    sample_rate: float | None
    expected_batch: float | None
    steps: int = Field(description="DP-SGD steps; gbdt: Gaussian releases (tree steps) the partner made.")
    n_train: int
    statistics_noise_multiplier: float | None = None
    mechanism: str | None = Field(default=None, description="dpsgd, ddg (distributed discrete Gaussian) or gaussian (central).")
    rounds: int | None = Field(default=None, description="Partner-level: rounds in which the partner's update was released.")
    noise_std_on_sum: float | None = Field(default=None, description="Partner-level: std of the noise on the sum of clipped updates, real units.")
    min_participants: int | None = Field(default=None, description="Distributed: t_min, the fewest partners a round may sum.")
    colluders: int | None = Field(default=None, description="Distributed: partners assumed to collude with the coordinator.")
    wraparound_bound: float | None = Field(default=None, description="Distributed: bound on the probability that a sum wraps around modulo 2^32.")


class Guarantee(_M):
    """A differential-privacy guarantee: unit, observer, accountant, delta, per-partner spend."""

    unit: Literal["record", "partner"]
    observer: Literal["coordinator", "model_recipients"]
    accountant: str
    accountant_version: str
    delta: float
    releases_included: list[str]
    partners: dict[str, PartnerGuarantee]


class NonPrivateRelease(_M):
    """A release made without noise, and about which data."""

    party: str
    kind: str
    about: str
    observer: str
    rounds: list[int]
    declared_public: bool
    note: str


class Privacy(_M):
    """Every guarantee, and every release outside them."""

    mode: Literal["none", "record", "distributed", "central"]
    record_level: bool = Field(default=False, description="Whether record-level DP-SGD ran too (its guarantee is listed beside the partner-level one; epsilons are never added).")
    guarantees: list[Guarantee]
    non_private_releases: list[NonPrivateRelease]


class SpecRef(_M):
    """The spec the run executed."""

    path: str
    sha256: str
    name: str


class EncodedColumn(_M):
    """How one feature column becomes the model's input (categories one-hot, reference level dropped)."""

    column: str
    type: Literal["number", "bool", "category"]
    encoded: list[str] = Field(description="Encoded feature names this column contributes, in the model's input order.")
    levels: list[str | int | float | bool] | None = None
    reference: str | int | float | bool | None = Field(default=None, description="Category: the dropped reference level (all encoded features 0).")
    bounds: list[float] | None = None
    rule: str


class ModelRef(_M):
    """The final model file (its safetensors metadata repeats ``feature_names``, ``encoding`` and the scaling)."""

    path: str
    sha256: str
    format: Literal["safetensors", "npz", "xgboost-json"]
    n_parameters: int
    kind: str | None = Field(default=None, description="logistic_regression, mlp, custom or gbdt (then `model.json`, XGBoost's JSON model format).")
    feature_names: list[str] | None = Field(default=None, description="Encoded feature names, in the model's input order.")
    encoding: list[EncodedColumn] | None = Field(default=None, description="How each feature column is encoded; scaling is `scaling_parameters`, applied after encoding.")


class LedgerRef(_M):
    """The run ledger (verify with ``fedcollab audit verify LEDGER --roster ROSTER``)."""

    path: str
    sha256: str
    entries: int
    roster: str


class RunError(_M):
    """Why a run did not complete (error class and exit code, never exception text or data values)."""

    exit_code: int
    error: str = Field(description="The fedcollab error class, or `KeyboardInterrupt`.")
    node_codes: dict[str, int] = Field(default_factory=dict, description="The node error code each failing partner replied with.")


class Summary(_M):
    """What a run produced; with ``status`` other than ``completed``, what it did before it stopped."""

    schema_version: Literal[1] = SUMMARY_SCHEMA_VERSION
    status: Literal["completed", "failed", "interrupted"] = Field(
        default="completed",
        description="completed; failed or interrupted: no model, metrics or privacy section may be present, the ledger ends with a signed abort.")
    run_id: str
    spec: SpecRef
    versions: dict[str, str]
    aggregation: str
    strategy: str
    rounds: int
    wall_seconds: float
    scaling: str
    scaling_parameters: dict[str, list[float]] | None = Field(default=None, description="Global feature scaling sent to every node: mean and std per encoded feature.")
    metrics: Metrics | None = Field(default=None, description="Final evaluation; null only when the run did not complete.")
    privacy: Privacy | None = Field(default=None, description="Every guarantee and non-private release; after a failure, what was spent before it.")
    model: ModelRef | None = Field(default=None, description="The final model; null only when the run did not complete.")
    ledger: LedgerRef | None = None
    failures: dict[str, list[int]] = Field(default_factory=dict, description="Error codes per partner, if any node refused or failed.")
    error: RunError | None = Field(default=None, description="Why the run did not complete (status failed or interrupted).")
    resumed_after_round: int | None = Field(default=None, description="`run --resume`: the checkpoint round the run continued from.")

    @model_validator(mode="after")
    def _complete(self) -> Summary:
        if self.status == "completed" and (self.metrics is None or self.privacy is None or self.model is None):
            raise ValueError("a completed run's summary needs `metrics`, `privacy` and `model`")
        if self.status != "completed" and self.error is None:
            raise ValueError(f"status {self.status!r} needs `error`")
        return self


# --- vertical runs ---------------------------------------------------------------------------
# A vertical run's summary.json (JSON Schema in ``schemas/vertical-summary.schema.json``): written
# by ``fedcollab run`` on a ``layout = "vertical"`` spec, read back by ``fedcollab predict``.


class VerticalMetrics(_M):
    """The label holder's test metrics on the common records it held back (null: a class is absent)."""

    test_auc: float | None
    test_accuracy: float | None


class VerticalSeconds(_M):
    align: float = Field(ge=0, description="PSI: seconds to align the parties' records.")
    train: float = Field(ge=0)


class VerticalPartyReleases(_M):
    """One party's releases by ``kind->observer``, and the epsilon of its noisy ones per observer (null: infinite)."""

    releases: dict[str, int]
    non_private: int = Field(ge=0)
    declared: int = Field(ge=0, description="Declared releases (the intersection size and membership).")
    epsilon: dict[str, float | None]


class VerticalPrivacy(_M):
    mode: Literal["none", "record"]
    parties: dict[str, VerticalPartyReleases]
    plan: dict[str, float | str | None] | None = Field(description="The record-level DP plan (z, sigma, epsilon, delta, unit, observer, covers); null without DP.")


class ModelPart(_M):
    """One party's part of the model, in its own node folder (never the coordinator's)."""

    path: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class VerticalError(_M):
    exit_code: int
    error: str = Field(description="The fedcollab error class, never exception text or data values.")


class VerticalSummary(_M):
    """``summary.json`` of a vertical run (SecureBoost or vertical logistic regression).

    A failed run writes the fields known before training (``status = "failed"`` and ``error``);
    a completed one adds the intersection, the metrics, the model parts and the privacy section.
    """

    run_id: str = Field(pattern=r"^[A-Za-z0-9-]{1,64}$")
    layout: Literal["vertical"]
    spec: SpecRef
    versions: dict[str, str]
    label_holder: str
    passive_party: str = Field(description="The first passive party (all of them: passive_parties).")
    passive_parties: list[str] = Field(min_length=1)
    psi_reveal: str
    status: Literal["completed", "failed", "interrupted"]
    wall_seconds: float = Field(ge=0)
    ledger: LedgerRef
    error: VerticalError | None = None
    intersection: int | None = Field(default=None, ge=0)
    n_train: int | None = Field(default=None, ge=0)
    n_test: int | None = Field(default=None, ge=0)
    metrics: VerticalMetrics | None = None
    model: Literal["secureboost", "vertical-logistic-regression"] | None = None
    trees: int | None = Field(default=None, ge=0)
    passive_splits: int | None = Field(default=None, ge=0)
    iterations: int | None = Field(default=None, ge=0)
    seconds: VerticalSeconds | None = None
    wire_bytes: int | None = Field(default=None, ge=0)
    privacy: VerticalPrivacy | None = None
    model_parts: dict[str, ModelPart] | None = None
    transport: str | None = None
    resumed_after: int | None = Field(default=None, ge=1, description="`run --resume`: the trees (SecureBoost) or iterations (LR) the "
                                      "interrupted run had finished; this run continued from its parties' checkpoints.")

    @model_validator(mode="after")
    def _complete(self) -> VerticalSummary:
        if self.status != "completed":
            if self.error is None:
                raise ValueError(f"status {self.status!r} needs `error` (exit_code, error)")
            return self
        missing = [f for f in ("intersection", "n_train", "n_test", "metrics", "model", "seconds", "privacy", "model_parts") if getattr(self, f) is None]
        if missing:
            raise ValueError(f"status 'completed' needs {', '.join(missing)}")
        if self.label_holder in self.passive_parties:
            raise ValueError(f"label_holder {self.label_holder!r} is also listed in passive_parties")
        want = {self.label_holder, *self.passive_parties}
        got = set(self.model_parts or {})
        if self.model == "secureboost" and got != want:
            raise ValueError(f"model_parts: expected one part for each of {sorted(want)}, got {sorted(got)}")
        return self
