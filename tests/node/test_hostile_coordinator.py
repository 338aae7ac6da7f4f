"""A hostile coordinator against the node's real ClientApp, in-process with real Flower messages.

Every message passes the partner's mods (fedcollab/node/_mods.py): the policy on every message, the
run's order, codes only. Each test sends what an attacker would and checks the refusal's code, that
the node's ledger gained only refusal entries (no release, so no budget spent) and that the reply
carries no data-bearing record.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import time
import uuid

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict

from fedcollab.core import NodeErrorCode
from fedcollab.models import build_model, model_arrays
from fedcollab.node import NodeHome, init_node_home, make_client_app
from fedcollab.node._mods import OrderState, Request, order_problem
from fedcollab.privacy.accounting import GaussianMechanism, Release, public_key_hex
from fedcollab.protocols.statistics import scaling_from_bounds
from fedcollab.protocols.wire import RecordKey
from fedcollab.runner._run import simulated_policy
from fedcollab.spec import ModelSpec, NodePolicy, load_spec
from tests.conftest import ROOT

PARTNER = "hungary"
RUN = "run-hostile"
EVIL = "tests.node._evil_model"


def _spec(name: str):
    return load_spec(ROOT / "specs" / name)


class Node:
    """One partner's node: its folder, its ClientApp and its Flower context (state kept across messages)."""

    def __init__(self, spec, root, policy: NodePolicy | None = None) -> None:
        self.spec = spec
        home = NodeHome(root / PARTNER)
        init_node_home(home.root, partner=PARTNER, policy=policy or simulated_policy(spec, PARTNER))
        self.home = home
        roster = {PARTNER: home.public_key(), "coordinator": public_key_hex(init_node_home(root / "coord", partner="coord").key())}
        self.app = make_client_app(spec, {PARTNER: str(home.root)}, roster)
        self.context = Context(run_id=1, node_id=7, node_config={"partner": PARTNER}, state=RecordDict(), run_config={})

    def entries(self) -> list[dict]:
        return [json.loads(x) for x in self.home.ledger_path.read_text().splitlines() if x.strip()]

    def send(self, message_type: str, cfg: dict, *, arrays: bool = False, extra: dict | None = None) -> Message:
        content = RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.run_id": RUN, **cfg}),
                              **{k: ConfigRecord(v) for k, v in (extra or {}).items()}})
        if arrays:
            init = model_arrays(build_model(self.spec.model if self.spec.model.kind != "custom" else ModelSpec(), 13, seed=self.spec.seed))
            content[RecordKey.ARRAYS] = ArrayRecord(array_dict={k: Array(np.ascontiguousarray(v)) for k, v in init.items()})
        # As the SuperLink delivers it: stamped with a message id, from the coordinator (node 0) to this node.
        meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                        created_at=time.time(), ttl=600.0, message_type=message_type)
        return self.app(Message(content=content, metadata=meta), self.context)

    def refused(self, reply: Message, code: NodeErrorCode, before: int) -> list[dict]:
        """Assert a coded refusal with nothing released; returns the new ledger entries (refusals only)."""
        got = reply.content
        assert RecordKey.ERROR in got.config_records, f"answered instead of refused: {list(got.keys())}"
        assert int(got.config_records[RecordKey.ERROR]["code"]) == int(code)
        # No data-bearing record: no arrays, no metrics, no statistics, no protocol reply.
        assert set(got.keys()) <= {RecordKey.ERROR, RecordKey.RELEASES}
        new = self.entries()[before:]
        assert new and all(e["kind"] == "refusal" for e in new), [e["kind"] for e in new]
        assert int(new[-1]["body"]["code"]) == int(code)
        sent = json.loads(str(got.config_records[RecordKey.RELEASES]["lines"]))
        assert [json.loads(x)["seq"] for x in sent] == [e["seq"] for e in new]  # the refusals travel with the code
        return new


    def rejected(self, reply: Message, code: NodeErrorCode, before: int) -> None:
        """A coded refusal raised by a handler (not the mods): the code, no data-bearing record, nothing new in the ledger but refusals."""
        got = reply.content
        assert RecordKey.ERROR in got.config_records, f"answered instead of refused: {list(got.keys())}"
        assert int(got.config_records[RecordKey.ERROR]["code"]) == int(code)
        assert set(got.keys()) <= {RecordKey.ERROR, RecordKey.RELEASES}
        assert all(e["kind"] == "refusal" for e in self.entries()[before:])


def _scaling(spec) -> dict:
    s = scaling_from_bounds(np.asarray(spec.data_schema.encoded_bounds()))
    return {"scale_mean": s.mean.tolist(), "scale_std": s.std.tolist(), "scale_method": s.method}


def _setup(node: Node) -> Message:
    reply = node.send("query", {"fedcollab.kind": "setup", "scaling": "public_bounds"})
    assert RecordKey.ERROR not in reply.content.config_records
    return reply


@pytest.fixture
def plain(tmp_path):
    return Node(_spec("heart-disease.toml"), tmp_path)


@pytest.fixture
def secure(tmp_path):
    return Node(_spec("heart-disease-secagg.toml"), tmp_path)


class TestWithoutSetup:
    """Every message kind sent before setup is refused with OUT_OF_ORDER, recorded, nothing released."""

    @pytest.mark.parametrize("message_type,cfg,arrays", [
        ("train", {"server-round": 1}, True),
        ("evaluate", {"server-round": 1}, True),
        ("query", {"fedcollab.kind": "close", "close": "{}"}, False),
        ("query", {"fedcollab.kind": "secagg", "secagg.stage": "advertise", "secagg.round": 1}, False),
    ])
    def test_plain_spec(self, plain, message_type, cfg, arrays):
        before = len(plain.entries())
        reply = plain.send(message_type, {**cfg, **_scaling(plain.spec)}, arrays=arrays)
        plain.refused(reply, NodeErrorCode.OUT_OF_ORDER, before)

    @pytest.mark.parametrize("stage", ["advertise", "share", "masked", "consistency", "unmask"])
    def test_secagg_stages(self, secure, stage):
        before = len(secure.entries())
        reply = secure.send("query", {"fedcollab.kind": "secagg", "secagg.stage": stage, "secagg.round": 0})
        new = secure.refused(reply, NodeErrorCode.OUT_OF_ORDER, before)
        assert "before setup" in new[-1]["body"]["reason"]

    def test_he_stage(self, tmp_path):
        node = Node(_spec("heart-disease-he.toml"), tmp_path)
        before = len(node.entries())
        node.refused(node.send("query", {"fedcollab.kind": "he", "he.stage": "advert"}), NodeErrorCode.OUT_OF_ORDER, before)
        assert not (node.home.root / "he").exists() or not any((node.home.root / "he").iterdir())


class TestAfterSetup:
    def test_in_order_is_answered(self, plain):
        """Setup then train of round 1 pass the mods (the refusals above are not a node that refuses everything)."""
        _setup(plain)
        reply = plain.send("train", {"server-round": 1, **_scaling(plain.spec)}, arrays=True)
        assert RecordKey.ERROR not in reply.content.config_records
        assert RecordKey.ARRAYS in reply.content.array_records
        assert plain.entries()[-1]["kind"] == "release"

    def test_second_setup(self, plain):
        _setup(plain)
        before = len(plain.entries())
        plain.refused(plain.send("query", {"fedcollab.kind": "setup", "scaling": "federated_statistics"}), NodeErrorCode.OUT_OF_ORDER, before)

    @pytest.mark.parametrize("rnd", [0, 21, 1])
    def test_train_round_outside_or_repeated(self, plain, rnd):
        """Rounds outside the spec's 1..20, or a round already trained, are refused before training."""
        _setup(plain)
        if rnd == 1:
            assert RecordKey.ERROR not in plain.send("train", {"server-round": 1, **_scaling(plain.spec)}, arrays=True).content.config_records
        before = len(plain.entries())
        plain.refused(plain.send("train", {"server-round": rnd, **_scaling(plain.spec)}, arrays=True), NodeErrorCode.OUT_OF_ORDER, before)

    def test_another_run_id(self, plain):
        _setup(plain)
        before = len(plain.entries())
        reply = plain.send("evaluate", {"server-round": 1, "fedcollab.run_id": "other-run", **_scaling(plain.spec)}, arrays=True)
        plain.refused(reply, NodeErrorCode.OUT_OF_ORDER, before)

    def test_secagg_stage_on_a_plain_run(self, plain):
        """Evaluate carrying a secagg stage on a plain spec: refused before the evaluation is released."""
        _setup(plain)
        before = len(plain.entries())
        reply = plain.send("evaluate", {"server-round": 1, "secagg.stage": "share", "secagg.round": 2, **_scaling(plain.spec)}, arrays=True)
        plain.refused(reply, NodeErrorCode.POLICY_REFUSED, before)

    @pytest.mark.parametrize("cfg", [
        {},  # train without its masked-input stage
        {"secagg.stage": "masked", "secagg.round": 1},  # masked input before advertise and share
    ])
    def test_secagg_train_out_of_order(self, secure, cfg):
        """Under secagg, training is refused before it runs unless the round's earlier stages are done."""
        _setup(secure)
        before = len(secure.entries())
        reply = secure.send("train", {"server-round": 1, "secagg.max_weight": 1000.0, "secagg.n_parties": 4, **cfg, **_scaling(secure.spec)},
                            arrays=True, extra={"secagg": {}} if cfg else None)
        secure.refused(reply, NodeErrorCode.OUT_OF_ORDER, before)
        assert not list((secure.home.root / "secagg").glob("*.bin")) if (secure.home.root / "secagg").exists() else True

    @pytest.mark.parametrize("stage", ["share", "masked", "consistency", "unmask"])
    def test_secagg_stage_before_advertise(self, secure, stage):
        _setup(secure)
        before = len(secure.entries())
        reply = secure.send("query", {"fedcollab.kind": "secagg", "secagg.stage": stage, "secagg.round": 1}, extra={"secagg": {}})
        new = secure.refused(reply, NodeErrorCode.OUT_OF_ORDER, before)
        assert "earlier stages" in new[-1]["body"]["reason"]


class TestAttackOne:
    """Issue 13, attack 1: skipping setup skipped the policy."""

    def test_forbidden_spec_without_setup(self, tmp_path):
        """Policy: secagg only, logistic regression, features [age, sex], 3 rounds. A plain MLP on all features is refused."""
        heart = _spec("heart-disease.toml")
        hostile = heart.model_copy(update={"model": ModelSpec(kind="mlp", hidden=[8])})
        policy = NodePolicy(partner=PARTNER, allowed_aggregation=["secagg"], allowed_model_kinds=["logistic_regression"],
                            allowed_features=["age", "sex"], max_rounds=3, allow_non_private_training=True)
        node = Node(hostile, tmp_path, policy=policy)
        for message_type in ("train", "evaluate"):
            before = len(node.entries())
            reply = node.send(message_type, {"server-round": 1, **_scaling(heart)}, arrays=False)
            new = node.refused(reply, NodeErrorCode.POLICY_REFUSED, before)
            assert "aggregation mode" in new[-1]["body"]["reason"] and "model kind" in new[-1]["body"]["reason"]
        assert not any(e["kind"] == "release" for e in node.entries())

    @pytest.mark.parametrize("policy_kinds", [["logistic_regression", "mlp"], ["logistic_regression", "mlp", "custom"]])
    @pytest.mark.parametrize("message_type", ["train", "evaluate", "query"])
    def test_custom_model_not_listed_is_never_imported(self, tmp_path, policy_kinds, message_type):
        """A custom target the policy does not list is refused; its module is never imported (with or without 'custom' kinds)."""
        sys.modules.pop(EVIL, None)
        os.environ.pop("FEDCOLLAB_EVIL_MODEL_IMPORTED", None)
        heart = _spec("heart-disease.toml")
        hostile = heart.model_copy(update={"model": ModelSpec(kind="custom", target=f"{EVIL}:Evil")})
        policy = NodePolicy(partner=PARTNER, allowed_model_kinds=policy_kinds, allow_non_private_training=True,
                            allowed_custom_models=["tiny_net:TinyNet"])
        node = Node(hostile, tmp_path, policy=policy)
        cfg = {"fedcollab.kind": "setup", "scaling": "public_bounds"} if message_type == "query" else {"server-round": 1, **_scaling(heart)}
        node.refused(node.send(message_type, cfg), NodeErrorCode.POLICY_REFUSED, 0)
        assert EVIL not in sys.modules
        assert "FEDCOLLAB_EVIL_MODEL_IMPORTED" not in os.environ

    def test_listed_custom_model_is_built(self, tmp_path):
        """The allow-list is what decides: the same kind of spec with a listed target is answered."""
        heart = _spec("heart-disease.toml")
        spec = heart.model_copy(update={"model": ModelSpec(kind="custom", target="torch.nn:Identity")})
        policy = NodePolicy(partner=PARTNER, allowed_model_kinds=["custom"], allow_non_private_training=True,
                            allowed_custom_models=["torch.nn:Identity"])
        node = Node(spec, tmp_path, policy=policy)
        assert RecordKey.ERROR not in _setup(node).content.config_records


class TestBudgetUnchanged:
    def test_dp_node_refusals_spend_nothing(self, tmp_path):
        """Under DP-SGD, out-of-order train and evaluate leave the node's spend where it was."""
        spec = _spec("heart-disease-dp.toml")
        node = Node(spec, tmp_path)
        gate = node.home.gate(PARTNER, next(p.dataset_id for p in spec.partners if p.name == PARTNER))
        probe = Release(party=PARTNER, added_by=PARTNER, kind="statistics", about="train", unit="record", observer="coordinator", round=0,
                        mechanism=GaussianMechanism(noise_multiplier=1.0, releases=1))
        spent = gate.would_spend(probe, run_id=RUN)[1]
        for message_type in ("train", "evaluate"):
            before = len(node.entries())
            node.refused(node.send(message_type, {"server-round": 1, **_scaling(spec)}, arrays=True), NodeErrorCode.OUT_OF_ORDER, before)
        assert gate.would_spend(probe, run_id=RUN)[1] == spent


class TestOrderRule:
    """The pure rule the order mod applies."""

    def _req(self, category="query", kind="", rnd=None, stages=(), ev=None):
        return Request(category=category, kind=kind, run_id=RUN, round=rnd, evaluate_round=ev, stages=tuple(stages))

    def test_nothing_after_close(self):
        spec = _spec("heart-disease.toml")
        at = OrderState(setup_done=True, run_id=RUN, closed=True)
        for req in (self._req("train", rnd=2), self._req(kind="close"), self._req(kind="setup")):
            assert order_problem(spec, req, at)[0] == NodeErrorCode.OUT_OF_ORDER

    def test_secagg_round_in_order(self):
        """advertise -> share -> masked (on train) -> consistency -> unmask is accepted; unmask + next advertise in one message too."""
        spec = _spec("heart-disease-secagg.toml")
        stages = {1: None}
        at = lambda: OrderState(setup_done=True, run_id=RUN, secagg_stage=lambda r: stages.get(r))  # noqa: E731
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "advertise", 1)]), at()) is None
        stages[1] = "share"
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "share", 1)]), at()) is None
        stages[1] = "masked-input"
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "masked", 1)]), at())[0] == NodeErrorCode.OUT_OF_ORDER
        assert order_problem(spec, self._req("train", rnd=1, stages=[("secagg", "masked", 1)]), at()) is None
        stages[1] = "consistency"
        # Unmask before the node signed the survivor set is out of order; the consistency stage is not.
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "unmask", 1)]), at())[0] == NodeErrorCode.OUT_OF_ORDER
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "consistency", 1)]), at()) is None
        stages[1] = "unmask"
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "consistency", 1)]), at())[0] == NodeErrorCode.OUT_OF_ORDER
        both = [("secagg", "unmask", 1), ("secagg.next", "advertise", 2)]
        assert order_problem(spec, self._req(kind="secagg", stages=both), at()) is None
        # A replayed advertise of a finished round is refused.
        done = OrderState(setup_done=True, run_id=RUN, secagg_done=1)
        assert order_problem(spec, self._req(kind="secagg", stages=[("secagg", "advertise", 1)]), done)[0] == NodeErrorCode.OUT_OF_ORDER

    def test_fused_evaluation_must_be_an_earlier_round(self):
        spec = _spec("heart-disease.toml")
        at = OrderState(setup_done=True, run_id=RUN, trained=3, evaluated=2)
        assert order_problem(spec, self._req("train", rnd=4, ev=3), at) is None
        assert order_problem(spec, self._req("train", rnd=4, ev=4), at)[0] == NodeErrorCode.OUT_OF_ORDER
        assert order_problem(spec, self._req("train", rnd=4, ev=2), at)[0] == NodeErrorCode.OUT_OF_ORDER


class TestAllowList:
    """``allowed_custom_models`` in the node's policy file."""

    def test_round_trips_through_the_policy_file(self, tmp_path):
        """What node init writes is what the node reads back (the simulated partners' folders rely on it)."""
        policy = NodePolicy(partner=PARTNER, allowed_model_kinds=["custom"], allowed_custom_models=["tiny_net:TinyNet", "pkg.mod:Net"])
        home = init_node_home(tmp_path / "n", partner=PARTNER, policy=policy)
        assert home.policy().allowed_custom_models == ["tiny_net:TinyNet", "pkg.mod:Net"]

    @pytest.mark.parametrize("bad", ["os", "os:_exit()", "a b:C", ":Net"])
    def test_malformed_target_names_the_field(self, tmp_path, bad):
        from fedcollab.core import ConfigError
        from fedcollab.spec import load_policy

        path = tmp_path / "policy.toml"
        path.write_text(f'schema_version = 1\npartner = "{PARTNER}"\nallowed_custom_models = [{json.dumps(bad)}]\n')
        with pytest.raises(ConfigError) as exc:
            load_policy(path)
        assert "allowed_custom_models" in str(exc.value) and repr(bad) in str(exc.value)

    def test_simulated_policy_lists_the_specs_own_target(self):
        spec = _spec("heart-disease.toml")
        custom = spec.model_copy(update={"model": ModelSpec(kind="custom", target="tiny_net:TinyNet")})
        assert simulated_policy(custom, PARTNER).allowed_custom_models == ["tiny_net:TinyNet"]
        assert simulated_policy(spec, PARTNER).allowed_custom_models == []


@pytest.mark.filterwarnings("ignore:budget of")  # the Heart DP spec's delta = 1e-3 exceeds 1/(10 n) at Hungary (a PolicyWarning)
class TestGbdt:
    """A hostile coordinator against a gbdt node: steps out of the plan are refused, coded, with nothing released."""

    @staticmethod
    def _level(tree: int, level: int, release: str, open_: tuple[int, ...] = (0,)) -> dict:
        from fedcollab.protocols.gbdt import LevelRequest

        return LevelRequest(tree=tree, level=level, release=release, open=open_).to_wire()  # type: ignore[arg-type]

    def _releases(self, node: Node) -> int:
        return sum(1 for e in node.entries() if e["kind"] == "release" and e["body"]["release"]["kind"] == "gbdt_histogram")

    def test_step_before_setup(self, tmp_path):
        node = Node(_spec("heart-disease-gbdt-dp.toml"), tmp_path)
        reply = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 1}, extra={"gbdt": self._level(0, 0, "leaves")})
        node.refused(reply, NodeErrorCode.OUT_OF_ORDER, 0)
        assert self._releases(node) == 0

    def test_in_plan_answered_then_repeat_and_unplanned_refused(self, tmp_path):
        """DP with random splits: one leaf release per tree. A repeat of the step and a histogram (not in the plan) are refused."""
        node = Node(_spec("heart-disease-gbdt-dp.toml"), tmp_path)
        _setup(node)
        ok = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 1}, extra={"gbdt": self._level(0, 0, "leaves")})
        assert "gbdt" in ok.content.config_records and self._releases(node) == 1
        values = np.asarray(ok.content.config_records["gbdt"]["values"], dtype=float)
        assert values.shape == (2,) and np.all(np.isfinite(values))  # the root's noisy (G, H)
        before = len(node.entries())
        again = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 2}, extra={"gbdt": self._level(0, 0, "leaves")})
        node.refused(again, NodeErrorCode.BAD_REQUEST, before)
        before = len(node.entries())
        hist = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 3}, extra={"gbdt": self._level(1, 0, "histogram")})
        node.refused(hist, NodeErrorCode.BAD_REQUEST, before)
        assert self._releases(node) == 1  # nothing more left, nothing more charged

    def test_quantile_sketch_and_edges_only_in_order(self, tmp_path):
        """bin_edges = "quantile": a tree step before the sketch, a second sketch, a tree step without edges, edges off the
        grid and edges sent twice are refused, coded, with nothing more released; a public-edges node refuses a sketch."""
        from fedcollab.protocols.gbdt import edges_to_wire, sketch_request_wire

        def refuse(n: Node, rnd: int, extra: dict) -> None:
            before = len(n.entries())
            n.refused(n.send("train", {"fedcollab.kind": "gbdt", "server-round": rnd}, extra=extra), NodeErrorCode.BAD_REQUEST, before)

        public = Node(_spec("heart-disease-gbdt-dp.toml"), tmp_path / "public")
        _setup(public)
        refuse(public, 1, {"gbdt": sketch_request_wire()})
        assert self._releases(public) == 0
        spec = _spec("heart-disease-gbdt-dp.toml").replace(model={"gbdt": {"bin_edges": "quantile"}})
        node = Node(spec, tmp_path / "q")
        # A sketch request before setup: out of order, nothing released.
        node.refused(node.send("train", {"fedcollab.kind": "gbdt", "server-round": 1}, extra={"gbdt": sketch_request_wire()}),
                     NodeErrorCode.OUT_OF_ORDER, 0)
        assert self._releases(node) == 0
        _setup(node)
        good = edges_to_wire([(3, 10, 200)] * 5)
        tree = {"gbdt": self._level(0, 0, "leaves"), "gbdt.edges": good}
        # The trees' steps before the sketch: refused (no edges accepted before a sketch).
        refuse(node, 1, tree)
        ok = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 2}, extra={"gbdt": sketch_request_wire()})
        assert ok.content.config_records["gbdt"]["kind"] == "sketch_reply" and self._releases(node) == 1
        refuse(node, 3, {"gbdt": sketch_request_wire()})
        refuse(node, 4, {"gbdt": self._level(0, 0, "leaves")})
        off_grid = {"gbdt": self._level(0, 0, "leaves"), "gbdt.edges": edges_to_wire([(3, 10, 400)] * 5)}
        refuse(node, 5, off_grid)
        assert self._releases(node) == 1
        ok = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 6}, extra=tree)
        assert ok.content.config_records["gbdt"]["kind"] == "histogram_reply" and self._releases(node) == 2
        again = {"gbdt": self._level(1, 0, "leaves"), "gbdt.edges": good}
        refuse(node, 7, again)
        assert self._releases(node) == 2

    def test_checkpointed_trees_only_where_the_nodes_own_setup_resumed(self, tmp_path):
        """`gbdt.resume` (a resumed run's checkpointed trees) is refused in a run that did not resume, a resumed run's first
        step must carry exactly the trees its setup named, once; every refusal coded, nothing more released."""
        import math

        from fedcollab.protocols.gbdt import Ensemble, Tree, ensemble_to_wire, layout_of, params_of

        spec = _spec("heart-disease-gbdt-dp.toml")
        leaf = Tree.from_wire({"left": [-1], "right": [-1], "feature": [-1], "bin_index": [-1], "threshold": [math.nan], "default_left": [1],
                               "value": [0.25], "gain": [0.0], "hessian": [1.0]})

        def trees(n: int) -> dict:
            return ensemble_to_wire(Ensemble(trees=(leaf,) * n, base_score=params_of(spec).base_score, feature_names=layout_of(spec).feature_names))

        def refuse(n: Node, rnd: int, extra: dict) -> None:
            before = len(n.entries())
            n.refused(n.send("train", {"fedcollab.kind": "gbdt", "server-round": rnd}, extra=extra), NodeErrorCode.BAD_REQUEST, before)

        node = Node(spec, tmp_path)
        _setup(node)
        assert "gbdt" in node.send("train", {"fedcollab.kind": "gbdt", "server-round": 1}, extra={"gbdt": self._level(0, 0, "leaves")}).content.config_records
        refuse(node, 2, {"gbdt": self._level(1, 0, "leaves"), "gbdt.resume": trees(1)})  # this run did not resume
        assert self._releases(node) == 1
        # The coordinator dies; a new Flower run resumes the same run after tree 1 (the node's state survives in its folder).
        node.context = Context(run_id=2, node_id=7, node_config={"partner": PARTNER}, state=RecordDict(), run_config={})
        reply = node.send("query", {"fedcollab.kind": "setup", "scaling": "none", "fedcollab.resume_after": 1})
        assert RecordKey.ERROR not in reply.content.config_records
        refuse(node, 3, {"gbdt": self._level(1, 0, "leaves"), "gbdt.apply": leaf.to_wire()})  # no checkpointed trees
        refuse(node, 4, {"gbdt": self._level(1, 0, "leaves"), "gbdt.resume": trees(2)})  # not the trees the setup named
        assert self._releases(node) == 1
        ok = node.send("train", {"fedcollab.kind": "gbdt", "server-round": 5}, extra={"gbdt": self._level(1, 0, "leaves"), "gbdt.resume": trees(1)})
        assert ok.content.config_records["gbdt"]["kind"] == "histogram_reply" and self._releases(node) == 2
        refuse(node, 6, {"gbdt": self._level(2, 0, "leaves"), "gbdt.resume": trees(2)})  # a later resume record
        assert self._releases(node) == 2

    def test_budget_refuses_a_run_the_plan_does_not_fit(self, tmp_path):
        """A node with epsilon 0.5 refuses the epsilon-1 gbdt plan at setup, before any tree step."""
        spec = _spec("heart-disease-gbdt-dp.toml")
        pol = simulated_policy(spec, PARTNER)
        low = pol.model_copy(update={"budgets": [b.model_copy(update={"epsilon": 0.5}) for b in pol.budgets]})
        node = Node(spec, tmp_path, policy=low)
        node.refused(node.send("query", {"fedcollab.kind": "setup", "scaling": "none"}), NodeErrorCode.BUDGET_EXHAUSTED, 0)
        assert self._releases(node) == 0


class TestAnalyticsOrder:
    """The analytics ClientApp behind the same shell, with its own order mod: one release per run, stages after the query."""

    @staticmethod
    def _rule(kind, msg_run="r", round_=None, **at):
        from fedcollab.node._mods import AnalyticsOrder, analytics_order_problem

        got = analytics_order_problem(kind, msg_run, round_, AnalyticsOrder(**at))
        return None if got is None else (got[0], got[1])

    def test_the_pure_rule(self):
        out = NodeErrorCode.OUT_OF_ORDER
        assert self._rule("analytics.check") is None and self._rule("analytics.query") is None and self._rule("analytics.profile") is None
        assert self._rule("secagg", round_=1)[0] == out  # before the query
        assert self._rule("secagg", round_=1, run_id="r", released="analytics.query") is None
        assert self._rule("secagg", round_=2, run_id="r", released="analytics.query")[0] == out
        assert self._rule("secagg", round_=1, run_id="r", released="analytics.profile")[0] == out
        assert self._rule("analytics.profile", run_id="r", released="analytics.query")[0] == out  # a second release
        assert self._rule("analytics.query", run_id="r", released="analytics.query")[0] == out
        assert self._rule("analytics.check", "other", None, run_id="r")[0] == out  # another run's message
        assert self._rule("analytics.close", "r", None, run_id="r", closed=True)[0] == out  # after the close

    def test_the_app_refuses_out_of_order_recorded_with_nothing_released(self, tmp_path, heart_dp_spec):
        from fedcollab.node._analytics import make_analytics_client_app

        init_node_home(tmp_path / PARTNER, partner=PARTNER, policy=simulated_policy(heart_dp_spec, PARTNER))  # a record-level budget: the query is charged
        home = NodeHome(tmp_path / PARTNER)
        roster = {PARTNER: home.public_key(), "coordinator": public_key_hex(init_node_home(tmp_path / "coord", partner="coord").key())}
        app = make_analytics_client_app(heart_dp_spec, {PARTNER: str(home.root)}, roster)
        ctx = Context(run_id=1, node_id=7, node_config={"partner": PARTNER}, state=RecordDict(), run_config={})
        query = json.dumps({"name": "q", "epsilon": 1.0, "delta": 1e-6, "statistics": [{"kind": "count"}]})

        def send(cfg: dict, extra: dict | None = None, run: str = RUN) -> Message:
            content = RecordDict({RecordKey.CONFIG: ConfigRecord({"fedcollab.run_id": run, **cfg}),
                                  **{k: ConfigRecord(v) for k, v in (extra or {}).items()}})
            meta = Metadata(run_id=1, message_id=uuid.uuid4().hex, src_node_id=0, dst_node_id=7, reply_to_message_id="", group_id="",
                            created_at=time.time(), ttl=600.0, message_type="query")
            return app(Message(content=content, metadata=meta), ctx)

        def entries() -> list[dict]:
            return [json.loads(x) for x in home.ledger_path.read_text().splitlines() if x.strip()]

        def refused(reply: Message) -> None:
            before = refused.n
            err = reply.content.config_records.get(RecordKey.ERROR)
            assert err is not None and int(err["code"]) == int(NodeErrorCode.OUT_OF_ORDER), list(reply.content.keys())
            assert set(reply.content.keys()) <= {RecordKey.ERROR, RecordKey.RELEASES}
            new = entries()[before:]
            assert [e["kind"] for e in new] == ["refusal"]
            refused.n = len(entries())

        refused.n = 0
        releases = lambda: sum(e["kind"] == "release" for e in entries())  # noqa: E731
        refused(send({"fedcollab.kind": "secagg", "secagg.stage": "advertise", "secagg.round": 1}))  # before the query
        ok = send({"fedcollab.kind": "analytics.query", "query": query})
        assert RecordKey.ERROR not in ok.content.config_records and releases() == 1
        refused.n = len(entries())
        refused(send({"fedcollab.kind": "analytics.query", "query": query}))  # a second release in one run
        refused(send({"fedcollab.kind": "analytics.profile", "epsilon": 1.0, "delta": 1e-6}))
        refused(send({"fedcollab.kind": "secagg", "secagg.stage": "advertise", "secagg.round": 2}))  # another round
        refused(send({"fedcollab.kind": "analytics.check", "query": query}, run="another-run"))
        assert releases() == 1  # nothing more released


class TestHeResume:
    """A resumed HE run reloads the run's key from the node's folder (stage `rejoin`): only where the node's own setup resumed, once,
    and the node still checks that the checkpointed aggregate holds its own upload (attack 6) in the new Flower run."""

    def _resumed(self, node: Node, run: int) -> None:
        node.context = Context(run_id=run, node_id=7, node_config={"partner": PARTNER}, state=RecordDict(), run_config={})
        reply = node.send("query", {"fedcollab.kind": "setup", "scaling": "public_bounds", "fedcollab.resume_after": 1})
        assert RecordKey.ERROR not in reply.content.config_records

    def _install_key(self, node: Node):
        from fedcollab.core import write_private
        from fedcollab.crypto import new_secret_context
        from fedcollab.node._he import he_dir, params_of

        ctx = new_secret_context(params_of(node.spec))
        write_private(he_dir(node.home.root) / f"{RUN}.ctx", ctx.secret_bytes())  # as `install` left it in the interrupted run
        return ctx

    def test_rejoin_only_in_a_resumed_run_with_the_key_once(self, tmp_path):
        node = Node(_spec("heart-disease-he.toml"), tmp_path)
        _setup(node)
        ctx = self._install_key(node)
        rejoin = {"fedcollab.kind": "he", "he.stage": "rejoin"}
        before = len(node.entries())
        node.rejected(node.send("query", rejoin), NodeErrorCode.BAD_REQUEST, before)  # this run did not resume
        self._resumed(node, 2)
        reply = node.send("query", rejoin)
        assert str(reply.content.config_records["he"]["fingerprint"]) == ctx.fingerprint
        assert "public_context" not in reply.content.config_records["he"]  # hungary is not the key holder
        custody = [e for e in node.entries() if e["kind"] == "key_custody"]
        assert len(custody) == 1 and custody[0]["body"]["fingerprint"] == ctx.fingerprint and "reloaded" in custody[0]["body"]["event"]
        before = len(node.entries())
        node.rejected(node.send("query", rejoin), NodeErrorCode.BAD_REQUEST, before)  # a second reload
        (node.home.root / "he" / f"{RUN}.ctx").unlink()
        self._resumed(node, 3)
        before = len(node.entries())
        node.rejected(node.send("query", rejoin), NodeErrorCode.BAD_REQUEST, before)  # no key for this run in the folder

    def test_own_upload_still_required_after_the_resume(self, tmp_path):
        """The node's round-1 upload hash is kept in its folder: a checkpointed round-1 aggregate without it is refused
        (BAD_MODEL_UPDATE) in the resumed run, before any training, although the new Flower context knows nothing of round 1."""
        from fedcollab.crypto import aggregate_message, sign
        from fedcollab.node._he import my_upload, record_upload

        node = Node(_spec("heart-disease-he.toml"), tmp_path)
        _setup(node)
        ctx = self._install_key(node)
        record_upload(node.home.root, RUN, 1, "ab" * 32)  # what train of round 1 recorded in the interrupted run
        record_upload(node.home.root, RUN, 2, "ef" * 32)  # round 2, interrupted: it runs again after the resume
        self._resumed(node, 2)
        node.send("query", {"fedcollab.kind": "he", "he.stage": "rejoin"})
        assert my_upload(node.home.root, RUN, 1) == "ab" * 32 and my_upload(node.home.root, RUN, 2) is None
        cts = ctx.encrypt(np.zeros(8, dtype=np.int64))
        included = sorted(f"{p}:{'cd' * 32}" for p in ("cleveland", "switzerland", "va-long-beach", "x"))
        coordinator = NodeHome(tmp_path / "coord").key()
        agg = {"ct": cts, "round": 1, "included": included,
               "signature": sign(coordinator, aggregate_message(run_id=RUN, round_=1, ciphertexts=cts, included=included))}
        before = len(node.entries())
        reply = node.send("train", {"server-round": 2, "he.total_rows": 1e6, **_scaling(node.spec)}, extra={"he.aggregate": agg})
        node.rejected(reply, NodeErrorCode.BAD_MODEL_UPDATE, before)


class TestOneClientApp:
    """``make_client_app`` is the node's one ClientApp: each message goes to its protocol's adapter, only if the run offers it."""

    QUERY = {"name": "rows", "epsilon": 1.0, "delta": 1e-6, "statistics": [{"kind": "count"}]}

    def test_a_statistics_query_to_a_training_node_is_refused(self, plain):
        """Deployment builds the app without statistics: an analytics query (even after setup) is refused, recorded, nothing answered."""
        for at_setup in (False, True):
            if at_setup:
                _setup(plain)
            for cfg in ({"fedcollab.kind": "analytics.query", "query": json.dumps(self.QUERY)},
                        {"fedcollab.kind": "analytics.profile", "epsilon": 1.0, "delta": 1e-5},
                        {"fedcollab.kind": "vertical", "vertical.stage": "hello"}):
                before = len(plain.entries())
                new = plain.refused(plain.send("query", cfg), NodeErrorCode.BAD_REQUEST, before)
                assert "does not answer" in new[-1]["body"]["reason"]
        assert not any(e["kind"] == "release" and e["body"]["release"]["kind"].startswith("query") for e in plain.entries())

    def test_with_statistics_the_same_app_answers_both_protocols(self, tmp_path):
        """The simulation's app (``statistics=True``): a statistics check goes to the statistics adapter, setup to the training one."""
        node = Node(_spec("heart-disease-dp.toml"), tmp_path)  # a budget for the query
        roster = {PARTNER: node.home.public_key(), "coordinator": public_key_hex(NodeHome(tmp_path / "coord").key())}
        node.app = make_client_app(node.spec, {PARTNER: str(node.home.root)}, roster, statistics=True)
        reply = node.send("query", {"fedcollab.kind": "analytics.check", "query": json.dumps(self.QUERY)})
        info = reply.content.config_records[RecordKey.INFO]
        assert RecordKey.ERROR not in reply.content.config_records and int(info["length"]) >= 1 and "min_group_size" in info
        with pytest.warns(Warning, match="delta"):  # the DP spec's budget warns for 172 rows
            assert RecordKey.INFO in _setup(node).content.config_records
