"""The exact accountant (closed forms), zCDP events and the upper-bound flag."""

from __future__ import annotations

import math

import pytest

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import (
    GaussianMechanism,
    LaplaceMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    ZCDPMechanism,
    calibrate_noise_multiplier,
    compute_epsilon,
    event_json_schema,
    mechanism_from_dict,
)
from fedcollab.privacy.accounting._exact import gaussian_log_delta, zcdp_epsilon, zcdp_epsilon_bun_steinke


def _closed_form_mechanism(case: dict):
    p = case["params"]
    if case["mechanism"].startswith("gaussian"):
        releases = int(p.get("releases", p.get("rounds", 1)))
        return GaussianMechanism(noise_multiplier=p["noise_multiplier"] / p.get("sensitivity", 1.0), releases=releases)
    if case["mechanism"] == "laplace":
        return LaplaceMechanism(scale_b=p["scale_b"], sensitivity_l1=p["sensitivity_l1"], releases=int(p["releases"]))
    raise AssertionError(f"no closed form for {case['id']}")


class TestReferenceValues:
    def test_every_closed_form_case_reproduced(self, dp_cases):
        """Every closed_form check in dp-cases.json (G1, L1, F_crosssilo) is reproduced within its tolerance."""
        checks = [(c, chk) for c in dp_cases for chk in c["checks"] if chk["accountant"] == "closed_form"]
        assert {c["id"] for c, _ in checks} >= {"G1_gaussian_sigma1", "L1_laplace_pure", "F_crosssilo_fullparticipation_central"}
        for case, chk in checks:
            r = compute_epsilon([_closed_form_mechanism(case)], delta=case["delta"], accountant="exact")
            assert r.epsilon == pytest.approx(chk["expected"], rel=chk["rel_tol"]), case["id"]
            assert r.upper_bound is False and r.accountant == "exact"

    @pytest.mark.parametrize(("z", "delta"), [(0.5, 1e-5), (1.0, 1e-5), (2.0, 1e-8), (10.0, 1e-3), (0.8, 1e-12)])
    def test_gaussian_matches_dp_accounting(self, z, delta):
        """The analytic Gaussian agrees with dp-accounting's independent get_epsilon_gaussian."""
        import dp_accounting

        ours = compute_epsilon([GaussianMechanism(noise_multiplier=z)], delta=delta, accountant="exact").epsilon
        assert ours == pytest.approx(dp_accounting.get_epsilon_gaussian(z, delta), rel=1e-6, abs=1e-9)

    def test_gaussian_answer_is_rounded_up(self):
        """The returned epsilon is never below the exact one: delta(eps) <= target in floating point."""
        for z in (0.3, 1.0, 4.0):
            eps = compute_epsilon([GaussianMechanism(noise_multiplier=z)], delta=1e-5, accountant="exact").epsilon
            assert gaussian_log_delta(eps, 1.0 / z) <= math.log(1e-5)

    def test_gaussian_releases_compose_as_one(self):
        """k releases of z, and mixed Gaussian events, equal one release of the combined multiplier."""
        k = compute_epsilon([GaussianMechanism(noise_multiplier=5.0, releases=20)], delta=1e-5, accountant="exact").epsilon
        one = compute_epsilon([GaussianMechanism(noise_multiplier=5.0 / math.sqrt(20))], delta=1e-5, accountant="exact").epsilon
        split = compute_epsilon([GaussianMechanism(noise_multiplier=5.0, releases=5)] * 4, delta=1e-5, accountant="exact").epsilon
        assert k == pytest.approx(one, rel=1e-12) and k == pytest.approx(split, rel=1e-12)

    def test_exact_is_below_the_bounds(self):
        """Exact Gaussian <= PLD (+ its discretisation) <= RDP, as the tight and loose bounds must be."""
        m = [GaussianMechanism(noise_multiplier=1.3, releases=3)]
        exact = compute_epsilon(m, delta=1e-6, accountant="exact").epsilon
        pld = compute_epsilon(m, delta=1e-6, accountant="pld").epsilon
        rdp = compute_epsilon(m, delta=1e-6, accountant="rdp").epsilon
        assert exact <= pld + 1e-9 and pld <= rdp and pld - exact < 0.005


class TestLaplace:
    def test_pure_composition(self):
        """k Laplace releases at delta 0: epsilon = sum of k s / b, exactly."""
        r = compute_epsilon([LaplaceMechanism(scale_b=2.0, sensitivity_l1=1.0, releases=3)], delta=0.0, accountant="exact")
        assert r.epsilon == pytest.approx(1.5, rel=1e-12) and r.upper_bound is False

    def test_one_release_with_delta_matches_pld(self):
        """eps0 + 2 ln(1 - delta) for one release agrees with dp-accounting's PLD."""
        m = [LaplaceMechanism(scale_b=1.0, sensitivity_l1=1.0)]
        exact = compute_epsilon(m, delta=0.05, accountant="exact")
        assert exact.upper_bound is False
        assert abs(exact.epsilon - compute_epsilon(m, delta=0.05, accountant="pld").epsilon) < 0.005

    def test_several_releases_with_delta_are_an_upper_bound(self):
        r = compute_epsilon([LaplaceMechanism(scale_b=1.0, sensitivity_l1=1.0, releases=4)], delta=1e-5, accountant="exact")
        assert r.epsilon == pytest.approx(4.0) and r.upper_bound is True

    @pytest.mark.parametrize("accountant", ["rdp", "pld"])
    def test_numerical_accountants_report_infinity_at_delta_zero(self, accountant):
        """dp-accounting's RDP and PLD give infinity at delta 0, reported as it is (documented)."""
        r = compute_epsilon([LaplaceMechanism(scale_b=1.0, sensitivity_l1=1.0)], delta=0.0, accountant=accountant)
        assert math.isinf(r.epsilon)


class TestUnsupported:
    def test_poisson_subsampled_has_no_closed_form(self):
        with pytest.raises(PrivacyError, match=r"^unsupported"):
            compute_epsilon([PoissonSubsampledGaussian(noise_multiplier=1.0, sample_rate=0.01, steps=100)], delta=1e-5, accountant="exact")

    def test_mixed_kinds_are_not_composed_exactly(self):
        """Gaussian + Laplace has no exact composition: an error, never a wrong number."""
        with pytest.raises(PrivacyError, match=r"^unsupported.*gaussian, laplace"):
            compute_epsilon(
                [GaussianMechanism(noise_multiplier=1.0), LaplaceMechanism(scale_b=1.0, sensitivity_l1=1.0)], delta=1e-5, accountant="exact"
            )

    def test_zcdp_under_pld(self):
        with pytest.raises(PrivacyError, match=r"^unsupported"):
            compute_epsilon([ZCDPMechanism(rho=0.5)], delta=1e-5, accountant="pld")

    def test_calibration_of_dpsgd_under_exact(self):
        with pytest.raises(PrivacyError, match=r"^unsupported"):
            calibrate_noise_multiplier(target_epsilon=1.0, delta=1e-5, sample_rate=0.1, steps=10, accountant="exact")

    def test_delta_zero_needs_pure_events(self):
        with pytest.raises(PrivacyError, match=r"`delta` must be in \(0, 1\).*gaussian"):
            compute_epsilon([GaussianMechanism(noise_multiplier=1.0)], delta=0.0, accountant="exact")

    def test_unknown_accountant(self):
        with pytest.raises(PrivacyError, match="`accountant` must be one of"):
            compute_epsilon([GaussianMechanism(noise_multiplier=1.0)], delta=1e-5, accountant="prv")  # type: ignore[arg-type]


class TestZCDP:
    @pytest.mark.parametrize("rho", [0.005, 0.5, 3.0])
    def test_conversion_between_gaussian_and_prop_1_3(self, rho):
        """rho-zCDP's epsilon lies above the Gaussian mechanism with the same rho and below Bun & Steinke Prop 1.3."""
        z = 1.0 / math.sqrt(2.0 * rho)  # the Gaussian mechanism of multiplier z is exactly 1/(2 z^2)-zCDP
        gauss = compute_epsilon([GaussianMechanism(noise_multiplier=z)], delta=1e-5, accountant="exact").epsilon
        r = compute_epsilon([ZCDPMechanism(rho=rho)], delta=1e-5, accountant="exact")
        assert gauss <= r.epsilon <= zcdp_epsilon_bun_steinke(rho=rho, delta=1e-5)
        assert r.upper_bound is True

    def test_rdp_matches_the_gaussian_rdp_curve(self):
        """Through RDP, rho-zCDP and the Gaussian of rho = 1/(2 z^2) have the same epsilon; the continuous CKS optimum is at most it."""
        z = 1.7
        via_zcdp = compute_epsilon([ZCDPMechanism(rho=1 / (2 * z * z), releases=10)], delta=1e-6, accountant="rdp").epsilon
        via_gauss = compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=10)], delta=1e-6, accountant="rdp").epsilon
        assert via_zcdp == pytest.approx(via_gauss, rel=1e-9)
        cks = zcdp_epsilon(rho=10 / (2 * z * z), delta=1e-6)
        assert cks <= via_zcdp and cks == pytest.approx(via_zcdp, rel=1e-3)

    def test_releases_add_rho(self):
        a = compute_epsilon([ZCDPMechanism(rho=0.1, releases=5)], delta=1e-5, accountant="exact").epsilon
        b = compute_epsilon([ZCDPMechanism(rho=0.5)], delta=1e-5, accountant="exact").epsilon
        assert a == pytest.approx(b, rel=1e-12)

    def test_parsed_from_json(self):
        m = mechanism_from_dict({"mechanism": "zcdp", "rho": 0.25})
        assert isinstance(m, ZCDPMechanism) and m.releases == 1
        with pytest.raises(PrivacyError, match=r"event\.zcdp\.rho"):
            mechanism_from_dict({"mechanism": "zcdp", "rho": -1.0})


class TestResultAndSchema:
    def test_upper_bound_flags(self):
        m = [GaussianMechanism(noise_multiplier=2.0)]
        assert compute_epsilon(m, delta=1e-5, accountant="rdp").upper_bound is True
        assert compute_epsilon(m, delta=1e-5, accountant="pld").upper_bound is True
        exact = compute_epsilon(m, delta=1e-5, accountant="exact")
        assert exact.upper_bound is False and exact.accountant_version.startswith("fedcollab ")
        assert exact.to_dict()["upper_bound"] is False and exact.to_dict()["optimal_order"] is None

    def test_non_private_is_exactly_infinite(self):
        r = compute_epsilon([NonPrivate()], delta=1e-5, accountant="exact")
        assert math.isinf(r.epsilon) and r.upper_bound is False and r.to_dict()["epsilon"] is None

    def test_exact_calibration_round_trip(self):
        """Calibrating 20 Gaussian releases to F_crosssilo's epsilon gives back z = 5, never overshooting."""
        z = calibrate_noise_multiplier(target_epsilon=3.84861028, delta=1e-5, sample_rate=None, steps=20, accountant="exact")
        assert z == pytest.approx(5.0, rel=1e-6)
        assert compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=20)], delta=1e-5, accountant="exact").epsilon <= 3.84861028

    def test_event_schema_accepts_events_and_rejects_typos(self):
        """The published event schema (shared with the ledger) accepts every kind and rejects a misspelt field."""
        import jsonschema

        schema = event_json_schema()
        for event in (
            {"mechanism": "gaussian", "noise_multiplier": 1.0, "releases": 3},
            {"mechanism": "poisson_subsampled_gaussian", "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 10},
            {"mechanism": "laplace", "scale_b": 1.0, "sensitivity_l1": 1.0},
            {"mechanism": "zcdp", "rho": 0.5},
            {"mechanism": "non_private"},
        ):
            jsonschema.validate(event, schema)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"mechanism": "gaussian", "noise_multipler": 1.0}, schema)
