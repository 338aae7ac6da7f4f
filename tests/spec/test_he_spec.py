"""The [he] table: designated partners, headroom in the plaintext modulus, schemes offered."""

from __future__ import annotations

import tomllib

import pytest

from fedcollab.core import SpecError
from fedcollab.spec import parse_spec
from tests.conftest import ROOT


@pytest.fixture()
def raw() -> dict:
    return tomllib.loads((ROOT / "specs" / "heart-disease-he.toml").read_text())


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return exc.value.problems


def test_shipped_he_spec_loads(raw):
    spec = parse_spec(raw)
    names = [p.name for p in spec.partners]
    assert spec.aggregation == "he" and spec.he.resolved_key_holder(names) == "cleveland" == spec.he.resolved_model_writer(names)


def test_defaults_are_the_first_partner(raw):
    del raw["he"]
    spec = parse_spec(raw)
    assert spec.he.resolved_key_holder(["a", "b"]) == "a" and spec.he.resolved_model_writer(["a", "b"]) == "a"


@pytest.mark.parametrize(("change", "expect"), [
    ({"key_holder": "nobody"}, "he.key_holder = 'nobody' is not a partner"),
    ({"model_writer": "nobody"}, "he.model_writer = 'nobody' is not a partner"),
    ({"clip": 16.0}, "clip * scale + partners must be at most 8380416"),
    ({"scheme": "ckks"}, "scheme"),
])
def test_bad_he_table(raw, change, expect):
    raw["he"].update(change)
    assert any(expect in p for p in problems(raw)), problems(raw)


def test_fedadam_allowed_under_he(raw):
    """FedAdam runs at every partner after decryption (the coordinator holds no plaintext model)."""
    raw["training"]["strategy"] = "fedadam"
    assert parse_spec(raw).training.strategy == "fedadam"


def test_one_partner_refused(raw):
    raw["partners"] = raw["partners"][:1]
    raw["he"] = {}
    assert any("at least 2 partners" in p for p in problems(raw))
