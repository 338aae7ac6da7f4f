"""A vertical party's file must hold exactly the id and its own columns, with unique ids."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fedcollab.core import DataValidationError
from fedcollab.data import embedded_path, load_vertical_party, prepare_vertical_frame
from fedcollab.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "specs" / "heart-disease-vertical.toml")


def _lab() -> pd.DataFrame:
    return pd.read_csv(embedded_path("heart_vertical_lab.csv"), dtype=str, keep_default_na=False).replace("", None)


def test_each_party_reads_only_its_columns_and_the_label_stays_at_the_label_holder() -> None:
    clinic, lab = load_vertical_party(SPEC, "clinic"), load_vertical_party(SPEC, "lab")
    assert clinic.y is not None and lab.y is None
    assert clinic.feature_names == ("age", "sex=Male", "trestbps", "chol")
    assert lab.x.shape == (len(lab.ids), len(lab.feature_names))
    both = set(clinic.ids) & set(lab.ids)
    assert 0.6 * len(clinic.ids) < len(both) < 0.95 * len(clinic.ids)  # ids only partly overlap: alignment matters


def test_a_column_of_another_party_is_refused() -> None:
    df = _lab()
    df["age"] = "50"
    with pytest.raises(DataValidationError) as exc:
        prepare_vertical_frame(df, SPEC, "lab")
    assert "columns not held by partner 'lab' in the spec: ['age']" in str(exc.value.problems)


def test_duplicate_and_missing_ids_are_refused() -> None:
    df = _lab()
    df.loc[1, "id"] = df.loc[0, "id"]
    df.loc[2, "id"] = None
    with pytest.raises(DataValidationError) as exc:
        prepare_vertical_frame(df, SPEC, "lab")
    text = " ".join(exc.value.problems)
    assert "1 id(s) appear more than once" in text and "1 row(s) without an id" in text
