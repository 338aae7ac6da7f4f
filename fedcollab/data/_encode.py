"""Encoding validated rows into a float feature matrix and a binary label."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcollab.spec import SchemaSpec


@dataclass(frozen=True)
class FeatureEncoder:
    """Numbers as is, bools as 0/1, categories one-hot with the first (reference) level dropped."""

    schema: SchemaSpec

    @property
    def feature_names(self) -> list[str]:
        """Names of the encoded features, in order."""
        return self.schema.encoded_features()

    @property
    def n_features(self) -> int:
        """Number of encoded features."""
        return len(self.feature_names)

    def features(self, typed: pd.DataFrame) -> np.ndarray:
        """Encoded features of validated rows (no missing values)."""
        cols: list[np.ndarray] = []
        for f in self.schema.features:
            col = self.schema.column(f)
            if col.type == "category":
                text = typed[f].astype(str).to_numpy()
                for lvl in (col.levels or [])[1:]:
                    cols.append((text == str(lvl)).astype(np.float64))
            else:
                cols.append(typed[f].to_numpy(dtype=np.float64))
        return np.stack(cols, axis=1) if cols else np.zeros((len(typed), 0))

    def labels(self, typed: pd.DataFrame) -> np.ndarray:
        """Binary labels (1.0 positive)."""
        lab = self.schema.label
        s = typed[lab.column]
        if lab.positive_above is not None:
            return (s.to_numpy(dtype=np.float64) > lab.positive_above).astype(np.float64)
        positives = {str(v).lower() if isinstance(v, bool) else str(v) for v in lab.positive_levels or []}
        col = self.schema.column(lab.column)
        if col.type == "bool":
            pos_true = "true" in positives or "1" in positives
            pos_false = "false" in positives or "0" in positives
            v = s.to_numpy(dtype=np.float64)
            return np.where(v == 1.0, float(pos_true), float(pos_false))
        return s.astype(str).isin(positives).to_numpy().astype(np.float64)


def feature_bounds(schema: SchemaSpec) -> np.ndarray:
    """Public [min, max] of every encoded feature, shape (d, 2)."""
    return np.asarray(schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)
