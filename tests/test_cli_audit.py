"""`fedcollab audit epsilon` and `fedcollab audit probe`: JSON output, calibration, exit codes."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from fedcollab.cli import app

runner = CliRunner()

DPSGD = '{"mechanism": "poisson_subsampled_gaussian", "noise_multiplier": 1.5, "sample_rate": 0.04, "steps": 2250}'


def _case(dp_cases, case_id: str) -> dict:
    return next(c for c in dp_cases if c["id"] == case_id)


@pytest.mark.parametrize("cmd", [["audit", "epsilon"], ["audit", "probe"]])
def test_help(cmd):
    r = runner.invoke(app, [*cmd, "--help"])
    assert r.exit_code == 0 and "Usage" in r.output


class TestEpsilon:
    def test_rdp_reference_value(self, dp_cases):
        """S_opacus_unittest_rdp (z=1.5, q=0.04, T=2250, delta=1e-5) gives Opacus's 7.329111 within 1e-4 relative."""
        case = _case(dp_cases, "S_opacus_unittest_rdp")
        chk = next(c for c in case["checks"] if c["accountant"].startswith("rdp ("))
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD, "--delta", "1e-5", "--accountant", "rdp"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert set(out) == {"epsilon", "delta", "accountant", "accountant_version", "optimal_order", "upper_bound"}
        assert out["epsilon"] == pytest.approx(chk["expected"], rel=chk["rel_tol"])
        assert out["accountant"] == "rdp" and out["optimal_order"] is not None and out["upper_bound"] is True

    def test_exact_composes_repeated_events(self, tmp_path):
        """An events file of 20 Gaussian rounds (z = 5) gives F_crosssilo's closed form 3.84861028."""
        path = tmp_path / "events.json"
        path.write_text(json.dumps([{"mechanism": "gaussian", "noise_multiplier": 5.0}] * 20))
        r = runner.invoke(app, ["audit", "epsilon", "--events-file", str(path), "--delta", "1e-5", "--accountant", "exact"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["epsilon"] == pytest.approx(3.84861028, rel=1e-6) and out["upper_bound"] is False

    def test_pure_dp_at_delta_zero(self):
        r = runner.invoke(
            app, ["audit", "epsilon", "--event", '{"mechanism": "laplace", "scale_b": 1, "sensitivity_l1": 1}', "--delta", "0", "--accountant", "exact"]
        )
        assert r.exit_code == 0, r.output
        assert json.loads(r.stdout)["epsilon"] == pytest.approx(1.0)

    def test_table_format(self):
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD, "--delta", "1e-5", "--format", "table"])
        assert r.exit_code == 0 and "epsilon" in r.stdout and "7.329" in r.stdout

    def test_calibrate(self):
        """A DP-SGD template without noise_multiplier calibrates to a z whose epsilon fits the target."""
        template = '{"mechanism": "poisson_subsampled_gaussian", "sample_rate": 0.04, "steps": 2250}'
        r = runner.invoke(app, ["audit", "epsilon", "--calibrate", "--target-epsilon", "7.329111", "--event", template, "--delta", "1e-5"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["noise_multiplier"] == pytest.approx(1.5, rel=2e-3)
        assert out["epsilon"] <= 7.329111 and out["event"]["noise_multiplier"] == out["noise_multiplier"]

    def test_calibrate_template_must_leave_out_noise(self):
        r = runner.invoke(app, ["audit", "epsilon", "--calibrate", "--target-epsilon", "1", "--event", DPSGD, "--delta", "1e-5"])
        assert r.exit_code == 4 and "noise_multiplier" in r.output and "must be absent" in r.output


class TestEpsilonErrors:
    def test_bad_delta_exits_4_naming_delta(self):
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD, "--delta", "1.5"])
        assert r.exit_code == 4
        assert "`delta`" in r.output and "1.5" in r.output

    def test_unsupported_exits_4(self):
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD, "--delta", "1e-5", "--accountant", "exact"])
        assert r.exit_code == 4
        assert json.loads(r.stdout)["error"].startswith("unsupported")

    def test_zcdp_under_pld_is_unsupported(self):
        r = runner.invoke(app, ["audit", "epsilon", "--event", '{"mechanism": "zcdp", "rho": 0.5}', "--delta", "1e-5", "--accountant", "pld"])
        assert r.exit_code == 4 and "unsupported" in r.output

    def test_invalid_field_is_named(self):
        """A bad field is named with its position, what was expected and what was got."""
        bad = '{"mechanism": "poisson_subsampled_gaussian", "noise_multiplier": 1.0, "sample_rate": 2, "steps": 10}'
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD, "--event", bad, "--delta", "1e-5"])
        assert r.exit_code == 4
        assert "events[1].poisson_subsampled_gaussian.sample_rate" in r.output and "less than or equal to 1" in r.output

    def test_unreadable_json_exits_2(self, tmp_path):
        r = runner.invoke(app, ["audit", "epsilon", "--event", '{"mechanism": ', "--delta", "1e-5"])
        assert r.exit_code == 2 and "not valid JSON" in r.output
        path = tmp_path / "events.json"
        path.write_text("{not json")
        r = runner.invoke(app, ["audit", "epsilon", "--events-file", str(path), "--delta", "1e-5"])
        assert r.exit_code == 2 and "--events-file" in r.output
        r = runner.invoke(app, ["audit", "epsilon", "--events-file", str(tmp_path / "missing.json"), "--delta", "1e-5"])
        assert r.exit_code == 2 and "cannot read" in r.output

    def test_missing_delta_exits_2(self):
        r = runner.invoke(app, ["audit", "epsilon", "--event", DPSGD])
        assert r.exit_code == 2 and "--delta" in r.output


class TestProbe:
    def test_gaussian_passes(self):
        r = runner.invoke(app, ["audit", "probe", "--mechanism", "gaussian", "--noise-multiplier", "1", "--delta", "1e-5", "--seed", "0"])
        assert r.exit_code == 0, r.output
        out = json.loads(r.stdout)
        assert out["verdict"] == "PASS" and out["lower_bound"] <= out["claimed_epsilon"]
        assert out["claimed_epsilon"] == pytest.approx(4.3771781, rel=1e-6)

    def test_no_noise_fails(self):
        r = runner.invoke(app, ["audit", "probe", "--seed", "0", "--samples", "5000", "--no-noise", "--format", "table"])
        assert r.exit_code == 24, r.output  # ExitCode.PROBE_FAILED
        assert "FAIL" in r.stdout

    def test_bad_delta(self):
        r = runner.invoke(app, ["audit", "probe", "--delta", "2", "--samples", "100"])
        assert r.exit_code == 4 and "`delta`" in r.output
