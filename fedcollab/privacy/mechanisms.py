"""Clipping and noise on numpy arrays. Randomness is always passed in as a generator."""

from __future__ import annotations

import numpy as np

from fedcollab.core import PrivacyError


def clip_l2(x: np.ndarray, clip_norm: float) -> np.ndarray:
    """Scale ``x`` down to L2 norm ``clip_norm`` if larger. Zero and non-finite norms are guarded."""
    if not clip_norm > 0:
        raise PrivacyError(f"`clip_norm` must be > 0, got {clip_norm!r}.")
    norm = float(np.linalg.norm(x))
    if not np.isfinite(norm):
        raise PrivacyError("cannot clip a vector with a non-finite norm")
    if norm <= clip_norm or norm == 0.0:
        return x.copy()
    return x * (clip_norm / norm)


def gaussian_noise(shape: tuple[int, ...], *, std: float, generator: np.random.Generator) -> np.ndarray:
    """Gaussian noise of standard deviation ``std`` drawn from ``generator``."""
    if not (std > 0 and np.isfinite(std)):
        raise PrivacyError(f"`std` must be a finite number > 0, got {std!r}.")
    if not isinstance(generator, np.random.Generator):
        raise PrivacyError("`generator` must be a numpy Generator (randomness is passed in, never global).")
    return generator.normal(0.0, std, size=shape)


def fresh_generator() -> np.random.Generator:
    """A numpy generator seeded from 256 bits of OS entropy."""
    import secrets

    return np.random.default_rng(secrets.randbits(256))
