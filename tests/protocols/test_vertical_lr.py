"""Vertical logistic regression: equals central Taylor-loss GD, beats the label holder alone, hides what it should, refuses, books."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, compute_epsilon

pytest.importorskip("tenseal")

import tenseal as ts  # noqa: E402

from fedcollab.data import load_vertical_party  # noqa: E402
from fedcollab.protocols.vertical import (  # noqa: E402
    EncryptedLogits,
    GradientAnswer,
    GradientExchange,
    VerticalLrParams,
    active_lr_gradient,
    active_lr_init,
    active_lr_keys,
    active_lr_residual,
    passive_lr_gradient,
    passive_lr_init,
    passive_lr_keys,
    passive_lr_logits,
    passive_lr_update,
    plan_vertical_lr_dp,
    predict_vertical_lr_in_process,
    train_vertical_lr_in_process,
)
from fedcollab.spec import load_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "specs" / "heart-disease-vertical.toml"


def central_taylor_gd(xa, y, xp, *, iterations, learning_rate, l2):
    """Plain full-batch GD on the joined columns [X_a, 1, X_p], same Taylor loss, zero init, no penalty on the intercept."""
    z = np.hstack([xa, np.ones((len(y), 1)), xp])
    w = np.zeros(z.shape[1])
    pen = np.ones_like(w)
    pen[xa.shape[1]] = 0.0
    for _ in range(iterations):
        d = 0.25 * (z @ w) + 0.5 - y
        w = w - learning_rate * (z.T @ d / len(y) + l2 * pen * w)
    return w


def _joined(r):
    return np.concatenate([r.model.active_weights, [r.model.intercept], r.model.passive_weights])


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(7)
    n = 300
    xa, xp = rng.uniform(-1, 1, (n, 3)), rng.uniform(0, 1, (n, 4))
    logit = 1.5 * xa[:, 0] - 2.0 * xp[:, 1] + xp[:, 2] + 0.3
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(float)
    return xa, y, xp


@pytest.fixture(scope="module")
def heart():
    """All aligned Heart records, features scaled to [0, 1] by the schema's public bounds; a seeded 70/30 split."""
    spec = load_spec(SPEC)
    clinic, lab = load_vertical_party(spec, "clinic"), load_vertical_party(spec, "lab")
    common = sorted(set(clinic.ids) & set(lab.ids))
    ic = {k: i for i, k in enumerate(clinic.ids)}
    il = {k: i for i, k in enumerate(lab.ids)}
    schema = spec.data_schema
    enc = schema.encoded_features()
    bounds = schema.encoded_bounds()

    def scale(x, names):
        b = np.array([bounds[enc.index(n)] for n in names])
        return np.clip((x - b[:, 0]) / (b[:, 1] - b[:, 0]), 0.0, 1.0)

    xa = scale(clinic.x[[ic[k] for k in common]], clinic.feature_names)
    y = clinic.y[[ic[k] for k in common]].astype(float)
    xp = scale(lab.x[[il[k] for k in common]], lab.feature_names)
    perm = np.random.default_rng(2024).permutation(len(common))
    tr, te = perm[: int(0.7 * len(perm))], perm[int(0.7 * len(perm)):]
    return {"xa": xa[tr], "y": y[tr], "xp": xp[tr], "xa_te": xa[te], "y_te": y[te], "xp_te": xp[te]}


HEART_ITERS, HEART_LR = 30, 2.0


@pytest.fixture(scope="module")
def heart_run(heart):
    h = heart
    return train_vertical_lr_in_process(("clinic", h["xa"], h["y"]), ("lab", h["xp"]), iterations=HEART_ITERS, learning_rate=HEART_LR,
                                        l2=1e-3, rng=np.random.default_rng(0), keep_messages=True)


def test_protocol_weights_equal_central_taylor_gd(synthetic) -> None:
    xa, y, xp = synthetic
    r = train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), iterations=15, learning_rate=1.0, l2=0.01, rng=np.random.default_rng(1))
    want = central_taylor_gd(xa, y, xp, iterations=15, learning_rate=1.0, l2=0.01)
    np.testing.assert_allclose(_joined(r), want, atol=1e-3)
    assert np.abs(want).max() > 0.1  # the model moved


def test_heart_joint_model_beats_the_label_holder_alone(heart, heart_run) -> None:
    from sklearn.metrics import roc_auc_score

    h = heart
    want = central_taylor_gd(h["xa"], h["y"], h["xp"], iterations=HEART_ITERS, learning_rate=HEART_LR, l2=1e-3)
    np.testing.assert_allclose(_joined(heart_run), want, atol=1e-3)
    prob, event = predict_vertical_lr_in_process(heart_run.model, h["xa_te"], ("lab", h["xp_te"]))
    assert event.kind == "vertical_logit" and event.about == "test" and event.observer == "label_holder" and event.party == "lab"
    auc_joint = roc_auc_score(h["y_te"], prob)
    alone = central_taylor_gd(h["xa"], h["y"], np.zeros((len(h["y"]), 0)), iterations=HEART_ITERS, learning_rate=HEART_LR, l2=1e-3)
    auc_alone = roc_auc_score(h["y_te"], h["xa_te"] @ alone[:-1] + alone[-1])
    print(f"heart vertical LR: AUC joint {auc_joint:.4f}, label holder only {auc_alone:.4f}, "
          f"{heart_run.seconds_per_iteration:.3f} s/iteration, {heart_run.wire_bytes / HEART_ITERS / 1e6:.2f} MB/iteration")
    assert auc_joint > auc_alone + 0.03


def _contains_any(blob: bytes, values: np.ndarray, k: int = 12) -> bool:
    """Whether any of ``k`` seeded picks of ``values`` appears (as float64 bytes, what the protocol carries) in ``blob`` (a sample keeps it fast)."""
    vals = np.asarray(values, dtype=np.float64).ravel()
    pick = vals[np.random.default_rng(0).choice(vals.size, size=min(k, vals.size), replace=False)]
    return any(np.float64(v).tobytes() in blob for v in pick)


def _view(run, party: str) -> bytes:
    out = []
    for to, msg in run.messages:
        if to != party:
            continue
        for v in vars(msg).values():
            if isinstance(v, (bytes, bytearray)):
                out.append(bytes(v))
            elif isinstance(v, tuple):
                out.extend(bytes(b) for b in v)
            elif isinstance(v, np.ndarray):
                out.append(v.tobytes())
    return b"".join(out)


def test_neither_party_sees_the_other_partys_values(heart, heart_run) -> None:
    h = heart
    view_a, view_p = _view(heart_run, "clinic"), _view(heart_run, "lab")
    assert len(view_a) > 1e6 and len(view_p) > 1e6
    # the passive party's raw features (values other than 0/1) and its partial logits never appear in the active's view
    raw = np.unique(h["xp"][(h["xp"] != 0) & (h["xp"] != 1)])
    u_p = h["xp"] @ heart_run.model.passive_weights
    assert raw.size > 50 and not _contains_any(view_a, raw) and not _contains_any(view_a, u_p) and not _contains_any(view_a, 0.25 * u_p)
    # the active's residual share (a function of the labels) never appears in the passive's view
    w_a = np.append(heart_run.model.active_weights, heart_run.model.intercept)
    share = 0.25 * (np.hstack([h["xa"], np.ones((len(h["y"]), 1))]) @ w_a) + 0.5 - h["y"]
    assert not _contains_any(view_p, share) and not _contains_any(view_p, np.unique(h["xa"][(h["xa"] != 0) & (h["xa"] != 1)]))


def _ready(x_a, y, x_p, iterations=3):
    params = VerticalLrParams(iterations=iterations, learning_rate=1.0, l2=0.0)
    a, adv_a = active_lr_init("bank", x_a, y, params=params)
    p, adv_p = passive_lr_init("telco", x_p, params=params)
    return active_lr_keys(a, adv_p), passive_lr_keys(p, adv_a)


def test_ciphertexts_are_under_the_other_key_and_returned_values_masked(synthetic) -> None:
    xa, y, xp = synthetic
    a, p = _ready(xa, y, xp)
    assert not a.peer.has_secret_key() and not p.peer.has_secret_key()
    rng = np.random.default_rng(3)
    p, logits = passive_lr_logits(p)
    # the active party holds the passive's context without its key: the logits cannot be decrypted
    vec = ts.ckks_vector_from(a.peer._ctx, logits.chunks[0])
    with pytest.raises(Exception):
        vec.decrypt()
    a, query = active_lr_residual(a, logits, rng=rng)
    with pytest.raises(Exception):
        ts.ckks_vector_from(p.peer._ctx, query.residual[0]).decrypt()
    p, exchange, _ = passive_lr_gradient(p, query, rng=rng)
    # the passive returns n g_a + R_a: far from the true sum, equal to it once the active removes its mask
    xa1 = np.hstack([xa, np.ones((len(y), 1))])
    true_a = xa1.T @ (0.5 - y)  # zero weights: d = 0.5 - y
    assert np.abs(exchange.answer - true_a).min() > 10.0
    np.testing.assert_allclose(exchange.answer - a.mask_sums, true_a, atol=0.05)
    a, answer, _ = active_lr_gradient(a, exchange, rng=rng)
    true_p = xp.T @ (0.5 - y)
    assert np.abs(answer.answer - true_p).min() > 10.0
    np.testing.assert_allclose(answer.answer - p.mask_sums, true_p, atol=0.05)
    p = passive_lr_update(p, answer)
    assert p.iteration == a.iteration == 1


def test_out_of_order_repeated_and_malformed_messages_are_refused(synthetic) -> None:
    xa, y, xp = synthetic
    a, p = _ready(xa, y, xp)
    rng = np.random.default_rng(4)
    with pytest.raises(ProtocolError, match="out of order"):
        active_lr_residual(a, EncryptedLogits(iteration=1, chunks=()), rng=rng)
    p, logits = passive_lr_logits(p)
    with pytest.raises(ProtocolError, match="cannot start"):
        passive_lr_logits(p)
    with pytest.raises(ProtocolError, match="1 ciphertexts"):
        active_lr_residual(a, dataclasses.replace(logits, chunks=logits.chunks * 2), rng=rng)
    a, query = active_lr_residual(a, logits, rng=rng)
    with pytest.raises(ProtocolError, match="repeat"):
        active_lr_residual(a, logits, rng=rng)
    with pytest.raises(ProtocolError, match="gradient query must be 4"):
        passive_lr_gradient(p, dataclasses.replace(query, query=query.query[:2]), rng=rng)
    p, exchange, _ = passive_lr_gradient(p, query, rng=rng)
    with pytest.raises(ProtocolError, match="repeat"):
        passive_lr_gradient(p, query, rng=rng)
    bad = exchange.answer.copy()
    bad[1] = np.nan
    with pytest.raises(ProtocolError, match="finite"):
        active_lr_gradient(a, dataclasses.replace(exchange, answer=bad), rng=rng)
    with pytest.raises(ProtocolError, match="must be 4 floats"):
        active_lr_gradient(a, dataclasses.replace(exchange, answer=exchange.answer[:3]), rng=rng)
    a, answer, _ = active_lr_gradient(a, exchange, rng=rng)
    with pytest.raises(ProtocolError, match="repeat"):
        active_lr_gradient(a, exchange, rng=rng)
    with pytest.raises(ProtocolError, match="finite"):
        passive_lr_update(p, GradientAnswer(iteration=0, answer=np.full(4, np.inf)))
    p = passive_lr_update(p, answer)
    with pytest.raises(ProtocolError, match="repeat"):
        passive_lr_update(p, answer)
    with pytest.raises(ProtocolError, match="already received"):
        active_lr_keys(a, passive_lr_init("telco", xp, params=p.params)[1])
    with pytest.raises(ProtocolError, match="explicit numpy Generator"):
        p2, lg = passive_lr_logits(p)
        active_lr_residual(a, lg, rng=None)


def test_every_gradient_release_is_booked_before_its_message(synthetic) -> None:
    xa, y, xp = synthetic
    log: list[tuple[str, object]] = []
    r = train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), iterations=3, learning_rate=1.0, rng=np.random.default_rng(5),
                                     record=lambda ev, payload: log.append(("release", ev)), on_message=lambda to, m: log.append(("msg", m)))
    for party, observer in (("bank", "passive_party"), ("telco", "label_holder")):
        evs = r.releases[party]
        assert [e.round for e in evs] == [0, 1, 2]
        assert all(e.kind == "vertical_gradient" and e.observer == observer and e.party == e.added_by == party and e.about == "train"
                   and e.unit == "record" and isinstance(e.mechanism, NonPrivate) and not e.declared_public for e in evs)
    # every release is recorded immediately before the message that carries it
    for i, (what, item) in enumerate(log):
        if what == "release":
            nxt = log[i + 1][1]
            assert isinstance(nxt, GradientExchange if item.party == "telco" else GradientAnswer) and nxt.iteration == item.round

    # a budget gate that refuses the second release stops the run before that message is handed over
    seen: list[object] = []

    def gate(ev, payload):
        if ev.party == "bank":
            raise RuntimeError("budget exhausted")

    with pytest.raises(RuntimeError, match="budget"):
        train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), iterations=3, learning_rate=1.0, rng=np.random.default_rng(5),
                                     record=gate, on_message=lambda to, m: seen.append(m))
    assert isinstance(seen[-1], GradientExchange) and not any(isinstance(m, GradientAnswer) for m in seen)


def test_record_dp_noise_is_planned_added_and_charged(heart) -> None:
    h = heart
    iters = 5
    plan = plan_vertical_lr_dp(iterations=iters, d_active=h["xa"].shape[1], d_passive=h["xp"].shape[1], target_epsilon=2.0, delta=1e-5)
    assert plan.epsilon <= 2.0 + 1e-6
    r = train_vertical_lr_in_process(("clinic", h["xa"], h["y"]), ("lab", h["xp"]), iterations=iters, learning_rate=1.0,
                                     rng=np.random.default_rng(6), plan=plan)
    for party, sens in (("clinic", plan.sensitivity_passive), ("lab", plan.sensitivity_active)):
        evs = r.releases[party]
        assert len(evs) == iters and all(isinstance(e.mechanism, GaussianMechanism) and e.details["sensitivity"] == pytest.approx(sens) for e in evs)
        assert compute_epsilon([e.mechanism for e in evs], delta=1e-5, accountant="rdp").epsilon == pytest.approx(plan.epsilon, rel=1e-6)
    plain = central_taylor_gd(h["xa"], h["y"], h["xp"], iterations=iters, learning_rate=1.0, l2=0.0)
    assert np.abs(_joined(r) - plain).max() > 1e-3  # noise was added
    with pytest.raises(ProtocolError, match=r"scaled to \[-1, 1\]"):
        train_vertical_lr_in_process(("clinic", h["xa"] * 3, h["y"]), ("lab", h["xp"]), iterations=1, learning_rate=1.0, plan=plan)


def test_a_run_resumed_from_a_checkpoint_continues_the_weights(synthetic) -> None:
    """Resumed after 4 of 10 iterations with fresh keys: the weights of an uninterrupted run (up to the flooding noise), iterations 4..9 only."""
    from fedcollab.core import ProtocolError
    from fedcollab.protocols.vertical import LrStart

    xa, y, xp = synthetic
    seen: list[LrStart] = []
    kw = dict(iterations=10, learning_rate=1.0, l2=0.01)
    whole = train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), rng=np.random.default_rng(1), on_checkpoint=seen.append, **kw)
    assert [s.iterations for s in seen] == list(range(1, 10))
    resumed = train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), rng=np.random.default_rng(2), start=seen[3], **kw)
    assert [e.round for e in resumed.releases["telco"]] == list(range(4, 10))
    assert np.allclose(resumed.model.active_weights, whole.model.active_weights, atol=5e-3)
    assert np.allclose(resumed.model.passive_weights, whole.model.passive_weights, atol=5e-3)
    assert not np.allclose(seen[3].passive_weights, whole.model.passive_weights, atol=5e-3), "the resumed run did train"
    with pytest.raises(ProtocolError, match="passive_weights must be"):
        train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), rng=np.random.default_rng(2),
                                     start=LrStart(iterations=4, active_weights=seen[3].active_weights, passive_weights=np.zeros(1)), **kw)
    with pytest.raises(ProtocolError, match="starts after 1..9"):
        train_vertical_lr_in_process(("bank", xa, y), ("telco", xp), rng=np.random.default_rng(2),
                                     start=LrStart(iterations=10, active_weights=seen[3].active_weights, passive_weights=seen[3].passive_weights), **kw)
