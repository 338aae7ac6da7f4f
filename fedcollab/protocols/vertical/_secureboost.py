"""Vertical SecureBoost as pure stage functions (Cheng et al., IEEE Intelligent Systems 2021).

Two parties hold different columns of the same aligned records (aligned by PSI beforehand): the
*active* party (label holder) and one *passive* party. One tree is grown level by level:

1. Per tree the active party computes the logistic gradients ``g, h`` of its margins, quantises
   them and encrypts them under its own BFV key (:class:`EncryptedGradients`).
2. Per level it sends the passive party the open tree nodes and each record's node
   (:class:`LevelQuery`: SecureBoost's "instance space", a declared non-private release of the
   active party); the passive party returns encrypted per-node, per-feature, per-bin sums of
   ``g`` and ``h`` (:class:`EncryptedBinSums`), with Gaussian noise added before they leave when
   record-level DP is on (charged to the passive party: unit record, observer label holder).
3. The active party decrypts, adds its own plaintext histograms and picks each node's split by the
   XGBoost gain over *both* parties' features. A split on a passive feature goes back as a
   reference (:class:`SplitNotice`: feature index and bin index, never a threshold: the passive
   party's bin edges stay at its node); the passive party stores the threshold in its lookup table
   and answers with the rows that go left (:class:`SplitPartition`, a declared non-private release).
4. Leaf values come from the active party's own exact sums.

Prediction is joint: the passive party evaluates its lookup table on the rows
(:func:`passive_decisions`) and the active party routes them (:func:`active_margin`). The model
can be assembled into one XGBoost model only by putting the passive party's table together with the
active party's trees (:func:`assemble_ensemble`), e.g. for tests or when both agree to publish it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.crypto import BfvPublic, BfvSecret
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, Release, calibrate_noise_multiplier, compute_epsilon
from fedcollab.protocols.gbdt import BinLayout, Ensemble, Tree, best_split, bin_rows, build_histograms, leaf_value, logistic_gradients
from fedcollab.spec import TreeParams

PROTOCOL = "fedcollab.secureboost.v1"
MAX_SCALE_BITS = 24
NOISE_TAIL = 12.0  # noise beyond 12 sigma (probability < 1e-32 per cell) would wrap: the scale leaves room for it


# ----------------------------------------------------------------------------------- binning


def quantile_layout(x: np.ndarray, names: Sequence[str], *, n_bins: int) -> BinLayout:
    """The passive party's private bin edges: quantiles of its own rows (float32), 0.5 for 0/1 features.

    These edges are the split thresholds; they never leave the passive node.
    """
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != len(names):
        raise ProtocolError(f"rows must have shape (n, {len(names)}), got {arr.shape}.")
    edges = []
    for j in range(arr.shape[1]):
        col = arr[:, j][~np.isnan(arr[:, j])]
        values = np.unique(col)
        if values.size <= 2 and np.all(np.isin(values, (0.0, 1.0))):
            edges.append(np.array([0.5]))
            continue
        qs = np.quantile(col, np.arange(1, n_bins) / n_bins) if col.size else np.array([0.0])
        e = np.unique(qs.astype(np.float32)).astype(np.float64)
        e = e[e > values.min()] if values.size else e  # an edge at the minimum leaves an empty first bin
        edges.append(e if e.size else np.array([float(np.float32(values.max() if values.size else 0.0)) + 1.0]))
    return BinLayout(feature_names=tuple(names), edges=tuple(edges))


def proxy_layout(n_bins: Sequence[int], *, prefix: str) -> BinLayout:
    """What the active party knows of the passive features: bin counts only (edges 0.5, 1.5, ... are placeholders)."""
    nb = [int(v) for v in n_bins]
    if not nb or any(v < 2 for v in nb):
        raise ProtocolError(f"the passive party's bin counts must be >= 2 per feature, got {nb}.")
    return BinLayout(feature_names=tuple(f"{prefix}[{j}]" for j in range(len(nb))), edges=tuple(np.arange(v - 1, dtype=np.float64) + 0.5 for v in nb))


def joint_layout(active: BinLayout, *passives: BinLayout) -> BinLayout:
    """Active features first, then each passive party's, in order (the split search's feature order)."""
    names, edges = active.feature_names, active.edges
    for p in passives:
        names, edges = names + p.feature_names, edges + p.edges
    return BinLayout(feature_names=names, edges=edges)


# ----------------------------------------------------------------------------------- DP plan


@dataclass(frozen=True)
class VerticalDpPlan:
    """Gaussian noise on the passive party's bin sums: unit record (its feature values), observer label holder.

    Adjacency: one aligned record's passive feature values replaced. In one level the record is in
    one open node; per passive feature its (g, h) moves from one bin to another: 2 d cells change
    by at most ``grad_clip`` (g) or ``hess_clip`` (h): L2 sensitivity ``sqrt(2 d (gc^2 + hc^2))``.
    """

    n_trees: int
    levels: int
    n_features: int
    grad_clip: float
    hess_clip: float
    z: float
    target_epsilon: float
    delta: float
    epsilon: float

    @property
    def sensitivity(self) -> float:
        """L2 sensitivity of one level's bin sums."""
        return math.sqrt(2 * self.n_features * (self.grad_clip**2 + self.hess_clip**2))

    @property
    def sigma(self) -> float:
        """Noise std of every cell."""
        return self.z * self.sensitivity


def plan_vertical_dp(params: TreeParams, *, n_features: int, target_epsilon: float, delta: float) -> VerticalDpPlan:
    """Calibrate one noise multiplier for every level of every tree (RDP accountant)."""
    steps = params.n_trees * params.max_depth
    z = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=None, steps=steps, accountant="rdp")
    eps = compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=steps)], delta=delta, accountant="rdp").epsilon
    return VerticalDpPlan(n_trees=params.n_trees, levels=params.max_depth, n_features=n_features, grad_clip=params.grad_clip,
                          hess_clip=params.hess_clip, z=z, target_epsilon=target_epsilon, delta=delta, epsilon=eps)


def scale_bits(n_records: int, plan: VerticalDpPlan | None, plain_modulus: int) -> int:
    """Fixed-point bits of g and h so that every (noisy) bin sum fits in (-t/2, t/2)."""
    bound = n_records * 1.0 + (NOISE_TAIL * plan.sigma if plan is not None else 0.0)  # |g| <= 1, h <= 1/4
    bits = int(math.floor(math.log2((plain_modulus // 2 - 1) / max(bound, 1.0))))
    if bits < 8:
        raise ProtocolError(f"{n_records} records leave only {bits} fixed-point bits in the BFV plain modulus.")
    return min(bits, MAX_SCALE_BITS)


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class PassiveAdvert:
    """Passive -> active, once: how many value bins each of its encoded features has (no edges), and its minimum node size."""

    n_bins: tuple[int, ...]
    min_node_rows: int = 1


@dataclass(frozen=True)
class KeyBundle:
    """Active -> passive, once: the BFV public key and Galois keys (no secret key), and the fixed-point scale."""

    public: tuple[bytes, bytes]
    scale_bits: int


@dataclass(frozen=True)
class EncryptedGradients:
    """Active -> passive, per tree: ciphertexts of the quantised (g, h) of every aligned training record."""

    tree: int
    chunks: tuple[bytes, ...]


@dataclass(frozen=True)
class LevelQuery:
    """Active -> passive, per level: the open nodes and the open-node index of every record (-1: in none)."""

    tree: int
    level: int
    n_open: int
    position: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class EncryptedBinSums:
    """Passive -> active, per level: encrypted (G, H) per open node, passive feature slot."""

    tree: int
    level: int
    ciphertexts: tuple[bytes, ...]


@dataclass(frozen=True)
class SplitNotice:
    """One split on a passive feature: the level's open node ``open_index`` (tree node ``node``), feature and bin (a reference, no threshold).

    The passive party takes the node's records from its own copy of the level's instance space
    (the last :class:`LevelQuery`), so a label holder cannot ask about records of its choosing.
    """

    tree: int
    node: int
    open_index: int
    feature: int
    bin_index: int
    default_left: bool


@dataclass(frozen=True)
class LevelSplits:
    """Active -> passive, per level with a passive split: every such split of the level at once."""

    tree: int
    level: int
    notices: tuple[SplitNotice, ...]


@dataclass(frozen=True)
class SplitPartition:
    """Which of a split node's records (ascending record order) go left."""

    tree: int
    node: int
    left: np.ndarray = field(repr=False)


@dataclass(frozen=True)
class LevelPartitions:
    """Passive -> active: the partitions of a :class:`LevelSplits`, in notice order."""

    tree: int
    level: int
    parts: tuple[SplitPartition, ...]


# ----------------------------------------------------------------------------------- passive side


@dataclass(frozen=True)
class LookupEntry:
    """The passive party's record of one of its splits (the threshold never leaves its node)."""

    feature: int
    bin_index: int
    threshold: float
    default_left: bool


@dataclass(frozen=True)
class PassiveState:
    """What the passive node keeps (never leaves it)."""

    party: str
    layout: BinLayout
    bins: np.ndarray = field(repr=False)
    public: BfvPublic | None = field(default=None, repr=False)
    scale_bits: int = 0
    gradients: EncryptedGradients | None = field(default=None, repr=False)
    table: Mapping[tuple[int, int], LookupEntry] = field(default_factory=dict)
    answered: frozenset[tuple[int, int]] = frozenset()
    min_node_rows: int = 1  # its policy's vertical.min_node_rows
    level: tuple[int, int] | None = None  # (tree, level) of the last query answered
    position: np.ndarray | None = field(default=None, repr=False)  # its open-node index of every record
    split_levels: frozenset[tuple[int, int]] = frozenset()


def passive_init(party: str, x: np.ndarray, layout: BinLayout, *, min_node_rows: int = 1) -> tuple[PassiveState, PassiveAdvert]:
    """Bin the passive party's rows with its private layout; advertise only the bin counts and the minimum node size it answers for."""
    bins = bin_rows(x, layout)
    return (PassiveState(party=party, layout=layout, bins=bins, min_node_rows=int(min_node_rows)),
            PassiveAdvert(n_bins=tuple(int(v) for v in layout.n_bins), min_node_rows=int(min_node_rows)))


def passive_keys(state: PassiveState, bundle: KeyBundle) -> PassiveState:
    """Load the active party's public key material (refused by SEAL if malformed)."""
    if state.public is not None:
        raise ProtocolError("secureboost: the key bundle was already received; a second one is refused.")
    return replace(state, public=BfvPublic.from_bundle(list(bundle.public)), scale_bits=int(bundle.scale_bits))


def passive_gradients(state: PassiveState, msg: EncryptedGradients) -> PassiveState:
    """Keep the tree's encrypted gradients (checked when they are used)."""
    if state.public is None:
        raise ProtocolError("secureboost: gradients before the key bundle.")
    return replace(state, gradients=msg)


def _release(kind: str, *, party: str, observer: str, tree: int, level: int, mech: GaussianMechanism | NonPrivate, **details: float | int | str | bool) -> Release:
    # The instance space (which rows go left at a split, which rows are open at a level) is
    # SecureBoost's declared leakage: recorded, never hidden, but declared rather than charged
    # (docs/vertical.md: DP covers the bin sums only).
    declared = kind == "vertical_partition"
    return Release(kind=kind, about="train", unit="record", observer=observer, added_by=party, party=party, round=tree,  # type: ignore[arg-type]
                   mechanism=mech, declared_public=declared, details={"tree": tree, "level": level, **details})


def passive_bin_sums(state: PassiveState, query: LevelQuery, *, plan: VerticalDpPlan | None,
                     rng: np.random.Generator | None, min_node_rows: int | None = None) -> tuple[PassiveState, EncryptedBinSums, Release]:
    """Encrypted per-bin sums of the query's open nodes, noisy under DP; the release to record before replying.

    ``min_node_rows`` (the node's policy, ``vertical.min_node_rows``): an open node with fewer
    records is refused, since the bin sums of a one-record node are that record's bins. Honest
    trees stay above it: every child has hessian >= ``min_child_weight`` and h <= 1/4 per record.
    """
    if state.public is None or state.gradients is None or state.gradients.tree != query.tree:
        raise ProtocolError(f"secureboost: a level query for tree {query.tree} without that tree's encrypted gradients.")
    key = (query.tree, query.level)
    if key in state.answered:
        raise ProtocolError(f"secureboost: level {query.level} of tree {query.tree} was already answered; a repeat is refused.")
    if plan is not None and query.level >= plan.levels:
        raise ProtocolError(f"secureboost: level {query.level} is beyond the plan's {plan.levels} levels per tree.")
    pos = np.asarray(query.position, dtype=np.int64)
    n = state.bins.shape[0]
    if pos.shape != (n,) or query.n_open < 1 or (pos.size and (pos.max() >= query.n_open or pos.min() < -1)):
        raise ProtocolError(f"secureboost: `position` must be {n} open-node indices in [-1, {query.n_open}).")
    counts = np.bincount(pos[pos >= 0], minlength=query.n_open)
    min_node_rows = state.min_node_rows if min_node_rows is None else min_node_rows
    if counts.min() < min_node_rows:
        raise ProtocolError(f"secureboost: an open node of level {query.level} holds {int(counts.min())} record(s), fewer than this node's "
                            f"minimum of {min_node_rows}; refused.")
    lay = state.layout
    slots = lay.n_slots
    cols = lay.offsets[None, :] + state.bins.astype(np.int64)  # missing bin = n_bins, i.e. the slot after the values
    outputs = np.where(pos[:, None] >= 0, pos[:, None] * slots + cols, -1)
    n_out = query.n_open * slots
    noise = None
    if plan is not None:
        if rng is None:
            raise ProtocolError("secureboost: a DP release needs an explicit noise generator.")
        noise = np.rint(rng.normal(0.0, plan.sigma, size=(2, n_out)) * (1 << state.scale_bits)).astype(np.int64)
        mech: GaussianMechanism | NonPrivate = GaussianMechanism(noise_multiplier=plan.z, releases=1)
        extra: dict[str, float | int | str | bool] = {"sigma": plan.sigma, "sensitivity": plan.sensitivity}
    else:
        mech, extra = NonPrivate(), {}
    cts = state.public.bin_sums(state.gradients.chunks, outputs, n_out, noise=noise)
    event = _release("vertical_histogram", party=state.party, observer="label_holder", tree=query.tree, level=query.level, mech=mech, **extra)
    new = replace(state, answered=state.answered | {key}, level=key, position=pos)
    return new, EncryptedBinSums(tree=query.tree, level=query.level, ciphertexts=tuple(cts)), event


def passive_level_splits(state: PassiveState, msg: LevelSplits) -> tuple[PassiveState, LevelPartitions, list[Release]]:
    """Record the level's splits on this party's features; return which of each node's records go left.

    Only for the level last queried, once, one split per open node, within this party's layout;
    the records of each node are this party's own copy of the level's instance space. Each split
    is a declared non-private release (SecureBoost's instance-space leakage).
    """
    if state.level is None or state.position is None or (msg.tree, msg.level) != state.level:
        raise ProtocolError(f"secureboost: splits for level {msg.level} of tree {msg.tree}, which is not the level last queried.")
    if state.level in state.split_levels:
        raise ProtocolError(f"secureboost: level {msg.level} of tree {msg.tree} was already split; a repeat is refused.")
    lay = state.layout
    n_open = int(state.position.max()) + 1 if state.position.size else 0
    seen: set[int] = set()
    table = dict(state.table)
    parts, events = [], []
    for notice in msg.notices:
        if not (0 <= notice.feature < lay.n_features and 0 <= notice.bin_index < int(lay.n_bins[notice.feature]) - 1):
            raise ProtocolError(f"secureboost: a split on feature {notice.feature} bin {notice.bin_index} is outside this party's layout.")
        if not 0 <= notice.open_index < n_open or notice.open_index in seen:
            raise ProtocolError(f"secureboost: `open_index` {notice.open_index} is not a distinct open node of the level.")
        key = (notice.tree, notice.node)
        if notice.tree != msg.tree or key in table:
            raise ProtocolError(f"secureboost: node {notice.node} of tree {notice.tree} was already split.")
        seen.add(notice.open_index)
        rows = np.flatnonzero(state.position == notice.open_index)
        b = state.bins[rows, notice.feature]
        left = np.where(b == lay.n_bins[notice.feature], notice.default_left, b <= notice.bin_index)
        table[key] = LookupEntry(feature=notice.feature, bin_index=notice.bin_index, threshold=lay.threshold(notice.feature, notice.bin_index),
                                 default_left=notice.default_left)
        parts.append(SplitPartition(tree=notice.tree, node=notice.node, left=left))
        events.append(_release("vertical_partition", party=state.party, observer="label_holder", tree=notice.tree, level=msg.level, mech=NonPrivate(),
                               node=notice.node, rows=int(rows.size)))
    new = replace(state, table=table, split_levels=state.split_levels | {state.level})
    return new, LevelPartitions(tree=msg.tree, level=msg.level, parts=tuple(parts)), events


def passive_decisions(table: Mapping[tuple[int, int], LookupEntry], x: np.ndarray, layout: BinLayout | None = None) -> dict[tuple[int, int], np.ndarray]:
    """For joint prediction: whether each row goes left at each of the passive party's splits (its thresholds; ``layout`` unused)."""
    arr = np.asarray(x, dtype=np.float64).astype(np.float32)
    out = {}
    for key, e in table.items():
        v = arr[:, e.feature]
        out[key] = np.where(np.isnan(v), e.default_left, v < np.float32(e.threshold))
    return out


# ----------------------------------------------------------------------------------- active side


@dataclass(frozen=True)
class VerticalNode:
    """One tree node as the active party holds it: ``owner`` 0 (itself) or 1 (the passive party, a reference only)."""

    left: int = -1
    right: int = -1
    owner: int = 0
    feature: int = -1  # index among the owner's own features
    bin_index: int = 0
    threshold: float = math.nan  # the active party's own splits only
    default_left: bool = True
    gain: float = 0.0
    value: float = 0.0
    hessian: float = 0.0


@dataclass(frozen=True)
class VerticalTree:
    """A finished tree: node 0 is the root."""

    nodes: tuple[VerticalNode, ...]


@dataclass(frozen=True)
class VerticalModel:
    """The active party's part of the model (each passive party keeps its lookup table; node ``owner`` k >= 1 is passive party k)."""

    trees: tuple[VerticalTree, ...]
    base_score: float
    active_features: tuple[str, ...]


@dataclass(frozen=True)
class ActiveState:
    """What the active node keeps (never leaves it)."""

    party: str
    layout: BinLayout
    bins: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    margin: np.ndarray = field(repr=False)
    passives: tuple[BinLayout, ...] = ()  # what it knows of each passive party's features: bin counts only
    min_node_rows: int = 1  # the largest minimum node size the passive parties advertised
    secret: BfvSecret | None = field(default=None, repr=False)
    scale_bits: int = 0


def active_init(party: str, x: np.ndarray, y: np.ndarray, layout: BinLayout, *, base_score: float) -> ActiveState:
    """Bin the active party's rows (its own public-bound layout) and start at ``logit(base_score)``."""
    bins = bin_rows(x, layout)
    yy = np.asarray(y, dtype=np.float64)
    if yy.shape != (bins.shape[0],) or not np.all((yy == 0) | (yy == 1)):
        raise ProtocolError(f"labels must be {bins.shape[0]} values in {{0, 1}}.")
    return ActiveState(party=party, layout=layout, bins=bins, y=yy, margin=np.full(len(yy), math.log(base_score / (1 - base_score))))


def active_keys(state: ActiveState, adverts: PassiveAdvert | Sequence[PassiveAdvert], *,
                plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None) -> tuple[ActiveState, KeyBundle]:
    """Fresh BFV keys for this run and the one bundle every passive party gets (one advert per passive party, in order).

    ``plan``: the DP plan (one per passive party, or one for all); the fixed-point headroom covers
    the largest noise any passive party adds.
    """
    ads = [adverts] if isinstance(adverts, PassiveAdvert) else list(adverts)
    if not ads:
        raise ProtocolError("secureboost: at least one passive party's advert is needed.")
    passives = tuple(proxy_layout(a.n_bins, prefix=f"passive{k + 1}" if len(ads) > 1 else "passive") for k, a in enumerate(ads))
    plans = [p for p in (plan if isinstance(plan, (list, tuple)) else [plan]) if p is not None]
    widest = max(plans, key=lambda p: p.sigma) if plans else None
    secret = BfvSecret.generate(records=len(state.y))
    bits = scale_bits(len(state.y), widest, secret.plain_modulus)
    pk, gk = secret.public_bundle()
    least = max(int(a.min_node_rows) for a in ads)
    return replace(state, passives=passives, secret=secret, scale_bits=bits, min_node_rows=least), KeyBundle(public=(pk, gk), scale_bits=bits)


def _first(plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None) -> VerticalDpPlan | None:
    """The clipping bounds are the spec's (the same in every passive party's plan)."""
    if isinstance(plan, (list, tuple)):
        return next((p for p in plan if p is not None), None)
    return plan  # type: ignore[return-value]


def _gradients(state: ActiveState, plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None) -> tuple[np.ndarray, np.ndarray]:
    plan = _first(plan)
    g, h = logistic_gradients(state.y, state.margin)
    if plan is not None:
        g, h = np.clip(g, -plan.grad_clip, plan.grad_clip), np.clip(h, 0.0, plan.hess_clip)
    return g, h


@dataclass(frozen=True)
class GrowingTree:
    """The active party's tree in progress, between messages (what its node keeps on disk in a run)."""

    tree: int
    level: int
    nodes: tuple[VerticalNode, ...]
    position: np.ndarray = field(repr=False)  # tree node id of every record
    open: tuple[int, ...]
    g: np.ndarray = field(repr=False)
    h: np.ndarray = field(repr=False)
    pending: tuple[tuple[int, int], ...] = ()  # (passive party k >= 1, tree node) split on its features, awaiting partitions
    next_open: tuple[int, ...] = ()
    min_rows: int = 1  # nodes with fewer records stay leaves (the passive parties' minimum)


def active_begin_tree(state: ActiveState, tree: int, *,
                      plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None) -> tuple[GrowingTree, EncryptedGradients]:
    """This tree's gradients and hessians, encrypted (the same ciphertexts go to every passive party)."""
    if state.secret is None or not state.passives:
        raise ProtocolError("secureboost: a tree before the keys.")
    g, h = _gradients(state, plan)
    s = float(1 << state.scale_bits)
    chunks = state.secret.encrypt_rows(np.rint(g * s).astype(np.int64), np.rint(h * s).astype(np.int64))
    grow = GrowingTree(tree=tree, level=0, nodes=(VerticalNode(),), position=np.zeros(len(state.y), dtype=np.int64), open=(0,), g=g, h=h,
                       min_rows=state.min_node_rows)
    return grow, EncryptedGradients(tree=tree, chunks=tuple(chunks))


def active_query(grow: GrowingTree, params: TreeParams) -> tuple[GrowingTree, LevelQuery | None]:
    """The next level's query (the instance space), or None when the tree is grown.

    Nodes with fewer records than the passive parties' minimum stay leaves (with noisy DP
    hessians ``min_child_weight`` alone does not keep nodes that large).
    """
    if grow.pending:
        raise ProtocolError("secureboost: the level's passive partitions are still awaited.")
    counts = np.bincount(grow.position, minlength=len(grow.nodes))
    grow = replace(grow, open=tuple(n for n in grow.open if counts[n] >= grow.min_rows))
    if not grow.open or grow.level >= params.max_depth:
        return grow, None
    index = {node: i for i, node in enumerate(grow.open)}
    pos = np.array([index.get(int(p), -1) for p in grow.position], dtype=np.int64)
    return grow, LevelQuery(tree=grow.tree, level=grow.level, n_open=len(grow.open), position=pos)


def active_bin_sums(state: ActiveState, grow: GrowingTree, replies: EncryptedBinSums | Sequence[EncryptedBinSums],
                    params: TreeParams) -> tuple[GrowingTree, dict[int, LevelSplits]]:
    """Decrypt every passive party's bin sums (one reply each, in order), pick every open node's split.

    Returns the splits to notify, per passive party k >= 1 (empty when every split is the active
    party's own: those are applied at once). Children are numbered in open-node order whoever owns
    the split, so the tree is the one central GBDT grows on the joined columns.
    """
    reps = [replies] if isinstance(replies, EncryptedBinSums) else list(replies)
    assert state.secret is not None and state.passives
    if len(reps) != len(state.passives) or grow.pending or any(r.tree != grow.tree or r.level != grow.level for r in reps):
        raise ProtocolError(f"secureboost: bin sums for level {grow.level} of tree {grow.tree} expected from each of the "
                            f"{len(state.passives)} passive parties, got {[(r.tree, r.level) for r in reps]}.")
    s = float(1 << state.scale_bits)
    index = {node: i for i, node in enumerate(grow.open)}
    pos = np.array([index.get(int(p), -1) for p in grow.position], dtype=np.int64)
    hists = [build_histograms(state.bins, grow.g, grow.h, pos, n_open=len(grow.open), layout=state.layout)]
    for lay, rep in zip(state.passives, reps):
        sums = state.secret.decrypt_sums(list(rep.ciphertexts), len(grow.open) * lay.n_slots).astype(np.float64) / s
        hists.append(sums.reshape(len(grow.open), lay.n_slots, 2))
    total = np.concatenate(hists, axis=1)
    joint = joint_layout(state.layout, *state.passives)
    starts = np.cumsum([state.layout.n_features] + [p.n_features for p in state.passives])  # first joint feature of passive k+1
    d_a = state.layout.n_features
    nodes = list(grow.nodes)
    position = grow.position.copy()
    nxt: list[int] = []
    notices: dict[int, list[SplitNotice]] = {}
    pending: list[tuple[int, int]] = []
    for i, node in enumerate(grow.open):
        split = best_split(total[i], node=node, layout=joint, params=params)
        if split is None:
            continue
        lc, rc = len(nodes), len(nodes) + 1
        if split.feature < d_a:
            rows = np.flatnonzero(grow.position == node)
            b = state.bins[rows, split.feature]
            left = np.where(b == state.layout.n_bins[split.feature], split.default_left, b <= split.bin_index)
            position[rows] = np.where(left, lc, rc)
            owner, feat, thr = 0, split.feature, split.threshold
        else:
            k = int(np.searchsorted(starts, split.feature, side="right"))  # 1-based passive party
            feat = split.feature - int(starts[k - 1])
            notices.setdefault(k, []).append(SplitNotice(tree=grow.tree, node=node, open_index=i, feature=feat, bin_index=split.bin_index,
                                                         default_left=split.default_left))
            pending.append((k, node))
            owner, thr = k, math.nan
        nodes[node] = replace(nodes[node], left=lc, right=rc, owner=owner, feature=feat, bin_index=split.bin_index,
                              threshold=thr, default_left=split.default_left, gain=split.gain)
        nodes += [VerticalNode(), VerticalNode()]
        nxt += [lc, rc]
    grown = replace(grow, nodes=tuple(nodes), position=position)
    if notices:
        out = {k: LevelSplits(tree=grow.tree, level=grow.level, notices=tuple(v)) for k, v in sorted(notices.items())}
        return replace(grown, pending=tuple(pending), next_open=tuple(nxt)), out
    return replace(grown, open=tuple(nxt), level=grow.level + 1), {}


def active_partitions(grow: GrowingTree, msgs: LevelPartitions | Mapping[int, LevelPartitions]) -> GrowingTree:
    """Apply the passive parties' partitions of the level's passive splits (per party k >= 1); the level is done."""
    by_party = {1: msgs} if isinstance(msgs, LevelPartitions) else dict(msgs)
    want: dict[int, list[int]] = {}
    for k, node in grow.pending:
        want.setdefault(k, []).append(node)
    got = {k: [p.node for p in m.parts] for k, m in by_party.items()}
    if got != want or any(m.tree != grow.tree or m.level != grow.level for m in by_party.values()):
        raise ProtocolError(f"secureboost: partitions for level {grow.level} of tree {grow.tree} do not match the splits notified.")
    position = grow.position.copy()
    for m in by_party.values():
        for part in m.parts:
            rows = np.flatnonzero(grow.position == part.node)
            left = np.asarray(part.left)
            if left.dtype != bool or left.shape != rows.shape:
                raise ProtocolError(f"secureboost: the partition of node {part.node} must be {rows.size} booleans.")
            nd = grow.nodes[part.node]
            position[rows] = np.where(left, nd.left, nd.right)
    return replace(grow, position=position, open=grow.next_open, next_open=(), pending=(), level=grow.level + 1)


def active_finish_tree(state: ActiveState, grow: GrowingTree, params: TreeParams) -> tuple[ActiveState, VerticalTree]:
    """Leaf values from the active party's own exact sums; the margins move on."""
    if grow.pending:
        raise ProtocolError("secureboost: the level's passive partitions are still awaited.")
    nodes = list(grow.nodes)
    n_nodes = len(nodes)
    gs = np.bincount(grow.position, weights=grow.g, minlength=n_nodes)
    hs = np.bincount(grow.position, weights=grow.h, minlength=n_nodes)
    # inner nodes' base weights and hessians from their subtrees (what XGBoost stores; not used to predict)
    for i in reversed(range(n_nodes)):
        if nodes[i].left >= 0:
            gs[i] = gs[nodes[i].left] + gs[nodes[i].right]
            hs[i] = hs[nodes[i].left] + hs[nodes[i].right]
    for i, nd in enumerate(nodes):
        nodes[i] = replace(nd, value=leaf_value(gs[i], hs[i], params), hessian=max(float(hs[i]), 0.0))
    vt = VerticalTree(nodes=tuple(nodes))
    leaf_vals = np.array([nodes[i].value for i in range(n_nodes)], dtype=np.float32).astype(np.float64)
    return replace(state, margin=state.margin + leaf_vals[grow.position]), vt


def train_tree(state: ActiveState, tree: int, params: TreeParams, *, plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None,
               exchange: _Exchange) -> tuple[ActiveState, VerticalTree]:
    """Grow one tree through the stages above, calling ``exchange`` for every message to the passive parties."""
    grow, grads = active_begin_tree(state, tree, plan=plan)
    exchange.gradients(grads)
    while True:
        grow, query = active_query(grow, params)
        if query is None:
            break
        grow, splits = active_bin_sums(state, grow, exchange.level(query), params)
        if splits:
            grow = active_partitions(grow, {k: exchange.splits(k, msg) for k, msg in splits.items()})
    return active_finish_tree(state, grow, params)


class _Exchange:
    """How the active party reaches the passive ones: in-process calls here, Flower messages in a run."""

    def gradients(self, msg: EncryptedGradients) -> None:  # pragma: no cover - interface
        """To every passive party."""
        raise NotImplementedError

    def level(self, msg: LevelQuery) -> list[EncryptedBinSums]:  # pragma: no cover - interface
        """To every passive party; their replies in order."""
        raise NotImplementedError

    def splits(self, passive: int, msg: LevelSplits) -> LevelPartitions:  # pragma: no cover - interface
        """To passive party ``passive`` (1-based)."""
        raise NotImplementedError


def active_margin(model: VerticalModel, x_active: np.ndarray, layout: BinLayout | None, decisions: Mapping[tuple[int, int], np.ndarray]) -> np.ndarray:
    """Joint prediction at the active party: its own splits on its rows (their thresholds), the passive party's as decided by it."""
    arr = np.asarray(x_active, dtype=np.float64).astype(np.float32)
    n = arr.shape[0]
    margin = np.full(n, math.log(model.base_score / (1 - model.base_score)))
    rows = np.arange(n)
    for t, tree in enumerate(model.trees):
        node = np.zeros(n, dtype=np.int64)
        for _ in range(len(tree.nodes)):
            inner = np.array([tree.nodes[k].left >= 0 for k in node])
            if not inner.any():
                break
            go_left = np.zeros(n, dtype=bool)
            for k in np.unique(node[inner]):
                nd = tree.nodes[int(k)]
                sel = rows[node == k]
                if nd.owner == 0:
                    v = arr[sel, nd.feature]
                    go_left[sel] = np.where(np.isnan(v), nd.default_left, v < np.float32(nd.threshold))
                else:
                    dec = decisions.get((t, int(k)))
                    if dec is None or np.shape(dec) != (n,):
                        raise ProtocolError(f"secureboost: no passive decision for node {int(k)} of tree {t}.")
                    go_left[sel] = np.asarray(dec, dtype=bool)[sel]
            node = np.where(inner, np.where(go_left, [tree.nodes[k].left for k in node], [tree.nodes[k].right for k in node]), node)
        values = np.array([nd.value for nd in tree.nodes], dtype=np.float32).astype(np.float64)
        margin = margin + values[node]
    return margin


def assemble_ensemble(model: VerticalModel, table: Mapping[tuple[int, int], LookupEntry] | Sequence[Mapping[tuple[int, int], LookupEntry]],
                      passive: BinLayout | Sequence[BinLayout]) -> Ensemble:
    """One XGBoost-style ensemble over the joint features (active first, then each passive party's): needs their lookup tables."""
    tables = [table] if isinstance(table, Mapping) else list(table)
    lays = [passive] if isinstance(passive, BinLayout) else list(passive)
    d_a = len(model.active_features)
    offsets = np.cumsum([d_a] + [lay.n_features for lay in lays])
    trees = []
    for t, vt in enumerate(model.trees):
        feat, thr, bidx, dl = [], [], [], []
        for i, nd in enumerate(vt.nodes):
            if nd.left < 0:
                feat.append(0), thr.append(nd.value), bidx.append(0), dl.append(False)
            elif nd.owner == 0:
                feat.append(nd.feature), thr.append(float(np.float32(nd.threshold))), bidx.append(nd.bin_index), dl.append(nd.default_left)
            else:
                e = tables[nd.owner - 1][(t, i)]
                feat.append(int(offsets[nd.owner - 1]) + e.feature), thr.append(float(np.float32(e.threshold))), bidx.append(e.bin_index)
                dl.append(e.default_left)
        trees.append(Tree(left=tuple(n.left for n in vt.nodes), right=tuple(n.right for n in vt.nodes), feature=tuple(feat),
                          bin_index=tuple(bidx), threshold=tuple(thr), default_left=tuple(dl), value=tuple(n.value for n in vt.nodes),
                          gain=tuple(n.gain for n in vt.nodes), hessian=tuple(n.hessian for n in vt.nodes)))
    names = model.active_features
    for lay in lays:
        names = names + lay.feature_names
    return Ensemble(trees=tuple(trees), base_score=model.base_score, feature_names=names)