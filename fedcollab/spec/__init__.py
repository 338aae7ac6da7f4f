"""The collaboration spec: strict pydantic models, TOML loading, JSON Schema export."""

from fedcollab.spec._load import load_spec, parse_spec, spec_sha256
from fedcollab.spec._models import (
    ColumnSpec,
    LabelSpec,
    ModelSpec,
    PartnerSpec,
    PreprocessingSpec,
    PrivacySpec,
    SchemaSpec,
    SourceSpec,
    Spec,
    SplitSpec,
    TrainingSpec,
)

__all__ = [
    "ColumnSpec",
    "LabelSpec",
    "ModelSpec",
    "PartnerSpec",
    "PreprocessingSpec",
    "PrivacySpec",
    "SchemaSpec",
    "SourceSpec",
    "Spec",
    "SplitSpec",
    "TrainingSpec",
    "load_spec",
    "parse_spec",
    "spec_sha256",
]
