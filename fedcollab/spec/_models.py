"""Pydantic models of a collaboration spec (``specs/*.toml``).

Every model is frozen, closed (``extra="forbid"``) and strict; numbers must be finite.
Integral floats (``20.0``) are accepted where an integer is meant.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, model_validator

from fedcollab.core import FrozenModel
from fedcollab.spec._gbdt import GbdtSpec, gbdt_problems
from fedcollab.spec._he import HeSpec
from fedcollab.spec._vertical import VerticalSpec, vertical_problems


def _integral_float_to_int(value: Any) -> Any:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral_float_to_int)]
PosInt = Annotated[int, Field(gt=0), BeforeValidator(_integral_float_to_int)]  # Field first: JSON Schema then says exclusiveMinimum
Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")]
Finite = Annotated[float, Field(allow_inf_nan=False)]
Scalar = str | int | float | bool

SCHEMA_VERSION = 1


class SourceSpec(FrozenModel):
    """Where a partner's rows live (simulation only; in deployment each node supplies its own)."""

    path: str = Field(min_length=1, description="CSV or Parquet file, relative to the spec file, or `embedded://NAME` for data shipped with fedcollab.")
    format: Literal["csv", "parquet"] | None = Field(default=None, description="File format; inferred from the suffix when omitted.")
    where: dict[str, Scalar] = Field(default_factory=dict, description="Keep only rows whose columns equal these values (several partners may share one file in simulation).")


class SplitSpec(FrozenModel):
    """How a partner's rows divide into train and test: a ratio, or a column."""

    test_fraction: Finite | None = Field(default=None, gt=0.0, lt=1.0, description="Share of rows held out for testing.")
    stratify: bool = Field(default=True, description="Stratify the split by label (skipped where a class has fewer than 3 rows).")
    seed: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)] | None = Field(default=None, description="Seed of the split; defaults to the spec's seed.")
    column: str | None = Field(default=None, description="Column whose value `test_value` marks test rows (instead of a ratio).")
    test_value: Scalar = Field(default="test", description="Value of `column` that marks a test row.")

    @model_validator(mode="after")
    def _one_way(self) -> SplitSpec:
        if (self.test_fraction is None) == (self.column is None):
            raise ValueError("give exactly one of `test_fraction` or `column`")
        return self


class PartnerSpec(FrozenModel):
    """One partner (a silo)."""

    name: Name
    dataset: str | None = Field(default=None, min_length=1, description="Dataset id the partner's budgets are kept under; defaults to the partner's name.")
    source: SourceSpec | None = Field(default=None, description="Local data (simulation). Omit in deployment.")
    split: SplitSpec = Field(default_factory=lambda: SplitSpec(test_fraction=0.34))
    columns: list[str] | None = Field(default=None, description="layout = 'vertical': the schema columns this partner holds (its features; the label holder also the label). The id column is implied.")

    @property
    def dataset_id(self) -> str:
        """The dataset id budgets are kept under."""
        return self.dataset or self.name


class ColumnSpec(FrozenModel):
    """One column of the shared data schema."""

    name: str = Field(min_length=1)
    type: Literal["number", "bool", "category"]
    bounds: list[Finite] | None = Field(default=None, min_length=2, max_length=2, description="Public [min, max] of a number column; required when it is a feature. Values outside are an error.")
    levels: list[Scalar] | None = Field(default=None, description="Allowed values of a category column, reference level first.")
    nullable: bool = Field(default=False, description="Whether missing values are allowed.")
    integer: bool = Field(default=False, description="Number column whose values must be integral.")

    @model_validator(mode="after")
    def _consistent(self) -> ColumnSpec:
        if self.type == "category":
            if not self.levels:
                raise ValueError(f"category column `{self.name}` needs non-empty `levels`")
            if len(set(map(str, self.levels))) != len(self.levels):
                raise ValueError(f"`levels` of `{self.name}` must be unique")
        elif self.levels is not None:
            raise ValueError(f"`levels` is only for category columns, `{self.name}` is {self.type}")
        if self.bounds is not None:
            if self.type != "number":
                raise ValueError(f"`bounds` is only for number columns, `{self.name}` is {self.type}")
            if not self.bounds[0] < self.bounds[1]:
                raise ValueError(f"`bounds` of `{self.name}` must be [min, max] with min < max, got {list(self.bounds)}")
        return self


class LabelSpec(FrozenModel):
    """The binary label: positive when the column is above a threshold or in a set of levels."""

    column: str = Field(min_length=1)
    positive_above: Finite | None = Field(default=None, description="Number label: positive when value > this.")
    positive_levels: list[Scalar] | None = Field(default=None, description="Category or bool label: positive when value is one of these.")

    @model_validator(mode="after")
    def _one_rule(self) -> LabelSpec:
        if (self.positive_above is None) == (self.positive_levels is None):
            raise ValueError("give exactly one of `positive_above` or `positive_levels`")
        return self


class SchemaSpec(FrozenModel):
    """The data schema every partner shares."""

    columns: list[ColumnSpec] = Field(min_length=1)
    features: list[str] = Field(min_length=1, description="Columns the model sees; categories are one-hot encoded (reference level dropped), bools as 0/1.")
    label: LabelSpec
    missing: Literal["drop_rows", "error"] = Field(default="drop_rows", description="Rows with a missing feature or label in a nullable column: dropped at the node, or an error.")

    @model_validator(mode="after")
    def _consistent(self) -> SchemaSpec:
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        problems = []
        if dupes:
            problems.append(f"duplicate columns {dupes}")
        by_name = {c.name: c for c in self.columns}
        for f in self.features:
            col = by_name.get(f)
            if col is None:
                problems.append(f"feature `{f}` is not a declared column")
            elif col.type == "number" and col.bounds is None:
                problems.append(f"number feature `{f}` needs public `bounds`")
        if len(set(self.features)) != len(self.features):
            problems.append("`features` lists a column twice")
        lab = by_name.get(self.label.column)
        if lab is None:
            problems.append(f"label column `{self.label.column}` is not a declared column")
        else:
            if self.label.column in self.features:
                problems.append(f"label column `{self.label.column}` is also a feature")
            if lab.type == "number" and self.label.positive_above is None:
                problems.append("a number label needs `positive_above`")
            if lab.type != "number" and self.label.positive_levels is None:
                problems.append(f"a {lab.type} label needs `positive_levels`")
            if lab.type == "category" and self.label.positive_levels is not None:
                unknown = [v for v in self.label.positive_levels if str(v) not in {str(x) for x in lab.levels or []}]
                if unknown:
                    problems.append(f"`positive_levels` {unknown} are not levels of `{lab.name}`")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def encoded_features(self) -> list[str]:
        """Names of the encoded features: numbers and bools as is, categories one-hot without the reference (first) level."""
        names: list[str] = []
        for f in self.features:
            col = self.column(f)
            if col.type == "category":
                names.extend(f"{f}={lvl}" for lvl in (col.levels or [])[1:])
            else:
                names.append(f)
        return names

    def encoded_bounds(self) -> list[tuple[float, float]]:
        """Public [min, max] of every encoded feature: schema bounds, [0, 1] for 0/1 features."""
        rows: list[tuple[float, float]] = []
        for f in self.features:
            col = self.column(f)
            if col.type == "number":
                assert col.bounds is not None  # enforced by the validator
                rows.append((float(col.bounds[0]), float(col.bounds[1])))
            elif col.type == "bool":
                rows.append((0.0, 1.0))
            else:
                rows.extend((0.0, 1.0) for _ in (col.levels or [])[1:])
        return rows

    def column(self, name: str) -> ColumnSpec:
        """The column called ``name``."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)


class ModelSpec(FrozenModel):
    """The model every partner trains."""

    kind: Literal["logistic_regression", "mlp", "custom", "gbdt"] = "logistic_regression"
    hidden: list[PosInt] = Field(default_factory=list, description="MLP hidden layer widths.")
    target: str | None = Field(default=None, description="Custom model: `package.module:ClassName`, a torch.nn.Module built as Class(n_features, **options) returning one logit per row. The module is looked for in the spec's folder, then on PYTHONPATH and among installed packages; `spec validate` and `run` import it to check.")
    options: dict[str, Scalar] = Field(default_factory=dict, description="Keyword arguments of a custom model.")
    gbdt: GbdtSpec | None = Field(default=None, description="Tree parameters of a `gbdt` model (all optional; see docs/protocols/gbdt.md).")

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.gbdt is not None and self.kind != "gbdt":
            raise ValueError(f"[model.gbdt] is only for kind 'gbdt', kind is `{self.kind}`")
        if self.gbdt is not None and self.gbdt.problems():
            raise ValueError("; ".join(self.gbdt.problems()))
        if self.kind == "mlp" and not self.hidden:
            raise ValueError("an `mlp` model needs `hidden` widths, e.g. [32, 16]")
        if self.kind != "mlp" and self.hidden:
            raise ValueError(f"`hidden` is only for `mlp`, kind is `{self.kind}`")
        if self.kind == "custom":
            if not self.target or not re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", self.target):
                raise ValueError(f"a custom model needs `target` = 'package.module:ClassName', got {self.target!r}")
        elif self.target is not None or self.options:
            raise ValueError("`target` and `options` are only for `custom` models")
        return self


class TrainingSpec(FrozenModel):
    """Federated training."""

    rounds: PosInt = 20
    local_epochs: PosInt = 1
    batch_size: PosInt = 32
    learning_rate: Finite = Field(default=0.05, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: Finite = Field(default=0.0, ge=0, lt=1)
    strategy: Literal["fedavg", "fedprox", "fedadam", "trimmed_mean", "median", "krum", "multikrum"] = Field(
        default="fedavg",
        description="Server aggregation (Flower's own strategies). Robust rules for plain aggregation: trimmed_mean (FedTrimmedAvg), median (FedMedian), krum (Krum), multikrum (MultiKrum); see docs/threat-model.md.",
    )
    trim_fraction: Finite = Field(default=0.25, ge=0, lt=0.5, description="trimmed_mean: fraction of the updates cut off at each tail, per coordinate (Flower's beta); at least one update must be cut.")
    byzantine_partners: PosInt = Field(default=1, description="krum, multikrum: f, the partners that may send arbitrary updates; a round needs at least 2f + 3 updates.")
    krum_select: PosInt | None = Field(default=None, description="multikrum: updates selected and averaged (m); default training.min_partners (or all partners) minus byzantine_partners.")
    proximal_mu: Finite = Field(default=0.01, ge=0, description="FedProx proximal term weight.")
    server_learning_rate: Finite = Field(default=0.1, gt=0, description="FedAdam server learning rate (eta).")
    server_beta_1: Finite = Field(default=0.9, ge=0, lt=1)
    server_beta_2: Finite = Field(default=0.99, ge=0, lt=1)
    server_tau: Finite = Field(default=1e-3, gt=0)
    min_partners: PosInt | None = Field(default=None, description="Fewest partners whose updates a round needs; default all.")
    evaluate_every: PosInt = Field(default=1, description="Federated evaluation every this many rounds (and always after the last).")
    stage_timeout: Finite | None = Field(default=None, gt=0, le=86400, description="Deployment: seconds the coordinator waits for the replies to one "
                                         "exchange (a stage of a round); a node silent past it is a dropout for that stage, as a missing reply in "
                                         "simulation. Default: submit's --run-timeout (600 s).")


class PartnerPrivacySpec(FrozenModel):
    """Partner-level DP: one partner's whole contribution (its clipped update) is the unit.

    ``privacy.mode = "distributed"``: every node adds a discrete Gaussian share under secure
    aggregation, so the guarantee holds against the coordinator. ``privacy.mode = "central"``:
    the coordinator adds Gaussian noise to the aggregate, so it holds only against the model's
    recipients (the coordinator sees each clipped update, or their exact sum).
    """

    epsilon: Finite = Field(gt=0, description="Partner-level epsilon over the whole run toward the observer.")
    delta: Finite = Field(gt=0, lt=1, description="Partner-level delta (with few partners, keep it well below 1/n).")
    clip: Finite = Field(default=1.0, gt=0, description="L2 bound C of each partner's model update (difference from the global model) per round.")
    min_participants: PosInt | None = Field(default=None, description="Distributed: fewest partners a round may sum (t_min); default all partners minus secagg.max_dropouts. Nodes refuse below it.")
    colluders: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)] = Field(default=0, description="Distributed: partners that may collude with the coordinator (their noise does not count); shares are sized for t_min - colluders honest partners.")
    rounding_beta: Finite = Field(default=math.exp(-0.5), ge=0, lt=1, description="Distributed: conditional randomised rounding bias bound beta (KLS21); 0 turns conditioning off.")
    wraparound_limit: Finite = Field(default=1e-9, gt=0, lt=1e-3, description="Distributed: largest accepted bound on the probability that the modular sum wraps around.")


class PrivacySpec(FrozenModel):
    """Privacy: record-level DP-SGD at every partner, partner-level DP (distributed or central), or both."""

    mode: Literal["none", "record", "distributed", "central"] = Field(
        default="none",
        description="none; record (DP-SGD at every partner); distributed (partner-level, noise shares under secure aggregation, against the coordinator); central (partner-level, noise added by the coordinator, against model recipients only).",
    )
    record_level: bool = Field(default=False, description="With mode distributed or central: run record-level DP-SGD too (target_epsilon, delta); the summary lists both guarantees, never adding them.")
    target_epsilon: Finite | None = Field(default=None, gt=0, description="Record-level: per-partner epsilon over the whole collaboration, all data-dependent releases included.")
    delta: Finite | None = Field(default=None, gt=0, lt=1, description="Record-level delta.")
    clip_norm: Finite = Field(default=3.0, gt=0, description="Per-example gradient L2 clipping norm C.")
    accountant: Literal["rdp", "pld"] = "rdp"
    preprocessing_epsilon_share: Finite = Field(default=0.0, ge=0, lt=1, description="Share of the target epsilon spent on DP statistics for feature scaling (scaling = 'dp_statistics').")
    partner: PartnerPrivacySpec | None = Field(default=None, description="Partner-level guarantee (mode distributed or central).")

    @property
    def record_dp(self) -> bool:
        """Whether record-level DP-SGD runs at every partner."""
        return self.mode == "record" or (self.mode in ("distributed", "central") and self.record_level)

    @property
    def partner_dp(self) -> bool:
        """Whether a partner-level guarantee is in force."""
        return self.mode in ("distributed", "central")

    @model_validator(mode="after")
    def _consistent(self) -> PrivacySpec:
        if self.record_level and self.mode not in ("distributed", "central"):
            raise ValueError(f"`record_level` = true needs mode 'distributed' or 'central' (mode 'record' is record-level already), got mode {self.mode!r}")
        if self.record_dp:
            missing = [n for n in ("target_epsilon", "delta") if getattr(self, n) is None]
            if missing:
                raise ValueError(f"record-level DP needs {missing}")
        elif self.target_epsilon is not None or self.delta is not None:
            raise ValueError("`target_epsilon` and `delta` are record-level: they need mode = 'record', or record_level = true")
        if self.partner_dp and self.partner is None:
            raise ValueError(f"mode {self.mode!r} needs a [privacy.partner] table (epsilon, delta, clip)")
        if not self.partner_dp and self.partner is not None:
            raise ValueError(f"[privacy.partner] needs mode 'distributed' or 'central', got mode {self.mode!r}")
        return self


class SecAggSpec(FrozenModel):
    """Secure aggregation (SecAgg+, Bell et al. 2020): the coordinator learns only the sum."""

    neighbours: PosInt = Field(default=1000, description="k: neighbours per node in the k-regular (circulant) graph; at least n - 1 means every pair (the complete graph).")
    threshold: PosInt | None = Field(default=None, description="t: shares needed to unmask a node; default degree - max_dropouts. Must satisfy degree/2 < t <= degree - max_dropouts.")
    max_dropouts: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)] = Field(default=1, description="Nodes that may drop out of a round (at any stage) without aborting it.")
    clip: Finite = Field(default=10.0, gt=0, description="Bound on every coordinate of a model update (difference from the global model) before fixed-point encoding.")
    scale: Finite = Field(default=float(2**20), gt=0, description="Fixed-point scale: a value x travels as round(x * scale) modulo 2^32.")
    clip_l2: Finite | None = Field(default=None, gt=0, description="Norm bounding: each node clips its model update (difference from the global model) to this L2 norm before encoding, from its own spec, so one partner adds at most its relative weight times this bound to the sum. Unset: only the per-coordinate `clip`. With partner-level DP, `privacy.partner.clip` is the bound instead.")

    def degree(self, n_partners: int) -> int:
        """Neighbours each node actually has with ``n_partners`` partners."""
        return min(self.neighbours, n_partners - 1)

    def resolved_threshold(self, n_partners: int) -> int:
        """t, defaulting to degree - max_dropouts."""
        return self.threshold if self.threshold is not None else self.degree(n_partners) - self.max_dropouts

    def problems(self, n_partners: int) -> list[str]:
        """What keeps secure aggregation from running with ``n_partners``, each naming the field to change.

        Checked by the spec (aggregation = 'secagg') and by ``fedcollab query``, which always sums
        under secure aggregation: before anything starts, not at the first round.
        """
        if n_partners < 3:
            return [f"partners: secure aggregation needs at least 3 partners, got {n_partners}"]
        deg = self.degree(n_partners)
        t = self.resolved_threshold(n_partners)
        if deg / 2 < t <= deg - self.max_dropouts:
            return []
        if self.threshold is None:
            fit = max(0, math.ceil(deg / 2) - 1)
            return [f"secagg.max_dropouts: expected at most {fit} with {n_partners} partners (degree {deg}, and the threshold "
                    f"degree - max_dropouts must exceed degree/2 = {deg / 2:g}), got {self.max_dropouts}"]
        if 2 * t <= deg:
            return [f"secagg.threshold: expected more than degree/2 = {deg / 2:g} with {n_partners} partners, got {t}"]
        return [f"secagg.threshold: expected at most degree - secagg.max_dropouts = {deg} - {self.max_dropouts} = {deg - self.max_dropouts} "
                f"with {n_partners} partners, got {t} (lower secagg.threshold or secagg.max_dropouts)"]


class PreprocessingSpec(FrozenModel):
    """Global feature scaling (never per silo)."""

    scaling: Literal["auto", "federated_statistics", "dp_statistics", "public_bounds", "none"] = Field(
        default="auto",
        description="auto: exact federated statistics without DP, public bounds with DP (measured better, see docs).",
    )


class Spec(FrozenModel):
    """A collaboration spec."""

    schema_version: Literal[1] = SCHEMA_VERSION
    name: Name
    seed: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)] = Field(default=0, description="Governs model initialisation, splits and (without DP) batch shuffling; never DP noise, which comes from OS entropy.")
    aggregation: Literal["plain", "secagg", "he"] = Field(default="plain", description="How updates are combined: `plain` (the coordinator sees each update), `secagg` (only their sum) or `he` (only ciphertexts: partners hold the key, see docs/he.md).")
    secagg: SecAggSpec = Field(default_factory=SecAggSpec, description="Parameters of secure aggregation (aggregation = 'secagg').")
    he: HeSpec = Field(default_factory=HeSpec, description="Parameters of homomorphic encryption (aggregation = 'he').")
    layout: Literal["horizontal", "vertical"] = Field(default="horizontal", description="`horizontal`: every partner holds every column for its own rows; `vertical`: partners hold different columns about the same people (see [vertical] and docs/vertical.md).")
    vertical: VerticalSpec | None = Field(default=None, description="layout = 'vertical': the join key, the label holder and PSI options.")
    partners: list[PartnerSpec] = Field(min_length=1)
    data_schema: SchemaSpec = Field(alias="schema")
    model: ModelSpec = Field(default_factory=ModelSpec)
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    privacy: PrivacySpec = Field(default_factory=PrivacySpec)
    preprocessing: PreprocessingSpec = Field(default_factory=PreprocessingSpec)

    _base_dir: str = PrivateAttr(default=".")

    @model_validator(mode="after")
    def _consistent(self) -> Spec:
        problems = []
        names = [p.name for p in self.partners]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"partners: duplicate partner names {dupes}")
        cols = {c.name: c for c in self.data_schema.columns}
        for i, p in enumerate(self.partners):
            if p.source is not None:
                for key, value in p.source.where.items():
                    col = cols.get(key)
                    if col is None:
                        problems.append(f"partners[{i}].source.where: `{key}` is not a declared column")
                    elif col.type == "category" and str(value) not in {str(x) for x in col.levels or []}:
                        problems.append(f"partners[{i}].source.where: {value!r} is not a level of `{key}`")
            if p.split.column is not None and p.split.column not in cols:
                problems.append(f"partners[{i}].split.column `{p.split.column}` is not a declared column")
        scaling = self.preprocessing.scaling
        share = self.privacy.preprocessing_epsilon_share
        if scaling == "dp_statistics":
            if not self.privacy.record_dp:
                problems.append("preprocessing.scaling = 'dp_statistics' is calibrated with record-level DP-SGD: it needs privacy.mode = 'record', or record_level = true")
            elif share <= 0:
                problems.append("preprocessing.scaling = 'dp_statistics' needs privacy.preprocessing_epsilon_share in (0, 1)")
        elif share > 0:
            problems.append(f"privacy.preprocessing_epsilon_share = {share} is only used with preprocessing.scaling = 'dp_statistics'")
        if self.aggregation == "secagg":
            problems.extend(self.secagg.problems(len(self.partners)))
            if self.training.strategy == "fedadam":
                problems.append("training.strategy: secagg supports strategy 'fedavg' or 'fedprox' (a server optimiser needs the plain aggregate)")
        pp = self.privacy.partner
        if self.privacy.mode == "distributed":
            n = len(self.partners)
            if self.aggregation != "secagg":
                problems.append(f"privacy.mode = 'distributed' needs aggregation = 'secagg' (the noise shares only protect when summed unseen), got {self.aggregation!r}")
            elif self.secagg.degree(n) < n - 1:
                problems.append("privacy.mode = 'distributed' needs the complete secagg graph (secagg.neighbours >= partners - 1) so every node can count the round's participants")
            if pp is not None:
                t_min = self.min_participants
                if pp.min_participants is not None and pp.min_participants > n:
                    problems.append(f"privacy.partner.min_participants = {pp.min_participants} exceeds the {n} partners")
                elif t_min - pp.colluders < 1:
                    problems.append(f"privacy.partner: t_min = {t_min} with {pp.colluders} colluders leaves no honest partner to carry the noise")
        if self.privacy.partner_dp and self.training.strategy == "fedadam":
            problems.append("training.strategy: partner-level DP supports strategy 'fedavg' or 'fedprox' (the noise is calibrated to the mean of clipped updates)")
        if self.aggregation == "he":
            problems.extend(self.he.problems(self))
        problems.extend(gbdt_problems(self))
        problems.extend(vertical_problems(self))
        if self.privacy.mode == "central" and self.aggregation == "he":
            problems.append("privacy.mode = 'central' needs the plaintext aggregate at the coordinator: use aggregation 'plain' or 'secagg', not 'he'")
        mp = self.training.min_partners
        if mp is not None and mp > len(self.partners):
            problems.append(f"training.min_partners = {mp} exceeds the {len(self.partners)} partners")
        problems.extend(_robust_problems(self))
        if scaling == "federated_statistics" and self.privacy.mode != "none":
            problems.append("preprocessing.scaling = 'federated_statistics' releases exact statistics, which DP forbids: use 'public_bounds' or 'dp_statistics'")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def min_participants(self) -> int:
        """t_min of distributed DP: the fewest partners a round may sum (noise shares are sized for it)."""
        pp = self.privacy.partner
        if pp is not None and pp.min_participants is not None:
            return pp.min_participants
        return len(self.partners) - (self.secagg.max_dropouts if self.aggregation == "secagg" else 0)

    @property
    def resolved_scaling(self) -> str:
        """The scaling actually used once ``auto`` is resolved (trees, ``kind = "gbdt"``: always ``none``)."""
        if self.model.kind == "gbdt":
            return "none"
        if self.preprocessing.scaling != "auto":
            return self.preprocessing.scaling
        return "federated_statistics" if self.privacy.mode == "none" else "public_bounds"

    @property
    def base_dir(self) -> str:
        """Directory relative paths in the spec resolve against."""
        return self._base_dir

    def replace(self, **changes: Any) -> Spec:
        """A copy with ``changes`` applied, the whole spec validated again (``model_copy(update=...)`` does not validate).

        Keys are top-level fields (``training``, ``privacy``, ``schema`` ...); a dict merges into the
        current table, recursively (``spec.replace(training={"rounds": 5})`` keeps the other training
        fields), anything else replaces the value. Relative paths still resolve against this spec's folder.

        Raises
        ------
        SpecError
            One line per problem, naming the field (``training.rounds``), what was expected and what was got.
        """
        from pydantic import BaseModel

        from fedcollab.core import SpecError, validate_config

        def plain(value: Any) -> Any:
            return value.model_dump(by_alias=True) if isinstance(value, BaseModel) else value

        def merge(base: Any, update: Any) -> Any:
            update = plain(update)
            if isinstance(base, dict) and isinstance(update, dict):
                out = dict(base)
                for k, v in update.items():
                    out[k] = merge(base[k], v) if k in base else plain(v)
                return out
            return update

        data: dict[str, Any] = self.model_dump(by_alias=True)
        for key, value in changes.items():
            key = "schema" if key == "data_schema" else key
            data[key] = merge(data[key], value) if key in data else plain(value)
        new = validate_config(Spec, data, what="spec.replace(...) gives an invalid collaboration spec", error=SpecError)
        return new.with_base_dir(self.base_dir)

    def with_base_dir(self, base_dir: str) -> Spec:
        """A copy whose relative paths resolve against ``base_dir``."""
        new = self.model_copy()
        new._base_dir = base_dir
        return new


_ROBUST_STRATEGIES = ("trimmed_mean", "median", "krum", "multikrum")


def _robust_problems(spec: Spec) -> list[str]:
    """Cross-field rules of robust aggregation (``training.strategy``) and of ``secagg.clip_l2``."""
    problems = []
    t = spec.training
    strategy = t.strategy
    if strategy in _ROBUST_STRATEGIES:
        if spec.aggregation != "plain":
            problems.append(
                f"training.strategy = {strategy!r} needs aggregation = 'plain' (a robust rule needs every partner's own update), got {spec.aggregation!r}"
                + (" (under secagg, bound each update with secagg.clip_l2 instead)" if spec.aggregation == "secagg" else "")
            )
        if spec.privacy.partner_dp:
            problems.append(f"training.strategy = {strategy!r} cannot be used with partner-level DP (privacy.mode = {spec.privacy.mode!r} averages clipped updates and adds noise): use 'fedavg' or 'fedprox'")
        m = t.min_partners if t.min_partners is not None else len(spec.partners)
        if m < 3:
            problems.append(f"training.strategy = {strategy!r} needs at least 3 updates per round (training.min_partners, default all partners), got {m}")
        elif strategy == "trimmed_mean" and int(t.trim_fraction * m) < 1:
            problems.append(
                f"training.trim_fraction = {t.trim_fraction} cuts no update from a round of {m} updates (floor({t.trim_fraction} * {m}) = 0): need at least 1/{m}"
            )
        elif strategy in ("krum", "multikrum") and m < 2 * t.byzantine_partners + 3:
            problems.append(
                f"training.strategy = {strategy!r} with training.byzantine_partners = {t.byzantine_partners} needs at least 2f + 3 = {2 * t.byzantine_partners + 3} updates per round"
                f" (training.min_partners, default all partners), got {m}"
            )
        elif strategy == "multikrum" and t.krum_select is not None and t.krum_select > m - t.byzantine_partners:
            problems.append(f"training.krum_select = {t.krum_select} exceeds the fewest updates of a round minus byzantine_partners ({m} - {t.byzantine_partners})")
    for name, rules in (("trim_fraction", ("trimmed_mean",)), ("byzantine_partners", ("krum", "multikrum")), ("krum_select", ("multikrum",))):
        # A value equal to the default is what a dumped spec carries back (model_dump round trip): not a choice.
        if name in t.model_fields_set and getattr(t, name) != type(t).model_fields[name].default and strategy not in rules:
            problems.append(f"training.{name} is only for strategy {' or '.join(repr(r) for r in rules)}, got strategy {strategy!r}")
    if spec.secagg.clip_l2 is not None:
        if spec.aggregation != "secagg":
            problems.append(f"secagg.clip_l2 is applied by the nodes under aggregation = 'secagg' only, got {spec.aggregation!r} (with plain aggregation use a robust training.strategy)")
        elif spec.privacy.partner_dp:
            problems.append(f"secagg.clip_l2 cannot be combined with partner-level DP (privacy.mode = {spec.privacy.mode!r}): privacy.partner.clip is the L2 bound of each update")
    return problems
