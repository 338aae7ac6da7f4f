"""A fedcollab spec as a plain Flower app: the ServerApp and ClientApp that ``flwr run .`` starts.

``fedcollab new NAME`` writes an app folder whose ``server_app.py`` / ``client_app.py`` call these
two factories (docs/flower-apps.md). Both are built from fedcollab's own factories
(:func:`~fedcollab.coordinator.make_server_app`, :func:`~fedcollab.node.make_client_app`), so the
node's policy, budget and ledger hold exactly as under ``fedcollab run``. The coordinator side
prepares the simulated partners' node folders and the roster in ``out`` before it sends its first
message; the node side reads them when its first message arrives.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from fedcollab.spec import Roster, Spec, load_spec

#: Run-config key (``[tool.flwr.app.config]`` or ``flwr run --run-config``) of the output folder.
RUN_CONFIG_OUT = "out-dir"


def _spec(spec_path: str | Path, base_dir: str | Path | None) -> Spec:
    spec = load_spec(spec_path)
    return spec.with_base_dir(str(base_dir)) if base_dir else spec


def _out(context: Any, default: str | Path) -> Path:
    value = str(context.run_config.get(RUN_CONFIG_OUT, "") or "") if context.run_config else ""
    return Path(value or default)


def flower_server_app(spec_path: str | Path, *, out: str | Path, base_dir: str | Path | None = None, timeout: float = 600.0) -> Any:
    """A Flower ServerApp coordinating the spec at ``spec_path``; writes ledger, roster, metrics and model to ``out``.

    ``base_dir``: folder the spec's relative data paths resolve against (default the spec's folder).
    """
    from flwr.serverapp import ServerApp

    from fedcollab.coordinator import CoordinatorRecorder, RunLedger, make_server_app
    from fedcollab.protocols.model_file import MODEL_FILE, model_metadata, save_model
    from fedcollab.runner._run import _coordinator_and_roster, _keep_previous_ledger, _write_atomic, prepare_simulated_nodes

    app = ServerApp()

    @app.main()
    def main(grid: Any, context: Any) -> None:
        spec = _spec(spec_path, base_dir)
        out_dir = _out(context, out)
        out_dir.mkdir(parents=True, exist_ok=True)
        homes = prepare_simulated_nodes(spec, out_dir / "nodes")
        key, roster = _coordinator_and_roster(out_dir, homes)
        ledger_path = out_dir / "ledger.jsonl"
        if ledger_path.exists():
            _keep_previous_ledger(ledger_path)
        run_id = uuid.uuid4().hex[:16]
        ledger = RunLedger(ledger_path, key=key, roster=roster, run_id=run_id)
        recorder = CoordinatorRecorder(checkpoint_dir=out_dir / "checkpoints")
        t0 = time.perf_counter()
        make_server_app(spec, recorder, ledger=ledger, timeout=timeout)(grid, context)
        _write_atomic(out_dir / "metrics.jsonl", "".join(json.dumps(r.to_dict()) + "\n" for r in recorder.rounds))
        if recorder.final_arrays is not None and recorder.scaling is not None:
            sc = recorder.scaling
            save_model(recorder.final_arrays, out_dir / MODEL_FILE,
                       model_metadata(spec, scaling_method=sc.method, mean=sc.mean, std=sc.std, run_id=run_id))
        _write_atomic(out_dir / "run.json", json.dumps({"run_id": run_id, "rounds": len(recorder.rounds), "finished": recorder.finished,
                                                         "wall_seconds": round(time.perf_counter() - t0, 3)}, indent=2) + "\n")

    return app


def flower_client_app(spec_path: str | Path, *, out: str | Path, base_dir: str | Path | None = None) -> Any:
    """A Flower ClientApp: a simulated partner of the spec (its node folder under ``out/nodes``)."""
    from flwr.clientapp import ClientApp

    from fedcollab.node import make_client_app

    inner: dict[str, Any] = {}

    def node_app(context: Any) -> Any:
        out_dir = _out(context, out)
        key = str(out_dir)
        if key not in inner:
            spec = _spec(spec_path, base_dir)
            # Written by the ServerApp before its first message (the roster is exchanged out of band in deployment).
            roster = Roster.model_validate_json((out_dir / "roster.json").read_text())
            homes = {p.name: str(out_dir / "nodes" / p.name) for p in spec.partners}
            inner[key] = make_client_app(spec, homes, {k: v.signing_key for k, v in roster.parties.items()})
        return inner[key]

    app = ClientApp()

    @app.query()
    def query(msg: Any, context: Any) -> Any:
        return node_app(context)(msg, context)

    @app.train()
    def train(msg: Any, context: Any) -> Any:
        return node_app(context)(msg, context)

    @app.evaluate()
    def evaluate(msg: Any, context: Any) -> Any:
        return node_app(context)(msg, context)

    return app
