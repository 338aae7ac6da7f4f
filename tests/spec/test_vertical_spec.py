"""The vertical layout is validated like everything else: one clear message per problem."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from fedcollab.core import SpecError
from fedcollab.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "heart-disease-vertical.toml"


def _data() -> dict[str, Any]:
    return tomllib.loads(SPEC.read_text())


def _problems(data: dict[str, Any]) -> str:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return str(exc.value)


def test_the_shipped_vertical_spec_loads() -> None:
    spec = load_spec(SPEC)
    assert spec.layout == "vertical" and spec.vertical is not None and spec.vertical.label_holder == "clinic"
    held = [c for p in spec.partners for c in p.columns or [] if c in spec.data_schema.features]
    assert sorted(held) == sorted(spec.data_schema.features)


def test_a_feature_held_twice_is_refused() -> None:
    d = _data()
    d["partners"][1]["columns"].append("age")
    assert "feature `age` is held by 2 partners ['clinic', 'lab']" in _problems(d)


def test_the_label_at_a_passive_party_is_refused() -> None:
    d = _data()
    d["partners"][1]["columns"].append("num")
    assert "the label `num` may only be held by the label holder `clinic`, not `lab`" in _problems(d)


def test_a_feature_held_by_no_one_and_a_missing_label_are_refused() -> None:
    d = _data()
    d["partners"][1]["columns"].remove("cp")
    d["partners"][0]["columns"].remove("num")
    msg = _problems(d)
    assert "feature `cp` is held by no partner" in msg and "the label `num` must be in the label holder's columns" in msg


def test_bad_keys_are_refused_with_the_field_named() -> None:
    d = _data()
    d["vertical"]["label_holder"] = "bank"
    d["vertical"]["id_column"] = "age"
    msg = _problems(d)
    assert "vertical.label_holder `bank` is not a partner" in msg
    assert "vertical.id_column `age` is also a feature" in msg


def test_vertical_options_that_do_not_apply_are_refused() -> None:
    d = _data()
    d["aggregation"] = "secagg"
    assert "leave `aggregation` out" in _problems(d)
    d = _data()
    d["privacy"] = {"mode": "central", "partner": {"epsilon": 8.0, "delta": 1e-5, "clip": 1.0}}
    assert "privacy.mode 'none' or 'record'" in _problems(d)
    d = _data()
    d["privacy"] = {"mode": "record", "target_epsilon": 1.0, "delta": 1e-5}
    assert "dp_split = 'histogram'" in _problems(d)
    assert "vertical.passive_bins must be 'public' under record-level DP (quantile edges depend on the data), got 'quantile'" in _problems(d)
    d["vertical"]["passive_bins"] = "public"
    assert "passive_bins" not in _problems(d)


def test_psi_reveal_to_the_label_holder_alone_cannot_train() -> None:
    d = _data()
    d["vertical"]["psi_reveal"] = "label_holder"
    assert "vertical.psi_reveal = 'label_holder' tells the passive party only the intersection size" in _problems(d)


def test_layout_and_columns_must_agree() -> None:
    d = _data()
    del d["layout"]
    assert "[vertical] is only for layout = 'vertical'" in _problems(d)
    d = _data()
    del d["vertical"]
    assert "needs a [vertical] table" in _problems(d)
    d = _data()
    del d["partners"][1]["columns"]
    assert "partners[1] (lab): a vertical spec needs `columns`" in _problems(d)
    d = _data()
    d["partners"] = d["partners"][:1]
    assert "at least 2 partners" in _problems(d)


def test_three_parties_are_accepted_for_secureboost_and_for_logistic_regression() -> None:
    d = _data()
    lab = d["partners"][1]
    d["partners"][1] = {**lab, "columns": ["cp", "fbs", "restecg"]}
    d["partners"].append({"name": "stress", "source": lab["source"], "columns": ["thalch", "exang", "oldpeak"]})
    from fedcollab.spec import parse_spec

    assert len(parse_spec(d, base_dir=ROOT / "specs").partners) == 3
    d["model"] = {"kind": "logistic_regression"}
    assert [p.name for p in parse_spec(d, base_dir=ROOT / "specs").partners] == ["clinic", "lab", "stress"]
