"""The DP-SGD plan a node derives from the spec and its own row count.

q = expected batch / N (expected batch = min(batch_size, N)); steps per epoch = floor(1 / q),
the number of Poisson batches Opacus's sampler draws; T = rounds x local epochs x steps per
epoch, counted as optimizer steps actually taken (an empty Poisson batch is a noise-only step).
sigma is calibrated once for the whole collaboration, composed after any DP statistics release.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedcollab.privacy.accounting import (
    GaussianMechanism,
    PoissonSubsampledGaussian,
    calibrate_noise_multiplier,
)
from fedcollab.protocols.statistics import statistics_sensitivity
from fedcollab.spec import Spec


@dataclass(frozen=True)
class DpPlan:
    """Everything a node needs to run and account DP-SGD."""

    n_train: int
    expected_batch: float
    sample_rate: float
    steps_per_epoch: int
    total_steps: int
    noise_multiplier: float
    clip_norm: float
    stats_noise_multiplier: float | None
    stats_sensitivity: float | None
    target_epsilon: float
    delta: float
    accountant: str

    def mechanisms(self, *, steps: int | None = None) -> list[GaussianMechanism | PoissonSubsampledGaussian]:
        """The mechanisms of the whole plan (or with ``steps`` DP-SGD steps)."""
        out: list[GaussianMechanism | PoissonSubsampledGaussian] = []
        if self.stats_noise_multiplier is not None:
            out.append(GaussianMechanism(noise_multiplier=self.stats_noise_multiplier, releases=1))
        out.append(
            PoissonSubsampledGaussian(
                noise_multiplier=self.noise_multiplier,
                sample_rate=self.sample_rate,
                steps=self.total_steps if steps is None else steps,
            )
        )
        return out


def plan_dp(spec: Spec, *, n_train: int, n_features: int) -> DpPlan:
    """Calibrate sigma (and the statistics noise) for ``n_train`` rows under the spec's target."""
    priv, train = spec.privacy, spec.training
    assert priv.record_dp and priv.target_epsilon is not None and priv.delta is not None
    expected_batch = float(min(train.batch_size, n_train))
    q = expected_batch / n_train
    steps_per_epoch = max(1, int(1.0 / q))
    total = train.rounds * train.local_epochs * steps_per_epoch
    prior: list[GaussianMechanism] = []
    stats_z = None
    sens = None
    if spec.resolved_scaling == "dp_statistics":
        stats_z = calibrate_noise_multiplier(
            target_epsilon=priv.target_epsilon * priv.preprocessing_epsilon_share,
            delta=priv.delta,
            sample_rate=None,
            steps=1,
            accountant=priv.accountant,
        )
        sens = statistics_sensitivity(n_features)
        prior = [GaussianMechanism(noise_multiplier=stats_z, releases=1)]
    sigma = calibrate_noise_multiplier(
        target_epsilon=priv.target_epsilon,
        delta=priv.delta,
        sample_rate=q,
        steps=total,
        accountant=priv.accountant,
        prior=prior,
    )
    return DpPlan(
        n_train=n_train,
        expected_batch=expected_batch,
        sample_rate=q,
        steps_per_epoch=steps_per_epoch,
        total_steps=total,
        noise_multiplier=sigma,
        clip_norm=priv.clip_norm,
        stats_noise_multiplier=stats_z,
        stats_sensitivity=sens,
        target_epsilon=priv.target_epsilon,
        delta=priv.delta,
        accountant=priv.accountant,
    )
