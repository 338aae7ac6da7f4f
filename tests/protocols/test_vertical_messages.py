"""Vertical runs (SecureBoost, logistic regression) as sealed messages through a relaying coordinator (the deployment path, in-process).

The label holder's generator and the passive party's handler exchange codec bytes sealed end to
end; the coordinator in the middle only relays. The model must be the one the function-call
protocol trains on the same records, and the coordinator's whole view must be sealed bytes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcollab.core import CryptoError, PolicyRefused, ProtocolError
from fedcollab.crypto import SealKey
from fedcollab.data import load_vertical_party
from fedcollab.protocols.vertical import (
    CommonRows,
    EncryptedBinSums,
    PassiveLrParty,
    LevelQuery,
    SplitNotice,
    LevelSplits,
    active_lr_protocol,
    active_protocol,
    decode_message,
    encode_message,
    passive_party,
    relay,
)
from fedcollab.spec import load_spec


def _hex(sk: Ed25519PrivateKey) -> str:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@pytest.fixture(scope="module")
def spec(root):
    s = load_spec(root / "specs" / "heart-disease-vertical.toml")
    g = s.model.gbdt.model_copy(update={"n_trees": 2, "max_depth": 3})
    return s.model_copy(update={"model": s.model.model_copy(update={"gbdt": g})})


def _run(spec, *, run_id="r1", min_intersection=1, tamper=None):
    a = load_vertical_party(spec, "clinic")
    p = load_vertical_party(spec, "lab")
    books: dict[str, list] = {"clinic": [], "lab": []}
    ska, skp = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    ka, kp = SealKey.generate(run_id, "clinic"), SealKey.generate(run_id, "lab")
    ca = ka.channel(kp.advert(skp), roster_key=_hex(skp))
    cp = kp.channel(ka.advert(ska), roster_key=_hex(ska))
    lab = passive_party(spec, p, active="clinic", run_id=run_id, record=lambda r, b: books["lab"].append(r), rng=np.random.default_rng(1),
                        min_intersection=min_intersection)

    def lab_node(wire: bytes) -> bytes:
        msgs = decode_message(cp.open("vertical", wire))
        out = tuple(r for m in msgs for r in lab.handle(m))
        return cp.seal("vertical", encode_message(out))

    view: list[bytes] = []

    def seen(src, dst, wire):
        view.append(wire)

    record = lambda r, b: books["clinic"].append(r)  # noqa: E731
    gen = (active_lr_protocol(spec, a, ["lab"], run_id=run_id, record=record, rng=np.random.default_rng(2))
           if spec.model.kind == "logistic_regression" else active_protocol(spec, a, ["lab"], run_id=run_id, record=record))
    res = relay(gen, {"lab": lab_node if tamper is None else tamper(lab_node)}, to_wire=lambda _p, m: ca.seal("vertical", encode_message(m)),
                from_wire=lambda _p, b: decode_message(ca.open("vertical", b)), seen=seen)
    return res, lab, books, view


@pytest.fixture(scope="module")
def sealed_run(spec):
    return _run(spec)


def test_same_model_as_the_function_call_protocol(spec, sealed_run):
    from fedcollab.runner._vertical import simulate_vertical

    res, lab, books, _ = sealed_run
    ref = simulate_vertical(spec)  # plain set intersection, in-process stage calls
    assert res.intersection == ref.intersection and res.n_train == ref.n_train and res.n_test == ref.n_test
    assert len(res.model.trees) == len(ref.model.trees) == 2
    for t_got, t_ref in zip(res.model.trees, ref.model.trees):
        for n_got, n_ref in zip(t_got.nodes, t_ref.nodes, strict=True):
            assert (n_got.left, n_got.right, n_got.owner, n_got.feature, n_got.bin_index) == (n_ref.left, n_ref.right, n_ref.owner, n_ref.feature, n_ref.bin_index)
            assert n_got.value == pytest.approx(n_ref.value, abs=1e-9)
    assert dict(lab.table) == dict(ref.tables["lab"]) and lab.table, "the lab holds the same lookup table, with at least one split"
    assert res.test_auc == pytest.approx(ref.test_auc, abs=1e-9) and res.test_auc > 0.7
    assert res.passive_splits == len(lab.table)


def test_every_release_is_on_the_books(sealed_run):
    _, lab, books, _ = sealed_run
    kinds = {p: sorted({f"{r.kind}->{r.observer}" for r in rs}) for p, rs in books.items()}
    assert kinds["clinic"] == ["psi_intersection->passive_party", "test_metrics->coordinator", "vertical_partition->passive_party"]
    assert kinds["lab"] == ["psi_intersection->label_holder", "vertical_histogram->label_holder", "vertical_partition->label_holder"]
    assert sum(1 for r in books["lab"] if r.kind == "vertical_partition" and r.about == "test") == 1


def test_coordinator_sees_only_sealed_bytes(spec, sealed_run):
    """Nothing the coordinator relays decodes, and no threshold of the lab's appears in it."""
    _, lab, _, view = sealed_run
    assert view
    for wire in view:
        with pytest.raises(ProtocolError):
            decode_message(wire)
        assert b"CommonRows" not in wire and b"LevelQuery" not in wire and b"threshold" not in wire
    thresholds = {np.float64(e.threshold).tobytes() for e in lab.table.values() if e.threshold != 0.5}
    blob = b"".join(view)
    assert thresholds and not any(t in blob for t in thresholds)


def test_a_tampering_relay_stops_the_run(spec):
    def flip(node):
        def inner(wire):
            out = bytearray(node(wire))
            out[-1] ^= 1
            return bytes(out)
        return inner

    with pytest.raises(CryptoError, match="authentication failed"):
        _run(spec, tamper=flip)


def test_passive_policy_minimum_intersection(spec):
    with pytest.raises(PolicyRefused, match="min_intersection"):
        _run(spec, min_intersection=10_000)


def test_codec_round_trip_and_refusals():
    q = LevelQuery(tree=1, level=2, n_open=3, position=np.array([0, -1, 2], dtype=np.int64))
    s = LevelSplits(tree=1, level=2, notices=(SplitNotice(tree=1, node=4, open_index=0, feature=1, bin_index=3, default_left=True),))
    b = EncryptedBinSums(tree=1, level=2, ciphertexts=(b"\x00\x01", b"xyz"))
    got = decode_message(encode_message((q, s, b, CommonRows(positions=np.arange(4)))))
    assert got[0].tree == 1 and np.array_equal(got[0].position, q.position) and got[1] == s and got[2] == b
    assert np.array_equal(got[3].positions, np.arange(4))
    assert decode_message(encode_message(()), expect=LevelQuery) == ()
    with pytest.raises(ProtocolError, match="expected a vertical EncryptedBinSums, got LevelQuery"):
        decode_message(encode_message(q), expect=EncryptedBinSums)
    raw = encode_message(q)
    n = int.from_bytes(raw[:4], "big")
    header = json.loads(raw[4:4 + n])
    for bad, match in (({**header, "$c": "os.system"}, "names class 'os.system'"),
                       ({**header, "f": {**header["f"], "extra": 1}}, "has fields"),
                       ({**header, "f": {**header["f"], "position": {**header["f"]["position"], "shape": [4]}}}, "needs 32 bytes, got 24"),
                       ({**header, "f": {**header["f"], "position": {**header["f"]["position"], "dtype": "object"}}}, "dtype 'object'")):
        hb = json.dumps(bad).encode()
        with pytest.raises(ProtocolError, match=match):
            decode_message(len(hb).to_bytes(4, "big") + hb + raw[4 + n:])
    with pytest.raises(ProtocolError, match="cannot carry a dict"):
        encode_message({"a": 1})
    with pytest.raises(ProtocolError, match="claims"):
        decode_message(raw[:-3])


# ------------------------------------------------------------------------------ vertical logistic regression


@pytest.fixture(scope="module")
def lr_spec(root):
    s = load_spec(root / "specs" / "heart-disease-vertical-lr.toml")
    return s.model_copy(update={"training": s.training.model_copy(update={"rounds": 12})})


@pytest.fixture(scope="module")
def lr_sealed_run(lr_spec):
    return _run(lr_spec)


def test_vertical_lr_over_sealed_messages_is_the_function_call_model(lr_spec, lr_sealed_run):
    """The label holder's generator and the lab's handler train the model the in-process driver trains on the same records."""
    from fedcollab.runner._vertical import simulate_vertical

    res, lab, books, view = lr_sealed_run
    assert isinstance(lab, PassiveLrParty) and lab.finished
    ref = simulate_vertical(lr_spec, rng=np.random.default_rng(5))
    assert (res.intersection, res.n_train, res.n_test, res.iterations) == (ref.intersection, ref.n_train, ref.n_test, 12)
    # Equal up to the CKKS approximation and the flooding noise (independent draws in the two runs).
    assert np.abs(res.weights - ref.model.active_weights).max() < 5e-3
    assert abs(res.intercept - ref.model.intercept) < 5e-3
    assert np.abs(lab.weights - ref.model.passive_weights).max() < 5e-3 and np.abs(lab.weights).max() > 0.05
    assert res.test_auc == pytest.approx(ref.test_auc, abs=5e-3) and res.test_auc > 0.8
    # Each party's book: its PSI release, one gradient release per iteration to the other party, and the joint prediction.
    kinds = {p: sorted(f"{r.kind}->{r.observer}" for r in rs) for p, rs in books.items()}
    assert kinds["clinic"] == ["psi_intersection->passive_party", "test_metrics->coordinator", *["vertical_gradient->passive_party"] * 12]
    assert kinds["lab"] == ["psi_intersection->label_holder", *["vertical_gradient->label_holder"] * 12, "vertical_logit->label_holder"]
    # Two relay exchanges per iteration after PSI and the key adverts: the coordinator carried sealed bytes only.
    assert len(view) == 2 * (2 + 2 * 12)
    for wire in view:
        with pytest.raises(ProtocolError):
            decode_message(wire)
    name, doc = lab.document()
    assert name == "weights.json" and doc["weights"] == [float(w) for w in lab.weights] and "intercept" not in doc


def test_vertical_lr_passive_refuses_messages_out_of_order(lr_spec):
    """Prediction before training ends, or a training message before the common rows, is refused by the lab's handler."""
    from fedcollab.protocols.vertical import GradientAnswer, PredictRequest

    p = load_vertical_party(lr_spec, "lab")
    lab = passive_party(lr_spec, p, active="clinic", run_id="r9", record=lambda r, b: None, rng=np.random.default_rng(1))
    with pytest.raises(ProtocolError, match="before the common rows"):
        lab.handle(GradientAnswer(iteration=0, answer=np.zeros(3)))
    with pytest.raises(ProtocolError, match="decided once, after training"):
        lab.handle(PredictRequest())


def test_vertical_lr_codec_round_trip():
    from fedcollab.protocols.vertical import GradientExchange, LrKeyAdvert

    adv = LrKeyAdvert(party="lab", context=b"ctx", n_records=5, n_features=2)
    ex = GradientExchange(iteration=3, answer=np.array([1.5, -2.0]), query=(b"a", b"bc"))
    got = decode_message(encode_message((adv, ex)))
    assert got[0] == adv and got[1].iteration == 3 and got[1].query == (b"a", b"bc") and np.array_equal(got[1].answer, ex.answer)


def test_vertical_lr_record_dp_over_messages_uses_each_partys_own_plan(lr_spec):
    """Under record-level DP each party plans from its own spec (feature counts from the columns it gives each party) and charges every gradient."""
    from fedcollab.protocols.vertical import lr_setup
    from fedcollab.spec import PrivacySpec

    spec = lr_spec.model_copy(update={"privacy": PrivacySpec(mode="record", target_epsilon=2.0, delta=1e-3),
                                      "training": lr_spec.training.model_copy(update={"rounds": 4})})
    _, plan = lr_setup(spec)
    counts = tuple(len(load_vertical_party(spec, n).feature_names) for n in ("clinic", "lab"))
    assert plan is not None and (plan.d_active, plan.d_passive) == counts == (4, 9) and plan.epsilon <= 2.0 + 1e-9
    res, lab, books, _ = _run(spec)
    for party, sens in (("clinic", plan.sensitivity_passive), ("lab", plan.sensitivity_active)):
        grads = [r for r in books[party] if r.kind == "vertical_gradient"]
        assert len(grads) == 4
        for r in grads:
            assert r.mechanism.noise_multiplier == pytest.approx(plan.z) and r.details["sensitivity"] == pytest.approx(sens)
            assert r.details["sigma"] == pytest.approx(plan.z * sens)
    assert np.isfinite(res.weights).all() and np.isfinite(lab.weights).all()
