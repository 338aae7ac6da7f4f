"""AI-readiness profile as pure functions: the per-silo vector, its local noise, and the findings.

Each node releases one vector of counts about its own rows, with its own Gaussian noise
(local DP, observer: the coordinator), charged to its budget:

* core blocks (noise ``sigma_core``): ``rows``, ``usable_pos``, ``usable_neg`` (rows with every
  feature and the label present, by label) and ``zeros:F`` for every number feature whose
  bounds contain 0 (the ratios the findings read);
* other blocks (noise ``sigma_rest``): ``missing:COL`` for every schema column and ``hist:F``
  for every feature (bins over public bounds, or one per level).

One row adds at most 1 to one coordinate of each block, so with per-block std ``sigma_b`` the
release is a Gaussian mechanism of noise multiplier ``1 / sqrt(sum_b sigma_b^-2)`` (rescale each
coordinate by ``1 / sigma_b``: L2 sensitivity ``sqrt(sum_b sigma_b^-2)``, unit noise).
``CORE_SHARE`` of the zCDP budget goes to the core blocks, whose ratios (label balance, share
of zeros) need the least noise. Label balance is over usable rows, not the training split: the split of a
ratio split without stratification is a permutation of all rows, so one row can move many
others between train and test; usable rows change by at most one.

Cross-silo totals are sums of the per-silo noisy vectors: post-processing, at no extra cost.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import GaussianMechanism
from fedcollab.protocols.query import rho_for, smallest_scale
from fedcollab.spec import SchemaSpec

HIST_BINS = 10
CORE_SHARE = 0.7
CORE = ("rows", "usable_pos", "usable_neg")
#: Findings thresholds (noisy values; see docs/analytics.md).
ZERO_SHARE_FLAG = 0.8
LABEL_RATE_FLAG = 0.85
MISSING_SHARE_FLAG = 0.5
DRIFT_TV_FLAG = 0.4
MIN_USABLE_ROWS = 50


@dataclass(frozen=True)
class ProfileBlock:
    """One block of the profile vector."""

    name: str
    kind: str  # rows | usable_pos | usable_neg | missing | hist | zeros
    column: str | None
    width: int = 1
    lo: float = 0.0
    hi: float = 1.0
    levels: tuple[str, ...] = ()

    def edges(self) -> list[float]:  # noqa: D102
        return np.linspace(self.lo, self.hi, self.width + 1).tolist()


def _is_core(b: ProfileBlock) -> bool:
    return b.kind in CORE or b.kind == "zeros"


def profile_layout(schema: SchemaSpec) -> list[ProfileBlock]:
    """The profile blocks of ``schema`` (same at every node and the coordinator)."""
    blocks = [ProfileBlock(k, k, None) for k in CORE]
    blocks += [ProfileBlock(f"missing:{c.name}", "missing", c.name) for c in schema.columns]
    for f in schema.features:
        col = schema.column(f)
        if col.type == "number":
            assert col.bounds is not None
            lo, hi = float(col.bounds[0]), float(col.bounds[1])
            blocks.append(ProfileBlock(f"hist:{f}", "hist", f, HIST_BINS, lo, hi))
        elif col.type == "bool":
            blocks.append(ProfileBlock(f"hist:{f}", "hist", f, 2, levels=("false", "true")))
        else:
            levels = tuple(str(v) for v in col.levels or [])
            blocks.append(ProfileBlock(f"hist:{f}", "hist", f, len(levels), levels=levels))
    for f in schema.features:
        col = schema.column(f)
        if col.type == "number" and col.bounds is not None and col.bounds[0] <= 0 <= col.bounds[1]:
            blocks.append(ProfileBlock(f"zeros:{f}", "zeros", f))
    return blocks


@dataclass(frozen=True)
class ProfilePlan:
    """Noise of a profile release (the same at every node)."""

    epsilon: float
    delta: float
    sigma_core: float
    sigma_rest: float
    n_core: int
    n_rest: int

    @property
    def noise_multiplier(self) -> float:
        """The equivalent Gaussian noise multiplier (L2 sensitivity 1)."""
        return 1.0 / math.sqrt(self.n_core / self.sigma_core**2 + self.n_rest / self.sigma_rest**2)

    @property
    def mechanism(self) -> GaussianMechanism:  # noqa: D102
        return GaussianMechanism(noise_multiplier=self.noise_multiplier)

    def sigmas(self, blocks: list[ProfileBlock]) -> np.ndarray:
        """Noise std of every coordinate."""
        return np.concatenate([np.full(b.width, self.sigma_core if _is_core(b) else self.sigma_rest) for b in blocks])


def plan_profile(schema: SchemaSpec, *, epsilon: float, delta: float) -> ProfilePlan:
    """Calibrate the per-block noise to (epsilon, delta), checked with the RDP accountant."""
    blocks = profile_layout(schema)
    n_core = sum(1 for b in blocks if _is_core(b))
    n_rest = len(blocks) - n_core
    rho = rho_for(epsilon, delta)

    def plan(scale: float) -> ProfilePlan:
        return ProfilePlan(epsilon, delta, scale * math.sqrt(n_core / (2.0 * rho * CORE_SHARE)),
                           scale * math.sqrt(n_rest / (2.0 * rho * (1 - CORE_SHARE))), n_core, n_rest)

    return plan(smallest_scale(lambda x: plan(x).mechanism, 1.0, epsilon=epsilon, delta=delta))


def noisy_profile(counts: np.ndarray, plan: ProfilePlan, blocks: list[ProfileBlock], *, generator: np.random.Generator) -> np.ndarray:
    """The node's release: exact counts plus per-coordinate Gaussian noise from ``generator``."""
    from fedcollab.privacy.mechanisms import gaussian_noise

    c = np.asarray(counts, dtype=np.float64)
    sig = plan.sigmas(blocks)
    if c.shape != sig.shape:
        raise PrivacyError(f"profile vector of length {c.size}, expected {sig.size}")
    return c + gaussian_noise(c.shape, std=1.0, generator=generator) * sig


# --- coordinator side ---------------------------------------------------------------------------


@dataclass
class SiloProfile:
    """What one silo's noisy vector says."""

    name: str
    rows: float
    usable_pos: float
    usable_neg: float
    missing: dict[str, float]
    hists: dict[str, list[float]]
    zeros: dict[str, float]

    @property
    def usable(self) -> float:  # noqa: D102
        return max(self.usable_pos, 0.0) + max(self.usable_neg, 0.0)

    @property
    def positive_rate(self) -> float | None:  # noqa: D102
        return max(self.usable_pos, 0.0) / self.usable if self.usable > 0 else None


@dataclass
class Profile:
    """The cross-silo profile: per-silo figures, totals, drift, findings."""

    silos: list[SiloProfile]
    failed: dict[str, int]
    blocks: list[ProfileBlock]
    plan: ProfilePlan
    drift: dict[str, dict[str, float]] = field(default_factory=dict)  # feature -> silo -> TV distance
    findings: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "privacy": {"epsilon_per_silo": self.plan.epsilon, "delta": self.plan.delta, "sigma_core": self.plan.sigma_core,
                        "sigma_rest": self.plan.sigma_rest, "noise_multiplier": self.plan.noise_multiplier,
                        "unit": "record", "observer": "coordinator", "noise": "local Gaussian at each node"},
            "silos": [{"name": s.name, "rows": s.rows, "usable_rows": s.usable, "positive_rate": s.positive_rate, "missing": s.missing,
                       "zeros": s.zeros, "histograms": s.hists} for s in self.silos],
            "failed": self.failed,
            "drift": self.drift,
            "findings": self.findings,
        }


def decode_profile(name: str, vec: np.ndarray, blocks: list[ProfileBlock]) -> SiloProfile:
    """One silo's noisy vector, by block."""
    v = np.asarray(vec, dtype=np.float64)
    if v.shape != (sum(b.width for b in blocks),) or not np.isfinite(v).all():
        raise PrivacyError(f"profile of {name!r}: expected {sum(b.width for b in blocks)} finite numbers")
    out: dict[str, Any] = {"missing": {}, "hists": {}, "zeros": {}}
    o = 0
    core: dict[str, float] = {}
    for b in blocks:
        part = v[o:o + b.width]
        o += b.width
        if b.kind in CORE:
            core[b.kind] = float(part[0])
        elif b.kind == "missing":
            out["missing"][b.column] = float(part[0])
        elif b.kind == "hist":
            out["hists"][b.column] = [float(x) for x in part]
        else:
            out["zeros"][b.column] = float(part[0])
    return SiloProfile(name, core["rows"], core["usable_pos"], core["usable_neg"], out["missing"], out["hists"], out["zeros"])


def _tv(p: list[float], q: list[float]) -> float | None:
    a, b = np.clip(np.asarray(p), 0, None), np.clip(np.asarray(q), 0, None)
    if a.sum() <= 0 or b.sum() <= 0:
        return None
    return float(0.5 * np.abs(a / a.sum() - b / b.sum()).sum())


def build_profile(vectors: dict[str, np.ndarray], blocks: list[ProfileBlock], plan: ProfilePlan, *, failed: dict[str, int],
                  features: list[str]) -> Profile:
    """Decode every silo, compare each with the others, and list the findings."""
    silos = [decode_profile(n, v, blocks) for n, v in sorted(vectors.items())]
    prof = Profile(silos=silos, failed=dict(failed), blocks=blocks, plan=plan)
    add = prof.findings.append
    for name, code in sorted(failed.items()):
        add({"silo": name, "column": None, "level": "error", "code": code, "message": f"{name} did not profile its data (node code {code})"})
    for s in silos:
        if s.usable < MIN_USABLE_ROWS:
            add({"silo": s.name, "column": None, "level": "warning",
                 "message": f"{s.name}: about {s.usable:.0f} usable rows (noisy), fewer than {MIN_USABLE_ROWS}"})
        rate = s.positive_rate
        if rate is not None and (rate >= LABEL_RATE_FLAG or rate <= 1 - LABEL_RATE_FLAG):
            which = "positive" if rate >= LABEL_RATE_FLAG else "negative"
            add({"silo": s.name, "column": "label", "level": "warning",
                 "message": f"{s.name}: labels almost all {which} (noisy rate {rate:.2f}); its training labels are (nearly) one class"})
        for col, z in s.zeros.items():
            # Share of all rows (both counts carry the core noise): robust, if low for columns with missing values.
            if s.rows > 0 and z / s.rows >= ZERO_SHARE_FLAG:
                add({"silo": s.name, "column": col, "level": "warning",
                     "message": f"{s.name}: `{col}` is (almost) always 0 (noisy share {min(z / s.rows, 1.0):.2f}): likely a missing-value code"})
        for col, m in s.missing.items():
            if col in features and s.rows > 0 and m / s.rows >= MISSING_SHARE_FLAG:
                add({"silo": s.name, "column": col, "level": "warning",
                     "message": f"{s.name}: feature `{col}` is missing in about {min(m / s.rows, 1.0):.0%} of rows (noisy)"})
    for f in features:
        per: dict[str, float] = {}
        for s in silos:
            others = [o.hists[f] for o in silos if o is not s]
            if not others:
                continue
            tv = _tv(s.hists[f], list(np.sum(others, axis=0)))
            if tv is not None:
                per[s.name] = tv
                if tv >= DRIFT_TV_FLAG:
                    add({"silo": s.name, "column": f, "level": "info",
                         "message": f"{s.name}: `{f}` distribution differs from the other silos (total variation {tv:.2f})"})
        prof.drift[f] = per
    return prof


__all__ = ["HIST_BINS", "Profile", "ProfileBlock", "ProfilePlan", "SiloProfile", "build_profile", "decode_profile", "noisy_profile",
           "plan_profile", "profile_layout"]
