"""Pieces every benchmark shares: Flower's offline environment, one measured run per child
process, and a FedAvg that times its rounds the way fedcollab does.

Importing this module sets the environment; do it before anything imports flwr.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedcollab.runner._run import set_flower_env

set_flower_env()

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 600


def emit_child_result(res: dict[str, Any]) -> int:
    """A child's result, as the last line of its stdout."""
    sys.stdout.flush()
    sys.stdout.write("\n" + json.dumps(res) + "\n")
    sys.stdout.flush()
    return 0


def run_child(cmd: list[str], *, label: str) -> dict[str, Any]:
    """Run ``cmd`` (a benchmark's ``--child`` mode) and read its JSON result; adds ``process_seconds``."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-2000:] + proc.stderr[-4000:])
        raise RuntimeError(f"the {label} child failed with exit code {proc.returncode}")
    res = json.loads(lines[-1])
    res["process_seconds"] = time.perf_counter() - t0
    return res


def timed_fedavg() -> type:
    """flwr's Message-API FedAvg, timing each round from configure_train to the evaluate aggregate."""
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.round_start: dict[int, float] = {}
            self.round_seconds: dict[int, float] = {}

        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            self.round_start[server_round] = time.perf_counter()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_evaluate(self, server_round, replies):  # type: ignore[no-untyped-def]
            out = super().aggregate_evaluate(server_round, replies)
            self.round_seconds[server_round] = time.perf_counter() - self.round_start[server_round]
            return out

    return TimedFedAvg
