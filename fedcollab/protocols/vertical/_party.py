"""Vertical SecureBoost as messages: the label holder drives, each passive party answers.

What runs at a node when the parties are separate processes (deployment) rather than function
calls (:func:`fedcollab.protocols.vertical.train_vertical_in_process`, simulation):

* :func:`active_protocol` is the label holder's whole run as a generator. Each ``yield`` hands
  over an *outbox* ``{passive party: (message, ...)}`` and receives the *inbox* of their replies
  ``{passive party: (message, ...)}``; it returns an :class:`ActiveResult`. ECDH-PSI with each
  passive party in turn, the rows common to all (:class:`CommonRows`), the keyed train/test split
  both sides compute from the common ids, SecureBoost level by level (the tree's gradients and
  its first level's query ride in one message), joint prediction on the test rows
  (:class:`PredictRequest` / :class:`Decisions`, the last exchange).
* :class:`PassiveParty` answers one message at a time (:meth:`PassiveParty.handle`), with the
  stage functions' own checks (a repeat, a level not queried, a split outside its layout: refused).

Every release is handed to ``record(release, payload)`` (the node's budget gate: check, record,
then send) *before* the message carrying it is returned. Messages cross the coordinator in
:mod:`fedcollab.protocols.vertical._codec` form, sealed end to end between the two parties
(:mod:`fedcollab.crypto._seal`); :func:`relay` is that transport in-process (tests).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcollab.core import DataValidationError, PolicyRefused, ProtocolError
from fedcollab.data import VerticalPartyData
from fedcollab.privacy.accounting import NonPrivate, Release
from fedcollab.protocols import psi
from fedcollab.protocols.gbdt import BinLayout, layout_from_bounds
from fedcollab.protocols.vertical._codec import register
from fedcollab.protocols.vertical._secureboost import (
    EncryptedBinSums,
    EncryptedGradients,
    KeyBundle,
    LevelPartitions,
    LevelQuery,
    LevelSplits,
    LookupEntry,
    PassiveAdvert,
    PassiveState,
    VerticalModel,
    VerticalTree,
    _release,
    active_begin_tree,
    active_bin_sums,
    active_finish_tree,
    active_init,
    active_keys,
    active_margin,
    active_partitions,
    active_query,
    passive_bin_sums,
    passive_decisions,
    passive_gradients,
    passive_init,
    passive_keys,
    passive_level_splits,
    plan_vertical_dp,
    quantile_layout,
)
from fedcollab.spec import Spec, TreeParams, tree_params

Recorder = Callable[[Release, bytes], None]
Outbox = dict[str, tuple[object, ...]]


# ----------------------------------------------------------------------------------- shared rules


def vertical_domain(spec: Spec, run_id: str) -> bytes:
    """The per-run domain separator of the ids hashed to the PSI group."""
    return b"fedcollab/vertical/v1|" + spec.name.encode() + b"|" + run_id.encode()


def active_layout(spec: Spec, party: VerticalPartyData, params: TreeParams) -> BinLayout:
    """The label holder's bins: equal-width over the public schema bounds of its features."""
    schema = spec.data_schema
    names = schema.encoded_features()
    bounds = np.array([schema.encoded_bounds()[names.index(n)] for n in party.feature_names], dtype=np.float64).reshape(-1, 2)
    binary = []
    for n in party.feature_names:
        col = schema.column(n.split("=", 1)[0])
        binary.append(col.type in ("bool", "category"))
    return layout_from_bounds(party.feature_names, bounds, n_bins=params.n_bins, binary=binary)


def passive_layout(spec: Spec, party: VerticalPartyData, x_train: np.ndarray, params: TreeParams) -> BinLayout:
    """The passive party's bins (private quantiles of its training rows, or the public bounds)."""
    assert spec.vertical is not None
    if spec.vertical.passive_bins == "public":
        return active_layout(spec, party, params)
    return quantile_layout(x_train, party.feature_names, n_bins=params.n_bins)


def split_aligned(ids: Sequence[str], *, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and test positions over the aligned records, from their ids and the spec's seed.

    Both parties know the common ids (``psi_reveal = "both"``) and compute the same split; it is
    keyed by the id, not by the PSI order (which changes every run with the fresh PSI scalars),
    so a record stays on the same side of the split from run to run.
    """
    keys = [hashlib.sha256(f"fedcollab/vertical-split/v1|{seed}|{i}".encode()).digest() for i in ids]
    order = np.array(sorted(range(len(ids)), key=lambda j: keys[j]), dtype=np.int64)
    k = int(round(test_fraction * len(ids)))
    return np.sort(order[k:]), np.sort(order[:k])


def spec_split(spec: Spec, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The spec's split of the aligned records (the label holder's split settings), refused when a side is too small."""
    assert spec.vertical is not None
    holder = next(p for p in spec.partners if p.name == spec.vertical.label_holder)
    train, test = split_aligned(ids, test_fraction=holder.split.test_fraction or 0.34,
                                seed=holder.split.seed if holder.split.seed is not None else spec.seed)
    if len(train) < 2 or len(test) < 2:
        raise DataValidationError(f"the aligned records split into {len(train)} train and {len(test)} test rows")
    return train, test


def model_document(model: VerticalModel) -> dict[str, object]:
    """The label holder's part of a SecureBoost model, as its node writes it (``model.json``)."""
    import dataclasses

    return {"format": "fedcollab-secureboost-v1", "base_score": model.base_score, "active_features": list(model.active_features),
            "trees": [[dataclasses.asdict(n) for n in t.nodes] for t in model.trees]}


def lookup_document(table: Mapping[tuple[int, int], LookupEntry], owner: int) -> dict[str, object]:
    """A passive party's lookup table (its thresholds), as its node writes it (``lookup.json``)."""
    import dataclasses

    return {"format": "fedcollab-secureboost-lookup-v1", "owner": owner,
            "entries": [{"tree": t, "node": n, **dataclasses.asdict(e)} for (t, n), e in sorted(table.items())]}


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if len(np.unique(y)) == 2 else math.nan


# ----------------------------------------------------------------------------------- messages


@register
@dataclass(frozen=True)
class CommonRows:
    """Label holder -> passive party, after every PSI: its PSI rows (by canonical position) of the records common to all, in the final order."""

    positions: np.ndarray = field(repr=False)


@register
@dataclass(frozen=True)
class PredictRequest:
    """Label holder -> passive party, once, after training: decide your splits on the test rows (the run's last message)."""

    about: str = "test"


@register
@dataclass(frozen=True)
class Decisions:
    """Passive party -> label holder: for each of its splits ``(tree, node)``, which test rows go left (its thresholds stay)."""

    keys: np.ndarray = field(repr=False)  # (k, 2) int64
    left: np.ndarray = field(repr=False)  # (k, n_test) bool


@register
@dataclass(frozen=True)
class Ack:
    """An answer that carries nothing but having been received."""

    what: str


def _only(inbox: Mapping[str, Sequence[object]], party: str, cls: type) -> object:
    got = tuple(inbox.get(party, ()))
    if len(got) != 1 or not isinstance(got[0], cls):
        raise ProtocolError(f"vertical: expected one {cls.__name__} from {party!r}, got {[type(m).__name__ for m in got]}")
    return got[0]


# ----------------------------------------------------------------------------------- label holder


@dataclass(frozen=True)
class ActiveResult:
    """What the label holder's run produced (its model part, the test metrics it released, the counts)."""

    model: VerticalModel
    intersection: int
    n_train: int
    n_test: int
    test_auc: float
    test_accuracy: float
    passive_splits: int


def active_protocol(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
                    min_intersection: int = 1, params: TreeParams | None = None,
                    on_tree: Callable[[int], None] | None = None) -> Generator[Outbox, Mapping[str, Sequence[object]], ActiveResult]:
    """The label holder's run (see the module docstring); ``min_intersection``: its policy's minimum."""
    v = spec.vertical
    if v is None or data.y is None or not passives:
        raise ProtocolError("vertical: the label holder's run needs a vertical spec, its labels and at least one passive party")
    if v.psi_reveal != "both":
        raise ProtocolError("vertical: training needs psi_reveal = 'both' (both parties must know the common records to split them)")
    params = params or tree_params(spec)
    domain = vertical_domain(spec, run_id)
    sel = np.arange(len(data.ids), dtype=np.int64)
    perms: dict[str, np.ndarray] = {}
    for k, p in enumerate(passives):
        st, blinded = psi.active_init([data.ids[i] for i in sel], domain + b"|" + p.encode(), party=data.partner, reveal=v.psi_reveal)
        inbox = yield {p: (blinded,)}
        st, notice, event = psi.active_match(st, _only(inbox, p, psi.PassiveReply))  # type: ignore[arg-type]
        record(event, json.dumps(event.details, sort_keys=True).encode())
        assert st.result is not None
        ia = np.asarray(st.result.rows, dtype=np.int64)
        sel = sel[ia]
        for q in perms:
            perms[q] = perms[q][ia]
        perms[p] = np.arange(len(ia), dtype=np.int64)
        if k < len(passives) - 1:
            inbox = yield {p: (notice,)}
            _only(inbox, p, Ack)
    if len(passives) > 1:
        for p in passives[:-1]:
            ev = Release(kind="psi_intersection", about="train+test", unit="record", observer="passive_party", added_by=data.partner,
                         party=data.partner, round=0, mechanism=NonPrivate(), declared_public=True,
                         details={"size": int(len(sel)), "membership": True, "ids_in": int(len(data.ids)), "to": p, "common_to_all": True})
            record(ev, json.dumps(ev.details, sort_keys=True).encode())
    need = max(int(min_intersection), v.min_intersection)
    if len(sel) < need:
        raise PolicyRefused(f"vertical.min_intersection: the parties share {len(sel)} record(s), fewer than the {need} required")
    train, test = spec_split(spec, [data.ids[i] for i in sel])
    # The last PSI's notice and every party's common rows travel together (one exchange fewer).
    last = passives[-1]
    inbox = yield {p: ((notice,) if p == last else ()) + (CommonRows(positions=perms[p]),) for p in passives}
    adverts = []
    for p in passives:
        got = tuple(inbox.get(p, ()))
        if p == last:
            _only({p: got[:1]}, p, Ack)
            got = got[1:]
        adverts.append(_only({p: got}, p, PassiveAdvert))
    xa, y = data.x[sel], data.y[sel]
    lay_a = active_layout(spec, data, params)
    state = active_init(data.partner, xa[train], y[train], lay_a, base_score=params.base_score)
    plans = None
    if spec.privacy.mode == "record":
        assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
        plans = [plan_vertical_dp(params, n_features=len(ad.n_bins), target_epsilon=spec.privacy.target_epsilon,  # type: ignore[attr-defined]
                                  delta=spec.privacy.delta) for ad in adverts]
    state, bundle = active_keys(state, adverts, plan=plans)  # type: ignore[arg-type]
    pending: dict[str, list[object]] = {p: [bundle] for p in passives}
    trees: list[VerticalTree] = []
    for t in range(params.n_trees):
        grow, grads = active_begin_tree(state, t, plan=plans)
        for p in passives:
            pending[p].append(grads)
        while True:
            grow, query = active_query(grow, params)
            if query is None:
                break
            for p in passives:
                record(_release("vertical_partition", party=data.partner, observer="passive_party", tree=query.tree, level=query.level,
                                mech=NonPrivate(), n_open=query.n_open, to=p), query.position.tobytes())
                pending[p].append(query)
            inbox = yield {p: tuple(pending[p]) for p in passives}
            pending = {p: [] for p in passives}
            sums = [_only(inbox, p, EncryptedBinSums) for p in passives]
            grow, splits = active_bin_sums(state, grow, sums, params)  # type: ignore[arg-type]
            if splits:
                inbox = yield {passives[k - 1]: (msg,) for k, msg in splits.items()}
                grow = active_partitions(grow, {k: _only(inbox, passives[k - 1], LevelPartitions) for k in splits})  # type: ignore[misc]
        state, tree = active_finish_tree(state, grow, params)
        trees.append(tree)
        if on_tree is not None:
            on_tree(t)
    model = VerticalModel(trees=tuple(trees), base_score=params.base_score, active_features=lay_a.feature_names)
    inbox = yield {p: (*pending[p], PredictRequest()) for p in passives}
    n_test = len(test)
    dec: dict[tuple[int, int], np.ndarray] = {}
    for p in passives:
        d = _only(inbox, p, Decisions)
        keys, left = np.asarray(d.keys), np.asarray(d.left)  # type: ignore[attr-defined]
        if keys.ndim != 2 or keys.shape[1:] != (2,) or keys.dtype.kind != "i" or left.dtype != bool or left.shape != (len(keys), n_test):
            raise ProtocolError(f"vertical: {p!r}'s decisions must be (k, 2) integer keys and (k, {n_test}) booleans")
        dec.update({(int(a), int(b)): left[i] for i, (a, b) in enumerate(keys)})
    prob = 1.0 / (1.0 + np.exp(-active_margin(model, xa[test], lay_a, dec)))
    yt = y[test]
    auc, acc = _auc(yt, prob), float(np.mean((prob >= 0.5) == (yt == 1)))
    mev = Release(kind="test_metrics", about="test", unit="record", observer="coordinator", added_by=data.partner, party=data.partner,
                  round=params.n_trees, mechanism=NonPrivate(), details={"rows": int(n_test), **({"auc": auc} if math.isfinite(auc) else {}),
                                                                         "accuracy": acc})
    record(mev, json.dumps({"auc": auc, "accuracy": acc}).encode())
    splits_total = sum(1 for tr in trees for nd in tr.nodes if nd.left >= 0 and nd.owner > 0)
    return ActiveResult(model=model, intersection=int(len(sel)), n_train=int(len(train)), n_test=int(n_test), test_auc=auc, test_accuracy=acc,
                        passive_splits=splits_total)


# ----------------------------------------------------------------------------------- passive party


class PassiveParty:
    """A passive party's side of a run: one message in, its replies out (checked by the stage functions)."""

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder,
                 rng: np.random.Generator | None, min_intersection: int = 1, min_node_rows: int = 1, params: TreeParams | None = None) -> None:
        if spec.vertical is None:
            raise ProtocolError("vertical: a passive party needs a vertical spec")
        self.spec, self.data, self.active, self.run_id, self.record, self.rng = spec, data, active, run_id, record, rng
        self.params = params or tree_params(spec)
        self.min_intersection = max(int(min_intersection), spec.vertical.min_intersection)
        self.min_node_rows = int(min_node_rows)
        self._psi: psi.PassiveState | None = None
        self._psi_rows: np.ndarray | None = None
        self._state: PassiveState | None = None
        self._test_x: np.ndarray | None = None
        self._plan: object | None = None
        self.predicted = False
        self.finished = False

    @property
    def table(self) -> Mapping[tuple[int, int], LookupEntry]:
        """Its lookup table so far (never leaves the node)."""
        return dict(self._state.table) if self._state is not None else {}

    def handle(self, msg: object) -> tuple[object, ...]:
        """Answer one message from the label holder."""
        if self.finished:
            raise ProtocolError("vertical: the run is finished; no more messages are answered")
        if isinstance(msg, psi.BlindedSet):
            if self._psi is not None:
                raise ProtocolError("vertical: the PSI already ran in this run; a second one is refused")
            domain = vertical_domain(self.spec, self.run_id) + b"|" + self.data.partner.encode()
            st = psi.passive_init(self.data.ids, domain, party=self.data.partner)
            self._psi, reply = psi.passive_reply(st, msg)
            return (reply,)
        if isinstance(msg, psi.IntersectionNotice):
            if self._psi is None:
                raise ProtocolError("vertical: an intersection notice before the PSI")
            self._psi, result, event = psi.passive_finish(self._psi, msg)
            self.record(event, json.dumps(event.details, sort_keys=True).encode())  # what its PSI reply let the label holder learn
            if result.size < self.min_intersection:
                raise PolicyRefused(f"vertical.min_intersection: the parties share {result.size} record(s), fewer than the "
                                    f"{self.min_intersection} required")
            self._psi_rows = np.asarray(result.rows, dtype=np.int64)
            return (Ack(what="psi"),)
        if isinstance(msg, CommonRows):
            return (self._common(msg),)
        if isinstance(msg, KeyBundle):
            self._state = passive_keys(self._need_state(), msg)
            return ()
        if isinstance(msg, EncryptedGradients):
            self._state = passive_gradients(self._need_state(), msg)
            return ()
        if isinstance(msg, LevelQuery):
            self._state, reply, event = passive_bin_sums(self._need_state(), msg, plan=self._plan, rng=self.rng)  # type: ignore[arg-type]
            self.record(event, b"".join(reply.ciphertexts))
            return (reply,)
        if isinstance(msg, LevelSplits):
            self._state, parts, events = passive_level_splits(self._need_state(), msg)
            for event, part in zip(events, parts.parts):
                self.record(event, np.asarray(part.left, dtype=bool).tobytes())
            return (parts,)
        if isinstance(msg, PredictRequest):
            out = self._decide(msg)
            self.finished = True  # the last message of a run: the lookup table is this party's to keep
            return (out,)
        raise ProtocolError(f"vertical: a passive party does not answer {type(msg).__name__}")

    def _need_state(self) -> PassiveState:
        if self._state is None:
            raise ProtocolError("vertical: a training message before the common rows")
        return self._state

    def _common(self, msg: CommonRows) -> PassiveAdvert:
        if self._psi_rows is None or self._state is not None:
            raise ProtocolError("vertical: the common rows come once, after this party's PSI")
        pos = np.asarray(msg.positions)
        n = len(self._psi_rows)
        if pos.ndim != 1 or pos.dtype.kind != "i" or (pos.size and (pos.min() < 0 or pos.max() >= n)) or np.unique(pos).size != pos.size:
            raise ProtocolError(f"vertical: `CommonRows.positions` must be distinct integer positions in [0, {n})")
        if pos.size < self.min_intersection:
            raise PolicyRefused(f"vertical.min_intersection: the records common to all are {pos.size}, fewer than the {self.min_intersection} required")
        rows = self._psi_rows[pos.astype(np.int64)]
        train, test = spec_split(self.spec, [self.data.ids[i] for i in rows])
        x = self.data.x[rows]
        layout = passive_layout(self.spec, self.data, x[train], self.params)
        spec = self.spec
        if spec.privacy.mode == "record":
            assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
            self._plan = plan_vertical_dp(self.params, n_features=layout.n_features, target_epsilon=spec.privacy.target_epsilon,
                                          delta=spec.privacy.delta)
            if self.rng is None:
                raise ProtocolError("vertical: record-level DP needs the node's noise generator")
        self._state, advert = passive_init(self.data.partner, x[train], layout, min_node_rows=self.min_node_rows)
        self._test_x = x[test]
        return advert

    def _decide(self, msg: PredictRequest) -> Decisions:
        state = self._need_state()
        if self.predicted or msg.about != "test" or self._test_x is None:
            raise ProtocolError("vertical: the test rows are decided once, after training")
        self.predicted = True
        mine = passive_decisions(state.table, self._test_x)
        keys = sorted(mine)
        left = np.array([np.asarray(mine[k], dtype=bool) for k in keys], dtype=bool).reshape(len(keys), len(self._test_x))
        ev = Release(kind="vertical_partition", about="test", unit="record", observer="label_holder", added_by=self.data.partner,
                     party=self.data.partner, round=self.params.n_trees, mechanism=NonPrivate(), declared_public=True,
                     details={"rows": int(len(self._test_x)), "splits": len(keys), "joint_prediction": True})
        self.record(ev, b"".join(np.asarray(mine[k], dtype=bool).tobytes() for k in keys))
        return Decisions(keys=np.array(keys, dtype=np.int64).reshape(-1, 2), left=left)


# ----------------------------------------------------------------------------------- in-process transport


def relay(active: Generator[Outbox, Mapping[str, Sequence[object]], ActiveResult], passives: Mapping[str, Callable[[bytes], bytes]],
          *, to_wire: Callable[[str, tuple[object, ...]], bytes], from_wire: Callable[[str, bytes], tuple[object, ...]],
          seen: Callable[[str, str, bytes], None] | None = None) -> ActiveResult:
    """Drive a run as a coordinator does: the label holder's outbox to each passive party, their replies back.

    ``to_wire(passive, messages)`` / ``from_wire(passive, bytes)`` are the label holder's end
    (encode and seal, open and decode); ``passives[name](bytes) -> bytes`` is a passive node;
    ``seen(sender, receiver, bytes)`` sees everything the coordinator relays.
    """
    inbox: dict[str, tuple[object, ...]] = {}
    try:
        outbox = next(active)
        while True:
            inbox = {}
            for p, msgs in outbox.items():
                wire = to_wire(p, msgs)
                if seen is not None:
                    seen("label_holder", p, wire)
                back = passives[p](wire)
                if seen is not None:
                    seen(p, "label_holder", back)
                inbox[p] = from_wire(p, back)
            outbox = active.send(inbox)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


__all__ = ["Ack", "ActiveResult", "CommonRows", "Decisions", "PassiveParty", "PredictRequest", "active_layout", "active_protocol",
           "lookup_document", "model_document", "passive_layout", "relay", "spec_split", "split_aligned", "vertical_domain"]
