"""Run a federated query or an AI-readiness profile on Flower's simulation engine (in-process, offline)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcollab.core import TransportError
from fedcollab.coordinator import AnalyticsRecorder, RunLedger, default_n_honest, make_profile_server_app, make_query_server_app
from fedcollab.node import NodeHome, make_client_app
from fedcollab.protocols.profile import Profile
from fedcollab.spec import BudgetSpec, NodePolicy, QuerySpec, Spec, check_query, load_query, load_spec
from fedcollab.runner._run import (
    SIMULATED_BUDGET_EPSILON,
    _coordinator_and_roster,
    _keep_previous_ledger,
    prepare_simulated_nodes,
    set_flower_env,
    simulate_apps,
    simulated_policy,
)

#: Default privacy of a profile, per silo (record level, against the coordinator).
PROFILE_EPSILON = 4.0
PROFILE_DELTA = 1e-6


@dataclass(frozen=True)
class QueryResult:
    """What a query run produced."""

    query: QuerySpec
    rows: list[dict[str, Any]]
    participants: list[str]
    min_group_size: int
    privacy: dict[str, Any]
    seconds: float
    out_dir: Path | None

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"query": self.query.name, "participants": self.participants, "min_group_size": self.min_group_size,
                "privacy": self.privacy, "results": self.rows, "seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class ProfileResult:
    """What a profile run produced."""

    profile: Profile
    seconds: float
    report: Path | None
    out_dir: Path | None


def analytics_policy(spec: Spec, partner: str) -> NodePolicy:
    """A simulated partner's policy for analytics: the training one, with a record-level budget (epsilon 8)."""
    base = simulated_policy(spec, partner)
    if base.budgets:
        return base
    p = next(x for x in spec.partners if x.name == partner)
    budget = BudgetSpec(dataset=p.dataset_id, unit="record", epsilon=SIMULATED_BUDGET_EPSILON, delta=spec.privacy.delta or 1e-5, accountant="rdp")
    return base.model_copy(update={"budgets": [budget], "allow_non_private_training": False})


def _prepare(spec: Spec | str | Path, out: str | Path | None, nodes: str | Path | None) -> tuple[Spec, Path, Any, dict[str, NodeHome], RunLedger, Any]:
    if not isinstance(spec, Spec):
        spec = load_spec(spec)
    set_flower_env()
    tmp = None
    if out is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="fedcollab-query-")
    out_dir = Path(out) if out is not None else Path(tmp.name)  # type: ignore[union-attr]
    out_dir.mkdir(parents=True, exist_ok=True)
    homes = prepare_simulated_nodes(spec, Path(nodes) if nodes is not None else out_dir / "nodes", policy=analytics_policy)
    key, roster = _coordinator_and_roster(out_dir, homes)
    ledger_path = out_dir / "ledger.jsonl"
    if ledger_path.exists():
        _keep_previous_ledger(ledger_path)
    ledger = RunLedger(ledger_path, key=key, roster=roster, run_id=uuid.uuid4().hex[:16])
    return spec, out_dir, tmp, homes, ledger, roster


class _Stages:
    def __init__(self, enabled: bool, total: int, *, what: str = "query", partners: int = 0) -> None:
        self.enabled, self.total, self.what, self.partners = enabled, total, what, partners
        self.progress: Any = None

    def __enter__(self) -> _Stages:
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            # A line that stays (the bar below is transient, and shows nothing where stderr is not a terminal):
            # Flower's simulation engine takes ~10 s to start before the first stage.
            Console(stderr=True).print(f"{self.what}: {self.partners} partners on Flower's simulation engine (it takes ~10 s to start) ...",
                                       highlight=False)

            self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TimeElapsedColumn(), transient=True)
            self.progress.start()
            self.task = self.progress.add_task("starting simulation", total=self.total)
        return self

    def __call__(self, name: str) -> None:
        if self.progress:
            self.progress.update(self.task, description=name, advance=1)

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()


def run_query(spec: Spec | str | Path, query: QuerySpec | str | Path, *, out: str | Path | None = None, nodes: str | Path | None = None,
              progress: bool = False, timeout: float = 600.0) -> QueryResult:
    """Answer ``query`` over the partners' data: DP (or exact) statistics, summed under SecAgg+.

    The query is checked against the schema here (unknown columns, kinds on the wrong column
    type) before anything starts; every node checks it again against its own policy and budget.
    """
    q = query if isinstance(query, QuerySpec) else load_query(query)
    sp = spec if isinstance(spec, Spec) else load_spec(spec)
    check_query(q, sp.data_schema)
    secagg_problems = sp.secagg.problems(len(sp.partners))
    if secagg_problems:
        from fedcollab.core import ConfigError

        # Caught here, before the simulation starts, naming the spec field to change.
        raise ConfigError("a query sums under secure aggregation, which this spec's [secagg] table does not allow:", problems=secagg_problems)
    from fedcollab.runner._preflight import check_simulation_data

    check_simulation_data(sp)  # each partner's data problem by partner, column and file, before the simulation
    sp, out_dir, tmp, homes, ledger, roster = _prepare(sp, out, nodes)
    recorder = AnalyticsRecorder()
    t0 = time.perf_counter()
    with _Stages(progress, 4, what="query", partners=len(sp.partners)) as stages:
        recorder.on_stage = stages
        client = make_client_app(sp, {k: str(v.root) for k, v in homes.items()}, {k: v.signing_key for k, v in roster.parties.items()}, statistics=True)
        simulate_apps(sp, make_query_server_app(sp, q, recorder, ledger=ledger, timeout=timeout), client)
    wall = time.perf_counter() - t0
    if recorder.plan is None:
        from fedcollab.core import NodeError

        if recorder.failures:
            raise NodeError("the query was refused; nothing was released:", codes={k: v[-1] for k, v in recorder.failures.items()})
        raise TransportError("the simulation ended before the query was answered")
    plan = recorder.plan
    privacy = {"mode": plan.mode, "unit": "record", "observer": "coordinator", "aggregation": "secagg (SecAgg+, mod 2^64)",
               "n_honest": plan.n_honest, "noise_shares": len(recorder.participants)}
    if plan.mode == "dp":
        privacy.update({"epsilon": q.epsilon, "delta": q.delta, "mechanism": "distributed discrete Gaussian", "zcdp_rho": plan.mechanism.rho,
                        "blocks": plan.layout.n_blocks, "count_noise_std": plan.noise_std_units * (len(recorder.participants) / plan.n_honest) ** 0.5})
    res = QueryResult(q, [r.to_dict() for r in recorder.rows], recorder.participants, recorder.min_group_size, privacy, wall,
                      out_dir if tmp is None else None)
    (out_dir / "query.json").write_text(json.dumps(res.to_dict(), indent=2) + "\n")
    return res


def run_profile(spec: Spec | str | Path, *, out: str | Path | None = None, nodes: str | Path | None = None, epsilon: float = PROFILE_EPSILON,
                delta: float = PROFILE_DELTA, progress: bool = False, timeout: float = 600.0) -> ProfileResult:
    """Profile every silo (local noise, charged to its budget) and write ``profile.html`` and ``profile.json``."""
    from fedcollab.runner._preflight import check_simulation_data
    from fedcollab.runner._profile_report import write_profile_report

    spec = spec if isinstance(spec, Spec) else load_spec(spec)
    check_simulation_data(spec)  # each partner's data problem by partner, column and file, before the simulation
    sp, out_dir, tmp, homes, ledger, roster = _prepare(spec, out, nodes)
    recorder = AnalyticsRecorder()
    t0 = time.perf_counter()
    with _Stages(progress, 1, what="profile", partners=len(sp.partners)) as stages:
        recorder.on_stage = stages
        client = make_client_app(sp, {k: str(v.root) for k, v in homes.items()}, {k: v.signing_key for k, v in roster.parties.items()}, statistics=True)
        simulate_apps(sp, make_profile_server_app(sp, recorder, ledger=ledger, epsilon=epsilon, delta=delta, timeout=timeout), client)
    wall = time.perf_counter() - t0
    if recorder.profile is None:
        raise TransportError("the simulation ended before the profile was collected")
    (out_dir / "profile.json").write_text(json.dumps(recorder.profile.to_dict(), indent=2) + "\n")
    report = write_profile_report(recorder.profile, sp, out_dir)
    return ProfileResult(recorder.profile, wall, report if tmp is None else None, out_dir if tmp is None else None)


__all__ = ["PROFILE_EPSILON", "ProfileResult", "QueryResult", "analytics_policy", "default_n_honest", "run_profile", "run_query"]
