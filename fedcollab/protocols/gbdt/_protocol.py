"""The federated GBDT protocol as pure stage functions: messages, node side, coordinator side.

One tree is built in *steps*; in every step the coordinator sends a :class:`LevelRequest` and
each node answers with a :class:`HistogramReply`:

* ``release = "histogram"`` (step ``level < split_levels``): the splits chosen at the previous
  step, and the open tree nodes whose per-feature, per-bin (G, H) sums the coordinator wants;
* ``release = "leaves"`` (the last step): the last splits, and the leaves whose (G, H) sums it wants.

The coordinator sums the replies (:func:`sum_histograms`, or SecAgg+ over
:func:`encode_histograms`), picks splits (:func:`best_split`) or leaf values, and finally sends
the finished :class:`Tree`, which every node adds to its margins (:func:`node_apply_tree`).
``split_levels`` is ``max_depth`` without DP and with ``dp_split = "histogram"``, and 0 with
``dp_split = "random"`` (the coordinator draws the whole tree from the public bins and asks only
for leaf sums). A node refuses any request its plan does not allow (wrong tree, a repeated step,
a histogram under random splits), whatever order requests come in: the release it would make is
returned as a :class:`Release` for the node adapter to gate against the budget and record.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import Release
from fedcollab.protocols.gbdt._binning import BinLayout, bin_rows
from fedcollab.protocols.gbdt._dp import GbdtDpPlan, ReleaseKind, add_noise, clip_gradients, release_event, sketch_release
from fedcollab.protocols.gbdt._histogram import build_histograms, leaf_sums
from fedcollab.protocols.gbdt._model import Tree
from fedcollab.protocols.gbdt._sketch import SketchLayout, layout_from_sketch, sketch_counts
from fedcollab.protocols.gbdt._split import best_split, leaf_value, random_split
from fedcollab.spec import TreeParams

PROTOCOL = "fedcollab.gbdt.v1"


def split_levels(params: TreeParams, plan: GbdtDpPlan | None) -> int:
    """Histogram steps per tree: ``max_depth``, or 0 with DP and random splits."""
    return plan.split_levels if plan is not None else params.max_depth


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class NodeSplit:
    """A split as a node applies it: rows of ``node`` with ``bin <= bin_index`` go to ``left_child``."""

    node: int
    feature: int
    bin_index: int
    default_left: bool
    left_child: int
    right_child: int


def _ints(wire: Mapping[str, Any], key: str, what: str) -> list[int]:
    v = wire.get(key)
    if not isinstance(v, (list, tuple)) or not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in v):
        raise ProtocolError(f"{what}: `{key}` must be a list of ints, got {type(v).__name__}.")
    return [int(i) for i in v]


def _int(wire: Mapping[str, Any], key: str, what: str) -> int:
    v = wire.get(key)
    if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
        raise ProtocolError(f"{what}: `{key}` must be an int >= 0, got {v!r}.")
    return int(v)


def _release(wire: Mapping[str, Any], what: str) -> ReleaseKind:
    v = wire.get("release")
    if v not in ("histogram", "leaves"):
        raise ProtocolError(f"{what}: `release` must be 'histogram' or 'leaves', got {v!r}.")
    return v  # type: ignore[return-value]


def _header(wire: Mapping[str, Any], kind: str, what: str) -> None:
    if wire.get("protocol") != PROTOCOL or wire.get("kind") != kind:
        raise ProtocolError(f"{what}: expected protocol {PROTOCOL!r} kind {kind!r}, got {wire.get('protocol')!r} {wire.get('kind')!r}.")


@dataclass(frozen=True)
class LevelRequest:
    """Coordinator -> node: apply these splits, then release sums for these open nodes (or leaves)."""

    tree: int
    level: int
    release: ReleaseKind
    open: tuple[int, ...]
    splits: tuple[NodeSplit, ...] = ()

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        return {
            "protocol": PROTOCOL, "kind": "level_request", "tree": self.tree, "level": self.level, "release": self.release,
            "open": list(self.open),
            "split_node": [s.node for s in self.splits], "split_feature": [s.feature for s in self.splits],
            "split_bin": [s.bin_index for s in self.splits], "split_default_left": [int(s.default_left) for s in self.splits],
            "split_left": [s.left_child for s in self.splits], "split_right": [s.right_child for s in self.splits],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> LevelRequest:
        """Parse and check types (the node checks the request against its plan)."""
        what = "gbdt level request"
        _header(wire, "level_request", what)
        cols = [_ints(wire, k, what) for k in ("split_node", "split_feature", "split_bin", "split_default_left", "split_left", "split_right")]
        if len({len(c) for c in cols}) != 1:
            raise ProtocolError(f"{what}: the split_* lists must have equal lengths, got {[len(c) for c in cols]}.")
        splits = tuple(NodeSplit(node=n, feature=f, bin_index=b, default_left=bool(d), left_child=lc, right_child=rc) for n, f, b, d, lc, rc in zip(*cols))
        return cls(tree=_int(wire, "tree", what), level=_int(wire, "level", what), release=_release(wire, what),
                   open=tuple(_ints(wire, "open", what)), splits=splits)


@dataclass(frozen=True)
class HistogramReply:
    """Node -> coordinator: the (noisy) sums, shape ``(n_open, n_slots, 2)`` or ``(n_leaves, 2)``."""

    tree: int
    level: int
    release: ReleaseKind
    values: np.ndarray = field(compare=False)

    def to_wire(self) -> dict[str, Any]:
        """Flat record (under secagg only the header travels; the values go masked through SecAgg+)."""
        return {"protocol": PROTOCOL, "kind": "histogram_reply", "tree": self.tree, "level": self.level, "release": self.release,
                "shape": list(self.values.shape), "values": self.values.ravel().tolist()}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> HistogramReply:
        """Parse; values must be finite and match the shape."""
        what = "gbdt histogram reply"
        _header(wire, "histogram_reply", what)
        shape = tuple(_ints(wire, "shape", what))
        try:
            values = np.asarray(wire.get("values"), dtype=np.float64)
        except (TypeError, ValueError):
            raise ProtocolError(f"{what}: `values` must be a list of numbers.") from None
        if values.ndim != 1 or values.size != math.prod(shape) or not np.all(np.isfinite(values)):
            raise ProtocolError(f"{what}: `values` must be {math.prod(shape)} finite numbers for shape {shape}, got {values.size}.")
        return cls(tree=_int(wire, "tree", what), level=_int(wire, "level", what), release=_release(wire, what), values=values.reshape(shape))


def sketch_request_wire() -> dict[str, Any]:
    """Coordinator -> node: release your count sketch (the run's first step)."""
    return {"protocol": PROTOCOL, "kind": "sketch_request"}


def is_sketch_request(wire: Mapping[str, Any]) -> bool:
    """Whether a ``gbdt`` record asks for the sketch (else it is a level request)."""
    return wire.get("protocol") == PROTOCOL and wire.get("kind") == "sketch_request"


def sketch_reply_wire(values: np.ndarray) -> dict[str, Any]:
    """Node -> coordinator: the (noisy) counts."""
    return {"protocol": PROTOCOL, "kind": "sketch_reply", "shape": list(values.shape), "values": np.asarray(values, dtype=np.float64).ravel().tolist()}


def sketch_reply_from_wire(wire: Mapping[str, Any], sk: SketchLayout) -> np.ndarray:
    """Parse a sketch reply: finite numbers of the sketch's shape."""
    _header(wire, "sketch_reply", "gbdt sketch reply")
    shape = (len(sk.features), sk.n_cells)
    try:
        values = np.asarray(wire.get("values"), dtype=np.float64)
    except (TypeError, ValueError):
        raise ProtocolError("gbdt sketch reply: `values` must be a list of numbers.") from None
    if list(wire.get("shape") or []) != list(shape) or values.ndim != 1 or values.size != shape[0] * shape[1] or not np.all(np.isfinite(values)):
        raise ProtocolError(f"gbdt sketch reply: `values` must be {shape[0] * shape[1]} finite numbers of shape {shape}.")
    return values.reshape(shape)


def edges_to_wire(indices: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Coordinator -> node, with the first tree's first step: the chosen grid indices."""
    return {"protocol": PROTOCOL, "kind": "edges", "indices": json.dumps([list(map(int, i)) for i in indices])}


def edges_from_wire(wire: Mapping[str, Any]) -> tuple[tuple[int, ...], ...]:
    """Parse the edges record (types only; :func:`layout_from_sketch` checks them against the grid)."""
    _header(wire, "edges", "gbdt edges")
    try:
        raw = json.loads(str(wire["indices"]))
    except (KeyError, TypeError, ValueError):
        raise ProtocolError("gbdt edges: `indices` must be a JSON list of lists of ints.") from None
    if not isinstance(raw, list) or not all(isinstance(r, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in r) for r in raw):
        raise ProtocolError("gbdt edges: `indices` must be a JSON list of lists of ints.")
    return tuple(tuple(r) for r in raw)


# ----------------------------------------------------------------------------------- node side


@dataclass(frozen=True)
class NodeState:
    """What a node keeps between steps (never leaves the node)."""

    bins: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    margin: np.ndarray = field(repr=False)
    position: np.ndarray = field(repr=False)  # tree node id of every row in the tree being built
    g: np.ndarray = field(repr=False)
    h: np.ndarray = field(repr=False)
    trees_done: int = 0
    steps_done: frozenset[tuple[int, int]] = frozenset()
    leaves_released: bool = False  # the current tree's leaf sums left: no further step until the tree is applied
    sketched: bool = False  # bin_edges = "quantile": the count sketch left (answered once, before any tree)
    edge_index: tuple[tuple[int, ...], ...] | None = None  # the quantile edges' grid indices, once received
    tree_digests: tuple[str, ...] = ()  # tree_digest of every tree applied, in order (to recognise them at a resume)


def node_init(x_train: np.ndarray, y_train: np.ndarray, *, layout: BinLayout, base_score: float) -> NodeState:
    """Bin the node's rows and start from the margin ``logit(base_score)``."""
    y = np.asarray(y_train, dtype=np.float64)
    bins = bin_rows(x_train, layout)
    if y.shape != (bins.shape[0],) or not np.all((y == 0) | (y == 1)):
        raise ProtocolError(f"labels must be {bins.shape[0]} values in {{0, 1}}.")
    n = len(y)
    margin = np.full(n, math.log(base_score / (1 - base_score)))
    return NodeState(bins=bins, y=y, margin=margin, position=np.zeros(n, dtype=np.int64), g=np.zeros(n), h=np.zeros(n))


def node_sketch(state: NodeState, x_train: np.ndarray, *, party: str, sketch: SketchLayout, plan: GbdtDpPlan | None,
                rng: np.random.Generator | None) -> tuple[NodeState, np.ndarray, Release]:
    """The run's first step with quantile edges: the node's (noisy) count sketch and its release event.

    Raises
    ------
    ProtocolError
        If the sketch was already answered or a tree has started (the sketch comes once, first).
    """
    if state.sketched or state.trees_done or state.steps_done or state.edge_index is not None:
        raise ProtocolError("gbdt: the count sketch is the run's first step and is answered once.")
    if plan is not None and rng is None:
        raise ProtocolError("gbdt: a DP release needs an explicit noise generator.")
    event = sketch_release(plan, party=party)
    values = sketch_counts(x_train, sketch)
    if plan is not None:
        assert rng is not None
        values = add_noise(values, sigma=plan.sigma_sketch, rng=rng)
    return replace(state, sketched=True), values, event


def node_set_edges(state: NodeState, x_train: np.ndarray, indices: Sequence[Sequence[int]], *, public: BinLayout, sketch: SketchLayout,
                   n_bins: int) -> tuple[NodeState, BinLayout]:
    """Check the coordinator's quantile edges against the public grid and re-bin the node's rows with them.

    Raises
    ------
    ProtocolError
        Before the sketch, after the first tree step, a second time, or with edges off the grid.
    """
    if not state.sketched or state.edge_index is not None or state.steps_done:
        raise ProtocolError("gbdt: quantile edges arrive once, after the sketch and with the first tree's first step.")
    layout = layout_from_sketch(public, sketch, indices, n_bins=n_bins)
    idx = tuple(tuple(int(v) for v in i) for i in indices)
    return replace(state, bins=bin_rows(x_train, layout), edge_index=idx), layout


def logistic_gradients(y: np.ndarray, margin: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gradient and hessian of the logistic loss in the margin: ``p - y`` and ``p (1 - p)``."""
    p = 1.0 / (1.0 + np.exp(-margin))
    return p - y, p * (1.0 - p)


def node_reply(state: NodeState, request: LevelRequest, *, party: str, layout: BinLayout, params: TreeParams,
               plan: GbdtDpPlan | None, rng: np.random.Generator | None) -> tuple[NodeState, HistogramReply, Release]:
    """Check ``request`` against the plan, apply its splits, and build the (noisy) reply and its release event.

    Raises
    ------
    ProtocolError
        If the request is out of order, repeats a step, or asks for a release the plan does not make.
    """
    levels = split_levels(params, plan)
    t, lv = request.tree, request.level
    if t != state.trees_done or t >= params.n_trees:
        raise ProtocolError(f"gbdt: request for tree {t}, but this node expects tree {state.trees_done} of {params.n_trees}.")
    if (t, lv) in state.steps_done:
        raise ProtocolError(f"gbdt: step {lv} of tree {t} was already answered; a repeat is refused.")
    if state.leaves_released:
        raise ProtocolError(f"gbdt: the leaf sums of tree {t} were released; the tree takes no further step.")
    if lv > levels:
        raise ProtocolError(f"gbdt: step {lv} of tree {t} is beyond the plan ({levels} histogram steps, then the leaves).")
    if lv > 0 and (t, lv - 1) not in state.steps_done:
        raise ProtocolError(f"gbdt: step {lv} of tree {t} requested before step {lv - 1}.")
    if request.release == "histogram" and lv >= levels:
        raise ProtocolError(f"gbdt: a histogram at step {lv} is not in the plan ({levels} histogram steps per tree).")
    if plan is not None and rng is None:
        raise ProtocolError("gbdt: a DP release needs an explicit noise generator.")
    if lv == 0:
        g, h = logistic_gradients(state.y, state.margin)
        if plan is not None:
            g, h = clip_gradients(g, h, grad_clip=plan.grad_clip, hess_clip=plan.hess_clip)
        state = replace(state, g=g, h=h, position=np.zeros(len(state.y), dtype=np.int64))
    position = state.position.copy()
    missing_bin = layout.n_bins
    for s in request.splits:
        if not (0 <= s.feature < layout.n_features and 0 <= s.bin_index < int(layout.n_bins[s.feature]) - 1):
            raise ProtocolError(f"gbdt: split of node {s.node} names feature {s.feature} bin {s.bin_index}, outside the layout.")
        rows = np.flatnonzero(position == s.node)  # splits come parent first: a child may split in the same request
        b = state.bins[rows, s.feature]
        go_left = np.where(b == missing_bin[s.feature], s.default_left, b <= s.bin_index)
        position[rows] = np.where(go_left, s.left_child, s.right_child)
    if len(set(request.open)) != len(request.open):
        raise ProtocolError("gbdt: `open` lists a node twice.")
    index = {node: i for i, node in enumerate(request.open)}
    pos = np.array([index.get(int(p), -1) for p in range(int(position.max()) + 1)], dtype=np.int64)[position] if len(position) else position
    if request.release == "histogram":
        values = build_histograms(state.bins, state.g, state.h, pos, n_open=len(request.open), layout=layout)
        sigma = plan.sigma_split if plan is not None else 0.0
    else:
        values = leaf_sums(state.g, state.h, pos, n_leaves=len(request.open))
        sigma = plan.sigma_leaf if plan is not None else 0.0
    event = release_event(plan, party=party, tree=t, level=lv, release=request.release)
    if plan is not None:
        assert rng is not None
        values = add_noise(values, sigma=sigma, rng=rng)
    state = replace(state, position=position, steps_done=state.steps_done | {(t, lv)}, leaves_released=request.release == "leaves")
    return state, HistogramReply(tree=t, level=lv, release=request.release, values=values), event


def node_apply_tree(state: NodeState, tree: Tree, *, layout: BinLayout) -> NodeState:
    """Add a finished tree's leaf values to the node's margins."""
    leaves = tree.leaf_of_bins(state.bins, layout.n_bins)
    values = np.asarray(tree.value, dtype=np.float32).astype(np.float64)
    return replace(state, margin=state.margin + values[leaves], trees_done=state.trees_done + 1, leaves_released=False,
                   tree_digests=(*state.tree_digests, tree_digest(tree)))


def tree_digest(tree: Tree) -> str:
    """SHA-256 of what a tree does to a node's margins: its routing (children, features, bins, default directions) and leaf values."""
    body = [list(tree.left), list(tree.right), list(tree.feature), list(tree.bin_index), [bool(v) for v in tree.default_left],
            [float(v) for v in tree.value]]
    return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def node_resume(state: NodeState, trees: Sequence[Tree], *, layout: BinLayout, base_score: float, catch_up: bool = False) -> NodeState:
    """A resumed run's first step: rebuild the margins from the coordinator's checkpointed trees.

    The node accepts the trees only as far as it knows them: every tree it applied before must come
    back unchanged (by :func:`tree_digest`), and at most one tree more, the one whose leaf sums it
    released last (the coordinator finished it; the node never received it). The margins are then
    recomputed from ``logit(base_score)`` in tree order, exactly as the applications made them;
    steps of later trees are forgotten, so the resumed run answers them again (each answer a new,
    charged release).

    ``catch_up=True`` (a node re-admitted after it dropped out of the same run): the trees after the
    ones it applied are accepted although it did not help build them (they are the model every
    node receives for evaluation anyway, and the coordinator chooses every tree a node applies in
    any case), but never fewer trees than it applied: a catch-up moves a node forward only, so it
    is never asked for a tree's sums twice.

    Raises
    ------
    ProtocolError
        For a tree the node did not apply (or more trees than it released), or with the quantile
        sketch answered but no edges.
    """
    if len(state.tree_digests) != state.trees_done:
        raise ProtocolError("gbdt resume: this node's record of the trees it applied is incomplete.")
    known = state.trees_done + (1 if state.leaves_released else 0)
    if catch_up and len(trees) < state.trees_done:
        raise ProtocolError(f"gbdt catch-up: {len(trees)} trees, but this node applied {state.trees_done} already.")
    if not catch_up and len(trees) > known:
        raise ProtocolError(f"gbdt resume: {len(trees)} trees, but this node released the leaves of {known}.")
    for i, tree in enumerate(trees[:len(state.tree_digests)]):
        if tree_digest(tree) != state.tree_digests[i]:
            raise ProtocolError(f"gbdt resume: tree {i} is not the tree this node applied.")
    if state.sketched and state.edge_index is None and trees:
        raise ProtocolError("gbdt resume: trees of a quantile run, but this node never received the edges.")
    n = len(state.y)
    fresh = replace(state, margin=np.full(n, math.log(base_score / (1 - base_score))), position=np.zeros(n, dtype=np.int64),
                    trees_done=0, tree_digests=(), leaves_released=False, steps_done=frozenset(s for s in state.steps_done if s[0] < len(trees)))
    for tree in trees:
        fresh = node_apply_tree(fresh, tree, layout=layout)
    return fresh


# ----------------------------------------------------------------------------------- coordinator side


@dataclass(frozen=True)
class _Node:
    left: int = -1
    right: int = -1
    feature: int = -1
    bin_index: int = 0
    threshold: float = 0.0
    default_left: bool = True
    gain: float = 0.0
    g: float = math.nan
    h: float = math.nan


@dataclass(frozen=True)
class GrowingTree:
    """The coordinator's state of the tree being built."""

    index: int
    nodes: tuple[_Node, ...]
    open: tuple[int, ...]

    def leaves(self) -> tuple[int, ...]:
        """Ids of the nodes without children."""
        return tuple(i for i, n in enumerate(self.nodes) if n.left < 0)


def _grow(nodes: list[_Node], node: int, split: Any) -> NodeSplit:
    lc, rc = len(nodes), len(nodes) + 1
    nodes[node] = replace(nodes[node], left=lc, right=rc, feature=split.feature, bin_index=split.bin_index,
                          threshold=split.threshold, default_left=split.default_left, gain=split.gain)
    nodes.append(_Node(g=split.left[0], h=split.left[1]))
    nodes.append(_Node(g=split.right[0], h=split.right[1]))
    return NodeSplit(node=node, feature=split.feature, bin_index=split.bin_index, default_left=split.default_left, left_child=lc, right_child=rc)


def coordinator_start_tree(index: int, *, layout: BinLayout, params: TreeParams, plan: GbdtDpPlan | None,
                           rng: np.random.Generator) -> tuple[GrowingTree, LevelRequest]:
    """The first request of tree ``index``: the root's histograms, or (random splits) the whole tree's leaf sums."""
    if split_levels(params, plan) > 0:
        return GrowingTree(index=index, nodes=(_Node(),), open=(0,)), LevelRequest(tree=index, level=0, release="histogram", open=(0,))
    nodes = [_Node()]
    splits: list[NodeSplit] = []
    frontier = [0]
    for _ in range(params.max_depth):
        nxt = []
        for node in frontier:
            s = _grow(nodes, node, random_split(node=node, layout=layout, rng=rng))
            splits.append(s)
            nxt += [s.left_child, s.right_child]
        frontier = nxt
    gt = GrowingTree(index=index, nodes=tuple(nodes), open=tuple(frontier))
    return gt, LevelRequest(tree=index, level=0, release="leaves", open=gt.leaves(), splits=tuple(splits))


def coordinator_step(gt: GrowingTree, request: LevelRequest, total: np.ndarray, *, layout: BinLayout, params: TreeParams,
                     plan: GbdtDpPlan | None) -> tuple[GrowingTree, LevelRequest | None, Tree | None]:
    """From the summed reply to ``request``: the next request, or (after the leaf sums) the finished tree."""
    if request.release == "leaves":
        if total.shape != (len(request.open), 2):
            raise ProtocolError(f"gbdt: leaf sums must have shape ({len(request.open)}, 2), got {total.shape}.")
        nodes = list(gt.nodes)
        for i, leaf in enumerate(request.open):
            nodes[leaf] = replace(nodes[leaf], g=float(total[i, 0]), h=float(total[i, 1]))
        return replace(gt, nodes=tuple(nodes)), None, _finish(nodes, request.open, params)
    if total.shape != (len(request.open), layout.n_slots, 2):
        raise ProtocolError(f"gbdt: histograms must have shape ({len(request.open)}, {layout.n_slots}, 2), got {total.shape}.")
    nodes = list(gt.nodes)
    splits: list[NodeSplit] = []
    nxt: list[int] = []
    first = int(layout.n_bins[0]) + 1
    for i, node in enumerate(request.open):
        g_tot, h_tot = total[i, :first].sum(axis=0)
        nodes[node] = replace(nodes[node], g=float(g_tot), h=float(h_tot))
        split = best_split(total[i], node=node, layout=layout, params=params)
        if split is not None:
            s = _grow(nodes, node, split)
            splits.append(s)
            nxt += [s.left_child, s.right_child]
    level = request.level + 1
    gt = GrowingTree(index=gt.index, nodes=tuple(nodes), open=tuple(nxt))
    if nxt and level < min(params.max_depth, split_levels(params, plan)):
        return gt, LevelRequest(tree=gt.index, level=level, release="histogram", open=tuple(nxt), splits=tuple(splits)), None
    return gt, LevelRequest(tree=gt.index, level=level, release="leaves", open=gt.leaves(), splits=tuple(splits)), None


def _finish(nodes: Sequence[_Node], leaves: Sequence[int], params: TreeParams) -> Tree:
    leaf_set = set(leaves)
    values = []
    for i, n in enumerate(nodes):
        known = math.isfinite(n.g) and math.isfinite(n.h)
        v = leaf_value(n.g, n.h, params) if known else 0.0
        if i in leaf_set and not known:
            raise ProtocolError(f"gbdt: leaf {i} has no sums.")
        values.append(v)
    return Tree(
        left=tuple(n.left for n in nodes), right=tuple(n.right for n in nodes), feature=tuple(max(n.feature, 0) for n in nodes),
        bin_index=tuple(n.bin_index for n in nodes), threshold=tuple(float(np.float32(n.threshold)) if n.left >= 0 else values[i] for i, n in enumerate(nodes)),
        default_left=tuple(n.default_left if n.left >= 0 else False for n in nodes), value=tuple(values),
        gain=tuple(n.gain for n in nodes), hessian=tuple(max(n.h, 0.0) if math.isfinite(n.h) else 0.0 for n in nodes),
    )
