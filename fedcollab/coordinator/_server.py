"""The coordinator's ServerApp: setup, statistics, then the round loop (``_rounds``) over the spec's aggregation strategy, and the close."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import NodeError, ProtocolError, get_logger
from fedcollab.models import build_model, model_arrays
from fedcollab.privacy.accounting import Release
from fedcollab.protocols.statistics import STATS_BITS, Scaling, combine_statistics, decode_statistics, scaling_from_bounds
from fedcollab.protocols.wire import MessageKind, RecordKey
from fedcollab.coordinator._exchange import Link, code_name, wait_for_nodes
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.coordinator._rounds import Aggregation, PlainRounds, RoundRecord, record_round, run_rounds, write_checkpoint
from fedcollab.coordinator._secagg import SecaggRounds, secure_sum
from fedcollab.spec import Spec

__all__ = ["CoordinatorRecorder", "RoundRecord", "load_checkpoint", "make_server_app"]

log = get_logger("coordinator")


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

    A short composition: setup (:func:`_setup`: identities, row counts, HE key custody, the
    statistics), then the one round loop (:func:`~fedcollab.coordinator._rounds.run_rounds`) over
    the spec's aggregation strategy (:func:`_aggregation`: plain or partner-level central DP,
    SecAgg+, HE), or the tree steps for ``kind = "gbdt"``, then the signed close. Every exchange
    goes through one :class:`~fedcollab.coordinator._exchange.Link`.

    ``resume = (last_round, arrays)`` continues a run from its checkpoint (:func:`load_checkpoint`):
    setup runs again, then rounds ``last_round + 1 ...``, in every aggregation mode (under HE the
    partners reload the run's key from their folders and the encrypted aggregate is read again).
    ``fuse_evaluate`` (deployment, plain aggregation): round r's evaluation rides on round r + 1's
    train message, which carries the same global model; one message exchange per round instead of
    two (the last round still evaluates on its own).
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        link = Link(grid, ledger=ledger, recorder=recorder, timeout=timeout, partner_names={p.name for p in spec.partners})
        scaling, he = _setup(spec, link, resume)
        if spec.model.kind == "gbdt":
            recorder.final_model = _gbdt(spec, link, resume)
        else:
            run_rounds(_aggregation(spec, link, scaling, he, resume=resume, fuse_evaluate=fuse_evaluate), spec, recorder,
                       first=1 + (int(resume[0]) if resume else 0))
        _close(spec, link)

    return app


def _min_partners(spec: Spec) -> int:
    return len(spec.partners) if spec.training.min_partners is None else spec.training.min_partners


def _scaling_config(link: Link, scaling: Scaling, rnd: int) -> Any:
    from flwr.app import ConfigRecord

    return ConfigRecord({"server-round": rnd, "fedcollab.run_id": link.ledger.run_id, "scale_mean": scaling.mean.tolist(),
                         "scale_std": scaling.std.tolist(), "scale_method": scaling.method})


def _setup(spec: Spec, link: Link, resume: tuple[int, dict[str, np.ndarray]] | None) -> tuple[Scaling, Any]:
    """Setup: every node's identity and public row counts, HE key custody, the statistics; ``(scaling, HE session or None)``.

    The run starts only when every partner accepts it; refusals (policy, dataset, the whole plan's
    budget) come back signed and are kept in the run ledger, named.
    """
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    recorder, ledger, timeout = link.recorder, link.ledger, link.timeout
    n_partners, min_partners = len(spec.partners), _min_partners(spec)
    n_features = len(spec.data_schema.encoded_features())
    bounds = np.asarray(spec.data_schema.encoded_bounds(), dtype=np.float64).reshape(-1, 2)
    node_ids = wait_for_nodes(link.grid, n_partners, timeout)
    scaling_name = "none" if spec.model.kind == "gbdt" else spec.resolved_scaling  # trees need no scaling: no statistics leave
    setup_cfg = ConfigRecord({"fedcollab.kind": str(MessageKind.SETUP), "scaling": scaling_name, "fedcollab.run_id": ledger.run_id})
    if resume:
        setup_cfg["fedcollab.resume_after"] = int(resume[0])  # nodes check the budget of the rounds still to come
    msgs = [Message(content=RecordDict({RecordKey.CONFIG: setup_cfg}), message_type=MessageType.QUERY, dst_node_id=nid) for nid in node_ids]
    replies = list(link.grid.send_and_receive(msgs, timeout=timeout))
    ok, failed = link.split_replies(replies, 0, {})
    if failed:
        # Nodes refuse at setup before anything is spent (policy, dataset, split, the whole plan's budget):
        # keep their signed refusals, name them, and stop before round 1.
        failed, reasons = _setup_refusals(replies, failed, ledger, {p.name for p in spec.partners})
        raise NodeError(f"setup: {len(ok)} of {n_partners} partners accepted the run, which starts only when all do "
                        f"(training.min_partners = {min_partners}); stopped before round 1:",
                        codes=failed, problems=[f"{k}: code {v} ({code_name(v)})" + (f": {reasons[k]}" if k in reasons else "")
                                                for k, v in failed.items()])
    node_names = link.node_names
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
        link.collect_lines(m, name, 0)
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

        he = HeSession(spec, link=link, message_type=MessageType)
        if resume:
            he.resume_from(recorder.checkpoint_dir, int(resume[0]))  # the partners' keys from their folders, the encrypted aggregate
        else:
            he.distribute_keys()
    if spec.aggregation == "secagg" and scaling_name in {"federated_statistics", "dp_statistics"}:
        # The statistics round under SecAgg+ (modulo 2^64): the coordinator sees only the totals.
        total, survivors = secure_sum(spec, run_id=ledger.run_id, round_=0, participants=sorted(node_names.values()),
                                      length=1 + 2 * n_features, bits=STATS_BITS, roster_keys=link.roster_keys(), send=link.secagg_sender(0))
        if len(survivors) < len(node_names):
            log.warning("statistics from %d of %d partners (dropouts)", len(survivors), len(node_names))
        stats = [decode_statistics(total, n_features=n_features)]
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
    return scaling, he


def _aggregation(spec: Spec, link: Link, scaling: Scaling, he: Any, *, resume: tuple[int, dict[str, np.ndarray]] | None,
                 fuse_evaluate: bool) -> Aggregation:
    """The round loop's strategy for the spec's aggregation, starting from the seeded model or the checkpoint."""
    from flwr.app import Array, ArrayRecord

    n_features = len(spec.data_schema.encoded_features())
    model = build_model(spec.model, n_features, seed=spec.seed)
    # Under HE the checkpoint is the encrypted aggregate (the HE session holds it); the arrays only give the model's size.
    start = resume[1] if resume and he is None else model_arrays(model)
    arrays = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in start.items()})

    def cfg(rnd: int) -> Any:
        return _scaling_config(link, scaling, rnd)

    if he is not None:
        return he.start_rounds(arrays, scaling, scaling_config=cfg, min_partners=_min_partners(spec))
    if spec.aggregation == "secagg":
        return SecaggRounds(spec, link, arrays, cfg, first=1 + (int(resume[0]) if resume else 0),
                            max_weight=float(max(link.recorder.partners.values())), min_partners=_min_partners(spec))
    return PlainRounds(spec, link, arrays, cfg, strategy=_strategy(spec, len(spec.partners)), min_partners=_min_partners(spec),
                       fuse_evaluate=fuse_evaluate)


def _gbdt(spec: Spec, link: Link, resume: tuple[int, dict[str, np.ndarray]] | None) -> Any:
    """A tree run's steps (fedcollab/coordinator/_gbdt.py): the trained ensemble."""
    from flwr.app import MessageType

    from fedcollab.coordinator._gbdt import empty_arrays, gbdt_rounds

    recorder = link.recorder

    def record_tree(rnd: int, t0: float, trained: list[str], failed: dict[str, int], parts: dict[str, dict[str, Any]]) -> None:
        record_round(recorder, rnd, time.perf_counter() - t0, trained, failed, parts, empty_arrays())

    ckpt = recorder.checkpoint_dir
    return gbdt_rounds(
        spec, node_names=link.node_names, exchange=link.exchange, send_stage=link.secagg_sender, roster_keys=link.roster_keys(),
        run_id=link.ledger.run_id, max_rows=float(max(recorder.partners.values())), min_partners=_min_partners(spec),
        message_type=MessageType, record=record_tree, failures=recorder.failures, resume=resume,
        checkpoint=(lambda rnd, a: write_checkpoint(ckpt, rnd, a)) if ckpt is not None else None)


def _close(spec: Spec, link: Link) -> None:
    """Close: every chain head listed, signed, then countersigned by every node."""
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict

    recorder, ledger = link.recorder, link.ledger
    last = len(recorder.rounds)
    close = ledger.close(last, partners=[p.name for p in spec.partners])
    close_cfg = ConfigRecord({"fedcollab.kind": str(MessageKind.CLOSE), "fedcollab.run_id": ledger.run_id, "close": close.decode()})
    msgs = [Message(content=RecordDict({RecordKey.CONFIG: close_cfg}), message_type=MessageType.QUERY, dst_node_id=nid) for nid in link.node_names]
    cok, _ = link.send_and_split(msgs, last)
    for m in cok:
        link.collect_lines(m, link.node_names[m.metadata.src_node_id], last)
    recorder.releases = list(ledger.releases)
    recorder.finished = True


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
