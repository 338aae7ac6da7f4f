"""Vertical LR with several passive parties: equals central Taylor-loss GD, hides each share, refuses, books every contribution."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, compute_epsilon

pytest.importorskip("tenseal")

from fedcollab.protocols.vertical import (  # noqa: E402
    DecryptAnswer,
    DecryptRequest,
    GradientAnswer,
    LrMultiKeys,
    LrMultiPassive,
    MultiLrStart,
    MultiResidual,
    Roles,
    SharedLogits,
    VerticalLrParams,
    lr_multi_active,
    plan_multi_lr_dp,
    train_vertical_lr_multi_in_process,
)

PASSIVES = ("telco", "tax", "shop")


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    n = 300
    xa = rng.uniform(-1, 1, (n, 2))
    xs = {"telco": rng.uniform(0, 1, (n, 3)), "tax": rng.uniform(-1, 1, (n, 2)), "shop": rng.uniform(-1, 1, (n, 1))}
    logit = 1.2 * xa[:, 0] - 2.0 * xs["telco"][:, 1] + xs["tax"][:, 0] - 0.8 * xs["shop"][:, 0] + 0.3
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-logit))).astype(float)
    return xa, y, xs


def central(xa, y, xs, *, iterations, learning_rate, l2):
    """Plain full-batch GD on [X_a, 1, X_telco, X_tax, X_shop], the same Taylor loss, no penalty on the intercept."""
    z = np.hstack([xa, np.ones((len(y), 1)), *(xs[p] for p in PASSIVES)])
    w = np.zeros(z.shape[1])
    pen = np.ones_like(w)
    pen[xa.shape[1]] = 0.0
    for _ in range(iterations):
        w = w - learning_rate * (z.T @ (0.25 * (z @ w) + 0.5 - y) / len(y) + l2 * pen * w)
    return w


def _run(data, **kw):
    xa, y, xs = data
    return train_vertical_lr_multi_in_process(("bank", xa, y), [(p, xs[p]) for p in PASSIVES], **kw)


def _joined(r):
    return np.concatenate([r.active_weights, [r.intercept], *(r.passive_weights[p] for p in PASSIVES)])


def _contains_any(blob: bytes, values: np.ndarray, k: int = 12) -> bool:
    vals = np.asarray(values, dtype=np.float64).ravel()
    pick = vals[np.random.default_rng(0).choice(vals.size, size=min(k, vals.size), replace=False)]
    return any(np.float64(v).tobytes() in blob for v in pick)


def _bytes(msg) -> bytes:
    out = []

    def walk(v):
        if isinstance(v, (bytes, bytearray)):
            out.append(bytes(v))
        elif isinstance(v, np.ndarray):
            out.append(v.tobytes())
        elif isinstance(v, tuple):
            for x in v:
                walk(x)

    for v in vars(msg).values():
        walk(v)
    return b"".join(out)


def test_weights_equal_central_taylor_gd_on_the_joined_columns(data) -> None:
    xa, y, xs = data
    r = _run(data, iterations=12, learning_rate=1.0, l2=0.01, rng=np.random.default_rng(1))
    ref = central(xa, y, xs, iterations=12, learning_rate=1.0, l2=0.01)
    assert np.abs(_joined(r) - ref).max() < 1e-3
    assert np.abs(ref).max() > 0.1  # it trained


def test_no_party_sees_another_partys_share_features_or_weights(data) -> None:
    xa, y, xs = data
    views: dict[str, list[bytes]] = {}
    r = _run(data, iterations=4, learning_rate=1.0, rng=np.random.default_rng(2), seen=lambda s, to, m: views.setdefault(to, []).append(_bytes(m)))
    view = {k: b"".join(v) for k, v in views.items()}
    assert set(view) == {"bank", *PASSIVES} and all(len(v) > 1e5 for v in view.values())
    n = len(y)
    w_a = np.append(r.active_weights, r.intercept)
    share_a = 0.25 * (np.hstack([xa, np.ones((n, 1))]) @ w_a) + 0.5 - y
    shares = {p: 0.25 * (xs[p] @ r.passive_weights[p]) for p in PASSIVES}
    for who, blob in view.items():
        for p in PASSIVES:
            if p != who:
                raw = np.unique(xs[p][(xs[p] != 0) & (xs[p] != 1)])
                assert not _contains_any(blob, raw) and not _contains_any(blob, shares[p]), (who, p)
                assert not _contains_any(blob, r.passive_weights[p], k=len(r.passive_weights[p])), (who, p)
        if who != "bank":
            assert not _contains_any(blob, share_a) and not _contains_any(blob, xa), who


def _nodes(data, plan=None, record=None, iterations=3):
    xa, y, xs = data
    roles = Roles(active="bank", passives=PASSIVES, features={"bank": xa.shape[1], **{p: xs[p].shape[1] for p in PASSIVES}})
    params = VerticalLrParams(iterations=iterations, learning_rate=1.0)
    nodes = {p: LrMultiPassive(p, xs[p], roles=roles, params=params, plan=plan, rng=np.random.default_rng(i), record=record)
             for i, p in enumerate(PASSIVES)}
    return roles, params, nodes


def test_out_of_order_repeated_misaddressed_and_fresh_decryptions_are_refused(data) -> None:
    xa, y, xs = data
    roles, params, nodes = _nodes(data)
    assert roles.holders == ("telco", "tax") and roles.decryptor("telco") == "tax" and roles.decryptor("shop") == roles.decryptor("bank") == "telco"
    adverts = {p: n.advert() for p, n in nodes.items()}
    assert adverts["shop"].context == b"" and adverts["telco"].context and adverts["tax"].context
    with pytest.raises(ProtocolError, match="out of order"):
        nodes["shop"].handle(GradientAnswer(iteration=0, answer=np.zeros(1)))
    gen = lr_multi_active(xa, y, roles=roles, adverts=adverts, params=params, plan=None, rng=np.random.default_rng(9))
    keys = next(gen)["shop"][0]
    assert isinstance(keys, LrMultiKeys)
    inbox = {p: nodes[p].handle(keys) for p in PASSIVES}
    with pytest.raises(ProtocolError, match="already received"):
        nodes["shop"].handle(keys)
    share = inbox["shop"][0]
    assert isinstance(share, SharedLogits) and share.iteration == 0
    out = gen.send(inbox)
    assert isinstance(out["telco"][1], DecryptRequest) and out["telco"][1].owners == ("bank",)
    # a party that holds no key decrypts nothing; a key holder only its own parties' gradients, once, never a fresh share
    with pytest.raises(ProtocolError, match="holds no key"):
        nodes["shop"].handle(out["telco"][1])
    with pytest.raises(ProtocolError, match="out of order"):
        nodes["telco"].handle(out["telco"][1])  # before its residual
    with pytest.raises(ProtocolError, match="iteration"):
        nodes["telco"].handle(MultiResidual(iteration=1, residual=out["telco"][0].residual))
    nodes["telco"].handle(out["telco"][0])
    nodes["tax"].handle(out["tax"][0])
    with pytest.raises(ProtocolError, match="decrypts the gradients of"):
        nodes["tax"].handle(out["telco"][1])  # the label holder's gradient is the first key holder's to decrypt
    with pytest.raises(ProtocolError, match="last level"):  # the shop's fresh share under the first key, passed off as products
        nodes["telco"].handle(DecryptRequest(iteration=0, owners=("shop",), queries=(share.first,)))
    ans = nodes["telco"].handle(out["telco"][1])
    assert isinstance(ans[0], DecryptAnswer)
    with pytest.raises(ProtocolError, match="already decrypted"):
        nodes["telco"].handle(out["telco"][1])


def test_every_contribution_is_booked_before_the_share_leaves_and_dp_is_charged(data) -> None:
    xa, y, xs = data
    log: list[tuple[str, object]] = []
    r = _run(data, iterations=3, learning_rate=1.0, rng=np.random.default_rng(5), record=lambda ev, payload: log.append(("release", ev)),
             on_message=lambda to, m: log.append(("msg", m)))
    for party in ("bank", *PASSIVES):
        evs = r.releases[party]
        assert len(evs) == 3 * 3 and all(e.kind == "vertical_gradient" and e.party == e.added_by == party and isinstance(e.mechanism, NonPrivate)
                                         for e in evs)
        assert sorted((e.round, e.details["recipient"]) for e in evs) == sorted((i, x) for i in range(3) for x in {"bank", *PASSIVES} - {party})
    # a passive party's releases come right before its share; the label holder's right before its residuals
    for i, (what, ev) in enumerate(log):
        if what == "release":
            nxt = next(m for w, m in log[i + 1:] if w == "msg")
            assert isinstance(nxt, SharedLogits if ev.party != "bank" else MultiResidual) and nxt.iteration == ev.round

    seen: list[object] = []

    def gate(ev, payload):
        if ev.party == "bank" and ev.round == 1:
            raise RuntimeError("budget exhausted")

    with pytest.raises(RuntimeError, match="budget"):
        _run(data, iterations=3, learning_rate=1.0, rng=np.random.default_rng(5), record=gate, on_message=lambda to, m: seen.append(m))
    assert not any(isinstance(m, MultiResidual) and m.iteration == 1 for m in seen)

    plan = plan_multi_lr_dp(iterations=4, parties=4, target_epsilon=2.0, delta=1e-5)
    assert plan.releases == 12 and plan.epsilon <= 2.0 + 1e-6
    d = _run(data, iterations=4, learning_rate=1.0, rng=np.random.default_rng(6), plan=plan)
    for party in ("bank", *PASSIVES):
        evs = d.releases[party]
        assert all(isinstance(e.mechanism, GaussianMechanism) and e.details["sigma"] == pytest.approx(plan.z * e.details["sensitivity"]) for e in evs)
        assert compute_epsilon([e.mechanism for e in evs], delta=1e-5, accountant="rdp").epsilon == pytest.approx(plan.epsilon, rel=1e-6)
    ref = central(xa, y, xs, iterations=4, learning_rate=1.0, l2=0.0)
    assert np.abs(_joined(d) - ref).max() > 1e-2  # noise was added
    with pytest.raises(ProtocolError, match="at least 3 parties"):
        plan_multi_lr_dp(iterations=4, parties=2, target_epsilon=2.0, delta=1e-5)
    with pytest.raises(ProtocolError, match=r"scaled to \[-1, 1\]"):
        _run((xa * 3, y, xs), iterations=1, learning_rate=1.0, plan=plan)
    with pytest.raises(ProtocolError, match="2 or more distinct passive parties"):
        Roles(active="bank", passives=("telco",), features={"bank": 2, "telco": 3})


def test_a_resumed_run_continues_the_weights(data) -> None:
    seen: list[MultiLrStart] = []
    kw = dict(iterations=8, learning_rate=1.0, l2=0.01)
    whole = _run(data, rng=np.random.default_rng(1), on_checkpoint=seen.append, **kw)
    assert [s.iterations for s in seen] == list(range(1, 8))
    resumed = _run(data, rng=np.random.default_rng(2), start=seen[3], **kw)
    assert sorted({e.round for e in resumed.releases["tax"]}) == list(range(4, 8))
    assert np.abs(_joined(resumed) - _joined(whole)).max() < 5e-3
    with pytest.raises(ProtocolError, match="starting weights"):
        _run(data, rng=np.random.default_rng(2), start=MultiLrStart(iterations=4, active_weights=seen[3].active_weights,
                                                                     passive_weights={"telco": np.zeros(1)}), **kw)
