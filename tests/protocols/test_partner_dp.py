"""Partner-level DP plans and the distributed discrete Gaussian end to end, as plain functions."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from scipy import stats

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import GaussianMechanism, ZCDPMechanism, calibrate_noise_multiplier, compute_epsilon
from fedcollab.protocols import secagg
from fedcollab.protocols.ddg import ddg_decode, ddg_encode, ddg_generator
from fedcollab.protocols.partner_dp import plan_central, plan_distributed
from fedcollab.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]


def ddp_spec(**partner):
    raw = tomllib.loads((ROOT / "specs" / "heart-disease-ddp.toml").read_text())
    raw["privacy"]["partner"].update(partner)
    return parse_spec(raw)


def central_spec(**partner):
    raw = tomllib.loads((ROOT / "specs" / "heart-disease-ddp.toml").read_text())
    raw["aggregation"] = "plain"
    raw["privacy"]["mode"] = "central"
    raw["privacy"]["partner"].update(partner)
    return parse_spec(raw)


class TestPlans:
    @pytest.mark.parametrize("eps", [1.0, 8.0])
    def test_distributed_plan_spends_exactly_the_target(self, eps):
        """R rounds of the plan's zCDP release reach the partner-level target (never above, within 0.1 % below)."""
        spec = ddp_spec(epsilon=eps)
        plan = plan_distributed(spec, d=14)
        got = compute_epsilon([ZCDPMechanism(rho=plan.rho_round, releases=spec.training.rounds)], delta=1e-3, accountant="rdp").epsilon
        assert got <= eps and got == pytest.approx(eps, rel=1e-3)
        # shares sized for the declared minimum of honest partners: t_min = 4 - 1 dropout, no colluders
        assert plan.t_min == 3 and plan.n_honest == 3
        assert plan.sigma_share == pytest.approx(plan.sigma_total / math.sqrt(3))
        assert plan.wraparound_bound <= 1e-9

    def test_fine_grid_makes_ddg_the_gaussian_mechanism(self):
        """With gamma = C / 2^j tiny, rho per round is the Gaussian's C^2 / (2 sigma^2), and sigma matches central DP's z * C."""
        plan = plan_distributed(ddp_spec(clip=0.5), d=14)
        assert plan.rho_round == pytest.approx(0.5**2 / (2 * plan.sigma_total**2), rel=1e-3)
        central = plan_central(central_spec(clip=0.5))
        assert plan.sigma_total == pytest.approx(central.noise_multiplier * central.clip, rel=1e-3)

    def test_colluders_shrink_nothing_but_the_share_count(self):
        """Colluders' noise does not count: more colluders -> fewer honest shares -> larger shares, same total."""
        a = plan_distributed(ddp_spec(colluders=0), d=14)
        b = plan_distributed(ddp_spec(colluders=1), d=14)
        assert b.n_honest == 2 and b.sigma_share > a.sigma_share
        assert b.sigma_total == pytest.approx(a.sigma_total, rel=1e-6)

    def test_central_plan_is_the_accounting_cores_calibration(self):
        spec = central_spec(epsilon=3.0)
        plan = plan_central(spec)
        z = calibrate_noise_multiplier(target_epsilon=3.0, delta=1e-3, sample_rate=None, steps=spec.training.rounds, accountant="rdp")
        assert plan.noise_multiplier == pytest.approx(z)
        eps = compute_epsilon([GaussianMechanism(noise_multiplier=plan.noise_multiplier, releases=spec.training.rounds)], delta=1e-3, accountant="rdp")
        assert eps.epsilon <= 3.0

    def test_wrong_mode_is_refused(self):
        with pytest.raises(PrivacyError, match="distributed"):
            plan_distributed(central_spec(), d=14)
        with pytest.raises(PrivacyError, match="central"):
            plan_central(ddp_spec())


class TestAggregatedNoise:
    def test_summed_noise_is_the_claimed_discrete_gaussian(self):
        """10^4 draws of the decoded sum of 3 nodes' encoded zero vectors follow N_Z(0, 3 sigma_share^2) (integer units)."""
        plan = plan_distributed(ddp_spec(epsilon=8.0), d=14)
        # a coarse grid keeps the pmf test meaningful: integer noise of std ~3.2 per share
        gamma = plan.sigma_total / 5.5
        gen = np.random.Generator(np.random.PCG64(2021))  # seeded: a deterministic test (the os.urandom source has its own)
        n, draws = 3, 10_000
        total = np.zeros(draws, dtype=np.uint32)
        for _ in range(n):
            v = ddg_encode(np.zeros(draws), clip_l2=1.0, gamma=gamma, beta=0.0, n_noise_shares=n, sigma_total=plan.sigma_total,
                           bits=32, generator=gen)
            total = total + v  # uint32 arithmetic is the modular sum
        z = np.rint(ddg_decode(total, gamma=gamma, bits=32) / gamma).astype(np.int64)
        s2 = (plan.sigma_total / gamma) ** 2  # summed parameter: n * share
        assert z.var() == pytest.approx(s2, rel=0.05)
        assert abs(z.mean()) < 4 * math.sqrt(s2 / draws)
        xs = np.arange(-40, 41)
        pmf = np.exp(-(xs**2) / (2 * s2))
        pmf /= pmf.sum()
        observed = np.array([(z == x).sum() for x in xs])
        keep = pmf * draws >= 5
        exp = pmf[keep] * draws
        obs = observed[keep]
        chi2 = float(((obs - exp * obs.sum() / exp.sum()) ** 2 / (exp * obs.sum() / exp.sum())).sum())
        assert stats.chi2.sf(chi2, keep.sum() - 1) > 1e-4

    def test_no_wraparound_at_the_worst_case(self):
        """Every party at the clipping bound on one coordinate, 4 parties, 10^4 rounds: the sum never wraps."""
        plan = plan_distributed(ddp_spec(epsilon=1.0), d=14)
        gen = ddg_generator()
        x = np.zeros(14)
        x[0] = 5.0  # clipped to C = 1 on one coordinate: the worst case without rotation
        decoded = []
        for _ in range(250):
            total = np.zeros(14, dtype=np.uint32)
            for _ in range(plan.n_parties):
                total = total + ddg_encode(x, clip_l2=plan.clip, gamma=plan.gamma, beta=plan.beta, n_noise_shares=plan.n_honest,
                                           sigma_total=plan.sigma_total, bits=32, generator=gen, n_parties=plan.n_parties)
            decoded.append(ddg_decode(total, gamma=plan.gamma, bits=32))
        d = np.array(decoded)
        # the sum is 4 * C on coordinate 0 plus noise of std 2 sigma_share; a wrap would be off by 2^32 gamma
        assert np.abs(d[:, 0] - 4.0).max() < 8 * plan.effective_std(4)
        assert np.abs(d[:, 1:]).max() < 8 * plan.effective_std(4)
        # ... and a wrap would move a coordinate by 2^32 gamma, far outside those bounds
        assert 2.0**32 * plan.gamma > 16 * plan.effective_std(4) + 4.0

    def test_mean_through_secagg_is_unbiased(self):
        """Through a real SecAgg+ round with a dropout, the decoded mean of the 3 summed updates is their mean plus the stated noise."""
        plan = plan_distributed(ddp_spec(epsilon=8.0), d=14)
        rng = np.random.default_rng(3)
        updates = {p: rng.normal(0, 0.1, 14) for p in ("a", "b", "c", "d")}
        vectors = {p: ddg_encode(u, clip_l2=plan.clip, gamma=plan.gamma, beta=plan.beta, n_noise_shares=plan.n_honest,
                                 sigma_total=plan.sigma_total, bits=32, generator=ddg_generator()) for p, u in updates.items()}
        names = tuple(sorted(vectors))
        cfg = secagg.SecAggConfig(run_id="r", round=1, participants=names, k=1000, threshold=2, max_dropouts=1, bits=32, length=14)
        keys = {n: Ed25519PrivateKey.generate() for n in names}
        total, coord = secagg.run_round_in_memory(vectors, cfg=cfg, signing_keys=keys, drop_at={secagg.Stage.MASKED_INPUT: ["d"]})
        assert sorted(coord.survivors) == ["a", "b", "c"]
        mean = ddg_decode(total, gamma=plan.gamma, bits=32) / 3
        want = np.mean([updates[p] for p in ("a", "b", "c")], axis=0)
        assert np.abs(mean - want).max() < 6 * plan.effective_std(3) / 3
