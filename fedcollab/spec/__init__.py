"""The collaboration spec: strict pydantic models, TOML loading, JSON Schema export."""

from fedcollab.spec._he import HeSpec
from fedcollab.spec._load import load_spec, parse_spec, spec_sha256
from fedcollab.spec._policy import BudgetSpec, NodePolicy, PolicyWarning, StatisticsPolicy, load_policy, policy_toml
from fedcollab.spec._roster import Roster, RosterEntry, load_roster
from fedcollab.spec._models import (
    ColumnSpec,
    LabelSpec,
    ModelSpec,
    PartnerSpec,
    PreprocessingSpec,
    PrivacySpec,
    SchemaSpec,
    SecAggSpec,
    SourceSpec,
    Spec,
    SplitSpec,
    TrainingSpec,
)

__all__ = [
    "BudgetSpec",
    "ColumnSpec",
    "HeSpec",
    "LabelSpec",
    "ModelSpec",
    "NodePolicy",
    "PartnerSpec",
    "PolicyWarning",
    "PreprocessingSpec",
    "PrivacySpec",
    "Roster",
    "RosterEntry",
    "SchemaSpec",
    "SecAggSpec",
    "SourceSpec",
    "Spec",
    "SplitSpec",
    "StatisticsPolicy",
    "TrainingSpec",
    "load_policy",
    "load_roster",
    "load_spec",
    "parse_spec",
    "policy_toml",
    "spec_sha256",
]
