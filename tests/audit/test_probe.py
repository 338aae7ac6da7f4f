"""Empirical audits: the canary probe of fedcollab's and Opacus's noise, and the membership-inference check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcollab.audit import ClippedGaussianSum, advantage_bound, membership_inference_check, probe_gaussian
from fedcollab.core import PrivacyError
from fedcollab.privacy.empirical import audit_scores, clopper_pearson_upper, epsilon_lower_bound


class TestGaussianProbe:
    def test_real_mechanism_passes(self):
        """fedcollab's clip + noise at z = 1 shows a lower bound below the claimed 4.377 and an estimate near it."""
        r = probe_gaussian(noise_multiplier=1.0, delta=1e-5, samples=100_000, generator=np.random.default_rng(0))
        assert r.verdict == "PASS"
        assert r.audit.claimed_epsilon == pytest.approx(4.3771781, rel=1e-6)
        assert 1.5 < r.audit.lower_bound <= r.audit.claimed_epsilon
        assert abs(r.audit.estimate - r.audit.claimed_epsilon) < 0.2

    def test_lower_bound_stays_below_the_claim_across_seeds(self):
        """The bound is rigorous: over several seeds it never exceeds the true epsilon."""
        for seed in range(1, 6):
            r = probe_gaussian(noise_multiplier=1.0, samples=20_000, generator=np.random.default_rng(seed))
            assert r.audit.lower_bound <= r.audit.claimed_epsilon, seed

    def test_noise_removed_fails(self):
        broken = ClippedGaussianSum(clip_norm=1.0, noise_multiplier=0.0)
        r = probe_gaussian(noise_multiplier=1.0, generator=np.random.default_rng(0), mechanism=broken)
        assert r.verdict == "FAIL" and r.audit.lower_bound > r.audit.claimed_epsilon
        assert math.isinf(r.audit.estimate)

    def test_noise_scaled_down_tenfold_fails(self):
        broken = ClippedGaussianSum(clip_norm=1.0, noise_multiplier=0.1)
        r = probe_gaussian(noise_multiplier=1.0, generator=np.random.default_rng(0), mechanism=broken)
        assert r.verdict == "FAIL" and r.audit.lower_bound > r.audit.claimed_epsilon
        assert r.audit.mu_estimate == pytest.approx(10.0, rel=0.05)

    def test_missing_clipping_fails(self):
        """A sum without clipping moves 3 C for the canary: caught."""

        def unclipped(rows, *, repetitions, generator):
            return rows.sum(axis=0)[None, :] + generator.normal(0.0, 1.0, size=(repetitions, rows.shape[1]))

        r = probe_gaussian(noise_multiplier=1.0, generator=np.random.default_rng(0), mechanism=unclipped)
        assert r.verdict == "FAIL"

    def test_claim_beyond_reach_is_inconclusive(self):
        """z = 0.3 claims epsilon ~19, more than 10^5 runs can ever refute."""
        r = probe_gaussian(noise_multiplier=0.3, generator=np.random.default_rng(0))
        assert r.verdict == "INCONCLUSIVE" and r.audit.claimed_epsilon > r.audit.max_lower_bound

    def test_generator_is_required(self):
        with pytest.raises(PrivacyError, match="generator"):
            probe_gaussian(noise_multiplier=1.0, generator=np.random.RandomState(0))  # type: ignore[arg-type]

    def test_result_is_json_ready(self):
        r = probe_gaussian(noise_multiplier=1.0, samples=1000, generator=np.random.default_rng(0))
        d = r.to_dict()
        assert {"claimed_epsilon", "estimate", "lower_bound", "verdict", "mechanism"} <= d.keys()


class TestStatistics:
    def test_clopper_pearson_zero_successes(self):
        """With no successes the upper bound is 1 - alpha^(1/n)."""
        assert float(clopper_pearson_upper(0, 1000, alpha=0.025)) == pytest.approx(1 - 0.025 ** (1 / 1000), rel=1e-9)
        assert float(clopper_pearson_upper(1000, 1000, alpha=0.025)) == 1.0

    def test_lower_bound_formula(self):
        """eps >= log((1 - delta - FNR) / FPR), and 0 when the test is no better than chance."""
        assert float(epsilon_lower_bound(0.01, 0.1, delta=0.0)) == pytest.approx(math.log(0.9 / 0.01))
        assert float(epsilon_lower_bound(0.5, 0.5, delta=0.0)) == 0.0

    def test_too_few_runs(self):
        with pytest.raises(PrivacyError, match=">= 20 runs"):
            audit_scores(np.zeros(5), np.ones(5), delta=1e-5, claimed_epsilon=1.0)


@pytest.fixture
def torch_generator():
    """A seeded torch generator; skips where the node extra (torch, opacus) is not installed."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("opacus")

    def make(seed: int):
        g = torch.Generator()
        g.manual_seed(seed)
        return g

    return make


class TestDpsgdProbe:
    def test_real_opacus_step_passes(self, torch_generator):
        """One real Opacus step at z = 1: lower bound below the claim, estimate near it."""
        from fedcollab.node._probe import probe_dpsgd

        r = probe_dpsgd(noise_multiplier=1.0, samples=3000, generator=torch_generator(0))
        assert r.verdict == "PASS" and r.audit.lower_bound <= r.audit.claimed_epsilon
        assert abs(r.audit.estimate - r.audit.claimed_epsilon) < 0.6

    def test_missing_noise_is_caught(self, torch_generator):
        """Opacus handed noise_multiplier ~0 while the claim says 1: FAIL."""
        from fedcollab.node._probe import probe_dpsgd

        r = probe_dpsgd(noise_multiplier=1.0, applied_noise_multiplier=1e-3, samples=3000, generator=torch_generator(0))
        assert r.verdict == "FAIL" and r.audit.lower_bound > r.audit.claimed_epsilon


class TestMembershipInference:
    def test_bound_formula(self):
        """(e^eps - 1 + 2 delta) / (e^eps + 1), with its limits."""
        for eps, delta in [(1.0, 0.0), (2.0, 1e-5), (0.1, 0.01)]:
            assert advantage_bound(epsilon=eps, delta=delta) == pytest.approx((math.exp(eps) - 1 + 2 * delta) / (math.exp(eps) + 1))
        assert advantage_bound(epsilon=math.inf, delta=0.0) == 1.0
        assert advantage_bound(epsilon=1000.0, delta=1e-5) == 1.0

    def test_separated_losses(self):
        """Members' losses 2 standard deviations lower: AUC ~0.92, advantage ~0.68, over a tight budget's cap."""
        rng = np.random.default_rng(0)
        mem, non = rng.normal(0.5, 0.1, 4000), rng.normal(0.7, 0.1, 4000)
        r = membership_inference_check(mem, non, epsilon=0.5, delta=1e-5)
        assert r.auc == pytest.approx(0.921, abs=0.01)
        assert r.advantage == pytest.approx(0.683, abs=0.03)
        assert r.bound == pytest.approx(math.tanh(0.25), abs=1e-4)
        assert r.exceeds_bound and "does not hold" in r.summary

    def test_indistinguishable_losses(self):
        rng = np.random.default_rng(1)
        r = membership_inference_check(rng.exponential(size=3000), rng.exponential(size=3000), epsilon=1.0, delta=1e-5)
        assert abs(r.auc - 0.5) < 0.03 and r.advantage < 0.06
        assert not r.exceeds_bound
        assert f"{r.advantage:.2f}" in r.summary and "caps the advantage at 0.46" in r.summary

    def test_auc_matches_pairwise_count_with_ties(self):
        mem, non = np.array([0.1, 0.5, 0.5, 2.0]), np.array([0.5, 1.0, 0.05])
        pairs = [(1.0 if n > m else 0.5 if n == m else 0.0) for m in mem for n in non]
        assert membership_inference_check(mem, non).auc == pytest.approx(sum(pairs) / len(pairs))

    def test_bad_input(self):
        with pytest.raises(PrivacyError, match="member_losses"):
            membership_inference_check([], [1.0])
        with pytest.raises(PrivacyError, match="both"):
            membership_inference_check([1.0], [1.0], epsilon=1.0)
