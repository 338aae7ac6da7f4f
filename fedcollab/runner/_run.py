"""The simulation runner: spec in, model, metrics and privacy summary out."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import FedcollabError, TransportError, get_logger
from fedcollab.coordinator import CoordinatorRecorder, RoundRecord, make_server_app, privacy_section
from fedcollab.node import make_client_app
from fedcollab.protocols import PooledMetrics, Summary
from fedcollab.protocols._summary import Metrics, MetricsEntry, ModelRef, SpecRef
from fedcollab.spec import Spec, load_spec

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
DEMO_SPEC = Path(__file__).resolve().parents[1] / "protocols_dist" / "heart-disease-dp.toml"


def set_flower_env() -> None:
    """Set Flower's offline environment variables (inherited by Ray workers)."""
    for k, v in FLOWER_ENV.items():
        os.environ[k] = v


@dataclass(frozen=True)
class Result:
    """What a run produced."""

    summary: Summary
    rounds: list[RoundRecord]
    model: OrderedDict[str, np.ndarray]
    out_dir: Path | None

    @property
    def pooled(self) -> MetricsEntry:
        """Final pooled test metrics."""
        return self.summary.metrics.pooled_test


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


def _save_model(arrays: dict[str, np.ndarray], out: Path) -> tuple[Path, str, str]:
    try:
        from safetensors.numpy import save_file

        path = out / "model.safetensors"
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path))
        fmt = "safetensors"
    except ImportError:  # pragma: no cover - safetensors is a node/coordinator dependency
        path = out / "model.npz"
        np.savez(path, **arrays)
        fmt = "npz"
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), fmt


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
            self.task = self.progress.add_task("starting simulation", total=self.spec.training.rounds, status="")
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
    progress: bool = False,
    spec_path: str | Path | None = None,
    timeout: float = 600.0,
) -> Result:
    """Run ``spec`` on Flower's simulation engine, in-process and offline.

    Parameters
    ----------
    spec : Spec or path
        The collaboration spec (a path is loaded and validated).
    out : path, optional
        Folder for ``summary.json``, ``metrics.jsonl``, the model and its checkpoint.
    progress : bool
        Show a rich progress bar per round.

    Returns
    -------
    Result
        Summary (``protocols/summary.schema.json``), per-round records and the final model.
    """
    if not isinstance(spec, Spec):
        spec_path = Path(spec)
        spec = load_spec(spec_path)
    set_flower_env()
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
    recorder = CoordinatorRecorder(checkpoint_dir=(out_dir / "checkpoints") if out_dir else None)
    run_id = uuid.uuid4().hex[:16]
    t0 = time.perf_counter()
    with _Progress(spec, progress) as prog:
        recorder.on_setup = prog.setup
        recorder.on_round = prog.round
        _simulate(spec, recorder, timeout=timeout)
    wall = time.perf_counter() - t0
    if not recorder.finished or recorder.final_arrays is None:
        raise TransportError("the simulation ended before the last round")

    privacy = privacy_section(spec, recorder.releases, recorder.partners)
    last_eval = next((r for r in reversed(recorder.rounds) if r.pooled is not None), None)
    metrics = Metrics(
        pooled_test=_entry(last_eval.pooled if last_eval else None),
        partners={k: _entry(v) for k, v in (last_eval.partners if last_eval else {}).items()},
    )
    if out_dir is not None:
        model_path, model_sha, fmt = _save_model(recorder.final_arrays, out_dir)
        model_ref = ModelRef(path=model_path.name, sha256=model_sha, format=fmt, n_parameters=int(sum(v.size for v in recorder.final_arrays.values())))  # type: ignore[arg-type]
    else:
        model_ref = ModelRef(path="", sha256="", format="npz", n_parameters=int(sum(v.size for v in recorder.final_arrays.values())))
    sp = Path(spec_path) if spec_path is not None else None
    summary = Summary(
        run_id=run_id,
        spec=SpecRef(
            path=str(sp) if sp else "<in-memory>",
            sha256=hashlib.sha256(sp.read_bytes()).hexdigest() if sp else hashlib.sha256(spec.model_dump_json(by_alias=True).encode()).hexdigest(),
            name=spec.name,
        ),
        versions=_versions(),
        aggregation=spec.aggregation,
        strategy=spec.training.strategy,
        rounds=len(recorder.rounds),
        wall_seconds=round(wall, 3),
        scaling=recorder.scaling.method if recorder.scaling else "none",
        metrics=metrics,
        privacy=privacy,
        model=model_ref,
        failures=recorder.failures,
    )
    if out_dir is not None:
        _write_atomic(out_dir / "summary.json", summary.model_dump_json(indent=2) + "\n")
        _write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in recorder.rounds))
    return Result(summary=summary, rounds=list(recorder.rounds), model=recorder.final_arrays, out_dir=out_dir)


def _simulate(spec: Spec, recorder: CoordinatorRecorder, *, timeout: float) -> None:
    try:
        from flwr.simulation import run_simulation
    except ImportError as exc:
        from fedcollab.core import ConfigError

        err = ConfigError("the simulation needs Flower: pip install 'fedcollab[node,coordinator]'")
        err.exit_code = 10
        raise err from exc
    client_app = make_client_app(spec)
    server_app = make_server_app(spec, recorder, timeout=timeout)
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


def run_demo(*, out: str | Path | None = None, progress: bool = True) -> Result:
    """Run the embedded Heart demo (four hospitals, record-level DP-SGD on)."""
    return run(DEMO_SPEC, out=out, progress=progress)
