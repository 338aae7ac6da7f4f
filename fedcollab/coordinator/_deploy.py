"""The coordinator's ServerApp in deployment (Flower's SuperLink runs it in ``flwr-serverapp``).

``fedcollab submit`` starts a Flower run whose bundle names ``fedcollab.coordinator._deploy:app``
as its ServerApp; the spec travels in the run config (``fedcollab-spec``, base64 TOML). The
coordinator's folder comes from the SuperLink's environment (``FEDCOLLAB_COORDINATOR_HOME``, set by
``fedcollab coordinator start``), never from whoever submits: the folder holds the coordinator's
signing key, the roster and one folder per run::

    HOME/signing_key.pem  HOME/roster.json
    HOME/runs/<flower run id>/spec.toml  status.json  ledger.jsonl  metrics.jsonl  checkpoints/  model.safetensors

A run that fails raises ``fedcollab exit N: ...``; Flower records that text as the run's details,
which is how ``fedcollab submit`` reports the true outcome (``flwr run`` always exits 0).
"""

from __future__ import annotations

import base64
import json
import os
import time
import tomllib
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import ConfigError, FedcollabError, NodeError, get_logger
from fedcollab.coordinator._exchange import PollingGrid
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.coordinator._server import CoordinatorRecorder, RoundRecord, make_server_app
from fedcollab.spec import Roster, Spec, parse_spec

log = get_logger("coordinator.deploy")

ENV_HOME = "FEDCOLLAB_COORDINATOR_HOME"
RUN_CONFIG_SPEC = "fedcollab-spec"
RUN_CONFIG_TIMEOUT = "fedcollab-timeout"
RUN_CONFIG_RESUME = "fedcollab-resume"  # the Flower run id of an interrupted run to continue ("" = a new run)
RUN_CONFIG_SCORE = "fedcollab-score"  # a vertical spec: the fedcollab run id of the trained run to score with ("" = train)
#: The longest wait between the ServerApp's polls for replies (Flower's HttpGrid sleeps 3 s between polls).
REPLY_POLL_SECONDS = 0.25
#: Prefix of a failed run's details, read back by ``fedcollab submit``.
EXIT_PREFIX = "fedcollab exit "


def encode_spec(text: str) -> str:
    """The run-config value carrying a spec's TOML text."""
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def decode_spec(value: str) -> tuple[str, Spec]:
    """The spec's text and the validated spec (its data sources are the nodes' business)."""
    try:
        text = base64.b64decode(value.encode("ascii"), validate=True).decode("utf-8")
        data = tomllib.loads(text)
    except (ValueError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"run config {RUN_CONFIG_SPEC!r} is not base64 TOML") from exc
    return text, parse_spec(data, source="the submitted spec")


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def run_dir(home: Path, flower_run_id: int) -> Path:
    """The folder of one Flower run at the coordinator."""
    return home / "runs" / str(flower_run_id)


def _main(grid: Any, context: Any) -> None:
    from fedcollab.crypto import generate_signing_key, load_signing_key

    home_env = os.environ.get(ENV_HOME)
    if not home_env:
        raise RuntimeError(f"{EXIT_PREFIX}2: the SuperLink was not started by `fedcollab coordinator start` ({ENV_HOME} unset)")
    home = Path(home_env)
    out = run_dir(home, int(context.run_id))
    out.mkdir(parents=True, exist_ok=True)
    status: dict[str, Any] = {"flower_run_id": int(context.run_id), "state": "starting", "rounds": [], "started": time.time()}

    def on_round(r: RoundRecord) -> None:
        status["rounds"].append({"round": r.round, "seconds": round(r.seconds, 4), "partners": r.partners_trained, "failures": r.failures,
                                 "accuracy": r.pooled.accuracy if r.pooled else None})
        status["state"] = "running"
        _write_json(out / "status.json", status)
        with open(out / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(r.to_dict()) + "\n")

    ledger: RunLedger | None = None
    recorder: CoordinatorRecorder | None = None
    try:
        text, spec = decode_spec(str(context.run_config.get(RUN_CONFIG_SPEC, "")))
        (out / "spec.toml").write_text(text)
        status.update(spec=spec.name, planned_rounds=spec.training.rounds)
        roster = Roster.model_validate_json((home / "roster.json").read_text())
        key_path = home / "signing_key.pem"
        key = load_signing_key(key_path) if key_path.exists() else generate_signing_key(key_path)
        run_id = uuid.uuid4().hex[:16]
        resume = None
        previous = str(context.run_config.get(RUN_CONFIG_RESUME, "") or "")
        score = str(context.run_config.get(RUN_CONFIG_SCORE, "") or "")
        if score and (spec.layout != "vertical" or previous):
            raise ConfigError("--score: scores new records of a vertical run (a vertical spec, not resumed), got "
                              + ("a resume" if previous else f"layout = {spec.layout!r}"))
        if previous and spec.layout == "vertical":
            run_id = _resume_vertical_from(run_dir(home, int(previous)), text, out)
            status.update(resumed_from=int(previous))
        elif previous:
            run_id, resume = _resume_from(run_dir(home, int(previous)), text, out, spec)
            status.update(resumed_from=int(previous), resumed_after_round=resume[0])
        status["fedcollab_run_id"] = run_id
        ledger = RunLedger(out / "ledger.jsonl", key=key, roster=roster, run_id=run_id)
        if previous and spec.layout == "vertical":
            ledger.heads.update(_node_heads(out / "ledger.jsonl"))  # the carried-over ledger's last entry of each node
        recorder = CoordinatorRecorder(checkpoint_dir=out / "checkpoints", on_round=on_round)
        if spec.layout == "vertical":
            # PSI and SecureBoost between the parties, relayed sealed (fedcollab/coordinator/_vertical.py);
            # a resumed run goes on from each node's own checkpoint.
            from fedcollab.coordinator._vertical import run_vertical

            timeout = float(spec.training.stage_timeout or context.run_config.get(RUN_CONFIG_TIMEOUT, 600.0))
            status.update(state="running", layout="vertical")
            _write_json(out / "status.json", status)
            if score:
                status.update(scoring=score)
            result = run_vertical(spec, PollingGrid(grid, longest=REPLY_POLL_SECONDS), ledger=ledger, timeout=timeout, resume=bool(previous),
                                  score=score or None)
            status.update(state="completed", exit_code=0, finished=time.time(), vertical=result,
                          accuracy=result.get("test_accuracy"), auc=result.get("test_auc"))
            _write_json(out / "status.json", status)
            return
        # A stage deadline from the spec bounds how long one silent node can stall an exchange.
        timeout = float(spec.training.stage_timeout or context.run_config.get(RUN_CONFIG_TIMEOUT, 600.0))
        inner = make_server_app(spec, recorder, ledger=ledger, timeout=timeout, resume=resume, fuse_evaluate=True)
        _write_json(out / "status.json", status)
        inner(PollingGrid(grid, longest=REPLY_POLL_SECONDS), context)
        if not recorder.finished:
            raise NodeError("the run ended before the last round")
    except FedcollabError as exc:
        code = int(getattr(exc, "exit_code", 1))
        codes = dict(getattr(exc, "codes", {}) or {})
        status.update(state="failed", exit_code=code, node_codes=codes, error=type(exc).__name__, finished=time.time())
        _write_json(out / "status.json", status)
        log.error("run %s failed: %s", context.run_id, exc)
        if ledger is not None:
            # The run ledger ends with a signed abort, which `audit verify` reports as aborted, not as tampered.
            failures = {k: list(v) for k, v in (recorder.failures if recorder is not None else {}).items()}
            for k, v in codes.items():
                if int(v) not in failures.setdefault(str(k), []):
                    failures[str(k)].append(int(v))
            try:
                ledger.abort(len(recorder.rounds) if recorder is not None else 0, reason=type(exc).__name__, exit_code=code, codes=failures)
            except Exception:  # noqa: BLE001 - the run's own error is what is reported
                log.exception("could not append the abort entry")
        raise RuntimeError(f"{EXIT_PREFIX}{code}: {type(exc).__name__} node codes {json.dumps(codes, sort_keys=True)}") from None
    except Exception as exc:
        log.exception("run %s failed", context.run_id)  # the coordinator's own log keeps the traceback
        status.update(state="failed", exit_code=1, error=type(exc).__name__, finished=time.time())
        _write_json(out / "status.json", status)
        raise RuntimeError(f"{EXIT_PREFIX}1: {type(exc).__name__}") from exc
    last = next((r for r in reversed(recorder.rounds) if r.pooled is not None), None)
    status.update(state="completed", exit_code=0, finished=time.time(), partners=dict(recorder.partners),
                  accuracy=last.pooled.accuracy if last and last.pooled else None,
                  auc=last.pooled.auc if last and last.pooled else None, failures=recorder.failures)
    if recorder.final_model is not None:
        # gbdt: the same model.json as in simulation (XGBoost's format, fedcollab's metadata in its attributes).
        from fedcollab.protocols.model_file import model_metadata
        from fedcollab.protocols.gbdt import write_tree_model

        n = len(spec.data_schema.encoded_features())
        meta = model_metadata(spec, scaling_method="none", mean=np.zeros(n), std=np.ones(n), run_id=status["fedcollab_run_id"])
        status["model"] = {"path": "model.json", "sha256": write_tree_model(recorder.final_model, out / "model.json", meta), "format": "xgboost-json"}
    elif recorder.final_arrays is not None and recorder.scaling is not None:
        # The same model file as in simulation: safetensors with feature names, encoding and scaling.
        from fedcollab.protocols.model_file import MODEL_FILE, model_metadata, save_model

        sc = recorder.scaling
        sha = save_model(recorder.final_arrays, out / MODEL_FILE,
                         model_metadata(spec, scaling_method=sc.method, mean=sc.mean, std=sc.std, run_id=status["fedcollab_run_id"]))
        status["model"] = {"path": MODEL_FILE, "sha256": sha, "format": "safetensors"}
    _write_json(out / "status.json", status)


def _carry_over(old: Path, spec_text: str, out: Path, load: Any = None) -> tuple[str, Any]:
    """The interrupted run's fedcollab run id (and what ``load()`` reads of it); its ledger is copied into ``out`` whole.

    Refused (a ConfigError, before any message) without a status, spec or checkpoint, with
    another spec than the submitted one, or when that run completed.
    """
    import shutil

    try:
        old_status = json.loads((old / "status.json").read_text())
        old_spec = (old / "spec.toml").read_text()
        run_id = str(old_status["fedcollab_run_id"])
        loaded = load() if load is not None else None
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot resume from {old}: no status, spec or checkpoint ({type(exc).__name__})") from None
    if old_spec != spec_text:
        raise ConfigError("resume: the submitted spec differs from the interrupted run's")
    if old_status.get("state") == "completed":
        raise ConfigError("resume: that run completed")
    shutil.copyfile(old / "ledger.jsonl", out / "ledger.jsonl")
    return run_id, loaded


def _resume_from(old: Path, spec_text: str, out: Path, spec: Any) -> tuple[str, tuple[int, dict[str, Any]]]:
    """The interrupted run's fedcollab run id and its last checkpoint; its ledger is carried over whole.

    The new Flower run continues the same fedcollab run (same run id, same ledger chain): rounds
    after the checkpoint are executed again and every node charges them as new releases. Under
    HE the encrypted checkpoint is copied into the new run's folder, where the HE session reads it.
    """
    import shutil

    from fedcollab.coordinator._he import HE_CHECKPOINT
    from fedcollab.coordinator._server import load_checkpoint

    run_id, (last, arrays) = _carry_over(old, spec_text, out, lambda: load_checkpoint(old / "checkpoints", spec))
    if spec.aggregation == "he":
        (out / "checkpoints").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(old / "checkpoints" / HE_CHECKPOINT, out / "checkpoints" / HE_CHECKPOINT)
    return run_id, (last, arrays)


def _resume_vertical_from(old: Path, spec_text: str, out: Path) -> str:
    """The interrupted vertical run's fedcollab run id; its ledger is carried over whole (the nodes hold the checkpoints)."""
    return _carry_over(old, spec_text, out)[0]


def _node_heads(path: Path) -> dict[str, str]:
    """Each node's last entry in a carried-over run ledger."""
    from fedcollab.privacy.accounting import parse_lines

    return {str(ln.entry["party"]): ln.hash for ln in parse_lines(path.read_bytes()) if ln.entry.get("party") != "coordinator"}


def _build_app() -> Any:
    from flwr.serverapp import ServerApp

    server = ServerApp()

    @server.main()
    def main(grid: Any, context: Any) -> None:
        _main(grid, context)

    return server


def __getattr__(name: str) -> Any:
    # Flower loads ``fedcollab.coordinator._deploy:app``; built on first access so that importing
    # this module (the CLI, tests) does not import Flower.
    if name == "app":
        global app
        app = _build_app()
        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
