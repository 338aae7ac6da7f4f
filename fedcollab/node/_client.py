"""The node's Flower ClientApp.

Three requests, each answered only from the node's own data:

* ``query`` (setup): validate the data, declare row counts (public), release the statistics
  for global scaling (exact, DP-noised, or none), and calibrate DP-SGD once for the whole run;
* ``train``: local training from the global model; releases the update (DP-SGD or non-private);
* ``evaluate``: counts and score histograms on the test split (a release about test rows).

Every release is described by a :class:`~fedcollab.privacy.accounting.Release` sent with it.
Errors go back as a closed code; the exception text stays in this node's log.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import numpy as np

from fedcollab.core import (
    BudgetExhausted,
    DataValidationError,
    FedcollabError,
    NodeErrorCode,
    PrivacyError,
    ProtocolError,
    get_logger,
)
from fedcollab.data import PartnerData, exact_statistics, feature_bounds, load_partner_data
from fedcollab.models import build_model, model_arrays, set_model_arrays
from fedcollab.privacy.accounting import (
    GaussianMechanism,
    NonPrivate,
    PoissonSubsampledGaussian,
    Release,
)
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols import DpPlan, MessageKind, RecordKey, Scaling, dp_statistics, plan_dp
from fedcollab.spec import Spec

log = get_logger("node")

_DATA_CACHE: dict[tuple[str, str], PartnerData] = {}
_PLAN_CACHE: dict[tuple[str, str, int], DpPlan] = {}


def _spec_key(spec: Spec) -> str:
    return spec.model_dump_json(by_alias=True) + spec.base_dir


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


class _Coded(Exception):
    def __init__(self, code: NodeErrorCode) -> None:
        super().__init__(code.name)
        self.code = code


def _code_for(exc: BaseException) -> NodeErrorCode:
    if isinstance(exc, _Coded):
        return exc.code
    if isinstance(exc, DataValidationError):
        return NodeErrorCode.DATA_SCHEMA_MISMATCH
    if isinstance(exc, BudgetExhausted):
        return NodeErrorCode.BUDGET_EXHAUSTED
    if isinstance(exc, PrivacyError):
        return NodeErrorCode.PRIVACY_INVALID
    if isinstance(exc, ProtocolError):
        return NodeErrorCode.BAD_MODEL_UPDATE
    return NodeErrorCode.INTERNAL


class NodeRuntime:
    """The node's logic, independent of Flower records (so it is testable as plain functions)."""

    def __init__(self, spec: Spec, partner: str, *, plan_json: str | None = None) -> None:
        self.spec = spec
        self.partner = partner
        key = (_spec_key(spec), partner)
        if key not in _DATA_CACHE:
            _DATA_CACHE[key] = load_partner_data(spec, partner)
        self.data = _DATA_CACHE[key]
        self.dp = spec.privacy.mode == "record"
        if self.dp and plan_json:
            # The plan calibrated at setup, kept in the node's state (no second calibration).
            plan = DpPlan(**json.loads(plan_json))
            _PLAN_CACHE.setdefault((_spec_key(spec), partner, plan.n_train), plan)

    # --- privacy plan -------------------------------------------------------------------
    def plan(self) -> DpPlan | None:
        """The DP-SGD plan (calibrated once per spec, partner and row count)."""
        if not self.dp:
            return None
        key = (_spec_key(self.spec), self.partner, self.data.n_train)
        if key not in _PLAN_CACHE:
            _PLAN_CACHE[key] = plan_dp(self.spec, n_train=self.data.n_train, n_features=len(self.data.feature_names))
        return _PLAN_CACHE[key]

    def _release(self, **kw: Any) -> dict[str, Any]:
        return Release(party=self.partner, added_by=self.partner, **kw).model_dump(mode="json")

    # --- setup ------------------------------------------------------------------------------
    def setup(self, scaling: str) -> tuple[dict[str, Any], dict[str, list[float]] | None, list[dict[str, Any]]]:
        """Row counts, the statistics release (if any) and the DP plan."""
        d = self.data
        releases = [
            self._release(kind="row_counts", about="train+test", unit="record", observer="coordinator", round=0,
                          mechanism=NonPrivate(), declared_public=True, details={"n_train": d.n_train, "n_test": d.n_test})
        ]
        stats = None
        plan = self.plan()
        if scaling == "federated_statistics":
            if self.dp:
                raise _Coded(NodeErrorCode.POLICY_REFUSED)  # exact statistics are not private
            stats = exact_statistics(d.x_train)
            releases.append(self._release(kind="statistics", about="train", unit="record", observer="coordinator", round=0,
                                          mechanism=NonPrivate(), details={"what": "count, sum, sum of squares per feature"}))
        elif scaling == "dp_statistics":
            if plan is None or plan.stats_noise_multiplier is None:
                raise _Coded(NodeErrorCode.BAD_REQUEST)
            stats = dp_statistics(d.x_train, feature_bounds(self.spec.data_schema), noise_multiplier=plan.stats_noise_multiplier,
                                  generator=fresh_generator())
            releases.append(self._release(kind="statistics", about="train", unit="record", observer="coordinator", round=0,
                                          mechanism=GaussianMechanism(noise_multiplier=plan.stats_noise_multiplier, releases=1),
                                          details={"l2_sensitivity": plan.stats_sensitivity or 0.0, "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"}))
        info: dict[str, Any] = {"partner": self.partner, "n_train": d.n_train, "n_test": d.n_test, "n_features": len(d.feature_names)}
        if plan is not None:
            info["plan"] = json.dumps(asdict(plan))
        return info, stats, releases

    # --- train ------------------------------------------------------------------------------
    def train(self, arrays: dict[str, np.ndarray], *, scaling: Scaling, server_round: int, steps_so_far: int,
              proximal_mu: float) -> tuple[dict[str, np.ndarray], dict[str, float], list[dict[str, Any]], int]:
        """One round of local training; returns the update, metrics, releases and steps taken."""
        spec, d = self.spec, self.data
        model = build_model(spec.model, len(d.feature_names), seed=spec.seed)
        _check_arrays(arrays, model_arrays(model))
        set_model_arrays(model, arrays)
        plan = self.plan()
        if plan is not None:
            planned = spec.training.local_epochs * plan.steps_per_epoch
            if steps_so_far + planned > plan.total_steps:
                # Fail closed: this round would take the partner past its target epsilon.
                raise BudgetExhausted("DP-SGD steps beyond the calibrated plan")
        from fedcollab.node._training import train_model

        outcome = train_model(model, scaling.apply(d.x_train), d.y_train, training=spec.training, plan=plan,
                              proximal_mu=proximal_mu, shuffle_seed=spec.seed * 1000 + server_round)
        out = model_arrays(model)
        if not all(np.isfinite(v).all() for v in out.values()):
            raise ProtocolError("non-finite update")
        metrics: dict[str, float] = {"num-examples": float(d.n_train)}
        if plan is None:
            mech: Any = NonPrivate()
            metrics["train_loss"] = outcome.mean_loss
            details: dict[str, Any] = {"steps": outcome.steps}
        else:
            mech = PoissonSubsampledGaussian(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=outcome.steps)
            details = {"clip_norm": plan.clip_norm, "expected_batch": plan.expected_batch, "n_train": d.n_train,
                       "empty_batches": outcome.empty_batches, "noise_rng": "torch.Generator seeded from os.urandom (64 bits)"}
        release = self._release(kind="dpsgd_training" if plan else "model_update", about="train", unit="record",
                                observer="coordinator", round=server_round, mechanism=mech, details=details)
        return out, metrics, [release], outcome.steps

    # --- evaluate ---------------------------------------------------------------------------
    def evaluate(self, arrays: dict[str, np.ndarray], *, scaling: Scaling, server_round: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Counts and histograms on the test split."""
        spec, d = self.spec, self.data
        model = build_model(spec.model, len(d.feature_names), seed=spec.seed)
        _check_arrays(arrays, model_arrays(model))
        set_model_arrays(model, arrays)
        from fedcollab.node._training import evaluate_model

        res = evaluate_model(model, scaling.apply(d.x_test), d.y_test)
        release = self._release(kind="test_metrics", about="test", unit="record", observer="coordinator", round=server_round,
                                mechanism=NonPrivate(), details={"what": "count, correct, loss sum, score histograms"})
        return res, [release]


def _check_arrays(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    if set(got) != set(want):
        raise ProtocolError("parameter names do not match the model")
    for k, v in got.items():
        if v.shape != want[k].shape:
            raise ProtocolError("parameter shapes do not match the model")
        if not np.isfinite(v).all():
            raise ProtocolError("non-finite parameters")


def make_client_app(spec: Spec) -> Any:
    """The Flower ClientApp of a node taking part in ``spec``."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    def reply(msg: Message, content: RecordDict) -> Message:
        return Message(content=content, reply_to=msg)

    def error_reply(msg: Message, exc: BaseException, partner: str | None) -> Message:
        code = _code_for(exc)
        # Text and traceback stay here; only the code leaves.
        log.error("node %s refused %s: %s (%s)", partner or "?", msg.metadata.message_type, code.name, exc, exc_info=not isinstance(exc, FedcollabError | _Coded))
        return reply(msg, RecordDict({RecordKey.ERROR: ConfigRecord({"code": int(code)})}))

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

    def releases_record(releases: list[dict[str, Any]]) -> ConfigRecord:
        return ConfigRecord({"json": json.dumps(releases)})

    @app.query()
    def setup(msg: Message, context: Context) -> Message:
        partner = None
        try:
            partner = _partner_name(spec, context.node_config)
            cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
            if str(cfg.get("fedcollab.kind", "")) != MessageKind.SETUP:
                raise _Coded(NodeErrorCode.BAD_REQUEST)
            st = state(context)
            if "setup_done" in st:
                # A second setup would be a second statistics release the plan did not charge.
                raise _Coded(NodeErrorCode.BAD_REQUEST)
            node = NodeRuntime(spec, partner)
            info, stats, releases = node.setup(str(cfg.get("scaling", "none")))
            st["setup_done"] = True
            if "plan" in info:
                st["plan"] = info["plan"]
            content = RecordDict({RecordKey.INFO: ConfigRecord(info), RecordKey.RELEASES: releases_record(releases)})
            if stats is not None:
                content["statistics"] = ConfigRecord(stats)
            return reply(msg, content)
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code
            return error_reply(msg, exc, partner)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        partner = None
        try:
            partner = _partner_name(spec, context.node_config)
            cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
            st = state(context)
            node = NodeRuntime(spec, partner, plan_json=str(st["plan"]) if "plan" in st else None)
            arrays, metrics, releases, steps = node.train(
                arrays_of(msg), scaling=scaling_of(cfg), server_round=int(cfg.get("server-round", 0)),
                steps_so_far=int(st["steps"]), proximal_mu=float(cfg.get("proximal-mu", 0.0)),
            )
            st["steps"] = int(st["steps"]) + steps
            rec = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})
            return reply(msg, RecordDict({RecordKey.ARRAYS: rec, RecordKey.METRICS: MetricRecord(metrics),
                                          RecordKey.RELEASES: releases_record(releases)}))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code
            return error_reply(msg, exc, partner)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        partner = None
        try:
            partner = _partner_name(spec, context.node_config)
            cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
            node = NodeRuntime(spec, partner)
            res, releases = node.evaluate(arrays_of(msg), scaling=scaling_of(cfg), server_round=int(cfg.get("server-round", 0)))
            metrics = MetricRecord({"num-examples": res["n"], "n": res["n"], "correct": res["correct"], "loss_sum": res["loss_sum"],
                                    "hist_pos": res["hist_pos"], "hist_neg": res["hist_neg"]})
            return reply(msg, RecordDict({RecordKey.METRICS: metrics, RecordKey.RELEASES: releases_record(releases)}))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code
            return error_reply(msg, exc, partner)

    return app


__all__ = ["NodeRuntime", "make_client_app"]
