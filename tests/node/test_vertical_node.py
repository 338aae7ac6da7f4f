"""A vertical run's nodes against a hostile coordinator, in-process with real Flower messages.

The two nodes (clinic, the label holder, and lab) are the real ClientApps a deployed node runs
(``make_vertical_client_app``); a small in-process grid hands the coordinator's messages to them
the way the SuperLink does (stamped metadata, one context per node kept across messages). The
relay is the deployment coordinator's own (``run_vertical``). Each attack checks the coded
refusal, that the node's ledger gained refusals only, and that no sealed message left.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
from flwr.app import ConfigRecord, Context, Message, Metadata, RecordDict

from fedcollab.audit import verify_ledger
from fedcollab.coordinator._ledger import RunLedger
from fedcollab.coordinator._vertical import run_vertical
from fedcollab.core import NodeError, NodeErrorCode
from fedcollab.node import NodeHome, init_node_home
from fedcollab.node._vertical import make_vertical_client_app
from fedcollab.privacy.accounting import parse_lines, public_key_hex
from fedcollab.protocols.wire import RecordKey
from fedcollab.spec import NodePolicy, Roster, RosterEntry, VerticalPolicy, load_spec
from tests.conftest import ROOT, three_party_vertical_spec

PARTIES = ("clinic", "lab")


def _spec(tmp_path, *, trees: int = 1, depth: int = 1):
    text = (ROOT / "specs" / "heart-disease-vertical.toml").read_text()
    text = text.replace("n_trees = 30", f"n_trees = {trees}").replace("max_depth = 3", f"max_depth = {depth}")
    path = tmp_path / "vertical.toml"
    path.write_text(text)
    return load_spec(path)


def _policy(name: str, *, kinds=("gbdt",), **vertical) -> NodePolicy:
    return NodePolicy(partner=name, allow_non_private_training=True, allowed_model_kinds=list(kinds), test_metrics="public", min_test_rows=10,
                      vertical=VerticalPolicy(allowed=True, min_intersection=100, **vertical))


class Grid:
    """The coordinator's grid, delivering to in-process ClientApps (node ids 1, 2, ...)."""

    def __init__(self, spec, tmp_path, *, tamper=None, parties=PARTIES, kinds=("gbdt",)) -> None:
        self.homes = {n: NodeHome(tmp_path / n) for n in parties}
        for n, h in self.homes.items():
            init_node_home(h.root, partner=n, policy=_policy(n, kinds=kinds))
        coord = init_node_home(tmp_path / "coord", partner="coord")
        self.key = coord.key()
        self.roster = {"coordinator": public_key_hex(self.key), **{n: h.public_key() for n, h in self.homes.items()}}
        app = make_vertical_client_app(spec, {n: str(h.root) for n, h in self.homes.items()}, self.roster)
        self.nodes = {i + 1: (app, Context(run_id=1, node_id=i + 1, node_config={"partner": n}, state=RecordDict(), run_config={}))
                      for i, n in enumerate(parties)}
        self.tamper = tamper  # (node id, message) -> message: what a hostile coordinator changes on the way
        self.lose = None  # () -> bool: lose the reply just answered (the coordinator stops)
        self.sent: list[Message] = []

    def restart(self, spec) -> None:
        """Every node process starts again on its own folder (its in-memory runs are gone, its files stay)."""
        app = make_vertical_client_app(spec, {n: str(h.root) for n, h in self.homes.items()}, self.roster)
        self.nodes = {nid: (app, Context(run_id=2, node_id=nid, node_config=dict(ctx.node_config), state=RecordDict(), run_config={}))
                      for nid, (_, ctx) in self.nodes.items()}

    def get_node_ids(self):
        return list(self.nodes)

    def deliver(self, msg: Message, nid: int) -> Message:
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=nid, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=600.0, message_type=msg.metadata.message_type)
        msg = Message(content=msg.content, metadata=meta)
        if self.tamper is not None:
            msg = self.tamper(nid, msg)
        app, ctx = self.nodes[nid]
        reply = app(msg, ctx)
        if self.lose is not None and self.lose():
            raise KeyboardInterrupt  # the coordinator dies with the node's reply (and the ledger lines in it) unread
        self.sent.append(reply)
        return reply

    def send_and_receive(self, messages, *, timeout=None, until=None):
        return [self.deliver(m, m.metadata.dst_node_id) for m in messages]

    def ledger_run_roster(self) -> Roster:
        return Roster(parties={k: RosterEntry(signing_key=v) for k, v in self.roster.items()})


def _entries(home: NodeHome) -> list[dict]:
    return [json.loads(x) for x in home.ledger_path.read_text().splitlines() if x.strip()]


def _send(grid: Grid, partner: str, cfg: dict, **records) -> Message:
    nid = 1 + PARTIES.index(partner)
    content = RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.kind": "vertical", "fedcollab.run_id": "run-v", **cfg}),
                          **{k: ConfigRecord(v) for k, v in records.items()}})
    return grid.deliver(Message(content=content, message_type="query", dst_node_id=nid), nid)


def _refused(grid: Grid, partner: str, reply: Message, code: NodeErrorCode, before: int) -> None:
    got = reply.content
    assert RecordKey.ERROR in got.config_records, f"answered instead of refused: {list(got.keys())}"
    assert int(got.config_records[RecordKey.ERROR]["code"]) == int(code)
    assert set(got.keys()) <= {RecordKey.ERROR, RecordKey.RELEASES}  # no sealed message, no report
    new = _entries(grid.homes[partner])[before:]
    assert new and all(e["kind"] == "refusal" for e in new), [e["kind"] for e in new]


@pytest.fixture(autouse=True)
def _server_identity(monkeypatch):
    """As inside a ServerApp: the coordinator's messages are made in a process with a task identity."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 3, raising=False)


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return _spec(tmp_path_factory.mktemp("vspec"))


def test_the_relay_runs_the_nodes_and_the_ledger_verifies(spec, tmp_path):
    """The deployment path end to end in-process: each part of the model at its node, the coordinator's view sealed."""
    grid = Grid(spec, tmp_path)
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-ok")
    out = run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert out["label_holder"] == "clinic" and out["passive_parties"] == ["lab"] and out["trees"] == 1
    assert out["relayed_bytes"] > 0 and out["steps"] >= 3
    assert (grid.homes["lab"].root / out["model_parts"]["lab"]["model_part"]).exists()
    assert (grid.homes["clinic"].root / out["model_parts"]["clinic"]["model_part"]).exists()
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0
    # What the coordinator handled: only sealed bytes between the parties; no threshold, bin index or id.
    lookup = json.loads((grid.homes["lab"].root / out["model_parts"]["lab"]["model_part"]).read_text())["entries"]
    for reply in grid.sent:
        for key in ("vertical.out",):
            rec = reply.content.config_records.get(key)
            if rec is not None:
                assert all(isinstance(v, bytes) and b"bin_index" not in v and b"threshold" not in v for v in rec.values())
    assert lookup  # the lab holds at least one split's threshold, and it never left the lab


def test_stages_out_of_order_are_refused(spec, tmp_path):
    grid = Grid(spec, tmp_path)
    for partner in PARTIES:
        for stage in ("keys", "step"):
            before = len(_entries(grid.homes[partner]))
            _refused(grid, partner, _send(grid, partner, {"vertical.stage": stage}, **{"vertical.in": {"clinic": b"x"}}),
                     NodeErrorCode.OUT_OF_ORDER, before)
    # After hello: a second hello, and a step before the keys, are refused too.
    assert RecordKey.ERROR not in _send(grid, "lab", {"vertical.stage": "hello"}).content.config_records
    for stage in ("hello", "step"):
        before = len(_entries(grid.homes["lab"]))
        _refused(grid, "lab", _send(grid, "lab", {"vertical.stage": stage}, **{"vertical.in": {"clinic": b"x"}}), NodeErrorCode.OUT_OF_ORDER, before)
    before = len(_entries(grid.homes["lab"]))
    _refused(grid, "lab", _send(grid, "lab", {"vertical.stage": "teleport"}), NodeErrorCode.BAD_REQUEST, before)
    # Train and evaluate messages are not part of a vertical run.
    reply = grid.deliver(Message(content=RecordDict(), message_type="train", dst_node_id=2), 2)
    assert int(reply.content.config_records[RecordKey.ERROR]["code"]) == int(NodeErrorCode.BAD_REQUEST)


def test_the_policy_holds_on_every_message(spec, tmp_path):
    """The lab withdraws from vertical runs after hello: the very next message is refused, nothing sealed leaves."""
    grid = Grid(spec, tmp_path)
    assert RecordKey.ERROR not in _send(grid, "lab", {"vertical.stage": "hello"}).content.config_records
    home = grid.homes["lab"]
    from fedcollab.spec import policy_toml

    home.policy_path.write_text(policy_toml(_policy("lab").model_copy(update={"vertical": VerticalPolicy(allowed=False)})))
    before = len(_entries(home))
    _refused(grid, "lab", _send(grid, "lab", {"vertical.stage": "keys"}, **{"vertical.adverts": {}}), NodeErrorCode.POLICY_REFUSED, before)
    assert "vertical.allowed" in _entries(home)[-1]["body"]["reason"]


def test_a_psi_cap_is_enforced_at_hello(spec, tmp_path):
    """With ``max_psi_runs = 1`` a node joins one run; the next hello is refused, so no second intersection."""
    from fedcollab.spec import policy_toml

    grid = Grid(spec, tmp_path)
    for name, home in grid.homes.items():
        home.policy_path.write_text(policy_toml(_policy(name, max_psi_runs=1)))
    roster = grid.ledger_run_roster()
    run_vertical(spec, grid, ledger=RunLedger(tmp_path / "l1.jsonl", key=grid.key, roster=roster, run_id="run-1"), timeout=30)
    before = {n: len(_entries(h)) for n, h in grid.homes.items()}
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=RunLedger(tmp_path / "l2.jsonl", key=grid.key, roster=roster, run_id="run-2"), timeout=30)
    assert err.value.codes == {n: int(NodeErrorCode.POLICY_REFUSED) for n in PARTIES}
    for name, home in grid.homes.items():
        new = _entries(home)[before[name]:]
        assert [e["kind"] for e in new] == ["refusal"] and "PSI run" in new[0]["body"]["reason"]


def test_a_tampered_sealed_message_stops_the_run_with_a_code(spec, tmp_path):
    """The coordinator flips one byte of the clinic's first sealed message to the lab: the lab refuses, releases nothing more."""
    flipped: list[int] = []

    def tamper(nid: int, msg: Message) -> Message:
        rec = msg.content.config_records.get("vertical.in")
        if nid == 2 and rec is not None and not flipped:
            wire = bytearray(bytes(rec["clinic"]))
            wire[-1] ^= 1
            rec["clinic"] = bytes(wire)
            flipped.append(len(wire))
        return msg

    grid = Grid(spec, tmp_path, tamper=tamper)
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-t")
    before = len(_entries(grid.homes["lab"]))
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert flipped and err.value.codes == {"lab": int(NodeErrorCode.CRYPTO_REFUSED)}
    new = _entries(grid.homes["lab"])[before:]
    assert new[-1]["kind"] == "refusal" and not any(e["kind"] == "release" for e in new), [e["kind"] for e in new]


def test_three_parties_over_the_relay(tmp_path):
    """A label holder and two passive parties (the lab's columns split in two), each its own node behind the relay.

    The clinic talks to each passive party over its own sealed channel; the coordinator relays between three nodes;
    each passive party's thresholds stay at its node, and each is charged only for its own releases.
    """
    text = (ROOT / "specs" / "heart-disease-vertical.toml").read_text().replace("n_trees = 30", "n_trees = 1").replace("max_depth = 3", "max_depth = 2")
    text = three_party_vertical_spec(text, tmp_path)
    (tmp_path / "three.toml").write_text(text)
    spec = load_spec(tmp_path / "three.toml")
    parties = ("clinic", "ecg", "stress")
    grid = Grid(spec, tmp_path, parties=parties)
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-3")
    out = run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert out["label_holder"] == "clinic" and out["passive_parties"] == ["ecg", "stress"]
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0
    # Every sealed payload the coordinator relayed is opaque bytes between two of the three parties.
    for reply in grid.sent:
        rec = reply.content.config_records.get("vertical.out")
        if rec is not None:
            assert set(rec.keys()) <= set(parties)
            assert all(isinstance(v, bytes) and b"threshold" not in v and b"bin_index" not in v for v in rec.values())
    for name in ("ecg", "stress"):
        part = grid.homes[name].root / out["model_parts"][name]["model_part"]
        assert part.exists()
        # each passive party released its own histograms and the intersection, in its own ledger
        kinds = {e["body"]["release"]["kind"] for e in _entries(grid.homes[name]) if e["kind"] == "release"}
        assert {"psi_intersection", "vertical_histogram"} <= kinds, kinds
    # The run trained on all three parties: the clinic's part is the tree skeleton, its split nodes owned by the clinic (0)
    # or by a passive party (1 = ecg, 2 = stress), whose threshold the clinic does not hold.
    model = json.loads((grid.homes["clinic"].root / out["model_parts"]["clinic"]["model_part"]).read_text())
    splits = [n for tree in model["trees"] for n in tree if n["left"] != -1]
    assert splits and all(n["owner"] in (0, 1, 2) for n in splits) and {n["owner"] for n in splits} & {1, 2}
    assert all(n["threshold"] != n["threshold"] for n in splits if n["owner"] != 0)  # NaN: only a reference at the clinic


def test_vertical_logistic_regression_through_the_relay(tmp_path):
    """Issue 16: vertical LR in deployment. The nodes train it through the coordinator's relay; each keeps its own weights."""
    import numpy as np

    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 6})})
    grid = Grid(spec, tmp_path, kinds=("logistic_regression",))
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-lr")
    out = run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert out["model"] == "vertical-logistic-regression" and out["iterations"] == 6 and "trees" not in out
    assert out["steps"] == 2 + 2 * 6 and out["test_auc"] > 0.75 and out["intersection"] == out["n_train"] + out["n_test"]
    clinic = json.loads((grid.homes["clinic"].root / out["model_parts"]["clinic"]["model_part"]).read_text())
    lab = json.loads((grid.homes["lab"].root / out["model_parts"]["lab"]["model_part"]).read_text())
    assert out["model_parts"]["lab"]["model_part"].endswith("/weights.json") and "intercept" not in lab
    assert "intercept" in clinic and len(clinic["weights"]) == len(clinic["features"])
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0
    # Every gradient release is in each node's own ledger, charged to it, observed by the other party.
    for party, observer in (("clinic", "passive_party"), ("lab", "label_holder")):
        rel = [e["body"]["release"] for e in _entries(grid.homes[party]) if e["kind"] == "release"]
        assert sum(1 for r in rel if r["kind"] == "vertical_gradient" and r["observer"] == observer) == 6
    # The lab's weights never crossed the coordinator: no reply carries their bytes.
    wb = [np.float64(w).tobytes() for w in lab["weights"]]
    blob = b"".join(bytes(v) for r in grid.sent for k in ("vertical.out",) if (rec := r.content.config_records.get(k)) is not None
                    for v in rec.values())
    assert blob and not any(w in blob for w in wb)


def test_vertical_logistic_regression_with_two_passive_parties_through_the_relay(tmp_path):
    """Vertical LR with the lab split into an ECG lab and a stress lab, deployed: two key holders, three relay steps an
    iteration, each passive party's weights only at its node, each party's share booked once per other party's gradient."""
    import numpy as np

    text = (ROOT / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60", "rounds = 4")
    (tmp_path / "three-lr.toml").write_text(three_party_vertical_spec(text, tmp_path))
    spec = load_spec(tmp_path / "three-lr.toml")
    parties = ("clinic", "ecg", "stress")
    grid = Grid(spec, tmp_path, parties=parties, kinds=("logistic_regression",))
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-lr3")
    out = run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert out["model"] == "vertical-logistic-regression" and out["passive_parties"] == ["ecg", "stress"] and out["test_auc"] > 0.7
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0
    blob = b"".join(bytes(v) for r in grid.sent for k in ("vertical.out",) if (rec := r.content.config_records.get(k)) is not None
                    for v in rec.values())
    for name in ("ecg", "stress"):
        part = json.loads((grid.homes[name].root / out["model_parts"][name]["model_part"]).read_text())
        assert len(part["weights"]) == {"ecg": 6, "stress": 3}[name] and "intercept" not in part
        assert not any(np.float64(w).tobytes() in blob for w in part["weights"]), name  # its weights never crossed
    for party in parties:
        rel = [e["body"]["release"] for e in _entries(grid.homes[party]) if e["kind"] == "release" and e["body"]["release"]["kind"] == "vertical_gradient"]
        want = sorted((i, x) for i in range(4) for x in set(parties) - {party})
        assert sorted((r["details"]["iteration"], r["details"]["recipient"]) for r in rel) == want, party
    # the deployed model scores the nodes' records jointly: both passive parties' partial logits, the scores at the clinic's node
    score = run_vertical(spec, grid, ledger=RunLedger(tmp_path / "score.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="score-3"),
                         timeout=30, score="run-lr3")
    assert score["scored"] == out["intersection"] and _scored_test_auc(spec, grid, score) == pytest.approx(out["test_auc"], abs=1e-9)


def test_vertical_logistic_regression_needs_the_model_kind_in_every_policy(tmp_path):
    """A lab whose policy allows only trees refuses a vertical LR run at hello, with a code; nothing sealed leaves it."""
    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    grid = Grid(spec, tmp_path, kinds=("logistic_regression",))
    from fedcollab.spec import policy_toml

    grid.homes["lab"].policy_path.write_text(policy_toml(_policy("lab", kinds=("gbdt",))))
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-lr2")
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert err.value.codes == {"lab": int(NodeErrorCode.POLICY_REFUSED)}
    assert [e["kind"] for e in _entries(grid.homes["lab"])][-1] == "refusal"
    assert "logistic_regression" in _entries(grid.homes["lab"])[-1]["body"]["reason"]


def test_a_node_of_another_collaboration_is_left_alone(spec, tmp_path):
    """A horizontal training node on the same SuperLink gets the hello, refuses it (a training run does not answer
    vertical stages: BAD_REQUEST, recorded in its own ledger) and is left alone; the vertical run completes without it."""
    from fedcollab.runner._run import simulated_policy

    grid = Grid(spec, tmp_path)
    heart = load_spec(ROOT / "specs" / "heart-disease.toml")
    other = NodeHome(tmp_path / "hungary")
    init_node_home(other.root, partner="hungary", policy=simulated_policy(heart, "hungary"))
    from fedcollab.node import make_client_app

    app = make_client_app(heart, {"hungary": str(other.root)}, {"coordinator": grid.roster["coordinator"], "hungary": other.public_key()})
    grid.nodes[3] = (app, Context(run_id=1, node_id=3, node_config={"partner": "hungary"}, state=RecordDict(), run_config={}))
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-stranger")
    out = run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert out["trees"] == 1 and out["passive_parties"] == ["lab"]
    refusals = [e for e in _entries(other) if e["kind"] == "refusal"]
    assert len(refusals) == 1 and int(refusals[0]["body"]["code"]) == int(NodeErrorCode.BAD_REQUEST)
    assert [e["kind"] for e in _entries(other)] == ["refusal"]  # nothing else: asked once, at hello
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0


def test_a_plan_over_the_budget_is_refused_at_hello(tmp_path):
    """Deployment: a lab whose budget (epsilon 1) cannot pay for the LR run's planned gradients (epsilon 2) refuses at hello,
    BUDGET_EXHAUSTED, before any PSI; its ledger gains the refusal only."""
    from fedcollab.spec import BudgetSpec, PrivacySpec, policy_toml

    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    spec = spec.model_copy(update={"privacy": PrivacySpec(mode="record", target_epsilon=2.0, delta=1e-5),
                                   "training": spec.training.model_copy(update={"rounds": 4})})
    grid = Grid(spec, tmp_path, kinds=("logistic_regression",))
    for name, budget in (("clinic", 5.0), ("lab", 1.0)):
        pol = _policy(name, kinds=("logistic_regression",)).model_copy(update={
            "allowed_privacy_modes": ["record"], "budgets": [BudgetSpec(dataset=name, unit="record", epsilon=budget, delta=1e-5)]})
        grid.homes[name].policy_path.write_text(policy_toml(pol))
    before = len(_entries(grid.homes["lab"]))
    ledger = RunLedger(tmp_path / "ledger.jsonl", key=grid.key, roster=grid.ledger_run_roster(), run_id="run-over")
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=ledger, timeout=30)
    assert err.value.codes == {"lab": int(NodeErrorCode.BUDGET_EXHAUSTED)}
    new = _entries(grid.homes["lab"])[before:]
    assert [e["kind"] for e in new] == ["refusal"] and "plan needs epsilon 2" in new[0]["body"]["reason"]
    assert not [e for e in _entries(grid.homes["clinic"]) if e["kind"] == "release"]


def _interrupted(spec, grid, ledger_path, run_id, *, restart: bool = True, lose_reply: bool = False):
    """Run until the label holder's first checkpoint exists, then stop the coordinator (Ctrl-C); restart every node
    (or, with ``restart=False``, leave them running with the run still in memory, as when only the coordinator restarts).
    ``lose_reply``: the coordinator stops with the next node reply unread (its ledger lines missing from the run ledger)."""
    ledger = RunLedger(ledger_path, key=grid.key, roster=grid.ledger_run_roster(), run_id=run_id)
    ck = grid.homes["clinic"].root / "vertical" / run_id / "checkpoint.json"
    seen = [0]

    def stop(step: int) -> None:
        if ck.exists():
            raise KeyboardInterrupt

    def lose() -> bool:
        seen[0] += ck.exists()
        return seen[0] >= 2  # the reply after the one that made the checkpoint

    if lose_reply:
        grid.lose = lose
    with pytest.raises(KeyboardInterrupt):
        run_vertical(spec, grid, ledger=ledger, timeout=30, on_step=None if lose_reply else stop)
    grid.lose = None
    if restart:
        grid.restart(spec)
    done = {p: json.loads((h.root / "vertical" / run_id / "checkpoint.json").read_text())["done"] for p, h in grid.homes.items()}
    resumed = RunLedger(ledger_path, key=grid.key, roster=grid.ledger_run_roster(), run_id=run_id)
    resumed.heads.update({e["party"]: ln.hash for ln in parse_lines(ledger_path.read_bytes()) if (e := ln.entry)["party"] != "coordinator"})
    return resumed, done


def test_a_deployed_secureboost_run_resumes_from_each_nodes_checkpoint(tmp_path):
    """Interrupted in tree 1 of 3, the restarted nodes go on from their own checkpoints: no second PSI, the
    re-executed level charged again, the model of an uninterrupted run, the ledger verifies."""
    spec = _spec(tmp_path, trees=3, depth=2)
    whole_grid = Grid(spec, tmp_path / "whole")
    whole = run_vertical(spec, whole_grid, ledger=RunLedger(tmp_path / "whole.jsonl", key=whole_grid.key, roster=whole_grid.ledger_run_roster(),
                                                            run_id="run-whole"), timeout=30)
    # A node without a checkpoint of the run refuses to resume it, with a recorded code.
    with pytest.raises(NodeError):
        run_vertical(spec, whole_grid, ledger=RunLedger(tmp_path / "other.jsonl", key=whole_grid.key, roster=whole_grid.ledger_run_roster(),
                                                        run_id="run-other"), timeout=30, resume=True)
    assert _entries(whole_grid.homes["clinic"])[-1]["kind"] == "refusal"
    grid = Grid(spec, tmp_path / "cut")
    ledger, done = _interrupted(spec, grid, tmp_path / "ledger.jsonl", "run-cut")
    assert done == {"clinic": 1, "lab": 1}
    lab_ck = json.loads((grid.homes["lab"].root / "vertical" / "run-cut" / "checkpoint.json").read_text())
    assert "lookup" in lab_ck and "margin" not in lab_ck and all(e["tree"] == 0 for e in lab_ck["lookup"]["entries"])
    out = run_vertical(spec, grid, ledger=ledger, timeout=30, resume=True)
    assert out["resumed"] is True and out["trees"] == 3 and out["intersection"] == whole["intersection"]
    assert out["test_auc"] == pytest.approx(whole["test_auc"], abs=1e-9) and out["passive_splits"] == whole["passive_splits"]
    for party in ("clinic", "lab"):
        assert not (grid.homes[party].root / "vertical" / "run-cut" / "checkpoint.json").exists()
        rel = [e["body"]["release"] for e in _entries(grid.homes[party]) if e["kind"] == "release" and e["run_id"] == "run-cut"]
        assert sum(1 for r in rel if r["kind"] == "psi_intersection") == 1, party
    lab = [e["body"]["release"] for e in _entries(grid.homes["lab"]) if e["kind"] == "release" and e["run_id"] == "run-cut"]
    levels = sorted((r["details"]["tree"], r["details"]["level"]) for r in lab if r["kind"] == "vertical_histogram")
    assert levels == [(0, 0), (0, 1), (1, 0), (1, 0), (1, 1), (2, 0), (2, 1)], "tree 1's first level ran before the stop and again after"
    mine = json.loads((grid.homes["clinic"].root / out["model_parts"]["clinic"]["model_part"]).read_text())
    ref = json.loads((whole_grid.homes["clinic"].root / whole["model_parts"]["clinic"]["model_part"]).read_text())
    shape = [[(n["left"], n["right"], n["owner"], n["feature"], n["bin_index"]) for n in t] for t in mine["trees"]]
    assert shape == [[(n["left"], n["right"], n["owner"], n["feature"], n["bin_index"]) for n in t] for t in ref["trees"]]
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0


def test_a_deployed_vertical_lr_run_resumes_from_each_nodes_checkpoint(tmp_path):
    """Vertical LR stopped after its first iteration: the nodes resume at iteration 1, every gradient released once per iteration."""
    spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
    spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 6})})
    grid = Grid(spec, tmp_path, kinds=("logistic_regression",))
    ledger, done = _interrupted(spec, grid, tmp_path / "ledger.jsonl", "run-lr-cut", restart=False, lose_reply=True)
    assert done == {"clinic": 1, "lab": 1}
    lost = [e for e in _entries(grid.homes["lab"]) if e["run_id"] == "run-lr-cut" and e["kind"] == "release"][-1]
    assert lost["body"]["release"]["details"]["iteration"] == 1, "the lab's gradient release of iteration 1 left in the lost reply"
    run_ledger = [json.loads(x) for x in (tmp_path / "ledger.jsonl").read_text().splitlines()]
    assert not [e for e in run_ledger if e["party"] == "lab" and e["seq"] == lost["seq"]], "the run ledger lacks it"
    lab_ck = json.loads((grid.homes["lab"].root / "vertical" / "run-lr-cut" / "checkpoint.json").read_text())
    assert {"weights", "previous", "rows", "ids_sha256"} <= set(lab_ck)
    out = run_vertical(spec, grid, ledger=ledger, timeout=30, resume=True)
    assert out["iterations"] == 6 and out["test_auc"] > 0.75 and out["steps"] == 1 + 2 * 5  # no PSI step: the opening, then two a remaining iteration
    for party in ("clinic", "lab"):
        rel = [e["body"]["release"] for e in _entries(grid.homes[party]) if e["kind"] == "release" and e["run_id"] == "run-lr-cut"]
        its = sorted(r["details"]["iteration"] for r in rel if r["kind"] == "vertical_gradient")
        # The lab's release of iteration 1 (in the lost reply) is made again after the resume: charged twice, lost never.
        assert its == (list(range(6)) if party == "clinic" else [0, 1, 1, 2, 3, 4, 5]), (party, its)
        assert sum(1 for r in rel if r["kind"] == "psi_intersection") == 1
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0


def test_a_deployed_vertical_lr_run_with_two_passive_parties_resumes(tmp_path):
    """Three-party vertical LR stopped once the clinic has checkpointed, every node restarted: each resumes from its own
    checkpoint (no second PSI), every party's share of every iteration booked for each other party, the ledger verifies."""
    text = (ROOT / "specs" / "heart-disease-vertical-lr.toml").read_text().replace("rounds = 60", "rounds = 4")
    (tmp_path / "three-lr.toml").write_text(three_party_vertical_spec(text, tmp_path))
    spec = load_spec(tmp_path / "three-lr.toml")
    parties = ("clinic", "ecg", "stress")
    grid = Grid(spec, tmp_path / "cut", parties=parties, kinds=("logistic_regression",))
    ledger, done = _interrupted(spec, grid, tmp_path / "ledger.jsonl", "run-lr3-cut")
    assert done["clinic"] == 1 and set(done.values()) <= {1, 2}
    out = run_vertical(spec, grid, ledger=ledger, timeout=30, resume=True)
    assert out["iterations"] == 4 and out["test_auc"] > 0.7
    for party in parties:
        rel = [e["body"]["release"] for e in _entries(grid.homes[party]) if e["kind"] == "release" and e["run_id"] == "run-lr3-cut"]
        # one PSI per passive party (the clinic's two, and its notice to the ECG lab of the records common to all), none after the resume
        assert sum(1 for r in rel if r["kind"] == "psi_intersection") == (3 if party == "clinic" else 1), party
        for other in set(parties) - {party}:
            its = sorted(r["details"]["iteration"] for r in rel if r["kind"] == "vertical_gradient" and r["details"]["recipient"] == other)
            assert set(its) == set(range(4)) and max(its.count(i) for i in its) <= 2, (party, other, its)
        assert not (grid.homes[party].root / "vertical" / "run-lr3-cut" / "checkpoint.json").exists()
    assert int(verify_ledger(tmp_path / "ledger.jsonl", grid.ledger_run_roster()).exit_code) == 0


def test_a_coordinator_cannot_resume_one_party_and_start_another_afresh(tmp_path):
    """The label holder resumes from its checkpoint; the lab is told to start a new run: it refuses the resume notice (recorded, coded)."""
    spec = _spec(tmp_path, trees=3, depth=2)
    grid = Grid(spec, tmp_path / "cut")
    ledger, _ = _interrupted(spec, grid, tmp_path / "ledger.jsonl", "run-mix")
    lab_id = next(nid for nid, (_, ctx) in grid.nodes.items() if ctx.node_config["partner"] == "lab")

    def fresh_lab(nid, msg):
        cfg = msg.content.config_records.get(RecordKey.CONFIG)
        if nid == lab_id and cfg is not None and "vertical.resume" in cfg:
            cfg = ConfigRecord({k: v for k, v in cfg.items() if k != "vertical.resume"})
            msg.content[RecordKey.CONFIG] = cfg
        return msg

    grid.tamper = fresh_lab
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=ledger, timeout=30, resume=True)
    assert err.value.codes == {"lab": int(NodeErrorCode.BAD_REQUEST)}
    last = _entries(grid.homes["lab"])[-1]
    assert last["kind"] == "refusal" and last["body"]["reason"] == "vertical step: ProtocolError"  # the class, never the text
    assert (grid.homes["lab"].root / "vertical" / "run-mix" / "checkpoint.json").exists(), "the lab's checkpoint is kept"


def _scored_test_auc(spec, grid, out) -> float:
    """The AUC of a scoring run's scores on the trained run's test split (keyed by id, so the same records)."""
    import pandas as pd
    from sklearn.metrics import roc_auc_score

    from fedcollab.data import load_vertical_party
    from fedcollab.protocols.vertical import spec_split

    scores = pd.read_csv(grid.homes["clinic"].root / out["model_parts"]["clinic"]["model_part"], dtype={spec.vertical.id_column: str})
    clinic = load_vertical_party(spec, "clinic")
    label = dict(zip(clinic.ids, clinic.y))
    ids = list(scores[spec.vertical.id_column])
    _, test = spec_split(spec, ids)
    return float(roc_auc_score([label[ids[i]] for i in test], scores["score"].to_numpy()[test]))


@pytest.mark.parametrize("kind", ["gbdt", "logistic_regression"])
def test_a_deployed_model_scores_the_nodes_records_jointly(tmp_path, kind):
    """`submit --score RUN`: a fresh PSI, each node's own part of the trained model, the scores only at the label holder:
    on the trained run's test records they give its test AUC; a node without a part of that run refuses."""
    if kind == "gbdt":
        spec = _spec(tmp_path, trees=2, depth=2)
    else:
        spec = load_spec(ROOT / "specs" / "heart-disease-vertical-lr.toml")
        spec = spec.model_copy(update={"training": spec.training.model_copy(update={"rounds": 4})})
    grid = Grid(spec, tmp_path, kinds=(kind,))
    roster = grid.ledger_run_roster()
    trained = run_vertical(spec, grid, ledger=RunLedger(tmp_path / "train.jsonl", key=grid.key, roster=roster, run_id="run-t"), timeout=30)
    sent = len(grid.sent)
    out = run_vertical(spec, grid, ledger=RunLedger(tmp_path / "score.jsonl", key=grid.key, roster=roster, run_id="score-1"), timeout=30,
                       score="run-t")
    assert out["model"] == "scoring" and out["scored_with"] == "run-t" and out["steps"] == 2
    assert out["scored"] == out["intersection"] == trained["intersection"]
    assert out["model_parts"]["clinic"]["model_part"] == "vertical/score-1/scores.csv" and set(out["model_parts"]) == {"clinic"}
    assert _scored_test_auc(spec, grid, out) == pytest.approx(trained["test_auc"], abs=1e-9)
    # The scores never crossed the coordinator: its replies carry sealed bytes, counts and the file's digest only.
    assert not any("score" in k for r in grid.sent[sent:] for rec in r.content.config_records.values() for k in rec.keys() if k != "scored")
    lab = [e["body"]["release"] for e in _entries(grid.homes["lab"]) if e["kind"] == "release" and e["run_id"] == "score-1"]
    assert sorted(r["kind"] for r in lab) == ["psi_intersection", "vertical_logit" if kind != "gbdt" else "vertical_partition"], lab
    assert int(verify_ledger(tmp_path / "score.jsonl", roster).exit_code) == 0
    with pytest.raises(NodeError) as err:
        run_vertical(spec, grid, ledger=RunLedger(tmp_path / "s2.jsonl", key=grid.key, roster=roster, run_id="score-2"), timeout=30, score="run-none")
    assert set(err.value.codes.values()) == {int(NodeErrorCode.BAD_REQUEST)}
