"""The node's Flower ClientApp.

Three requests, each answered only from the node's own data:

* ``query`` (setup): validate the data, declare row counts (public), release the statistics
  for global scaling (exact, DP-noised, or none), and calibrate DP-SGD once for the whole run;
* ``train``: local training from the global model; releases the update (DP-SGD or non-private);
* ``evaluate``: counts and score histograms on the test split (a release about test rows).

Every release is described by a :class:`~fedcollab.privacy.accounting.Release` sent with it.
Every message first passes the partner's mods (``fedcollab/node/_mods.py``): the error shell (a
closed code leaves, the exception text stays in this node's log), the policy check and the
run-order check; only then does the handler for its kind run.
"""

from __future__ import annotations

import json
from pathlib import Path
from dataclasses import asdict
from typing import Any

import numpy as np

from fedcollab.core import (
    BudgetExhausted,
    NodeCoded,
    NodeErrorCode,
    PolicyRefused,
    ProtocolError,
    UpdateError,
    get_logger,
    node_code_for,
    write_private,
)
from fedcollab.data import PartnerData, exact_statistics, feature_bounds, load_partner_data, prepare_frame
from fedcollab.models import build_model, model_arrays, set_model_arrays
from fedcollab.node._home import NodeHome, countersign_close
from fedcollab.node._mods import SECAGG_STATE, current, order_mod, policy_mod, shell_mod
from fedcollab.privacy.accounting import (
    GaussianMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    Release,
)
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols.dpsgd import DpPlan, plan_dp
from fedcollab.protocols.statistics import dp_statistics, Scaling
from fedcollab.protocols.wire import MessageKind, RecordKey
from fedcollab.spec import Spec

log = get_logger("node")

_DATA_CACHE: dict[tuple[str, str], PartnerData] = {}
_PLAN_CACHE: dict[tuple[str, str, int], DpPlan] = {}
_TEST_PLAN_CACHE: dict[tuple[str, str, str], float] = {}


def _num(x: float) -> str:
    """An epsilon for a person: three decimals, no trailing noise (2.0, 0.92, inf)."""
    return "inf" if x == float("inf") else repr(round(float(x), 3))


def _spec_key(spec: Spec) -> str:
    return spec.model_dump_json(by_alias=True) + spec.base_dir


def _frame_key(frame: Any) -> str:
    """A content fingerprint of a DataFrame (cache key: two runs with different frames never share data)."""
    import hashlib

    import pandas as pd

    h = hashlib.sha256(repr(list(frame.columns)).encode())
    h.update(pd.util.hash_pandas_object(frame, index=True).to_numpy().tobytes())
    return "|frame:" + h.hexdigest()


def refuse_over_budget(gate: Any, planned: list[Release], *, run_id: str, partner: str) -> None:
    """Refuse a run whose planned releases do not fit what is left of the node's budget (composed with its ledger).

    The preflight of every protocol, before anything is spent: ``BUDGET_EXHAUSTED``, the refusal
    recorded in the node's ledger, nothing else written. A unit without a budget passes only if
    every planned release of it is non-private (the policy decides on those one by one).
    """
    for (unit, _observer), (run, so_far, total, budget) in gate.would_spend_all(planned, run_id=run_id).items():
        if budget is None:
            if all(r.non_private for r in planned if r.unit == unit):
                continue  # unbudgeted data, non-private releases allowed by the policy
            reason = f"no budget for unit {unit}"
            text = f"plan needs a budget for dataset {gate.dataset} (unit {unit}) and the policy has none"
        elif total > budget["epsilon"] * (1 + 1e-9):
            left = max(0.0, budget["epsilon"] - so_far)
            reason = f"the run's plan needs epsilon {_num(run)} (unit {unit}), {_num(left)} left of {_num(budget['epsilon'])}"
            text = (f"plan needs {_num(run)}, {_num(left)} left of {_num(budget['epsilon'])} for dataset {gate.dataset}"
                    f"{'' if unit == 'record' else ' (unit ' + unit + ')'}; budgets carry over between runs through the node folders "
                    "(--nodes DIR, default OUT/nodes); delete a simulated partner's node folder to start afresh")
        else:
            continue
        gate.refuse_request(run_id=run_id, round=0, code=int(NodeErrorCode.BUDGET_EXHAUSTED), reason=reason)
        log.error("partner %s refused the run at setup: %s", partner, text)
        raise BudgetExhausted(text)


def _partner_name(spec: Spec, node_config: Any) -> str:
    if "partner" in node_config:
        name = str(node_config["partner"])
        if name not in {p.name for p in spec.partners}:
            raise _Coded(NodeErrorCode.UNKNOWN_PARTNER)
        return name
    if "partition-id" in node_config:
        idx = int(node_config["partition-id"])
        if 0 <= idx < len(spec.partners):
            return spec.partners[idx].name
    raise _Coded(NodeErrorCode.UNKNOWN_PARTNER)


_Coded = NodeCoded  # a refusal by code (fedcollab.core.NodeCoded); the short name is kept for the raise sites here
_code_for = node_code_for  # the one exception -> node code map (fedcollab.core), kept under its old name


class NodeRuntime:
    """The node's logic, independent of Flower records (so it is testable as plain functions)."""

    def __init__(self, spec: Spec, partner: str, *, home: NodeHome, run_id: str, plan_json: str | None = None,
                 frame: Any = None) -> None:
        self.spec = spec
        self.partner = partner
        self.run_id = run_id
        self.home = home
        # The dataset id selects the budget: node-local configuration (node.json), never the spec (issue 13, attack 5).
        self.dataset = home.dataset()
        self.gate = home.gate(partner, self.dataset)
        self.policy = self.gate.policy
        if self.policy.partner != partner:
            raise PolicyRefused("the node's policy belongs to another partner")
        entry = next((p for p in spec.partners if p.name == partner), None)
        if entry is not None and entry.dataset is not None and entry.dataset != self.dataset:
            self._refuse_coded(NodeErrorCode.DATASET_MISMATCH, "the spec names another dataset id for this partner than the node's",
                               log_text=f"the spec's dataset {entry.dataset!r} is not this node's dataset {self.dataset!r} (node.json)")
        # The split belongs to the node too: pinned per dataset on first use (issue 13, attack 2).
        local = self._with_pinned_split(spec, entry) if entry is not None else spec
        # ``frame``: the partner's rows as a DataFrame (simulation from Python), validated like a file.
        key = (_spec_key(local) + (_frame_key(frame) if frame is not None else ""), partner)
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = load_partner_data(local, partner) if frame is None else prepare_frame(
                frame, local, next(p for p in local.partners if p.name == partner), source=f"partner {partner!r} data (DataFrame)")
        self.data = _DATA_CACHE[key]
        self.dp = spec.privacy.record_dp
        if self.dp and plan_json:
            # The plan calibrated at setup, kept in the node's state (no second calibration).
            plan = DpPlan(**json.loads(plan_json))
            _PLAN_CACHE.setdefault((_spec_key(spec), partner, plan.n_train), plan)

    # --- what the node owns: dataset id and split -------------------------------------------
    def _refuse_coded(self, code: NodeErrorCode, reason: str, *, log_text: str | None = None, round: int = 0) -> None:
        """Record a refusal in the node's ledger, log the details locally, and raise its code."""
        self.gate.refuse_request(run_id=self.run_id, round=round, code=int(code), reason=reason)
        log.error("partner %s: %s", self.partner, log_text or reason)
        raise _Coded(code)

    def _with_pinned_split(self, spec: Spec, entry: Any) -> Spec:
        """``spec`` with this partner's split replaced by the one pinned in the node folder (pinned now if none).

        A spec whose split differs from the pinned one is refused (``SPLIT_CHANGED``). A spec that
        names no split seed (``split.seed`` unset, which would default to the spec's seed) uses the
        pinned seed: the spec's seed moves model initialisation and shuffling, not the test rows.
        """
        from fedcollab.spec import SplitSpec

        split = entry.split
        asked = {"test_fraction": split.test_fraction, "stratify": split.stratify, "column": split.column, "test_value": split.test_value,
                 "seed": split.seed if split.seed is not None else spec.seed}
        pinned = self.home.pinned_split(self.dataset)
        if pinned is None:
            self.home.pin_split(self.dataset, asked)
            pinned = asked
        else:
            changed = [k for k in ("test_fraction", "stratify", "column", "test_value") if pinned.get(k) != asked[k]]
            if split.seed is not None and pinned.get("seed") != split.seed:
                changed.append("seed")
            if changed:
                self._refuse_coded(NodeErrorCode.SPLIT_CHANGED, "the spec changes the split pinned for this dataset: " + ", ".join(changed),
                                   log_text=f"the spec's split of dataset {self.dataset!r} differs from the pinned one "
                                            f"({self.home.split_path}) in {', '.join(changed)}")
        try:
            eff = SplitSpec.model_validate({k: v for k, v in pinned.items() if v is not None})
        except ValueError:
            from fedcollab.core import ConfigError

            raise ConfigError(f"{self.home.split_path}: the pinned split of dataset {self.dataset!r} is not a valid split") from None
        if eff == split:
            return spec
        partners = [p.model_copy(update={"split": eff}) if p.name == entry.name else p for p in spec.partners]
        return spec.model_copy(update={"partners": partners}).with_base_dir(spec.base_dir)

    # --- privacy plan -------------------------------------------------------------------
    def plan(self) -> DpPlan | None:
        """The DP-SGD plan (calibrated once per spec, partner and row count)."""
        if not self.dp or self.spec.model.kind == "gbdt":
            return None  # gbdt: its own plan (fedcollab.protocols.gbdt.plan_of), no DP-SGD
        key = (_spec_key(self.spec), self.partner, self.data.n_train)
        if key not in _PLAN_CACHE:
            _PLAN_CACHE[key] = plan_dp(self.spec, n_train=self.data.n_train, n_features=len(self.data.feature_names))
        return _PLAN_CACHE[key]

    def evaluations_planned(self) -> int:
        """Evaluations the run asks for: every ``evaluate_every`` rounds and after the last."""
        t = self.spec.training
        if self.spec.model.kind == "gbdt":
            return 1  # the finished model, once
        return len({r for r in range(1, t.rounds + 1) if r % t.evaluate_every == 0} | {t.rounds})

    def test_metrics_plan(self) -> float | None:
        """Under ``test_metrics = "dp"``: the noise multiplier of one evaluation, else None.

        Calibrated by the accounting core so that the run's planned evaluations, composed, cost
        the policy's ``test_metrics_epsilon`` at the record budget's delta (record level, observer
        coordinator).
        """
        if self.policy.resolved_test_metrics != "dp":
            return None
        from fedcollab.privacy.accounting import calibrate_noise_multiplier

        budget = self.policy.budget(self.dataset, "record")
        delta = budget.delta if budget else 1e-5
        accountant = budget.accountant if budget else "rdp"
        key = (_spec_key(self.spec), self.partner, repr((self.policy.test_metrics_epsilon, delta, accountant)))
        if key not in _TEST_PLAN_CACHE:
            _TEST_PLAN_CACHE[key] = calibrate_noise_multiplier(target_epsilon=self.policy.test_metrics_epsilon, delta=delta, sample_rate=None,
                                                               steps=self.evaluations_planned(), accountant=accountant)  # type: ignore[arg-type]
        return _TEST_PLAN_CACHE[key]

    def planned_releases(self, scaling: str, resume_after: int = 0) -> list[Release]:
        """Every release the run's plan will make about this node's rows (for the preflight at setup).

        ``resume_after = k`` (a resumed run): the rounds after ``k`` only, the earlier ones being in
        the ledger already. The claim only narrows this early check; every release is still checked
        against the budget when it is made, whatever the coordinator said at setup.
        """
        spec, d = self.spec, self.data
        plan = self.plan()
        rounds = spec.training.rounds
        k = max(0, min(int(resume_after), rounds))
        left = range(k + 1, rounds + 1)  # the rounds this (possibly resumed) run still makes

        def rel(**kw: Any) -> Release:
            return Release(party=self.partner, added_by=self.partner, observer="coordinator", **kw)

        out: list[Release] = []
        if spec.model.kind == "gbdt":
            from fedcollab.protocols import gbdt

            out += gbdt.planned_releases(spec, self.partner, after_trees=int(resume_after))
            scaling = "none"  # trees release no statistics
        if scaling == "federated_statistics":
            out.append(rel(kind="statistics", about="train", unit="record", round=0, mechanism=NonPrivate()))
        elif scaling == "dp_statistics" and plan is not None and plan.stats_noise_multiplier is not None:
            out.append(rel(kind="statistics", about="train", unit="record", round=0,
                           mechanism=GaussianMechanism(noise_multiplier=plan.stats_noise_multiplier, releases=1)))
        if plan is not None and left:
            steps = plan.total_steps if k == 0 else spec.training.local_epochs * plan.steps_per_epoch * len(left)
            out.append(rel(kind="dpsgd_training", about="train", unit="record", round=k + 1,
                           mechanism=PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                                               steps=steps)))
        elif spec.privacy.mode != "distributed" and spec.model.kind != "gbdt":
            out += [rel(kind="model_update", about="train", unit="record", round=r, mechanism=NonPrivate()) for r in left]
        if spec.privacy.mode == "distributed" and spec.privacy.partner is not None:
            from fedcollab.protocols.partner_dp import plan_distributed

            n_params = sum(v.size for v in model_arrays(build_model(spec.model, len(d.feature_names), seed=spec.seed)).values())
            mech = plan_distributed(spec, d=n_params).mechanism()
            out += [rel(kind="ddg_update", about="train", unit="partner", round=r, mechanism=mech) for r in left]
        z = self.test_metrics_plan()
        if z is not None:
            out += [rel(kind="test_metrics", about="test", unit="record", round=r, mechanism=GaussianMechanism(noise_multiplier=z, releases=1))
                    for r in range(1, self.evaluations_planned() + 1)]
        return out

    def preflight(self, scaling: str, resume_after: int = 0) -> None:
        """Check the whole run's planned spend against what is left of the budget, before anything is spent.

        Composed with the node's on-disk ledger (every earlier run); a plan that does not fit is
        refused with ``BUDGET_EXHAUSTED`` (recorded), a non-private plan the policy forbids with
        ``POLICY_REFUSED``. Nothing but the refusal is written.
        """
        planned = self.planned_releases(scaling, resume_after)
        if any(r.non_private and r.about == "train" for r in planned):
            if not self.policy.allow_non_private_training:
                reason = "policy forbids the non-private releases about training rows the plan makes"
                self.gate.refuse_request(run_id=self.run_id, round=0, code=int(NodeErrorCode.POLICY_REFUSED), reason=reason)
                raise PolicyRefused(reason)
        refuse_over_budget(self.gate, planned, run_id=self.run_id, partner=self.partner)

    def _release(self, payload: bytes, **kw: Any) -> str:
        """Check the release against the policy and budget, record it, and return its ledger line."""
        release = Release(party=self.partner, added_by=self.partner, **kw)
        return self.gate.record(release, run_id=self.run_id, payload=payload).decode()

    def check_policy(self) -> None:
        """Refuse (and record) a collaboration the partner's policy forbids."""
        spec, pol = self.spec, self.policy
        problems = []
        if spec.aggregation not in pol.allowed_aggregation:
            problems.append("aggregation mode")
        if spec.privacy.mode not in pol.allowed_privacy_modes:
            problems.append("privacy mode")
        if pol.allowed_features is not None and not set(spec.data_schema.features) <= set(pol.allowed_features):
            problems.append("feature columns")
        if spec.model.kind not in pol.allowed_model_kinds:
            problems.append("model kind")
        if (gbdt_trees(spec) if spec.model.kind == "gbdt" else spec.training.rounds) > pol.max_rounds:
            problems.append("number of rounds")
        min_partners = spec.training.min_partners or len(spec.partners)
        if min_partners < pol.min_partners_per_round:
            problems.append("minimum partners per round")
        if problems:
            reason = "policy forbids the " + ", ".join(problems)
            self.gate.refuse_request(run_id=self.run_id, round=0, code=int(NodeErrorCode.POLICY_REFUSED), reason=reason)
            raise PolicyRefused(reason)

    # --- setup ------------------------------------------------------------------------------
    def setup(self, scaling: str, *, resume_after: int = 0) -> tuple[dict[str, Any], dict[str, list[float]] | None, list[str]]:
        """Row counts, the statistics release (if any) and the DP plan."""
        d = self.data
        self.check_policy()
        if self.spec.model.kind == "gbdt":
            scaling = "none"  # trees need no scaling: no statistics leave, whatever the request says
        if self.dp:
            self.policy.warn_delta(self.dataset, d.n_train)
        self.preflight(scaling, resume_after)
        counts = {"n_train": d.n_train, "n_test": d.n_test}
        releases = [
            self._release(json.dumps(counts).encode(), kind="row_counts", about="train+test", unit="record", observer="coordinator", round=0,
                          mechanism=NonPrivate(), declared_public=True, details=counts)
        ]
        stats = None
        plan = self.plan()
        if scaling == "federated_statistics":
            if self.dp:
                raise _Coded(NodeErrorCode.POLICY_REFUSED)  # exact statistics are not private
            stats = exact_statistics(d.x_train)
            releases.append(self._release(json.dumps(stats).encode(), kind="statistics", about="train", unit="record", observer="coordinator", round=0,
                                          mechanism=NonPrivate(), details={"what": "count, sum, sum of squares per feature"}))
        elif scaling == "dp_statistics":
            if plan is None or plan.stats_noise_multiplier is None:
                raise _Coded(NodeErrorCode.BAD_REQUEST)
            stats = dp_statistics(d.x_train, feature_bounds(self.spec.data_schema), noise_multiplier=plan.stats_noise_multiplier,
                                  generator=fresh_generator())
            releases.append(self._release(json.dumps(stats).encode(), kind="statistics", about="train", unit="record", observer="coordinator", round=0,
                                          mechanism=GaussianMechanism(noise_multiplier=plan.stats_noise_multiplier, releases=1),
                                          details={"l2_sensitivity": plan.stats_sensitivity or 0.0, "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"}))
        info: dict[str, Any] = {"partner": self.partner, "n_train": d.n_train, "n_test": d.n_test, "n_features": len(d.feature_names)}
        if plan is not None:
            info["plan"] = json.dumps(asdict(plan))
        return info, stats, releases

    # --- close ------------------------------------------------------------------------------
    def countersign(self, close_line: bytes, coordinator_key: str) -> str:
        """Check the coordinator's close entry lists this node's chain head, then countersign it."""
        return countersign_close(self.gate.ledger, party=self.partner, run_id=self.run_id, close_line=close_line, coordinator_key=coordinator_key,
                                 partners=[p.name for p in self.spec.partners])

    # --- train ------------------------------------------------------------------------------
    def train(self, arrays: dict[str, np.ndarray], *, scaling: Scaling, server_round: int, steps_so_far: int,
              proximal_mu: float) -> tuple[dict[str, np.ndarray], dict[str, float], list[str], int]:
        """One round of local training; returns the update, metrics, releases and steps taken.

        Under distributed DP without DP-SGD the update never leaves in the clear (only noised and
        masked, recorded by :meth:`release_ddg`), so no record-level release is made here.
        """
        spec, d = self.spec, self.data
        model = build_model(spec.model, len(d.feature_names), seed=spec.seed)
        _check_arrays(arrays, model_arrays(model))
        set_model_arrays(model, arrays)
        plan = self.plan()
        if plan is not None:
            planned = spec.training.local_epochs * plan.steps_per_epoch
            if steps_so_far + planned > plan.total_steps:
                # Fail closed: this round would take the partner past the collaboration's target.
                raise BudgetExhausted("DP-SGD steps beyond the calibrated plan")
            would = Release(party=self.partner, added_by=self.partner, kind="dpsgd_training", about="train", unit="record",
                            observer="coordinator", round=server_round,
                            mechanism=PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=planned))
            _, total, budget = self.gate.would_spend(would, run_id=self.run_id)
            if budget is None or total > budget["epsilon"] * (1 + 1e-9):
                # Refuse before any work; record() would refuse the same release after training.
                self.gate.record(would, run_id=self.run_id, payload=b"")
        from fedcollab.node._training import train_model

        outcome = train_model(model, scaling.apply(d.x_train), d.y_train, training=spec.training, plan=plan,
                              proximal_mu=proximal_mu, shuffle_seed=spec.seed * 1000 + server_round)
        out = model_arrays(model)
        if not all(np.isfinite(v).all() for v in out.values()):
            raise UpdateError("non-finite update")
        metrics: dict[str, float] = {"num-examples": float(d.n_train)}
        if plan is None:
            mech: Any = NonPrivate()
            metrics["train_loss"] = outcome.mean_loss
            details: dict[str, Any] = {"steps": outcome.steps, "aggregation": spec.aggregation}
        else:
            mech = PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=outcome.steps)
            details = {"clip_norm": plan.clip_norm, "expected_batch": plan.expected_batch, "n_train": d.n_train, "aggregation": spec.aggregation,
                       "empty_batches": outcome.empty_batches, "noise_rng": "torch.Generator seeded from os.urandom (64 bits)"}
        if plan is None and spec.privacy.mode == "distributed":
            return out, metrics, [], outcome.steps
        payload = b"".join(np.ascontiguousarray(v).tobytes() for v in out.values())
        release = self._release(payload, kind="dpsgd_training" if plan else "model_update", about="train", unit="record",
                                observer="coordinator", round=server_round, mechanism=mech, details=details)
        return out, metrics, [release], outcome.steps

    # --- distributed DP -------------------------------------------------------------------------
    def check_participants(self, count: int, *, server_round: int, stage: str) -> None:
        """Refuse (and record) a distributed-DP round with fewer partners than the noise was sized for."""
        from fedcollab.protocols.ddg import check_honest_minimum

        pp = self.spec.privacy.partner
        assert pp is not None
        try:
            check_honest_minimum(count, self.spec.min_participants, pp.colluders)
        except ProtocolError:
            reason = f"{count} partners at the {stage} stage, fewer than t_min = {self.spec.min_participants}"
            self.gate.refuse_request(run_id=self.run_id, round=server_round, code=int(NodeErrorCode.TOO_FEW_PARTICIPANTS), reason=reason)
            raise _Coded(NodeErrorCode.TOO_FEW_PARTICIPANTS) from None

    def release_ddg(self, new: dict[str, np.ndarray], old: dict[str, np.ndarray], *, server_round: int, participants: int) -> tuple[np.ndarray, str]:
        """The clipped, rounded, noised update modulo 2^32 (a noise share sized for t_min - colluders), and its ledger line.

        Checked against the partner-level budget (unit partner, observer coordinator) before it exists outside this call.
        """
        from fedcollab.protocols.ddg import ddg_encode, ddg_generator
        from fedcollab.protocols.partner_dp import plan_distributed
        from fedcollab.protocols.quantize import flatten_arrays

        self.check_participants(participants, server_round=server_round, stage="masked-input")
        names = list(old)
        update = flatten_arrays(new, names) - flatten_arrays(old, names)
        plan = plan_distributed(self.spec, d=update.size)
        vector = ddg_encode(update, clip_l2=plan.clip, gamma=plan.gamma, beta=plan.beta, n_noise_shares=plan.n_honest,
                            sigma_total=plan.sigma_total, bits=plan.bits, generator=ddg_generator(), n_parties=plan.n_parties,
                            wrap_limit=self.spec.privacy.partner.wraparound_limit if self.spec.privacy.partner else 1e-9)
        details = {**plan.details(), "participants": participants, "threshold": self.spec.secagg.resolved_threshold(len(self.spec.partners))}
        line = self._release(vector.tobytes(), kind="ddg_update", about="train", unit="partner", observer="coordinator", round=server_round,
                             mechanism=plan.mechanism(), details=details)
        return vector, line

    # --- evaluate ---------------------------------------------------------------------------
    def evaluate(self, arrays: dict[str, np.ndarray], *, scaling: Scaling, server_round: int) -> tuple[dict[str, Any], list[str]]:
        """Counts and histograms on the test split, as the policy bounds them.

        Histograms have at most ``max_histogram_bins`` bins; under ``"dp"`` every count is noised
        (σ from :meth:`test_metrics_plan`) and the release is charged, at most the planned number
        of times a run. An evaluation the node refuses — ``test_metrics = "off"`` (code 132), a test
        split below ``min_test_rows`` (code 152), a DP evaluation beyond the plan or the budget
        (code 131) — is *withheld*: the reply is the constant zero record (n = 0, empty counts),
        and its only ledger line is the signed refusal with the code.

        Notes
        -----
        Withheld rather than raised: evaluation rides on other work (deployment fuses it into the
        next train message; under SecAgg+ it carries the next round's SHARE stage), which a
        refusal of the metrics alone must not take down. The zero record depends on no row.
        """
        spec, d, pol = self.spec, self.data, self.policy
        from fedcollab.protocols.evaluation import LOSS_BOUND, TEST_METRICS_SENSITIVITY, dp_test_metrics, histogram_bins

        bins = histogram_bins(pol.max_histogram_bins)
        mode = pol.resolved_test_metrics
        if mode == "off":
            return self._withheld(bins, NodeErrorCode.POLICY_REFUSED, "test metrics are off (policy test_metrics)", server_round)
        if d.n_test < pol.min_test_rows:
            log.error("partner %s: %d test rows of dataset %r, fewer than min_test_rows = %d; evaluation refused",
                      self.partner, d.n_test, self.dataset, pol.min_test_rows)
            return self._withheld(bins, NodeErrorCode.TEST_SPLIT_TOO_SMALL, f"the test split is smaller than min_test_rows = {pol.min_test_rows}",
                                  server_round)
        z = self.test_metrics_plan()
        if z is not None and self._test_releases_this_run() >= self.evaluations_planned():
            return self._withheld(bins, NodeErrorCode.BUDGET_EXHAUSTED, "more evaluations than the run's DP test-metrics plan", server_round)
        from fedcollab.node._training import evaluate_margin, evaluate_model

        if spec.model.kind == "gbdt":
            # ``arrays`` is the ensemble the coordinator sent (parsed against the node's layout).
            margin = arrays.predict_margin(d.x_test)  # type: ignore[attr-defined]

            def score(loss_bound: float | None = None) -> dict[str, Any]:
                return evaluate_margin(margin, d.y_test, bins=bins, loss_bound=loss_bound)
        else:
            model = build_model(spec.model, len(d.feature_names), seed=spec.seed)
            _check_arrays(arrays, model_arrays(model))
            set_model_arrays(model, arrays)

            def score(loss_bound: float | None = None) -> dict[str, Any]:
                return evaluate_model(model, scaling.apply(d.x_test), d.y_test, bins=bins, loss_bound=loss_bound)

        what = "count, correct, loss sum, score histograms"
        if z is None:
            res = score()
            mech: Any = NonPrivate()
            details: dict[str, Any] = {"what": what, "bins": bins}
        else:
            exact = score(LOSS_BOUND)
            res = dp_test_metrics(exact, noise_multiplier=z, generator=fresh_generator())
            mech = GaussianMechanism(noise_multiplier=z, releases=1)
            details = {"what": what, "bins": bins, "l2_sensitivity": TEST_METRICS_SENSITIVITY, "loss_bound": LOSS_BOUND,
                       "evaluations_planned": self.evaluations_planned(), "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"}
        try:
            release = self._release(json.dumps(res).encode(), kind="test_metrics", about="test", unit="record", observer="coordinator",
                                    round=server_round, mechanism=mech, details=details)
        except (PolicyRefused, BudgetExhausted):
            # The gate recorded its refusal (the ledger's last line); the metrics stay here.
            return _zero_metrics(bins), [self.gate.ledger.lines()[-1].raw.decode()]
        return res, [release]

    def _withheld(self, bins: int, code: NodeErrorCode, reason: str, server_round: int) -> tuple[dict[str, Any], list[str]]:
        line = self.gate.refuse_request(run_id=self.run_id, round=server_round, code=int(code), reason=reason)
        log.info("partner %s withheld test metrics of round %d: %s (%s)", self.partner, server_round, code.name, reason)
        return _zero_metrics(bins), [line.decode()]

    def _test_releases_this_run(self) -> int:
        n = 0
        for ln in self.gate.ledger.lines():
            e = ln.entry
            if (e.get("party") == self.partner and e.get("kind") == "release" and e.get("run_id") == self.run_id
                    and e["body"].get("dataset") == self.dataset and e["body"]["release"].get("kind") == "test_metrics"):
                n += 1
        return n


def gbdt_trees(spec: Spec) -> int:
    """Trees of a gbdt spec (its rounds, for the policy's max_rounds)."""
    from fedcollab.spec import tree_params

    return tree_params(spec).n_trees


def _zero_metrics(bins: int) -> dict[str, Any]:
    """The reply of a withheld evaluation: constant, about no row."""
    return {"n": 0, "correct": 0.0, "loss_sum": 0.0, "hist_pos": [0] * bins, "hist_neg": [0] * bins}


def _check_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    if set(got) != set(want):
        raise UpdateError("parameter names do not match the model")
    for k, v in got.items():
        if v.shape != want[k].shape:
            raise UpdateError("parameter shapes do not match the model")
        if not np.isfinite(v).all():
            raise UpdateError("non-finite parameters")


#: The message kinds of a statistics run (``fedcollab.node._analytics``); its SecAgg+ stages are
#: kind ``secagg`` after an ``analytics.query``, told apart by the node's own context state.
ANALYTICS_KINDS = ("analytics.check", "analytics.query", "analytics.profile", "analytics.close")


def make_client_app(spec: Spec, homes: dict[str, str], roster: dict[str, str], *, frames: dict[str, Any] | None = None,
                    statistics: bool = False) -> Any:
    """The Flower ClientApp of a node taking part in ``spec``: one app, every message routed by its kind.

    ``homes`` maps partner -> node folder; ``roster`` maps every party (the coordinator
    included) to its Ed25519 signing key (hex), as the partner obtained it out of band.
    ``frames`` (simulation from Python): partner -> pandas DataFrame used instead of the spec's source.

    A message goes to the adapter of its protocol, each behind the same shell mod (a failure
    leaves as its code and the node's new ledger entries, never text) and its own order rule:

    * a horizontal spec's training (setup, train, evaluate, their SecAgg+ and HE stages, close):
      the shell, the policy mod and the order mod (``fedcollab.node._mods``);
    * a vertical spec's runs (kind ``vertical``: PSI, SecureBoost, vertical LR; ``fedcollab.node._vertical``);
    * with ``statistics`` (``fedcollab query`` / ``profile``, simulation): the statistics kinds
      (:data:`ANALYTICS_KINDS` and the SecAgg+ stages of an open query; ``fedcollab.node._analytics``).
      Without it, as in deployment, a statistics message goes to the training adapter, which
      refuses it (``BAD_REQUEST``, recorded): a node answers only the protocols its run offers.
    """
    from flwr.app import ConfigRecord, Context, Message
    from flwr.clientapp import ClientApp

    if spec.layout == "vertical":
        from fedcollab.node._vertical import make_vertical_client_app

        main = make_vertical_client_app(spec, homes, roster)
    else:
        main = _training_app(spec, homes, roster, frames=frames)
    stats = None
    if statistics:
        from fedcollab.node._analytics import make_analytics_client_app

        stats = make_analytics_client_app(spec, homes, roster)

    def route(msg: Message, context: Context) -> Message:
        if stats is not None and msg.metadata.message_type.split(".")[0] == "query":
            kind = str(msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord()).get("fedcollab.kind", ""))
            if kind in ANALYTICS_KINDS or (kind == "secagg" and "analytics" in context.state.config_records):
                return stats(msg, context)  # type: ignore[no-any-return]
        return main(msg, context)  # type: ignore[no-any-return]

    app = ClientApp()
    app.query()(route)
    app.train()(route)
    app.evaluate()(route)
    return app


def _training_app(spec: Spec, homes: dict[str, str], roster: dict[str, str], *, frames: dict[str, Any] | None = None) -> Any:
    """The training adapter of :func:`make_client_app` (a horizontal spec): shell, policy and order mods, then the handlers."""
    frames = dict(frames or {})
    coordinator_key = roster["coordinator"]
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    if spec.aggregation == "he":
        from fedcollab.node._he import HeHandlers

        he: Any = HeHandlers(spec, homes, roster)  # server-blind rounds: fedcollab/node/_he.py
    else:
        he = None

    def scaling_of(cfg: ConfigRecord) -> Scaling:
        mean = np.asarray(cfg["scale_mean"], dtype=np.float64)
        std = np.asarray(cfg["scale_std"], dtype=np.float64)
        if mean.shape != std.shape or not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
            raise ProtocolError("invalid scaling")
        return Scaling(mean=mean, std=std, method=str(cfg["scale_method"]))

    def arrays_of(msg: Message) -> dict[str, np.ndarray]:
        rec = msg.content.array_records.get(RecordKey.ARRAYS)
        if rec is None:
            raise ProtocolError("no arrays")
        return {k: v.numpy() for k, v in rec.items()}

    def state(context: Context) -> ConfigRecord:
        if "fedcollab" not in context.state.config_records:
            context.state["fedcollab"] = ConfigRecord({"steps": 0})
        return context.state.config_records["fedcollab"]

    def lines_record(lines: list[str]) -> ConfigRecord:
        return ConfigRecord({"lines": json.dumps(lines)})

    def open_node(msg: Message, context: Context) -> NodeRuntime:
        """The node answering ``msg``: this app's own spec, the partner's folder, policy and ledger."""
        partner = _partner_name(spec, context.node_config)
        cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
        run_id = str(cfg.get("fedcollab.run_id", ""))
        if not run_id or partner not in homes:
            raise _Coded(NodeErrorCode.BAD_REQUEST)
        st = state(context)
        return NodeRuntime(spec, partner, home=NodeHome(Path(homes[partner])), run_id=run_id,
                           plan_json=str(st["plan"]) if "plan" in st else None, frame=frames.get(partner))

    # The partner's protections wrap every handler: shell (codes only) -> policy -> order (fedcollab/node/_mods.py).
    def partner_of(context: Context) -> str | None:
        try:
            name = _partner_name(spec, context.node_config)
        except NodeCoded:
            return None
        return name if name in homes else None

    app = ClientApp(mods=[shell_mod(open_node, _code_for, partner_of), policy_mod, order_mod])

    def handle(msg: Message, context: Context, work: Any) -> Message:
        """Run ``work(node, cfg, state, msg, context) -> RecordDict`` for the node the shell opened (after the policy and order mods)."""
        cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
        return Message(content=work(current(), cfg, state(context), msg, context), reply_to=msg)

    def do_query(node: NodeRuntime, cfg: ConfigRecord, st: ConfigRecord, msg: Message, context: Context) -> RecordDict:
        kind = str(cfg.get("fedcollab.kind", ""))
        if kind == "secagg":
            return piggyback(node, msg, cfg, context, RecordDict())
        if kind == "he":
            if he is None:
                raise _Coded(NodeErrorCode.POLICY_REFUSED)
            return he.query(node, cfg, st, msg)
        if kind == MessageKind.CLOSE:
            if spec.model.kind == "gbdt":
                from fedcollab.node._gbdt import drop_state

                drop_state(Path(homes[node.partner]), node.run_id)
            return RecordDict({RecordKey.RELEASES: lines_record([node.countersign(str(cfg["close"]).encode(), coordinator_key)])})
        if kind != MessageKind.SETUP or "setup_done" in st:
            # A second setup would be a second statistics release the plan did not charge.
            raise _Coded(NodeErrorCode.BAD_REQUEST)
        info, stats, lines = node.setup(str(cfg.get("scaling", "none")), resume_after=int(cfg.get("fedcollab.resume_after", 0)))
        st["setup_done"] = True
        if spec.model.kind == "gbdt":
            st["gbdt.resume_after"] = int(cfg.get("fedcollab.resume_after", 0))  # the trees the first step must bring back
        if he is not None:
            st["he.resume_after"] = int(cfg.get("fedcollab.resume_after", 0))  # a resumed run reloads the run's key (stage "rejoin")
        if "plan" in info:
            st["plan"] = info["plan"]
        content = RecordDict({RecordKey.INFO: ConfigRecord(info), RecordKey.RELEASES: lines_record(lines)})
        if stats is not None and spec.aggregation == "secagg":
            # The statistics leave only masked, summed with the other partners' (round 0, mod 2^64).
            from fedcollab.protocols.statistics import encode_statistics

            keep_vector(node, context, encode_statistics(stats, n_parties=len(spec.partners)), 0)
        elif stats is not None and he is not None:
            from fedcollab.node._he import keep_statistics

            keep_statistics(Path(homes[node.partner]), node.run_id, stats)  # leaves only encrypted, once the key is installed
        elif stats is not None:
            content["statistics"] = ConfigRecord(stats)
        return content

    def do_train(node: NodeRuntime, cfg: ConfigRecord, st: ConfigRecord, msg: Message, context: Context) -> RecordDict:
        if he is not None:
            return he.train(node, cfg, st, msg, scaling_of)
        if spec.model.kind == "gbdt":
            return gbdt_step(node, cfg, st, msg, context)
        global_arrays = arrays_of(msg)
        rnd = int(cfg.get("server-round", 0))
        fused: tuple[ConfigRecord, list[str]] | None = None
        if "fedcollab.evaluate_round" in cfg and spec.aggregation != "secagg":
            # Deployment: the previous round's evaluation rides on this message (same global model).
            res, eval_lines = node.evaluate(global_arrays, scaling=scaling_of(cfg), server_round=int(cfg["fedcollab.evaluate_round"]))
            # A ConfigRecord: Flower's strategies accept exactly one MetricRecord per train reply.
            fused = (ConfigRecord({"n": res["n"], "correct": res["correct"], "loss_sum": res["loss_sum"],
                                   "hist_pos": res["hist_pos"], "hist_neg": res["hist_neg"]}), eval_lines)
        if spec.aggregation == "secagg":
            # Check the public encoding parameters before training: a refusal then costs nothing.
            max_weight = float(cfg["secagg.max_weight"])
            n_parties = int(cfg["secagg.n_parties"])
            if not (node.data.n_train <= max_weight and 3 <= n_parties <= len(spec.partners)):
                raise ProtocolError("secagg encoding parameters out of range")
        arrays, metrics, lines, steps = node.train(
            global_arrays, scaling=scaling_of(cfg), server_round=rnd,
            steps_so_far=int(st["steps"]), proximal_mu=float(cfg.get("proximal-mu", 0.0)),
        )
        st["steps"] = int(st["steps"]) + steps
        if spec.aggregation == "secagg":
            from fedcollab.node._secagg import encode_for_secagg
            from fedcollab.protocols import secagg

            if spec.privacy.mode == "distributed":
                shares = secagg.SharesForNode.from_wire(dict(msg.content.config_records.get("secagg", ConfigRecord())))
                vector, line = node.release_ddg(arrays, global_arrays, server_round=rnd, participants=1 + len(shares.ciphertexts))
                lines = [*lines, line]
            elif spec.privacy.mode == "central":
                # Partner-level central DP: the L2-clipped update, unweighted (the coordinator adds the noise).
                vector = encode_for_secagg(spec, new=arrays, old=global_arrays, weight=1.0, max_weight=1.0, n_parties=n_parties,
                                           clip_l2=spec.privacy.partner.clip if spec.privacy.partner else None)
            else:
                # Norm bounding from the node's own spec (never the request): this update adds at most (weight / max_weight) * clip_l2 to the sum.
                vector = encode_for_secagg(spec, new=arrays, old=global_arrays, weight=float(node.data.n_train),
                                           max_weight=max_weight, n_parties=n_parties, clip_l2=spec.secagg.clip_l2)
            keep_vector(node, context, vector, rnd)
            # The update leaves only masked: the round's MASKED_INPUT stage rides on this exchange.
            return piggyback(node, msg, cfg, context, RecordDict({RecordKey.METRICS: MetricRecord(metrics), RecordKey.RELEASES: lines_record(lines)}))
        rec = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
        if fused is not None:
            return RecordDict({RecordKey.ARRAYS: rec, RecordKey.METRICS: MetricRecord(metrics), "fedcollab.eval": fused[0],
                               RecordKey.RELEASES: lines_record([*fused[1], *lines])})
        return RecordDict({RecordKey.ARRAYS: rec, RecordKey.METRICS: MetricRecord(metrics), RecordKey.RELEASES: lines_record(lines)})

    def gbdt_step(node: NodeRuntime, cfg: ConfigRecord, st: ConfigRecord, msg: Message, context: Context) -> RecordDict:
        """One tree step (fedcollab/node/_gbdt.py): the level request, the previous finished tree on a tree's first step.

        A resumed run (its setup said ``fedcollab.resume_after = k``) must open with the k
        checkpointed trees (``gbdt.resume``), once; the node's own record of that setup decides.
        """
        from fedcollab.node._gbdt import step

        if "gbdt" not in msg.content.config_records:
            raise ProtocolError("a gbdt step without its level request")
        records = msg.content.config_records
        apply, edges, resume = records.get("gbdt.apply"), records.get("gbdt.edges"), records.get("gbdt.resume")
        catchup = records.get("gbdt.catchup")
        secure = spec.aggregation == "secagg"
        resume_after = 0 if st.get("gbdt.resumed", False) else int(st.get("gbdt.resume_after", 0))
        wire, lines, vector = step(node, dict(records["gbdt"]), dict(apply) if apply is not None else None,
                                   max_rows=float(cfg["secagg.max_weight"]) if secure else None,
                                   n_parties=int(cfg["secagg.n_parties"]) if secure else None,
                                   edges_wire=dict(edges) if edges is not None else None,
                                   resume_wire=dict(resume) if resume is not None else None, resume_after=resume_after,
                                   catchup_wire=dict(catchup) if catchup is not None else None)
        st["gbdt.resumed"] = True  # from the first answered step on, no resume record is accepted
        content = RecordDict({"gbdt": ConfigRecord(wire), RecordKey.RELEASES: lines_record(lines)})
        if vector is None:
            return content
        keep_vector(node, context, vector, int(cfg.get("server-round", 0)))
        return piggyback(node, msg, cfg, context, content)  # the sums leave only masked: the step's MASKED_INPUT rides here

    n_params: dict[int, int] = {}  # encoded features -> model parameters (fixed by the spec)

    def secagg_shape(node: NodeRuntime, rnd: int) -> tuple[int, int]:
        """(length, bits) this node expects for round ``rnd``: statistics at round 0, else the model update."""
        d = len(node.data.feature_names)
        if rnd == 0:
            return 1 + 2 * d, 64
        if spec.model.kind == "gbdt":
            from fedcollab.protocols import gbdt

            return gbdt.secagg_length(spec), 64
        if d not in n_params:
            # Built once per process, not for every stage message.
            n_params[d] = sum(v.size for v in model_arrays(build_model(spec.model, d, seed=spec.seed)).values())
        # Distributed DP sends the noised update alone; otherwise the weight rides as the last coordinate.
        return n_params[d] + (0 if spec.privacy.mode == "distributed" else 1), 32

    def keep_vector(node: NodeRuntime, context: Context, vector: np.ndarray, rnd: int) -> None:
        # The encoded vector waits at the node (its folder, mode 0600) until the masked-input stage,
        # instead of travelling inside the Flower context with every message.
        write_private(Path(homes[node.partner]) / "secagg" / f"{node.run_id}-{rnd}.bin", vector.tobytes())

    def secagg_stage(node: NodeRuntime, stage: str, rnd: int, request: dict[str, Any], context: Context) -> dict[str, Any]:
        from fedcollab.node._secagg import handle_stage
        from fedcollab.protocols import secagg

        if spec.aggregation != "secagg":
            raise _Coded(NodeErrorCode.POLICY_REFUSED)
        length, bits = secagg_shape(node, rnd)
        path = Path(homes[node.partner]) / "secagg" / f"{node.run_id}-{rnd}.bin"
        vector = np.fromfile(path, dtype=np.uint64 if bits == 64 else np.uint32) if stage == "masked" and path.exists() else None
        key = f"{SECAGG_STATE}.{rnd}"
        prev = context.state.config_records.get(key)
        try:
            if stage == "unmask" and rnd > 0 and spec.privacy.mode == "distributed":
                # The sum becomes readable once shares are revealed: refuse if too few partners are in it,
                # counted on the signed survivor set (handle_stage refuses a set this node did not sign).
                req = secagg.UnmaskRequest.from_wire(request)
                node.check_participants(len(req.signed_survivors), server_round=rnd, stage="unmask")
            new_state, reply = handle_stage(
                stage, request, vector=vector, length=length, bits=bits, round_=rnd,
                state_wire=dict(prev) if prev is not None else None, spec=spec, me=node.partner, run_id=node.run_id,
                identity=secagg.NodeIdentity(name=node.partner, signing_key=node.gate.ledger.key),
                roster_keys={k: v for k, v in roster.items() if k != "coordinator"}, min_partners=node.policy.min_partners_per_round,
            )
        except ProtocolError as exc:
            if stage not in ("consistency", "unmask"):
                raise
            # A stage out of order (an unmask request without the consistency stage) or a request off
            # the protocol: refused as a bad request; the text stays in this node's log.
            log.warning("node %s refused secagg stage %s of round %d: %s", node.partner, stage, rnd, exc)
            raise _Coded(NodeErrorCode.BAD_REQUEST) from None
        context.state[key] = ConfigRecord(new_state)
        if stage == "masked":
            path.unlink(missing_ok=True)  # the update has left, masked; it is not needed again
        if stage == "unmask":
            del context.state[key]  # one round, one aggregate: the protocol secrets are dropped
        return reply

    def piggyback(node: NodeRuntime, msg: Message, cfg: ConfigRecord, context: Context, content: RecordDict) -> RecordDict:
        """Answer the secagg stages a message carries besides its main work ("secagg", then "secagg.next")."""
        for slot in ("secagg", "secagg.next"):
            stage = cfg.get(f"{slot}.stage")
            if stage is None:
                continue
            request = dict(msg.content.config_records.get(slot, ConfigRecord()))
            content[slot] = ConfigRecord(secagg_stage(node, str(stage), int(cfg[f"{slot}.round"]), request, context))
        return content

    def do_evaluate(node: NodeRuntime, cfg: ConfigRecord, st: ConfigRecord, msg: Message, context: Context) -> RecordDict:
        if he is not None:
            return he.evaluate(node, cfg, st, msg, scaling_of)
        if spec.model.kind == "gbdt":
            from fedcollab.protocols import gbdt

            if "gbdt.model" not in msg.content.config_records:
                raise ProtocolError("a gbdt evaluation without its model")
            model: Any = gbdt.ensemble_from_wire(msg.content.config_records["gbdt.model"], spec)
            sc = Scaling(mean=np.zeros(1), std=np.ones(1), method="none")  # trees read raw encoded values
        else:
            model, sc = arrays_of(msg), scaling_of(cfg)
        res, lines = node.evaluate(model, scaling=sc, server_round=int(cfg.get("server-round", 0)))
        metrics = MetricRecord({"num-examples": res["n"], "n": res["n"], "correct": res["correct"], "loss_sum": res["loss_sum"],
                                "hist_pos": res["hist_pos"], "hist_neg": res["hist_neg"]})
        return piggyback(node, msg, cfg, context, RecordDict({RecordKey.METRICS: metrics, RecordKey.RELEASES: lines_record(lines)}))

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return handle(msg, context, do_query)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return handle(msg, context, do_train)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return handle(msg, context, do_evaluate)
    return app


__all__ = ["ANALYTICS_KINDS", "NodeRuntime", "make_client_app", "refuse_over_budget"]
