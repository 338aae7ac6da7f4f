"""Data at the node: schema validation, FLamby splits, the embedded file."""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd
import pytest

from fedcollab.core import DataValidationError
from fedcollab.data import embedded_path, load_partner_data, prepare_frame, read_source, validate_frame

HEART_SHA256 = "e76825d8d9ca0b9491ac1aef9261020c8eb6ab39315b65185a47cf619bc89da0"


@pytest.fixture(scope="module")
def cleveland(heart_spec) -> pd.DataFrame:
    return read_source(heart_spec.partners[0].source, heart_spec.base_dir)


class TestEmbedded:
    def test_sha256(self):
        """The vendored file is byte-identical to the published one."""
        assert hashlib.sha256(embedded_path("heart_disease_uci.csv").read_bytes()).hexdigest() == HEART_SHA256

    def test_licence_and_attribution_ship(self):
        text = (embedded_path("heart_disease_uci.csv").parent / "LICENSE-DATA.md").read_text()
        assert "CC BY 4.0" in text
        for pi in ("Janosi", "Steinbrunn", "Pfisterer", "Detrano"):
            assert pi in text

    def test_unknown_embedded(self):
        with pytest.raises(DataValidationError, match="no embedded data file"):
            embedded_path("../../etc/passwd")


class TestFlambySplit:
    def test_sizes(self, heart_spec):
        """Per-hospital train/test sizes follow FLamby: 199/104, 172/89, 30/16, 85/45."""
        sizes = {p.name: (d.n_train, d.n_test) for p in heart_spec.partners for d in [load_partner_data(heart_spec, p.name)]}
        assert sizes == {"cleveland": (199, 104), "hungary": (172, 89), "switzerland": (30, 16), "va-long-beach": (85, 45)}

    def test_switzerland_train_all_positive(self, heart_spec):
        d = load_partner_data(heart_spec, "switzerland")
        assert d.y_train.min() == 1.0


class TestValidation:
    def test_clean_data_passes(self, heart_spec, cleveland):
        typed = validate_frame(cleveland, heart_spec.data_schema)
        assert len(typed) == 303

    def test_every_problem_listed_once(self, heart_spec, cleveland):
        """Missing and extra columns, wrong types, unknown levels, out-of-bounds and NaN: one error."""
        bad = cleveland.copy()
        bad = bad.drop(columns=["thal"])
        bad["bmi"] = "22"
        bad.loc[0, "age"] = "old"
        bad.loc[1, "cp"] = "severe"
        bad.loc[2, "chol"] = "900"
        bad.loc[3, "sex"] = np.nan
        bad.loc[4, "fbs"] = "maybe"
        with pytest.raises(DataValidationError) as exc:
            validate_frame(bad, heart_spec.data_schema)
        ps = exc.value.problems
        assert any("missing columns: ['thal']" in p for p in ps)
        assert any("not in the schema: ['bmi']" in p for p in ps)
        assert any("`age`: 1 value(s) are not numbers" in p for p in ps)
        assert any("`cp`: unknown categories 'severe'" in p for p in ps)
        assert any("`chol`: 1 value(s) outside the declared bounds [0, 700]" in p for p in ps)
        assert any("`sex`: 1 missing value(s)" in p for p in ps)
        assert any("`fbs`: 1 value(s) are not booleans" in p for p in ps)
        assert len(ps) == 7

    def test_missing_rows_dropped_or_refused(self, heart_spec, cleveland):
        bad = cleveland.copy()
        bad.loc[0, "chol"] = np.nan
        d = prepare_frame(bad, heart_spec, heart_spec.partners[0])
        assert d.rows_dropped_missing == 1
        strict = heart_spec.model_copy(update={"data_schema": heart_spec.data_schema.model_copy(update={"missing": "error"})})
        with pytest.raises(DataValidationError, match="miss a feature"):
            prepare_frame(bad, strict, strict.partners[0])

    def test_parquet_source(self, heart_spec, cleveland, tmp_path):
        """A Parquet source reads like the CSV one."""
        from fedcollab.spec import SourceSpec

        path = tmp_path / "c.parquet"
        cleveland.to_parquet(path)
        df = read_source(SourceSpec(path=str(path)), tmp_path)
        a = prepare_frame(df, heart_spec, heart_spec.partners[0])
        b = load_partner_data(heart_spec, "cleveland")
        assert np.array_equal(a.x_train, b.x_train)

    def test_missing_source_file(self, heart_spec, tmp_path):
        from fedcollab.spec import SourceSpec

        with pytest.raises(DataValidationError, match="not found"):
            read_source(SourceSpec(path="nope.csv"), tmp_path)
