"""Issue 13, attacks 3 and 4, replayed against the pure SecAgg+ stages and the node's analytics runtime.

Attack 3: a coordinator tells different nodes different survivor sets (each within the limits a
node checked on its own), n = 10, t = 5, t_min = 6, to unmask the sum of two inputs only.
Attack 4: a coordinator sizes an analytics query's noise for more honest partners than the sum holds.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import CryptoError, NodeErrorCode, ProtocolError
from fedcollab.crypto import combine_shares, expand_mask, load_private, share_from_bytes
from fedcollab.protocols import secagg

NAMES = tuple(f"n{i}" for i in range(10))
T, T_MIN, LENGTH = 5, 6, 64
G1, G2 = NAMES[:5], NAMES[5:]
A, B = "n0", "n5"  # the pair whose sum the coordinator wants alone
S1, S2 = tuple(sorted({*G1, B})), tuple(sorted({*G2, A}))  # |S1| = |S2| = 6 >= t_min


@pytest.fixture(scope="module")
def keys():
    return {n: Ed25519PrivateKey.generate() for n in NAMES}


def through_masked(keys):
    """Every node honest up to its masked input (complete graph, t = 5, max_dropouts = 4)."""
    cfg = secagg.SecAggConfig(run_id="attack-3", round=1, participants=NAMES, k=9, threshold=T, max_dropouts=4, bits=32, length=LENGTH)
    roster = {n: k.public_key() for n, k in keys.items()}
    rng = np.random.default_rng(3)
    x = {n: rng.integers(0, 2**20, size=LENGTH, dtype=np.uint32) for n in NAMES}
    coord, _ = secagg.coord_start(cfg, roster)
    nodes, ads = {}, {}
    for n in NAMES:
        nodes[n], ads[n] = secagg.node_advertise(cfg, secagg.NodeIdentity(name=n, signing_key=keys[n]))
    coord, to_nodes = secagg.coord_collect_advertisements(coord, ads)
    bundles = {}
    for n in NAMES:
        nodes[n], bundles[n] = secagg.node_share(nodes[n], to_nodes[n], roster)
    coord, routed = secagg.coord_route_shares(coord, bundles)
    masked = {}
    for n in NAMES:
        nodes[n], masked[n] = secagg.node_masked_input(nodes[n], routed[n], x[n])
    return SimpleNamespace(cfg=cfg, roster=roster, x=x, coord=coord, nodes=nodes, masked=masked)


def split_view(r, keys):
    """The coordinator shows G1 the set S1 and G2 the set S2; each group signs its own set."""
    states, sigs = {}, {}
    for group, shown in ((G1, S1), (G2, S2)):
        for w in group:
            req = secagg.ConsistencyRequest(run_id=r.cfg.run_id, round=1, recipient=w, survivors=shown)
            states[w], sig = secagg.node_consistency(r.nodes[w], req, secagg.NodeIdentity(name=w, signing_key=keys[w]))
            sigs[w] = sig.signature
    return states, sigs


def lying_request(r, w, shown, sigs):
    held = r.nodes[w].held
    return secagg.UnmaskRequest(run_id=r.cfg.run_id, round=1, recipient=w,
                                survivors=tuple(v for v in sorted(held) if v in shown),
                                dropped=tuple(v for v in sorted(held) if v not in shown),
                                signed_survivors=shown, signatures=sigs)


def sum_of_pair(r, reveals):
    """What the coordinator computes from the reveals: x_A + x_B, if the shares suffice."""
    cfg = r.cfg
    b_pts = {n: {} for n in NAMES}
    s_pts = {n: {} for n in NAMES}
    for msg in reveals:
        for owner, raw in msg.b_shares.items():
            b_pts[owner][cfg.x_of(msg.node)] = share_from_bytes(raw)
        for owner, raw in msg.s_shares.items():
            s_pts[owner][cfg.x_of(msg.node)] = share_from_bytes(raw)
    total = (r.masked[A].vector + r.masked[B].vector).astype(np.uint32)
    for u in (A, B):
        total -= expand_mask(combine_shares(b_pts[u], threshold=T, length=32), LENGTH, dtype=np.uint32)
    for v in NAMES:
        if v in (A, B):
            continue
        s_sk = combine_shares(s_pts[v], threshold=T, length=32)
        assert secagg.public_bytes(load_private(s_sk)) == r.coord.keys[v][1]
        for u in (A, B):
            mask = secagg._pair_mask(cfg, s_sk, r.coord.keys[u][1], v, u)
            total = total - mask if u < v else total + mask
    return total


class TestAttack3SplitSurvivorSets:
    def test_the_split_view_is_within_every_per_node_limit(self, keys):
        """Each node is told at least t surviving neighbours and a set of t_min = 6: the old checks passed."""
        r = through_masked(keys)
        for group, shown in ((G1, S1), (G2, S2)):
            for w in group:
                req = lying_request(r, w, shown, {})
                assert len(req.survivors) >= T and 1 + len(req.survivors) >= T_MIN and len(shown) >= T_MIN

    def test_with_a_quorum_of_only_t_the_attack_recovers_the_pair_sum(self, keys, monkeypatch):
        """Why t signatures are not enough when 2t <= n: two groups of t each sign their own set; x_A + x_B leaks."""
        r = through_masked(keys)
        states, sigs = split_view(r, keys)
        monkeypatch.setattr(secagg, "consistency_quorum", lambda cfg: cfg.threshold)
        reveals = []
        for group, shown in ((G1, S1), (G2, S2)):
            mine = {w: sigs[w] for w in group}
            for w in group:
                reveals.append(secagg.node_unmask(states[w], lying_request(r, w, shown, mine), r.roster)[1])
        assert np.array_equal(sum_of_pair(r, reveals), (r.x[A] + r.x[B]).astype(np.uint32))

    def test_no_node_reveals_under_the_split_view(self, keys):
        """With the majority quorum (6 of 10) neither group's 5 signatures suffice: every node refuses, nothing leaks."""
        r = through_masked(keys)
        states, sigs = split_view(r, keys)
        reveals = []
        for group, shown in ((G1, S1), (G2, S2)):
            mine = {w: sigs[w] for w in group}
            for w in group:
                with pytest.raises(CryptoError, match="fewer than the quorum"):
                    secagg.node_unmask(states[w], lying_request(r, w, shown, mine), r.roster)
                with pytest.raises(CryptoError, match="does not verify"):  # all ten signatures: half are on the other set
                    secagg.node_unmask(states[w], lying_request(r, w, shown, sigs), r.roster)
                assert states[w].held  # nothing erased, nothing revealed
        with pytest.raises(CryptoError, match="fewer than t"):
            sum_of_pair(r, reveals)

    def test_a_node_signs_once(self, keys):
        """A second consistency request (another set) is refused: an honest node never signs two sets of one round."""
        r = through_masked(keys)
        states, _ = split_view(r, keys)
        again = secagg.ConsistencyRequest(run_id=r.cfg.run_id, round=1, recipient="n1", survivors=S2)
        with pytest.raises(ProtocolError, match="out of order"):
            secagg.node_consistency(states["n1"], again, secagg.NodeIdentity(name="n1", signing_key=keys["n1"]))

    def test_unmask_without_the_consistency_stage_is_refused(self, keys):
        """The pre-fix attack: lying unmask requests straight after the masked inputs; every node refuses, out of order."""
        r = through_masked(keys)
        for group, shown in ((G1, S1), (G2, S2)):
            for w in group:
                with pytest.raises(ProtocolError, match="at stage 'consistency'"):
                    secagg.node_unmask(r.nodes[w], lying_request(r, w, shown, {}), r.roster)

    def test_honest_signatures_cannot_be_reused_for_lying_lists(self, keys):
        """All ten sign the true set; lists telling G2 that G1's members dropped do not match it: refused."""
        from fedcollab.node._secagg import handle_stage  # the node's own stage handler, as the ClientApp calls it

        r = through_masked(keys)
        coord, checks = secagg.coord_collect_masked(r.coord, r.masked)
        states, sigs = {}, {}
        for n in NAMES:
            states[n], sigs[n] = secagg.node_consistency(r.nodes[n], checks[n], secagg.NodeIdentity(name=n, signing_key=keys[n]))
        coord, requests = secagg.coord_collect_signatures(coord, sigs)
        w = "n7"
        lie = replace(requests[w], survivors=tuple(v for v in requests[w].survivors if v not in G1),
                      dropped=tuple(v for v in requests[w].survivors if v in G1))
        with pytest.raises(ProtocolError, match="do not match the signed survivor set"):
            secagg.node_unmask(states[w], lie, r.roster)
        spec = SimpleNamespace()  # handle_stage reads the spec only at ADVERTISE
        with pytest.raises(ProtocolError, match="do not match"):
            handle_stage("unmask", lie.to_wire(), vector=None, length=LENGTH, bits=32, round_=1, state_wire=states[w].to_wire(),
                         spec=spec, me=w, run_id=r.cfg.run_id, identity=secagg.NodeIdentity(name=w, signing_key=keys[w]),
                         roster_keys=r.roster, min_partners=3)
        # The honest request is still answered (the refusals changed nothing): b-shares of all nine others.
        _, reply = secagg.node_unmask(states[w], requests[w], r.roster)
        assert sorted(reply.b_shares) == [n for n in NAMES if n != w] and not reply.s_shares

    def test_unmask_request_without_signatures_is_refused_at_the_node(self, keys):
        """An unmask request of the old wire format (no signed set, no signatures) is refused when parsed."""
        r = through_masked(keys)
        wire = lying_request(r, "n1", S1, {}).to_wire()
        for key in ("signed_survivors", "signers", "signatures"):
            wire.pop(key)
        with pytest.raises(ProtocolError, match="field `signed_survivors` is missing"):
            secagg.UnmaskRequest.from_wire(wire)


# --------------------------------------------------------------------------- attack 4


@pytest.fixture()
def three_party(heart_spec):
    return heart_spec.model_copy(update={"partners": heart_spec.partners[:3]})


def _analytics_node(spec, tmp_path, partner="cleveland", epsilon=8.0):
    from fedcollab.node import init_node_home
    from fedcollab.node._analytics import NodeAnalytics
    from fedcollab.spec import BudgetSpec, NodePolicy

    policy = NodePolicy(partner=partner, budgets=[BudgetSpec(dataset=partner, epsilon=epsilon, delta=1e-5)])
    home = init_node_home(tmp_path / partner, partner=partner, policy=policy)
    return NodeAnalytics(spec, partner, home=home, run_id="run-attack-4")


def _entries(node):
    return [json.loads(x) for x in node.gate.ledger.path.read_text().splitlines()]


class TestAttack4InflatedHonestCount:
    def test_the_inflated_count_would_release_more_than_charged(self, three_party):
        """The attack's effect: noise sized for 4 honest shares, summed over 3, spends more than the ε charged."""
        from fedcollab.privacy.accounting import compute_epsilon
        from fedcollab.protocols.query import plan_query, query_zcdp
        from fedcollab.spec import parse_query

        q = parse_query({"statistics": [{"kind": "count"}], "epsilon": 2.0, "delta": 1e-6})
        plan = plan_query(q, three_party.data_schema, n_honest=4)
        actual = query_zcdp(n_blocks=plan.layout.n_blocks, sigma=plan.sigma * math.sqrt(3 / 4), n_honest=3, d=plan.layout.length)
        charged = compute_epsilon([plan.mechanism], delta=1e-6, accountant="rdp").epsilon
        released = compute_epsilon([actual], delta=1e-6, accountant="rdp").epsilon
        assert charged <= 2.0 < released

    @pytest.mark.parametrize("via", ["query", "request"])
    def test_refused_at_the_node_budget_unchanged(self, three_party, tmp_path, via):
        """min_honest = 4 in the query, or n_honest = 4 claimed by the request, on a 3-party spec: coded refusal, no release."""
        from fedcollab.node._analytics import _code_for
        from fedcollab.protocols.ddg import ddg_generator
        from fedcollab.spec import parse_query

        node = _analytics_node(three_party, tmp_path)
        body = {"statistics": [{"kind": "count"}], "epsilon": 2.0, "delta": 1e-6}
        if via == "query":
            q, claim, code = parse_query({**body, "min_honest": 4}), None, NodeErrorCode.TOO_FEW_PARTICIPANTS
        else:
            q, claim, code = parse_query(body), 4, NodeErrorCode.BAD_REQUEST
        for call in (lambda: node.check_query(q, n_honest=claim),
                     lambda: node.answer_query(q, n_honest=claim, n_parties=3, generator=ddg_generator())):
            with pytest.raises(ProtocolError) as exc:
                call()
            assert _code_for(exc.value) == code
        entries = _entries(node)  # refusals only: no release, nothing charged
        assert [e["kind"] for e in entries] == ["refusal", "refusal"] and {e["body"]["code"] for e in entries} == {int(code)}

    def test_refused_at_unmask_when_the_signed_set_is_smaller(self, heart_spec, tmp_path):
        """min_honest = 4 of 4 partners is accepted, but a signed survivor set of 3 is refused at unmask (code 133)."""
        from fedcollab.node._analytics import _code_for
        from fedcollab.spec import parse_query

        node = _analytics_node(heart_spec, tmp_path)
        q = parse_query({"statistics": [{"kind": "count"}], "epsilon": 2.0, "delta": 1e-6, "min_honest": 4})
        assert node.honest_minimum(q) == 4
        node.check_sum_size(4, n_honest=4)
        with pytest.raises(ProtocolError) as exc:
            node.check_sum_size(3, n_honest=4)
        assert _code_for(exc.value) == NodeErrorCode.TOO_FEW_PARTICIPANTS
        assert [e["body"]["code"] for e in _entries(node)] == [int(NodeErrorCode.TOO_FEW_PARTICIPANTS)]

    def test_default_is_the_threshold_of_the_node_spec(self, heart_spec, tmp_path):
        """Without min_honest the node uses its own spec's secagg threshold, as the coordinator's default does."""
        from fedcollab.coordinator._analytics import default_n_honest
        from fedcollab.spec import parse_query

        node = _analytics_node(heart_spec, tmp_path)
        q = parse_query({"statistics": [{"kind": "count"}], "epsilon": 1.0})
        assert node.honest_minimum(q) == default_n_honest(heart_spec, q) == heart_spec.secagg.resolved_threshold(4)


# --------------------------------------------------------------------------- the real drivers, in-process


@pytest.fixture(scope="module")
def secagg_spec():
    from fedcollab.spec import load_spec
    from tests.conftest import ROOT

    return load_spec(ROOT / "specs" / "heart-disease-secagg.toml")


class TestDriversWithDropouts:
    """The coordinator's ``secure_sum`` driving the nodes' ``handle_stage`` through plain functions (no Flower)."""

    def _run(self, spec, drop):
        from fedcollab.coordinator._secagg import secure_sum
        from fedcollab.node._secagg import handle_stage

        names = [p.name for p in spec.partners]
        keys = {n: Ed25519PrivateKey.generate() for n in names}
        roster = {n: k.public_key().public_bytes_raw().hex() for n, k in keys.items()}
        rng = np.random.default_rng(1)
        x = {n: rng.integers(0, 2**20, size=5, dtype=np.uint32) for n in names}
        states: dict[str, dict] = {}

        def send(stage, requests):
            replies = {}
            for p, req in requests.items():
                if p in drop.get(stage, ()):
                    continue  # a missing reply: a dropout at this stage
                states[p], replies[p] = handle_stage(
                    stage, req, vector=x[p] if stage == "masked" else None, length=5, bits=32, round_=1, state_wire=states.get(p),
                    spec=spec, me=p, run_id="run-d", identity=secagg.NodeIdentity(name=p, signing_key=keys[p]), roster_keys=roster,
                    min_partners=2)
            return replies

        total, summed = secure_sum(spec, run_id="run-d", round_=1, participants=names, length=5, bits=32, roster_keys=roster, send=send)
        return total, summed, x

    @pytest.mark.parametrize("stage", ["share", "masked", "consistency", "unmask"])
    def test_one_dropout_at_each_stage(self, secagg_spec, stage):
        """One of four partners silent at any stage (the consistency stage included): the right sum still comes out."""
        total, summed, x = self._run(secagg_spec, {stage: ["hungary"]})
        in_sum = [n for n in x if n != "hungary"] if stage in ("share", "masked") else list(x)
        assert summed == sorted(in_sum)
        expected = np.zeros(5, dtype=np.uint32)
        for n in in_sum:
            expected += x[n]
        assert np.array_equal(total, expected)

    def test_two_silent_at_consistency_abort_before_any_reveal(self, secagg_spec):
        """Two of four signatures missing (quorum 3): the coordinator aborts; no unmask request is sent."""
        with pytest.raises(ProtocolError, match="fewer than t"):
            self._run(secagg_spec, {"consistency": ["hungary", "switzerland"]})
