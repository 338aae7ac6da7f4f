"""The one round loop (fedcollab/coordinator/_rounds.py::run_rounds) as a plain function: what every aggregation mode gets from it.

A scripted strategy stands in for the mode-specific part only (plain, SecAgg+ and HE run through this loop against real
ClientApps in tests/e2e); the loop's own contract is checked here: which rounds run, the evaluation cadence, checkpoints
only of finite models, a round's evaluation riding on the next train message, and no round record lost when a round fails.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest

from fedcollab.coordinator import CoordinatorRecorder
from fedcollab.coordinator._rounds import Trained, run_rounds
from fedcollab.core import NodeError, ProtocolError

PARTS = {"n": 10, "correct": 7, "loss_sum": 3.0, "hist_pos": [0, 1], "hist_neg": [1, 0]}


class Scripted:
    """Records the loop's calls; ``fuse`` defers evaluations to the next train; ``fail_at`` / ``nan_at`` script a failure."""

    def __init__(self, *, fuse: bool = False, fail_at: int | None = None, nan_at: int | None = None, rounds: int = 5) -> None:
        self.calls: list[tuple] = []
        self.fuse, self.fail_at, self.nan_at, self.rounds = fuse, fail_at, nan_at, rounds
        self.deferred = None

    def train(self, rnd, evaluate_previous):
        self.calls.append(("train", rnd, evaluate_previous))
        self.deferred = {"a": dict(PARTS)} if evaluate_previous is not None else None
        if rnd == self.fail_at:
            raise NodeError(f"round {rnd}: 1 partner(s) replied, at least 2 needed", codes={"b": 9})
        value = np.nan if rnd == self.nan_at else float(rnd)
        return Trained(["a", "b"], {}, OrderedDict(w=np.full(2, value)), self.deferred)

    def checkpoint(self, directory, rnd):
        self.calls.append(("checkpoint", rnd))

    def evaluate(self, rnd, evaluating, failed):
        self.calls.append(("evaluate", rnd, evaluating))
        if not evaluating:
            return {}
        if self.fuse and rnd < self.rounds:
            return None
        return {"a": dict(PARTS), "b": dict(PARTS)}

    def finish(self, last_round):
        self.calls.append(("finish", last_round))


def _spec(heart_spec, rounds=5, every=2):
    return heart_spec.replace(training={"rounds": rounds, "evaluate_every": every})


def test_rounds_cadence_checkpoints_and_records(heart_spec, tmp_path):
    """Rounds first..R, each checkpointed; evaluation on every 2nd round and the last; one record per round; finish once."""
    agg, rec = Scripted(), CoordinatorRecorder(checkpoint_dir=tmp_path)
    run_rounds(agg, _spec(heart_spec), rec, first=2)  # a resumed run: rounds 2..5
    assert [r.round for r in rec.rounds] == [2, 3, 4, 5]
    assert [c for c in agg.calls if c[0] == "evaluate"] == [("evaluate", 2, True), ("evaluate", 3, False), ("evaluate", 4, True),
                                                            ("evaluate", 5, True)]
    assert [c[1] for c in agg.calls if c[0] == "checkpoint"] == [2, 3, 4, 5] and agg.calls[-1] == ("finish", 5)
    assert [r.pooled is not None for r in rec.rounds] == [True, False, True, True] and rec.rounds[0].pooled.n == 20
    assert rec.final_arrays["w"].tolist() == [5.0, 5.0]


def test_no_checkpoint_of_a_non_finite_model_and_the_round_fails(heart_spec, tmp_path):
    agg, rec = Scripted(nan_at=3), CoordinatorRecorder(checkpoint_dir=tmp_path)
    with pytest.raises(ProtocolError, match="round 3: the aggregate is not finite"):
        run_rounds(agg, _spec(heart_spec), rec, first=1)
    assert [c[1] for c in agg.calls if c[0] == "checkpoint"] == [1, 2] and [r.round for r in rec.rounds] == [1, 2]


def test_evaluation_riding_on_the_next_train_is_recorded_for_its_own_round(heart_spec, tmp_path):
    """Deployment's fused evaluation: round 2's metrics come back with round 3's train and are recorded as round 2's."""
    agg, rec = Scripted(fuse=True), CoordinatorRecorder(checkpoint_dir=tmp_path)
    run_rounds(agg, _spec(heart_spec), rec, first=1)
    assert ("train", 3, 2) in agg.calls and ("train", 5, 4) in agg.calls and ("train", 2, None) in agg.calls
    assert [r.round for r in rec.rounds] == [1, 2, 3, 4, 5]
    assert [r.pooled.n if r.pooled else None for r in rec.rounds] == [None, 10, None, 10, 20]  # 2 and 4: the deferred parts


def test_a_failed_round_keeps_the_previous_rounds_record(heart_spec, tmp_path):
    """Round 3 fails after round 2's evaluation came back on its train message: round 2 is still recorded, with its metrics."""
    agg, rec = Scripted(fuse=True, fail_at=3), CoordinatorRecorder(checkpoint_dir=tmp_path)
    with pytest.raises(NodeError):
        run_rounds(agg, _spec(heart_spec), rec, first=1)
    assert [r.round for r in rec.rounds] == [1, 2] and rec.rounds[1].pooled.n == 10
    assert ("finish", 5) not in agg.calls
