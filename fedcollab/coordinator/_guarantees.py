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
from fedcollab.protocols.summary import Guarantee, NonPrivateRelease, PartnerGuarantee, Privacy
from fedcollab.spec import Spec

_NOTES = {
    "row_counts": "training and test row counts, declared public (FedAvg weights)",
    "statistics": "exact per-feature count, sum and sum of squares of the training split",
    "test_metrics": "counts, loss and score histograms on the partner's test split",
    "model_update": "model update trained without differential privacy",
    "gbdt_histogram": "per-bin gradient and hessian sums of the tree's open nodes, or its leaf sums, without differential privacy (round = tree)",
    "psi_intersection": "the intersection of the parties' record ids (size, and membership when revealed), declared (docs/vertical.md)",
    "vertical_histogram": "per-bin gradient and hessian sums over the passive party's bins, decrypted by the label holder, without DP",
    "vertical_partition": "which records go left at a split (or are open at a level): SecureBoost's instance space, declared",
    "vertical_gradient": "one party's gradient of the vertical logistic regression, computed from the other parties' data, without DP",
    "vertical_logit": "the passive party's partial logits of the rows scored jointly, declared",
}
_PARTNER_KINDS = {"distributed": ("coordinator", "ddg_update", "ddg"), "central": ("model_recipients", "central_dp_update", "gaussian")}


def privacy_section(spec: Spec, releases: Sequence[Release], n_train: dict[str, int]) -> Privacy:
    """Guarantees per (unit, observer) and the list of non-private releases."""
    non_private: dict[tuple[str, str, str, str, bool], list[int]] = defaultdict(list)
    mechs: dict[str, list[Any]] = defaultdict(list)
    details: dict[str, dict[str, Any]] = defaultdict(dict)
    stats_z: dict[str, float] = {}
    dp_test = False
    trees: dict[str, int] = defaultdict(int)  # gbdt: Gaussian releases (steps) per partner
    leaf_z: dict[str, float] = {}  # gbdt: the leaf sums' noise multiplier
    for r in releases:
        if isinstance(r.mechanism, NonPrivate):
            non_private[(r.party, r.kind, r.about, r.observer, r.declared_public)].append(r.round)
            continue
        if r.unit == "record" and r.observer == "coordinator" and r.added_by == r.party:
            mechs[r.party].append(r.mechanism)
            if isinstance(r.mechanism, PoissonSubsampledGaussian):
                details[r.party].update(r.details)
            if r.kind == "statistics" and isinstance(r.mechanism, GaussianMechanism):
                stats_z.setdefault(r.party, r.mechanism.noise_multiplier)
            if r.kind == "gbdt_histogram" and isinstance(r.mechanism, GaussianMechanism):
                trees[r.party] += 1
                if r.details.get("release") == "leaves":
                    leaf_z.setdefault(r.party, r.mechanism.noise_multiplier)
            if r.kind == "test_metrics":
                dp_test = True  # DP test metrics (policy test_metrics = "dp") are charged with the rest
    guarantees: list[Guarantee] = []
    if spec.privacy.record_dp:
        assert spec.privacy.delta is not None
        partners = {}
        for name in n_train:
            ms = merge_mechanisms(mechs.get(name, []))
            eps = compute_epsilon(ms, delta=spec.privacy.delta, accountant=spec.privacy.accountant).epsilon if ms else 0.0
            sgd = [m for m in ms if isinstance(m, PoissonSubsampledGaussian)]
            det = details.get(name, {})
            partners[name] = PartnerGuarantee(
                epsilon=eps if eps != float("inf") else None,
                target_epsilon=spec.privacy.target_epsilon,
                noise_multiplier=sgd[0].noise_multiplier if sgd else leaf_z.get(name),
                clip_norm=float(det["clip_norm"]) if "clip_norm" in det else None,
                sample_rate=sgd[0].sample_rate if sgd else None,
                expected_batch=float(det["expected_batch"]) if "expected_batch" in det else None,
                steps=sum(m.steps for m in sgd) if sgd or spec.model.kind != "gbdt" else trees.get(name, 0),
                n_train=n_train[name],
                statistics_noise_multiplier=stats_z.get(name),
            )
        kinds = ["gbdt_histogram" if spec.model.kind == "gbdt" else "dpsgd_training"] + (["statistics"] if spec.resolved_scaling == "dp_statistics" else []) + (["test_metrics"] if dp_test else [])
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
    if spec.privacy.partner_dp:
        guarantees.append(_partner_guarantee(spec, releases, n_train))
    npr = [
        NonPrivateRelease(party=p, kind=k, about=a, observer=o, rounds=sorted(set(rs)), declared_public=pub, note=_NOTES.get(k, k))
        for (p, k, a, o, pub), rs in sorted(non_private.items())
    ]
    return Privacy(mode=spec.privacy.mode, record_level=spec.privacy.record_dp and spec.privacy.partner_dp, guarantees=guarantees,
                   non_private_releases=npr)


def _partner_guarantee(spec: Spec, releases: Sequence[Release], n_train: dict[str, int]) -> Guarantee:
    """The partner-level guarantee: distributed (observer coordinator) or central (observer model recipients)."""
    pp = spec.privacy.partner
    assert pp is not None
    observer, kind, mech_name = _PARTNER_KINDS[spec.privacy.mode]
    partners = {}
    for name in n_train:
        mine = [r for r in releases if r.party == name and r.kind == kind and r.unit == "partner" and r.observer == observer]
        ms = merge_mechanisms([r.mechanism for r in mine])
        eps = compute_epsilon(ms, delta=pp.delta, accountant="rdp").epsilon if ms else 0.0
        det = mine[0].details if mine else {}
        std = det.get("noise_std_on_sum", det.get("sigma_total"))
        z = (float(std) / pp.clip) if std is not None else None
        partners[name] = PartnerGuarantee(
            epsilon=eps, target_epsilon=pp.epsilon, noise_multiplier=z, clip_norm=pp.clip, sample_rate=None, expected_batch=None,
            steps=0, n_train=n_train[name], mechanism=mech_name, rounds=len({r.round for r in mine}),
            noise_std_on_sum=float(std) if std is not None else None,
            min_participants=int(det["t_min"]) if "t_min" in det else None,
            colluders=int(det["colluders"]) if "colluders" in det else None,
            wraparound_bound=float(det["wraparound_bound"]) if "wraparound_bound" in det else None,
        )
    return Guarantee(unit="partner", observer=observer, accountant="rdp", accountant_version=accountant_version(), delta=pp.delta,
                     releases_included=[kind], partners=partners)
