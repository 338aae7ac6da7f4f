"""Vertical logistic regression as pure stage functions: two CKKS keys, masked gradients, no third party.

Two parties hold different columns of the same aligned records (aligned by PSI beforehand): the
*active* party (label holder) has ``X_a`` (n, d_a) and ``y`` in {0, 1}; the *passive* party has
``X_p`` (n, d_p). The model is ``sigmoid(X_a w_a + b + X_p w_p)``; the active party keeps ``w_a``
and the intercept ``b`` (a column of ones appended to ``X_a``), the passive party keeps ``w_p``.

Loss: the logistic loss in its second-order Taylor expansion at 0 (Hardy et al. 2017; FATE's
hetero-LR), sigmoid(z) ~ 0.5 + z / 4, so the per-record residual is

    d_i = 0.25 (u_a,i + u_p,i) + 0.5 - y_i,   u_a = X_a w_a + b,  u_p = X_p w_p,

and the gradients are ``g_a = X_a^T d / n + l2 w_a`` (no penalty on the intercept) and
``g_p = X_p^T d / n + l2 w_p``. Full-batch gradient descent from zero weights, ``iterations``
steps of size ``learning_rate``.

Each party has its own CKKS key (:class:`~fedcollab.crypto.LrSecretContext`); the other party gets
the context without any key. One iteration (messages in order):

1. passive -> active, :class:`EncryptedLogits`: ``Enc_p(0.25 u_p)`` (:func:`passive_lr_logits`).
2. active -> passive, :class:`ResidualQuery` (:func:`active_lr_residual`):
   ``Enc_a(a)`` with ``a = 0.25 u_a + 0.5 - y`` (the active's part of the residual, under its own
   key), and its gradient query ``Enc_p(sum_chunks (0.25 u_p + a) x_a,j + r_a,j + e)`` per active
   feature ``j``: masked products computed under the passive's key (see
   :meth:`~fedcollab.crypto.LrPublicContext.masked_products`: per-slot CSPRNG masks ``r``,
   flooding noise ``e``).
3. passive -> active, :class:`GradientExchange` (:func:`passive_lr_gradient`): it decrypts the active's
   query and returns, per active feature, the sum of the used slots, ``n g_a + R_a`` (Gaussian noise
   added under DP): *the passive party's release of g_a to the label holder*. With it, the passive
   party's own query ``Enc_a(sum_chunks (a + 0.25 u_p) x_p,j + r_p,j + e)`` per passive feature.
4. active -> passive, :class:`GradientAnswer` (:func:`active_lr_gradient`): the active removes ``R_a``,
   steps ``w_a``; it decrypts the passive's query and returns ``n g_p + R_p`` (noisy under DP):
   *the active party's release of g_p to the passive party*.
5. the passive removes ``R_p`` and steps ``w_p`` (:func:`passive_lr_update`).

What each party learns (the declared leakage, as in FATE's hetero-LR):

* The active party: ``n`` (already known from the alignment), ``d_p``, and per iteration its own
  gradient ``g_a`` (noisy under DP). It also decrypts the passive's query: per slot a value
  ``v + r`` with ``r`` uniform on [-2^16, 2^16] (statistically masked, distance <= |v| / 2^17 per
  slot) plus flooding noise. It never sees ``X_p``, ``w_p``, ``u_p`` (only under the passive's key,
  which it cannot decrypt) or ``g_p``.
* The passive party: ``n``, ``d_a``, and per iteration its own gradient ``g_p`` (noisy under DP);
  the masked slots of the active's query as above. It never sees ``y``, ``X_a``, ``u_a``, ``a`` or
  ``d`` in the clear (``a`` only under the active's key).
* Both: the gradients are functions of the other party's data (``g_p`` of the labels and ``u_a``;
  ``g_a`` of ``u_p``) and are what DP (optional) protects. Joint prediction
  (:func:`passive_lr_predict`) releases ``u_p`` on the rows to score to the label holder (kind
  ``vertical_logit``, about the test rows).

Optional DP (:func:`plan_vertical_lr_dp`): record-level Gaussian noise on each released gradient sum,
added by the party whose record it protects (the active on ``n g_p``, the passive on ``n g_a``).
Features are assumed scaled by the caller to [-1, 1] (checked under DP), so a record's row has
``||x||_2 <= sqrt(d)``; each party clips its own share of the residual (``a_i`` by the active,
``0.25 u_p,i`` by the passive) to [-c, c] (``residual_clip``). Replacing one record's data at one
party then moves ``d_i`` by at most ``2c`` and the other party's gradient sum ``X^T d`` by at most
``2 c sqrt(d_other)`` in L2 (``d_other`` counts the active's intercept column): the sensitivity,
noise std ``z`` times it. The adversary is semi-honest: a party that scaled its features beyond
[-1, 1] would weaken the other's protection (the bound is declared in the key advert).
``iterations`` releases per party compose (RDP accountant); each party's budget is charged for its
own releases (unit record, observer the other party).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol
from dataclasses import dataclass, field, replace

import numpy as np

from fedcollab.core import CryptoError, ProtocolError
from fedcollab.crypto import LR_FLOOD_STD, LR_MAX_ABS_VALUE, LrPublicContext, LrSecretContext, lr_n_chunks, lr_slots
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, Release, calibrate_noise_multiplier, compute_epsilon
from fedcollab.protocols.vertical._train import Recorder

PROTOCOL = "fedcollab.vertical-lr.v1"
#: Partial logits (times 1/4) above this are refused: the CKKS slots would lose their headroom.
MAX_ABS_LOGIT = 0.25 * LR_MAX_ABS_VALUE


# ----------------------------------------------------------------------------------- parameters


@dataclass(frozen=True)
class VerticalLrParams:
    """Training parameters both parties agree on (from the spec)."""

    iterations: int
    learning_rate: float
    l2: float = 0.0
    flood_std: float = LR_FLOOD_STD

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ProtocolError(f"vertical-lr: `iterations` must be an int >= 1, got {self.iterations!r}.")
        for name in ("learning_rate", "l2", "flood_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (v == 0 and name != "l2"):
                raise ProtocolError(f"vertical-lr: `{name}` must be a finite number {'>= 0' if name == 'l2' else '> 0'}, got {v!r}.")


@dataclass(frozen=True)
class VerticalLrDpPlan:
    """Gaussian noise on both released gradient sums; see the module docstring for the sensitivity.

    ``sensitivity_active`` bounds the change of ``X_a^T d`` (released by the passive party) when one
    record's passive data changes: ``2 c sqrt(d_a + 1)``; ``sensitivity_passive`` that of
    ``X_p^T d`` (released by the active party) when one record's label or active features change:
    ``2 c sqrt(d_p)``.
    """

    iterations: int
    residual_clip: float
    d_active: int
    d_passive: int
    z: float
    target_epsilon: float
    delta: float
    epsilon: float

    @property
    def sensitivity_active(self) -> float:
        """L2 sensitivity of ``X_a^T d`` (intercept column included)."""
        return 2.0 * self.residual_clip * math.sqrt(self.d_active + 1)

    @property
    def sensitivity_passive(self) -> float:
        """L2 sensitivity of ``X_p^T d``."""
        return 2.0 * self.residual_clip * math.sqrt(self.d_passive)


def plan_vertical_lr_dp(*, iterations: int, d_active: int, d_passive: int, target_epsilon: float, delta: float,
                        residual_clip: float = 1.0) -> VerticalLrDpPlan:
    """One noise multiplier for ``iterations`` Gaussian releases per party, calibrated with the RDP accountant."""
    if not (math.isfinite(residual_clip) and residual_clip > 0):
        raise ProtocolError(f"vertical-lr: `residual_clip` must be > 0, got {residual_clip!r}.")
    z = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=None, steps=iterations, accountant="rdp")
    eps = compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=iterations)], delta=delta, accountant="rdp").epsilon
    return VerticalLrDpPlan(iterations=iterations, residual_clip=float(residual_clip), d_active=d_active, d_passive=d_passive, z=z,
                            target_epsilon=target_epsilon, delta=delta, epsilon=eps)


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class LrKeyAdvert:
    """Each party -> the other, once: its CKKS context without any key, and the shape of its data."""

    party: str
    context: bytes = field(repr=False)
    n_records: int
    n_features: int


@dataclass(frozen=True)
class EncryptedLogits:
    """Passive -> active, per iteration: ``Enc_p(0.25 u_p)``, one ciphertext per chunk of records."""

    iteration: int
    chunks: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True)
class ResidualQuery:
    """Active -> passive, per iteration: ``Enc_a(a)`` per chunk, and the active's masked gradient query under the passive key."""

    iteration: int
    residual: tuple[bytes, ...] = field(repr=False)
    query: tuple[bytes, ...] = field(repr=False)  # one ciphertext per active feature (+ intercept)


@dataclass(frozen=True)
class GradientExchange:
    """Passive -> active, per iteration: the active's masked gradient sums, and the passive's masked query under the active key."""

    iteration: int
    answer: np.ndarray = field(repr=False)  # (d_a + 1,)
    query: tuple[bytes, ...] = field(repr=False)  # one ciphertext per passive feature


@dataclass(frozen=True)
class GradientAnswer:
    """Active -> passive, per iteration: the passive's masked gradient sums."""

    iteration: int
    answer: np.ndarray = field(repr=False)  # (d_p,)


@dataclass(frozen=True)
class PartialLogits:
    """Passive -> active, for joint prediction: ``u_p`` of the rows to score (a declared release)."""

    rows: int
    values: np.ndarray = field(repr=False)


# ----------------------------------------------------------------------------------- states


@dataclass(frozen=True)
class ActiveLrState:
    """What the active node keeps (never leaves it)."""

    party: str
    x: np.ndarray = field(repr=False)  # (n, d_a + 1): the last column is the intercept's ones
    y: np.ndarray = field(repr=False)
    w: np.ndarray = field(repr=False)  # (d_a + 1,): intercept last
    params: VerticalLrParams
    plan: VerticalLrDpPlan | None = None
    secret: LrSecretContext | None = field(default=None, repr=False)
    peer: LrPublicContext | None = field(default=None, repr=False)
    peer_features: int = 0
    iteration: int = 0
    expect: str = "logits"  # "logits" -> "exchange" -> "logits" (next iteration)
    mask_sums: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PassiveLrState:
    """What the passive node keeps (never leaves it)."""

    party: str
    x: np.ndarray = field(repr=False)
    w: np.ndarray = field(repr=False)
    params: VerticalLrParams
    plan: VerticalLrDpPlan | None = None
    secret: LrSecretContext | None = field(default=None, repr=False)
    peer: LrPublicContext | None = field(default=None, repr=False)
    peer_features: int = 0
    iteration: int = 0
    expect: str = "send"  # "send" -> "residual" -> "answer" -> "send" (next iteration)
    mask_sums: np.ndarray | None = field(default=None, repr=False)


def _rows(x: np.ndarray, what: str, plan: VerticalLrDpPlan | None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ProtocolError(f"vertical-lr: {what} must have shape (n, d) with n, d >= 1, got {arr.shape}.")
    if not np.isfinite(arr).all():
        raise ProtocolError(f"vertical-lr: {what} must be finite (impute missing values first).")
    limit = 1.0 if plan is not None else LR_MAX_ABS_VALUE
    if np.abs(arr).max() > limit:
        raise ProtocolError(f"vertical-lr: {what} must be scaled to [-{limit:g}, {limit:g}]"
                            f"{' (the DP sensitivity assumes it)' if plan is not None else ''}, got max |x| {np.abs(arr).max():g}.")
    return arr


def active_lr_init(party: str, x: np.ndarray, y: np.ndarray, *, params: VerticalLrParams,
                plan: VerticalLrDpPlan | None = None) -> tuple[ActiveLrState, LrKeyAdvert]:
    """The active party's state (zero weights, a fresh CKKS key) and its advert."""
    arr = _rows(x, "the active party's rows", plan)
    yy = np.asarray(y, dtype=np.float64)
    if yy.shape != (arr.shape[0],) or not np.all((yy == 0) | (yy == 1)):
        raise ProtocolError(f"vertical-lr: labels must be {arr.shape[0]} values in {{0, 1}}.")
    xa = np.hstack([arr, np.ones((arr.shape[0], 1))])
    secret = LrSecretContext.generate()
    state = ActiveLrState(party=party, x=xa, y=yy, w=np.zeros(xa.shape[1]), params=params, plan=plan, secret=secret)
    return state, LrKeyAdvert(party=party, context=secret.public_bytes(), n_records=xa.shape[0], n_features=arr.shape[1])


def passive_lr_init(party: str, x: np.ndarray, *, params: VerticalLrParams,
                 plan: VerticalLrDpPlan | None = None) -> tuple[PassiveLrState, LrKeyAdvert]:
    """The passive party's state (zero weights, a fresh CKKS key) and its advert."""
    arr = _rows(x, "the passive party's rows", plan)
    secret = LrSecretContext.generate()
    state = PassiveLrState(party=party, x=arr, w=np.zeros(arr.shape[1]), params=params, plan=plan, secret=secret)
    return state, LrKeyAdvert(party=party, context=secret.public_bytes(), n_records=arr.shape[0], n_features=arr.shape[1])


def _peer(state: ActiveLrState | PassiveLrState, advert: LrKeyAdvert, want_features: int | None) -> tuple[LrPublicContext, int]:
    if state.peer is not None:
        raise ProtocolError("vertical-lr: the other party's key advert was already received; a second one is refused.")
    n = state.x.shape[0]
    if advert.n_records != n:
        raise ProtocolError(f"vertical-lr: the other party holds {advert.n_records} aligned records, this one {n}.")
    if isinstance(advert.n_features, bool) or not isinstance(advert.n_features, int) or advert.n_features < 1:
        raise ProtocolError(f"vertical-lr: the other party's feature count must be an int >= 1, got {advert.n_features!r}.")
    if want_features is not None and advert.n_features != want_features:
        raise ProtocolError(f"vertical-lr: the plan is for {want_features} features at the other party, its advert says {advert.n_features}.")
    try:
        ctx = LrPublicContext.from_bytes(advert.context, field="advert.context")
    except CryptoError as exc:
        raise ProtocolError(f"vertical-lr: {exc}") from None
    return ctx, int(advert.n_features)


def active_lr_keys(state: ActiveLrState, advert: LrKeyAdvert) -> ActiveLrState:
    """Load the passive party's keyless context."""
    ctx, d = _peer(state, advert, state.plan.d_passive if state.plan else None)
    return replace(state, peer=ctx, peer_features=d)


def passive_lr_keys(state: PassiveLrState, advert: LrKeyAdvert) -> PassiveLrState:
    """Load the active party's keyless context."""
    ctx, d = _peer(state, advert, state.plan.d_active if state.plan else None)
    return replace(state, peer=ctx, peer_features=d)


def _order(state: ActiveLrState | PassiveLrState, iteration: int, want: str, what: str) -> None:
    if state.peer is None:
        raise ProtocolError(f"vertical-lr: {what} before the other party's key advert.")
    if isinstance(iteration, bool) or not isinstance(iteration, int):
        raise ProtocolError(f"vertical-lr: {what} must name an int iteration, got {iteration!r}.")
    if iteration < state.iteration or (iteration == state.iteration and state.expect != want and _passed(state, want)):
        raise ProtocolError(f"vertical-lr: {what} of iteration {iteration} was already received; a repeat is refused.")
    if iteration != state.iteration or state.expect != want:
        raise ProtocolError(f"vertical-lr: {what} of iteration {iteration} is out of order "
                            f"(expecting {state.expect!r} of iteration {state.iteration}).")


_PHASES = {"active": ("logits", "exchange"), "passive": ("send", "residual", "answer")}


def _passed(state: ActiveLrState | PassiveLrState, want: str) -> bool:
    phases = _PHASES["active" if isinstance(state, ActiveLrState) else "passive"]
    return phases.index(state.expect) > phases.index(want)


def _chunks(blobs: object, n: int, what: str) -> tuple[bytes, ...]:
    if not isinstance(blobs, tuple) or len(blobs) != n:
        raise ProtocolError(f"vertical-lr: {what} must be {n} ciphertexts, got {len(blobs) if isinstance(blobs, (tuple, list)) else type(blobs).__name__}.")
    return blobs


def _answer(values: object, d: int, what: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.shape != (d,) or not np.issubdtype(arr.dtype, np.floating):
        raise ProtocolError(f"vertical-lr: {what} must be {d} floats, got shape {arr.shape} ({arr.dtype}).")
    if not np.isfinite(arr).all():
        raise ProtocolError(f"vertical-lr: {what} must be finite, got NaN or infinity.")
    return arr.astype(np.float64)


def _release(*, party: str, observer: str, iteration: int, features: int, plan: VerticalLrDpPlan | None, sensitivity: float | None,
             kind: str = "vertical_gradient", about: str = "train") -> Release:
    if plan is not None and sensitivity is not None:
        mech: GaussianMechanism | NonPrivate = GaussianMechanism(noise_multiplier=plan.z, releases=1)
        extra: dict[str, float | int | str | bool] = {"sigma": plan.z * sensitivity, "sensitivity": sensitivity}
    else:
        mech, extra = NonPrivate(), {}
    return Release(kind=kind, about=about, unit="record", observer=observer, added_by=party, party=party, round=iteration,  # type: ignore[arg-type]
                   mechanism=mech, declared_public=False, details={"iteration": iteration, "features": features, **extra})


def _gen(rng: np.random.Generator | None, what: str) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ProtocolError(f"vertical-lr: {what} needs an explicit numpy Generator (flooding and DP noise).")
    return rng


# ----------------------------------------------------------------------------------- stages


def passive_lr_logits(state: PassiveLrState) -> tuple[PassiveLrState, EncryptedLogits]:
    """Iteration start: ``Enc_p(0.25 u_p)`` under the passive party's own key (nothing is released)."""
    if state.peer is None or state.expect != "send":
        raise ProtocolError(f"vertical-lr: the passive party cannot start an iteration now (expecting {state.expect!r}).")
    if state.iteration >= state.params.iterations:
        raise ProtocolError(f"vertical-lr: all {state.params.iterations} iterations are done; another is refused.")
    b = _share(0.25 * (state.x @ state.w), state.plan, "the passive party's partial logits")
    assert state.secret is not None
    chunks = tuple(state.secret.encrypt(b))
    return replace(state, expect="residual"), EncryptedLogits(iteration=state.iteration, chunks=chunks)


class _Clipping(Protocol):
    residual_clip: float


def _share(v: np.ndarray, plan: _Clipping | None, what: str) -> np.ndarray:
    """A party's residual share: clipped to the plan's ``[-c, c]`` under DP, else refused when it diverges."""
    if plan is not None:
        return np.clip(v, -plan.residual_clip, plan.residual_clip)
    if not np.isfinite(v).all() or np.abs(v).max() > MAX_ABS_LOGIT:
        raise ProtocolError(f"vertical-lr: {what} exceed |{MAX_ABS_LOGIT:g}| (diverging; lower the learning rate).")
    return v


def active_lr_residual(state: ActiveLrState, msg: EncryptedLogits, *, rng: np.random.Generator | None) -> tuple[ActiveLrState, ResidualQuery]:
    """``Enc_a(a)`` and the active's masked gradient query under the passive key (nothing is released: all encrypted)."""
    _order(state, msg.iteration, "logits", "the encrypted logits")
    n = state.x.shape[0]
    chunks = _chunks(msg.chunks, lr_n_chunks(n), "the encrypted logits")
    gen = _gen(rng, "the active party's gradient query")
    a = _share(0.25 * (state.x @ state.w) + 0.5 - state.y, state.plan, "the active party's residual share")
    assert state.peer is not None and state.secret is not None
    try:
        query, mask_sums = state.peer.masked_products(chunks, offset=a, x=state.x, flood_std=float(state.params.flood_std), generator=gen)
    except CryptoError as exc:
        raise ProtocolError(f"vertical-lr: the encrypted logits: {exc}") from None
    residual = tuple(state.secret.encrypt(a))
    msg_out = ResidualQuery(iteration=msg.iteration, residual=residual, query=tuple(query))
    return replace(state, expect="exchange", mask_sums=mask_sums), msg_out


def passive_lr_gradient(state: PassiveLrState, msg: ResidualQuery, *,
                     rng: np.random.Generator | None) -> tuple[PassiveLrState, GradientExchange, Release]:
    """Decrypt the active's query (its masked gradient sums: the release of ``g_a`` to the label holder) and send the passive's own query."""
    _order(state, msg.iteration, "residual", "the residual query")
    n = state.x.shape[0]
    residual = _chunks(msg.residual, lr_n_chunks(n), "the encrypted residual")
    query = _chunks(msg.query, state.peer_features + 1, "the active party's gradient query")
    gen = _gen(rng, "the passive party's gradient query")
    assert state.peer is not None and state.secret is not None
    try:
        sums = state.secret.decrypt_sums(query, used=min(n, lr_slots()))
        b = 0.25 * (state.x @ state.w)
        b = np.clip(b, -state.plan.residual_clip, state.plan.residual_clip) if state.plan is not None else b
        mine, mask_sums = state.peer.masked_products(residual, offset=b, x=state.x, flood_std=float(state.params.flood_std), generator=gen)
    except CryptoError as exc:
        raise ProtocolError(f"vertical-lr: {exc}") from None
    sens = state.plan.sensitivity_active if state.plan is not None else None
    if state.plan is not None:
        assert sens is not None
        sums = sums + gen.normal(0.0, state.plan.z * sens, size=sums.shape)
    event = _release(party=state.party, observer="label_holder", iteration=msg.iteration, features=state.peer_features + 1, plan=state.plan, sensitivity=sens)
    out = GradientExchange(iteration=msg.iteration, answer=sums, query=tuple(mine))
    return replace(state, expect="answer", mask_sums=mask_sums), out, event


def _step(w: np.ndarray, g: np.ndarray, params: VerticalLrParams, *, intercept: bool) -> np.ndarray:
    penalty = params.l2 * w
    if intercept:
        penalty[-1] = 0.0
    return w - params.learning_rate * (g + penalty)


def active_lr_gradient(state: ActiveLrState, msg: GradientExchange, *,
                    rng: np.random.Generator | None) -> tuple[ActiveLrState, GradientAnswer, Release]:
    """Unmask and apply ``g_a``; decrypt the passive's query and answer its masked sums (the release of ``g_p`` to the passive party)."""
    _order(state, msg.iteration, "exchange", "the gradient exchange")
    n, d_a = state.x.shape
    answer = _answer(msg.answer, d_a, "the returned gradient of the active party")
    query = _chunks(msg.query, state.peer_features, "the passive party's gradient query")
    gen = _gen(rng, "the active party's answer")
    assert state.secret is not None and state.mask_sums is not None
    try:
        sums = state.secret.decrypt_sums(query, used=min(n, lr_slots()))
    except CryptoError as exc:
        raise ProtocolError(f"vertical-lr: {exc}") from None
    sens = state.plan.sensitivity_passive if state.plan is not None else None
    if state.plan is not None:
        assert sens is not None
        sums = sums + gen.normal(0.0, state.plan.z * sens, size=sums.shape)
    g = (answer - state.mask_sums) / n
    w = _step(state.w, g, state.params, intercept=True)
    event = _release(party=state.party, observer="passive_party", iteration=msg.iteration, features=state.peer_features, plan=state.plan, sensitivity=sens)
    new = replace(state, w=w, iteration=state.iteration + 1, expect="logits", mask_sums=None)
    return new, GradientAnswer(iteration=msg.iteration, answer=sums), event


def passive_lr_update(state: PassiveLrState, msg: GradientAnswer) -> PassiveLrState:
    """Unmask and apply ``g_p``; the iteration is over."""
    _order(state, msg.iteration, "answer", "the gradient answer")
    n, d_p = state.x.shape
    answer = _answer(msg.answer, d_p, "the returned gradient of the passive party")
    assert state.mask_sums is not None
    g = (answer - state.mask_sums) / n
    return replace(state, w=_step(state.w, g, state.params, intercept=False), iteration=state.iteration + 1, expect="send", mask_sums=None)


# ----------------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class VerticalLrModel:
    """Every party's part of the model: ``w_a`` and the intercept at the active party, ``w_p`` at the passive one.

    ``parts``: each passive party's weights by name (with several passive parties ``passive_weights``
    is the first one's).
    """

    active_weights: np.ndarray
    intercept: float
    passive_weights: np.ndarray
    parts: dict[str, np.ndarray] = field(default_factory=dict)


def passive_lr_predict(party: str, w_p: np.ndarray, x_p: np.ndarray, *, round_: int = 0) -> tuple[PartialLogits, Release]:
    """Joint prediction, passive side: ``u_p = X_p w_p`` of the rows to score, a declared release to the label holder."""
    arr = np.asarray(x_p, dtype=np.float64)
    w = np.asarray(w_p, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != w.shape[0] or not np.isfinite(arr).all():
        raise ProtocolError(f"vertical-lr: rows to score must be finite with shape (m, {w.shape[0]}), got {arr.shape}.")
    event = _release(party=party, observer="label_holder", iteration=round_, features=w.shape[0], plan=None, sensitivity=None,
                     kind="vertical_logit", about="test")
    return PartialLogits(rows=arr.shape[0], values=arr @ w), event


def active_lr_predict(w_a: np.ndarray, x_a: np.ndarray, msg: PartialLogits) -> np.ndarray:
    """Joint prediction, active side: the probabilities ``sigmoid(X_a w_a + b + u_p)`` (``w_a`` with the intercept last)."""
    arr = np.asarray(x_a, dtype=np.float64)
    w = np.asarray(w_a, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] + 1 != w.shape[0]:
        raise ProtocolError(f"vertical-lr: rows to score must have shape (m, {w.shape[0] - 1}), got {arr.shape}.")
    u_p = _answer(msg.values, arr.shape[0], "the passive party's partial logits")
    z = arr @ w[:-1] + w[-1] + u_p
    return 1.0 / (1.0 + np.exp(-z))


# ----------------------------------------------------------------------------------- in process


@dataclass(frozen=True)
class VerticalLrResult:
    """Both parties' weights, every release (per party, in order), what crossed the wire, and (optionally) every message."""

    model: VerticalLrModel
    releases: dict[str, list[Release]]
    wire_bytes: int
    seconds_per_iteration: float
    messages: list[tuple[str, object]]


def _nbytes(msg: object) -> int:
    total = 0
    for v in vars(msg).values():
        if isinstance(v, (bytes, bytearray)):
            total += len(v)
        elif isinstance(v, tuple):
            total += sum(len(b) for b in v if isinstance(b, (bytes, bytearray)))
        elif isinstance(v, np.ndarray):
            total += v.nbytes
    return total


def _payload(msg: object) -> bytes:
    parts = []
    for v in vars(msg).values():
        if isinstance(v, np.ndarray):
            parts.append(v.tobytes())
        elif isinstance(v, tuple):
            parts.extend(b for b in v if isinstance(b, (bytes, bytearray)))
    return b"".join(parts)


@dataclass(frozen=True)
class LrStart:
    """Where a resumed vertical LR run picks up: the iterations done and each party's weights after them.

    ``active_weights`` ends with the intercept (as :attr:`ActiveLrState.w`); each party's part is
    kept at its own node (its checkpoint), never sent to the other.
    """

    iterations: int
    active_weights: np.ndarray
    passive_weights: np.ndarray


def _check_lr_start(start: LrStart, iterations: int, d_a: int, d_p: int) -> None:
    k = start.iterations
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < iterations:
        raise ProtocolError(f"vertical-lr: a resumed run starts after 1..{iterations - 1} iteration(s), got {k!r}.")
    for what, w, d in (("active_weights", start.active_weights, d_a + 1), ("passive_weights", start.passive_weights, d_p)):
        arr = np.asarray(w, dtype=np.float64)
        if arr.shape != (d,) or not np.isfinite(arr).all():
            raise ProtocolError(f"vertical-lr: the resumed run's {what} must be {d} finite values, got shape {arr.shape}.")


def train_vertical_lr_in_process(active: tuple[str, np.ndarray, np.ndarray], passive: tuple[str, np.ndarray], *, iterations: int,
                                 learning_rate: float, l2: float = 0.0, rng: np.random.Generator | None = None,
                                 record: Recorder | None = None, plan: VerticalLrDpPlan | None = None,
                                 flood_std: float = LR_FLOOD_STD, keep_messages: bool = False,
                                 on_message: Callable[[str, object], None] | None = None, start: LrStart | None = None,
                                 on_checkpoint: Callable[[LrStart], None] | None = None) -> VerticalLrResult:
    """Vertical LR between ``active = (name, x_a, y)`` and ``passive = (name, x_p)`` (aligned rows), both as function calls.

    ``record(release, payload)`` sees every release before the message carrying it is handed over
    (a raise stops the run with that message unsent); ``on_message(receiver, message)`` is called as
    each message is handed over (after its release is recorded). ``rng`` seeds both parties' noise generators
    (flooding, DP); ``None`` draws a seed from the OS CSPRNG. ``messages`` holds ``(receiver, message)``.
    ``start`` resumes after ``start.iterations`` iterations (fresh CKKS keys, the weights given);
    ``on_checkpoint`` receives the state after every iteration but the last.
    """
    import secrets
    import time

    a_name, x_a, y = active
    p_name, x_p = passive
    params = VerticalLrParams(iterations=iterations, learning_rate=float(learning_rate), l2=float(l2), flood_std=float(flood_std))
    root = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    rng_a, rng_p = root.spawn(2)
    releases: dict[str, list[Release]] = {a_name: [], p_name: []}
    messages: list[tuple[str, object]] = []
    wire = 0

    def hand(to: str, msg: object, event: Release | None = None) -> None:
        nonlocal wire
        if event is not None:
            if record is not None:
                record(event, _payload(msg))
            releases[event.party].append(event)
        wire += _nbytes(msg)
        if on_message is not None:
            on_message(to, msg)
        if keep_messages:
            messages.append((to, msg))

    a, adv_a = active_lr_init(a_name, x_a, y, params=params, plan=plan)
    p, adv_p = passive_lr_init(p_name, x_p, params=params, plan=plan)
    hand(p_name, adv_a)
    hand(a_name, adv_p)
    a = active_lr_keys(a, adv_p)
    p = passive_lr_keys(p, adv_a)
    first = 0
    if start is not None:
        _check_lr_start(start, iterations, x_a.shape[1], x_p.shape[1])
        first = start.iterations
        a = replace(a, w=np.asarray(start.active_weights, dtype=np.float64).copy(), iteration=first)
        p = replace(p, w=np.asarray(start.passive_weights, dtype=np.float64).copy(), iteration=first)
    t0 = time.perf_counter()
    for _ in range(first, iterations):
        p, logits = passive_lr_logits(p)
        hand(a_name, logits)
        a, query = active_lr_residual(a, logits, rng=rng_a)
        hand(p_name, query)
        p, exchange, ev_p = passive_lr_gradient(p, query, rng=rng_p)
        hand(a_name, exchange, ev_p)
        a, answer, ev_a = active_lr_gradient(a, exchange, rng=rng_a)
        hand(p_name, answer, ev_a)
        p = passive_lr_update(p, answer)
        if on_checkpoint is not None and p.iteration < iterations:
            on_checkpoint(LrStart(iterations=p.iteration, active_weights=a.w.copy(), passive_weights=p.w.copy()))
    spi = (time.perf_counter() - t0) / max(1, iterations - first)
    model = VerticalLrModel(active_weights=a.w[:-1].copy(), intercept=float(a.w[-1]), passive_weights=p.w.copy(), parts={p_name: p.w.copy()})
    return VerticalLrResult(model=model, releases=releases, wire_bytes=wire, seconds_per_iteration=spi, messages=messages)


def predict_vertical_lr_in_process(model: VerticalLrModel, x_a: np.ndarray, passive: tuple[str, np.ndarray], *,
                                   record: Recorder | None = None) -> tuple[np.ndarray, Release]:
    """Joint prediction of rows (aligned) in-process: the passive party's partial logits (recorded first), then the active's probabilities."""
    msg, event = passive_lr_predict(passive[0], model.passive_weights, passive[1])
    if record is not None:
        record(event, msg.values.tobytes())
    return active_lr_predict(np.append(model.active_weights, model.intercept), x_a, msg), event
