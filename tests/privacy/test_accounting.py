"""The accounting core against published and independently computed epsilons."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import (
    GaussianMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    calibrate_noise_multiplier,
    check_delta,
    check_epsilon,
    compute_epsilon,
    mechanism_from_dict,
    merge_mechanisms,
)


def _mechanism(case: dict):
    p = case["params"]
    if case["mechanism"] == "poisson_subsampled_gaussian":
        return PoissonSubsampledGaussian(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=int(p["steps"]))
    if case["mechanism"].startswith("gaussian"):
        releases = int(p.get("releases", p.get("rounds", 1)))
        return GaussianMechanism(noise_multiplier=p["noise_multiplier"] / p.get("sensitivity", 1.0), releases=releases)
    return None


def _our_accountant(label: str) -> str | None:
    if label.startswith("rdp (") or label.startswith("rdp_improved"):
        return "rdp"
    if label.startswith("tight numerical (dp_accounting PLD"):
        return "pld"
    return None


def _checks(cases: list[dict]) -> list[tuple[str, str, dict, dict]]:
    out = []
    for c in cases:
        for chk in c["checks"]:
            acc = _our_accountant(chk["accountant"])
            if acc and _mechanism(c) is not None:
                out.append((c["id"], acc, c, chk))
    return out


class TestReferenceValues:
    def test_reference_cases_reproduced(self, dp_cases):
        """Every RDP and PLD check in shared/reference/dp-cases.json is reproduced within its tolerance."""
        checks = _checks(dp_cases)
        assert len(checks) >= 8
        for case_id, acc, case, chk in checks:
            got = compute_epsilon([_mechanism(case)], delta=case["delta"], accountant=acc).epsilon
            if "rel_tol" in chk:
                assert got == pytest.approx(chk["expected"], rel=chk["rel_tol"]), case_id
            else:
                assert abs(got - chk["expected"]) <= chk["abs_tol"], case_id

    def test_non_private_is_infinite(self):
        """A release without noise makes epsilon infinite, whatever else is composed."""
        r = compute_epsilon([GaussianMechanism(noise_multiplier=5.0), NonPrivate()], delta=1e-5, accountant="rdp")
        assert math.isinf(r.epsilon)

    def test_result_names_accountant_and_version(self):
        r = compute_epsilon([GaussianMechanism(noise_multiplier=2.0)], delta=1e-5, accountant="rdp")
        assert r.accountant == "rdp" and r.accountant_version.startswith("dp-accounting ")
        assert r.optimal_order is not None

    def test_merge_keeps_epsilon(self):
        """Merging per-round DP-SGD events (summing steps) leaves epsilon unchanged."""
        rounds = [PoissonSubsampledGaussian(noise_multiplier=1.1, sample_rate=0.05, steps=7)] * 5
        merged = merge_mechanisms(rounds)
        assert len(merged) == 1 and merged[0].steps == 35
        a = compute_epsilon(rounds, delta=1e-5, accountant="rdp").epsilon
        b = compute_epsilon(merged, delta=1e-5, accountant="rdp").epsilon
        assert a == pytest.approx(b, rel=1e-12)


class TestValidation:
    @pytest.mark.parametrize("value", [0, -1.0, math.nan, math.inf, True, "1"])
    def test_epsilon(self, value):
        with pytest.raises(PrivacyError, match="epsilon"):
            check_epsilon(value)

    @pytest.mark.parametrize("value", [0.0, 1.0, 5.0, -0.1, math.nan, False])
    def test_delta(self, value):
        with pytest.raises(PrivacyError, match="delta"):
            check_delta(value)

    def test_delta_zero_allowed_for_pure_dp(self):
        assert check_delta(0.0, allow_zero=True) == 0.0

    def test_event_parsing_names_field(self):
        with pytest.raises(PrivacyError, match=r"event\.gaussian\.noise_multiplier"):
            mechanism_from_dict({"mechanism": "gaussian", "noise_multiplier": -1.0})

    def test_compute_rejects_bad_delta(self):
        with pytest.raises(PrivacyError, match="delta"):
            compute_epsilon([GaussianMechanism(noise_multiplier=1.0)], delta=1.5, accountant="rdp")


class TestCalibration:
    @pytest.mark.parametrize("accountant", ["rdp", "pld"])
    def test_heart_cleveland(self, accountant):
        """Cleveland's DP-SGD (q = 32/199, 120 steps) calibrates to epsilon <= 1 and close to it."""
        z = calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-3, sample_rate=32 / 199, steps=120, accountant=accountant)
        eps = compute_epsilon([PoissonSubsampledGaussian(noise_multiplier=z, sample_rate=32 / 199, steps=120)], delta=1e-3, accountant=accountant).epsilon
        assert 0.99 <= eps <= 1.0

    def test_prior_release_is_composed(self):
        """With a statistics release first, sigma grows and the composition still fits the target."""
        prior = [GaussianMechanism(noise_multiplier=20.0)]
        z0 = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=50, accountant="rdp")
        z1 = calibrate_noise_multiplier(target_epsilon=2.0, delta=1e-5, sample_rate=0.1, steps=50, accountant="rdp", prior=prior)
        assert z1 > z0
        eps = compute_epsilon([*prior, PoissonSubsampledGaussian(noise_multiplier=z1, sample_rate=0.1, steps=50)], delta=1e-5, accountant="rdp").epsilon
        assert eps <= 2.0

    def test_prior_already_over_budget(self):
        with pytest.raises(PrivacyError, match="already spend"):
            calibrate_noise_multiplier(target_epsilon=0.5, delta=1e-5, sample_rate=0.1, steps=10, accountant="rdp",
                                       prior=[GaussianMechanism(noise_multiplier=0.5)])

    @settings(max_examples=6, deadline=None, derandomize=True)
    @given(
        eps=st.floats(0.3, 10.0),
        q=st.floats(0.01, 1.0),
        steps=st.integers(1, 300),
    )
    def test_never_overshoots(self, eps, q, steps):
        """Calibration never exceeds the target epsilon (RDP)."""
        z = calibrate_noise_multiplier(target_epsilon=eps, delta=1e-5, sample_rate=q, steps=steps, accountant="rdp")
        got = compute_epsilon([PoissonSubsampledGaussian(noise_multiplier=z, sample_rate=q, steps=steps)], delta=1e-5, accountant="rdp").epsilon
        assert got <= eps
