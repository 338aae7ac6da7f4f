"""``NodePolicy`` v1: the partner's own rules, enforced at its node whatever the coordinator asks.

A TOML file the partner owns. Budgets hold across every run and collaboration: they are checked
against the node's on-disk ledger before every release.
"""

from __future__ import annotations

import json
import re
import tomllib
import warnings
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from fedcollab.core import ConfigError, FrozenModel, validate_config
from fedcollab.spec._models import _integral_float_to_int

POLICY_SCHEMA_VERSION = 1
PosInt = Annotated[int, Field(gt=0), BeforeValidator(_integral_float_to_int)]
Finite = Annotated[float, Field(allow_inf_nan=False)]
#: A custom model target as the spec names it (``package.module:ClassName``; the same form ``ModelSpec`` accepts).
CUSTOM_TARGET = r"[A-Za-z_][\w.]*:[A-Za-z_]\w*"


class PolicyWarning(UserWarning):
    """A policy that is valid but probably not what the partner meant."""


class BudgetSpec(FrozenModel):
    """The most a dataset may ever leak about one unit, as (epsilon, delta)."""

    dataset: str = Field(min_length=1, description="Dataset id (the partner's name for the data, stable across runs).")
    unit: Literal["record", "partner"] = "record"
    epsilon: Finite = Field(gt=0, description="Maximum epsilon over all runs and collaborations.")
    delta: Finite = Field(gt=0, lt=1)
    accountant: Literal["rdp", "pld"] = Field(default="rdp", description="Accountant the node uses to check the budget.")


class StatisticsPolicy(FrozenModel):
    """Rules for federated statistics queries."""

    min_group_size: PosInt = Field(default=10, description="Groups with fewer (noisy) rows are suppressed.")
    allowed_queries: list[Literal["count", "sum", "mean", "variance", "histogram", "quantiles"]] = Field(
        default_factory=lambda: ["count", "sum", "mean", "variance", "histogram", "quantiles"]
    )


class VerticalPolicy(FrozenModel):
    """Rules for vertical collaborations (different columns about the same records; docs/vertical.md)."""

    allowed: bool = Field(default=False, description="Whether this node joins vertical collaborations at all (PSI, SecureBoost).")
    max_psi_runs: PosInt = Field(default=10, description="Most PSI runs this node joins per dataset, over all time (each reveals the intersection).")
    min_intersection: PosInt = Field(default=20, description="Fewest common records a vertical run may train on; below it the node refuses (code 132).")
    min_node_rows: PosInt = Field(default=4, description="As the passive party: fewest records in a tree node it returns bin sums for (a one-record "
                                  "node's sums are that record's bins); honest trees with min_child_weight >= 1 stay above 4.")


class ScoringPolicy(FrozenModel):
    """Encrypted scoring of this node's models by other parties (``fedcollab score apply``).

    One query is one scored row: it reveals one linear equation in the model's d + 1
    parameters, so d + 1 rows recover a d-feature linear model exactly (docs/scoring.md).
    """

    max_rows_per_querier: dict[str, Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)]] = Field(
        default_factory=dict, description="Rows each named querier may have scored, per model, over all time.")
    default_max_rows: Annotated[int, Field(ge=0), BeforeValidator(_integral_float_to_int)] = Field(
        default=0, description="Rows per model for a querier not named above (0 = refuse).")
    flood_std: Finite = Field(default=2.0**-10, gt=0, le=1, description="Flooding noise added to every encrypted score (logits, std).")

    def budget(self, querier: str) -> int:
        """Rows per model ``querier`` may have scored."""
        return self.max_rows_per_querier.get(querier, self.default_max_rows)




class NodePolicy(FrozenModel):
    """A partner's policy (one model for the whole project; later capabilities wire fields in)."""

    schema_version: Literal[1] = POLICY_SCHEMA_VERSION
    partner: str = Field(min_length=1, description="The partner this policy belongs to.")
    budgets: list[BudgetSpec] = Field(default_factory=list, description="A dataset and unit without a budget gets no private release at all.")
    allow_non_private_training: bool = Field(default=False, description="Allow model updates or statistics about training rows without noise (epsilon infinite).")
    allow_non_private_test_metrics: bool = Field(default=True, description="Allow test-split metrics (counts, score histograms) without noise.")
    allowed_aggregation: list[Literal["plain", "secagg", "he"]] = Field(default_factory=lambda: ["plain", "secagg", "he"])
    allowed_privacy_modes: list[Literal["none", "record", "distributed", "central"]] = Field(
        default_factory=lambda: ["none", "record", "distributed", "central"],
        description="Privacy modes (the spec's privacy.mode) this partner takes part in; e.g. leave out 'central' to refuse noise the coordinator alone adds.",
    )
    allowed_features: list[str] | None = Field(default=None, description="Columns a collaboration may use as features; null = any declared column.")
    min_partners_per_round: PosInt = Field(default=2, description="Fewest partners a round may aggregate (where it can be checked).")
    max_rounds: PosInt = Field(default=500, description="Most rounds a single run may ask for.")
    allowed_model_kinds: list[Literal["logistic_regression", "mlp", "custom", "gbdt"]] = Field(default_factory=lambda: ["logistic_regression", "mlp"])
    # --- custom models: only those the partner installed and names (checked before any import) ---
    allowed_custom_models: list[str] = Field(
        default_factory=list,
        description="Custom model targets ('package.module:ClassName') this node may build; any other target is refused before it is imported. "
                    "A custom model also needs 'custom' in allowed_model_kinds.",
    )
    statistics: StatisticsPolicy = Field(default_factory=StatisticsPolicy)
    scoring: ScoringPolicy = Field(default_factory=ScoringPolicy)
    vertical: VerticalPolicy = Field(default_factory=VerticalPolicy)
    # --- test-split releases (issue 13, attack 2): the node bounds what evaluation reveals ---------
    test_metrics: Literal["off", "public", "dp"] | None = Field(
        default=None,
        description="Test-split metrics: 'off' (never released), 'public' (exact, not charged), 'dp' (Gaussian noise, charged). "
                    "Default: 'off' when the policy has a budget, else 'public'.")
    min_test_rows: PosInt = Field(default=20, description="Fewest test rows the node evaluates on; below it evaluation is refused (code 152).")
    max_histogram_bins: PosInt = Field(default=20, le=2000, description="Most bins of the released score histograms (resolution of the AUC).")
    test_metrics_epsilon: Finite = Field(default=0.5, gt=0, description="Under test_metrics = 'dp': epsilon all of one run's evaluations may cost together (record level).")

    @field_validator("allowed_custom_models")
    @classmethod
    def _custom_targets(cls, v: list[str]) -> list[str]:
        bad = [t for t in v if not isinstance(t, str) or not re.fullmatch(CUSTOM_TARGET, t)]
        if bad:
            raise ValueError(f"`allowed_custom_models` must hold 'package.module:ClassName' strings, got {bad[0]!r}")
        return v

    def allows_custom_model(self, target: str | None) -> bool:
        """Whether ``target`` is one of the custom models this node may build (compared as text, nothing imported)."""
        return target is not None and target in self.allowed_custom_models

    @model_validator(mode="after")
    def _unique_budgets(self) -> NodePolicy:
        keys = [(b.dataset, b.unit) for b in self.budgets]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"more than one budget for {dupes}")
        return self

    @model_validator(mode="after")
    def _test_metrics_consistent(self) -> NodePolicy:
        if self.test_metrics == "public" and not self.allow_non_private_test_metrics:
            raise ValueError("`test_metrics` must not be 'public' when `allow_non_private_test_metrics` is false, got 'public'")
        return self

    @property
    def resolved_test_metrics(self) -> Literal["off", "public", "dp"]:
        """What the node releases about its test split (see ``test_metrics``)."""
        if self.test_metrics is not None:
            return self.test_metrics
        if not self.allow_non_private_test_metrics or self.budgets:
            return "off"
        return "public"

    def budget(self, dataset: str, unit: str) -> BudgetSpec | None:
        """The budget of ``(dataset, unit)``, if any."""
        return next((b for b in self.budgets if b.dataset == dataset and b.unit == unit), None)

    def warn_delta(self, dataset: str, n: int) -> None:
        """Warn when delta > 1 / (10 n): a mechanism could then leak a whole record outright."""
        for b in self.budgets:
            if b.dataset == dataset and n > 0 and b.delta > 1.0 / (10 * n):
                warnings.warn(
                    f"budget of {dataset!r}: delta = {b.delta:g} > 1/(10 n) = {1.0 / (10 * n):.3g} for n = {n} rows",
                    PolicyWarning,
                    stacklevel=2,
                )


def load_policy(path: str | Path) -> NodePolicy:
    """Read and validate a policy TOML file."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read policy {p}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p} is not valid TOML: {exc}") from None
    return validate_config(NodePolicy, data, what=f"{p} is not a valid node policy")


def policy_toml(policy: NodePolicy) -> str:
    """The policy as commented TOML (for ``fedcollab node init``)."""
    lines = [
        "# fedcollab node policy (NodePolicy v1). The node enforces it whatever the coordinator asks.",
        "# Budgets hold across every run and collaboration; the node's ledger.jsonl is the record.",
        f"schema_version = {policy.schema_version}",
        f'partner = "{policy.partner}"',
        f"allow_non_private_training = {str(policy.allow_non_private_training).lower()}",
        f"allow_non_private_test_metrics = {str(policy.allow_non_private_test_metrics).lower()}",
        "allowed_aggregation = [" + ", ".join(f'"{a}"' for a in policy.allowed_aggregation) + "]",
        "allowed_privacy_modes = [" + ", ".join(f'"{a}"' for a in policy.allowed_privacy_modes) + "]",
        "# allowed_features = [\"age\", \"sex\"]   # omit to allow every declared column",
    ]
    if policy.allowed_features is not None:
        lines[-1] = "allowed_features = [" + ", ".join(f'"{a}"' for a in policy.allowed_features) + "]"
    lines += [
        f"min_partners_per_round = {policy.min_partners_per_round}",
        f"max_rounds = {policy.max_rounds}",
        "allowed_model_kinds = [" + ", ".join(f'"{a}"' for a in policy.allowed_model_kinds) + "]",
        "# Custom models this node may build (installed here; any other target is refused, never imported).",
        "allowed_custom_models = [" + ", ".join(json.dumps(a) for a in policy.allowed_custom_models) + "]",
        "# Test-split metrics: \"off\", \"public\" (exact, not charged) or \"dp\" (noised, charged); omitted = off with a budget.",
        (f'test_metrics = "{policy.test_metrics}"' if policy.test_metrics is not None else '# test_metrics = "dp"'),
        f"min_test_rows = {policy.min_test_rows}",
        f"max_histogram_bins = {policy.max_histogram_bins}",
        f"test_metrics_epsilon = {policy.test_metrics_epsilon!r}",
        "",
    ]
    for b in policy.budgets:
        lines += ["[[budgets]]", f'dataset = "{b.dataset}"', f'unit = "{b.unit}"', f"epsilon = {b.epsilon!r}", f"delta = {b.delta!r}", f'accountant = "{b.accountant}"', ""]
    lines += [
        "[statistics]",
        f"min_group_size = {policy.statistics.min_group_size}",
        "allowed_queries = [" + ", ".join(f'"{q}"' for q in policy.statistics.allowed_queries) + "]",
        "",
        "# Encrypted scoring of this node's models (fedcollab score apply): rows per querier per model.",
        "# d + 1 rows recover a d-feature linear model exactly; see docs/scoring.md.",
        "[scoring]",
        f"default_max_rows = {policy.scoring.default_max_rows}",
        f"flood_std = {policy.scoring.flood_std!r}",
        "[scoring.max_rows_per_querier]",
        *(f"{json.dumps(q)} = {n}" for q, n in sorted(policy.scoring.max_rows_per_querier.items())),
        "",
        "# Vertical collaborations (different columns about the same records; docs/vertical.md).",
        "[vertical]",
        f"allowed = {str(policy.vertical.allowed).lower()}",
        f"max_psi_runs = {policy.vertical.max_psi_runs}",
        f"min_intersection = {policy.vertical.min_intersection}",
        f"min_node_rows = {policy.vertical.min_node_rows}",
        "",
    ]
    return "\n".join(lines)
