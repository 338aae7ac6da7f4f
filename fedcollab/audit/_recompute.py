"""Recompute each partner's epsilon from a ``summary.json`` (sigma, q, T) with the same accountant."""

from __future__ import annotations

from typing import Any

from fedcollab.privacy.accounting import GaussianMechanism, PoissonSubsampledGaussian, compute_epsilon


def recompute_summary_epsilons(summary: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """``{partner: {"claimed", "recomputed", "target"}}`` for every record-level guarantee.

    Partner-level guarantees (distributed or central DP) are checked from the ledger's recorded
    events by ``fedcollab audit verify``; the summary alone does not carry every DDG parameter.
    """
    out: dict[str, dict[str, float | None]] = {}
    for g in summary["privacy"]["guarantees"]:
        if g["unit"] != "record":
            continue
        for name, p in g["partners"].items():
            mechs: list[Any] = []
            if p.get("statistics_noise_multiplier"):
                mechs.append(GaussianMechanism(noise_multiplier=p["statistics_noise_multiplier"], releases=1))
            if p["steps"]:
                mechs.append(PoissonSubsampledGaussian(noise_multiplier=p["noise_multiplier"], sample_rate=p["sample_rate"], steps=p["steps"]))
            eps = compute_epsilon(mechs, delta=g["delta"], accountant=g["accountant"]).epsilon if mechs else 0.0
            out[name] = {"claimed": p["epsilon"], "recomputed": eps, "target": p["target_epsilon"]}
    return out
