"""The collaboration spec: strict validation with one clear message per problem."""

from __future__ import annotations

import copy
import json
import math
import tomllib
from pathlib import Path

import pytest

from fedcollab.core import SpecError
from fedcollab.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture()
def raw() -> dict:
    return tomllib.loads((ROOT / "specs" / "heart-disease-dp.toml").read_text())


def problems(data: dict) -> list[str]:
    with pytest.raises(SpecError) as exc:
        parse_spec(data)
    return exc.value.problems


class TestValid:
    def test_heart_specs_load(self, heart_spec, heart_dp_spec):
        """Both shipped specs validate and describe four hospitals with 13 encoded features."""
        assert [p.name for p in heart_spec.partners] == ["cleveland", "hungary", "switzerland", "va-long-beach"]
        assert len(heart_spec.data_schema.encoded_features()) == 13
        assert heart_spec.resolved_scaling == "federated_statistics"
        assert heart_dp_spec.resolved_scaling == "public_bounds"
        assert heart_dp_spec.privacy.target_epsilon == 1.0

    def test_integral_float_accepted_for_int(self, raw):
        """`rounds = 20.0` is read as 20."""
        raw["training"]["rounds"] = 20.0
        assert parse_spec(raw).training.rounds == 20


class TestInvalid:
    def test_misspelt_field(self, raw):
        """An unknown field is named, not silently dropped."""
        raw["privacy"]["noise_multipler"] = 1.0
        assert any("privacy.noise_multipler" in p and "not a known field" in p for p in problems(raw))

    def test_bool_for_epsilon(self, raw):
        """`target_epsilon = true` is refused (strict mode)."""
        raw["privacy"]["target_epsilon"] = True
        ps = problems(raw)
        assert any("privacy.target_epsilon" in p and "True" in p for p in ps)

    @pytest.mark.parametrize("value", [0.0, -1.0, math.nan, math.inf])
    def test_bad_epsilon(self, raw, value):
        """epsilon <= 0, NaN and inf are refused, naming the field and the value."""
        raw["privacy"]["target_epsilon"] = value
        assert any("privacy.target_epsilon" in p for p in problems(raw))

    @pytest.mark.parametrize("value", [0.0, 1.0, 5.0, -1e-3])
    def test_bad_delta(self, raw, value):
        """delta must be in (0, 1) for DP-SGD."""
        raw["privacy"]["delta"] = value
        assert any("privacy.delta" in p and repr(value) in p for p in problems(raw))

    def test_several_problems_reported_together(self, raw):
        """Each problem gets its own line."""
        raw["training"]["rounds"] = 0
        raw["training"]["batch_size"] = "32"
        raw["model"]["kind"] = "transformer"
        ps = problems(raw)
        assert len(ps) == 3
        assert any(p.startswith("`training.rounds`") for p in ps)
        assert any(p.startswith("`training.batch_size`") and "'32'" in p for p in ps)
        assert any(p.startswith("`model.kind`") and "transformer" in p for p in ps)

    def test_missing_required(self, raw):
        """A missing section is named."""
        del raw["schema"]
        assert any("`schema` is required" in p for p in problems(raw))

    def test_duplicate_partner(self, raw):
        raw["partners"].append(copy.deepcopy(raw["partners"][0]))
        assert any("duplicate partner names ['cleveland']" in p for p in problems(raw))

    def test_undeclared_feature(self, raw):
        raw["schema"]["features"].append("bmi")
        assert any("feature `bmi` is not a declared column" in p for p in problems(raw))

    def test_number_feature_needs_bounds(self, raw):
        for c in raw["schema"]["columns"]:
            if c["name"] == "age":
                del c["bounds"]
        assert any("number feature `age` needs public `bounds`" in p for p in problems(raw))

    def test_bad_bounds(self, raw):
        for c in raw["schema"]["columns"]:
            if c["name"] == "age":
                c["bounds"] = [100, 18]
        assert any("min < max" in p for p in problems(raw))

    def test_where_level_unknown(self, raw):
        raw["partners"][0]["source"]["where"] = {"dataset": "Atlantis"}
        assert any("'Atlantis' is not a level of `dataset`" in p for p in problems(raw))

    def test_exact_statistics_refused_under_dp(self, raw):
        raw["preprocessing"]["scaling"] = "federated_statistics"
        assert any("federated_statistics" in p and "DP forbids" in p for p in problems(raw))

    def test_dp_statistics_needs_share(self, raw):
        raw["preprocessing"]["scaling"] = "dp_statistics"
        assert any("preprocessing_epsilon_share" in p for p in problems(raw))

    def test_custom_model_needs_target(self, raw):
        raw["model"] = {"kind": "custom", "target": "not a path"}
        assert any("package.module:ClassName" in p for p in problems(raw))

    def test_not_toml(self, tmp_path):
        p = tmp_path / "x.toml"
        p.write_text("this is = = not toml")
        with pytest.raises(SpecError, match="not valid TOML"):
            load_spec(p)

    def test_missing_file(self, tmp_path):
        with pytest.raises(SpecError, match="cannot read spec"):
            load_spec(tmp_path / "nope.toml")


class TestSchemaExport:
    def test_committed_schemas_are_current(self):
        """schemas/spec.schema.json and schemas/summary.schema.json match the models."""
        from fedcollab.cli._schemas import schemas

        for name, schema in schemas().items():
            on_disk = json.loads((ROOT / "schemas" / name).read_text())
            assert on_disk == json.loads(json.dumps(schema)), f"regenerate with `make schema` ({name})"

    def test_schema_accepts_shipped_spec(self, raw):
        """The exported JSON Schema accepts the shipped spec and rejects an unknown field."""
        import jsonschema

        schema = json.loads((ROOT / "schemas" / "spec.schema.json").read_text())
        jsonschema.validate(raw, schema)
        raw["surprise"] = 1
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(raw, schema)


class TestCrossFieldProblems:
    def test_each_cross_field_problem_on_its_own_line(self, raw):
        """Two schema problems found by one validator still give two lines, each naming `schema`."""
        raw["schema"]["features"] += ["bmi", "height"]
        ps = problems(raw)
        assert "`schema`: feature `bmi` is not a declared column." in ps
        assert "`schema`: feature `height` is not a declared column." in ps


def test_spec_reference_is_current():
    """docs/spec-reference.md is what docs/gen_spec_reference.py generates from the models."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_spec_reference.py"), "--check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


class TestPartnerLevelPrivacy:
    @pytest.fixture()
    def ddp(self) -> dict:
        return tomllib.loads((ROOT / "specs" / "heart-disease-ddp.toml").read_text())

    def test_shipped_distributed_spec(self, ddp):
        """The shipped spec: distributed DP, t_min = 4 partners - 1 dropout, no DP-SGD."""
        s = parse_spec(ddp)
        assert s.privacy.partner_dp and not s.privacy.record_dp and s.min_participants == 3
        assert s.resolved_scaling == "public_bounds"

    def test_distributed_needs_secagg(self, ddp):
        ddp["aggregation"] = "plain"
        assert any("needs aggregation = 'secagg'" in p and "'plain'" in p for p in problems(ddp))

    def test_distributed_needs_the_complete_graph(self, ddp):
        ddp["secagg"]["neighbours"] = 2
        assert any("complete secagg graph" in p for p in problems(ddp))

    def test_partner_table_required_and_validated(self, ddp):
        del ddp["privacy"]["partner"]
        assert any("needs a [privacy.partner] table" in p for p in problems(ddp))

    @pytest.mark.parametrize("field,value", [("epsilon", 0.0), ("epsilon", -1.0), ("delta", 1.0), ("delta", 0.0), ("clip", float("nan"))])
    def test_invalid_partner_parameters_named(self, ddp, field, value):
        ddp["privacy"]["partner"][field] = value
        assert any(f"privacy.partner.{field}" in p for p in problems(ddp))

    def test_colluders_leave_no_honest_partner(self, ddp):
        ddp["privacy"]["partner"]["colluders"] = 3
        assert any("leaves no honest partner" in p for p in problems(ddp))

    def test_record_level_flag(self, ddp):
        """record_level needs target_epsilon and delta; it is meaningless with mode 'record'."""
        ddp["privacy"]["record_level"] = True
        assert any("record-level DP needs" in p for p in problems(ddp))
        ddp["privacy"].update(target_epsilon=1.0, delta=1e-3)
        assert parse_spec(ddp).privacy.record_dp
        ddp["privacy"]["mode"] = "record"
        del ddp["privacy"]["partner"]
        assert any("`record_level` = true needs mode" in p for p in problems(ddp))

    def test_partner_table_without_partner_mode(self, raw):
        raw["privacy"]["partner"] = {"epsilon": 1.0, "delta": 1e-3}
        assert any("[privacy.partner] needs mode" in p for p in problems(raw))
