"""The analytics coordinator on the one exchange helper (coordinator/_exchange.py::Link), as a plain function.

The query ServerApp runs against the four partners' real analytics ClientApp, in-process, through a
grid that delivers each message to the node and can lose a reply on the way back (a dropout is a
missing reply, never a timeout). Analytics has no setup stage: the first exchange names the nodes.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from flwr.app import Context, Message, Metadata, RecordDict

from fedcollab.coordinator import AnalyticsRecorder, make_query_server_app
from fedcollab.core import NodeError, NodeErrorCode
from fedcollab.node import make_analytics_client_app
from fedcollab.protocols.wire import RecordKey
from fedcollab.runner._query import _prepare
from fedcollab.spec import parse_query

QUERY = parse_query({"name": "lossy", "epsilon": 2.0, "delta": 1e-6, "statistics": [{"kind": "count"}]})


class LossyGrid:
    """Flower's Grid calls the ServerApp makes, each message answered by the partner's node; ``lost`` replies never arrive."""

    def __init__(self, spec, homes, roster, *, lost: set[tuple[str, str]]) -> None:
        self.app = make_analytics_client_app(spec, {k: str(v.root) for k, v in homes.items()}, {k: v.signing_key for k, v in roster.parties.items()})
        self.names = {i + 7: p.name for i, p in enumerate(spec.partners)}  # Flower node ids the coordinator cannot guess names from
        self.ctx = {nid: Context(run_id=1, node_id=nid, node_config={"partner": n}, state=RecordDict(), run_config={}) for nid, n in self.names.items()}
        self.lost, self.kinds = lost, []

    def get_node_ids(self):
        return list(self.names)

    def send_and_receive(self, messages, *, timeout=None):
        out = []
        for m in messages:
            nid = m.metadata.dst_node_id
            kind = str(m.content.config_records[RecordKey.CONFIG]["fedcollab.kind"])
            self.kinds.append((self.names[nid], kind))
            meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=nid, reply_to_message_id="", group_id="",
                            created_at=time.time(), ttl=600.0, message_type=m.metadata.message_type)
            reply = self.app(Message(content=m.content, metadata=meta), self.ctx[nid])
            if (self.names[nid], kind) not in self.lost:
                out.append(reply)
        return out


@pytest.fixture(autouse=True)
def _server_task(monkeypatch):
    """The identity Flower's ServerApp process has (messages are stamped with its run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def _run(spec, tmp_path, lost):
    sp, out_dir, _, homes, ledger, roster = _prepare(spec, tmp_path / "out", tmp_path / "nodes")
    grid, recorder = LossyGrid(sp, homes, roster, lost=lost), AnalyticsRecorder()
    app = make_query_server_app(sp, QUERY, recorder, ledger=ledger, timeout=5.0)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    return grid, recorder, app, ctx, out_dir


def _releases(path):
    if not path.exists():  # a ledger nothing was ever written to
        return []
    return [e for e in (json.loads(x) for x in path.read_text().splitlines()) if e["kind"] == "release"]


def test_the_first_exchange_names_the_nodes_and_the_query_is_answered(heart_spec, tmp_path):
    """Every partner named from its check reply (node ids 7..10); four releases accepted into the run ledger; the ledger closed."""
    grid, recorder, app, ctx, out_dir = _run(heart_spec, tmp_path, lost=set())
    app(grid, ctx)
    assert recorder.finished and recorder.failures == {} and sorted(recorder.participants) == sorted(grid.names.values())
    assert recorder.rows
    assert sorted(e["party"] for e in _releases(out_dir / "ledger.jsonl")) == sorted(grid.names.values())
    assert [k for _, k in grid.kinds].count("analytics.close") == 4


def test_a_check_reply_that_never_arrives_stops_the_query_before_any_release(heart_spec, tmp_path):
    """Hungary answers the check but its reply is lost: the coordinator needs every partner, so it stops (INTERNAL, recorded once)
    and never sends the answer stage; no node releases anything. A node that never replied has not named itself: it is
    reported under its Flower node id."""
    grid, recorder, app, ctx, out_dir = _run(heart_spec, tmp_path, lost={("hungary", "analytics.check")})
    with pytest.raises(NodeError) as err:
        app(grid, ctx)
    silent = f"node-{next(n for n, p in grid.names.items() if p == 'hungary')}"
    assert err.value.codes == {silent: int(NodeErrorCode.INTERNAL)}
    assert recorder.failures == {silent: [int(NodeErrorCode.INTERNAL)]} and recorder.plan is None
    assert "analytics.query" not in {k for _, k in grid.kinds}
    for p in heart_spec.partners:
        assert _releases(tmp_path / "nodes" / p.name / "ledger.jsonl") == [], p.name
    assert _releases(out_dir / "ledger.jsonl") == []


def test_an_answer_lost_after_the_nodes_are_named_is_reported_by_partner(heart_spec, tmp_path):
    """Hungary's answer (its signed release) never arrives: the query stops by name before the secure sum; the three answers
    that did arrive are in the run ledger, hungary's release stays on its own ledger (charged, never seen by the coordinator)."""
    grid, recorder, app, ctx, out_dir = _run(heart_spec, tmp_path, lost={("hungary", "analytics.query")})
    with pytest.raises(NodeError) as err:
        app(grid, ctx)
    assert err.value.codes == {"hungary": int(NodeErrorCode.INTERNAL)}
    assert "secagg" not in {k for _, k in grid.kinds}
    assert sorted(e["party"] for e in _releases(out_dir / "ledger.jsonl")) == ["cleveland", "switzerland", "va-long-beach"]
    assert len(_releases(tmp_path / "nodes" / "hungary" / "ledger.jsonl")) == 1


def test_wait_for_nodes_returns_once_enough_are_connected_and_names_the_shortfall():
    """The one wait every coordinator (training setup, analytics, the vertical relay) does before its first exchange."""
    from fedcollab.coordinator._exchange import wait_for_nodes
    from fedcollab.core import TransportError

    class Arriving:
        def __init__(self):
            self.calls = 0

        def get_node_ids(self):
            self.calls += 1
            return [9, 3, 5][: min(3, self.calls)]

    grid = Arriving()
    assert wait_for_nodes(grid, 3, timeout=5.0) == [3, 5, 9] and grid.calls == 3
    with pytest.raises(TransportError, match="only 1 of 4 nodes connected"):
        wait_for_nodes(type("One", (), {"get_node_ids": lambda self: [1]})(), 4, timeout=0.15)
