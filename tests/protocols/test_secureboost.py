"""Vertical SecureBoost: equals central GBDT on the joined rows, thresholds stay with the passive party, DP on the books."""

from __future__ import annotations

import dataclasses
import math
import pickle
from pathlib import Path

import numpy as np
import pytest

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import GaussianMechanism, compute_epsilon

pytest.importorskip("tenseal")

from fedcollab.data import load_vertical_party  # noqa: E402
from fedcollab.protocols.gbdt import layout_from_bounds, train_in_process  # noqa: E402
from fedcollab.protocols.vertical import (  # noqa: E402
    EncryptedBinSums,
    LevelQuery,
    PassiveAdvert,
    LevelPartitions,
    LevelSplits,
    SplitNotice,
    active_init,
    active_keys,
    active_margin,
    assemble_ensemble,
    joint_layout,
    passive_bin_sums,
    passive_decisions,
    passive_gradients,
    passive_init,
    passive_keys,
    passive_level_splits,
    plan_vertical_dp,
    quantile_layout,
    train_vertical_in_process,
)
from fedcollab.spec import load_spec, tree_params  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "heart-disease-vertical.toml"


@pytest.fixture(scope="module")
def heart():
    spec = load_spec(SPEC)
    clinic, lab = load_vertical_party(spec, "clinic"), load_vertical_party(spec, "lab")
    common = sorted(set(clinic.ids) & set(lab.ids))[:250]
    ic = {k: i for i, k in enumerate(clinic.ids)}
    il = {k: i for i, k in enumerate(lab.ids)}
    xa = clinic.x[[ic[k] for k in common]]
    y = clinic.y[[ic[k] for k in common]]
    xp = lab.x[[il[k] for k in common]]
    params = dataclasses.replace(tree_params(spec), n_trees=3, max_depth=2)
    schema = spec.data_schema
    enc = schema.encoded_features()
    bounds = np.array([schema.encoded_bounds()[enc.index(n)] for n in clinic.feature_names])
    lay_a = layout_from_bounds(clinic.feature_names, bounds, n_bins=params.n_bins, binary=[n == "sex=Male" for n in clinic.feature_names])
    lay_p = quantile_layout(xp, lab.feature_names, n_bins=params.n_bins)
    return {"xa": xa, "y": y, "xp": xp, "params": params, "lay_a": lay_a, "lay_p": lay_p}


@pytest.fixture(scope="module")
def run(heart):
    h = heart
    return train_vertical_in_process(("clinic", h["xa"], h["y"], h["lay_a"]), ("lab", h["xp"], h["lay_p"]), params=h["params"], plan=None, keep_messages=True)


def test_secureboost_equals_central_gbdt_on_the_joined_rows(heart, run) -> None:
    h = heart
    central = train_in_process([("joined", np.hstack([h["xa"], h["xp"]]), h["y"])], layout=joint_layout(h["lay_a"], h["lay_p"]),
                               params=h["params"], plan=None, coordinator_rng=np.random.default_rng(0)).model
    ours = assemble_ensemble(run.model, run.table, h["lay_p"])
    assert len(ours.trees) == len(central.trees) == 3
    for a, b in zip(ours.trees, central.trees):
        assert (a.left, a.right, a.feature, a.bin_index, a.default_left) == (b.left, b.right, b.feature, b.bin_index, b.default_left)
        assert np.allclose(a.threshold, b.threshold) and np.allclose(a.value, b.value, atol=1e-6)
    assert any(n.owner == 1 for t in run.model.trees for n in t.nodes), "some split is on the lab's features"
    joined = np.hstack([h["xa"], h["xp"]])
    joint = active_margin(run.model, h["xa"], h["lay_a"], passive_decisions(run.table, h["xp"], h["lay_p"]))
    assert np.allclose(joint, central.predict_margin(joined), atol=1e-5)


def test_the_passive_thresholds_never_leave_the_passive_node(heart, run) -> None:
    # the lab's data-derived edges (0/1 features split at the public 0.5)
    thresholds = {float(e) for edges in heart["lay_p"].edges for e in edges if e != 0.5}
    assert len(thresholds) > 5
    view = pickle.dumps((run.messages, run.model))  # everything the active party (and a relay) ever holds
    for t in thresholds:  # 8-byte patterns: a chance match in ~10 MB of ciphertext has probability ~1e-12
        assert np.float64(t).tobytes() not in view and np.array(t, dtype=">f8").tobytes() not in view, t
    for node in (n for tree in run.model.trees for n in tree.nodes if n.owner == 1):
        assert math.isnan(node.threshold)
    adverts = [m for m in run.messages if isinstance(m, PassiveAdvert)]
    assert adverts and adverts[0].n_bins == tuple(int(v) for v in heart["lay_p"].n_bins)  # counts only
    for m in run.messages:
        if isinstance(m, EncryptedBinSums):
            assert all(isinstance(c, bytes) for c in m.ciphertexts)
        if isinstance(m, LevelPartitions):
            assert all(p.left.dtype == bool for p in m.parts)
        if isinstance(m, LevelSplits):  # references only: node, open index, feature index, bin index
            assert all(not hasattr(n, "threshold") and not hasattr(n, "rows") for n in m.notices)


def test_every_release_is_on_the_books(heart, run) -> None:
    lab, clinic = run.releases["lab"], run.releases["clinic"]
    hist = [r for r in lab if r.kind == "vertical_histogram"]
    assert len(hist) == sum(1 for r in clinic if r.kind == "vertical_partition")  # one bin-sum reply per level query
    assert all(r.observer == "label_holder" and r.unit == "record" and r.non_private for r in hist)
    splits = [r for r in lab if r.kind == "vertical_partition"]
    assert len(splits) == sum(1 for t in run.model.trees for n in t.nodes if n.owner == 1)
    assert all(r.observer == "passive_party" for r in clinic)


def test_record_dp_noise_is_planned_added_and_charged(heart) -> None:
    h = heart
    plan = plan_vertical_dp(h["params"], n_features=h["lay_p"].n_features, target_epsilon=1.0, delta=1e-5)
    assert plan.epsilon <= 1.0 + 1e-9 and plan.sigma > 0
    assert plan.sensitivity == pytest.approx(math.sqrt(2 * h["lay_p"].n_features * (1.0 + 0.25**2)))
    res = train_vertical_in_process(("clinic", h["xa"], h["y"], h["lay_a"]), ("lab", h["xp"], h["lay_p"]), params=h["params"], plan=plan,
                                    rng=np.random.default_rng(5))
    hist = [r for r in res.releases["lab"] if r.kind == "vertical_histogram"]
    assert hist and all(isinstance(r.mechanism, GaussianMechanism) and r.mechanism.noise_multiplier == plan.z for r in hist)
    eps = compute_epsilon([r.mechanism for r in hist], delta=1e-5, accountant="rdp").epsilon
    assert eps <= 1.0 + 1e-9


def _passive_ready(heart):
    h = heart
    a, advert = active_init("clinic", h["xa"], h["y"], h["lay_a"], base_score=0.5), None
    p, advert = passive_init("lab", h["xp"], h["lay_p"])
    a, bundle = active_keys(a, advert, plan=None)
    return a, passive_keys(p, bundle), bundle


def test_the_passive_node_refuses_out_of_order_and_malformed_requests(heart) -> None:
    a, p, bundle = _passive_ready(heart)
    n = len(heart["y"])
    q = LevelQuery(tree=0, level=0, n_open=1, position=np.zeros(n, dtype=np.int64))
    with pytest.raises(ProtocolError, match="without that tree's encrypted gradients"):
        passive_bin_sums(p, q, plan=None, rng=None)
    with pytest.raises(ProtocolError, match="already received"):
        passive_keys(p, bundle)
    from fedcollab.protocols.vertical import EncryptedGradients

    s = float(1 << a.scale_bits)
    chunks = a.secret.encrypt_rows(np.rint(np.full(n, 0.5) * s).astype(np.int64), np.rint(np.full(n, 0.25) * s).astype(np.int64))
    p = passive_gradients(p, EncryptedGradients(tree=0, chunks=tuple(chunks)))
    p, reply, _ = passive_bin_sums(p, q, plan=None, rng=None)
    with pytest.raises(ProtocolError, match="already answered"):
        passive_bin_sums(p, q, plan=None, rng=None)
    with pytest.raises(ProtocolError, match="open-node indices"):
        passive_bin_sums(p, LevelQuery(tree=0, level=1, n_open=1, position=np.full(n, 3)), plan=None, rng=None)
    def splits(level: int, *notices: SplitNotice) -> LevelSplits:
        return LevelSplits(tree=0, level=level, notices=notices)

    with pytest.raises(ProtocolError, match="outside this party's layout"):
        passive_level_splits(p, splits(0, SplitNotice(tree=0, node=0, open_index=0, feature=99, bin_index=0, default_left=True)))
    with pytest.raises(ProtocolError, match="not the level last queried"):
        passive_level_splits(p, splits(1, SplitNotice(tree=0, node=0, open_index=0, feature=0, bin_index=0, default_left=True)))
    with pytest.raises(ProtocolError, match="not a distinct open node"):
        passive_level_splits(p, splits(0, SplitNotice(tree=0, node=0, open_index=1, feature=0, bin_index=0, default_left=True)))
    p, part, events = passive_level_splits(p, splits(0, SplitNotice(tree=0, node=0, open_index=0, feature=0, bin_index=0, default_left=True)))
    assert part.parts[0].left.shape == (n,) and len(events) == 1 and events[0].declared_public
    with pytest.raises(ProtocolError, match="already split"):
        passive_level_splits(p, splits(0, SplitNotice(tree=0, node=0, open_index=0, feature=0, bin_index=0, default_left=True)))
    # a label holder that isolates records in tiny nodes is refused by the node's minimum
    tiny = np.full(n, -1)
    tiny[:3] = 0
    with pytest.raises(ProtocolError, match="fewer than this node's minimum of 4"):
        passive_bin_sums(p, LevelQuery(tree=0, level=1, n_open=1, position=tiny), plan=None, rng=None, min_node_rows=4)
    dp = plan_vertical_dp(heart["params"], n_features=heart["lay_p"].n_features, target_epsilon=1.0, delta=1e-5)
    with pytest.raises(ProtocolError, match="explicit noise generator"):
        passive_bin_sums(p, LevelQuery(tree=0, level=1, n_open=1, position=np.zeros(n, dtype=np.int64)), plan=dp, rng=None)
    with pytest.raises(ProtocolError, match="beyond the plan"):
        passive_bin_sums(p, LevelQuery(tree=0, level=5, n_open=1, position=np.zeros(n, dtype=np.int64)), plan=dp, rng=np.random.default_rng(0))
    # the bin sums of the valid query decrypt to the exact per-bin sums of g = 0.5, h = 0.25
    sums = a.secret.decrypt_sums(list(reply.ciphertexts), heart["lay_p"].n_slots) / s
    assert sums[: int(heart["lay_p"].n_bins[0]) + 1, 0].sum() == pytest.approx(0.5 * n)


def test_three_parties_equal_central_gbdt_on_all_joined_columns(heart) -> None:
    """A label holder and two passive parties (the lab's columns split in two): the same trees as central GBDT on all columns."""
    h = heart
    names = h["lay_p"].feature_names
    cut = next(j for j, nm in enumerate(names) if nm.startswith("thalch"))
    x1, x2 = h["xp"][:, :cut], h["xp"][:, cut:]
    lay1 = quantile_layout(x1, names[:cut], n_bins=h["params"].n_bins)
    lay2 = quantile_layout(x2, names[cut:], n_bins=h["params"].n_bins)
    params = dataclasses.replace(h["params"], n_trees=2)
    res = train_vertical_in_process(("clinic", h["xa"], h["y"], h["lay_a"]), [("ecg", x1, lay1), ("stress", x2, lay2)], params=params, plan=None)
    joined = np.hstack([h["xa"], x1, x2])
    central = train_in_process([("joined", joined, h["y"])], layout=joint_layout(h["lay_a"], lay1, lay2), params=params, plan=None,
                               coordinator_rng=np.random.default_rng(0)).model
    ours = assemble_ensemble(res.model, [res.tables["ecg"], res.tables["stress"]], [lay1, lay2])
    for a, b in zip(ours.trees, central.trees, strict=True):
        assert (a.left, a.right, a.feature, a.bin_index) == (b.left, b.right, b.feature, b.bin_index)
        assert np.allclose(a.threshold, b.threshold) and np.allclose(a.value, b.value, atol=1e-6)
    owners = {n.owner for t in res.model.trees for n in t.nodes if n.left >= 0}
    assert {1, 2} <= owners, owners  # both passive parties won splits
    dec = {**passive_decisions(res.tables["ecg"], x1), **passive_decisions(res.tables["stress"], x2)}
    assert np.allclose(active_margin(res.model, h["xa"], h["lay_a"], dec), central.predict_margin(joined), atol=1e-5)
    # each passive party keeps only its own thresholds, and records its own releases
    assert set(res.tables["ecg"]).isdisjoint(res.tables["stress"])
    assert {r.party for r in res.releases["ecg"]} == {"ecg"} and any(r.kind == "vertical_histogram" for r in res.releases["stress"])


def test_a_run_resumed_from_a_checkpoint_grows_the_trees_an_uninterrupted_run_grows(heart, run) -> None:
    """The state after tree 1 (the label holder's margins, the lab's table) is all a resumed run needs: same trees, same table."""
    from fedcollab.protocols.vertical import SecureBoostStart

    h = heart
    seen: list[SecureBoostStart] = []
    args = (("clinic", h["xa"], h["y"], h["lay_a"]), ("lab", h["xp"], h["lay_p"]))
    train_vertical_in_process(*args, params=h["params"], plan=None, on_checkpoint=seen.append)
    assert [len(s.trees) for s in seen] == [1, 2], "after every tree but the last"
    resumed = train_vertical_in_process(*args, params=h["params"], plan=None, start=seen[0])
    assert resumed.model == run.model and resumed.tables == run.tables
    assert [ev.round for ev in resumed.releases["lab"] if ev.kind == "vertical_histogram"] == [1, 1, 2, 2], "only trees 1 and 2 release"
    bad = [dataclasses.replace(seen[0], margin=seen[0].margin[:-1]), dataclasses.replace(seen[0], tables={}),
           dataclasses.replace(seen[0], trees=seen[1].trees + seen[1].trees), dataclasses.replace(seen[0], tables={"lab": seen[1].tables["lab"]})]
    for start, match in zip(bad, ["margins must be 250", "lookup table for each", "starts after 1..2", "entries of tree 1"]):
        with pytest.raises(ProtocolError, match=match):
            train_vertical_in_process(*args, params=h["params"], plan=None, start=start)
