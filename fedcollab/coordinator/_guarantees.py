"""Turn the releases nodes reported into the summary's privacy section.

Epsilon is recomputed here by the accounting core from the recorded mechanisms (sigma, q, T),
never taken from a node's claim or from Opacus.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from fedcollab.privacy.accounting import (
    GaussianMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    Release,
    accountant_version,
    compute_epsilon,
    merge_mechanisms,
)
from fedcollab.protocols._summary import Guarantee, NonPrivateRelease, PartnerGuarantee, Privacy
from fedcollab.spec import Spec

_NOTES = {
    "row_counts": "training and test row counts, declared public (FedAvg weights)",
    "statistics": "exact per-feature count, sum and sum of squares of the training split",
    "test_metrics": "counts, loss and score histograms on the partner's test split",
    "model_update": "model update trained without differential privacy",
}


def privacy_section(spec: Spec, releases: Sequence[Release], n_train: dict[str, int]) -> Privacy:
    """Guarantees per (unit, observer) and the list of non-private releases."""
    non_private: dict[tuple[str, str, str, str, bool], list[int]] = defaultdict(list)
    mechs: dict[str, list[Any]] = defaultdict(list)
    details: dict[str, dict[str, Any]] = defaultdict(dict)
    for r in releases:
        if isinstance(r.mechanism, NonPrivate):
            non_private[(r.party, r.kind, r.about, r.observer, r.declared_public)].append(r.round)
            continue
        if r.unit == "record" and r.observer == "coordinator" and r.added_by == r.party:
            mechs[r.party].append(r.mechanism)
            if isinstance(r.mechanism, PoissonSubsampledGaussian):
                details[r.party].update(r.details)
    guarantees: list[Guarantee] = []
    if spec.privacy.mode == "record":
        assert spec.privacy.delta is not None
        partners = {}
        for name in n_train:
            ms = merge_mechanisms(mechs.get(name, []))
            eps = compute_epsilon(ms, delta=spec.privacy.delta, accountant=spec.privacy.accountant).epsilon if ms else 0.0
            sgd = [m for m in ms if isinstance(m, PoissonSubsampledGaussian)]
            stats = [m for m in ms if isinstance(m, GaussianMechanism)]
            det = details.get(name, {})
            partners[name] = PartnerGuarantee(
                epsilon=eps if eps != float("inf") else None,
                target_epsilon=spec.privacy.target_epsilon,
                noise_multiplier=sgd[0].noise_multiplier if sgd else None,
                clip_norm=float(det["clip_norm"]) if "clip_norm" in det else None,
                sample_rate=sgd[0].sample_rate if sgd else None,
                expected_batch=float(det["expected_batch"]) if "expected_batch" in det else None,
                steps=sum(m.steps for m in sgd),
                n_train=n_train[name],
                statistics_noise_multiplier=stats[0].noise_multiplier if stats else None,
            )
        kinds = ["dpsgd_training"] + (["statistics"] if spec.resolved_scaling == "dp_statistics" else [])
        guarantees.append(
            Guarantee(
                unit="record",
                observer="coordinator",
                accountant=spec.privacy.accountant,
                accountant_version=accountant_version(),
                delta=spec.privacy.delta,
                releases_included=kinds,
                partners=partners,
            )
        )
    npr = [
        NonPrivateRelease(party=p, kind=k, about=a, observer=o, rounds=sorted(set(rs)), declared_public=pub, note=_NOTES.get(k, k))
        for (p, k, a, o, pub), rs in sorted(non_private.items())
    ]
    return Privacy(mode=spec.privacy.mode, guarantees=guarantees, non_private_releases=npr)
