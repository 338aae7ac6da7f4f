"""One round loop for every aggregation mode, and the plain (and partner-level central DP) strategy.

:func:`run_rounds` owns what every mode shares: the rounds to run (a resumed run starts after its
checkpoint), the evaluation cadence (``training.evaluate_every`` and the last round), when a
checkpoint is written (after the round's aggregate, only a finite one), and the round record
(written once, by :func:`record_round`). What differs between modes is an *aggregation strategy*
object with four methods, which the loop calls in this order every round:

* ``train(rnd, evaluate_previous) -> Trained``: the round's training and its aggregate;
* ``checkpoint(directory, rnd)``: the round's checkpoint (plain arrays, or the encrypted aggregate under HE);
* ``evaluate(rnd, evaluating, failed) -> {partner: metrics parts} | None``: the federated
  evaluation (``{}`` when the cadence skips it; ``None`` when it rides on the next round's train
  message, deployment's fused evaluation, whose parts then come back in the next ``Trained.deferred``);
* ``finish(last_round)`` once after the last round.

Strategies: :class:`PlainRounds` (Flower's Message-API strategies, or partner-level central DP),
``SecaggRounds`` (``fedcollab.coordinator._secagg``), ``HeSession`` (``fedcollab.coordinator._he``).
Tree runs (``kind = "gbdt"``) run their own step loop (``fedcollab.coordinator._gbdt``): a tree is
many steps, not one train and one evaluate.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedcollab.core import NodeError, NodeErrorCode, ProtocolError, get_logger
from fedcollab.protocols.evaluation import PooledMetrics, pooled_metrics
from fedcollab.protocols.quantize import flatten_arrays, unflatten_arrays
from fedcollab.protocols.wire import RecordKey
from fedcollab.spec import Spec

log = get_logger("coordinator")


@dataclass
class RoundRecord:
    """What happened in one round."""

    round: int
    seconds: float
    partners_trained: list[str]
    failures: dict[str, int]
    pooled: PooledMetrics | None
    partners: dict[str, PooledMetrics]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (one line of metrics.jsonl)."""
        return {
            "round": self.round,
            "seconds": round(self.seconds, 4),
            "partners_trained": self.partners_trained,
            "failures": self.failures,
            "pooled_test": self.pooled.to_dict() if self.pooled else None,
            "partners": {k: v.to_dict() for k, v in self.partners.items()},
        }


#: The evaluation metrics a node's reply carries (summed into pooled metrics).
METRIC_PARTS = ("n", "correct", "loss_sum", "hist_pos", "hist_neg")


@dataclass
class Trained:
    """One round's training: who was aggregated, who failed, the new global model."""

    partners: list[str]
    failed: dict[str, int]
    #: The new global model; None under HE (the coordinator never holds it).
    arrays: OrderedDict[str, np.ndarray] | None
    #: The previous round's evaluation, where it rode on this round's train message.
    deferred: dict[str, dict[str, Any]] | None = None


class Aggregation(Protocol):
    """What the round loop calls (see the module docstring)."""

    def train(self, rnd: int, evaluate_previous: int | None) -> Trained: ...

    def checkpoint(self, directory: Path, rnd: int) -> None: ...

    def evaluate(self, rnd: int, evaluating: bool, failed: dict[str, int]) -> dict[str, dict[str, Any]] | None: ...

    def finish(self, last_round: int) -> None: ...


def metric_parts(rec: Any) -> dict[str, Any]:
    """The evaluation metrics of one reply's record."""
    return {k: rec[k] for k in METRIC_PARTS}


def write_checkpoint(directory: Path, rnd: int, arrays: dict[str, np.ndarray]) -> None:
    """``checkpoint.npz``: the round and the global model (replaced atomically)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as fh:
        np.savez(fh, **{"__round__": np.asarray(rnd)}, **arrays)
    os.replace(tmp, directory / "checkpoint.npz")


def record_round(recorder: Any, rnd: int, seconds: float, trained: list[str], failed: dict[str, int], parts: dict[str, dict[str, Any]],
                 arrays: OrderedDict[str, np.ndarray] | None) -> None:
    """The one place a round record is written: pooled and per-partner metrics, the final model so far, the callback."""
    if arrays is not None and not all(np.isfinite(v).all() for v in arrays.values()):
        raise ProtocolError(f"round {rnd}: the aggregate is not finite")
    per = {k: pooled_metrics([v]) for k, v in sorted(parts.items())}
    pooled = pooled_metrics(list(parts.values())) if parts else None
    record = RoundRecord(rnd, seconds, trained, failed, pooled, per)
    recorder.rounds.append(record)
    if arrays is not None:
        recorder.final_arrays = arrays
    if recorder.on_round:
        recorder.on_round(record)


def run_rounds(agg: Aggregation, spec: Spec, recorder: Any, *, first: int) -> None:
    """Rounds ``first .. training.rounds`` of ``agg``: train, checkpoint, evaluate on the cadence, record; then ``finish``."""
    rounds, every = spec.training.rounds, spec.training.evaluate_every
    pending: tuple[int, float, Trained] | None = None  # a round whose evaluation rides on the next train message
    for rnd in range(first, rounds + 1):
        t0 = time.perf_counter()
        try:
            out = agg.train(rnd, pending[0] if pending is not None else None)
        except Exception:
            if pending is not None:
                # The previous round's record is kept even when this round fails (with the evaluation that came back, if any).
                prnd, pt0, prev = pending
                record_round(recorder, prnd, time.perf_counter() - pt0, prev.partners, prev.failed, getattr(agg, "deferred", None) or {},
                             prev.arrays)
            raise
        if pending is not None:
            prnd, pt0, prev = pending
            record_round(recorder, prnd, t0 - pt0, prev.partners, {**prev.failed, **out.failed}, out.deferred or {}, prev.arrays)
            pending = None
        if recorder.checkpoint_dir is not None and (out.arrays is None or all(np.isfinite(v).all() for v in out.arrays.values())):
            agg.checkpoint(recorder.checkpoint_dir, rnd)
        parts = agg.evaluate(rnd, rnd % every == 0 or rnd == rounds, out.failed)
        if parts is None:
            pending = (rnd, t0, out)
            continue
        record_round(recorder, rnd, time.perf_counter() - t0, out.partners, out.failed, parts, out.arrays)
    agg.finish(rounds)


def flat_of(rec: Any, names: list[str]) -> np.ndarray:
    """The named arrays of an ArrayRecord as one float64 vector, in order (the one codec: ``quantize.flatten_arrays``)."""
    return flatten_arrays(rec, names)


def record_from_flat(flat: np.ndarray, like: Any, names: list[str]) -> Any:
    """An ArrayRecord shaped and typed like ``like`` holding ``flat`` (``quantize.unflatten_arrays``)."""
    from flwr.app import Array, ArrayRecord

    arrays = unflatten_arrays(flat, OrderedDict((k, like[k].numpy()) for k in names))
    return ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def numpy_of(arrays: Any, names: list[str]) -> OrderedDict[str, np.ndarray]:
    """An ArrayRecord's arrays by name, in order."""
    return OrderedDict((k, arrays[k].numpy()) for k in names)


class PlainRounds:
    """Plain aggregation: Flower's Message-API strategy aggregates the updates, or partner-level central DP (clip, mean, noise).

    ``fuse_evaluate`` (deployment): round r's evaluation rides on round r + 1's train message,
    which carries the same global model; one exchange per round instead of two (the last round
    still evaluates on its own).
    """

    def __init__(self, spec: Spec, link: Any, arrays: Any, scaling_config: Any, *, strategy: Any, min_partners: int,
                 fuse_evaluate: bool = False) -> None:
        from fedcollab.coordinator._partner_dp import PartnerDp

        self.spec, self.link, self.arrays, self.scaling_config = spec, link, arrays, scaling_config
        self.strategy, self.min_partners, self.fuse = strategy, min_partners, fuse_evaluate
        self.names = list(arrays.keys())
        self.central = PartnerDp(spec, link.ledger, d=flat_of(arrays, self.names).size) if spec.privacy.mode == "central" else None
        #: The previous round's evaluation that rode on this round's train message (kept even if the round then fails).
        self.deferred: dict[str, dict[str, Any]] | None = None

    def train(self, rnd: int, evaluate_previous: int | None) -> Trained:
        link, names = self.link, self.names
        cfg = self.scaling_config(rnd)
        if evaluate_previous is not None:
            cfg["fedcollab.evaluate_round"] = evaluate_previous
        ok, failed = link.send_and_split(list(self.strategy.configure_train(rnd, self.arrays, cfg, link.grid)), rnd)
        self.deferred = None
        if evaluate_previous is not None:
            self.deferred = {link.node_names[m.metadata.src_node_id]: metric_parts(m.content.config_records["fedcollab.eval"])
                             for m in ok if "fedcollab.eval" in m.content.config_records}
        checked = []
        for m in ok:
            name = link.node_names[m.metadata.src_node_id]
            link.collect_lines(m, name, rnd)  # a release happened, whatever its update is worth
            try:
                check_update(m, names, self.arrays)
            except ProtocolError:
                failed[name] = int(NodeErrorCode.BAD_MODEL_UPDATE)
                link.recorder.failures.setdefault(name, []).append(failed[name])
                log.warning("partner %s sent a malformed update; it is left out of round %d", name, rnd)
                continue
            checked.append(m)
        if len(checked) < self.min_partners:
            from fedcollab.coordinator._exchange import code_name

            raise NodeError(f"round {rnd}: {len(checked)} partner(s) replied, at least {self.min_partners} needed",
                            codes=failed, problems=[f"{k}: code {v} ({code_name(v)})" for k, v in failed.items()])
        if self.central is not None:
            flat = flat_of(self.arrays, names)
            updates = {link.node_names[m.metadata.src_node_id]: flat_of(m.content.array_records[RecordKey.ARRAYS], names) - flat for m in checked}
            self.arrays = record_from_flat(flat + self.central.central_mean(updates, rnd, participants=sorted(link.node_names.values())),
                                           self.arrays, names)
        else:
            new_arrays, _ = self.strategy.aggregate_train(rnd, checked)
            if new_arrays is None:
                raise ProtocolError(f"round {rnd}: aggregation produced no model")
            self.arrays = new_arrays
        return Trained(sorted(link.node_names[m.metadata.src_node_id] for m in checked), failed, numpy_of(self.arrays, names), self.deferred)

    def checkpoint(self, directory: Path, rnd: int) -> None:
        write_checkpoint(directory, rnd, numpy_of(self.arrays, self.names))

    def evaluate(self, rnd: int, evaluating: bool, failed: dict[str, int]) -> dict[str, dict[str, Any]] | None:
        if not evaluating:
            return {}
        if self.fuse and rnd < self.spec.training.rounds:
            return None  # rides on the next round's train message
        link = self.link
        eok, efailed = link.send_and_split(list(self.strategy.configure_evaluate(rnd, self.arrays, self.scaling_config(rnd), link.grid)), rnd)
        failed.update({k: v for k, v in efailed.items() if k not in failed})
        parts = {}
        for m in eok:
            name = link.node_names[m.metadata.src_node_id]
            link.collect_lines(m, name, rnd)
            parts[name] = metric_parts(m.content.metric_records[RecordKey.METRICS])
        return parts

    def finish(self, last_round: int) -> None:
        return None


def check_update(m: Any, names: list[str], ref: Any) -> None:
    """A plain update's form: the model's parameters, shapes, finite values, a positive example count."""
    rec = m.content.array_records.get(RecordKey.ARRAYS)
    if rec is None or list(rec.keys()) != names:
        raise ProtocolError("an update with missing or extra parameters")
    for k in names:
        v = rec[k].numpy()
        if v.shape != ref[k].numpy().shape:
            raise ProtocolError("an update of the wrong shape")
        if not np.isfinite(v).all():
            raise ProtocolError("a non-finite update")
    n = m.content.metric_records[RecordKey.METRICS].get("num-examples")
    if n is None or not (isinstance(n, int | float) and math.isfinite(n) and n > 0):
        raise ProtocolError("an update without a valid example count")
