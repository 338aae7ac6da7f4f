"""The collaboration spec: strict pydantic models, TOML loading, JSON Schema export."""

from fedcollab.spec._gbdt import SKETCH_GRID, GbdtSpec, TreeParams, tree_params
from fedcollab.spec._he import HeSpec
from fedcollab.spec._load import load_spec, parse_spec, spec_sha256
from fedcollab.spec._policy import BudgetSpec, NodePolicy, PolicyWarning, ScoringPolicy, StatisticsPolicy, VerticalPolicy, load_policy, policy_toml
from fedcollab.spec._query import Predicate, QuerySpec, StatisticSpec, check_query, load_query, parse_query
from fedcollab.spec._vertical import VerticalSpec
from fedcollab.spec._roster import Roster, RosterEntry, load_roster
from fedcollab.spec._models import (
    ColumnSpec,
    LabelSpec,
    ModelSpec,
    PartnerSpec,
    PartnerPrivacySpec,
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
    "GbdtSpec",
    "HeSpec",
    "LabelSpec",
    "ModelSpec",
    "NodePolicy",
    "PartnerPrivacySpec",
    "PartnerSpec",
    "PolicyWarning",
    "Predicate",
    "PreprocessingSpec",
    "PrivacySpec",
    "QuerySpec",
    "Roster",
    "RosterEntry",
    "SKETCH_GRID",
    "SchemaSpec",
    "ScoringPolicy",
    "SecAggSpec",
    "SourceSpec",
    "Spec",
    "SplitSpec",
    "StatisticSpec",
    "StatisticsPolicy",
    "TrainingSpec",
    "TreeParams",
    "VerticalPolicy",
    "VerticalSpec",
    "check_query",
    "load_policy",
    "load_query",
    "load_roster",
    "load_spec",
    "parse_query",
    "parse_spec",
    "policy_toml",
    "spec_sha256",
    "tree_params",
]
