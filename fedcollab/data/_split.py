"""Train/test split of one partner's rows."""

from __future__ import annotations

import numpy as np
import pandas as pd

from fedcollab.core import DataValidationError
from fedcollab.spec import SplitSpec


def split_indices(y: np.ndarray, split: SplitSpec, *, seed: int, column: pd.Series | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Row indices of the train and test split.

    A ratio split follows scikit-learn's ``train_test_split(test_size=f, train_size=1-f,
    random_state=seed, stratify=y)``, as in the FLamby protocol; stratification is skipped where a
    class has fewer than 3 rows.
    """
    n = len(y)
    idx = np.arange(n)
    if split.column is not None:
        if column is None:
            raise DataValidationError(f"split column `{split.column}` is not available")
        is_test = (column.astype(str) == str(split.test_value)).to_numpy()
        return idx[~is_test], idx[is_test]
    from sklearn.model_selection import train_test_split

    f = split.test_fraction
    assert f is not None
    if n < 2:
        raise DataValidationError(f"cannot split {n} row(s) into train and test")
    counts = np.unique(y, return_counts=True)[1]
    stratify = y if split.stratify and len(counts) > 1 and counts.min() >= 3 else None
    seed_ = split.seed if split.seed is not None else seed
    train, test = train_test_split(idx, test_size=f, train_size=1.0 - f, random_state=seed_, stratify=stratify)
    return np.sort(train), np.sort(test)
