"""The distributed discrete Gaussian: sampler, node encoding, zCDP accounting, wrap-around, refusal."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from fedcollab.core import ProtocolError, UpdateError
from fedcollab.privacy.accounting import ZCDPMechanism, compute_epsilon
from fedcollab.protocols.ddg import check_honest_minimum, check_wraparound, ddg_decode, ddg_encode, ddg_generator, ddg_norm_bound, ddg_tau, ddg_zcdp, sample_discrete_gaussian, SystemRandomSource, wraparound_probability

BETA = math.exp(-0.5)


def gen(seed: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed))


def dg_pmf(sigma2: float, half_width: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact N_Z(0, sigma2) pmf on [-half_width, half_width], normalised there."""
    xs = np.arange(-half_width, half_width + 1)
    w = np.exp(-(xs.astype(np.float64) ** 2) / (2.0 * sigma2))
    return xs, w / w.sum()


def chi2_pvalue(samples: np.ndarray, xs: np.ndarray, pmf: np.ndarray) -> float:
    """Chi-square goodness of fit, the tails merged until every expected count is >= 5."""
    n = samples.size
    counts = np.bincount(np.clip(samples - xs[0], 0, xs.size - 1), minlength=xs.size).astype(np.float64)
    expected = pmf * n
    core = np.flatnonzero(expected >= 5)
    lo, hi = core[0], core[-1]
    obs = np.concatenate([[counts[:lo].sum()], counts[lo : hi + 1], [counts[hi + 1 :].sum()]])
    exp_ = np.concatenate([[expected[:lo].sum()], expected[lo : hi + 1], [expected[hi + 1 :].sum()]])
    keep = exp_ > 0
    obs, exp_ = obs[keep], exp_[keep]
    exp_ *= obs.sum() / exp_.sum()
    return float(stats.chisquare(obs, exp_).pvalue)


def total_variation(samples: np.ndarray, xs: np.ndarray, pmf: np.ndarray) -> float:
    counts = np.bincount(np.clip(samples - xs[0], 0, xs.size - 1), minlength=xs.size)
    return 0.5 * float(np.abs(counts / samples.size - pmf).sum())


# --- sampler -------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma2", [0.5, 2.0, 9.0, 400.0])
def test_sampler_matches_exact_pmf(sigma2):
    draws = sample_discrete_gaussian(sigma2, 50_000, generator=gen(11))
    assert draws.dtype == np.int64 and draws.shape == (50_000,)
    xs, pmf = dg_pmf(sigma2, math.ceil(15 * math.sqrt(sigma2)) + 5)
    assert chi2_pvalue(draws, xs, pmf) > 1e-3
    assert abs(draws.mean()) < 5 * math.sqrt(sigma2 / draws.size)
    if sigma2 >= 1:
        # the variance of N_Z(0, s2) equals s2 to within 1e-15 relative for s2 >= 1
        assert draws.var() == pytest.approx(sigma2, rel=0.03)


def test_chi_square_has_power():
    """The same test rejects a discrete Gaussian whose variance is 15 % off."""
    draws = sample_discrete_gaussian(2.0, 50_000, generator=gen(12))
    xs, pmf = dg_pmf(2.3, 40)
    assert chi2_pvalue(draws, xs, pmf) < 1e-6


def test_sampler_is_fast_and_validates():
    draws = sample_discrete_gaussian(1e4, 1_000_000, generator=gen(13))
    assert draws.size == 1_000_000
    assert sample_discrete_gaussian(1.0, 0, generator=gen(1)).size == 0
    for bad in (0.0, -1.0, math.nan, math.inf, True, "1"):
        with pytest.raises(ProtocolError):
            sample_discrete_gaussian(bad, 10, generator=gen(1))
    with pytest.raises(ProtocolError, match="generator"):
        sample_discrete_gaussian(1.0, 10, generator=None)
    with pytest.raises(ProtocolError, match="generator"):
        sample_discrete_gaussian(1.0, 10, generator=np.random)  # the global RNG is refused
    with pytest.raises(ProtocolError):
        sample_discrete_gaussian(1.0, -1, generator=gen(1))
    assert isinstance(ddg_generator(), SystemRandomSource)


def test_csprng_source_draws_the_right_distributions():
    """The os.urandom source: uniforms in [0, 1), geometrics with mean 1/p, a discrete Gaussian of the right variance."""
    src = ddg_generator()
    u = src.random(100_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.01
    g = src.geometric(0.25, 100_000)
    assert g.min() >= 1 and abs(g.mean() - 4.0) < 0.1
    x = sample_discrete_gaussian(9.0, 20_000, generator=src)
    assert abs(x.mean()) < 0.1 and x.var() == pytest.approx(9.0, rel=0.05)
    assert not np.array_equal(src.random(8), src.random(8))


def test_sum_of_shares_is_close_to_discrete_gaussian():
    n, share2, draws = 4, 2.0, 40_000
    g = gen(21)
    total = sum(sample_discrete_gaussian(share2, draws, generator=g) for _ in range(n))
    assert total.var() == pytest.approx(n * share2, rel=0.04)
    xs, target = dg_pmf(n * share2, 60)
    # exactly: the 4-fold convolution of N_Z(0, 2) is within 1e-6 in TV of N_Z(0, 8) (KLS21)
    _, one = dg_pmf(share2, 15)
    conv = one
    for _ in range(n - 1):
        conv = np.convolve(conv, one)
    exact = np.zeros_like(target)
    mid, half = xs.size // 2, conv.size // 2
    exact[mid - half : mid + half + 1] = conv
    assert 0.5 * np.abs(exact - target).sum() < 1e-6
    assert ddg_tau(share2, n) < 1e-6
    # empirically: the observed sum against N_Z(0, n * share2)
    assert total_variation(total, xs, target) < 0.02
    assert chi2_pvalue(total, xs, target) > 1e-3


# --- encode / decode -----------------------------------------------------------------------


def run_round(inputs, *, n_noise_shares, sigma_total, gamma, clip_l2=1.0, bits=32, seed=31):
    g = gen(seed)
    total = None
    for x in inputs:
        enc = ddg_encode(
            x,
            clip_l2=clip_l2,
            gamma=gamma,
            beta=BETA,
            n_noise_shares=n_noise_shares,
            sigma_total=sigma_total,
            bits=bits,
            generator=g,
            n_parties=len(inputs),
        )
        assert enc.dtype == (np.uint32 if bits == 32 else np.uint64)
        total = enc if total is None else total + enc  # wraps modulo 2^bits, like the masked sum
    return ddg_decode(total, gamma=gamma, bits=bits)


@pytest.mark.parametrize("bits", [32, 64])
def test_encode_sum_decode_recovers_clipped_sum(bits):
    n, d, gamma, sigma_total = 5, 2000, 1e-4, 1e-2
    rng = gen(32)
    inputs = [rng.normal(size=d) * 3.0 / math.sqrt(d) * (1 + i) for i in range(n)]  # norms 3..15: all clipped
    clipped = [x / np.linalg.norm(x) for x in inputs]
    decoded = run_round(inputs, n_noise_shares=3, sigma_total=sigma_total, gamma=gamma, bits=bits)
    err = decoded - np.sum(clipped, axis=0)
    # 5 parties each add a share sized for 3 honest ones: the sum has variance (5/3) sigma_total^2,
    # plus the rounding error (variance <= gamma^2 / 4 per party and coordinate)
    expected_std = math.sqrt(sigma_total**2 * n / 3 + n * gamma**2 / 4)
    assert err.std() == pytest.approx(expected_std, rel=0.1)
    assert abs(err.mean()) < 5 * expected_std / math.sqrt(d)
    assert np.max(np.abs(err)) < 6 * expected_std


def test_encode_respects_norm_bound_and_validates():
    d, gamma = 64, 0.05
    x = np.full(d, 10.0)
    tiny_noise = 1e-9  # a noise parameter so small that the draws are all zero
    dec = ddg_decode(
        ddg_encode(x, clip_l2=1.0, gamma=gamma, beta=BETA, n_noise_shares=1, sigma_total=tiny_noise, generator=gen(4)),
        gamma=gamma,
    )
    assert np.linalg.norm(dec) <= ddg_norm_bound(clip_l2=1.0, gamma=gamma, beta=BETA, d=d) * gamma + 1e-12
    assert np.linalg.norm(dec) <= 1.0 + math.sqrt(d) * gamma  # the re-clip bound C + sqrt(d) * gamma
    with pytest.raises(ProtocolError, match="generator"):
        ddg_encode(x, clip_l2=1, gamma=gamma, beta=BETA, n_noise_shares=1, sigma_total=1, generator=None)
    with pytest.raises(UpdateError):
        ddg_encode(
            np.array([np.nan]), clip_l2=1, gamma=gamma, beta=BETA, n_noise_shares=1, sigma_total=1, generator=gen(1)
        )
    with pytest.raises(ProtocolError, match="beta"):
        ddg_encode(x, clip_l2=1, gamma=gamma, beta=1.0, n_noise_shares=1, sigma_total=1, generator=gen(1))
    with pytest.raises(ProtocolError):
        ddg_encode(x, clip_l2=1, gamma=gamma, beta=BETA, n_noise_shares=0, sigma_total=1, generator=gen(1))
    with pytest.raises(ProtocolError):
        ddg_decode(np.zeros(3, dtype=np.int32), gamma=gamma, bits=32)


def test_norm_bound_formula():
    c, gamma, d = 1.0, 0.01, 100
    plain = ddg_norm_bound(clip_l2=c, gamma=gamma, beta=0.0, d=d)
    assert plain == pytest.approx(c / gamma + math.sqrt(d))
    conditional = ddg_norm_bound(clip_l2=c, gamma=gamma, beta=BETA, d=d)
    assert conditional == pytest.approx(math.sqrt(100**2 + d / 4 + 1.0 * (100 + 5)))
    assert conditional < plain


# --- accounting ----------------------------------------------------------------------------


def test_rho_decreases_with_noise_and_matches_gaussian_when_tau_negligible():
    kw = {"clip_l2": 1.0, "gamma": 1e-3, "beta": BETA, "d": 1000, "n_honest": 3}
    rhos = [ddg_zcdp(sigma_total=s, **kw).rho for s in (0.5, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in itertools.pairwise(rhos))
    ev = ddg_zcdp(sigma_total=1.0, **kw)
    assert isinstance(ev, ZCDPMechanism) and ev.releases == 1
    delta2 = ddg_norm_bound(clip_l2=1.0, gamma=1e-3, beta=BETA, d=1000) * 1e-3  # real units
    assert ddg_tau((1.0 / 1e-3) ** 2 / 3, 3) == 0.0
    assert ev.rho == pytest.approx(delta2**2 / 2.0, rel=1e-12)
    eps = [compute_epsilon([ddg_zcdp(sigma_total=s, **kw)], delta=1e-5, accountant="rdp").epsilon for s in (1.0, 2.0)]
    assert eps[0] > eps[1] > 0


def test_rho_pays_tau_when_shares_are_small():
    # gamma = 1 and small sigma: each share is a narrow discrete Gaussian and tau matters
    kw = {"clip_l2": 2.0, "gamma": 1.0, "beta": 0.0, "d": 10, "sigma_total": 1.0, "n_honest": 4}
    ev = ddg_zcdp(**kw)
    delta2 = ddg_norm_bound(clip_l2=2.0, gamma=1.0, beta=0.0, d=10)
    tau = ddg_tau(1.0 / 4, 4)
    assert tau > 1e-3
    gaussian = delta2**2 / 2.0
    assert gaussian < ev.rho <= gaussian + tau * 10 + 1e-12
    # one honest share: no tau, exactly the discrete Gaussian's rho (CKS20)
    assert ddg_zcdp(**{**kw, "n_honest": 1}).rho == pytest.approx(gaussian)
    assert ddg_zcdp(**kw, releases=3).releases == 3


# --- wrap-around and refusal ---------------------------------------------------------------


def test_wraparound_bound_small_for_reasonable_parameters():
    d, n, gamma, sigma_total = 100_000, 10, 1e-5, 0.05
    bound = ddg_norm_bound(clip_l2=1.0, gamma=gamma, beta=BETA, d=d)
    share = sigma_total / gamma / math.sqrt(n)
    p = check_wraparound(d=d, n=n, max_abs_per_party=math.floor(bound), sigma_share=share, bits=32)
    assert p <= 1e-9
    assert wraparound_probability(d=d, n=n, max_abs_per_party=0, sigma_share=share, bits=32) <= p


def test_wraparound_check_raises_when_the_modulus_is_too_small():
    # each party alone may reach 1e9 in integer units: 10 of them overflow 2^31 but not 2^63
    args = {"d": 1000, "n": 10, "max_abs_per_party": 1e9, "sigma_share": 100.0}
    assert wraparound_probability(**args, bits=32) == 1.0
    with pytest.raises(ProtocolError, match="wrap-around"):
        check_wraparound(**args, bits=32)
    assert check_wraparound(**args, bits=64) <= 1e-9
    # headroom exists, but the noise is too wide for it
    with pytest.raises(ProtocolError, match="wrap-around"):
        check_wraparound(d=1000, n=10, max_abs_per_party=1000, sigma_share=2.0**31 / 20, bits=32)
    # ddg_encode runs the same check when told how many parties are summed
    with pytest.raises(ProtocolError, match="wrap-around"):
        ddg_encode(np.ones(8), clip_l2=1.0, gamma=1e-9, beta=BETA, n_noise_shares=3, sigma_total=1e-6,
                   generator=gen(5), n_parties=10)


def test_wraparound_never_happens_in_simulation():
    """Parameters that just pass the check at 1e-9, worst-case inputs: the sum never wraps.

    Every party puts its whole clipped norm on coordinate 0, so that coordinate sums to about
    90 % of 2^31 in integer units and the noise is as wide as the remaining headroom allows.
    """
    n, d, clip = 4, 256, 1.0
    gamma = n * clip / (0.9 * 2.0**31)
    max_abs = math.floor(ddg_norm_bound(clip_l2=clip, gamma=gamma, beta=BETA, d=d))
    headroom = 2.0**31 - n * max_abs
    share = headroom / math.sqrt(2 * n * math.log(2 * d / 1e-9)) * 0.99  # just inside the bound
    assert 1e-10 < check_wraparound(d=d, n=n, max_abs_per_party=max_abs, sigma_share=share, bits=32) <= 1e-9
    sigma_total = share * gamma * math.sqrt(n)
    with pytest.raises(ProtocolError, match="wrap-around"):
        check_wraparound(d=d, n=n, max_abs_per_party=max_abs, sigma_share=share * 1.1, bits=32)
    x = np.zeros(d)
    x[0] = clip
    g = gen(41)
    for _ in range(25):
        decoded = run_round([x] * n, n_noise_shares=n, sigma_total=sigma_total, gamma=gamma,
                            seed=int(g.integers(1 << 30)))
        err = decoded - n * x
        assert np.max(np.abs(err)) < 7 * sigma_total  # a wrap would be off by 2^32 * gamma = 8.9
        assert decoded[0] > 0


def test_dropouts_below_declared_minimum_refuse():
    assert check_honest_minimum(5, 4, 1) == 3
    assert check_honest_minimum(4, 4, 1) == 3
    with pytest.raises(ProtocolError, match="refusing"):
        check_honest_minimum(3, 4, 1)
    with pytest.raises(ProtocolError, match="no honest share"):
        check_honest_minimum(5, 2, 2)
    with pytest.raises(ProtocolError):
        check_honest_minimum(-1, 4, 1)
