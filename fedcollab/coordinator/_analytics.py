"""The coordinator's ServerApps for federated analytics: queries under secure aggregation, profiles.

Query: (1) every node checks the query against its schema, policy and budget (refusals are
recorded at the node, nothing is charged); (2) only if all accept, every node computes, noises,
records and keeps its vector; (3) SecAgg+ sums the vectors (modulo 2^64); (4) decode, suppress
small groups; (5) close the run ledger and have it countersigned. The coordinator sees only the
noisy sum. Profile: every node releases its own locally noised vector.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcollab.core import NodeError, ProtocolError, get_logger
from fedcollab.coordinator._exchange import Link, code_name, wait_for_nodes
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.coordinator._secagg import secure_sum
from fedcollab.protocols.wire import RecordKey
from fedcollab.protocols.profile import Profile, build_profile, plan_profile, profile_layout
from fedcollab.protocols.query import QueryPlan, QueryRow, honest_minimum, plan_query, query_result
from fedcollab.spec import QuerySpec, Spec

log = get_logger("coordinator.analytics")


@dataclass
class AnalyticsRecorder:
    """What the coordinator learns from an analytics run."""

    on_stage: Callable[[str], None] | None = None
    rows: list[QueryRow] = field(default_factory=list)
    plan: QueryPlan | None = None
    participants: list[str] = field(default_factory=list)
    min_group_size: int = 0
    profile: Profile | None = None
    failures: dict[str, list[int]] = field(default_factory=dict)  # partner -> codes, as in training runs
    seconds: dict[str, float] = field(default_factory=dict)
    finished: bool = False


def default_n_honest(spec: Spec, query: QuerySpec) -> int:
    """Honest shares the noise is sized for: the query's ``min_honest``, else the secagg threshold.

    Every node derives the same number from its own spec and refuses a request naming another.
    """
    n = len(spec.partners)
    return honest_minimum(query, n_partners=n, threshold=spec.secagg.resolved_threshold(n))


def _make(spec: Spec, recorder: AnalyticsRecorder, ledger: RunLedger, timeout: float, body: Callable[[Link, list[int]], None]) -> Any:
    """A ServerApp that waits for the nodes, runs ``body(link, node_ids)`` and closes the ledger.

    Exchanges go through the one ``Link`` (coordinator/_exchange.py); analytics has no setup
    stage, so the first exchange names the nodes (``Link.broadcast``).
    """
    from flwr.app import Context, MessageType
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        link = Link(grid, ledger=ledger, recorder=recorder, timeout=timeout, partner_names={p.name for p in spec.partners})
        node_ids = wait_for_nodes(grid, len(spec.partners), timeout)
        try:
            body(link, node_ids)
        finally:
            # Close: every chain head listed, signed, then countersigned by every identified node.
            known = [nid for nid in node_ids if nid in link.node_names]
            if known and ledger.heads:
                close = ledger.close(0, partners=[p.name for p in spec.partners])
                link.broadcast(0, MessageType.QUERY, {"fedcollab.kind": "analytics.close", "close": close.decode()}, known)
        recorder.finished = True

    return app


def _codes(failed: dict[str, int]) -> list[str]:
    return [f"{k}: code {v} ({code_name(v)})" for k, v in sorted(failed.items())]


def make_query_server_app(spec: Spec, query: QuerySpec, recorder: AnalyticsRecorder, *, ledger: RunLedger, timeout: float = 600.0) -> Any:
    """The ServerApp answering ``query``: check, answer, secure sum, decode, suppress."""
    n_honest = default_n_honest(spec, query)

    def body(link: Link, node_ids: list[int]) -> None:
        from flwr.app import MessageType

        cfg = {"query": query.model_dump_json(), "n_honest": n_honest, "n_parties": len(node_ids)}
        t0 = time.perf_counter()
        stage("check")
        ok, failed = link.broadcast(0, MessageType.QUERY, {"fedcollab.kind": "analytics.check", **cfg}, node_ids)
        if failed:
            raise NodeError("the query was refused; nothing was released:", codes=failed, problems=_codes(failed))
        stage("answer")
        ok, failed = link.broadcast(0, MessageType.QUERY, {"fedcollab.kind": "analytics.query", **cfg}, node_ids)
        if failed:
            raise NodeError("some nodes failed to answer the query; no aggregate was computed:", codes=failed, problems=_codes(failed))
        recorder.min_group_size = max(int(m.content.config_records[RecordKey.INFO]["min_group_size"]) for m in ok.values())
        plan = plan_query(query, spec.data_schema, n_honest=n_honest)
        if any(int(m.content.config_records[RecordKey.INFO]["length"]) != plan.layout.length for m in ok.values()):
            raise ProtocolError("a node encoded the query with another layout")
        recorder.seconds["answer"] = time.perf_counter() - t0
        stage("secure aggregation")
        total, survivors = secure_sum(spec, run_id=ledger.run_id, round_=1, participants=sorted(ok), length=plan.layout.length, bits=64,
                                      roster_keys=link.roster_keys(), send=link.secagg_sender(1))
        recorder.seconds["secure_sum"] = time.perf_counter() - t0 - recorder.seconds["answer"]
        recorder.participants = survivors
        recorder.plan = plan
        recorder.rows = query_result(query, plan, total, n_shares=len(survivors), min_group_size=recorder.min_group_size)
        stage("done")

    def stage(name: str) -> None:
        if recorder.on_stage:
            recorder.on_stage(name)

    return _make(spec, recorder, ledger, timeout, body)


def make_profile_server_app(spec: Spec, recorder: AnalyticsRecorder, *, ledger: RunLedger, epsilon: float, delta: float,
                            timeout: float = 600.0) -> Any:
    """The ServerApp collecting every node's locally noised profile."""
    schema = spec.data_schema

    def body(link: Link, node_ids: list[int]) -> None:
        from flwr.app import MessageType

        if recorder.on_stage:
            recorder.on_stage("profile")
        ok, failed = link.broadcast(0, MessageType.QUERY, {"fedcollab.kind": "analytics.profile", "epsilon": epsilon, "delta": delta}, node_ids)
        blocks = profile_layout(schema)
        vectors = {p: np.asarray(m.content.config_records[RecordKey.INFO]["profile"], dtype=np.float64) for p, m in ok.items()}
        recorder.participants = sorted(vectors)
        recorder.profile = build_profile(vectors, blocks, plan_profile(schema, epsilon=epsilon, delta=delta), failed=failed,
                                         features=list(schema.features))

    return _make(spec, recorder, ledger, timeout, body)


__all__ = ["AnalyticsRecorder", "default_n_honest", "make_profile_server_app", "make_query_server_app"]
