"""The vertical protocol run in-process: both parties as function calls, the way their nodes call it.

Not the Flower wiring: it drives the same stage functions and collects every release each party
makes, so tests and benchmarks can check the protocol, its model and its books.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

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
    """The active party's model, the passive party's lookup table, every release, and what crossed the wire."""

    model: VerticalModel
    table: Mapping[tuple[int, int], LookupEntry]
    releases: dict[str, list[Release]]
    wire_bytes: int
    messages: list[object]


class _InProcess(_Exchange):
    def __init__(self, passive: PassiveState, *, active_party: str, plan: VerticalDpPlan | None, rng: np.random.Generator | None,
                 releases: dict[str, list[Release]], keep: bool, record: Recorder | None = None, min_node_rows: int = 1) -> None:
        self.state = passive
        self.min_node_rows = min_node_rows
        self.record = record
        self.active_party = active_party
        self.plan = plan
        self.rng = rng
        self.releases = releases
        self.bytes = 0
        self.keep = keep
        self.messages: list[object] = []

    def _seen(self, *msgs: object) -> None:
        if self.keep:
            self.messages.extend(msgs)

    def gradients(self, msg: EncryptedGradients) -> None:
        self.bytes += sum(len(c) for c in msg.chunks)
        self._seen(msg)
        self.state = passive_gradients(self.state, msg)

    def _book(self, event: Release, payload: bytes) -> None:
        if self.record is not None:
            self.record(event, payload)
        self.releases[event.party].append(event)

    def level(self, msg: LevelQuery) -> EncryptedBinSums:
        self._book(_release("vertical_partition", party=self.active_party, observer="passive_party",
                            tree=msg.tree, level=msg.level, mech=NonPrivate(), n_open=msg.n_open), msg.position.tobytes())
        self.state, reply, event = passive_bin_sums(self.state, msg, plan=self.plan, rng=self.rng, min_node_rows=self.min_node_rows)
        self._book(event, b"".join(reply.ciphertexts))
        self.bytes += msg.position.nbytes + sum(len(c) for c in reply.ciphertexts)
        self._seen(msg, reply)
        return reply

    def splits(self, msg: LevelSplits) -> LevelPartitions:
        state, reply, events = passive_level_splits(self.state, msg)
        for event, part in zip(events, reply.parts):
            self._book(event, np.asarray(part.left, dtype=bool).tobytes())
        self.state = state
        self.bytes += 32 * len(msg.notices) + sum(p.left.nbytes for p in reply.parts)
        self._seen(msg, reply)
        return reply


def train_vertical_in_process(active: tuple[str, np.ndarray, np.ndarray, BinLayout], passive: tuple[str, np.ndarray, BinLayout], *,
                              params: TreeParams, plan: VerticalDpPlan | None, rng: np.random.Generator | None = None,
                              keep_messages: bool = False, record: Recorder | None = None,
                              on_tree: Callable[[int], None] | None = None, min_node_rows: int = 1) -> VerticalTrainResult:
    """SecureBoost between ``active = (name, x, y, its layout)`` and ``passive = (name, x, its private layout)`` (aligned rows).

    ``record`` sees every release before the message carrying it is handed over (a raise stops
    the run with nothing sent); ``on_tree`` is called after each tree (progress).
    """
    a_name, x_a, y, lay_a = active
    p_name, x_p, lay_p = passive
    releases: dict[str, list[Release]] = {a_name: [], p_name: []}
    a_state: ActiveState = active_init(a_name, x_a, y, lay_a, base_score=params.base_score)
    p_state, advert = passive_init(p_name, x_p, lay_p)
    a_state, bundle = active_keys(a_state, advert, plan=plan)
    p_state = passive_keys(p_state, bundle)
    ex = _InProcess(p_state, active_party=a_name, plan=plan, rng=rng, releases=releases, keep=keep_messages, record=record,
                    min_node_rows=min_node_rows)
    ex.bytes += sum(len(b) for b in bundle.public)
    ex._seen(advert, bundle)
    trees = []
    for t in range(params.n_trees):
        a_state, tree = train_tree(a_state, t, params, plan=plan, exchange=ex)
        trees.append(tree)
        if on_tree is not None:
            on_tree(t)
    model = VerticalModel(trees=tuple(trees), base_score=params.base_score, active_features=lay_a.feature_names)
    return VerticalTrainResult(model=model, table=dict(ex.state.table), releases=releases, wire_bytes=ex.bytes, messages=ex.messages)
