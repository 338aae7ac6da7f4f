"""A gbdt node whose reply goes missing drops out, and is re-admitted at the next tree (plain aggregation).

``gbdt_rounds`` (the coordinator's tree loop) runs as a plain function against the four partners'
real node ClientApps, in-process: each message is answered by the node (its policy, order, budget
gate and ledger), and the dropout is injected as a missing reply (the node answered and charged,
the reply never arrived), never as a timeout.
"""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, Metadata, RecordDict

from fedcollab.coordinator._gbdt import gbdt_rounds
from fedcollab.data import load_partner_data
from fedcollab.node import NodeHome, init_node_home, make_client_app
from fedcollab.node._gbdt import load_state
from fedcollab.privacy.accounting import public_key_hex
from fedcollab.protocols import gbdt
from fedcollab.protocols.wire import RecordKey
from fedcollab.runner._run import simulated_policy
from fedcollab.spec import load_spec
from tests.conftest import ROOT

RUN = "r-readmit"
N_TREES = 3


class Federation:
    """Four partners' nodes behind one ClientApp (each with its own folder and Flower context), and a lossy exchange."""

    def __init__(self, spec, root, *, lost: set[tuple[str, int]], before_step=None) -> None:
        self.spec, self.lost, self.before_step = spec, lost, before_step
        self.names = [p.name for p in spec.partners]
        for n in self.names:
            init_node_home(root / n, partner=n, policy=simulated_policy(spec, n))
        self.homes = {n: NodeHome(root / n) for n in self.names}
        coordinator = public_key_hex(init_node_home(root / "coordinator", partner="coordinator").key())
        self.app = make_client_app(spec, {n: str(h.root) for n, h in self.homes.items()},
                                   {**{n: h.public_key() for n, h in self.homes.items()}, "coordinator": coordinator})
        self.ctx = {n: Context(run_id=1, node_id=i + 1, node_config={"partner": n}, state=RecordDict(), run_config={})
                    for i, n in enumerate(self.names)}
        self.failures: dict[str, list[int]] = {}
        self.sent: list[tuple[str, int, list[str]]] = []

    def deliver(self, name: str, message_type: str, cfg: dict, extra: dict) -> Message:
        content = RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.run_id": RUN, **cfg}), **{k: ConfigRecord(v) for k, v in extra.items()}})
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=self.ctx[name].node_id, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type=message_type)
        return self.app(Message(content=content, metadata=meta), self.ctx[name])

    def exchange(self, rnd: int, message_type: str, per: dict) -> dict[str, Message]:
        if self.before_step is not None:
            self.before_step(self, rnd)
        out = {}
        for name, (_, cfg, extra) in per.items():
            self.sent.append((name, rnd, sorted(extra)))
            reply = self.deliver(name, message_type, cfg, extra)
            if (name, rnd) in self.lost:
                continue  # answered (and charged) at the node, lost on the way back: a missing reply
            err = reply.content.config_records.get(RecordKey.ERROR)
            if err is not None:
                self.failures.setdefault(name, []).append(int(err["code"]))
                continue
            out[name] = reply
        return out


def _run(tmp_path, lost, before_step=None):
    spec = load_spec(ROOT / "specs" / "heart-disease-gbdt.toml").replace(model={"gbdt": {"n_trees": N_TREES, "max_depth": 2}},
                                                                             training={"min_partners": 3})
    fed = Federation(spec, tmp_path, lost=lost, before_step=before_step)
    for n in fed.names:
        assert RecordKey.ERROR not in fed.deliver(n, "query", {"fedcollab.kind": "setup", "scaling": "none"}, {}).content.config_records
    records: list[tuple[int, list[str]]] = []

    def no_secagg(rnd: int):
        raise AssertionError("plain aggregation sends no secagg stage")

    model = gbdt_rounds(spec, node_names={i + 1: n for i, n in enumerate(fed.names)}, exchange=fed.exchange, send_stage=no_secagg,
                        roster_keys={}, run_id=RUN, max_rows=1e6, min_partners=3, message_type=MessageType,
                        record=lambda t, t0, trained, failed, parts: records.append((t, sorted(trained))), failures=fed.failures)
    return spec, fed, model, records


@pytest.mark.parametrize("lost_step", [2, 3], ids=["mid-tree", "at-the-leaves"])
def test_a_silent_node_catches_up_and_is_readmitted(tmp_path, lost_step):
    """Hungary's reply to a step of tree 1 is lost: it is out for the rest of tree 1, back from tree 2 on (every finished
    tree sent once as gbdt.catchup); every node's margins are then exactly the model's, and no node refused anything."""
    spec, fed, model, records = _run(tmp_path, {("hungary", lost_step)})
    everyone, others = sorted(fed.names), sorted(n for n in fed.names if n != "hungary")
    assert records == [(1, others), (2, everyone), (3, everyone)]
    assert len(model.trees) == N_TREES and fed.failures == {}
    catchups = [(n, rnd) for n, rnd, keys in fed.sent if "gbdt.catchup" in keys]
    assert catchups == [("hungary", 4)] and all("gbdt.apply" not in keys for n, rnd, keys in fed.sent if (n, rnd) == ("hungary", 4))
    # Every node (the re-admitted one included) applied the model's first two trees, bit for bit.
    params, layout = gbdt.params_of(spec), gbdt.layout_of(spec)
    for n in fed.names:
        d = load_partner_data(spec, n)
        st = load_state(fed.homes[n].root, RUN, d.x_train, d.y_train, spec)
        want = gbdt.node_init(d.x_train, d.y_train, layout=layout, base_score=params.base_score)
        for tree in model.trees[:2]:
            want = gbdt.node_apply_tree(want, tree, layout=layout)
        np.testing.assert_array_equal(st.margin, want.margin)
        assert st.trees_done == 2
        kinds = [e.entry["kind"] for e in fed.homes[n].gate(n, fed.homes[n].dataset()).ledger.lines() if e.entry.get("run_id") == RUN]
        assert "refusal" not in kinds


def test_a_node_that_refused_is_not_asked_again(tmp_path):
    """A node that answers with an error code (its partner withdrew gbdt from its policy after step 2) stays out:
    no catch-up is sent to it, the other three build the rest of the model."""
    from fedcollab.spec import load_policy, policy_toml

    def withdraw(fed: Federation, rnd: int) -> None:
        if rnd == 3:
            path = fed.homes["hungary"].policy_path
            path.write_text(policy_toml(load_policy(path).model_copy(update={"allowed_model_kinds": ["logistic_regression"]})))

    _, fed, model, records = _run(tmp_path, set(), before_step=withdraw)
    others = sorted(n for n in fed.names if n != "hungary")
    assert [r[1] for r in records] == [others] * N_TREES and len(model.trees) == N_TREES
    # POLICY_REFUSED at step 3, and again for the final evaluation (sent to every node); no tree step asks it again.
    assert fed.failures == {"hungary": [132, 132]}
    assert not [1 for n, rnd, keys in fed.sent if "gbdt.catchup" in keys]
    assert max(rnd for n, rnd, _ in fed.sent if n == "hungary" and rnd < gbdt.max_steps(fed.spec)) == 3


def test_a_catch_up_never_rewinds_a_node(tmp_path):
    """A catch-up before setup, with other trees than those before its tree, or at a later level is refused, coded,
    with nothing released (fewer trees than the node applied would have it answer a tree's sums twice)."""
    from fedcollab.protocols.gbdt import LevelRequest

    spec = load_spec(ROOT / "specs" / "heart-disease-gbdt.toml").replace(model={"gbdt": {"n_trees": 2, "max_depth": 1}})
    fed = Federation(spec, tmp_path, lost=set())
    n = "cleveland"
    level = LevelRequest(tree=1, level=0, release="histogram", open=(0,)).to_wire()
    empty = gbdt.ensemble_to_wire(gbdt.Ensemble(trees=(), base_score=0.5, feature_names=gbdt.layout_of(spec).feature_names))

    def code(rnd: int, extra: dict) -> int:
        reply = fed.deliver(n, "train", {"fedcollab.kind": "gbdt", "server-round": rnd}, extra)
        return int(reply.content.config_records[RecordKey.ERROR]["code"])

    assert code(1, {"gbdt": level, "gbdt.catchup": empty}) == 122  # OUT_OF_ORDER: before setup
    assert RecordKey.ERROR not in fed.deliver(n, "query", {"fedcollab.kind": "setup", "scaling": "none"}, {}).content.config_records
    assert code(1, {"gbdt": level, "gbdt.catchup": empty}) == 120  # BAD_REQUEST: not the trees before tree 1
    deeper = LevelRequest(tree=0, level=1, release="leaves", open=(1, 2)).to_wire()
    assert code(2, {"gbdt": deeper, "gbdt.catchup": empty}) == 120  # only with a tree's first step
    releases = [e for e in fed.homes[n].gate(n, fed.homes[n].dataset()).ledger.lines() if e.entry.get("kind") == "release"
                and e.entry["body"]["release"]["kind"] == "gbdt_histogram"]
    assert releases == []  # nothing released by any refused catch-up
