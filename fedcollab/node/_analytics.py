"""The node's side of federated analytics: local aggregates, the budget gate, a ClientApp.

A node answers a query from its own rows only: it re-checks the query against its own copy of
the schema and its policy (``statistics.allowed_queries``, ``allowed_features``), clamps every
value to the public bounds, adds its share of the noise, records the release in its ledger (the
budget gate refuses before anything leaves) and keeps the encoded vector until the secure
aggregation's masked-input stage. Errors leave as closed codes only: the ClientApp uses the
training app's shell mod, and its own order mod (``fedcollab.node._mods.analytics_order_mod``:
checks, one query with its SecAgg+ stages or one profile, the close; anything else is refused
with ``OUT_OF_ORDER``, recorded).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcollab.core import (
    BudgetExhausted,
    ConfigError,
    DataValidationError,
    FedcollabError,
    NodeErrorCode,
    PolicyRefused,
    ProtocolError,
    get_logger,
    node_code_for,
    write_private,
)
from fedcollab.data import FeatureEncoder, read_source, validate_frame
from fedcollab.node._home import NodeHome, countersign_close
from fedcollab.privacy.accounting import Release
from fedcollab.privacy.mechanisms import fresh_generator
from fedcollab.protocols.profile import ProfileBlock, noisy_profile, plan_profile, profile_layout
from fedcollab.protocols.query import RESOLUTION, Layout, QueryPlan, encode_query_vector, honest_minimum, plan_query
from fedcollab.spec import Predicate, QuerySpec, SchemaSpec, Spec, check_query, parse_query

log = get_logger("node.analytics")
_FRAMES: dict[tuple[str, str], pd.DataFrame] = {}


# --- local aggregates (pure pandas/numpy) ---------------------------------------------------------


def _predicate(frame: pd.DataFrame, p: Predicate, schema: SchemaSpec) -> np.ndarray:
    col = schema.column(p.column)
    s = frame[p.column]
    present = s.notna().to_numpy()
    values = p.value if isinstance(p.value, list) else [p.value]
    if col.type == "category":
        text = s.astype(str).to_numpy()
        hit = np.isin(text, [str(v) for v in values])
        keep = hit if p.op in ("==", "in") else ~hit
    else:
        x = s.to_numpy(dtype=np.float64)
        vs = [float(v) for v in values]
        with np.errstate(invalid="ignore"):
            keep = {"==": lambda: x == vs[0], "!=": lambda: x != vs[0], "<": lambda: x < vs[0], "<=": lambda: x <= vs[0],
                    ">": lambda: x > vs[0], ">=": lambda: x >= vs[0], "in": lambda: np.isin(x, vs), "not_in": lambda: ~np.isin(x, vs)}[p.op]()
    return present & keep


def _group_values(frame: pd.DataFrame, schema: SchemaSpec, column: str) -> np.ndarray:
    s = frame[column]
    if schema.column(column).type == "bool":
        x = s.to_numpy(dtype=np.float64)
        return np.where(np.isnan(x), "", np.where(x > 0.5, "true", "false"))
    return np.where(s.notna().to_numpy(), s.astype(str).to_numpy(), "")


def local_aggregates(frame: pd.DataFrame, query: QuerySpec, layout: Layout, schema: SchemaSpec) -> np.ndarray:
    """This node's exact block sums (int64, ``RESOLUTION`` units per row), values clamped to public bounds."""
    n = len(frame)
    mask = np.ones(n, dtype=bool)
    for p in query.where:
        mask &= _predicate(frame, p, schema)
    groups = _group_values(frame, schema, layout.group_column) if layout.group_column else None
    out = np.zeros(layout.length, dtype=np.int64)
    cache: dict[str, np.ndarray] = {}
    for g, level in enumerate(layout.groups):
        m = mask if groups is None else mask & (groups == level)
        for bi, b in enumerate(layout.blocks):
            o = layout.offset(g, bi)
            if b.kind == "rows":
                out[o] = int(m.sum()) * RESOLUTION
                continue
            assert b.column is not None
            if b.levels:
                text = _group_values(frame, schema, b.column)[m]
                out[o:o + b.width] = np.array([int((text == lv).sum()) for lv in b.levels], dtype=np.int64) * RESOLUTION
                continue
            if b.column not in cache:
                cache[b.column] = frame[b.column].to_numpy(dtype=np.float64)
            x = cache[b.column][m]
            x = np.clip(x[~np.isnan(x)], b.lo, b.hi)  # bounded sensitivity: public bounds, never the data's range
            if b.kind == "n":
                out[o] = x.size * RESOLUTION
            elif b.kind == "sum":
                out[o] = int(np.rint((x - b.center) / b.scale * RESOLUTION).astype(np.int64).sum())
            elif b.kind == "sumsq":
                out[o] = int(np.rint((x - b.center) ** 2 / b.scale * RESOLUTION).astype(np.int64).sum())
            else:  # hist over [lo, hi]
                idx = np.clip(np.floor((x - b.lo) / (b.hi - b.lo) * b.width).astype(np.int64), 0, b.width - 1)
                out[o:o + b.width] = np.bincount(idx, minlength=b.width).astype(np.int64) * RESOLUTION
    return out


def profile_counts(frame: pd.DataFrame, schema: SchemaSpec, blocks: list[ProfileBlock]) -> np.ndarray:
    """This node's exact profile counts (one row adds at most 1 to each block)."""
    used = [*schema.features, schema.label.column]
    usable = ~frame[used].isna().any(axis=1).to_numpy()
    y = np.zeros(len(frame))
    if usable.any():
        y[usable] = FeatureEncoder(schema).labels(frame[usable].reset_index(drop=True))
    out: list[float] = []
    for b in blocks:
        if b.kind == "rows":
            out.append(float(len(frame)))
        elif b.kind == "usable_pos":
            out.append(float((usable & (y > 0.5)).sum()))
        elif b.kind == "usable_neg":
            out.append(float((usable & (y <= 0.5)).sum()))
        elif b.kind == "missing":
            out.append(float(frame[b.column].isna().sum()))
        elif b.kind == "zeros":
            out.append(float((frame[b.column].to_numpy(dtype=np.float64) == 0).sum()))
        elif b.levels:
            text = _group_values(frame, schema, b.column)  # type: ignore[arg-type]
            out.extend(float((text == lv).sum()) for lv in b.levels)
        else:
            x = frame[b.column].to_numpy(dtype=np.float64)
            x = np.clip(x[~np.isnan(x)], b.lo, b.hi)
            idx = np.clip(np.floor((x - b.lo) / (b.hi - b.lo) * b.width).astype(np.int64), 0, b.width - 1)
            out.extend(np.bincount(idx, minlength=b.width).astype(float).tolist())
    return np.asarray(out, dtype=np.float64)


def load_frame(spec: Spec, partner: str) -> pd.DataFrame:
    """The partner's validated rows (all of them: train and test), cached per process."""
    key = (spec.model_dump_json(by_alias=True) + spec.base_dir, partner)
    if key not in _FRAMES:
        p = next((x for x in spec.partners if x.name == partner), None)
        if p is None or p.source is None:
            raise DataValidationError(f"partner {partner!r} has no data source")
        _FRAMES[key] = validate_frame(read_source(p.source, spec.base_dir), spec.data_schema, source=f"partner {partner!r} data")
    return _FRAMES[key]


# --- the node's analytics runtime ---------------------------------------------------------------


class TooFewParticipants(ProtocolError):
    """Fewer partners than the query's noise was sized for (or could ever be in the sum); code TOO_FEW_PARTICIPANTS."""

    node_code = NodeErrorCode.TOO_FEW_PARTICIPANTS


class NodeAnalytics:
    """A node answering queries and profiles; every release passes its budget gate first."""

    def __init__(self, spec: Spec, partner: str, *, home: NodeHome, run_id: str) -> None:
        self.spec = spec
        self.partner = partner
        self.run_id = run_id
        self.dataset = home.dataset()  # node-local configuration, never the spec (issue 13, attack 5)
        self.gate = home.gate(partner, self.dataset)
        self.policy = self.gate.policy
        if self.policy.partner != partner:
            raise PolicyRefused("the node's policy belongs to another partner")
        entry = next((p for p in spec.partners if p.name == partner), None)
        if entry is not None and entry.dataset is not None and entry.dataset != self.dataset:
            self.gate.refuse_request(run_id=run_id, round=0, code=int(NodeErrorCode.DATASET_MISMATCH),
                                     reason="the spec names another dataset id for this partner than the node's")
            raise PolicyRefused(f"the spec's dataset {entry.dataset!r} is not this node's dataset {self.dataset!r}")

    def _refuse(self, code: NodeErrorCode, reason: str, exc: FedcollabError) -> FedcollabError:
        self.gate.refuse_request(run_id=self.run_id, round=0, code=int(code), reason=reason)
        return exc

    def honest_minimum(self, query: QuerySpec) -> int:
        """``n_honest`` from this node's own spec and the query (never from a request); refusals recorded.

        The query's ``min_honest`` if set, else the secure-aggregation threshold of this node's spec;
        above the spec's partner count it is refused (``TOO_FEW_PARTICIPANTS``).
        """
        n = len(self.spec.partners)
        try:
            return honest_minimum(query, n_partners=n, threshold=self.spec.secagg.resolved_threshold(n))
        except ProtocolError as exc:
            raise self._refuse(NodeErrorCode.TOO_FEW_PARTICIPANTS, "noise sized for more honest partners than the spec has",
                               TooFewParticipants(str(exc))) from None

    def check_sum_size(self, signed_survivors: int, *, n_honest: int) -> None:
        """At unmask: refuse (recorded) a signed survivor set smaller than the ``n_honest`` shares the noise was sized for."""
        if signed_survivors < n_honest:
            raise self._refuse(NodeErrorCode.TOO_FEW_PARTICIPANTS, f"{signed_survivors} partners in the signed sum, fewer than n_honest = {n_honest}",
                               TooFewParticipants(f"{signed_survivors} signed survivors, fewer than n_honest = {n_honest}"))

    def check_query(self, query: QuerySpec, *, n_honest: int | None = None) -> QueryPlan:
        """Validate ``query`` against this node's schema and policy, and its cost against the budget; record refusals.

        ``n_honest`` is what the request claims; the node derives its own (:meth:`honest_minimum`)
        and refuses a request claiming another value (``BAD_REQUEST``).
        """
        try:
            check_query(query, self.spec.data_schema)
        except ConfigError as exc:
            raise self._refuse(NodeErrorCode.BAD_REQUEST, "query does not fit the schema", exc) from None
        own = self.honest_minimum(query)
        if n_honest is not None and n_honest != own:
            raise self._refuse(NodeErrorCode.BAD_REQUEST, f"the request's n_honest {n_honest} is not this node's {own}",
                               ProtocolError(f"`n_honest` must be {own} (derived from the node's spec and the query), got {n_honest}."))
        n_honest = own
        stats = self.policy.statistics
        bad_kinds = [k for k in query.kinds() if k not in stats.allowed_queries]
        if bad_kinds:
            raise self._refuse(NodeErrorCode.POLICY_REFUSED, f"query kinds {bad_kinds} not allowed",
                               PolicyRefused(f"the policy forbids query kinds {bad_kinds}"))
        allowed = self.policy.allowed_features
        if allowed is not None:
            bad_cols = [c for c in query.columns() if c not in allowed]
            if bad_cols:
                raise self._refuse(NodeErrorCode.POLICY_REFUSED, f"columns {bad_cols} not allowed",
                                   PolicyRefused(f"the policy forbids columns {bad_cols}"))
        if "secagg" not in self.policy.allowed_aggregation:
            raise self._refuse(NodeErrorCode.POLICY_REFUSED, "secure aggregation not allowed", PolicyRefused("the policy forbids secagg"))
        plan = plan_query(query, self.spec.data_schema, n_honest=n_honest)
        release = self._release_of(query, plan)
        if release.non_private:
            if not self.policy.allow_non_private_training or self.policy.budget(self.dataset, "record") is not None:
                raise self._refuse(NodeErrorCode.POLICY_REFUSED, "exact statistics not allowed",
                                   PolicyRefused("the policy forbids exact (non-private) statistics"))
            return plan
        _, total, budget = self.gate.would_spend(release, run_id=self.run_id)
        if budget is None or total > budget["epsilon"] * (1 + 1e-9):
            raise self._refuse(NodeErrorCode.BUDGET_EXHAUSTED, "budget would be exceeded",
                               BudgetExhausted(f"the query would take {self.dataset!r} past its budget"))
        return plan

    def _release_of(self, query: QuerySpec, plan: QueryPlan) -> Release:
        details: dict[str, Any] = {"query": query.name, "blocks": plan.layout.n_blocks, "length": plan.layout.length, "mode": plan.mode,
                                   "n_honest": plan.n_honest, "aggregation": "secagg"}
        if plan.mode == "dp":
            details.update({"sigma_units": plan.noise_std_units, "epsilon": float(query.epsilon or 0), "delta": query.delta,
                            "noise": "distributed discrete Gaussian (KLS21)", "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"})
        return Release(kind="query", about="train+test", unit="record", observer="coordinator", added_by=self.partner, party=self.partner,
                       round=0, mechanism=plan.mechanism, details=details)

    def answer_query(self, query: QuerySpec, *, n_honest: int | None = None, n_parties: int, generator: np.random.Generator | None,
                     max_rows: int = 10**9) -> tuple[np.ndarray, str]:
        """Check, compute, noise and record: (the uint64 vector for secure aggregation, its ledger line).

        ``n_honest`` (the request's claim) is checked against the node's own (:meth:`check_query`).
        """
        plan = self.check_query(query, n_honest=n_honest)
        frame = load_frame(self.spec, self.partner)
        agg = local_aggregates(frame, query, plan.layout, self.spec.data_schema)
        vec = encode_query_vector(agg, plan, n_parties=n_parties, max_rows=max(max_rows, len(frame)), generator=generator)
        line = self.gate.record(self._release_of(query, plan), run_id=self.run_id, payload=vec.tobytes()).decode()
        return vec, line

    def answer_profile(self, *, epsilon: float, delta: float, generator: np.random.Generator) -> tuple[np.ndarray, str]:
        """The noisy profile vector and its ledger line (checked against the budget first)."""
        schema = self.spec.data_schema
        plan = plan_profile(schema, epsilon=epsilon, delta=delta)
        blocks = profile_layout(schema)
        frame = load_frame(self.spec, self.partner)
        vec = noisy_profile(profile_counts(frame, schema, blocks), plan, blocks, generator=generator)
        release = Release(kind="profile", about="train+test", unit="record", observer="coordinator", added_by=self.partner,
                          party=self.partner, round=0, mechanism=plan.mechanism,
                          details={"epsilon": epsilon, "delta": delta, "sigma_core": plan.sigma_core, "sigma_rest": plan.sigma_rest,
                                   "noise": "local Gaussian", "noise_rng": "numpy PCG64 seeded from OS entropy (256 bits)"})
        line = self.gate.record(release, run_id=self.run_id, payload=vec.tobytes()).decode()
        return vec, line

    def countersign(self, close_line: bytes, coordinator_key: str) -> str:
        """Check the coordinator's close entry lists this node's chain head, then countersign it."""
        return countersign_close(self.gate.ledger, party=self.partner, run_id=self.run_id, close_line=close_line, coordinator_key=coordinator_key,
                                 partners=[p.name for p in self.spec.partners])


_code_for = node_code_for  # the one exception -> node code map (fedcollab.core), kept under its old name


def make_analytics_client_app(spec: Spec, homes: dict[str, str], roster: dict[str, str]) -> Any:
    """The ClientApp answering queries (check, answer, secagg stages), profiles and the close."""
    from flwr.app import ConfigRecord, Context, Message, RecordDict
    from flwr.clientapp import ClientApp

    from fedcollab.node._mods import analytics_order_mod, current, shell_mod
    from fedcollab.node._secagg import handle_stage
    from fedcollab.protocols import secagg
    from fedcollab.protocols.wire import RecordKey
    from fedcollab.protocols.ddg import ddg_generator

    coordinator_key = roster["coordinator"]

    def partner_of(context: Context) -> str:
        if "partition-id" in context.node_config:
            idx = int(context.node_config["partition-id"])
            if 0 <= idx < len(spec.partners):
                return spec.partners[idx].name
        if "partner" in context.node_config and str(context.node_config["partner"]) in homes:
            return str(context.node_config["partner"])
        raise ProtocolError("unknown partner")

    def vector_path(node: NodeAnalytics) -> Path:
        return Path(homes[node.partner]) / "secagg" / f"{node.run_id}-query.bin"

    def work(node: NodeAnalytics, cfg: ConfigRecord, msg: Message, context: Context) -> RecordDict:
        kind = str(cfg.get("fedcollab.kind", ""))
        info = {"partner": node.partner, "min_group_size": node.policy.statistics.min_group_size}
        if kind in ("analytics.check", "analytics.query"):
            query = parse_query(json.loads(str(cfg["query"])))
            # n_honest and the party count are the node's own (its spec and the query); the request's
            # n_honest is only a claim, refused when it differs.
            claimed = int(cfg["n_honest"]) if "n_honest" in cfg else None
            if kind == "analytics.check":
                plan = node.check_query(query, n_honest=claimed)
                return RecordDict({RecordKey.INFO: ConfigRecord({**info, "length": plan.layout.length})})
            vec, line = node.answer_query(query, n_honest=claimed, n_parties=len(spec.partners),
                                          generator=ddg_generator() if query.mode == "dp" else None)
            write_private(vector_path(node), vec.tobytes())
            context.state["analytics"] = ConfigRecord({"length": int(vec.size), "n_honest": node.honest_minimum(query)})
            return RecordDict({RecordKey.INFO: ConfigRecord({**info, "length": int(vec.size)}),
                               RecordKey.RELEASES: ConfigRecord({"lines": json.dumps([line])})})
        if kind == "secagg":
            st = context.state.config_records.get("analytics")
            if st is None:  # (the order mod refuses a stage before the query first)
                raise ProtocolError("secagg before the query")
            stage, rnd = str(cfg["secagg.stage"]), int(cfg["secagg.round"])
            length = int(st["length"])
            path = vector_path(node)
            vector = np.fromfile(path, dtype=np.uint64) if stage == "masked" and path.exists() else None
            key = f"fedcollab.analytics.secagg.{rnd}"
            prev = context.state.config_records.get(key)
            request = dict(msg.content.config_records.get("secagg", ConfigRecord()))
            if stage == "unmask":
                # The sum becomes readable once shares are revealed: it must hold at least the n_honest noise
                # shares this node sized its noise for, counted on the signed survivor set (handle_stage
                # refuses a set this node did not sign or one without a quorum of signatures).
                node.check_sum_size(len(secagg.UnmaskRequest.from_wire(request).signed_survivors), n_honest=int(st["n_honest"]))
            new_state, reply = handle_stage(
                stage, request, vector=vector, length=length, bits=64, round_=rnd,
                state_wire=dict(prev) if prev is not None else None, spec=spec, me=node.partner, run_id=node.run_id,
                identity=secagg.NodeIdentity(name=node.partner, signing_key=node.gate.ledger.key),
                roster_keys={k: v for k, v in roster.items() if k != "coordinator"}, min_partners=node.policy.min_partners_per_round,
            )
            context.state[key] = ConfigRecord(new_state)
            if stage == "masked":
                path.unlink(missing_ok=True)
            return RecordDict({"secagg": ConfigRecord(reply)})
        if kind == "analytics.profile":
            # Continuous Gaussian noise: numpy PCG64 seeded with 256 bits from the OS (as the DP statistics).
            vec, line = node.answer_profile(epsilon=float(cfg["epsilon"]), delta=float(cfg["delta"]), generator=fresh_generator())
            return RecordDict({RecordKey.INFO: ConfigRecord({**info, "profile": vec.tolist()}),
                               RecordKey.RELEASES: ConfigRecord({"lines": json.dumps([line])})})
        if kind == "analytics.close":
            return RecordDict({RecordKey.RELEASES: ConfigRecord({"lines": json.dumps([node.countersign(str(cfg["close"]).encode(), coordinator_key)])})})
        raise ProtocolError("unknown analytics request")

    def open_node(msg: Message, context: Context) -> NodeAnalytics:
        """The node for this message: its own spec, policy and ledger, for the run the message names."""
        partner = partner_of(context)
        cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
        run_id = str(cfg.get("fedcollab.run_id", ""))
        if not run_id or partner not in homes:
            raise ProtocolError("bad request")
        return NodeAnalytics(spec, partner, home=NodeHome(Path(homes[partner])), run_id=run_id)

    def partner_or_none(context: Context) -> str | None:
        try:
            return partner_of(context)
        except ProtocolError:
            return None

    # The same shell as the training ClientApp (a failure leaves as its code and the node's new ledger
    # entries, no text), then the analytics run's own order.
    app = ClientApp(mods=[shell_mod(open_node, node_code_for, partner_or_none), analytics_order_mod])  # type: ignore[arg-type]

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        cfg = msg.content.config_records.get(RecordKey.CONFIG, ConfigRecord())
        return Message(content=work(current(), cfg, msg, context), reply_to=msg)  # type: ignore[arg-type]

    return app


__all__ = ["NodeAnalytics", "load_frame", "local_aggregates", "make_analytics_client_app", "profile_counts"]
