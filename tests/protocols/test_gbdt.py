"""Federated GBDT protocol core: binning, histograms, splits, DP, secagg encoding, XGBoost export, spec."""

from __future__ import annotations

import copy
import dataclasses
import math
import tomllib

import numpy as np
import pytest

from fedcollab.core import ProtocolError, SpecError
from fedcollab.data import load_partner_data
from fedcollab.privacy.accounting import compute_epsilon
from fedcollab.protocols.gbdt import (
    HistogramReply,
    LevelRequest,
    Tree,
    best_split,
    bin_rows,
    build_histograms,
    decode_histograms,
    encode_histograms,
    layout_from_bounds,
    checkpoint_arrays,
    from_checkpoint,
    layout_from_schema,
    leaf_sums,
    leaf_value,
    node_apply_tree,
    node_init,
    node_reply,
    node_resume,
    plan_gbdt_dp,
    planned_releases,
    split_gain,
    sum_histograms,
    train_in_process,
    tree_releases,
    write_xgboost_json,
)
from fedcollab.spec import GbdtSpec, load_spec, parse_spec, tree_params
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def spec():
    return load_spec(ROOT / "specs" / "heart-disease-gbdt.toml")


@pytest.fixture(scope="module")
def dp_spec():
    return load_spec(ROOT / "specs" / "heart-disease-gbdt-dp.toml")


@pytest.fixture(scope="module")
def heart(spec):
    return [load_partner_data(spec, p.name) for p in spec.partners]


@pytest.fixture(scope="module")
def layout(spec):
    return layout_from_schema(spec.data_schema, n_bins=tree_params(spec).n_bins)


def _partners(heart):
    return [(d.partner, d.x_train, d.y_train) for d in heart]


def _params(spec, **kw):
    return dataclasses.replace(tree_params(spec), **kw)


def _test_rows(heart):
    return np.concatenate([d.x_test for d in heart]), np.concatenate([d.y_test for d in heart])


class TestBinning:
    def test_edges_from_public_bounds(self, layout, spec):
        """Number features get n_bins equal-width bins over the schema bounds; 0/1 features one edge at 0.5."""
        names = list(layout.feature_names)
        age = layout.edges[names.index("age")]
        assert age.size == 31 and age[0] == pytest.approx(18 + 82 / 32, rel=1e-6) and age[-1] < 100
        assert list(layout.edges[names.index("sex=Male")]) == [0.5]
        assert layout.n_slots == sum(e.size + 2 for e in layout.edges)

    def test_float32_rule_and_missing_bin(self):
        """x == edge falls in the upper bin (XGBoost's x < threshold goes left); NaN in the missing bin."""
        lay = layout_from_bounds(["a"], np.array([[0.0, 1.0]]), n_bins=4, binary=[False])
        b = bin_rows(np.array([[0.0], [0.25], [np.nextafter(np.float32(0.25), np.float32(0))], [0.99], [np.nan]]), lay)
        assert b[:, 0].tolist() == [0, 1, 0, 3, 4]

    def test_bad_rows_named(self, layout):
        """Rows of the wrong width are refused, naming the expected shape."""
        with pytest.raises(ProtocolError, match=r"shape \(n, 13\)"):
            bin_rows(np.zeros((3, 2)), layout)


class TestHistograms:
    def test_against_numpy_loops(self):
        """Per-node, per-feature, per-bin sums equal a plain loop over rows."""
        rng = np.random.default_rng(1)
        lay = layout_from_bounds(["a", "b", "c"], np.array([[0, 1], [-1, 1], [0, 1]]), n_bins=5, binary=[False, False, True])
        x = rng.uniform(-1, 1, size=(200, 3))
        x[rng.random((200, 3)) < 0.1] = np.nan
        bins = bin_rows(x, lay)
        g, h = rng.normal(size=200), rng.uniform(0, 0.25, size=200)
        pos = rng.integers(-1, 3, size=200)
        hist = build_histograms(bins, g, h, pos, n_open=3, layout=lay)
        ref = np.zeros_like(hist)
        for i in range(200):
            if pos[i] < 0:
                continue
            for j in range(3):
                ref[pos[i], lay.offsets[j] + bins[i, j]] += (g[i], h[i])
        np.testing.assert_allclose(hist, ref, atol=1e-12)
        np.testing.assert_allclose(leaf_sums(g, h, pos, n_leaves=3), ref[:, : lay.n_bins[0] + 1].sum(axis=1), atol=1e-12)

    def test_sum_checks_shapes(self):
        """The coordinator refuses histograms of different shapes."""
        with pytest.raises(ProtocolError, match="histogram 1 has shape"):
            sum_histograms([np.zeros((1, 4, 2)), np.zeros((2, 4, 2))])


class TestSplit:
    P = GbdtSpec(reg_lambda=1.0, min_child_weight=0.0, learning_rate=0.5).resolved(record_dp=False)

    def _hist(self, miss):
        # one feature with 2 value bins: bin 0 (G=-4, H=2), bin 1 (G=6, H=3), then the missing bin
        return np.array([[-4.0, 2.0], [6.0, 3.0], miss])

    def test_gain_hand_computed(self):
        """gain = 1/2 [GL²/(HL+λ) + GR²/(HR+λ) − G²/(H+λ)] − γ."""
        assert float(split_gain(-4, 2, 6, 3, reg_lambda=1.0, gamma=0.0)) == pytest.approx(0.5 * (16 / 3 + 36 / 4 - 4 / 6))
        assert float(split_gain(-4, 2, 6, 3, reg_lambda=1.0, gamma=2.0)) == pytest.approx(0.5 * (16 / 3 + 36 / 4 - 4 / 6) - 2)

    def test_missing_direction_learned(self):
        """Missing rows go where the gain is higher: left for G_m = -3, right for G_m = +3."""
        lay = layout_from_bounds(["a"], np.array([[0.0, 1.0]]), n_bins=2, binary=[False])
        s = best_split(self._hist([-3.0, 1.0]), node=0, layout=lay, params=self.P)
        assert s.default_left and s.gain == pytest.approx(0.5 * (49 / 4 + 36 / 4 - 1 / 7))
        s = best_split(self._hist([3.0, 1.0]), node=0, layout=lay, params=self.P)
        assert not s.default_left and s.gain == pytest.approx(0.5 * (16 / 3 + 81 / 5 - 25 / 7))
        assert s.threshold == 0.5 and s.left == (-4.0, 2.0) and s.right == (9.0, 4.0)

    def test_min_child_weight_and_gamma_stop(self):
        """No split when a child's hessian is below min_child_weight, or when gamma eats the gain."""
        lay = layout_from_bounds(["a"], np.array([[0.0, 1.0]]), n_bins=2, binary=[False])
        assert best_split(self._hist([0.0, 0.0]), node=0, layout=lay, params=dataclasses.replace(self.P, min_child_weight=2.5)) is None
        assert best_split(self._hist([0.0, 0.0]), node=0, layout=lay, params=dataclasses.replace(self.P, gamma=7.0)) is None

    def test_leaf_value(self):
        """-G/(H+λ)·lr, float32; a noisy negative H is clamped at 0."""
        assert leaf_value(-4.0, 3.0, self.P) == pytest.approx(0.5)
        assert leaf_value(2.0, -5.0, self.P) == pytest.approx(-1.0)


class TestFederatedEqualsCentral:
    def test_one_tree_equals_pooled(self, heart, layout, spec):
        """Summing the 4 hospitals' histograms grows the same tree as the pooled rows binned alike."""
        p = _params(spec, n_trees=3)
        fed = train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model
        pooled = [("all", np.concatenate([d.x_train for d in heart]), np.concatenate([d.y_train for d in heart]))]
        cen = train_in_process(pooled, layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model
        for a, b in zip(fed.trees, cen.trees):
            assert (a.left, a.feature, a.bin_index, a.default_left) == (b.left, b.feature, b.bin_index, b.default_left)
            np.testing.assert_allclose(a.value, b.value, rtol=1e-6)
        assert fed.trees[0].n_nodes > 3  # a real tree, not a stump

    def test_federated_equals_xgboost_exact_on_the_same_bins(self, heart, layout, spec):
        """An independent reference: XGBoost's exact greedy algorithm on the pooled bin indices grows the same trees.

        The four hospitals' rows get 5 % missing values; XGBoost sees each row's bin index (NaN
        for the missing bin) with the same lambda, min child weight, eta and base score.
        """
        xgb = pytest.importorskip("xgboost")
        rng = np.random.default_rng(0)
        parts = []
        for d in heart:
            x = d.x_train.copy()
            x[rng.random(x.shape) < 0.05] = np.nan
            parts.append((d.partner, x, d.y_train))
        p = _params(spec, n_trees=5)
        fed = train_in_process(parts, layout=layout, params=p, plan=None, coordinator_rng=rng).model
        x = np.concatenate([q[1] for q in parts])
        y = np.concatenate([q[2] for q in parts])
        b = bin_rows(x, layout).astype(np.float64)
        b[b == layout.n_bins[None, :]] = np.nan
        params = {"objective": "binary:logistic", "tree_method": "exact", "max_depth": p.max_depth, "eta": p.learning_rate,
                  "lambda": p.reg_lambda, "min_child_weight": p.min_child_weight, "base_score": p.base_score, "gamma": 0.0}
        ref = xgb.train(params, xgb.DMatrix(b, label=y), p.n_trees)
        assert sum(np.isnan(x).any(axis=1)) > 100
        np.testing.assert_allclose(ref.predict(xgb.DMatrix(b)), fed.predict_proba(x), atol=1e-6, rtol=0)

    def test_default_direction_on_data(self):
        """Rows missing feature a are all positive: the learned default sends them to a positive leaf."""
        rng = np.random.default_rng(3)
        x = rng.uniform(0, 1, size=(400, 1))
        y = (x[:, 0] > 0.7).astype(float)
        x[:50, 0], y[:50] = np.nan, 1.0
        lay = layout_from_bounds(["a"], np.array([[0.0, 1.0]]), n_bins=8, binary=[False])
        p = GbdtSpec(n_trees=1, max_depth=1).resolved(record_dp=False)
        t = train_in_process([("n", x, y)], layout=lay, params=p, plan=None, coordinator_rng=rng).model.trees[0]
        leaf = t.leaf_of_rows(np.array([[np.nan], [0.1]]))
        assert t.value[leaf[0]] > 0 > t.value[leaf[1]]


class TestSecAgg:
    def test_encoded_sum_equals_plain(self, heart, layout, spec):
        """Fixed-point histograms summed modulo 2^64 (and by a real SecAgg+ round) decode to the plain sum (error <= n · 0.5 / scale)."""
        p = tree_params(spec)
        req = LevelRequest(tree=0, level=0, release="histogram", open=(0,))
        hists = []
        for d in heart:
            st = node_init(d.x_train, d.y_train, layout=layout, base_score=p.base_score)
            hists.append(node_reply(st, req, party=d.partner, layout=layout, params=p, plan=None, rng=None)[1].values)
        scale = 2.0**24
        encoded = {d.partner: encode_histograms(hst, bound=400.0, scale=scale, n_parties=4) for d, hst in zip(heart, hists)}
        total = np.zeros(hists[0].size, dtype=np.uint64)
        for v in encoded.values():
            total += v
        np.testing.assert_allclose(decode_histograms(total, shape=hists[0].shape, scale=scale), sum_histograms(hists), atol=4 * 0.5 / scale)
        # the same vectors through a real SecAgg+ round (complete graph, one dropout tolerated)
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fedcollab.protocols import secagg

        names = tuple(encoded)
        cfg = secagg.SecAggConfig(run_id="gbdt", round=0, participants=names, k=3, threshold=2, max_dropouts=1, bits=64, length=hists[0].size)
        masked_total, _ = secagg.run_round_in_memory(encoded, cfg=cfg, signing_keys={n: Ed25519PrivateKey.generate() for n in names})
        assert np.array_equal(masked_total, total)

    def test_headroom_and_bound_refused(self):
        """A scale without headroom, or a cell beyond the public bound, is refused (never clipped)."""
        with pytest.raises(ProtocolError, match="no headroom"):
            encode_histograms(np.ones(3), bound=1e7, scale=2.0**40, n_parties=4, bits=64)
        with pytest.raises(ProtocolError, match="exceeds the public bound"):
            encode_histograms(np.array([5.0]), bound=4.0, scale=2.0**20, n_parties=4)

    def test_training_under_secagg_same_trees(self, heart, layout, spec):
        """Trees grown from secagg-decoded sums equal the plain ones."""
        p = _params(spec, n_trees=2)
        a = train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model
        b = train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0), secagg=True).model
        assert [t.feature for t in a.trees] == [t.feature for t in b.trees]
        np.testing.assert_allclose([t.value for t in a.trees], [t.value for t in b.trees], atol=1e-5)


class TestXGBoostExport:
    @pytest.mark.parametrize("base_score", [0.5, 0.3])
    def test_xgboost_predicts_the_same(self, heart, layout, spec, tmp_path, base_score):
        """xgboost.Booster loads model.json and predicts fedcollab's probabilities to 1e-6, missing values included."""
        xgb = pytest.importorskip("xgboost")
        p = _params(spec, base_score=base_score)
        model = train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model
        sha = write_xgboost_json(model, tmp_path / "model.json")
        assert len(sha) == 64
        booster = xgb.Booster(model_file=str(tmp_path / "model.json"))
        assert booster.feature_names == list(layout.feature_names) and booster.num_boosted_rounds() == 50
        x, _ = _test_rows(heart)
        x = x.copy()
        x[::3, 2] = np.nan
        x[::4, 7] = np.nan
        x[1::5, 1] = np.nan
        dm = xgb.DMatrix(x, feature_names=list(layout.feature_names))
        np.testing.assert_allclose(booster.predict(dm), model.predict_proba(x), atol=1e-6, rtol=0)
        np.testing.assert_allclose(booster.predict(dm, output_margin=True), model.predict_margin(x), atol=1e-5, rtol=0)

    def test_dp_model_exports_too(self, heart, layout, dp_spec, tmp_path):
        """A DP model (random splits, noisy leaves) loads in XGBoost and predicts the same."""
        xgb = pytest.importorskip("xgboost")
        p = _params(dp_spec, n_trees=5)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        model = train_in_process(_partners(heart), layout=layout, params=p, plan=plan, coordinator_rng=np.random.default_rng(2),
                                 node_rngs=[np.random.default_rng(i) for i in range(4)]).model
        write_xgboost_json(model, tmp_path / "model.json")
        x, _ = _test_rows(heart)
        got = xgb.Booster(model_file=str(tmp_path / "model.json")).predict(xgb.DMatrix(x, feature_names=list(layout.feature_names)))
        np.testing.assert_allclose(got, model.predict_proba(x), atol=1e-6, rtol=0)

    def test_no_dp_model_is_good(self, heart, layout, spec):
        """The default no-DP model reaches a pooled test AUC above 0.86 on Heart."""
        from sklearn.metrics import roc_auc_score

        model = train_in_process(_partners(heart), layout=layout, params=tree_params(spec), plan=None, coordinator_rng=np.random.default_rng(0)).model
        x, y = _test_rows(heart)
        assert roc_auc_score(y, model.predict_proba(x)) >= 0.86


class TestDP:
    @pytest.mark.parametrize("mode", ["random", "histogram"])
    def test_every_release_recorded_and_within_target(self, heart, layout, dp_spec, mode):
        """Every step of every tree is a Gaussian release (unit record, observer coordinator); composed ε <= target."""
        p = _params(dp_spec, dp_split=mode, n_trees=4)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        rngs = [np.random.default_rng(i) for i in range(4)]
        res = train_in_process(_partners(heart), layout=layout, params=p, plan=plan, coordinator_rng=np.random.default_rng(9), node_rngs=rngs)
        levels = p.max_depth if mode == "histogram" else 0
        for party, events in res.releases.items():
            assert len(events) <= p.n_trees * (levels + 1)
            assert all(e.unit == "record" and e.observer == "coordinator" and e.party == party and e.kind == "gbdt_histogram" for e in events)
            assert compute_epsilon([e.mechanism for e in events], delta=1e-3, accountant="rdp").epsilon <= 1.0
        planned = [e.mechanism for t in range(p.n_trees) for e in tree_releases(plan, party="x", tree=t, split_levels=levels)]
        eps = compute_epsilon(planned, delta=1e-3, accountant="rdp").epsilon
        assert eps <= 1.0 and eps > 0.99  # the budget is spent, not wasted
        assert plan.sensitivity_split == pytest.approx(math.sqrt(13 * (1 + 1 / 16)))

    def test_budget_gate_admits_the_plan_and_nothing_more(self, heart, layout, dp_spec, tmp_path):
        """A node's BudgetGate (budget ε = 1) records every planned release and refuses one more; a non-private one is refused."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        from fedcollab.core import BudgetExhausted, PolicyRefused
        from fedcollab.privacy.accounting import BudgetGate, PartyLedger
        from fedcollab.spec import BudgetSpec, NodePolicy

        p = tree_params(dp_spec)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        ledger = PartyLedger(tmp_path / "ledger.jsonl", party="c", key=Ed25519PrivateKey.generate())
        policy = NodePolicy(partner="c", budgets=[BudgetSpec(dataset="c", epsilon=1.0, delta=1e-3)])
        gate = BudgetGate(ledger, policy, dataset="c", nonce_path=tmp_path / "nonces.jsonl")
        for t in range(p.n_trees):
            for e in tree_releases(plan, party="c", tree=t, split_levels=0):
                gate.record(e, run_id="r", payload=b"sums %d" % t)
        extra = tree_releases(plan, party="c", tree=p.n_trees, split_levels=0)[0]
        with pytest.raises(BudgetExhausted):
            gate.record(extra, run_id="r", payload=b"one tree too many")
        with pytest.raises(PolicyRefused):
            gate.record(tree_releases(None, party="c", tree=0, split_levels=0)[0], run_id="r", payload=b"exact sums")

    def test_noise_has_planned_sigma(self, heart, layout, dp_spec):
        """Leaf sums carry Gaussian noise of the planned std (and are not the exact sums)."""
        p = tree_params(dp_spec)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        d = heart[0]
        req = LevelRequest(tree=0, level=0, release="leaves", open=(0,))
        st = node_init(d.x_train, d.y_train, layout=layout, base_score=0.5)
        exact = node_reply(st, req, party="c", layout=layout, params=p, plan=None, rng=None)[1].values
        rng = np.random.default_rng(5)
        noisy = np.stack([node_reply(st, req, party="c", layout=layout, params=p, plan=plan, rng=rng)[1].values for _ in range(400)])
        assert np.std(noisy - exact) == pytest.approx(plan.sigma_leaf, rel=0.1)

    def test_node_refuses_requests_outside_plan(self, heart, layout, dp_spec):
        """Under random splits a histogram is refused; so are a repeated step, a second leaf release and a tree out of order."""
        p = tree_params(dp_spec)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        d = heart[0]
        st = node_init(d.x_train, d.y_train, layout=layout, base_score=0.5)
        rng = np.random.default_rng(0)
        kw = dict(party="c", layout=layout, params=p, plan=plan, rng=rng)
        with pytest.raises(ProtocolError, match="histogram at step 0 is not in the plan"):
            node_reply(st, LevelRequest(tree=0, level=0, release="histogram", open=(0,)), **kw)
        st2, _, _ = node_reply(st, LevelRequest(tree=0, level=0, release="leaves", open=(0,)), **kw)
        with pytest.raises(ProtocolError, match="already answered"):
            node_reply(st2, LevelRequest(tree=0, level=0, release="leaves", open=(0,)), **kw)
        with pytest.raises(ProtocolError, match="expects tree 0"):
            node_reply(st, LevelRequest(tree=3, level=0, release="leaves", open=(0,)), **kw)
        with pytest.raises(ProtocolError, match="takes no further step"):  # a second leaf release of the same tree
            node_reply(st2, LevelRequest(tree=0, level=1, release="leaves", open=(0,)), **kw)

    def test_dp_model_beats_chance(self, heart, layout, dp_spec):
        """At ε = 1 the default DP model is still informative (pooled AUC > 0.7)."""
        from sklearn.metrics import roc_auc_score

        p = tree_params(dp_spec)
        plan = plan_gbdt_dp(p, n_features=layout.n_features, target_epsilon=1.0, delta=1e-3)
        res = train_in_process(_partners(heart), layout=layout, params=p, plan=plan, coordinator_rng=np.random.default_rng(1),
                               node_rngs=[np.random.default_rng(10 + i) for i in range(4)])
        x, y = _test_rows(heart)
        assert roc_auc_score(y, res.model.predict_proba(x)) > 0.7


class TestWire:
    def test_round_trips(self, heart, layout, spec):
        """Requests, replies and trees survive to_wire/from_wire."""
        p = _params(spec, n_trees=1)
        model = train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model
        t = model.trees[0]
        assert Tree.from_wire(t.to_wire()) == t
        req = LevelRequest(tree=0, level=1, release="histogram", open=(1, 2))
        assert LevelRequest.from_wire(req.to_wire()) == req
        rep = HistogramReply(tree=0, level=1, release="leaves", values=np.arange(6.0).reshape(3, 2))
        np.testing.assert_array_equal(HistogramReply.from_wire(rep.to_wire()).values, rep.values)

    def test_malformed_named(self):
        """A bad field is named with what was expected and what came."""
        w = LevelRequest(tree=0, level=0, release="histogram", open=(0,)).to_wire()
        with pytest.raises(ProtocolError, match="`release` must be 'histogram' or 'leaves', got 'rows'"):
            LevelRequest.from_wire({**w, "release": "rows"})
        with pytest.raises(ProtocolError, match="`tree` must be an int >= 0"):
            LevelRequest.from_wire({**w, "tree": "0"})
        r = HistogramReply(tree=0, level=0, release="leaves", values=np.zeros((1, 2))).to_wire()
        with pytest.raises(ProtocolError, match="finite numbers"):
            HistogramReply.from_wire({**r, "values": [0.0, float("nan")]})


class TestSpec:
    @pytest.fixture()
    def raw(self):
        return tomllib.loads((ROOT / "specs" / "heart-disease-gbdt-dp.toml").read_text())

    def _problems(self, data):
        with pytest.raises(SpecError) as exc:
            parse_spec(data)
        return exc.value.problems

    def test_kind_only_validates_with_defaults(self, raw):
        """`kind = "gbdt"` alone (no [training], no tree table) validates; defaults differ with DP."""
        raw = copy.deepcopy(raw)
        raw["model"] = {"kind": "gbdt"}
        raw.pop("training", None)
        s = parse_spec(raw)
        dp = tree_params(s)
        assert (dp.n_trees, dp.max_depth, dp.learning_rate, dp.reg_lambda, dp.dp_split) == (50, 2, 1.0, 500.0, "random")
        raw["privacy"] = {"mode": "none"}
        p = tree_params(parse_spec(raw))
        assert (p.n_trees, p.max_depth, p.learning_rate, p.n_bins, p.reg_lambda, p.min_child_weight) == (50, 3, 0.1, 32, 1.0, 1.0)

    @pytest.mark.parametrize(("field", "value", "expected"), [
        ("n_trees", 0, "greater than or equal to 1; got 0"),
        ("max_depth", 40, "less than or equal to 12; got 40"),
        ("learning_rate", 0.0, "greater than 0; got 0.0"),
        ("n_bins", 1, "greater than or equal to 2; got 1"),
        ("reg_lambda", -1.0, "greater than or equal to 0; got -1.0"),
        ("dp_split", "best", "'random' or 'histogram'; got 'best'"),
        ("trees", 5, "is not a known field (got 5 (int))"),
    ])
    def test_bad_tree_parameters_named(self, raw, field, value, expected):
        """Each bad tree parameter is one problem naming the field, the expectation and the value."""
        raw["model"] = {"kind": "gbdt", "gbdt": {field: value}}
        ps = self._problems(raw)
        assert len(ps) == 1 and ps[0].startswith(f"`model.gbdt.{field}`") and expected in ps[0], ps

    def test_cross_field_refusals(self, raw):
        """A tree table on another kind, HE aggregation and partner-level DP are refused with the reason."""
        bad = copy.deepcopy(raw)
        bad["model"] = {"kind": "logistic_regression", "gbdt": {"n_trees": 5}}
        assert any("[model.gbdt] is only for kind 'gbdt'" in p for p in self._problems(bad))
        bad = copy.deepcopy(raw)
        bad["aggregation"] = "he"
        assert any("not offered with aggregation = 'he'" in p for p in self._problems(bad))



class TestQuantileSketch:
    """``bin_edges = "quantile"``: the count sketch, the edges the coordinator picks, what a node accepts, the DP plan."""

    @pytest.fixture()
    def qspec(self, dp_spec):
        return dp_spec.replace(model={"gbdt": {"bin_edges": "quantile"}})

    def test_edges_sit_at_the_pooled_quantiles(self, spec, heart, layout):
        from fedcollab.protocols.gbdt import edges_from_sketch, layout_from_sketch, sketch_counts, sketch_layout_from_schema

        sk = sketch_layout_from_schema(spec.data_schema)
        assert [layout.feature_names[j] for j in sk.features] == ["age", "trestbps", "chol", "thalch", "oldpeak"]
        # The sum of the nodes' sketches is the sketch of the pooled rows (so the edges do not depend on who holds what).
        pooled = np.concatenate([d.x_train for d in heart])
        total = sum(sketch_counts(d.x_train, sk) for d in heart)
        np.testing.assert_array_equal(total, sketch_counts(pooled, sk))
        n_bins = 8
        idx = edges_from_sketch(total, sk, n_bins=n_bins)
        q = layout_from_sketch(layout, sk, idx, n_bins=n_bins)
        for i, j in enumerate(sk.features):
            col = pooled[:, j][~np.isnan(pooled[:, j])].astype(np.float32)
            grid = sk.grids[i]
            assert all(e == grid[k] for k, e in zip(idx[i], q.edges[j]))  # every edge a boundary of the public grid
            # For each quantile k / n_bins: the first grid boundary with at least that share of the rows below it is an edge
            # (an atom, such as oldpeak's many zeros, merges quantiles into one edge).
            below = np.array([np.mean(col < g) for g in grid.astype(np.float32)])
            want = {int(np.argmax(below >= qk)) for qk in np.arange(1, n_bins) / n_bins}
            assert set(idx[i]) == want, layout.feature_names[j]
        # Binary features keep their public 0.5 split.
        for j in set(range(layout.n_features)) - set(sk.features):
            np.testing.assert_array_equal(q.edges[j], layout.edges[j])

    def test_on_a_skewed_column_quantile_bins_balance_where_public_ones_do_not(self, layout, spec):
        from fedcollab.protocols.gbdt import edges_from_sketch, layout_from_sketch, sketch_counts, sketch_layout_from_schema

        sk = sketch_layout_from_schema(spec.data_schema)
        rng = np.random.default_rng(0)
        x = np.zeros((4000, layout.n_features))
        j = sk.features[2]  # chol: public bounds [100, 600]; put most rows near the bottom
        x[:, j] = 100 + rng.exponential(15.0, size=4000)
        n_bins = 16
        q = layout_from_sketch(layout, sk, edges_from_sketch(sketch_counts(x, sk), sk, n_bins=n_bins), n_bins=n_bins)
        pub = layout_from_schema(spec.data_schema, n_bins=n_bins)
        fullest = {name: np.bincount(bin_rows(x, lay)[:, j]).max() / len(x) for name, lay in (("quantile", q), ("public", pub))}
        assert fullest["quantile"] < 0.2 and fullest["public"] > 0.8, fullest  # one grid cell (1.95) holds ~12 %

    def test_a_node_checks_the_edges_and_the_order(self, qspec, heart):
        from fedcollab.protocols.gbdt import layout_of, node_set_edges, node_sketch, plan_of, sketch_of

        sk, pub, plan = sketch_of(qspec), layout_of(qspec), plan_of(qspec)
        n_bins = tree_params(qspec).n_bins
        d = heart[0]
        st = node_init(d.x_train, d.y_train, layout=pub, base_score=0.5)
        good = tuple((3, 10, 200) for _ in sk.features)
        with pytest.raises(ProtocolError, match="after the sketch"):
            node_set_edges(st, d.x_train, good, public=pub, sketch=sk, n_bins=n_bins)  # edges before the sketch
        st2, values, event = node_sketch(st, d.x_train, party=d.partner, sketch=sk, plan=plan, rng=np.random.default_rng(1))
        assert values.shape == (len(sk.features), 256) and event.details["release"] == "sketch"
        assert event.mechanism.noise_multiplier == plan.z_sketch and event.details["sensitivity"] == math.sqrt(len(sk.features))
        with pytest.raises(ProtocolError, match="answered once"):
            node_sketch(st2, d.x_train, party=d.partner, sketch=sk, plan=plan, rng=np.random.default_rng(1))
        for bad, what in [((( 10, 3),) * len(sk.features), "increasing"), (((0, 255),) * len(sk.features), "increasing"),
                          ((tuple(range(n_bins)),) * len(sk.features), "increasing"), (good[:-1], "expected edges of"),
                          (((1.5,),) * len(sk.features), "ints")]:
            with pytest.raises(ProtocolError, match=what):
                node_set_edges(st2, d.x_train, bad, public=pub, sketch=sk, n_bins=n_bins)
        st3, lay = node_set_edges(st2, d.x_train, good, public=pub, sketch=sk, n_bins=n_bins)
        np.testing.assert_array_equal(st3.bins, bin_rows(d.x_train, lay))
        with pytest.raises(ProtocolError, match="arrive once"):
            node_set_edges(st3, d.x_train, good, public=pub, sketch=sk, n_bins=n_bins)

    def test_the_plan_charges_the_sketch_and_stays_within_the_target(self, qspec, dp_spec):
        from fedcollab.protocols.gbdt import plan_of, planned_releases

        plan, base = plan_of(qspec), plan_of(dp_spec)
        assert plan.sketch_features == 5 and plan.z_sketch is not None and base.sketch_features == 0
        assert plan.epsilon <= 1.0 and compute_epsilon(plan.mechanisms(), delta=plan.delta, accountant=plan.accountant).epsilon == pytest.approx(plan.epsilon)
        # The sketch takes dp_sketch_share = 0.1 of the precision: the leaves get 90 % of it, sigma up by 1/sqrt(0.9).
        assert plan.z_leaf / base.z_leaf == pytest.approx(1 / math.sqrt(0.9), rel=2e-3)
        rel = planned_releases(qspec, "hospital")
        assert rel[0].details["release"] == "sketch" and len(rel) == tree_params(qspec).n_trees + 1
        # What the nodes record is what is planned: composing the planned events gives the plan's epsilon.
        assert compute_epsilon([r.mechanism for r in rel], delta=plan.delta, accountant=plan.accountant).epsilon == pytest.approx(plan.epsilon, rel=1e-6)

    def test_federated_quantile_run_without_dp_equals_central_on_the_same_edges(self, spec, heart, layout):
        from fedcollab.protocols.gbdt import edges_from_sketch, layout_from_sketch, sketch_counts, sketch_layout_from_schema

        params = _params(spec, n_trees=3, bin_edges="quantile")
        sk = sketch_layout_from_schema(spec.data_schema)
        fed = train_in_process(_partners(heart), layout=layout, params=params, plan=None, coordinator_rng=np.random.default_rng(0), sketch=sk)
        pooled_x = np.concatenate([d.x_train for d in heart])
        pooled_y = np.concatenate([d.y_train for d in heart])
        q = layout_from_sketch(layout, sk, edges_from_sketch(sketch_counts(pooled_x, sk), sk, n_bins=params.n_bins), n_bins=params.n_bins)
        central = train_in_process([("all", pooled_x, pooled_y)], layout=q, params=params, plan=None, coordinator_rng=np.random.default_rng(0))
        x, _ = _test_rows(heart)
        np.testing.assert_allclose(fed.model.predict_proba(x), central.model.predict_proba(x), atol=1e-9)
        assert all(r[0].details["release"] == "sketch" for r in fed.releases.values())

    def test_federated_quantile_run_under_secagg_encoding_gives_the_plain_edges_and_model(self, spec, heart, layout):
        """Without DP the sketch counts are integers, exact in the secagg fixed point: same edges, same trees as plain."""
        from fedcollab.protocols.gbdt import sketch_layout_from_schema

        params = _params(spec, n_trees=2, bin_edges="quantile")
        sk = sketch_layout_from_schema(spec.data_schema)
        runs = [train_in_process(_partners(heart), layout=layout, params=params, plan=None, coordinator_rng=np.random.default_rng(0),
                                 sketch=sk, secagg=secure) for secure in (False, True)]
        x, _ = _test_rows(heart)
        np.testing.assert_allclose(runs[0].model.predict_proba(x), runs[1].model.predict_proba(x), atol=1e-6)
        splits = [[[(t.feature[i], t.threshold[i]) for i in range(t.n_nodes) if t.left[i] >= 0] for t in r.model.trees] for r in runs]
        assert splits[0] == splits[1] and all(splits[0])  # the same split features and thresholds (leaf values within fixed point)

    def test_sketch_secagg_length_and_bound(self, raw_dp):
        """The run's fixed secagg length holds the sketch, and the sketch's bound covers its rows and 12 sigma of its noise."""
        from fedcollab.protocols.gbdt import plan_of, secagg_length, sketch_bound, sketch_of

        raw = copy.deepcopy(raw_dp)
        raw["model"] = {"kind": "gbdt", "gbdt": {"bin_edges": "quantile", "max_depth": 1}}
        raw["aggregation"] = "secagg"
        qspec = parse_spec(raw)  # quantile edges are offered under secagg
        sk, plan = sketch_of(qspec), plan_of(qspec)
        assert secagg_length(qspec) >= len(sk.features) * sk.n_cells
        assert sketch_bound(qspec, 100) == pytest.approx(100 + 12 * plan.sigma_sketch) and plan.sigma_sketch > 0

    def test_spec_refusals(self, raw_dp):
        for share in (0.0, 1.0, float("nan")):
            bad = copy.deepcopy(raw_dp)
            bad["model"] = {"kind": "gbdt", "gbdt": {"bin_edges": "quantile", "dp_sketch_share": share}}
            with pytest.raises(SpecError) as exc:
                parse_spec(bad)
            assert len(exc.value.problems) == 1 and exc.value.problems[0].startswith("`model.gbdt.dp_sketch_share`")


@pytest.fixture()
def raw_dp():
    return tomllib.loads((ROOT / "specs" / "heart-disease-gbdt-dp.toml").read_text())


@pytest.fixture(scope="module")
def three(heart, layout, spec):
    """Three trees of depth 2 trained without DP, and their parameters."""
    p = _params(spec, n_trees=3, max_depth=2)
    return p, list(train_in_process(_partners(heart), layout=layout, params=p, plan=None, coordinator_rng=np.random.default_rng(0)).model.trees)


class TestResume:
    """A resumed run (issue 13, recovery in every mode): the node rebuilds its margins from checkpointed trees it recognises."""

    def test_margins_rebuilt_exactly_and_later_steps_answered_again(self, heart, layout, three):
        p, trees = three
        d = heart[0]
        st = node_init(d.x_train, d.y_train, layout=layout, base_score=p.base_score)
        after_one = node_apply_tree(st, trees[0], layout=layout)
        after_two = node_apply_tree(after_one, trees[1], layout=layout)
        kw = dict(party="c", layout=layout, params=p, plan=None, rng=None)
        mid, _, _ = node_reply(after_two, LevelRequest(tree=2, level=0, release="histogram", open=(0,)), **kw)  # the interrupted step
        back = node_resume(mid, trees[:2], layout=layout, base_score=p.base_score)
        np.testing.assert_array_equal(back.margin, after_two.margin)
        assert back.trees_done == 2 and back.tree_digests == after_two.tree_digests and (2, 0) not in back.steps_done
        _, again, _ = node_reply(back, LevelRequest(tree=2, level=0, release="histogram", open=(0,)), **kw)  # answered again
        assert again.values.shape[0] == 1
        earlier = node_resume(mid, trees[:1], layout=layout, base_score=p.base_score)  # an older checkpoint: tree 1 is built again
        np.testing.assert_array_equal(earlier.margin, after_one.margin)
        assert earlier.trees_done == 1 and not {s for s in earlier.steps_done if s[0] >= 1}

    def test_unknown_trees_refused(self, heart, layout, three):
        p, trees = three
        d = heart[0]
        st = node_init(d.x_train, d.y_train, layout=layout, base_score=p.base_score)
        for t in trees[:2]:
            st = node_apply_tree(st, t, layout=layout)
        forged = dataclasses.replace(trees[1], value=tuple(v + 0.5 for v in trees[1].value))
        with pytest.raises(ProtocolError, match="tree 1 is not the tree this node applied"):
            node_resume(st, [trees[0], forged], layout=layout, base_score=p.base_score)
        with pytest.raises(ProtocolError, match="released the leaves of 2"):  # a third tree whose leaves this node never released
            node_resume(st, trees, layout=layout, base_score=p.base_score)
        # The tree whose leaf sums it released last (the coordinator finished it, the node never got it) is accepted.
        pending = dataclasses.replace(st, leaves_released=True, steps_done=st.steps_done | {(2, 0), (2, 1), (2, 2)})
        done = node_resume(pending, trees, layout=layout, base_score=p.base_score)
        np.testing.assert_array_equal(done.margin, node_apply_tree(st, trees[2], layout=layout).margin)
        # A node whose record of the applied trees is gone cannot recognise them: refused.
        with pytest.raises(ProtocolError, match="incomplete"):
            node_resume(dataclasses.replace(st, tree_digests=()), trees[:2], layout=layout, base_score=p.base_score)

    def test_planned_releases_after_k_trees_and_checkpoint_round_trip(self, dp_spec, spec, three):
        _, trees = three
        full = planned_releases(dp_spec, "c")
        n = tree_params(dp_spec).n_trees
        assert len(full) % n == 0
        per_tree = len(full) // n
        assert planned_releases(dp_spec, "c", after_trees=3) == full[3 * per_tree:]
        s3 = spec.replace(model={"gbdt": {"n_trees": 5, "max_depth": 2}})
        arrays = checkpoint_arrays(trees[:2], step=6, edges=None)
        got, step, edges = from_checkpoint(arrays, s3, trees_done=2)
        assert [t.to_wire() for t in got] == [t.to_wire() for t in trees[:2]] and step == 6 and edges is None
        with pytest.raises(ProtocolError, match="expected 3 of 5 trees"):
            from_checkpoint(arrays, s3, trees_done=3)
        with pytest.raises(ProtocolError, match="malformed checkpoint"):
            from_checkpoint({"w": np.zeros(3)}, s3, trees_done=2)
