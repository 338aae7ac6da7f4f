"""Fixed-point encodings for HE: pre-weighted models with the weight slot, statistics in base-2^12 limbs."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import ProtocolError, UpdateError
from fedcollab.protocols.he import check_he_headroom, decode_statistics_limbs, decode_weighted, encode_statistics_limbs, encode_weighted, quantisation_bound

MAX_ABS = 8_380_416
SCALE = float(2**19)


class TestWeighted:
    def test_sum_decodes_to_the_weighted_mean_within_the_bound(self):
        """(Σ round(w x s)) / s is within n / (2 s) of Σ w x, and dividing by the weight slot gives the mean."""
        rng = np.random.default_rng(0)
        xs = [rng.normal(0, 2, 1000) for _ in range(5)]
        n = np.asarray([30.0, 120.0, 7.0, 55.0, 88.0])
        w = n / n.sum()
        total = np.sum([encode_weighted(x, weight=wi, clip=8.0, scale=SCALE, max_abs=MAX_ABS) for x, wi in zip(xs, w)], axis=0)
        exact = np.sum([wi * x for x, wi in zip(xs, w)], axis=0)
        assert np.abs(total[:-1] / SCALE - exact).max() <= quantisation_bound(n_parties=5, scale=SCALE)
        mean, weight = decode_weighted(total, scale=SCALE)
        assert weight == pytest.approx(1.0, abs=5 / SCALE)
        np.testing.assert_allclose(mean, exact / weight, atol=1e-5)

    def test_clip_and_weight_checks(self):
        out = encode_weighted(np.asarray([100.0, -100.0]), weight=1.0, clip=8.0, scale=SCALE, max_abs=MAX_ABS)
        assert list(out[:2]) == [8 * 2**19, -8 * 2**19]
        with pytest.raises(ProtocolError, match="`weight` must be in"):
            encode_weighted(np.zeros(3), weight=1.5, clip=8.0, scale=SCALE, max_abs=MAX_ABS)
        with pytest.raises(ProtocolError, match="`clip` must be a number"):
            encode_weighted(np.zeros(3), weight=0.5, clip=True, scale=SCALE, max_abs=MAX_ABS)
        with pytest.raises(UpdateError):
            encode_weighted(np.asarray([np.nan]), weight=0.5, clip=8.0, scale=SCALE, max_abs=MAX_ABS)
        with pytest.raises(ProtocolError, match="plaintext range"):
            encode_weighted(np.asarray([50.0]), weight=1.0, clip=100.0, scale=SCALE, max_abs=MAX_ABS)

    def test_headroom(self):
        check_he_headroom(clip=8.0, scale=SCALE, n_parties=100, max_abs=MAX_ABS)
        with pytest.raises(ProtocolError, match="he.clip \\* he.scale"):
            check_he_headroom(clip=16.0, scale=SCALE, n_parties=4, max_abs=MAX_ABS)

    def test_zero_weight_aggregate_refused(self):
        with pytest.raises(ProtocolError, match="weight must be > 0"):
            decode_weighted(np.asarray([5, 0]), scale=SCALE)


class TestStatisticsLimbs:
    def test_limb_sums_decode_exactly(self):
        """Negative and large values (up to 2^39) survive limb encoding and summing over parties."""
        rng = np.random.default_rng(1)
        parts = [{"count": [float(rng.integers(1, 1000))], "sum": rng.uniform(-2e8, 2e8, 4).tolist(), "sumsq": rng.uniform(0, 5e11, 4).tolist()}
                 for _ in range(7)]
        limbs = np.sum([encode_statistics_limbs(p) for p in parts], axis=0)
        assert np.abs(limbs).max() < MAX_ABS
        got = decode_statistics_limbs(limbs, n_features=4)
        for k in ("count", "sum", "sumsq"):
            np.testing.assert_allclose(got[k], np.sum([p[k] for p in parts], axis=0), atol=7 * 2.0**-12, rtol=0)

    def test_out_of_range_and_wrong_length_refused(self):
        with pytest.raises(ProtocolError, match="below"):
            encode_statistics_limbs({"count": [1.0], "sum": [2.0**41], "sumsq": [0.0]})
        with pytest.raises(ProtocolError, match="must be 15 limbs"):
            decode_statistics_limbs(np.zeros(10, dtype=np.int64), n_features=1)
