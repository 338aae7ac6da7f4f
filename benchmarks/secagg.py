"""Secure aggregation benchmark: plain FedAvg, fedcollab SecAgg and Flower's legacy SecAgg+, side by side.

The same model, nodes, data and local training on every side: 5 nodes, each with 200 rows of a
synthetic binary task (13 standard-normal features, a noisy linear label; one CSV written to a
temporary folder, split per node 75/25), torch MLP ``13 -> H -> 1`` (fedcollab's ``mlp`` model,
``hidden = [H]``, same seeded initialisation everywhere), 1 local epoch of SGD (lr 0.05, batch 32,
fedcollab's ``train_model``), train + evaluate on all 5 nodes every round, on Flower's simulation
engine (Ray, ``num_cpus = 1`` per node, ``run_simulation`` in-process). Two sizes: H = 133
(1,996 parameters, "2k") and H = 40,000 (600,001 parameters, "600k").

Sides (each a fresh subprocess, so every run starts its own Ray):

* ``fedcollab-plain``:  ``fedcollab.run`` of the spec with ``aggregation = "plain"`` (FedAvg);
* ``fedcollab-secagg``: the same spec with ``aggregation = "secagg"`` (SecAgg+: a train exchange,
  then the four query exchanges advertise / share / masked / unmask, then evaluate; complete
  graph, t = 3, max_dropouts = 1, clip 10, scale 2^20, modulus 2^32; fresh keys every round);
* ``flower-plain``:     a bare Message-API app (``flwr.serverapp.strategy.FedAvg.start``);
* ``legacy-plain``:     Flower's legacy API: ``NumPyClient`` + ``LegacyContext`` + ``DefaultWorkflow``;
* ``legacy-secagg``:    the same with ``SecAggPlusWorkflow(num_shares=5, reconstruction_threshold=3)``
  and ``secaggplus_mod`` on the ClientApp (Flower's defaults otherwise: clipping range 8, 2^22
  quantisation levels, modulus 2^32).

Per-round time: from the round's first train configuration to its aggregated evaluation
(fedcollab: ``Result.rounds[i].seconds``; Flower: a timed strategy subclass), median over rounds
2..R (round 1 carries the ClientApp warm-up). Ratios: ``secagg_round_ratio_*`` = fedcollab
secagg / fedcollab plain, ``flower_secagg_round_ratio_*`` = legacy secagg / legacy plain.

Bytes: every ``send_and_receive`` of the in-memory grid is wrapped; the payload of each message
is counted as Flower's ``count_bytes`` counts it (array data; config/metric values: bool 1 byte,
int/float 8, str/bytes their length), plus record and field names; protobuf framing (a few
bytes per field) is left out. Setup and close
queries of fedcollab are excluded, so the figures are per node per training round (train,
secagg stages, evaluate). ``secagg_bytes_ratio`` = fedcollab secagg / fedcollab plain, bytes a
node sends per round, at 600k.

Run:  .venv/bin/python benchmarks/secagg.py [--rounds 6] [--quick]
"""

from __future__ import annotations

import argparse
import os
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import _bench  # sets Flower's offline environment before flwr is imported (benchmarks/ is sys.path[0])

N_NODES = 5
ROWS_PER_NODE = 200
N_FEATURES = 13
SEED = 7
#: Hidden width -> parameters of MLP(13 -> H -> 1): 15 H + 1.
SIZES = {"2k": 133, "600k": 40_000}
SIDES = ("fedcollab-plain", "fedcollab-secagg", "flower-plain", "legacy-plain", "legacy-secagg")
GOAL_ROUND_RATIO = 1.3
GOAL_BYTES_RATIO = 1.1


# --- data and spec --------------------------------------------------------------------------


def write_data(folder: Path) -> Path:
    """One CSV of 5 sites x 200 rows: 13 N(0, 1) features (clipped to +-5), label of a noisy linear rule."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    w = rng.normal(size=N_FEATURES)
    lines = ["site," + ",".join(f"f{i}" for i in range(N_FEATURES)) + ",y"]
    for s in range(N_NODES):
        x = np.clip(rng.normal(size=(ROWS_PER_NODE, N_FEATURES)), -5, 5)
        y = (x @ w + rng.normal(scale=1.0, size=ROWS_PER_NODE) > 0).astype(int)
        for row, label in zip(x, y, strict=True):
            lines.append(f"s{s + 1}," + ",".join(f"{v:.5f}" for v in row) + f",{label}")
    path = folder / "synthetic.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def spec_text(*, hidden: int, aggregation: str, rounds: int) -> str:
    """The fedcollab spec of the benchmark (data: ``synthetic.csv`` next to the spec)."""
    out = [f'schema_version = 1\nname = "secagg-bench-{aggregation}-{hidden}"\nseed = {SEED}\naggregation = "{aggregation}"\n']
    for s in range(N_NODES):
        out.append(f'[[partners]]\nname = "site{s + 1}"\nsource = {{ path = "synthetic.csv", where = {{ site = "s{s + 1}" }} }}\n'
                   f"split = {{ test_fraction = 0.25, seed = {SEED} }}\n")
    feats = ", ".join(f'"f{i}"' for i in range(N_FEATURES))
    levels = ", ".join(f'"s{s + 1}"' for s in range(N_NODES))
    out.append(f'[schema]\nfeatures = [{feats}]\nlabel = {{ column = "y", positive_above = 0 }}\nmissing = "error"\n')
    out.append(f'[[schema.columns]]\nname = "site"\ntype = "category"\nlevels = [{levels}]\n')
    for i in range(N_FEATURES):
        out.append(f'[[schema.columns]]\nname = "f{i}"\ntype = "number"\nbounds = [-5, 5]\n')
    out.append('[[schema.columns]]\nname = "y"\ntype = "number"\nbounds = [0, 1]\ninteger = true\n')
    out.append(f'[model]\nkind = "mlp"\nhidden = [{hidden}]\n')
    out.append(f'[training]\nrounds = {rounds}\nlocal_epochs = 1\nbatch_size = 32\nlearning_rate = 0.05\noptimizer = "sgd"\nstrategy = "fedavg"\n')
    out.append('[privacy]\nmode = "none"\n')
    if aggregation == "secagg":
        out.append("[secagg]\nmax_dropouts = 1\nclip = 10.0\n")
    out.append('[preprocessing]\nscaling = "none"\n')
    return "\n".join(out)


def load_bench_spec(data_dir: Path, *, hidden: int, aggregation: str, rounds: int) -> Any:
    from fedcollab.spec import load_spec

    path = data_dir / f"spec-{aggregation}-{hidden}.toml"
    path.write_text(spec_text(hidden=hidden, aggregation=aggregation, rounds=rounds))
    return load_spec(path)


# --- byte and exchange accounting (wraps the in-memory grid of run_simulation) ---------------


def payload_bytes(content: Any) -> int:
    """Bytes of a RecordDict's payload as Flower's ``count_bytes`` counts them, plus record/field names."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    total = 0
    for name, rec in content.items():
        total += len(name)
        if isinstance(rec, ArrayRecord):
            for k, arr in rec.items():
                total += len(k) + len(arr.data) + len(arr.dtype) + len(arr.stype) + 8 * len(arr.shape)
        elif isinstance(rec, (ConfigRecord, MetricRecord)):
            # Flower's own count_bytes fails on an empty list value, so count the same way here.
            for k, v in rec.items():
                total += len(k) + sum(_value_bytes(x) for x in (v if isinstance(v, list) else [v]))
    return total


def _value_bytes(v: Any) -> int:
    """Like Flower's ``count_bytes``: bool 1, int/float 8 (protobuf 64-bit), str/bytes their length."""
    if isinstance(v, bool):
        return 1
    if isinstance(v, (int, float)):
        return 8
    return len(v)


def _tag(msg: Any) -> str:
    mt = str(msg.metadata.message_type)
    for rec in msg.content.config_records.values():
        if "fedcollab.kind" in rec:
            return f"{mt}:{rec['fedcollab.kind']}"
    if "secaggplus_configs" in msg.content.config_records:  # flwr.common.secure_aggregation.secaggplus_constants
        return f"{mt}:secagg+.{msg.content.config_records['secaggplus_configs'].get('stage', '?')}"
    return mt


class Meter:
    """Per exchange tag: calls, seconds in send_and_receive, bytes down (requests) and up (replies)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = defaultdict(int)
        self.seconds: dict[str, list[float]] = defaultdict(list)
        self.down: dict[str, int] = defaultdict(int)
        self.up: dict[str, int] = defaultdict(int)
        self.up_msgs: dict[str, int] = defaultdict(int)
        # Per message at the node: the Ray actor round trip (ClientApp call, message and context
        # transfer) and the bytes of node state (context.state) shipped with it each way.
        self.node_seconds: dict[str, list[float]] = defaultdict(list)
        self.node_state: dict[str, int] = defaultdict(int)

    def install(self) -> None:
        from flwr.superlink.grid import InMemoryGrid

        from fedcollab.coordinator import PollingGrid

        meter = self

        def metered(orig: Any) -> Any:
            def send_and_receive(self: Any, messages: Any, *, timeout: float | None = None, **kw: Any) -> Any:
                msgs = list(messages)
                if not msgs:
                    return orig(self, msgs, timeout=timeout, **kw)
                tag = _tag(msgs[0])
                meter.down[tag] += sum(payload_bytes(m.content) for m in msgs)
                t0 = time.perf_counter()
                replies = list(orig(self, msgs, timeout=timeout, **kw))
                meter.seconds[tag].append(time.perf_counter() - t0)
                meter.calls[tag] += 1
                for r in replies:
                    if not r.has_error():
                        meter.up[tag] += payload_bytes(r.content)
                        meter.up_msgs[tag] += 1
                return replies

            return send_and_receive

        # Flower's strategies exchange through InMemoryGrid.send_and_receive; fedcollab's coordinator wraps the grid in
        # PollingGrid (push, then short polls), which never calls it: both are metered, each exchange once.
        InMemoryGrid.send_and_receive = metered(InMemoryGrid.send_and_receive)  # type: ignore[method-assign]
        PollingGrid.send_and_receive = metered(PollingGrid.send_and_receive)  # type: ignore[method-assign]

        from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

        orig_process = RayBackend.process_message

        def process_message(self: Any, message: Any, context: Any) -> Any:
            tag = _tag(message)
            t0 = time.perf_counter()
            out = orig_process(self, message, context)
            meter.node_seconds[tag].append(time.perf_counter() - t0)
            meter.node_state[tag] = max(meter.node_state[tag], payload_bytes(out[1].state))
            return out

        RayBackend.process_message = process_message  # type: ignore[method-assign]

    def to_dict(self) -> dict[str, Any]:
        return {"calls": dict(self.calls), "seconds": dict(self.seconds), "down": dict(self.down), "up": dict(self.up),
                "up_msgs": dict(self.up_msgs), "node_seconds": dict(self.node_seconds), "node_state": dict(self.node_state)}


def _backend() -> dict[str, Any]:
    return {"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False}}


def _quiet_flower() -> None:
    logging.getLogger("flwr").setLevel(logging.ERROR)


# --- sides --------------------------------------------------------------------------------------


def run_fedcollab(data_dir: Path, hidden: int, rounds: int, aggregation: str) -> dict[str, Any]:
    import fedcollab

    spec = load_bench_spec(data_dir, hidden=hidden, aggregation=aggregation, rounds=rounds)
    t0 = time.perf_counter()
    result = fedcollab.run(spec, progress=False)
    total = time.perf_counter() - t0
    return {"seconds": total, "per_round": [r.seconds for r in result.rounds], "n_params": result.summary.model.n_parameters,
            "accuracy": result.summary.metrics.pooled_test.accuracy}


def _local_data(data_dir: Path, hidden: int, rounds: int) -> tuple[Any, list[tuple[Any, Any, Any, Any]]]:
    import numpy as np

    from fedcollab.data import load_partner_data

    spec = load_bench_spec(data_dir, hidden=hidden, aggregation="plain", rounds=rounds)
    parts = [load_partner_data(spec, p.name) for p in spec.partners]  # scaling = "none" on every side
    return spec, [(p.x_train.astype(np.float32), p.y_train.astype(np.float32), p.x_test.astype(np.float32), p.y_test.astype(np.float32))
                  for p in parts]


def _train(spec: Any, arrays: dict[str, Any], x: Any, y: Any, rnd: int) -> tuple[Any, Any]:
    """fedcollab's own local training (1 epoch SGD), so every side trains identically."""
    from fedcollab.models import build_model, model_arrays, set_model_arrays
    from fedcollab.node._training import train_model

    model = build_model(spec.model, x.shape[1], seed=spec.seed)
    set_model_arrays(model, arrays)
    train_model(model, x, y, training=spec.training, plan=None, shuffle_seed=spec.seed * 1000 + rnd)
    return model, model_arrays(model)


def _evaluate(spec: Any, arrays: dict[str, Any], x: Any, y: Any) -> tuple[float, float]:
    import torch
    from torch import nn

    from fedcollab.models import build_model, set_model_arrays

    model = build_model(spec.model, x.shape[1], seed=spec.seed)
    set_model_arrays(model, arrays)
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x))
        yt = torch.from_numpy(y)
        loss = float(nn.functional.binary_cross_entropy_with_logits(logits, yt))
        acc = float(((logits >= 0).float() == yt).float().mean())
    return loss, acc


def run_flower(data_dir: Path, hidden: int, rounds: int) -> dict[str, Any]:
    """Bare Message-API FedAvg (``flwr.serverapp.strategy.FedAvg.start``)."""
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from fedcollab.models import build_model, model_arrays

    t_start = time.perf_counter()
    spec, data = _local_data(data_dir, hidden, rounds)
    init = model_arrays(build_model(spec.model, N_FEATURES, seed=spec.seed))
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        x, y, _, _ = data[int(context.node_config["partition-id"])]
        rec = msg.content["arrays"]
        _, new = _train(spec, {k: rec[k].numpy() for k in rec}, x, y, int(msg.content["config"]["server-round"]))
        content = RecordDict({"arrays": ArrayRecord(array_dict={k: _arr(v) for k, v in new.items()}),
                              "metrics": MetricRecord({"num-examples": len(y)})})
        return Message(content=content, reply_to=msg)

    @client.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        _, _, x, y = data[int(context.node_config["partition-id"])]
        rec = msg.content["arrays"]
        loss, acc = _evaluate(spec, {k: rec[k].numpy() for k in rec}, x, y)
        return Message(content=RecordDict({"metrics": MetricRecord({"eval_loss": loss, "eval_acc": acc, "num-examples": len(y)})}), reply_to=msg)

    server = ServerApp()
    box: dict[str, Any] = {}

    TimedFedAvg = _bench.timed_fedavg()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = TimedFedAvg(fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=N_NODES,
                               min_evaluate_nodes=N_NODES, min_available_nodes=N_NODES)
        result = strategy.start(grid=grid, initial_arrays=ArrayRecord(array_dict={k: _arr(v) for k, v in init.items()}), num_rounds=rounds)
        box["per_round"] = [strategy.round_seconds[r] for r in sorted(strategy.round_seconds)]
        last = result.evaluate_metrics_clientapp.get(rounds)
        box["accuracy"] = float(last["eval_acc"]) if last is not None else None

    _quiet_flower()
    run_simulation(server_app=server, client_app=client, num_supernodes=N_NODES, backend_config=_backend())
    if "per_round" not in box:
        raise RuntimeError("the Flower ServerApp did not finish")
    return {"seconds": time.perf_counter() - t_start, "per_round": box["per_round"], "n_params": int(sum(v.size for v in init.values())),
            "accuracy": box["accuracy"]}


def _arr(v: Any) -> Any:
    import numpy as np
    from flwr.app import Array

    return Array(np.ascontiguousarray(v))


def run_legacy(data_dir: Path, hidden: int, rounds: int, secure: bool) -> dict[str, Any]:
    """Flower's legacy API: NumPyClient, LegacyContext, DefaultWorkflow (with SecAggPlusWorkflow if ``secure``)."""
    from flwr.app import Context
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import ndarrays_to_parameters
    from flwr.serverapp import Grid, ServerApp
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.simulation import run_simulation

    from fedcollab.models import build_model, model_arrays

    t_start = time.perf_counter()
    spec, data = _local_data(data_dir, hidden, rounds)
    init = model_arrays(build_model(spec.model, N_FEATURES, seed=spec.seed))
    names = list(init)

    class Client(NumPyClient):
        def __init__(self, pid: int) -> None:
            self.pid = pid

        def fit(self, parameters, config):  # type: ignore[no-untyped-def]
            x, y, _, _ = data[self.pid]
            _, new = _train(spec, dict(zip(names, parameters, strict=True)), x, y, int(config.get("server_round", 0)))
            return [new[k] for k in names], len(y), {}

        def evaluate(self, parameters, config):  # type: ignore[no-untyped-def]
            _, _, x, y = data[self.pid]
            loss, acc = _evaluate(spec, dict(zip(names, parameters, strict=True)), x, y)
            return loss, len(y), {"accuracy": acc}

    def client_fn(context: Context) -> Any:
        return Client(int(context.node_config["partition-id"])).to_client()

    client = ClientApp(client_fn=client_fn, mods=[secaggplus_mod] if secure else [])
    box: dict[str, Any] = {}

    class TimedFedAvg(FedAvg):
        round_start: dict[int, float] = {}
        round_seconds: dict[int, float] = {}
        accuracy: dict[int, float] = {}

        def configure_fit(self, server_round, parameters, client_manager):  # type: ignore[no-untyped-def]
            self.round_start[server_round] = time.perf_counter()
            cfg = super().configure_fit(server_round, parameters, client_manager)
            for _, fitins in cfg:
                fitins.config["server_round"] = server_round
            return cfg

        def aggregate_evaluate(self, server_round, results, failures):  # type: ignore[no-untyped-def]
            out = super().aggregate_evaluate(server_round, results, failures)
            n = sum(r.num_examples for _, r in results)
            self.accuracy[server_round] = sum(float(r.metrics["accuracy"]) * r.num_examples for _, r in results) / max(n, 1)
            self.round_seconds[server_round] = time.perf_counter() - self.round_start[server_round]
            return out

    strategy = TimedFedAvg(fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=N_NODES, min_evaluate_clients=N_NODES,
                           min_available_clients=N_NODES, initial_parameters=ndarrays_to_parameters([init[k] for k in names]))
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        ctx = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        if secure:
            # 5 nodes, every node shares with the 4 others (num_shares counts the node itself), t = 3:
            # the same graph and threshold as fedcollab's spec. Flower's defaults otherwise.
            workflow = DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(num_shares=N_NODES, reconstruction_threshold=3))
        else:
            workflow = DefaultWorkflow()
        workflow(grid, ctx)
        box["per_round"] = [strategy.round_seconds[r] for r in sorted(strategy.round_seconds)]
        box["accuracy"] = strategy.accuracy.get(rounds)

    _quiet_flower()
    run_simulation(server_app=server, client_app=client, num_supernodes=N_NODES, backend_config=_backend())
    if "per_round" not in box or len(box["per_round"]) != rounds:
        raise RuntimeError("the legacy Flower ServerApp did not finish every round")
    return {"seconds": time.perf_counter() - t_start, "per_round": box["per_round"], "n_params": int(sum(v.size for v in init.values())),
            "accuracy": box["accuracy"]}


def run_side(side: str, data_dir: Path, hidden: int, rounds: int) -> dict[str, Any]:
    meter = Meter()
    meter.install()
    if side == "fedcollab-plain":
        res = run_fedcollab(data_dir, hidden, rounds, "plain")
    elif side == "fedcollab-secagg":
        res = run_fedcollab(data_dir, hidden, rounds, "secagg")
    elif side == "flower-plain":
        res = run_flower(data_dir, hidden, rounds)
    elif side == "legacy-plain":
        res = run_legacy(data_dir, hidden, rounds, secure=False)
    elif side == "legacy-secagg":
        res = run_legacy(data_dir, hidden, rounds, secure=True)
    else:
        raise ValueError(side)
    res.update(side=side, hidden=hidden, rounds=rounds, meter=meter.to_dict())
    return res


def _heavy_imports() -> None:
    """Imports every side needs, before any timer."""
    import flwr.clientapp  # noqa: F401
    import flwr.server.workflow  # noqa: F401
    import flwr.serverapp  # noqa: F401
    import flwr.simulation  # noqa: F401
    import torch  # noqa: F401

    import fedcollab.data  # noqa: F401
    import fedcollab.runner  # noqa: F401


def child(side: str, data_dir: Path, hidden: int, rounds: int) -> int:
    _heavy_imports()
    return _bench.emit_child_result(run_side(side, data_dir, hidden, rounds))


def measure(side: str, data_dir: Path, hidden: int, rounds: int) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", side, "--data", str(data_dir), "--hidden", str(hidden),
           "--rounds", str(rounds)]
    return _bench.run_child(cmd, label=f"{side} (H = {hidden})")


# --- summary ----------------------------------------------------------------------------------


def _is_round_traffic(tag: str) -> bool:
    return tag not in ("query:setup", "query:close")


def summarise(res: dict[str, Any]) -> dict[str, Any]:
    """Median round (2..R), per-round exchanges, bytes per node per round, median exchange times (rounds 2..R)."""
    per_round = res["per_round"]
    steady = per_round[1:] or per_round
    m = res["meter"]
    rounds = res["rounds"]
    tags = [t for t in m["calls"] if _is_round_traffic(t)]
    up = sum(m["up"].get(t, 0) for t in tags)
    down = sum(m["down"].get(t, 0) for t in tags)
    return {
        "median": statistics.median(steady),
        "mean": statistics.fmean(steady),
        "first": per_round[0],
        "exchanges": sum(m["calls"][t] for t in tags) / rounds,
        "up": up / (rounds * N_NODES),
        "down": down / (rounds * N_NODES),
        "by_tag": {t: {"calls": m["calls"][t], "seconds": statistics.median(m["seconds"][t][1:] or m["seconds"][t]),
                       "up": m["up"].get(t, 0) / max(m["up_msgs"].get(t, 0), 1), "down": m["down"].get(t, 0) / (m["calls"][t] * N_NODES),
                       # node side: median over the messages of rounds 2..R (the first N_NODES carry the warm-up)
                       "node": statistics.median(m["node_seconds"][t][N_NODES:] or m["node_seconds"][t]) if m["node_seconds"].get(t) else None,
                       "state": m["node_state"].get(t)}
                   for t in tags},
    }


def protocol_compute(length: int) -> dict[str, float]:
    """The pure SecAgg+ round in memory (5 nodes, every message through its wire form) and one mask expansion."""
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedcollab.crypto import expand_mask
    from fedcollab.protocols import secagg
    from fedcollab.protocols.quantize import decode_update, encode_update

    names = [f"site{i + 1}" for i in range(N_NODES)]
    cfg = secagg.SecAggConfig(run_id="bench", round=1, participants=tuple(names), k=1000, threshold=3, max_dropouts=1, bits=32, length=length)
    keys = {n: Ed25519PrivateKey.generate() for n in names}
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    vecs = {n: encode_update(rng.normal(scale=0.01, size=length - 1), weight=150, max_weight=150, clip=10.0, scale=2.0**20, bits=32,
                             n_parties=N_NODES) for n in names}
    t_enc = (time.perf_counter() - t0) / N_NODES
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        total, _ = secagg.run_round_in_memory(vecs, cfg=cfg, signing_keys=keys, through_wire=True)
        best = min(best, time.perf_counter() - t0)
    t0 = time.perf_counter()
    decode_update(total, max_weight=150, scale=2.0**20, bits=32)
    t_dec = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):
        expand_mask(os.urandom(32), length, dtype=np.uint32)
    t_mask = (time.perf_counter() - t0) / 5
    return {"round_all_nodes": best, "encode_per_node": t_enc, "decode": t_dec, "mask": t_mask}


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.3f} MB" if n >= 1e5 else f"{n / 1e3:.2f} kB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 epilog="The last line of stdout is a JSON object with the round and bytes ratios.")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (default 6); the median is over rounds 2..R")
    ap.add_argument("--quick", action="store_true", help="the 2k-parameter model only (the 600k keys of the JSON are null)")
    ap.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--hidden", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.data, args.hidden, args.rounds)
    if args.rounds < 2:
        ap.error("--rounds must be >= 2 (round 1 is left out of the median)")

    from rich.console import Console
    from rich.table import Table

    out = Console(width=None if sys.stdout.isatty() else 180)
    err = Console(stderr=True)
    sizes = {"2k": SIZES["2k"]} if args.quick else dict(SIZES)
    t_all = time.perf_counter()
    results: dict[str, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="fedcollab-secagg-bench-") as tmp:
        data_dir = Path(tmp)
        write_data(data_dir)
        for label, hidden in sizes.items():
            results[label] = {}
            for side in SIDES:
                err.print(f"[bold]{label}[/bold] {side} ...", end=" ")
                res = measure(side, data_dir, hidden, args.rounds)
                s = summarise(res)
                res["summary"] = s
                results[label][side] = res
                acc = res.get("accuracy")
                err.print(f"{res['process_seconds']:.1f}s, median round {s['median']:.3f}s, "
                          f"sent {_fmt_bytes(s['up'])}/node/round, final acc {'n/a' if acc is None else round(acc, 3)}")

    ratios: dict[str, dict[str, float]] = {}
    for label, rs in results.items():
        sm = {k: v["summary"] for k, v in rs.items()}
        ratios[label] = {
            "secagg_round": sm["fedcollab-secagg"]["median"] / sm["fedcollab-plain"]["median"],
            "flower_secagg_round": sm["legacy-secagg"]["median"] / sm["legacy-plain"]["median"],
            "secagg_bytes": sm["fedcollab-secagg"]["up"] / sm["fedcollab-plain"]["up"],
            "flower_secagg_bytes": sm["legacy-secagg"]["up"] / sm["legacy-plain"]["up"],
        }
        table = Table(title=f"{label} model ({rs['fedcollab-plain']['n_params']:,} parameters), {N_NODES} nodes, {args.rounds} rounds; "
                            f"round time: median of rounds 2..{args.rounds}; bytes: per node per round")
        for col in ("side", "round (s)", "x own plain", "x bare Flower", "mean (s)", "round 1 (s)", "exchanges", "sent", "x own plain",
                    "received", "acc", "run (s)"):
            table.add_column(col, justify="left" if col == "side" else "right", no_wrap=True)
        base = {"fedcollab-secagg": "fedcollab-plain", "legacy-secagg": "legacy-plain"}
        for side in SIDES:
            s = rs[side]["summary"]
            b = sm[base.get(side, side)]
            acc = rs[side].get("accuracy")
            table.add_row(side, f"{s['median']:.3f}", f"{s['median'] / b['median']:.2f}x", f"{s['median'] / sm['flower-plain']['median']:.2f}x",
                          f"{s['mean']:.3f}", f"{s['first']:.2f}", f"{s['exchanges']:.0f}", _fmt_bytes(s["up"]), f"{s['up'] / b['up']:.3f}x",
                          _fmt_bytes(s["down"]), "n/a" if acc is None else f"{acc:.3f}", f"{rs[side]['process_seconds']:.1f}")
        out.print(table)

    # Where a round goes: the time of each exchange as the coordinator sees it (send_and_receive for all
    # nodes, which includes the simulation's 0.1 s polling), and what is left outside the exchanges.
    big = "600k" if "600k" in results else "2k"
    prof = Table(title=f"where a round goes ({big}), medians over rounds 2..{args.rounds}: one exchange (send_and_receive to all "
                       f"{N_NODES} nodes, 2 run at a time); one node's message (Ray actor round trip); bytes per node per message")
    for col in ("side", "exchange", "seconds", "node, per message (s)", "node state carried", "sent", "received"):
        prof.add_column(col, justify="left" if col in ("side", "exchange") else "right", no_wrap=True)
    for side in ("fedcollab-plain", "fedcollab-secagg", "legacy-plain", "legacy-secagg"):
        s = results[big][side]["summary"]
        tot = 0.0
        for tag, v in s["by_tag"].items():
            prof.add_row(side, tag, f"{v['seconds']:.3f}", "" if v["node"] is None else f"{v['node']:.3f}",
                         "" if v["state"] is None else _fmt_bytes(v["state"]), _fmt_bytes(v["up"]), _fmt_bytes(v["down"]))
            tot += v["seconds"] * v["calls"] / results[big][side]["rounds"]
        prof.add_row(side, "[i]sum of exchanges[/i]", f"{tot:.3f}", "", "", "", "")
        prof.add_row(side, "[i]rest of the round (coordinator)[/i]", f"{s['median'] - tot:.3f}", "", "", "", "", end_section=True)
    out.print(prof)
    length = 15 * sizes[big] + 2
    pc = protocol_compute(length)
    out.print(f"Pure SecAgg+ compute at {length - 1:,} parameters (fedcollab.protocols, in memory, through the wire forms, this process): "
              f"a whole round for all {N_NODES} nodes {pc['round_all_nodes'] * 1e3:.0f} ms; encode one update "
              f"{pc['encode_per_node'] * 1e3:.1f} ms; decode {pc['decode'] * 1e3:.1f} ms; one AES-CTR mask {pc['mask'] * 1e3:.2f} ms.")
    for label in results:
        r = ratios[label]
        out.print(f"{label}: fedcollab secagg / plain per round {r['secagg_round']:.2f}x (goal <= {GOAL_ROUND_RATIO} at 600k); "
                  f"Flower legacy secagg / plain {r['flower_secagg_round']:.2f}x; bytes sent per node: fedcollab {r['secagg_bytes']:.4f}x "
                  f"(goal <= {GOAL_BYTES_RATIO}), Flower legacy {r['flower_secagg_bytes']:.3f}x")
    if "600k" in ratios:
        r = ratios["600k"]
        ok_t, ok_b = r["secagg_round"] <= GOAL_ROUND_RATIO, r["secagg_bytes"] <= GOAL_BYTES_RATIO
        out.print("goals at 600k: round ratio " + ("[green]met[/green]" if ok_t else "[red]not met[/red]")
                  + ", bytes ratio " + ("[green]met[/green]" if ok_b else "[red]not met[/red]"))
    out.print(f"(total {time.perf_counter() - t_all:.0f} s)")
    out.file.flush()

    def r4(label: str, key: str) -> float | None:
        return round(ratios[label][key], 4) if label in ratios else None

    payload = {
        "secagg_round_ratio_600k": r4("600k", "secagg_round"),
        "flower_secagg_round_ratio_600k": r4("600k", "flower_secagg_round"),
        "secagg_bytes_ratio": r4("600k", "secagg_bytes"),
        "secagg_round_ratio_2k": r4("2k", "secagg_round"),
        "flower_secagg_round_ratio_2k": r4("2k", "flower_secagg_round"),
    }
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
