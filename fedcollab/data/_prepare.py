"""From a partner's source to train and test arrays, at the node."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcollab.core import DataValidationError
from fedcollab.data._encode import FeatureEncoder
from fedcollab.data._source import read_source
from fedcollab.data._split import split_indices
from fedcollab.data._validate import validate_frame
from fedcollab.spec import PartnerSpec, SourceSpec, Spec


@dataclass(frozen=True)
class PartnerData:
    """One partner's encoded, unscaled rows. Never leaves the node."""

    partner: str
    feature_names: list[str]
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    rows_read: int
    rows_dropped_missing: int

    @property
    def n_train(self) -> int:
        """Number of training rows."""
        return len(self.y_train)

    @property
    def n_test(self) -> int:
        """Number of test rows."""
        return len(self.y_test)


def prepare_frame(df: pd.DataFrame, spec: Spec, partner: PartnerSpec, *, source: str = "data") -> PartnerData:
    """Validate, drop rows with missing model inputs (if allowed), encode and split ``df``."""
    schema = spec.data_schema
    typed = validate_frame(df, schema, source=source)
    used = [*schema.features, schema.label.column]
    missing = typed[used].isna().any(axis=1)
    if missing.any() and schema.missing == "error":
        raise DataValidationError(f"{source}: {int(missing.sum())} row(s) miss a feature or the label (schema.missing = 'error')")
    split_col = None
    if partner.split.column is not None:
        split_col = df.loc[~missing, partner.split.column].reset_index(drop=True)
    kept = typed[~missing].reset_index(drop=True)
    if len(kept) < 2:
        raise DataValidationError(f"{source}: only {len(kept)} usable row(s)")
    enc = FeatureEncoder(schema)
    x = enc.features(kept)
    y = enc.labels(kept)
    train, test = split_indices(y, partner.split, seed=spec.seed, column=split_col)
    if len(train) == 0 or len(test) == 0:
        raise DataValidationError(f"{source}: the split leaves {len(train)} train and {len(test)} test rows")
    return PartnerData(
        partner=partner.name,
        feature_names=enc.feature_names,
        x_train=x[train],
        y_train=y[train],
        x_test=x[test],
        y_test=y[test],
        rows_read=len(df),
        rows_dropped_missing=int(missing.sum()),
    )


def load_partner_data(spec: Spec, partner_name: str, *, source: SourceSpec | None = None, base_dir: str | Path | None = None) -> PartnerData:
    """Load and prepare the data of ``partner_name`` (its spec source unless ``source`` is given)."""
    partner = next((p for p in spec.partners if p.name == partner_name), None)
    if partner is None:
        raise DataValidationError(f"unknown partner {partner_name!r}; the spec names {[p.name for p in spec.partners]}")
    src = source or partner.source
    if src is None:
        raise DataValidationError(f"partner {partner_name!r} has no data source (in deployment the node supplies it)")
    df = read_source(src, base_dir if base_dir is not None else spec.base_dir)
    return prepare_frame(df, spec, partner, source=f"partner {partner_name!r} data")
