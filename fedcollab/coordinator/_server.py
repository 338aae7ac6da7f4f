"""The coordinator's ServerApp: setup, statistics, then rounds of train and federated evaluation."""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import NodeError, NodeErrorCode, ProtocolError, TransportError, get_logger
from fedcollab.models import build_model, model_arrays
from fedcollab.privacy.accounting import Release
from fedcollab.protocols.evaluation import pooled_metrics, PooledMetrics
from fedcollab.protocols.statistics import STATS_BITS, Scaling, combine_statistics, decode_statistics, scaling_from_bounds
from fedcollab.protocols.wire import MessageKind, RecordKey
from fedcollab.protocols import secagg
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.coordinator._partner_dp import PartnerDp
from fedcollab.coordinator._secagg import decode_mean_update, secure_sum, start_round
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


@dataclass
class CoordinatorRecorder:
    """Collects what the coordinator learns; callbacks drive progress display."""

    on_setup: Callable[[dict[str, int]], None] | None = None
    on_round: Callable[[RoundRecord], None] | None = None
    checkpoint_dir: Path | None = None
    partners: dict[str, int] = field(default_factory=dict)  # name -> n_train
    n_test: dict[str, int] = field(default_factory=dict)
    releases: list[Release] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    scaling: Scaling | None = None
    final_arrays: OrderedDict[str, np.ndarray] | None = None
    failures: dict[str, list[int]] = field(default_factory=dict)
    finished: bool = False
    #: ``[model] kind = "gbdt"``: the trained ensemble (fedcollab.protocols.gbdt.Ensemble); final_arrays is then empty.
    final_model: Any = None


def _strategy(spec: Spec, n: int) -> Any:
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    t = spec.training
    common = {"fraction_train": 1.0, "fraction_evaluate": 1.0, "min_train_nodes": n, "min_evaluate_nodes": n, "min_available_nodes": n}
    if t.strategy == "fedprox":
        return FedProx(proximal_mu=t.proximal_mu, **common)
    if t.strategy == "fedadam":
        return FedAdam(eta=t.server_learning_rate, eta_l=t.learning_rate, beta_1=t.server_beta_1, beta_2=t.server_beta_2, tau=t.server_tau, **common)
    # Robust rules (plain aggregation only, checked by the spec): Flower's own strategies.
    if t.strategy == "trimmed_mean":
        from flwr.serverapp.strategy import FedTrimmedAvg

        return FedTrimmedAvg(beta=t.trim_fraction, **common)
    if t.strategy == "median":
        from flwr.serverapp.strategy import FedMedian

        return FedMedian(**common)
    if t.strategy == "krum":
        from flwr.serverapp.strategy import Krum

        return Krum(num_malicious_nodes=t.byzantine_partners, **common)
    if t.strategy == "multikrum":
        from flwr.serverapp.strategy import MultiKrum

        # Blanchard et al. 2017: m <= n - f, with n the fewest updates a round may aggregate.
        fewest = t.min_partners if t.min_partners is not None else n
        select = t.krum_select if t.krum_select is not None else fewest - t.byzantine_partners
        return MultiKrum(num_malicious_nodes=t.byzantine_partners, num_nodes_to_select=select, **common)
    return FedAvg(**common)


def _write_checkpoint(directory: Path, rnd: int, arrays: dict[str, np.ndarray]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".npz.tmp")
    os.close(fd)
    with open(tmp, "wb") as fh:
        np.savez(fh, **{"__round__": np.asarray(rnd)}, **arrays)
    os.replace(tmp, directory / "checkpoint.npz")


def load_checkpoint(directory: Path, spec: Spec) -> tuple[int, dict[str, np.ndarray]]:
    """The last checkpoint a run wrote in ``directory``: ``(last round or tree, arrays)``.

    Under HE it is the encrypted aggregate (``checkpoint.he.json``, checked for form here, its
    signatures by the nodes); the arrays are then empty, the aggregate being read again by the
    resumed run's :class:`~fedcollab.coordinator._he.HeSession`.

    Raises
    ------
    OSError, ValueError, KeyError
        No checkpoint, or an unreadable one (the caller names the run folder).
    ConfigError
        A malformed encrypted checkpoint (naming the field).
    """
    if spec.aggregation == "he":
        from fedcollab.coordinator._he import HE_CHECKPOINT, read_encrypted_checkpoint

        if not (directory / HE_CHECKPOINT).exists():
            raise FileNotFoundError(str(directory / HE_CHECKPOINT))
        return read_encrypted_checkpoint(directory / HE_CHECKPOINT)[0], {}
    with np.load(directory / "checkpoint.npz") as f:
        last = int(f["__round__"])
        return last, {k: np.array(f[k]) for k in f.files if k != "__round__"}


def make_server_app(spec: Spec, recorder: CoordinatorRecorder, *, ledger: RunLedger, timeout: float = 600.0,
                    resume: tuple[int, dict[str, np.ndarray]] | None = None, fuse_evaluate: bool = False) -> Any:
    """The Flower ServerApp coordinating ``spec``; results go to ``recorder``, entries to ``ledger``.

    ``resume = (last_round, arrays)`` continues a run from its checkpoint (:func:`load_checkpoint`):
    setup runs again, then rounds ``last_round + 1 ...``, in every aggregation mode (under HE the
    partners reload the run's key from their folders and the encrypted aggregate is read again).
    ``fuse_evaluate`` (deployment, plain aggregation): round r's evaluation rides on round r + 1's
    train message, which carries the same global model; one message exchange per round instead of
    two (the last round still evaluates on its own).
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()
    n_partners = len(spec.partners)
    min_partners = n_partners if spec.training.min_partners is None else spec.training.min_partners
    n_features = len(spec.data_schema.encoded_features())
    bounds = np.asarray(spec.data_schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)
    partner_names = {p.name for p in spec.partners}

    def split_replies(replies: list[Message], node_names: dict[int, str], rnd: int) -> tuple[list[Message], dict[str, int]]:
        ok: list[Message] = []
        failed: dict[str, int] = {}
        for m in replies:
            name = node_names.get(m.metadata.src_node_id, f"node-{m.metadata.src_node_id}")
            if m.has_error():
                failed[name] = int(m.error.code) if m.error.code else int(NodeErrorCode.INTERNAL)
                continue
            if RecordKey.ERROR in m.content.config_records:
                err = m.content.config_records[RecordKey.ERROR]
                claimed = str(err.get("partner", ""))
                if m.metadata.src_node_id not in node_names and claimed in partner_names and claimed not in failed:
                    name = claimed  # before setup: the refusing node's partner name instead of its Flower node id
                failed[name] = int(err["code"])
                if name in node_names.values():
                    collect_lines(m, name, rnd)  # the node's refusal entries
            else:
                ok.append(m)
        for name, code in failed.items():
            recorder.failures.setdefault(name, []).append(code)
            log.warning("partner %s replied with error code %d (%s)", name, code, _code_name(code))
        return ok, failed

    def collect_lines(m: Message, party: str, rnd: int) -> None:
        rec = m.content.config_records.get(RecordKey.RELEASES)
        if rec is None:
            if RecordKey.ERROR in m.content.config_records:
                return
            raise ProtocolError("a reply without its ledger entries")
        ledger.accept(json.loads(str(rec["lines"])), party=party, round=rnd)

    def scaling_config(scaling: Scaling, rnd: int) -> ConfigRecord:
        return ConfigRecord({"server-round": rnd, "fedcollab.run_id": ledger.run_id, "scale_mean": scaling.mean.tolist(),
                             "scale_std": scaling.std.tolist(), "scale_method": scaling.method})

    def secagg_sender(grid: Grid, node_names: dict[int, str], rnd: int) -> Any:
        """send(stage, {partner: request}) -> {partner: reply}: one stand-alone exchange of a secagg stage."""

        def send(stage: str, requests: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
            cfg = {"fedcollab.kind": "secagg", "fedcollab.run_id": ledger.run_id, "secagg.stage": stage, "secagg.round": rnd}
            got = exchange(grid, node_names, rnd, MessageType.QUERY, {p: (None, cfg, {"secagg": r}) for p, r in requests.items()})
            return {p: dict(m.content.config_records["secagg"]) for p, m in got.items() if "secagg" in m.content.config_records}

        return send

    def exchange(grid: Grid, node_names: dict[int, str], rnd: int, message_type: str,
                 per_node: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]]) -> dict[str, Message]:
        """One exchange with per-node content (arrays or None, config, extra ConfigRecords); replies by partner.

        Failed or missing replies are dropouts: logged, recorded, and absent from the result.
        """
        by_name = {v: k for k, v in node_names.items()}
        msgs = []
        for p, (arr, cfg, extra) in per_node.items():
            content = RecordDict({RecordKey.CONFIG: ConfigRecord(cfg), **{k: ConfigRecord(v) for k, v in extra.items()}})
            if arr is not None:
                content[RecordKey.ARRAYS] = arr
            msgs.append(Message(content=content, message_type=message_type, dst_node_id=by_name[p]))
        got, failed = split_replies(list(grid.send_and_receive(msgs, timeout=timeout)), node_names, rnd)
        if failed:
            log.warning("round %d %s: no answer from %s", rnd, message_type, sorted(failed))
        out = {}
        for m in got:
            name = node_names[m.metadata.src_node_id]
            if RecordKey.RELEASES in m.content.config_records:
                collect_lines(m, name, rnd)
            out[name] = m
        return out

    def roster_keys() -> dict[str, str]:
        return {k: v.signing_key for k, v in ledger.roster.parties.items()}

    def secure_statistics(grid: Grid, node_names: dict[int, str]) -> dict[str, list[float]]:
        """The statistics round under SecAgg+ (modulo 2^64): the coordinator sees only the totals."""
        total, survivors = secure_sum(spec, run_id=ledger.run_id, round_=0, participants=sorted(node_names.values()),
                                      length=1 + 2 * n_features, bits=STATS_BITS, roster_keys=roster_keys(),
                                      send=secagg_sender(grid, node_names, 0))
        if len(survivors) < len(node_names):
            log.warning("statistics from %d of %d partners (dropouts)", len(survivors), len(node_names))
        return decode_statistics(total, n_features=n_features)

    def secagg_rounds(grid: Grid, node_names: dict[int, str], arrays: Any, scaling: Scaling) -> None:
        """Rounds under SecAgg+, pipelined: four exchanges a round, keys fresh every round.

        Round r: train + MASKED_INPUT (with the shares routed for r), CONSISTENCY (the survivors sign
        the survivor set), UNMASK + ADVERTISE(r + 1), evaluate + SHARE(r + 1). Round 1's ADVERTISE
        and SHARE run on their own first.
        """
        names = list(arrays.keys())
        n_params = int(sum(arrays[k].numpy().size for k in names))
        pdp = PartnerDp(spec, ledger, d=n_params)
        length = n_params + pdp.extra_coordinates
        max_weight = float(max(recorder.partners.values()))
        rounds = spec.training.rounds

        def open_round(rnd: int, participants: list[str]) -> tuple[Any, dict[str, Any]]:
            return start_round(spec, run_id=ledger.run_id, round_=rnd, participants=participants, length=length, bits=32,
                               roster_keys=roster_keys())

        def base_cfg(rnd: int) -> dict[str, Any]:
            cfg = dict(scaling_config(scaling, rnd))
            cfg["secagg.max_weight"] = max_weight
            cfg["secagg.n_parties"] = len(node_names)
            if spec.training.strategy == "fedprox":
                cfg["proximal-mu"] = spec.training.proximal_mu
            return cfg

        # Round 1's keys and shares.
        first = 1 + (resume[0] if resume else 0)  # a resumed run: fresh keys from its first new round
        state, request = open_round(first, sorted(node_names.values()))
        send = secagg_sender(grid, node_names, first)
        state, per_node = secagg.coord_collect_advertisements(state, {p: secagg.Advertisement.from_wire(w) for p, w in send("advertise", {p: request for p in state.cfg.participants}).items()})
        state, routed = secagg.coord_route_shares(state, {p: secagg.ShareBundle.from_wire(w) for p, w in send("share", {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()}).items()})
        for rnd in range(first, rounds + 1):
            t0 = time.perf_counter()
            # train + MASKED_INPUT
            cfg = {**base_cfg(rnd), "secagg.stage": "masked", "secagg.round": rnd}
            got = exchange(grid, node_names, rnd, MessageType.TRAIN, {p: (arrays, cfg, {"secagg": m.to_wire()}) for p, m in routed.items()})
            masked = {p: secagg.MaskedInput.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items() if "secagg" in m.content.config_records}
            failed = {p: c[-1] for p, c in recorder.failures.items() if p not in masked and p in routed}
            if len(masked) < min_partners:
                raise NodeError(f"round {rnd}: {len(masked)} partner(s) sent a masked update, at least {min_partners} needed", codes=failed)
            state, checks = secagg.coord_collect_masked(state, masked)
            # CONSISTENCY: every survivor signs the one survivor set; the unmask request carries the signatures
            signed = secagg_sender(grid, node_names, rnd)("consistency", {p: c.to_wire() for p, c in checks.items()})
            state, requests = secagg.coord_collect_signatures(state, {p: secagg.ConsistencySignature.from_wire(w) for p, w in signed.items()})
            # UNMASK + the next round's ADVERTISE
            nxt = open_round(rnd + 1, sorted(requests)) if rnd < rounds else None
            per: dict[str, tuple[Any, dict[str, Any], dict[str, dict[str, Any]]]] = {}
            for p, req in requests.items():
                c = {"fedcollab.kind": "secagg", "fedcollab.run_id": ledger.run_id, "secagg.stage": "unmask", "secagg.round": rnd}
                extra = {"secagg": req.to_wire()}
                if nxt is not None:
                    c.update({"secagg.next.stage": "advertise", "secagg.next.round": rnd + 1})
                    extra["secagg.next"] = nxt[1]
                per[p] = (None, c, extra)
            got = exchange(grid, node_names, rnd, MessageType.QUERY, per)
            revealed = {p: secagg.RevealedShares.from_wire(dict(m.content.config_records["secagg"])) for p, m in got.items() if "secagg" in m.content.config_records}
            state, total = secagg.coord_unmask(state, revealed)
            trained = sorted(state.survivors)
            flat = flat_of(arrays, names)
            if pdp.active:
                new = flat + pdp.secure_mean(total, rnd, participants=sorted(state.cfg.participants), summed=trained)
            else:
                new = flat + decode_mean_update(spec, total, max_weight=max_weight)
            arrays = record_from_flat(new, arrays, names)
            numpy_arrays = OrderedDict((k, arrays[k].numpy()) for k in names)
            if recorder.checkpoint_dir is not None:
                _write_checkpoint(recorder.checkpoint_dir, rnd, numpy_arrays)
            # evaluate + the next round's SHARE
            share_req: dict[str, dict[str, Any]] = {}
            if nxt is not None:
                ads = {p: secagg.Advertisement.from_wire(dict(m.content.config_records["secagg.next"])) for p, m in got.items() if "secagg.next" in m.content.config_records}
                next_state, per_node = secagg.coord_collect_advertisements(nxt[0], ads)
                share_req = {p: secagg.advertisements_to_wire(a) for p, a in per_node.items()}
            parts: dict[str, dict[str, Any]] = {}
            evaluating = rnd % spec.training.evaluate_every == 0 or rnd == rounds
            if evaluating or share_req:
                targets = sorted(set(share_req) | (set(node_names.values()) if evaluating else set()))
                per = {}
                for p in targets:
                    c = dict(scaling_config(scaling, rnd))
                    if not evaluating:
                        c["fedcollab.kind"] = "secagg"
                    extra = {}
                    if p in share_req:
                        c.update({"secagg.stage" if not evaluating else "secagg.next.stage": "share",
                                  "secagg.round" if not evaluating else "secagg.next.round": rnd + 1})
                        extra["secagg" if not evaluating else "secagg.next"] = share_req[p]
                    per[p] = (arrays if evaluating else None, c, extra)
                got = exchange(grid, node_names, rnd, MessageType.EVALUATE if evaluating else MessageType.QUERY, per)
                slot = "secagg.next" if evaluating else "secagg"
                if share_req:
                    bundles = {p: secagg.ShareBundle.from_wire(dict(m.content.config_records[slot])) for p, m in got.items() if slot in m.content.config_records}
                    state, routed = secagg.coord_route_shares(next_state, bundles)
                if evaluating:
                    for p, m in got.items():
                        mr = m.content.metric_records[RecordKey.METRICS]
                        parts[p] = {k: mr[k] for k in ("n", "correct", "loss_sum", "hist_pos", "hist_neg")}
            record_round(rnd, t0, trained, failed, parts, numpy_arrays)

    def record_round(rnd: int, t0: float, trained: list[str], failed: dict[str, int], parts: dict[str, dict[str, Any]],
                     numpy_arrays: OrderedDict[str, np.ndarray], seconds: float | None = None) -> None:
        if not all(np.isfinite(v).all() for v in numpy_arrays.values()):
            raise ProtocolError(f"round {rnd}: the aggregate is not finite")
        per = {k: pooled_metrics([v]) for k, v in sorted(parts.items())}
        pooled = pooled_metrics(list(parts.values())) if parts else None
        record = RoundRecord(rnd, time.perf_counter() - t0 if seconds is None else seconds, trained, failed, pooled, per)
        recorder.rounds.append(record)
        recorder.final_arrays = numpy_arrays
        if recorder.on_round:
            recorder.on_round(record)

    def flat_of(rec: Any, names: list[str]) -> np.ndarray:
        """The named arrays of an ArrayRecord as one float64 vector, in order."""
        return np.concatenate([rec[k].numpy().astype(np.float64).ravel() for k in names])

    def record_from_flat(flat: np.ndarray, like: Any, names: list[str]) -> Any:
        """An ArrayRecord shaped and typed like ``like`` holding ``flat``."""
        out, offset = {}, 0
        for k in names:
            ref = like[k].numpy()
            out[k] = Array(np.ascontiguousarray(flat[offset:offset + ref.size].reshape(ref.shape).astype(ref.dtype)))
            offset += ref.size
        return ArrayRecord(array_dict=out)

    def central_aggregate(pdp: PartnerDp, rnd: int, arrays: Any, ok: list[Message], node_names: dict[int, str], names: list[str]) -> Any:
        """Partner-level central DP on plain aggregation: mean of L2-clipped updates plus Gaussian noise."""
        flat = flat_of(arrays, names)
        updates = {node_names[m.metadata.src_node_id]: flat_of(m.content.array_records[RecordKey.ARRAYS], names) - flat for m in ok}
        return record_from_flat(flat + pdp.central_mean(updates, rnd, participants=sorted(node_names.values())), arrays, names)

    def plain_rounds(grid: Grid, node_names: dict[int, str], arrays: Any, scaling: Scaling, strategy: Any) -> None:
        """Rounds with plain aggregation: train (the strategy aggregates the updates), then evaluate."""
        names = list(arrays.keys())
        central = PartnerDp(spec, ledger, d=flat_of(arrays, names).size) if spec.privacy.mode == "central" else None
        pending: tuple[Any, ...] | None = None  # a round whose evaluation rides on the next train message
        for rnd in range(1 + (resume[0] if resume else 0), spec.training.rounds + 1):
            t0 = time.perf_counter()
            cfg = scaling_config(scaling, rnd)
            if pending is not None:
                cfg["fedcollab.evaluate_round"] = pending[0]
            train_msgs = list(strategy.configure_train(rnd, arrays, cfg, grid))
            replies = list(grid.send_and_receive(train_msgs, timeout=timeout))
            ok, failed = split_replies(replies, node_names, rnd)
            if pending is not None:
                prev_parts = {}
                for m in ok:
                    if "fedcollab.eval" in m.content.config_records:
                        mr = m.content.config_records["fedcollab.eval"]
                        prev_parts[node_names[m.metadata.src_node_id]] = {k: mr[k] for k in ("n", "correct", "loss_sum", "hist_pos", "hist_neg")}
                record_round(*pending[:3], {**pending[3], **failed}, prev_parts, pending[4], seconds=t0 - pending[1])
                pending = None
            checked = []
            for m in ok:
                name = node_names[m.metadata.src_node_id]
                collect_lines(m, name, rnd)  # a release happened, whatever its update is worth
                try:
                    _check_update(m, names, arrays)
                except ProtocolError:
                    failed[name] = int(NodeErrorCode.BAD_MODEL_UPDATE)
                    recorder.failures.setdefault(name, []).append(failed[name])
                    log.warning("partner %s sent a malformed update; it is left out of round %d", name, rnd)
                    continue
                checked.append(m)
            ok = checked
            if len(ok) < min_partners:
                raise NodeError(
                    f"round {rnd}: {len(ok)} partner(s) replied, at least {min_partners} needed",
                    codes=failed, problems=[f"{k}: code {v} ({_code_name(v)})" for k, v in failed.items()],
                )
            if central is not None:
                arrays = central_aggregate(central, rnd, arrays, ok, node_names, names)
            else:
                new_arrays, _ = strategy.aggregate_train(rnd, ok)
                if new_arrays is None:
                    raise ProtocolError(f"round {rnd}: aggregation produced no model")
                arrays = new_arrays
            numpy_arrays = OrderedDict((k, arrays[k].numpy()) for k in names)
            if recorder.checkpoint_dir is not None and all(np.isfinite(v).all() for v in numpy_arrays.values()):
                _write_checkpoint(recorder.checkpoint_dir, rnd, numpy_arrays)
            parts: dict[str, dict[str, Any]] = {}
            if fuse_evaluate and rnd % spec.training.evaluate_every == 0 and rnd < spec.training.rounds:
                pending = (rnd, t0, sorted(node_names[m.metadata.src_node_id] for m in ok), failed, numpy_arrays)
                continue
            if rnd % spec.training.evaluate_every == 0 or rnd == spec.training.rounds:
                eval_msgs = list(strategy.configure_evaluate(rnd, arrays, scaling_config(scaling, rnd), grid))
                ereplies = list(grid.send_and_receive(eval_msgs, timeout=timeout))
                eok, efailed = split_replies(ereplies, node_names, rnd)
                failed.update({k: v for k, v in efailed.items() if k not in failed})
                for m in eok:
                    name = node_names[m.metadata.src_node_id]
                    collect_lines(m, name, rnd)
                    mr = m.content.metric_records[RecordKey.METRICS]
                    parts[name] = {k: mr[k] for k in ("n", "correct", "loss_sum", "hist_pos", "hist_neg")}
            record_round(rnd, t0, sorted(node_names[m.metadata.src_node_id] for m in ok), failed, parts, numpy_arrays)

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + timeout
        while len(node_ids := list(grid.get_node_ids())) < n_partners:
            if time.monotonic() > deadline:
                raise TransportError(f"only {len(node_ids)} of {n_partners} nodes connected")
            time.sleep(0.1)
        # --- setup: identities, public row counts, statistics, DP calibration ---------------
        gbdt_run = spec.model.kind == "gbdt"
        scaling_name = "none" if gbdt_run else spec.resolved_scaling  # trees need no scaling: no statistics leave
        setup_cfg = ConfigRecord({"fedcollab.kind": str(MessageKind.SETUP), "scaling": scaling_name, "fedcollab.run_id": ledger.run_id})
        if resume:
            setup_cfg["fedcollab.resume_after"] = int(resume[0])  # nodes check the budget of the rounds still to come
        msgs = [Message(content=RecordDict({RecordKey.CONFIG: setup_cfg}), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_ids]
        replies = list(grid.send_and_receive(msgs, timeout=timeout))
        ok, failed = split_replies(replies, {}, 0)
        if failed:
            # Nodes refuse at setup before anything is spent (policy, dataset, split, the whole plan's budget):
            # keep their signed refusals, name them, and stop before round 1.
            failed, reasons = _setup_refusals(replies, failed, ledger, {p.name for p in spec.partners})
            raise NodeError(f"setup: {len(ok)} of {n_partners} partners accepted the run, which starts only when all do "
                            f"(training.min_partners = {min_partners}); stopped before round 1:",
                            codes=failed, problems=[f"{k}: code {v} ({_code_name(v)})" + (f": {reasons[k]}" if k in reasons else "")
                                                    for k, v in failed.items()])
        node_names: dict[int, str] = {}
        stats = []
        for m in ok:
            info = m.content.config_records[RecordKey.INFO]
            name = str(info["partner"])
            if name in node_names.values() or name not in {p.name for p in spec.partners}:
                raise ProtocolError("unknown or duplicate partner identity in setup")
            if int(info["n_features"]) != n_features:
                raise ProtocolError("a node encodes a different number of features")
            node_names[m.metadata.src_node_id] = name
            recorder.partners[name] = int(info["n_train"])
            recorder.n_test[name] = int(info["n_test"])
            collect_lines(m, name, 0)
            if "statistics" in m.content.config_records:
                st = m.content.config_records["statistics"]
                stats.append({k: list(map(float, st[k])) for k in ("count", "sum", "sumsq")})
        missing = sorted({p.name for p in spec.partners} - set(node_names.values()))
        if missing:
            raise NodeError(f"no reply from partners {missing}")
        he = None
        if spec.aggregation == "he":
            # Key custody among the partners, then the encrypted statistics round (fedcollab/coordinator/_he.py).
            from fedcollab.coordinator._he import HeSession

            he = HeSession(spec, grid=grid, node_names=node_names, exchange=exchange, ledger=ledger, recorder=recorder, message_type=MessageType)
            if resume:
                he.resume_from(recorder.checkpoint_dir, int(resume[0]))  # the partners' keys from their folders, the encrypted aggregate
            else:
                he.distribute_keys()
        if spec.aggregation == "secagg" and scaling_name in {"federated_statistics", "dp_statistics"}:
            stats = [secure_statistics(grid, node_names)]
        if he is not None:
            scaling = he.scaling(scaling_name, bounds, n_features)
        elif scaling_name == "federated_statistics":
            scaling = combine_statistics(stats)
        elif scaling_name == "dp_statistics":
            scaling = combine_statistics(stats, bounds=bounds)
        elif scaling_name == "public_bounds":
            scaling = scaling_from_bounds(bounds)
        else:
            scaling = Scaling(mean=np.zeros(n_features), std=np.ones(n_features), method="none")
        recorder.scaling = scaling
        if recorder.on_setup:
            recorder.on_setup(dict(recorder.partners))

        # --- rounds ---------------------------------------------------------------------------
        if gbdt_run:
            from fedcollab.coordinator._gbdt import empty_arrays, gbdt_rounds

            def record_tree(rnd: int, t0: float, trained: list[str], failed: dict[str, int], parts: dict[str, dict[str, Any]]) -> None:
                record_round(rnd, t0, trained, failed, parts, empty_arrays())

            recorder.final_model = gbdt_rounds(
                spec, node_names=node_names, exchange=lambda rnd, mt, per: exchange(grid, node_names, rnd, mt, per),
                send_stage=lambda rnd: secagg_sender(grid, node_names, rnd), roster_keys=roster_keys(), run_id=ledger.run_id,
                max_rows=float(max(recorder.partners.values())), min_partners=min_partners, message_type=MessageType,
                record=record_tree, failures=recorder.failures, resume=resume,
                checkpoint=(lambda rnd, a: _write_checkpoint(recorder.checkpoint_dir, rnd, a)) if recorder.checkpoint_dir is not None else None)
            close_run(grid, node_names)
            return
        strategy = _strategy(spec, n_partners)
        model = build_model(spec.model, n_features, seed=spec.seed)
        # Under HE the checkpoint is the encrypted aggregate (the HE session holds it); the arrays only give the model's size.
        start = resume[1] if resume and he is None else model_arrays(model)
        arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in start.items()})
        if he is not None:
            he.rounds(arrays, scaling, scaling_config=scaling_config, min_partners=min_partners)
        elif spec.aggregation == "secagg":
            secagg_rounds(grid, node_names, arrays, scaling)
        else:
            plain_rounds(grid, node_names, arrays, scaling, strategy)
        close_run(grid, node_names)

    def close_run(grid: Grid, node_names: dict[int, str]) -> None:
        """Close: every chain head listed, signed, then countersigned by every node."""
        last = len(recorder.rounds)
        close = ledger.close(last, partners=[p.name for p in spec.partners])
        close_cfg = ConfigRecord({"fedcollab.kind": str(MessageKind.CLOSE), "fedcollab.run_id": ledger.run_id, "close": close.decode()})
        msgs = [Message(content=RecordDict({RecordKey.CONFIG: close_cfg}), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_names]
        creplies = list(grid.send_and_receive(msgs, timeout=timeout))
        cok, cfailed = split_replies(creplies, node_names, last)
        for m in cok:
            collect_lines(m, node_names[m.metadata.src_node_id], last)
        recorder.releases = list(ledger.releases)
        recorder.finished = True

    return app


def _check_update(m: Any, names: list[str], ref: Any) -> None:
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


def _setup_refusals(replies: list[Any], failed: dict[str, int], ledger: RunLedger,
                    partners: set[str]) -> tuple[dict[str, int], dict[str, str]]:
    """Setup failures by partner name where a refusal's signed ledger entries name it (accepted into the run ledger).

    Also the reason each signed refusal states (the node's own words in its ledger: no data values,
    e.g. the planned and remaining epsilon).
    """
    out = dict(failed)
    reasons: dict[str, str] = {}
    for m in replies:
        if m.has_error() or RecordKey.ERROR not in m.content.config_records:
            continue
        rec = m.content.config_records.get(RecordKey.RELEASES)
        try:
            lines = json.loads(str(rec["lines"])) if rec is not None else []
            party = json.loads(lines[0]).get("party") if lines else None
        except (ValueError, TypeError, AttributeError, KeyError):
            continue
        if party not in partners:
            continue
        try:
            ledger.accept(lines, party=party, round=0)  # verifies party's signature: only then is the name trusted
        except Exception:  # noqa: BLE001 - a refusal the ledger cannot take is still a refusal, under its node id
            log.warning("a setup refusal claiming partner %s does not verify; kept under its node id", party)
            continue
        name = f"node-{m.metadata.src_node_id}"
        if name in out:
            out[party] = out.pop(name)
        refusal = next((e for e in map(json.loads, lines) if e.get("kind") == "refusal"), None)
        if refusal is not None and isinstance(refusal.get("body", {}).get("reason"), str):
            reasons[party] = refusal["body"]["reason"]
    return out, reasons


def _code_name(code: int) -> str:
    try:
        return NodeErrorCode(code).name
    except ValueError:
        return "FLOWER_ERROR"
