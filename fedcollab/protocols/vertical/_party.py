"""Vertical runs as messages (SecureBoost, logistic regression): the label holder drives, each passive party answers.

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
* :func:`active_lr_protocol` and :class:`PassiveLrParty` are the same for vertical logistic
  regression (:mod:`fedcollab.protocols.vertical._logistic`): the same PSI and split, then two
  exchanges per iteration, and joint prediction (the passive party's partial logits on the test
  rows) riding on the last one. :func:`passive_party` picks the handler for the spec's model.

Every release is handed to ``record(release, payload)`` (the node's budget gate: check, record,
then send) *before* the message carrying it is returned. Messages cross the coordinator in
:mod:`fedcollab.protocols.vertical._codec` form, sealed end to end between the two parties
(:mod:`fedcollab.crypto._seal`); :func:`relay` is that transport in-process (tests).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcollab.core import DataValidationError, PolicyRefused, ProtocolError
from fedcollab.data import VerticalPartyData, encoded_names, party_features
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, Release
from fedcollab.protocols import psi
from fedcollab.protocols.gbdt import BinLayout, layout_from_bounds
from fedcollab.protocols.vertical._codec import register
from fedcollab.protocols.vertical._logistic import (
    EncryptedLogits,
    _answer,
    GradientAnswer,
    GradientExchange,
    LrKeyAdvert,
    PartialLogits,
    PassiveLrState,
    ResidualQuery,
    VerticalLrDpPlan,
    VerticalLrParams,
    active_lr_gradient,
    active_lr_init,
    active_lr_keys,
    active_lr_predict,
    active_lr_residual,
    passive_lr_gradient,
    passive_lr_init,
    passive_lr_keys,
    passive_lr_logits,
    passive_lr_predict,
    passive_lr_update,
    plan_vertical_lr_dp,
)
from fedcollab.protocols.vertical._logistic_multi import (
    LrMultiAdvert,
    LrMultiPassive,
    MultiLrDpPlan,
    Roles,
    contribution_releases,
    lr_multi_active,
    plan_multi_lr_dp,
)
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
    VerticalNode,
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


def model_from_document(doc: Mapping[str, object], *, what: str = "model.json") -> VerticalModel:
    """The label holder's SecureBoost part read back from :func:`model_document`'s form (refused by field if malformed)."""
    if not isinstance(doc, Mapping) or doc.get("format") != "fedcollab-secureboost-v1":
        got = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise ProtocolError(f"{what}: format: expected 'fedcollab-secureboost-v1', got {got!r}")
    try:
        trees = tuple(VerticalTree(nodes=tuple(VerticalNode(**n) for n in t)) for t in doc["trees"])  # type: ignore[attr-defined]
        return VerticalModel(trees=trees, base_score=float(doc["base_score"]), active_features=tuple(doc["active_features"]))  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: expected trees of tree nodes, base_score and active_features, got a malformed document ({type(exc).__name__})") from None


def table_from_document(doc: Mapping[str, object], *, what: str = "lookup.json") -> dict[tuple[int, int], LookupEntry]:
    """A passive party's lookup table read back from :func:`lookup_document`'s form (refused by field if malformed)."""
    if not isinstance(doc, Mapping) or doc.get("format") != "fedcollab-secureboost-lookup-v1":
        got = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise ProtocolError(f"{what}: format: expected 'fedcollab-secureboost-lookup-v1', got {got!r}")
    try:
        return {(int(e["tree"]), int(e["node"])): LookupEntry(feature=int(e["feature"]), bin_index=int(e["bin_index"]),
                                                              threshold=float(e["threshold"]), default_left=bool(e["default_left"]))
                for e in doc["entries"]}  # type: ignore[attr-defined]
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"{what}: entries: expected tree, node, feature, bin_index, threshold, default_left each, got a malformed entry "
                            f"({type(exc).__name__})") from None


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
class ResumeRows:
    """Label holder -> passive party, opening a resumed run instead of the PSI: go on after ``done`` trees (iterations) on your checkpoint's rows.

    ``ids_sha256`` is the digest of the common ids in the run's order (:func:`aligned_ids_digest`):
    the passive party refuses unless its own checkpoint's rows give the same.
    """

    done: int
    ids_sha256: str


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


@dataclass(frozen=True)
class _Aligned:
    """The alignment's outcome at the label holder: its rows of the records common to all, their split, the next outbox."""

    sel: np.ndarray  # the label holder's rows of the common records, in the final order
    train: np.ndarray
    test: np.ndarray
    opening: Outbox  # the last PSI's notice and every party's common rows: the first exchange of training
    resumed: bool = False  # from the label holder's checkpoint: the opening is a ResumeRows to each passive party


#: Called by a party's run with the body of its checkpoint and the trees (iterations) it covers; the node writes it.
Checkpointer = Callable[[int, dict[str, object]], None]


def aligned_ids_digest(ids: Sequence[str]) -> str:
    """SHA-256 of the common ids in the run's order: the same at every party of one alignment."""
    return hashlib.sha256("\x00".join(ids).encode()).hexdigest()


#: A party's checkpoint of a vertical run in its node folder (``vertical/<run>/checkpoint.json``), simulated or deployed.
CHECKPOINT_FORMAT = "fedcollab-vertical-checkpoint-v1"


def rows_body(data: VerticalPartyData, rows: np.ndarray) -> dict[str, object]:
    """A party's aligned rows (indices into its own file) and the digest of their ids: the part of its checkpoint every model shares."""
    return {"rows": [int(i) for i in rows], "ids_sha256": aligned_ids_digest([data.ids[int(i)] for i in rows])}


def checkpoint_rows(data: VerticalPartyData, doc: Mapping[str, object], *, error: type[Exception] = ProtocolError,
                    what: str = "vertical resume: the checkpoint") -> np.ndarray:
    """A party's aligned rows from its own checkpoint, refused unless its file still has those ids.

    ``error`` / ``what``: the refusal's class and wording (the node's ``ProtocolError``; ``fedcollab
    run --resume`` raises ``ConfigError`` naming the party's checkpoint).
    """
    try:
        rows = np.asarray(doc["rows"], dtype=np.int64)
    except (KeyError, TypeError, ValueError):
        raise error(f"{what}: rows: expected a list of row numbers") from None
    if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= len(data.ids) or np.unique(rows).size != rows.size:
        raise error(f"{what}: rows: expected distinct row numbers of the party's {len(data.ids)} records, got others")
    if aligned_ids_digest([data.ids[int(i)] for i in rows]) != doc.get("ids_sha256"):
        raise error(f"{what}: the party's data changed since the checkpoint (its aligned ids differ from its file's)")
    return rows


def _resumed(spec: Spec, data: VerticalPartyData, passives: Sequence[str], doc: Mapping[str, object]) -> tuple[_Aligned, int]:
    """The label holder's alignment from its checkpoint (no PSI) and the opening that tells each passive party where to go on."""
    sel = checkpoint_rows(data, doc)
    done = doc.get("done")
    if isinstance(done, bool) or not isinstance(done, int) or done < 1:
        raise ProtocolError(f"vertical resume: the checkpoint's `done` must be an int >= 1, got {done!r}")
    train, test = spec_split(spec, [data.ids[i] for i in sel])
    notice = ResumeRows(done=done, ids_sha256=str(doc["ids_sha256"]))
    return _Aligned(sel=sel, train=train, test=test, opening={p: (notice,) for p in passives}, resumed=True), done


def _align(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
           min_intersection: int) -> Generator[Outbox, Mapping[str, Sequence[object]], _Aligned]:
    """ECDH-PSI with each passive party in turn, the policy minimum, the keyed split (any vertical model)."""
    v = spec.vertical
    assert v is not None
    if v.psi_reveal != "both":
        raise ProtocolError("vertical: training needs psi_reveal = 'both' (both parties must know the common records to split them)")
    domain = vertical_domain(spec, run_id)
    sel = np.arange(len(data.ids), dtype=np.int64)
    perms: dict[str, np.ndarray] = {}
    notice: object = None
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
    opening = {p: ((notice,) if p == last else ()) + (CommonRows(positions=perms[p]),) for p in passives}
    return _Aligned(sel=sel, train=train, test=test, opening=opening)


def _opened(inbox: Mapping[str, Sequence[object]], passives: Sequence[str], *, resumed: bool = False) -> dict[str, tuple[object, ...]]:
    """Each party's replies to the opening exchange, the last PSI party's acknowledgement taken off (none in a resumed run)."""
    out = {}
    for p in passives:
        got = tuple(inbox.get(p, ()))
        if p == passives[-1] and not resumed:
            _only({p: got[:1]}, p, Ack)
            got = got[1:]
        out[p] = got
    return out


def release_test_metrics(party: str, y: np.ndarray, prob: np.ndarray, *, round_: int, record: Recorder | None) -> tuple[Release, float, float]:
    """The label holder's test AUC and accuracy on its own labels: the release to the coordinator (recorded first), AUC, accuracy."""
    auc, acc = _auc(y, prob), float(np.mean((prob >= 0.5) == (y == 1)))
    ev = Release(kind="test_metrics", about="test", unit="record", observer="coordinator", added_by=party, party=party,
                 round=round_, mechanism=NonPrivate(), details={"rows": int(len(y)), **({"auc": auc} if math.isfinite(auc) else {}), "accuracy": acc})
    if record is not None:
        record(ev, json.dumps({"auc": auc, "accuracy": acc}).encode())
    return ev, auc, acc


def active_protocol(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
                    min_intersection: int = 1, params: TreeParams | None = None,
                    on_tree: Callable[[int], None] | None = None, checkpoint: Checkpointer | None = None,
                    resume: Mapping[str, object] | None = None) -> Generator[Outbox, Mapping[str, Sequence[object]], ActiveResult]:
    """The label holder's SecureBoost run (see the module docstring); ``min_intersection``: its policy's minimum.

    ``checkpoint(done, body)`` receives its state once every passive party has answered the first
    level of tree ``done`` (so no passive checkpoint is older than the label holder's); ``resume``
    (the body of its last checkpoint) opens with :class:`ResumeRows` instead of the PSI and grows
    the trees after ``done``.
    """
    v = spec.vertical
    if v is None or data.y is None or not passives:
        raise ProtocolError("vertical: the label holder's run needs a vertical spec, its labels and at least one passive party")
    params = params or tree_params(spec)
    if resume is not None:
        al, first = _resumed(spec, data, passives, resume)
        before = model_from_document(resume.get("model"), what="the label holder's checkpoint: model")  # type: ignore[arg-type]
        if len(before.trees) != first or first >= params.n_trees:
            raise ProtocolError(f"vertical resume: the checkpoint holds {len(before.trees)} tree(s) for done = {first} of {params.n_trees}")
    else:
        al = yield from _align(spec, data, passives, run_id=run_id, record=record, min_intersection=min_intersection)
        first, before = 0, None
    train, test = al.train, al.test
    inbox = yield al.opening
    opened = _opened(inbox, passives, resumed=al.resumed)
    adverts = [_only(opened, p, PassiveAdvert) for p in passives]
    xa, y = data.x[al.sel], data.y[al.sel]
    lay_a = active_layout(spec, data, params)
    state = active_init(data.partner, xa[train], y[train], lay_a, base_score=params.base_score)
    if before is not None:
        margin = np.asarray(resume.get("margin"), dtype=np.float64)  # type: ignore[union-attr]
        if margin.shape != state.margin.shape or not np.isfinite(margin).all():
            raise ProtocolError(f"vertical resume: the checkpoint's margins must be {len(state.margin)} finite values, got shape {margin.shape}")
        state = dataclasses.replace(state, margin=margin)
    plans = None
    if spec.privacy.mode == "record":
        assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
        plans = [plan_vertical_dp(params, n_features=len(ad.n_bins), target_epsilon=spec.privacy.target_epsilon,  # type: ignore[attr-defined]
                                  delta=spec.privacy.delta) for ad in adverts]
    state, bundle = active_keys(state, adverts, plan=plans)  # type: ignore[arg-type]
    pending: dict[str, list[object]] = {p: [bundle] for p in passives}
    trees: list[VerticalTree] = list(before.trees) if before is not None else []
    for t in range(first, params.n_trees):
        grow, grads = active_begin_tree(state, t, plan=plans)
        for p in passives:
            pending[p].append(grads)
        saved = t == first or checkpoint is None  # tree `first`'s state is the run's start (or the checkpoint it resumed)
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
            if not saved and checkpoint is not None:
                part = VerticalModel(trees=tuple(trees), base_score=params.base_score, active_features=lay_a.feature_names)
                checkpoint(t, {**rows_body(data, al.sel), "model": model_document(part), "margin": [float(m) for m in state.margin]})
                saved = True
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
    _, auc, acc = release_test_metrics(data.partner, y[test], prob, round_=params.n_trees, record=record)
    splits_total = sum(1 for tr in trees for nd in tr.nodes if nd.left >= 0 and nd.owner > 0)
    return ActiveResult(model=model, intersection=int(len(al.sel)), n_train=int(len(train)), n_test=int(n_test), test_auc=auc,
                        test_accuracy=acc, passive_splits=splits_total)


# ----------------------------------------------------------------------------------- vertical logistic regression


def scale_to_unit(spec: Spec, party: VerticalPartyData, x: np.ndarray) -> np.ndarray:
    """A party's encoded features scaled to [0, 1] by the schema's public bounds (vertical LR; no data-dependent scaling)."""
    schema = spec.data_schema
    names = schema.encoded_features()
    b = np.array([schema.encoded_bounds()[names.index(n)] for n in party.feature_names], dtype=np.float64).reshape(-1, 2)
    width = np.where(b[:, 1] > b[:, 0], b[:, 1] - b[:, 0], 1.0)
    arr = np.asarray(x, dtype=np.float64)
    if not np.isfinite(arr).all():
        bad = [party.feature_names[j] for j in np.flatnonzero(~np.isfinite(arr).all(axis=0))]
        raise DataValidationError(f"{party.partner}: vertical logistic regression needs complete rows; column(s) {', '.join(bad)} have missing "
                                  "values (set schema.missing = 'drop_rows')")
    return np.clip((arr - b[:, 0]) / width, 0.0, 1.0)


def lr_roles(spec: Spec) -> Roles:
    """Who is who in a vertical LR run of ``spec``: the label holder, the passive parties in the spec's order, each one's feature count."""
    v = spec.vertical
    assert v is not None and spec.model.kind == "logistic_regression"
    names = [p.name for p in spec.partners]
    feats = {n: len(encoded_names(spec.data_schema, party_features(spec, n))) for n in names}
    return Roles(active=v.label_holder, passives=tuple(n for n in names if n != v.label_holder), features=feats)


def lr_setup(spec: Spec) -> tuple[VerticalLrParams, VerticalLrDpPlan | MultiLrDpPlan | None]:
    """Every party's vertical-LR parameters and DP plan, from the spec alone (each party derives them itself).

    The feature counts are those the spec gives each party (its columns, one-hot encoded), so a
    party's noise never depends on what another party claims. One passive party: the two-key
    protocol's :class:`VerticalLrDpPlan`; several: :class:`MultiLrDpPlan` (docs/vertical-lr.md).
    """
    v = spec.vertical
    assert v is not None and spec.model.kind == "logistic_regression"
    passives = [p.name for p in spec.partners if p.name != v.label_holder]
    params = VerticalLrParams(iterations=spec.training.rounds, learning_rate=float(spec.training.learning_rate))
    if spec.privacy.mode != "record":
        return params, None
    assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
    if len(passives) > 1:
        return params, plan_multi_lr_dp(iterations=params.iterations, parties=len(spec.partners), target_epsilon=spec.privacy.target_epsilon,
                                        delta=spec.privacy.delta)
    d_a = len(encoded_names(spec.data_schema, party_features(spec, v.label_holder)))
    d_p = len(encoded_names(spec.data_schema, party_features(spec, passives[0])))
    plan = plan_vertical_lr_dp(iterations=params.iterations, d_active=d_a, d_passive=d_p, target_epsilon=spec.privacy.target_epsilon,
                               delta=spec.privacy.delta)
    return params, plan


def lr_model_document(features: Sequence[str], weights: np.ndarray, intercept: float | None = None) -> dict[str, object]:
    """A party's part of a vertical LR model, as its node writes it (the label holder's with the intercept)."""
    doc: dict[str, object] = {"format": "fedcollab-vertical-lr-v1", "features": list(features), "scaling": "public_bounds_unit",
                              "weights": [float(w) for w in weights]}
    if intercept is not None:
        doc["intercept"] = float(intercept)
    return doc


def planned_releases(spec: Spec, party: str, *, after: int = 0) -> list[Release]:
    """The noisy releases about training rows ``party`` makes in a vertical run of ``spec`` (its budget preflight).

    ``after``: a resumed run's trees (SecureBoost) or iterations (LR) already done; only the rest are planned.

    Under record-level DP: vertical LR, every party one Gaussian gradient release per iteration
    per other party (the other party's gradient, which its share feeds); SecureBoost, every passive party one Gaussian bin-sum release per level
    of every tree (to the label holder; a tree that stops early makes fewer). Without DP: none are
    charged (the run's releases are non-private; the policy and the gate decide on them one by one).
    Every planned noise multiplier is the one the run will use, from the spec alone.
    """
    v = spec.vertical
    if v is None or spec.privacy.mode != "record":
        return []
    active = party == v.label_holder
    if spec.model.kind == "logistic_regression":
        params, plan = lr_setup(spec)
        if isinstance(plan, MultiLrDpPlan):
            return [ev for i in range(after, params.iterations) for ev in contribution_releases(lr_roles(spec), party, i, plan, planned=True)]
        assert plan is not None
        return [Release(kind="vertical_gradient", about="train", unit="record", observer="passive_party" if active else "label_holder",
                        added_by=party, party=party, round=i, mechanism=GaussianMechanism(noise_multiplier=plan.z, releases=1),
                        details={"iteration": i, "planned": True}) for i in range(after, params.iterations)]
    if active:
        return []
    assert spec.privacy.target_epsilon is not None and spec.privacy.delta is not None
    params = tree_params(spec)
    dp = plan_vertical_dp(params, n_features=1, target_epsilon=spec.privacy.target_epsilon, delta=spec.privacy.delta)  # z: by releases only
    return [_release("vertical_histogram", party=party, observer="label_holder", tree=t, level=lv,
                     mech=GaussianMechanism(noise_multiplier=dp.z, releases=1), planned=True)
            for t in range(after, params.n_trees) for lv in range(params.max_depth)]


@dataclass(frozen=True)
class ActiveLrResult:
    """What the label holder's vertical LR run produced: its weights and intercept (the passive party keeps its own), the counts."""

    weights: np.ndarray
    intercept: float
    features: tuple[str, ...]
    intersection: int
    n_train: int
    n_test: int
    test_auc: float
    test_accuracy: float
    iterations: int


def active_lr_protocol(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
                       rng: np.random.Generator | None, min_intersection: int = 1,
                       on_iteration: Callable[[int], None] | None = None, checkpoint: Checkpointer | None = None,
                       resume: Mapping[str, object] | None = None) -> Generator[Outbox, Mapping[str, Sequence[object]], ActiveLrResult]:
    """The label holder's vertical logistic regression run, in the same outbox/inbox form as :func:`active_protocol`.

    PSI and the split as for SecureBoost; then the key adverts ride with the common rows, and each
    iteration of :mod:`fedcollab.protocols.vertical._logistic` takes two exchanges (the residual
    query out, the gradient exchange back; the gradient answer out, the next encrypted logits
    back). The last answer carries the prediction request; the passive party's partial logits
    on the test rows come back with it. ``rng``: the label holder's flooding (and DP) noise.
    """
    v = spec.vertical
    if v is None or data.y is None or not passives:
        raise ProtocolError("vertical-lr: the label holder's run needs a vertical spec, its labels and at least one passive party")
    if len(passives) > 1:
        return (yield from _active_lr_multi(spec, data, passives, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                                            on_iteration=on_iteration, checkpoint=checkpoint, resume=resume))
    (p,) = passives
    params, plan = lr_setup(spec)
    if resume is not None:
        al, first = _resumed(spec, data, passives, resume)
        if first >= params.iterations:
            raise ProtocolError(f"vertical resume: the checkpoint's done = {first} leaves none of the {params.iterations} iterations")
    else:
        al = yield from _align(spec, data, passives, run_id=run_id, record=record, min_intersection=min_intersection)
        first = 0
    xa, y = scale_to_unit(spec, data, data.x[al.sel]), data.y[al.sel]
    state, advert = active_lr_init(data.partner, xa[al.train], y[al.train], params=params, plan=plan)
    if resume is not None:
        w = np.asarray(resume.get("weights"), dtype=np.float64)
        if w.shape != state.w.shape or not np.isfinite(w).all():
            raise ProtocolError(f"vertical resume: the checkpoint's weights must be {len(state.w)} finite values, got shape {w.shape}")
        state = dataclasses.replace(state, w=w, iteration=first)
    inbox = yield {p: al.opening[p] + (advert,)}
    got = _opened(inbox, passives, resumed=al.resumed)[p]
    if len(got) != 2 or not isinstance(got[0], LrKeyAdvert) or not isinstance(got[1], EncryptedLogits):
        raise ProtocolError(f"vertical-lr: expected {p!r}'s key advert and first encrypted logits, got {[type(m).__name__ for m in got]}")
    state = active_lr_keys(state, got[0])
    logits = got[1]
    for it in range(first, params.iterations):
        if it > first and checkpoint is not None:
            # The passive party's logits of this iteration say it applied the last answer (and checkpointed it).
            checkpoint(it, {**rows_body(data, al.sel), "weights": [float(x) for x in state.w]})
        state, query = active_lr_residual(state, logits, rng=rng)
        inbox = yield {p: (query,)}
        state, answer, event = active_lr_gradient(state, _only(inbox, p, GradientExchange), rng=rng)  # type: ignore[arg-type]
        record(event, answer.answer.tobytes())
        last = it == params.iterations - 1
        inbox = yield {p: (answer, PredictRequest()) if last else (answer,)}
        if not last:
            logits = _only(inbox, p, EncryptedLogits)  # type: ignore[assignment]
        if on_iteration is not None:
            on_iteration(it)
    partial = _only(inbox, p, PartialLogits)
    prob = active_lr_predict(state.w, xa[al.test], partial)  # type: ignore[arg-type]
    _, auc, acc = release_test_metrics(data.partner, y[al.test], prob, round_=params.iterations, record=record)
    return ActiveLrResult(weights=state.w[:-1].copy(), intercept=float(state.w[-1]), features=tuple(data.feature_names),
                          intersection=int(len(al.sel)), n_train=int(len(al.train)), n_test=int(len(al.test)), test_auc=auc,
                          test_accuracy=acc, iterations=params.iterations)


def _active_lr_multi(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
                     rng: np.random.Generator | None, min_intersection: int, on_iteration: Callable[[int], None] | None,
                     checkpoint: Checkpointer | None, resume: Mapping[str, object] | None) -> Generator[Outbox, Mapping[str, Sequence[object]], ActiveLrResult]:
    """:func:`active_lr_protocol` with several passive parties: the same PSI and split, then :func:`lr_multi_active` (three exchanges an iteration)."""
    roles = lr_roles(spec)
    if tuple(passives) != roles.passives:
        raise ProtocolError(f"vertical-lr: the passive parties must be the spec's, in its order: {list(roles.passives)}, got {list(passives)}")
    params, plan = lr_setup(spec)
    assert plan is None or isinstance(plan, MultiLrDpPlan)
    weights = None
    if resume is not None:
        al, first = _resumed(spec, data, passives, resume)
        if first >= params.iterations:
            raise ProtocolError(f"vertical resume: the checkpoint's done = {first} leaves none of the {params.iterations} iterations")
        weights = np.asarray(resume.get("weights"), dtype=np.float64)
    else:
        al = yield from _align(spec, data, passives, run_id=run_id, record=record, min_intersection=min_intersection)
        first = 0
    xa, y = scale_to_unit(spec, data, data.x[al.sel]), data.y[al.sel]
    assert y is not None
    inbox = yield {p: al.opening[p] for p in passives}
    got = _opened(inbox, passives, resumed=al.resumed)
    adverts = {}
    for p in passives:
        if len(got[p]) != 1 or not isinstance(got[p][0], LrMultiAdvert):
            raise ProtocolError(f"vertical-lr: expected {p!r}'s advert, got {[type(m).__name__ for m in got[p]]}")
        adverts[p] = got[p][0]

    def ckpt(done: int, w: np.ndarray) -> None:
        if checkpoint is not None:
            checkpoint(done, {**rows_body(data, al.sel), "weights": [float(x) for x in w]})

    w, inbox = yield from lr_multi_active(xa[al.train], y[al.train], roles=roles, adverts=adverts, params=params, plan=plan, rng=rng,
                                          record=record, first=first, weights=weights, final=(PredictRequest(),), on_iteration=on_iteration,
                                          checkpoint=ckpt)
    total = np.zeros(len(al.test))
    for p in passives:
        part = _only(inbox, p, PartialLogits)
        total += _answer(part.values, len(al.test), f"{p}'s partial logits")  # type: ignore[attr-defined]
    prob = active_lr_predict(w, xa[al.test], PartialLogits(rows=len(al.test), values=total))
    _, auc, acc = release_test_metrics(data.partner, y[al.test], prob, round_=params.iterations, record=record)
    return ActiveLrResult(weights=w[:-1].copy(), intercept=float(w[-1]), features=tuple(data.feature_names), intersection=int(len(al.sel)),
                          n_train=int(len(al.train)), n_test=int(len(al.test)), test_auc=auc, test_accuracy=acc, iterations=params.iterations)


# ----------------------------------------------------------------------------------- joint scoring of new records


@dataclass(frozen=True)
class ScoreResult:
    """A scoring run at the label holder: the common ids in the run's order and their scores (both stay at its node)."""

    ids: tuple[str, ...]
    scores: np.ndarray
    intersection: int


def _lr_part(doc: Mapping[str, object], n: int, what: str) -> np.ndarray:
    if not isinstance(doc, Mapping) or doc.get("format") != "fedcollab-vertical-lr-v1":
        raise ProtocolError(f"{what}: format: expected 'fedcollab-vertical-lr-v1', got {doc.get('format') if isinstance(doc, Mapping) else None!r}")
    w = np.asarray(doc.get("weights"), dtype=np.float64)
    if w.shape != (n,) or not np.isfinite(w).all():
        raise ProtocolError(f"{what}: weights: expected {n} finite values, got shape {w.shape}")
    return w


def active_score_protocol(spec: Spec, data: VerticalPartyData, passives: Sequence[str], *, run_id: str, record: Recorder,
                          part: Mapping[str, object], min_intersection: int = 1) -> Generator[Outbox, Mapping[str, Sequence[object]], ScoreResult]:
    """Score the label holder's records with a trained vertical model, jointly: a fresh PSI, then every passive party's part.

    ``part`` is the label holder's own part of the model (its ``model.json``). The opening carries
    the common rows and the :class:`PredictRequest`; each passive party answers with its decisions
    (SecureBoost: left or right per row and split, its thresholds staying with it) or its partial
    logits (LR) on **every** common record, recorded in its ledger. The scores never leave the
    label holder's node. Two relay steps in all.
    """
    v = spec.vertical
    if v is None or not passives:
        raise ProtocolError("vertical scoring: the label holder's run needs a vertical spec and at least one passive party")
    trees = model_from_document(part, what="the label holder's model part") if part.get("format") == "fedcollab-secureboost-v1" else None
    al = yield from _align(spec, data, passives, run_id=run_id, record=record, min_intersection=min_intersection)
    inbox = yield {p: al.opening[p] + (PredictRequest(),) for p in passives}
    got = _opened(inbox, passives)
    x = data.x[al.sel]
    n = len(al.sel)
    for p in passives:
        if len(got[p]) != 2 or not isinstance(got[p][0], Ack):
            raise ProtocolError(f"vertical scoring: expected {p!r}'s acknowledgement and its answer, got {[type(m).__name__ for m in got[p]]}")
    if trees is not None:
        dec: dict[tuple[int, int], np.ndarray] = {}
        for p in passives:
            d = _only({p: got[p][1:]}, p, Decisions)
            keys, left = np.asarray(d.keys), np.asarray(d.left)  # type: ignore[attr-defined]
            if keys.ndim != 2 or keys.shape[1:] != (2,) or keys.dtype.kind != "i" or left.dtype != bool or left.shape != (len(keys), n):
                raise ProtocolError(f"vertical scoring: {p!r}'s decisions must be (k, 2) integer keys and (k, {n}) booleans")
            dec.update({(int(a), int(b)): left[i] for i, (a, b) in enumerate(keys)})
        prob = 1.0 / (1.0 + np.exp(-active_margin(trees, x, None, dec)))
    else:
        w = _lr_part(part, len(data.feature_names), "the label holder's model part")
        b = part.get("intercept")
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b):
            raise ProtocolError(f"the label holder's model part: intercept: expected a finite number, got {b!r}")
        total = np.zeros(n)
        for p in passives:  # every passive party's partial logits, summed at the label holder
            part = _only({p: got[p][1:]}, p, PartialLogits)
            total += _answer(part.values, n, f"{p}'s partial logits")  # type: ignore[attr-defined]
        prob = active_lr_predict(np.append(w, float(b)), scale_to_unit(spec, data, x), PartialLogits(rows=n, values=total))
    return ScoreResult(ids=tuple(data.ids[i] for i in al.sel), scores=np.asarray(prob, dtype=np.float64), intersection=n)


# ----------------------------------------------------------------------------------- passive party


class _PassiveAligned:
    """What every passive party does first: its PSI with the label holder, then the common rows (any vertical model)."""

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder,
                 rng: np.random.Generator | None, min_intersection: int = 1, checkpoint: Checkpointer | None = None,
                 resume: Mapping[str, object] | None = None) -> None:
        if spec.vertical is None:
            raise ProtocolError("vertical: a passive party needs a vertical spec")
        self.spec, self.data, self.active, self.run_id, self.record, self.rng = spec, data, active, run_id, record, rng
        self.checkpoint, self._resume = checkpoint, resume
        self._rows: np.ndarray | None = None  # its rows of the common records, in the run's order
        self.min_intersection = max(int(min_intersection), spec.vertical.min_intersection)
        self._psi: psi.PassiveState | None = None
        self._psi_rows: np.ndarray | None = None
        self._test_x: np.ndarray | None = None
        self._started = False
        self.predicted = False
        self.finished = False

    def handle(self, msg: object) -> tuple[object, ...]:
        """Answer one message from the label holder."""
        if self.finished:
            raise ProtocolError("vertical: the run is finished; no more messages are answered")
        if isinstance(msg, ResumeRows):
            return (self._resumed(msg),)
        if isinstance(msg, psi.BlindedSet):
            if self._psi is not None or self._resume is not None:
                raise ProtocolError("vertical: the PSI already ran in this run (or the run resumes one); a second one is refused")
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
        if isinstance(msg, PredictRequest):
            if not self._started or self.predicted or msg.about != "test" or self._test_x is None:
                raise ProtocolError("vertical: the test rows are decided once, after training")
            self.predicted = True
            out = self._predict()
            self.finished = True  # the last message of a run: its part of the model is this party's to keep
            return (out,)
        if not self._started:
            raise ProtocolError("vertical: a training message before the common rows")
        return self._train(msg)

    def _common(self, msg: CommonRows) -> object:
        if self._psi_rows is None or self._started:
            raise ProtocolError("vertical: the common rows come once, after this party's PSI")
        pos = np.asarray(msg.positions)
        n = len(self._psi_rows)
        if pos.ndim != 1 or pos.dtype.kind != "i" or (pos.size and (pos.min() < 0 or pos.max() >= n)) or np.unique(pos).size != pos.size:
            raise ProtocolError(f"vertical: `CommonRows.positions` must be distinct integer positions in [0, {n})")
        if pos.size < self.min_intersection:
            raise PolicyRefused(f"vertical.min_intersection: the records common to all are {pos.size}, fewer than the {self.min_intersection} required")
        rows = self._psi_rows[pos.astype(np.int64)]
        train, test = spec_split(self.spec, [self.data.ids[i] for i in rows])
        advert = self._start(self.data.x[rows], train, test)
        self._rows = rows
        self._started = True
        return advert

    def _resumed(self, msg: ResumeRows) -> object:
        """Open a resumed run on the rows of its own checkpoint (no PSI), at the label holder's ``done``."""
        if self._resume is None or self._started or self._psi is not None:
            raise ProtocolError("vertical: a resume notice opens only a run this node resumes from its checkpoint")
        rows = checkpoint_rows(self.data, self._resume)
        if msg.ids_sha256 != self._resume.get("ids_sha256"):
            raise ProtocolError("vertical resume: the label holder resumes other common records than this party's checkpoint")
        train, test = spec_split(self.spec, [self.data.ids[i] for i in rows])
        advert = self._start(self.data.x[rows], train, test)
        self._restore(int(msg.done), int(self._resume["done"]))  # type: ignore[call-overload]
        self._rows = rows
        self._started = True
        return advert

    def _body(self) -> dict[str, object]:
        assert self._rows is not None
        return rows_body(self.data, self._rows)

    def _restore(self, done: int, mine: int) -> None:
        raise NotImplementedError

    # The model's part (a subclass each).
    def _start(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> object:
        raise NotImplementedError

    def _train(self, msg: object) -> tuple[object, ...]:
        raise NotImplementedError

    def _predict(self) -> object:
        raise NotImplementedError


class PassiveParty(_PassiveAligned):
    """A passive party's side of a SecureBoost run: one message in, its replies out (checked by the stage functions)."""

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder,
                 rng: np.random.Generator | None, min_intersection: int = 1, min_node_rows: int = 1, params: TreeParams | None = None,
                 checkpoint: Checkpointer | None = None, resume: Mapping[str, object] | None = None) -> None:
        super().__init__(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                         checkpoint=checkpoint, resume=resume)
        self.params = params or tree_params(spec)
        self.min_node_rows = int(min_node_rows)
        self._state: PassiveState | None = None
        self._plan: object | None = None

    @property
    def table(self) -> Mapping[tuple[int, int], LookupEntry]:
        """Its lookup table so far (never leaves the node)."""
        return dict(self._state.table) if self._state is not None else {}

    def document(self) -> tuple[str, dict[str, object]]:
        """Its part of the model as its node writes it: ``(file name, document)``."""
        owner = [p.name for p in self.spec.partners if p.name != self.active].index(self.data.partner) + 1
        return "lookup.json", lookup_document(self.table, owner)

    def _restore(self, done: int, mine: int) -> None:
        # Its table after `done` trees is its checkpoint's entries of those trees (the label holder may be a tree behind).
        if not 1 <= done <= mine:
            raise ProtocolError(f"vertical resume: the label holder resumes after {done} tree(s); this party's checkpoint covers {mine}")
        assert self._state is not None and self._resume is not None
        table = table_from_document(self._resume.get("lookup"), what="the checkpoint's lookup")  # type: ignore[arg-type]
        self._state = dataclasses.replace(self._state, table={k: e for k, e in table.items() if k[0] < done})

    def _train(self, msg: object) -> tuple[object, ...]:
        assert self._state is not None
        if isinstance(msg, KeyBundle):
            self._state = passive_keys(self._state, msg)
            return ()
        if isinstance(msg, EncryptedGradients):
            self._state = passive_gradients(self._state, msg)
            if self.checkpoint is not None and msg.tree >= 1:
                self.checkpoint(int(msg.tree), {**self._body(), "lookup": self.document()[1]})  # its table after the earlier trees
            return ()
        if isinstance(msg, LevelQuery):
            self._state, reply, event = passive_bin_sums(self._state, msg, plan=self._plan, rng=self.rng)  # type: ignore[arg-type]
            self.record(event, b"".join(reply.ciphertexts))
            return (reply,)
        if isinstance(msg, LevelSplits):
            self._state, parts, events = passive_level_splits(self._state, msg)
            for event, part in zip(events, parts.parts):
                self.record(event, np.asarray(part.left, dtype=bool).tobytes())
            return (parts,)
        raise ProtocolError(f"vertical: a passive party does not answer {type(msg).__name__}")

    def _start(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> PassiveAdvert:
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

    def _predict(self) -> Decisions:
        assert self._state is not None and self._test_x is not None
        mine = passive_decisions(self._state.table, self._test_x)
        keys = sorted(mine)
        left = np.array([np.asarray(mine[k], dtype=bool) for k in keys], dtype=bool).reshape(len(keys), len(self._test_x))
        ev = Release(kind="vertical_partition", about="test", unit="record", observer="label_holder", added_by=self.data.partner,
                     party=self.data.partner, round=self.params.n_trees, mechanism=NonPrivate(), declared_public=True,
                     details={"rows": int(len(self._test_x)), "splits": len(keys), "joint_prediction": True})
        self.record(ev, b"".join(np.asarray(mine[k], dtype=bool).tobytes() for k in keys))
        return Decisions(keys=np.array(keys, dtype=np.int64).reshape(-1, 2), left=left)


class PassiveLrParty(_PassiveAligned):
    """A passive party's side of a vertical logistic regression run (the counterpart of :func:`active_lr_protocol`)."""

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder,
                 rng: np.random.Generator | None, min_intersection: int = 1, checkpoint: Checkpointer | None = None,
                 resume: Mapping[str, object] | None = None) -> None:
        super().__init__(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                         checkpoint=checkpoint, resume=resume)
        self.params, self.plan = lr_setup(spec)
        self._state: PassiveLrState | None = None

    @property
    def weights(self) -> np.ndarray:
        """Its weights so far (they never leave the node)."""
        now = self._now()
        return now[0].copy() if now is not None else np.zeros(len(self.data.feature_names))

    def _now(self) -> tuple[np.ndarray, int] | None:
        """Its weights and the iterations it has applied (None before the common rows)."""
        return (self._state.w, self._state.iteration) if self._state is not None else None

    def _set(self, w: np.ndarray, done: int) -> None:
        assert self._state is not None
        self._state = dataclasses.replace(self._state, w=w, iteration=done)

    def document(self) -> tuple[str, dict[str, object]]:
        """Its part of the model as its node writes it: ``(file name, document)``."""
        return "weights.json", lr_model_document(self.data.feature_names, self.weights)

    def _start(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> LrKeyAdvert:
        if self.rng is None:
            raise ProtocolError("vertical-lr: the passive party needs the node's noise generator (flooding, DP)")
        xs = scale_to_unit(self.spec, self.data, x)
        self._state, advert = passive_lr_init(self.data.partner, xs[train], params=self.params, plan=self.plan)
        self._test_x = xs[test]
        return advert

    def _restore(self, done: int, mine: int) -> None:
        now = self._now()
        assert now is not None and self._resume is not None
        key = "weights" if done == mine else "previous" if done == mine - 1 else None
        if key is None or done < 1 or done >= self.params.iterations or key not in self._resume:
            raise ProtocolError(f"vertical resume: the label holder resumes after {done} iteration(s); this party's checkpoint covers {mine}")
        w = np.asarray(self._resume[key], dtype=np.float64)
        if w.shape != now[0].shape or not np.isfinite(w).all():
            raise ProtocolError(f"vertical resume: the checkpoint's {key} must be {len(now[0])} finite values, got shape {w.shape}")
        self._set(w, done)

    def _train(self, msg: object) -> tuple[object, ...]:
        assert self._state is not None
        if isinstance(msg, LrKeyAdvert):
            self._state = passive_lr_keys(self._state, msg)
            self._state, logits = passive_lr_logits(self._state)
            return (logits,)
        if isinstance(msg, ResidualQuery):
            self._state, out, event = passive_lr_gradient(self._state, msg, rng=self.rng)
            self.record(event, out.answer.tobytes())
            return (out,)
        if isinstance(msg, GradientAnswer):
            before = self._state.w.copy()
            self._state = passive_lr_update(self._state, msg)
            if self._state.iteration >= self.params.iterations:
                return ()
            if self.checkpoint is not None:  # the label holder checkpoints this iteration when its next logits arrive: keep one earlier too
                self.checkpoint(self._state.iteration, {**self._body(), "weights": [float(x) for x in self._state.w],
                                                        "previous": [float(x) for x in before]})
            self._state, logits = passive_lr_logits(self._state)
            return (logits,)
        raise ProtocolError(f"vertical-lr: a passive party does not answer {type(msg).__name__}")

    def _predict(self) -> PartialLogits:
        now = self._now()
        assert now is not None and self._test_x is not None
        if now[1] < self.params.iterations:
            raise ProtocolError(f"vertical-lr: prediction before training ended ({now[1]} of {self.params.iterations} iterations)")
        out, event = passive_lr_predict(self.data.partner, now[0], self._test_x, round_=self.params.iterations)
        self.record(event, out.values.tobytes())
        return out


class PassiveLrMultiParty(PassiveLrParty):
    """A passive party's side of a vertical LR run with several passive parties (:class:`LrMultiPassive` after the PSI)."""

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder,
                 rng: np.random.Generator | None, min_intersection: int = 1, checkpoint: Checkpointer | None = None,
                 resume: Mapping[str, object] | None = None) -> None:
        super().__init__(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                         checkpoint=checkpoint, resume=resume)
        assert self.plan is None or isinstance(self.plan, MultiLrDpPlan)
        self.roles = lr_roles(spec)
        self._node: LrMultiPassive | None = None

    def _now(self) -> tuple[np.ndarray, int] | None:
        return (self._node.w, self._node.iteration) if self._node is not None else None

    def _set(self, w: np.ndarray, done: int) -> None:
        assert self._node is not None
        self._node.w, self._node.iteration = w, done

    def _start(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> LrMultiAdvert:  # type: ignore[override]
        if self.rng is None:
            raise ProtocolError("vertical-lr: the passive party needs the node's noise generator (flooding, DP)")
        xs = scale_to_unit(self.spec, self.data, x)
        self._node = LrMultiPassive(self.data.partner, xs[train], roles=self.roles, params=self.params, plan=self.plan,  # type: ignore[arg-type]
                                    rng=self.rng, record=self.record)
        self._test_x = xs[test]
        return self._node.advert()

    def _train(self, msg: object) -> tuple[object, ...]:
        assert self._node is not None
        before = self._node.w.copy()
        out = self._node.handle(msg)
        if isinstance(msg, GradientAnswer) and out and self.checkpoint is not None:
            # written before its next share leaves; the label holder checkpoints this iteration when every share has arrived
            self.checkpoint(self._node.iteration, {**self._body(), "weights": [float(x) for x in self._node.w],
                                                   "previous": [float(x) for x in before]})
        return out


class PassiveScorer(_PassiveAligned):
    """A passive party's side of a scoring run (:func:`active_score_protocol`): its PSI, then its part of the model on every common record.

    ``part`` is its own part of the trained model (``lookup.json`` or ``weights.json``, read from
    its node folder). What leaves it is what joint prediction in training releases: its decisions
    (left or right per row and split) or its partial logits, recorded in its ledger first.
    """

    def __init__(self, spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder, part: Mapping[str, object],
                 min_intersection: int = 1) -> None:
        super().__init__(spec, data, active=active, run_id=run_id, record=record, rng=None, min_intersection=min_intersection)
        if part.get("format") == "fedcollab-secureboost-lookup-v1":
            self._table: dict[tuple[int, int], LookupEntry] | None = table_from_document(part, what="this party's lookup.json")
            self._weights: np.ndarray | None = None
        else:
            self._table, self._weights = None, _lr_part(part, len(data.feature_names), "this party's weights.json")
        self.scored = 0

    def document(self) -> None:
        """A scoring run writes no part of a model."""
        return None

    def _start(self, x: np.ndarray, train: np.ndarray, test: np.ndarray) -> Ack:
        self._test_x = x  # every common record is scored, not only a test split
        return Ack(what="rows")

    def _train(self, msg: object) -> tuple[object, ...]:
        raise ProtocolError(f"vertical scoring: a passive party does not answer {type(msg).__name__} in a scoring run")

    def _predict(self) -> object:
        assert self._test_x is not None
        x = self._test_x
        self.scored = len(x)
        if self._table is not None:
            mine = passive_decisions(self._table, x)
            keys = sorted(mine)
            ev = Release(kind="vertical_partition", about="test", unit="record", observer="label_holder", added_by=self.data.partner,
                         party=self.data.partner, round=0, mechanism=NonPrivate(), declared_public=True,
                         details={"rows": int(len(x)), "splits": len(keys), "joint_prediction": True, "scoring": True})
            self.record(ev, b"".join(np.asarray(mine[k], dtype=bool).tobytes() for k in keys))
            left = np.array([np.asarray(mine[k], dtype=bool) for k in keys], dtype=bool).reshape(len(keys), len(x))
            return Decisions(keys=np.array(keys, dtype=np.int64).reshape(-1, 2), left=left)
        assert self._weights is not None
        out, event = passive_lr_predict(self.data.partner, self._weights, scale_to_unit(self.spec, self.data, x), round_=0)
        self.record(event, out.values.tobytes())
        return out


def passive_party(spec: Spec, data: VerticalPartyData, *, active: str, run_id: str, record: Recorder, rng: np.random.Generator | None,
                  min_intersection: int = 1, min_node_rows: int = 1, checkpoint: Checkpointer | None = None,
                  resume: Mapping[str, object] | None = None) -> PassiveParty | PassiveLrParty | PassiveLrMultiParty:
    """The passive party's handler for the spec's model kind (SecureBoost or vertical logistic regression).

    ``checkpoint(done, body)`` receives its state as each tree (iteration) after the first begins;
    ``resume`` (the body of its last checkpoint) makes it answer a :class:`ResumeRows` opening
    instead of a PSI.
    """
    if spec.model.kind == "logistic_regression" and spec.vertical is not None and len(spec.partners) > 2:
        return PassiveLrMultiParty(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                                   checkpoint=checkpoint, resume=resume)
    if spec.model.kind == "logistic_regression":
        return PassiveLrParty(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                              checkpoint=checkpoint, resume=resume)
    return PassiveParty(spec, data, active=active, run_id=run_id, record=record, rng=rng, min_intersection=min_intersection,
                        min_node_rows=min_node_rows, checkpoint=checkpoint, resume=resume)


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


__all__ = ["Ack", "ActiveLrResult", "ActiveResult", "CommonRows", "Decisions", "PassiveLrMultiParty", "PassiveLrParty", "PassiveParty", "PredictRequest",
           "active_layout", "active_lr_protocol", "active_protocol", "lookup_document", "lr_model_document", "lr_roles", "lr_setup", "model_document",
           "passive_layout", "passive_party", "planned_releases", "relay", "release_test_metrics", "scale_to_unit", "spec_split", "split_aligned",
           "vertical_domain"]
