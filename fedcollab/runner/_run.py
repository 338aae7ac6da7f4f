"""The simulation runner: spec in, model, metrics and privacy summary out."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import ConfigError, FedcollabError, NodeError, NodeErrorCode, RunInterrupted, TransportError, get_logger
from fedcollab.coordinator import COORDINATOR, CoordinatorRecorder, PollingGrid, RoundRecord, RunLedger, make_server_app, privacy_section
from fedcollab.node import NodeHome, init_node_home, make_client_app
from fedcollab.spec import BudgetSpec, NodePolicy, Roster, RosterEntry, Spec, VerticalPolicy, load_spec
from fedcollab.protocols.evaluation import HIST_BINS, PooledMetrics
from fedcollab.protocols.statistics import Scaling
from fedcollab.protocols.summary import LedgerRef, Metrics, MetricsEntry, ModelRef, RunError, SpecRef, Summary

log = get_logger("runner")

#: Flower must run offline and quietly in every process (see docs/quickstart.md).
FLOWER_ENV = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}
DEMO_SPEC = Path(__file__).resolve().parents[1] / "specs" / "heart-disease-dp.toml"


def set_flower_env() -> None:
    """Set Flower's offline environment variables (inherited by Ray workers)."""
    for k, v in FLOWER_ENV.items():
        os.environ[k] = v


@dataclass(frozen=True)
class Result:
    """What a run produced."""

    summary: Summary
    rounds: list[RoundRecord]
    #: The final model: its parameter arrays by name, or for ``kind = "gbdt"`` the tree ensemble
    #: (:class:`fedcollab.protocols.gbdt.Ensemble`: ``trees``, ``base_score``, ``feature_names``,
    #: ``predict_proba(encoded rows)``), also written as XGBoost's ``model.json``.
    model: Any
    out_dir: Path | None
    #: The model file's safetensors metadata (feature names, encoding, scaling, schema; JSON values).
    model_metadata: dict[str, str] = field(default_factory=dict)

    @property
    def pooled(self) -> MetricsEntry:
        """Final pooled test metrics."""
        return self.summary.metrics.pooled_test

    def predict(self, frame: Any, *, id_column: str | None = None) -> Any:
        """Score new rows (a pandas DataFrame with the schema's feature columns) with the final model.

        The rows are validated against the schema recorded with the model, encoded and scaled as in
        training. Returns a DataFrame: the id column (``id_column``, else the schema's ``id`` column
        if the rows have one, else ``row``), ``score`` (probability of the positive label) and
        ``predicted`` (score >= 0.5). Same as ``fedcollab predict --model OUT``.
        """
        from fedcollab.runner._predict import FedcollabModel

        return FedcollabModel.from_arrays(self.model, self.model_metadata, source="Result.model").predict(frame, id_column=id_column)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("fedcollab", "flwr", "opacus", "dp-accounting", "torch", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _entry(m: PooledMetrics | None) -> MetricsEntry:
    if m is None:
        return MetricsEntry(accuracy=float("nan"), auc=None, loss=float("nan"), n=0)
    return MetricsEntry(accuracy=m.accuracy, auc=m.auc, loss=m.loss, n=m.n)


def _save_model(arrays: dict[str, np.ndarray], out: Path, metadata: dict[str, str]) -> tuple[Path, str, str]:
    """``model.safetensors`` with its metadata (the format deployment writes too: fedcollab/protocols/model_file.py)."""
    from fedcollab.protocols.model_file import MODEL_FILE, save_model

    path = out / MODEL_FILE
    return path, save_model(arrays, path, metadata), "safetensors"


def _rounds_of(spec: Spec) -> int:
    """Rounds a run takes: training rounds, or a gbdt model's trees."""
    if spec.model.kind == "gbdt":
        from fedcollab.spec import tree_params

        return tree_params(spec).n_trees
    return spec.training.rounds


def _save_trees(model: Any, out: Path, metadata: dict[str, str]) -> tuple[Path, str, str, int]:
    """``model.json``: XGBoost's JSON model format, fedcollab's metadata in its string attributes; (path, SHA-256, format, nodes)."""
    from fedcollab.protocols.gbdt import write_tree_model

    if model is None:
        raise TransportError("the gbdt run produced no model")
    path = out / "model.json"
    return path, write_tree_model(model, path, metadata), "xgboost-json", int(sum(t.n_nodes for t in model.trees))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class _Progress:
    def __init__(self, spec: Spec, enabled: bool) -> None:
        self.enabled = enabled
        self.spec = spec
        self.progress: Any = None
        self.task: Any = None

    def __enter__(self) -> _Progress:
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[status]}"), transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("starting simulation", total=_rounds_of(self.spec), status="")
        return self

    def setup(self, partners: dict[str, int]) -> None:
        if self.progress:
            self.progress.update(self.task, description="rounds", status=f"{len(partners)} partners, {sum(partners.values())} training rows")

    def round(self, r: RoundRecord) -> None:
        if self.progress:
            status = ""
            if r.pooled is not None:
                auc = f"{r.pooled.auc:.3f}" if r.pooled.auc is not None else "n/a"
                status = f"pooled acc {r.pooled.accuracy:.3f}  auc {auc}"
            self.progress.update(self.task, completed=r.round, status=status)

    def __exit__(self, *exc: object) -> None:
        if self.progress:
            self.progress.stop()


def run(
    spec: Spec | str | Path,
    *,
    out: str | Path | None = None,
    nodes: str | Path | None = None,
    progress: bool = False,
    spec_path: str | Path | None = None,
    timeout: float = 600.0,
    on_round: Callable[[RoundRecord], None] | None = None,
    resume: bool = False,
    data: dict[str, Any] | None = None,
) -> Result:
    """Run ``spec`` on Flower's simulation engine, in-process and offline.

    Parameters
    ----------
    spec : Spec or path
        The collaboration spec (a path is loaded and validated).
    out : path, optional
        Folder for ``summary.json``, ``metrics.jsonl``, ``ledger.jsonl``, ``roster.json``, the
        model and its checkpoint (a temporary folder when omitted). An earlier run's outputs
        there are moved to ``OUT/previous/RUN_ID/`` first, so the folder never mixes two runs.
    nodes : path, optional
        Folder of the simulated partners' node folders (keys, policies, ledgers). Reusing it
        across runs keeps each partner's budget, as a real partner's node would; default
        ``OUT/nodes``. A missing node folder is created with a policy derived from the spec.
    progress : bool
        Show a rich progress bar per round.
    on_round : callable, optional
        Called with each round's record once the round is done, before the next one starts.
    resume : bool
        Continue the failed or interrupted run in ``out`` from its last checkpoint (same run id
        and ledger; every aggregation mode, plain, secagg or he, with or without DP, trees included,
        as ``submit --resume`` does).
    data : dict, optional
        Partner name -> pandas DataFrame of its rows, used instead of the spec's ``source`` (a
        notebook's frames). Each frame is validated against the spec's schema before the
        simulation starts, as a file would be; frames are never written to disk by fedcollab.

    Returns
    -------
    Result
        Summary (``schemas/summary.schema.json``), per-round records and the final model.

    Raises
    ------
    DataValidationError
        Before anything starts, naming each partner whose data cannot be used and why.
    FedcollabError
        When the run fails: ``summary.json`` then says ``status: failed`` (``interrupted`` for
        :class:`~fedcollab.core.RunInterrupted`), and the ledger ends with a signed ``abort``.
    """
    if not isinstance(spec, Spec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    if spec.layout == "vertical":
        # Different columns per party: PSI, then SecureBoost or vertical LR, with its own result (fedcollab/runner/_vertical.py).
        raise ConfigError("layout: fedcollab.run runs horizontal specs (every partner holds the same columns), got layout = 'vertical'; "
                          "run it with fedcollab.runner.run_vertical(spec, out=...) or `fedcollab run SPEC`")
    # Every partner's data, checked here first: in simulation the person running it is every
    # partner, so each sees their own message (partner, column, file) in a second.
    from fedcollab.runner._preflight import check_model_target, check_simulation_data

    frames = _check_frames(spec, data)
    check_simulation_data(spec, skip=set(frames))
    check_model_target(spec)  # the spec author's own model, imported here (never at a partner's node)
    if resume:
        if out is None:
            raise ConfigError("--resume: expected --out, the folder of the interrupted run, got none")
    set_flower_env()
    tmp = None
    if out is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="fedcollab-run-")
    out_dir = Path(out) if out is not None else Path(tmp.name)  # type: ignore[union-attr]
    out_dir.mkdir(parents=True, exist_ok=True)
    sp = Path(spec_path) if spec_path is not None else None
    spec_ref = _spec_ref(spec, sp)
    resume_from: tuple[int, dict[str, np.ndarray]] | None = None
    earlier_metrics: list[str] = []
    if resume:
        run_id, resume_from, earlier_metrics = _resume_point(out_dir, spec_ref, spec)
    else:
        _set_aside_previous(out_dir)
        run_id = uuid.uuid4().hex[:16]
    recorder = CoordinatorRecorder(checkpoint_dir=out_dir / "checkpoints")
    homes = prepare_simulated_nodes(spec, Path(nodes) if nodes is not None else out_dir / "nodes")
    coordinator_key, roster = _coordinator_and_roster(out_dir, homes)
    ledger_path = out_dir / "ledger.jsonl"
    ledger = RunLedger(ledger_path, key=coordinator_key, roster=roster, run_id=run_id)
    if resume:
        ledger.heads.update(_node_heads(ledger_path))
        ledger.releases.extend(_earlier_releases(ledger_path, run_id))
        _carry_unsent_entries(ledger, homes, resume_from[0] if resume_from else 0)
    cancel = threading.Event()
    t0 = time.perf_counter()
    try:
        with _sigint_cancels(cancel), _Progress(spec, progress) as prog:
            recorder.on_setup = prog.setup

            def each_round(r: RoundRecord) -> None:
                prog.round(r)
                if on_round is not None:
                    on_round(r)

            recorder.on_round = each_round
            _simulate(spec, recorder, ledger=ledger, homes={k: str(v.root) for k, v in homes.items()},
                      roster={k: v.signing_key for k, v in roster.parties.items()}, timeout=timeout, resume=resume_from, cancel=cancel,
                      frames=frames)
        if cancel.is_set():
            raise RunInterrupted("the run was interrupted (Ctrl-C)")
        if spec.aggregation == "he" and recorder.finished:
            recorder.final_arrays = _he_model(spec, homes, run_id)
        if not recorder.finished or recorder.final_arrays is None:
            raise TransportError("the simulation ended before the last round")
    except (Exception, KeyboardInterrupt) as exc:
        err = exc if isinstance(exc, FedcollabError) else (RunInterrupted("the run was interrupted (Ctrl-C)") if isinstance(exc, KeyboardInterrupt) else None)
        if cancel.is_set() and not isinstance(err, RunInterrupted):
            err = RunInterrupted("the run was interrupted (Ctrl-C)")
        if isinstance(err, NodeError) and int(NodeErrorCode.BUDGET_EXHAUSTED) in err.codes.values():
            nodes_dir = Path(nodes) if nodes is not None else out_dir / "nodes"
            hint = (f"budgets carry over between runs through the node folders (--nodes DIR, default OUT/nodes; here {nodes_dir}); "
                    f"delete a simulated partner's node folder (e.g. {nodes_dir / next(iter(err.codes))}) to start afresh")
            err = NodeError(str(err).split("\n")[0], codes=err.codes, problems=[*err.problems, hint])
        _record_failure(spec, out_dir, ledger, recorder, err or exc, spec_ref=spec_ref, wall=time.perf_counter() - t0,
                        earlier_metrics=earlier_metrics, resumed_after=resume_from[0] if resume_from else None)
        if err is None:
            raise
        if err is exc:
            raise
        raise err from None
    wall = time.perf_counter() - t0

    privacy = privacy_section(spec, recorder.releases, recorder.partners)
    last_eval = next((r for r in reversed(recorder.rounds) if r.pooled is not None), None)
    metrics = Metrics(
        pooled_test=_entry(last_eval.pooled if last_eval else None),
        partners={k: _entry(v) for k, v in (last_eval.partners if last_eval else {}).items()},
    )
    # Success outputs are written only now, each atomically (a failed run never leaves a model).
    from fedcollab.protocols.model_file import encoding_of, model_metadata

    n_features = len(spec.data_schema.encoded_features())
    sc = recorder.scaling
    if sc is not None and sc.mean.size != n_features and spec.aggregation == "he":
        # Under HE the coordinator never saw the statistics: the model writer recorded the scaling beside the model.
        sc = _he_scaling(spec, homes, run_id) or sc
    metadata = model_metadata(spec, scaling_method=sc.method if sc else "none", mean=sc.mean if sc else np.zeros(n_features),
                              std=sc.std if sc else np.ones(n_features), run_id=run_id)
    if spec.model.kind == "gbdt":
        model_path, model_sha, fmt, n_params = _save_trees(recorder.final_model, out_dir, metadata)
    else:
        model_path, model_sha, fmt = _save_model(recorder.final_arrays, out_dir, metadata)
        n_params = int(sum(v.size for v in recorder.final_arrays.values()))
    model_ref = ModelRef(path=model_path.name, sha256=model_sha, format=fmt, n_parameters=n_params,  # type: ignore[arg-type]
                         kind=spec.model.kind, feature_names=spec.data_schema.encoded_features(),
                         encoding=encoding_of(spec.data_schema))  # type: ignore[arg-type]
    summary = Summary(
        run_id=run_id,
        spec=spec_ref,
        versions=_versions(),
        aggregation=spec.aggregation,
        strategy="histogram-gbdt" if spec.model.kind == "gbdt" else spec.training.strategy,
        rounds=(resume_from[0] if resume_from else 0) + len(recorder.rounds),
        wall_seconds=round(wall, 3),
        scaling=recorder.scaling.method if recorder.scaling else "none",
        scaling_parameters={"mean": recorder.scaling.mean.tolist(), "std": recorder.scaling.std.tolist()} if recorder.scaling else None,
        metrics=metrics,
        privacy=privacy,
        model=model_ref,
        ledger=_ledger_ref(ledger),
        failures=recorder.failures,
        resumed_after_round=resume_from[0] if resume_from else None,
    )
    _write_atomic(out_dir / "metrics.jsonl", "".join(earlier_metrics) + "".join(json.dumps(r.to_dict()) + "\n" for r in recorder.rounds))
    _write_atomic(out_dir / "summary.json", summary.model_dump_json(indent=2) + "\n")
    return Result(summary=summary, rounds=list(recorder.rounds), model=recorder.final_model if spec.model.kind == "gbdt" else recorder.final_arrays,
                  out_dir=out_dir if tmp is None else None,
                  model_metadata=metadata)


def _spec_ref(spec: Spec, sp: Path | None) -> SpecRef:
    return SpecRef(
        path=str(sp) if sp else "<in-memory>",
        sha256=hashlib.sha256(sp.read_bytes()).hexdigest() if sp else hashlib.sha256(spec.model_dump_json(by_alias=True).encode()).hexdigest(),
        name=spec.name,
    )


def _ledger_ref(ledger: RunLedger) -> LedgerRef:
    data = ledger.path.read_bytes() if ledger.path.exists() else b""
    return LedgerRef(path=ledger.path.name, sha256=hashlib.sha256(data).hexdigest(), entries=data.count(b"\n"), roster="roster.json")


# --- failed and interrupted runs ------------------------------------------------------------------
#: What a completed run writes into OUT; an earlier run's copies are moved aside before a new run.
_RUN_OUTPUTS = ("summary.json", "metrics.jsonl", "model.safetensors", "model.npz", "model.json")
_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _set_aside_previous(out_dir: Path) -> Path | None:
    """Move an earlier run's outputs (summary, metrics, model, ledger, checkpoints) to ``OUT/previous/RUN_ID/``.

    So that a folder never mixes two runs: after a failure the new run's failure summary and
    ledger stand alone, and the earlier run stays verifiable where it was moved.
    """
    present = [out_dir / n for n in (*_RUN_OUTPUTS, "ledger.jsonl", "checkpoints") if (out_dir / n).exists()]
    if not present:
        return None
    old_id = None
    try:
        old_id = str(json.loads((out_dir / "summary.json").read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        try:
            with (out_dir / "ledger.jsonl").open("rb") as fh:
                old_id = str(json.loads(fh.readline())["run_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
    if old_id is None or not _RUN_ID.fullmatch(old_id):
        old_id = "unknown-" + uuid.uuid4().hex[:8]
    dest = out_dir / "previous" / old_id
    if dest.exists():
        dest = dest.with_name(f"{old_id}-{uuid.uuid4().hex[:6]}")
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    log.info("moved the previous run's outputs to %s", dest)
    return dest


def _record_failure(spec: Spec, out_dir: Path, ledger: RunLedger, recorder: CoordinatorRecorder, exc: BaseException, *, spec_ref: SpecRef,
                    wall: float, earlier_metrics: list[str], resumed_after: int | None) -> None:
    """Close the ledger with a signed abort and write ``summary.json`` with status failed or interrupted."""
    interrupted = isinstance(exc, RunInterrupted)
    code = int(getattr(exc, "exit_code", 1))
    node_codes = {str(k): int(v) for k, v in (getattr(exc, "codes", None) or {}).items()}
    codes = {k: list(v) for k, v in recorder.failures.items()}
    for k, v in node_codes.items():
        if v not in codes.setdefault(k, []):
            codes[k].append(v)
    reason = "interrupted" if interrupted else type(exc).__name__
    try:
        ledger.abort(len(recorder.rounds), reason=reason, exit_code=code, codes=codes)
    except Exception:  # noqa: BLE001 - the original error matters more; the ledger then reads as cut short
        log.exception("could not append the abort entry to %s", ledger.path)
    try:
        privacy = privacy_section(spec, list(ledger.releases), recorder.partners) if ledger.releases else None
    except Exception:  # noqa: BLE001 - a partial run's privacy section is best effort; the ledger is the record
        privacy = None
    summary = Summary(
        status="interrupted" if interrupted else "failed",
        run_id=ledger.run_id,
        spec=spec_ref,
        versions=_versions(),
        aggregation=spec.aggregation,
        strategy="histogram-gbdt" if spec.model.kind == "gbdt" else spec.training.strategy,
        rounds=(resumed_after or 0) + len(recorder.rounds),
        wall_seconds=round(wall, 3),
        scaling=recorder.scaling.method if recorder.scaling else "none",
        privacy=privacy,
        ledger=_ledger_ref(ledger),
        failures=codes,
        error=RunError(exit_code=code, error=type(exc).__name__, node_codes=node_codes),
        resumed_after_round=resumed_after,
    )
    _write_atomic(out_dir / "metrics.jsonl", "".join(earlier_metrics) + "".join(json.dumps(r.to_dict()) + "\n" for r in recorder.rounds))
    _write_atomic(out_dir / "summary.json", summary.model_dump_json(indent=2) + "\n")


def _earlier_releases(ledger_path: Path, run_id: str) -> list[Any]:
    """The releases the interrupted part of a resumed run already made (so the summary counts the whole run)."""
    from fedcollab.privacy.accounting import Release, parse_lines

    out = []
    for ln in parse_lines(ledger_path.read_bytes()) if ledger_path.exists() else []:
        if ln.entry.get("kind") == "release" and ln.entry.get("run_id") == run_id:
            out.append(Release.model_validate(ln.entry["body"]["release"]))
    return out


def _resume_point(out_dir: Path, spec_ref: SpecRef, spec: Spec) -> tuple[str, tuple[int, dict[str, np.ndarray]], list[str]]:
    """The interrupted run's id, its last checkpoint and the metrics lines of the rounds before it."""
    try:
        old = Summary.model_validate_json((out_dir / "summary.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--resume: expected the summary.json of a failed or interrupted run in {out_dir}, got none ({type(exc).__name__})") from None
    if old.status == "completed":
        raise ConfigError(f"--resume: the run {old.run_id} in {out_dir} completed; there is nothing to resume")
    if old.spec.sha256 != spec_ref.sha256:
        raise ConfigError(f"--resume: the spec differs from the interrupted run's (spec.sha256 {old.spec.sha256[:12]}..., got {spec_ref.sha256[:12]}...)")
    from fedcollab.coordinator import load_checkpoint

    ck = out_dir / "checkpoints"
    try:
        last, arrays = load_checkpoint(ck, spec)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--resume: no checkpoint to continue from ({ck}: {type(exc).__name__}); the run stopped before round 1 ended") from None
    earlier = []
    try:
        for line in (out_dir / "metrics.jsonl").read_text().splitlines(keepends=True):
            if int(json.loads(line)["round"]) <= last:
                earlier.append(line)
    except (OSError, ValueError, KeyError):
        earlier = []
    return old.run_id, (last, arrays), earlier


def _node_heads(ledger_path: Path) -> dict[str, str]:
    """Each node's last entry in an existing run ledger (a resumed run's close and abort list them)."""
    from fedcollab.privacy.accounting import parse_lines

    heads = {}
    for ln in parse_lines(ledger_path.read_bytes()):
        if ln.entry.get("party") != COORDINATOR:
            heads[str(ln.entry["party"])] = ln.hash
    return heads


def _carry_unsent_entries(ledger: RunLedger, homes: dict[str, NodeHome], round: int) -> None:
    """Entries each simulated node wrote for this run whose reply the interruption lost, appended (verified, receipted).

    A deployed node's reply is what carries them; in simulation the runner holds every node's
    folder, so a resumed run ledger keeps each node's chain unbroken.
    """
    from fedcollab.privacy.accounting import parse_lines

    for name, home in homes.items():
        lines = parse_lines(home.ledger_path.read_bytes()) if home.ledger_path.exists() else []
        head = ledger.heads.get(name)
        if head is None:
            start = next((i for i, ln in enumerate(lines) if ln.entry.get("run_id") == ledger.run_id), len(lines))
        else:
            start = next((i + 1 for i, ln in enumerate(lines) if ln.hash == head), len(lines))
        unsent = []
        for ln in lines[start:]:
            if ln.entry.get("run_id") != ledger.run_id:
                break
            unsent.append(ln.raw.decode())
        if unsent:
            ledger.accept(unsent, party=name, round=round)


@contextlib.contextmanager
def _sigint_cancels(cancel: threading.Event) -> Iterator[None]:
    """While the simulation runs, a first Ctrl-C asks it to stop (the coordinator aborts within a poll); a second raises."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    old = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _cancellable(server_app: Any, cancel: threading.Event) -> Any:
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        def check() -> None:
            if cancel.is_set():
                raise RunInterrupted("the run was interrupted (Ctrl-C)")

        server_app(PollingGrid(grid, check=check), context)

    return app


def _simulate(spec: Spec, recorder: CoordinatorRecorder, *, ledger: RunLedger, homes: dict[str, str], roster: dict[str, str],
              timeout: float, resume: tuple[int, dict[str, np.ndarray]] | None = None, cancel: threading.Event | None = None,
              frames: dict[str, Any] | None = None) -> None:
    server = make_server_app(spec, recorder, ledger=ledger, timeout=timeout, resume=resume)
    if cancel is not None:
        server = _cancellable(server, cancel)
    simulate_apps(spec, server, make_client_app(spec, homes, roster, frames=frames))


def _check_frames(spec: Spec, data: Any) -> dict[str, Any]:
    """``data`` of :func:`run`: partner names to DataFrames, each valid against the schema (checked here, up front)."""
    from fedcollab.core import ConfigError

    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"`data` must be a dict of partner name -> pandas DataFrame, got {type(data).__name__}")
    import pandas as pd

    from fedcollab.data import prepare_frame

    names = [p.name for p in spec.partners]
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ConfigError(f"`data`: {unknown} are not partners of the spec (expected some of {names})")
    for p in spec.partners:
        if p.name in data:
            frame = data[p.name]
            if not isinstance(frame, pd.DataFrame):
                raise ConfigError(f"`data[{p.name!r}]` must be a pandas DataFrame, got {type(frame).__name__}")
            prepare_frame(frame, spec, p, source=f"data[{p.name!r}]")  # DataValidationError listing every problem
        elif p.source is None:
            raise ConfigError(f"partner {p.name!r} has no `source` in the spec and no DataFrame in `data`")
    return {k: v.copy() for k, v in data.items()}


def simulate_apps(spec: Spec, server_app: Any, client_app: Any) -> None:
    """Run a ServerApp and a ClientApp on Flower's simulation engine, one SuperNode per partner, in-process.

    Flower's own logging is quietened for the run; the runtime's failures become one fedcollab error
    (the node's or coordinator's own error when it is the cause).
    """
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:
        from fedcollab.core import MissingExtra

        raise MissingExtra("the simulation needs Flower: pip install 'fedcollab[node,coordinator]'") from exc
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(spec.partners),
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False},
            },
        )
    except FedcollabError:
        raise
    except Exception as exc:  # noqa: BLE001 - the runtime's failures become one fedcollab error
        cause = exc.__cause__
        if isinstance(cause, FedcollabError):
            raise cause from None
        raise TransportError(f"the Flower simulation failed: {type(exc).__name__}") from exc
    finally:
        flwr_logger.setLevel(level)


def _he_scaling(spec: Spec, homes: dict[str, NodeHome], run_id: str) -> Scaling | None:
    """The global scaling under HE, as the model writer recorded it with the final model."""
    from fedcollab.node import read_model_scaling

    writer = spec.he.resolved_model_writer([p.name for p in spec.partners])
    got = read_model_scaling(homes[writer].root, run_id)
    if got is None:
        return None
    return Scaling(mean=np.asarray(got["mean"], dtype=np.float64), std=np.asarray(got["std"], dtype=np.float64), method=str(got["method"]))


def _he_model(spec: Spec, homes: dict[str, NodeHome], run_id: str) -> OrderedDict[str, np.ndarray]:
    """Under HE the coordinator holds no model: the model writer decrypted it into its node folder."""
    from fedcollab.node import read_model

    writer = spec.he.resolved_model_writer([p.name for p in spec.partners])
    return read_model(homes[writer].root, run_id)


#: Budget of a simulated partner whose node folder the runner creates (per dataset, unit record).
SIMULATED_BUDGET_EPSILON = 8.0
#: Fewest test rows a simulated partner evaluates on (the demo's smallest test split, Switzerland's, has 16).
SIMULATED_MIN_TEST_ROWS = 10


def simulated_policy(spec: Spec, partner: str) -> NodePolicy:
    """The policy the runner writes for a simulated partner that has none: what the spec needs, and a budget."""
    p = next(x for x in spec.partners if x.name == partner)
    delta = spec.privacy.delta if spec.privacy.delta is not None else 1e-5
    eps = max(SIMULATED_BUDGET_EPSILON, spec.privacy.target_epsilon or 0.0)
    budgets = []
    if spec.privacy.record_dp:
        budgets.append(BudgetSpec(dataset=p.dataset_id, unit="record", epsilon=eps, delta=delta, accountant=spec.privacy.accountant))
    pp = spec.privacy.partner
    if spec.privacy.mode == "distributed" and pp is not None:
        # The partner-level budget toward the coordinator (zCDP: accounted in RDP).
        budgets.append(BudgetSpec(dataset=p.dataset_id, unit="partner", epsilon=max(SIMULATED_BUDGET_EPSILON, pp.epsilon), delta=pp.delta, accountant="rdp"))
    return NodePolicy(
        partner=partner,
        # Without record-level DP the simulated partner's data is unbudgeted for records (infinite epsilon exceeds any budget).
        budgets=budgets,
        # Without DP-SGD, the update leaves in the clear (none, central) or only noised and masked (distributed).
        allow_non_private_training=not spec.privacy.record_dp,
        allowed_model_kinds=sorted({"logistic_regression", "mlp", spec.model.kind}),  # type: ignore[arg-type]
        # In simulation the runner plays every partner: it allows the spec's own custom model (docs/policy.md).
        allowed_custom_models=[spec.model.target] if spec.model.kind == "custom" and spec.model.target else [],
        min_partners_per_round=min(2, len(spec.partners)),
        # The person running a simulation is every partner: exact test metrics at full resolution
        # (the demo's pooled accuracy and AUC), on test splits of at least SIMULATED_MIN_TEST_ROWS.
        test_metrics="public",
        min_test_rows=SIMULATED_MIN_TEST_ROWS,
        max_histogram_bins=HIST_BINS,
        # A vertical spec: this simulated partner joins it, with the spec's own minimum intersection.
        vertical=VerticalPolicy(allowed=True, min_intersection=spec.vertical.min_intersection) if spec.vertical is not None else VerticalPolicy(),
    )


def prepare_simulated_nodes(spec: Spec, nodes_dir: Path, *, policy: Callable[[Spec, str], NodePolicy] | None = None) -> dict[str, NodeHome]:
    """A node folder per partner under ``nodes_dir``, created with ``policy(spec, partner)`` (default :func:`simulated_policy`) if missing."""
    make_policy = policy or simulated_policy
    homes = {}
    for p in spec.partners:
        home = NodeHome(nodes_dir / p.name)
        if not home.exists():
            # The dataset id comes from the spec's partner entry here only because the person running
            # a simulation is every partner; from then on it is the node folder's (node.json).
            home = init_node_home(home.root, partner=p.name, policy=make_policy(spec, p.name), dataset=p.dataset_id)
        homes[p.name] = home
    return homes


def _keep_previous_ledger(path: Path) -> None:
    first = path.open("rb").readline()
    try:
        old_id = str(json.loads(first)["run_id"])
    except (ValueError, KeyError, TypeError):
        old_id = uuid.uuid4().hex[:16]
    os.replace(path, path.with_name(f"ledger.{old_id}.jsonl"))


def _coordinator_and_roster(out_dir: Path, homes: dict[str, NodeHome]) -> tuple[Any, Roster]:
    from fedcollab.crypto import generate_signing_key, load_signing_key
    from fedcollab.privacy.accounting import public_key_hex

    key_path = out_dir / "coordinator" / "signing_key.pem"
    key = load_signing_key(key_path) if key_path.exists() else generate_signing_key(key_path)
    parties = {name: RosterEntry(signing_key=h.public_key()) for name, h in homes.items()}
    parties[COORDINATOR] = RosterEntry(signing_key=public_key_hex(key), role="coordinator")
    roster = Roster(parties=parties)
    # In simulation the runner writes the roster; across organisations parties exchange it out of band.
    _write_atomic(out_dir / "roster.json", roster.model_dump_json(indent=2) + "\n")
    return key, roster


def run_demo(*, out: str | Path = "runs/demo", progress: bool = True) -> Result:
    """Run the embedded Heart demo (four hospitals, record-level DP-SGD on).

    The demo's simulated partners start afresh each time (``OUT/nodes`` is recreated), so
    repeating the demo never exhausts their budgets; ``fedcollab run --nodes`` keeps them.
    """
    import shutil

    out_dir = Path(out)
    shutil.rmtree(out_dir / "nodes", ignore_errors=True)
    shutil.rmtree(out_dir / "coordinator", ignore_errors=True)
    for name in ("ledger.jsonl", "roster.json"):
        (out_dir / name).unlink(missing_ok=True)
    return run(DEMO_SPEC, out=out_dir, progress=progress)
