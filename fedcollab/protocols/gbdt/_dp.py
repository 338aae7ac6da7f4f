"""Record-level DP for federated GBDT: clipping, Gaussian noise, the calibrated plan, the release events.

Adjacency: add/remove one training record at one partner (unit ``record``); the observer is the
coordinator (it sees each partner's noisy histograms under ``plain``, their sum under ``secagg``).

* Clipping: ``g`` to ``[-grad_clip, grad_clip]``, ``h`` to ``[0, hess_clip]``. For logistic loss
  ``g = p - y`` and ``h = p (1 - p)`` already satisfy ``|g| <= 1``, ``0 <= h <= 1/4`` (the defaults).
* A split-histogram release of one level: the record is in at most one open node and, for each of
  the ``d`` features, in exactly one slot (a value bin or the missing bin). Adding or removing it
  changes ``d`` gradient cells by at most ``grad_clip`` and ``d`` hessian cells by at most
  ``hess_clip``: L2 sensitivity ``sqrt(d (grad_clip^2 + hess_clip^2))``.
* A leaf release of one tree: the record is in exactly one leaf: ``sqrt(grad_clip^2 + hess_clip^2)``.
* The other records' ``g, h`` depend on the record only through earlier noisy releases (the model
  so far), so the releases compose adaptively (Dwork, Rothblum & Vadhan 2010).

Plan: ``n_trees`` leaf releases with noise multiplier ``z_leaf`` and, with ``dp_split =
"histogram"``, ``n_trees x max_depth`` split releases with ``z_split``. Since Gaussian
mechanisms compose as one Gaussian with ``1/z^2 = sum 1/z_i^2`` (Dong, Roth & Su 2019, Cor. 3.3),
one Gaussian ``z`` is calibrated to the target by the accounting core and its precision ``1/z^2``
is divided: ``dp_leaf_share`` to the leaves, the rest to the split levels. The plan is then
re-checked with :func:`compute_epsilon` over exactly the events the nodes record, and every z is
raised until the accountant's epsilon is within the target. With ``dp_split = "random"`` splits
are drawn by the coordinator from the public bins (no data, no cost) and the whole budget goes to
the leaves (Maddock et al., CCS 2022: random splits with noisy leaves are strong at epsilon = 1).

With ``bin_edges = "quantile"`` one more release comes first, the count sketch of the bin edges
(:mod:`fedcollab.protocols.gbdt._sketch`): ``k`` number features, L2 sensitivity ``sqrt(k)``,
``dp_sketch_share`` of the precision; the trees share the rest as above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import (
    AccountantName,
    GaussianMechanism,
    NonPrivate,
    Release,
    calibrate_noise_multiplier,
    compute_epsilon,
)
from fedcollab.spec import TreeParams

ReleaseKind = Literal["histogram", "leaves"]


def sketch_release(plan: GbdtDpPlan | None, *, party: str) -> Release:
    """The ledger event of a node's count sketch (the run's first step with ``bin_edges = "quantile"``)."""
    details: dict[str, float | int | str | bool] = {"tree": 0, "level": 0, "release": "sketch"}
    if plan is None:
        mech: GaussianMechanism | NonPrivate = NonPrivate()
    else:
        if not plan.sketch_features or plan.z_sketch is None:
            raise PrivacyError("the DP plan has no sketch release (bin_edges = 'public'): a sketch request is refused.")
        mech = GaussianMechanism(noise_multiplier=plan.z_sketch, releases=1)
        details |= {"sensitivity": plan.sensitivity_sketch, "sigma": plan.sigma_sketch}
    return Release(kind="gbdt_histogram", about="train", unit="record", observer="coordinator", added_by=party, party=party,
                   round=0, mechanism=mech, details=details)


@dataclass(frozen=True)
class GbdtDpPlan:
    """The noise of every release of the whole model, derived from public parameters only."""

    n_trees: int
    split_levels: int  # noisy split-histogram levels per tree (0: random splits)
    n_features: int
    grad_clip: float
    hess_clip: float
    z_split: float | None
    z_leaf: float
    target_epsilon: float
    delta: float
    accountant: AccountantName
    epsilon: float  # what the accountant says for the whole plan
    sketch_features: int = 0  # bin_edges = "quantile": number features in the sketch (0: public edges, no sketch)
    z_sketch: float | None = None

    @property
    def sensitivity_split(self) -> float:
        """L2 sensitivity of one level's histograms (all open nodes and features)."""
        return math.sqrt(self.n_features * (self.grad_clip**2 + self.hess_clip**2))

    @property
    def sensitivity_leaf(self) -> float:
        """L2 sensitivity of one tree's leaf sums."""
        return math.sqrt(self.grad_clip**2 + self.hess_clip**2)

    @property
    def sigma_split(self) -> float:
        """Noise std of every split-histogram cell (0 without split releases)."""
        return (self.z_split or 0.0) * self.sensitivity_split

    @property
    def sigma_leaf(self) -> float:
        """Noise std of every leaf-sum cell."""
        return self.z_leaf * self.sensitivity_leaf

    @property
    def sensitivity_sketch(self) -> float:
        """L2 sensitivity of the count sketch: one count in each number feature."""
        return math.sqrt(self.sketch_features)

    @property
    def sigma_sketch(self) -> float:
        """Noise std of every sketch count (0 without a sketch)."""
        return (self.z_sketch or 0.0) * self.sensitivity_sketch

    def mechanisms(self) -> list[GaussianMechanism]:
        """The whole model's mechanisms, as the accountant composes them."""
        out = []
        if self.sketch_features:
            assert self.z_sketch is not None
            out.append(GaussianMechanism(noise_multiplier=self.z_sketch, releases=1))
        if self.split_levels:
            assert self.z_split is not None
            out.append(GaussianMechanism(noise_multiplier=self.z_split, releases=self.n_trees * self.split_levels))
        out.append(GaussianMechanism(noise_multiplier=self.z_leaf, releases=self.n_trees))
        return out


def plan_gbdt_dp(params: TreeParams, *, n_features: int, target_epsilon: float, delta: float, accountant: AccountantName = "rdp",
                 sketch_features: int = 0) -> GbdtDpPlan:
    """Calibrate the noise of every release so the whole model is (target_epsilon, delta)-DP per record.

    ``sketch_features``: the number features of the quantile sketch (``bin_edges = "quantile"``); 0 without one.
    """
    if isinstance(n_features, bool) or not isinstance(n_features, int) or n_features < 1:
        raise PrivacyError(f"`n_features` must be an int >= 1, got {n_features!r}.")
    if isinstance(sketch_features, bool) or not isinstance(sketch_features, int) or not 0 <= sketch_features <= n_features:
        raise PrivacyError(f"`sketch_features` must be an int in [0, n_features], got {sketch_features!r}.")
    t = params.n_trees
    levels = params.max_depth if params.dp_split == "histogram" else 0
    sketch = sketch_features if params.bin_edges == "quantile" else 0
    rest = 1.0 - params.dp_sketch_share if sketch else 1.0  # the trees' share of the precision
    if sketch and not 0 < params.dp_sketch_share < 1:
        raise PrivacyError(f"`dp_sketch_share` must be in (0, 1), got {params.dp_sketch_share!r}.")
    z_sketch = None
    if levels == 0 and not sketch:
        z_leaf = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=None, steps=t, accountant=accountant)
        z_split = None
    else:
        z = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=None, steps=1, accountant=accountant)
        if sketch:
            z_sketch = z / math.sqrt(params.dp_sketch_share)
        if levels == 0:
            z_leaf, z_split = z * math.sqrt(t / rest), None
        else:
            share = params.dp_leaf_share
            if not 0 < share < 1:
                raise PrivacyError(f"`dp_leaf_share` must be in (0, 1) with dp_split = 'histogram', got {share!r}.")
            z_leaf = z * math.sqrt(t / (share * rest))
            z_split = z * math.sqrt(t * levels / ((1.0 - share) * rest))

    def plan(zs: float | None, zl: float, zk: float | None, eps: float = math.nan) -> GbdtDpPlan:
        return GbdtDpPlan(n_trees=t, split_levels=levels, n_features=n_features, grad_clip=params.grad_clip, hess_clip=params.hess_clip,
                          z_split=zs, z_leaf=zl, target_epsilon=target_epsilon, delta=delta, accountant=accountant, epsilon=eps,
                          sketch_features=sketch, z_sketch=zk)

    # Never trust the division alone: the claim is what the accountant says about the recorded events.
    eps = compute_epsilon(plan(z_split, z_leaf, z_sketch).mechanisms(), delta=delta, accountant=accountant).epsilon
    while eps > target_epsilon:
        z_leaf *= 1.0001
        z_split = None if z_split is None else z_split * 1.0001
        z_sketch = None if z_sketch is None else z_sketch * 1.0001
        eps = compute_epsilon(plan(z_split, z_leaf, z_sketch).mechanisms(), delta=delta, accountant=accountant).epsilon
    return plan(z_split, z_leaf, z_sketch, eps)


def clip_gradients(g: np.ndarray, h: np.ndarray, *, grad_clip: float, hess_clip: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-record clipping: ``g`` to ``[-grad_clip, grad_clip]``, ``h`` to ``[0, hess_clip]``."""
    return np.clip(np.asarray(g, dtype=np.float64), -grad_clip, grad_clip), np.clip(np.asarray(h, dtype=np.float64), 0.0, hess_clip)


def add_noise(values: np.ndarray, *, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """``values`` plus i.i.d. Gaussian noise of std ``sigma`` from the explicit generator ``rng``."""
    if not isinstance(rng, np.random.Generator):
        raise PrivacyError(f"`rng` must be a numpy Generator (noise is never drawn from global state), got {type(rng).__name__}.")
    if not (math.isfinite(sigma) and sigma > 0):
        raise PrivacyError(f"`sigma` must be finite and > 0, got {sigma!r}.")
    arr = np.asarray(values, dtype=np.float64)
    return arr + rng.normal(0.0, sigma, size=arr.shape)


def release_event(plan: GbdtDpPlan | None, *, party: str, tree: int, level: int, release: ReleaseKind) -> Release:
    """The ledger event of one reply: a level's split histograms or a tree's leaf sums (unit record, observer coordinator).

    Without a plan (privacy.mode = "none") the release is non-private and must be allowed by the
    partner's policy; with a plan it is one Gaussian release at the plan's noise multiplier.
    """
    details: dict[str, float | int | str | bool] = {"tree": tree, "level": level, "release": release}
    if plan is None:
        mech: GaussianMechanism | NonPrivate = NonPrivate()
    elif release == "histogram":
        if plan.z_split is None:
            raise PrivacyError("the DP plan has no split-histogram releases (dp_split = 'random'): a histogram request is refused.")
        mech = GaussianMechanism(noise_multiplier=plan.z_split, releases=1)
        details |= {"sensitivity": plan.sensitivity_split, "sigma": plan.sigma_split}
    else:
        mech = GaussianMechanism(noise_multiplier=plan.z_leaf, releases=1)
        details |= {"sensitivity": plan.sensitivity_leaf, "sigma": plan.sigma_leaf}
    return Release(kind="gbdt_histogram", about="train", unit="record", observer="coordinator", added_by=party, party=party,
                   round=tree, mechanism=mech, details=details)


def tree_releases(plan: GbdtDpPlan | None, *, party: str, tree: int, split_levels: int) -> list[Release]:
    """Every release a node makes for one tree, in order: ``split_levels`` histogram levels, then the leaves."""
    out = [release_event(plan, party=party, tree=tree, level=lv, release="histogram") for lv in range(split_levels)]
    out.append(release_event(plan, party=party, tree=tree, level=split_levels, release="leaves"))
    return out
