"""Statistics round and pooled evaluation, as plain functions."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import ProtocolError
from fedcollab.data import exact_statistics, feature_bounds, load_partner_data
from fedcollab.protocols.evaluation import auc_from_histograms, pooled_metrics, score_histograms
from fedcollab.protocols.statistics import combine_statistics, dp_statistics, statistics_sensitivity


class TestStatisticsRound:
    def test_exact_round_equals_pandas_on_pooled_data(self, heart_spec):
        """Global mean and std from per-silo sums equal those of the pooled training rows."""
        import pandas as pd

        parts = [load_partner_data(heart_spec, p.name) for p in heart_spec.partners]
        scaling = combine_statistics([exact_statistics(d.x_train) for d in parts])
        pooled = pd.DataFrame(np.vstack([d.x_train for d in parts]))
        np.testing.assert_allclose(scaling.mean, pooled.mean().to_numpy(), rtol=1e-10)
        np.testing.assert_allclose(scaling.std, pooled.std(ddof=0).to_numpy(), rtol=1e-8)

    def test_dp_statistics_noise_scale(self, heart_spec):
        """DP sums carry noise of std z * sqrt(2d) in the normalised space."""
        d = load_partner_data(heart_spec, "cleveland")
        b = feature_bounds(heart_spec.data_schema)
        draws = np.array([dp_statistics(d.x_train, b, noise_multiplier=2.0, generator=np.random.default_rng(i))["sum"] for i in range(400)])
        expected = 2.0 * statistics_sensitivity(d.x_train.shape[1])
        assert draws.std(axis=0).mean() == pytest.approx(expected, rel=0.1)

    def test_dp_scaling_close_with_little_noise(self, heart_spec):
        parts = [load_partner_data(heart_spec, p.name) for p in heart_spec.partners]
        b = feature_bounds(heart_spec.data_schema)
        rng = np.random.default_rng(0)
        exact = combine_statistics([exact_statistics(d.x_train) for d in parts])
        noisy = combine_statistics([dp_statistics(d.x_train, b, noise_multiplier=1e-6, generator=rng) for d in parts], bounds=b)
        np.testing.assert_allclose(noisy.mean, exact.mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(noisy.std, exact.std, rtol=1e-3)

    def test_malformed_statistics(self):
        with pytest.raises(ProtocolError):
            combine_statistics([{"count": [1.0], "sum": [1.0, 2.0], "sumsq": [1.0]}])
        with pytest.raises(ProtocolError):
            combine_statistics([{"count": [1.0], "sum": [float("nan")], "sumsq": [1.0]}])


class TestPooledMetrics:
    def test_auc_matches_sklearn(self):
        """AUC from per-partner histograms (2000 bins) matches sklearn on the pooled scores."""
        from sklearn.metrics import roc_auc_score

        rng = np.random.default_rng(3)
        parts, ys, ps = [], [], []
        for n in (100, 80, 20):
            y = (rng.random(n) < 0.5).astype(float)
            p = 1 / (1 + np.exp(-(2 * y - 1 + rng.normal(0, 1.2, n))))
            pos, neg = score_histograms(p, y)
            parts.append({"n": n, "correct": float(((p >= 0.5) == y).sum()), "loss_sum": 0.0, "hist_pos": pos, "hist_neg": neg})
            ys.append(y)
            ps.append(p)
        m = pooled_metrics(parts)
        assert m.auc == pytest.approx(roc_auc_score(np.concatenate(ys), np.concatenate(ps)), abs=2e-3)
        assert m.accuracy == pytest.approx(np.mean(np.concatenate([(p >= 0.5) == y for p, y in zip(ps, ys)])))
        assert m.n == 200

    def test_auc_undefined_with_one_class(self):
        assert auc_from_histograms(np.array([3, 0]), np.array([0, 0])) is None
