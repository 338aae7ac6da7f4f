"""Clipping and noise primitives."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import PrivacyError
from fedcollab.privacy.mechanisms import clip_l2, gaussian_noise


class TestClip:
    def test_zero_vector_survives(self):
        """A zero update is returned unchanged (no division by zero)."""
        assert np.array_equal(clip_l2(np.zeros(5), 1.0), np.zeros(5))

    def test_long_vector_scaled_to_norm(self):
        out = clip_l2(np.full(4, 10.0), 2.0)
        assert np.linalg.norm(out) == pytest.approx(2.0)

    def test_non_finite_refused(self):
        with pytest.raises(PrivacyError):
            clip_l2(np.array([np.nan, 1.0]), 1.0)


class TestNoise:
    def test_needs_generator(self):
        """Randomness is passed in; a global RNG is refused."""
        with pytest.raises(PrivacyError, match="generator"):
            gaussian_noise((3,), std=1.0, generator=np.random)  # type: ignore[arg-type]

    def test_std(self):
        x = gaussian_noise((20000,), std=3.0, generator=np.random.default_rng(1))
        assert x.std() == pytest.approx(3.0, rel=0.03)
