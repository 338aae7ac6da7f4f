"""The vertical protocol run in-process: both parties as function calls, the way their nodes call it.

Not the Flower wiring: it drives the same stage functions and collects every release each party
makes, so tests and benchmarks can check the protocol, its model and its books.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import NonPrivate, Release
from fedcollab.protocols.gbdt import BinLayout
from fedcollab.protocols.vertical._secureboost import (
    ActiveState,
    EncryptedBinSums,
    EncryptedGradients,
    LevelQuery,
    LookupEntry,
    PassiveState,
    LevelPartitions,
    LevelSplits,
    VerticalDpPlan,
    VerticalModel,
    VerticalTree,
    _Exchange,
    _release,
    active_init,
    active_keys,
    passive_bin_sums,
    passive_gradients,
    passive_init,
    passive_keys,
    passive_level_splits,
    train_tree,
)
from fedcollab.spec import TreeParams


#: Called with (release, payload) before the message carrying it is handed over; raising stops it
#: (a node's budget gate: check, record, then send).
Recorder = Callable[[Release, bytes], None]


@dataclass(frozen=True)
class VerticalTrainResult:
    """The active party's model, each passive party's lookup table, every release, and what crossed the wire."""

    model: VerticalModel
    table: Mapping[tuple[int, int], LookupEntry]  # every passive party's entries (tree node ids are unique across parties)
    releases: dict[str, list[Release]]
    wire_bytes: int
    messages: list[object]
    tables: dict[str, Mapping[tuple[int, int], LookupEntry]] = field(default_factory=dict)  # per passive party


@dataclass(frozen=True)
class SecureBoostStart:
    """Where a resumed SecureBoost run picks up: the trees grown so far, the label holder's margins after them, each passive party's table.

    ``margin`` (the label holder's, on its training rows) and ``tables`` (passive party -> its
    lookup entries) each stay at the node that owns them (its checkpoint); nothing here is sent.
    """

    trees: tuple[VerticalTree, ...]
    margin: np.ndarray
    tables: Mapping[str, Mapping[tuple[int, int], LookupEntry]]


def _check_start(start: SecureBoostStart, params: TreeParams, n_rows: int, passives: Sequence[str]) -> None:
    k = len(start.trees)
    if not 1 <= k < params.n_trees:
        raise ProtocolError(f"secureboost: a resumed run starts after 1..{params.n_trees - 1} tree(s), got {k}.")
    m = np.asarray(start.margin, dtype=np.float64)
    if m.shape != (n_rows,) or not np.isfinite(m).all():
        raise ProtocolError(f"secureboost: the resumed run's margins must be {n_rows} finite values, got shape {m.shape}.")
    if set(start.tables) != set(passives):
        raise ProtocolError(f"secureboost: the resumed run needs a lookup table for each of {sorted(passives)}, got {sorted(start.tables)}.")
    for name, table in start.tables.items():
        late = sorted(t for t, _ in table if not 0 <= t < k)
        if late:
            raise ProtocolError(f"secureboost: {name}'s resumed lookup table has entries of tree {late[0]}, not among the {k} tree(s) grown.")


class _InProcess(_Exchange):
    def __init__(self, passives: list[PassiveState], *, active_party: str, plans: list[VerticalDpPlan | None],
                 rngs: list[np.random.Generator | None], releases: dict[str, list[Release]], keep: bool, record: Recorder | None = None,
                 min_node_rows: list[int] | None = None) -> None:
        self.states = passives
        self.min_node_rows = min_node_rows or [1] * len(passives)
        self.record = record
        self.active_party = active_party
        self.plans = plans
        self.rngs = rngs
        self.releases = releases
        self.bytes = 0
        self.keep = keep
        self.messages: list[object] = []

    def _seen(self, *msgs: object) -> None:
        if self.keep:
            self.messages.extend(msgs)

    def gradients(self, msg: EncryptedGradients) -> None:
        for k, st in enumerate(self.states):
            self.bytes += sum(len(c) for c in msg.chunks)
            self.states[k] = passive_gradients(st, msg)
        self._seen(msg)

    def _book(self, event: Release, payload: bytes) -> None:
        if self.record is not None:
            self.record(event, payload)
        self.releases[event.party].append(event)

    def level(self, msg: LevelQuery) -> list[EncryptedBinSums]:
        replies = []
        for k, st in enumerate(self.states):
            self._book(_release("vertical_partition", party=self.active_party, observer="passive_party", tree=msg.tree, level=msg.level,
                                mech=NonPrivate(), n_open=msg.n_open, to=st.party), msg.position.tobytes())
            self.states[k], reply, event = passive_bin_sums(st, msg, plan=self.plans[k], rng=self.rngs[k])
            self._book(event, b"".join(reply.ciphertexts))
            self.bytes += msg.position.nbytes + sum(len(c) for c in reply.ciphertexts)
            self._seen(msg, reply)
            replies.append(reply)
        return replies

    def splits(self, passive: int, msg: LevelSplits) -> LevelPartitions:
        state, reply, events = passive_level_splits(self.states[passive - 1], msg)
        for event, part in zip(events, reply.parts):
            self._book(event, np.asarray(part.left, dtype=bool).tobytes())
        self.states[passive - 1] = state
        self.bytes += 32 * len(msg.notices) + sum(p.left.nbytes for p in reply.parts)
        self._seen(msg, reply)
        return reply


def train_vertical_in_process(active: tuple[str, np.ndarray, np.ndarray, BinLayout],
                              passive: tuple[str, np.ndarray, BinLayout] | Sequence[tuple[str, np.ndarray, BinLayout]], *,
                              params: TreeParams, plan: VerticalDpPlan | Sequence[VerticalDpPlan | None] | None,
                              rng: np.random.Generator | None = None, keep_messages: bool = False, record: Recorder | None = None,
                              on_tree: Callable[[int], None] | None = None, min_node_rows: int | Sequence[int] = 1,
                              start: SecureBoostStart | None = None,
                              on_checkpoint: Callable[[SecureBoostStart], None] | None = None) -> VerticalTrainResult:
    """SecureBoost between ``active = (name, x, y, its layout)`` and one or more ``passive = (name, x, its private layout)`` (aligned rows).

    ``plan``: one DP plan for every passive party or one per passive party (each noises its own bin
    sums); ``rng`` is split into one noise generator per passive party. ``record`` sees every
    release before the message carrying it is handed over (a raise stops the run with nothing
    sent); ``on_tree`` is called after each tree (progress); ``min_node_rows``: each passive party's
    policy minimum (one value for all, or one each). ``start`` resumes after ``len(start.trees)``
    trees (fresh BFV keys; the margins and tables given); ``on_checkpoint`` receives the state after
    every tree but the last, before ``on_tree``.
    """
    a_name, x_a, y, lay_a = active
    pas = [passive] if isinstance(passive, tuple) and isinstance(passive[0], str) else list(passive)  # type: ignore[list-item]
    n = len(pas)
    plans = list(plan) if isinstance(plan, (list, tuple)) else [plan] * n
    mins = list(min_node_rows) if isinstance(min_node_rows, (list, tuple)) else [int(min_node_rows)] * n
    if len(plans) != n or len(mins) != n:
        raise ProtocolError(f"secureboost: {n} passive parties need {n} plans and minimum node sizes.")
    rngs: list[np.random.Generator | None] = list(rng.spawn(n)) if rng is not None and n > 1 else [rng] * n
    releases: dict[str, list[Release]] = {a_name: [], **{p[0]: [] for p in pas}}
    a_state: ActiveState = active_init(a_name, x_a, y, lay_a, base_score=params.base_score)
    if start is not None:
        _check_start(start, params, len(a_state.y), [p[0] for p in pas])
        a_state = replace(a_state, margin=np.asarray(start.margin, dtype=np.float64).copy())
    states, adverts = [], []
    for (p_name, x_p, lay_p), m in zip(pas, mins):
        st, ad = passive_init(p_name, x_p, lay_p, min_node_rows=m)
        if start is not None:
            st = replace(st, table=dict(start.tables[p_name]))
        states.append(st)
        adverts.append(ad)
    a_state, bundle = active_keys(a_state, adverts, plan=plans)
    states = [passive_keys(st, bundle) for st in states]
    ex = _InProcess(states, active_party=a_name, plans=plans, rngs=rngs, releases=releases, keep=keep_messages, record=record, min_node_rows=mins)
    ex.bytes += n * sum(len(b) for b in bundle.public)
    ex._seen(*adverts, bundle)
    trees = list(start.trees) if start is not None else []
    for t in range(len(trees), params.n_trees):
        a_state, tree = train_tree(a_state, t, params, plan=plans, exchange=ex)
        trees.append(tree)
        if on_checkpoint is not None and t < params.n_trees - 1:
            on_checkpoint(SecureBoostStart(trees=tuple(trees), margin=a_state.margin.copy(), tables={st.party: dict(st.table) for st in ex.states}))
        if on_tree is not None:
            on_tree(t)
    model = VerticalModel(trees=tuple(trees), base_score=params.base_score, active_features=lay_a.feature_names)
    tables = {st.party: dict(st.table) for st in ex.states}
    merged = {k: e for tb in tables.values() for k, e in tb.items()}
    return VerticalTrainResult(model=model, table=merged, releases=releases, wire_bytes=ex.bytes, messages=ex.messages, tables=tables)
