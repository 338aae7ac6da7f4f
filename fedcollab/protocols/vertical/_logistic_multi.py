"""Vertical logistic regression with two or more passive parties: two key holders, masked gradients, star messages.

The label holder (*active*, ``X_a``, ``y``) and passive parties ``P_1 .. P_K`` (``K >= 2``, in the
spec's order) train ``sigmoid(X_a w_a + b + sum_k X_k w_k)`` with the Taylor loss of
:mod:`fedcollab.protocols.vertical._logistic`. The residual is an additive sharing among all parties,

    d = a + sum_k v_k,   a = 0.25 u_a + 0.5 - y (active),   v_k = 0.25 X_k w_k (passive k),

and party ``X``'s gradient is ``g_X = X_X^T d / n (+ l2 w_X)``. The two-party protocol evaluates
each party's gradient under the *other* party's key; with more parties no party may hold, under its
own key, a ciphertext of another party's share. So two passive parties are **key holders**:
``P_1`` and ``P_2`` each generate a CKKS key with a public part (TenSEAL, the parameters of
:mod:`fedcollab.crypto._ckks_vertical`), which every other party receives (the label holder
relays them). Every party but ``P_1`` computes its gradient under ``P_1``'s key and ``P_1``
decrypts it; ``P_1`` computes its own under ``P_2``'s key and ``P_2`` decrypts it. All messages go
through the label holder (a star, as the deployed relay is), which holds no key used here.

Per iteration ``t`` (three exchanges):

1. every passive ``k`` -> active, :class:`SharedLogits`: ``Enc_1(v_k)`` and ``Enc_2(v_k)`` (under both
   key holders' public keys; ``P_1`` encrypts under its own key directly).
2. active -> passive ``k``, :class:`MultiResidual`: ``Enc_H(a + sum_{j != k} v_j)`` (the ciphertexts
   summed and ``a`` added as a plaintext by the active; ``H`` = 2 for ``P_1``, 1 otherwise); with it,
   to ``P_1``, a :class:`DecryptRequest` of the active's masked products
   ``Enc_1(sum_chunks d x_a,j + r_a,j + e)``. Each passive returns (:class:`MultiQuery`) its own
   masked products ``Enc_H(sum_chunks (residual + v_k) x_k,j + r_k,j + e)``; ``P_1`` also answers
   the active's request (:class:`DecryptAnswer`: ``n g_a + R_a`` + DP noise).
3. active -> ``P_1``: a request for every other passive's products; -> ``P_2``: for ``P_1``'s. They
   answer with the masked sums (+ DP noise).
4. active -> every passive, :class:`GradientAnswer` (as in two-party LR): its masked sums; it
   removes its mask, steps ``w_k`` and starts the next iteration (step 1 rides on the reply).

Masks ``r`` come from the OS CSPRNG, the flooding noise ``e`` from the generator passed in, as in
the two-party protocol. A key holder can only decrypt ciphertexts at the last level of the chain
(masked products); fresh shares are refused by :meth:`~fedcollab.crypto.LrSecretContext.decrypt_sums`.

What each party learns (semi-honest, no collusion between the label holder and a key holder):
its own gradient per iteration (noisy under DP); a key holder also sees masked sums of the
gradients it decrypts (statistically masked, as in the two-party protocol). No party sees another's
share of the residual, its partial logits, features or weights. A label holder colluding with
``P_1`` (or ``P_2``) learns every share encrypted under that key: the price of having no third
party, stated in docs/vertical-lr.md.

Releases and DP. Party ``Q``'s data is in every other party's gradient, so ``Q`` records, per
iteration, one release per other party ``X`` (kind ``vertical_gradient``, observer ``X``'s role,
``details.recipient`` = ``X``), **before** its share of that iteration leaves it: the active when it
sends the residuals (step 2), a passive when it sends its encrypted logits (step 1). Under DP each
share is clipped to ``[-c, c]``, so one record's data at one party moves ``d_i`` by at most ``2c``
and ``X_X^T d`` by at most ``2 c sqrt(d_X)`` (``d_a + 1`` with the intercept); the party that
decrypts ``X``'s gradient adds Gaussian noise of std ``z`` times that before it answers. ``z`` is
calibrated for ``K`` releases per party per iteration (:func:`plan_multi_lr_dp`). The noise is
added by the key holder, not by each party whose data it protects: a semi-honest assumption.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from fedcollab.core import CryptoError, ProtocolError
from fedcollab.crypto import LR_FLOOD_STD, LrPublicContext, LrSecretContext, lr_n_chunks, lr_slots
from fedcollab.privacy.accounting import GaussianMechanism, NonPrivate, Release, calibrate_noise_multiplier, compute_epsilon
from fedcollab.protocols.vertical._codec import register
from fedcollab.protocols.vertical._logistic import (
    GradientAnswer,
    VerticalLrParams,
    _answer,
    _share,
    _nbytes,
    _step,
)
from fedcollab.protocols.vertical._train import Recorder

PROTOCOL = "fedcollab.vertical-lr-multi.v1"
Outbox = Mapping[str, tuple[object, ...]]
Inbox = Mapping[str, Sequence[object]]


# ----------------------------------------------------------------------------------- DP plan


@dataclass(frozen=True)
class MultiLrDpPlan:
    """One noise multiplier for every released gradient sum; ``releases`` per party (its share is in every other party's gradient)."""

    iterations: int
    parties: int
    residual_clip: float
    z: float
    target_epsilon: float
    delta: float
    epsilon: float

    @property
    def releases(self) -> int:
        """Gaussian releases that hold one party's data: ``iterations`` x (parties - 1)."""
        return self.iterations * (self.parties - 1)

    def sensitivity(self, features: int) -> float:
        """L2 sensitivity of ``X^T d`` for a party with ``features`` columns (the active counts its intercept)."""
        return 2.0 * self.residual_clip * math.sqrt(features)


def plan_multi_lr_dp(*, iterations: int, parties: int, target_epsilon: float, delta: float, residual_clip: float = 1.0) -> MultiLrDpPlan:
    """Calibrate ``z`` for ``iterations x (parties - 1)`` Gaussian releases per party with the RDP accountant."""
    if isinstance(parties, bool) or not isinstance(parties, int) or parties < 3:
        raise ProtocolError(f"vertical-lr: the several-passive protocol needs at least 3 parties, got {parties!r}.")
    if not (math.isfinite(residual_clip) and residual_clip > 0):
        raise ProtocolError(f"vertical-lr: `residual_clip` must be > 0, got {residual_clip!r}.")
    steps = iterations * (parties - 1)
    z = calibrate_noise_multiplier(target_epsilon=target_epsilon, delta=delta, sample_rate=None, steps=steps, accountant="rdp")
    eps = compute_epsilon([GaussianMechanism(noise_multiplier=z, releases=steps)], delta=delta, accountant="rdp").epsilon
    return MultiLrDpPlan(iterations=iterations, parties=parties, residual_clip=float(residual_clip), z=z, target_epsilon=target_epsilon,
                         delta=delta, epsilon=eps)


# ----------------------------------------------------------------------------------- messages


@register
@dataclass(frozen=True)
class LrMultiAdvert:
    """Each passive party -> the label holder, once: its shape and, from a key holder, its context with the public key (else empty)."""

    party: str
    n_records: int
    n_features: int
    context: bytes = field(repr=False)


@register
@dataclass(frozen=True)
class LrMultiKeys:
    """Label holder -> every passive party, once: both key holders' public contexts."""

    first: bytes = field(repr=False)
    second: bytes = field(repr=False)


@register
@dataclass(frozen=True)
class SharedLogits:
    """Passive -> label holder, per iteration: its residual share under each key holder's key."""

    iteration: int
    first: tuple[bytes, ...] = field(repr=False)
    second: tuple[bytes, ...] = field(repr=False)


@register
@dataclass(frozen=True)
class MultiResidual:
    """Label holder -> passive, per iteration: everyone else's shares, summed under the key it evaluates under."""

    iteration: int
    residual: tuple[bytes, ...] = field(repr=False)


@register
@dataclass(frozen=True)
class MultiQuery:
    """Passive -> label holder, per iteration: its masked gradient products (for its key holder to decrypt)."""

    iteration: int
    query: tuple[bytes, ...] = field(repr=False)


@register
@dataclass(frozen=True)
class DecryptRequest:
    """Label holder -> key holder: the masked products of ``owners`` (one tuple of ciphertexts each) to decrypt."""

    iteration: int
    owners: tuple[str, ...]
    queries: tuple[tuple[bytes, ...], ...] = field(repr=False)


@register
@dataclass(frozen=True)
class DecryptAnswer:
    """Key holder -> label holder: each owner's masked sums (+ DP noise), for the label holder to pass on."""

    iteration: int
    owners: tuple[str, ...]
    sums: tuple[np.ndarray, ...] = field(repr=False)


# ----------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class Roles:
    """Who is who, from the approved spec: the label holder, the passive parties in order, each party's feature count."""

    active: str
    passives: tuple[str, ...]
    features: Mapping[str, int]  # the active's without its intercept

    def __post_init__(self) -> None:
        if len(self.passives) < 2 or len(set(self.passives)) != len(self.passives) or self.active in self.passives:
            raise ProtocolError(f"vertical-lr: the several-passive protocol needs 2 or more distinct passive parties, got {list(self.passives)}.")
        for p in (self.active, *self.passives):
            d = self.features.get(p)
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ProtocolError(f"vertical-lr: {p!r}'s feature count must be an int >= 1, got {d!r}.")

    @property
    def holders(self) -> tuple[str, str]:
        """The two key holders: the first two passive parties."""
        return self.passives[0], self.passives[1]

    def decryptor(self, party: str) -> str:
        """Who decrypts ``party``'s gradient: the second key holder for the first, the first for everyone else."""
        return self.holders[1] if party == self.holders[0] else self.holders[0]

    def columns(self, party: str) -> int:
        """The columns of ``party``'s gradient (the active's intercept included)."""
        return self.features[party] + (1 if party == self.active else 0)

    def observer(self, party: str) -> str:
        """The ledger role of ``party`` as an observer."""
        return "label_holder" if party == self.active else "passive_party"


def _matrix(x: np.ndarray, what: str, plan: MultiLrDpPlan | None) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1 or not np.isfinite(arr).all():
        raise ProtocolError(f"vertical-lr: {what} must be finite with shape (n, d), n, d >= 1, got {arr.shape}.")
    if plan is not None and np.abs(arr).max() > 1.0:
        raise ProtocolError(f"vertical-lr: {what} must be scaled to [-1, 1] (the DP sensitivity assumes it), got max |x| {np.abs(arr).max():g}.")
    return arr


def contribution_releases(roles: Roles, party: str, iteration: int, plan: MultiLrDpPlan | None, *, planned: bool = False) -> list[Release]:
    """``party``'s releases of one iteration: one per other party's gradient, which its share feeds (recorded before the share leaves)."""
    out = []
    for x in (roles.active, *roles.passives):
        if x == party:
            continue
        details: dict[str, float | int | str | bool] = {"iteration": iteration, "features": roles.columns(x), "recipient": x,
                                                         "decrypted_by": roles.decryptor(x)}
        if planned:
            details["planned"] = True
        if plan is not None:
            s = plan.sensitivity(roles.columns(x))
            mech: GaussianMechanism | NonPrivate = GaussianMechanism(noise_multiplier=plan.z, releases=1)
            details.update({"sigma": plan.z * s, "sensitivity": s})
        else:
            mech = NonPrivate()
        out.append(Release(kind="vertical_gradient", about="train", unit="record", observer=roles.observer(x), added_by=party,  # type: ignore[arg-type]
                           party=party, round=iteration, mechanism=mech, declared_public=False, details=details))
    return out


def _ciphertexts(blobs: object, n: int, what: str) -> tuple[bytes, ...]:
    if not isinstance(blobs, tuple) or len(blobs) != n or not all(isinstance(b, (bytes, bytearray)) for b in blobs):
        got = len(blobs) if isinstance(blobs, (tuple, list)) else type(blobs).__name__
        raise ProtocolError(f"vertical-lr: {what} must be {n} ciphertexts, got {got}.")
    return blobs


def _iteration(got: object, want: int, what: str) -> None:
    if isinstance(got, bool) or not isinstance(got, int) or got != want:
        raise ProtocolError(f"vertical-lr: {what} names iteration {got!r}; expecting {want} (a repeat or a message out of order is refused).")


# ----------------------------------------------------------------------------------- passive party


class LrMultiPassive:
    """A passive party of the several-passive protocol: answers one message of the label holder at a time."""

    def __init__(self, party: str, x: np.ndarray, *, roles: Roles, params: VerticalLrParams, plan: MultiLrDpPlan | None,
                 rng: np.random.Generator | None, record: Recorder | None = None, first: int = 0,
                 weights: np.ndarray | None = None) -> None:
        if party not in roles.passives:
            raise ProtocolError(f"vertical-lr: {party!r} is not a passive party of this run ({list(roles.passives)}).")
        if not isinstance(rng, np.random.Generator):
            raise ProtocolError("vertical-lr: a passive party needs an explicit numpy Generator (flooding and DP noise).")
        self.party, self.roles, self.params, self.plan, self.rng, self.record = party, roles, params, plan, rng, record
        self.x = _matrix(x, f"{party}'s rows", plan)
        if self.x.shape[1] != roles.features[party]:
            raise ProtocolError(f"vertical-lr: {party!r} holds {self.x.shape[1]} feature(s), the spec gives it {roles.features[party]}.")
        self.n = self.x.shape[0]
        self.w = np.zeros(self.x.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64).copy()
        if self.w.shape != (self.x.shape[1],) or not np.isfinite(self.w).all():
            raise ProtocolError(f"vertical-lr: {party!r}'s starting weights must be {self.x.shape[1]} finite values, got shape {self.w.shape}.")
        self.holder = roles.holders.index(party) if party in roles.holders else None
        self.secret = LrSecretContext.generate(public_key=True) if self.holder is not None else None
        self.keys: tuple[LrPublicContext | None, LrPublicContext | None] = (None, None)
        self.iteration = int(first)
        self.expect = "keys"
        self._mask: np.ndarray | None = None
        self._decrypted: set[str] = set()
        self.finished = False

    def advert(self) -> LrMultiAdvert:
        """Its shape and, as a key holder, its public context."""
        ctx = self.secret.public_bytes() if self.secret is not None else b""
        return LrMultiAdvert(party=self.party, n_records=self.n, n_features=self.x.shape[1], context=ctx)

    def handle(self, msg: object) -> tuple[object, ...]:
        """Answer one message (refused with ``ProtocolError`` when out of order, repeated or malformed)."""
        if self.finished:
            raise ProtocolError("vertical-lr: the run is finished; no more messages are answered.")
        if isinstance(msg, LrMultiKeys):
            return self._keys(msg)
        if isinstance(msg, MultiResidual):
            return self._residual(msg)
        if isinstance(msg, DecryptRequest):
            return self._decrypt(msg)
        if isinstance(msg, GradientAnswer):
            return self._update(msg)
        raise ProtocolError(f"vertical-lr: a passive party does not take a {type(msg).__name__}.")

    def _keys(self, msg: LrMultiKeys) -> tuple[object, ...]:
        if self.expect != "keys":
            raise ProtocolError("vertical-lr: the key holders' contexts were already received; a second set is refused.")
        loaded: list[LrPublicContext | None] = []
        for i, blob in enumerate((msg.first, msg.second)):
            if self.holder == i:
                loaded.append(None)  # its own key: it encrypts with the secret context
                continue
            try:
                loaded.append(LrPublicContext.from_bytes(blob, field=f"keys.{'first' if i == 0 else 'second'}", public_key=True))
            except CryptoError as exc:
                raise ProtocolError(f"vertical-lr: {exc}") from None
        self.keys = (loaded[0], loaded[1])
        return (self._logits(),)

    def _under(self, i: int, values: np.ndarray) -> tuple[bytes, ...]:
        if self.holder == i:
            assert self.secret is not None
            return tuple(self.secret.encrypt(values))
        ctx = self.keys[i]
        assert ctx is not None
        return tuple(ctx.encrypt(values))

    def share(self) -> np.ndarray:
        """Its residual share ``0.25 X_k w_k`` (clipped under DP)."""
        return _share(0.25 * (self.x @ self.w), self.plan, f"{self.party}'s partial logits")

    def _logits(self) -> SharedLogits:
        if self.iteration >= self.params.iterations:
            raise ProtocolError(f"vertical-lr: all {self.params.iterations} iterations are done; another is refused.")
        v = self.share()
        for ev in contribution_releases(self.roles, self.party, self.iteration, self.plan):
            if self.record is not None:
                self.record(ev, v.tobytes())
        out = SharedLogits(iteration=self.iteration, first=self._under(0, v), second=self._under(1, v))
        self.expect = "residual"
        self._decrypted = set()
        return out

    def _residual(self, msg: MultiResidual) -> tuple[object, ...]:
        if self.expect != "residual":
            raise ProtocolError(f"vertical-lr: a residual now is out of order (expecting {self.expect!r} of iteration {self.iteration}).")
        _iteration(msg.iteration, self.iteration, "the residual")
        chunks = _ciphertexts(msg.residual, lr_n_chunks(self.n), "the residual")
        ctx = self.keys[1 if self.holder == 0 else 0]
        assert ctx is not None
        try:
            query, self._mask = ctx.masked_products(chunks, offset=self.share(), x=self.x, flood_std=float(self.params.flood_std), generator=self.rng)
        except CryptoError as exc:
            raise ProtocolError(f"vertical-lr: the residual: {exc}") from None
        self.expect = "answer"
        return (MultiQuery(iteration=self.iteration, query=tuple(query)),)

    def _decrypt(self, msg: DecryptRequest) -> tuple[object, ...]:
        if self.secret is None or self.holder is None:
            raise ProtocolError(f"vertical-lr: {self.party!r} holds no key of this run; it decrypts nothing.")
        if self.expect != "answer":
            raise ProtocolError(f"vertical-lr: a decryption request now is out of order (expecting {self.expect!r} of iteration {self.iteration}).")
        _iteration(msg.iteration, self.iteration, "the decryption request")
        owners = msg.owners
        if not isinstance(owners, tuple) or not isinstance(msg.queries, tuple) or len(owners) != len(msg.queries) or not owners:
            raise ProtocolError("vertical-lr: a decryption request needs one tuple of ciphertexts per owner.")
        mine = {p for p in (self.roles.active, *self.roles.passives) if self.roles.decryptor(p) == self.party}
        sums = []
        for owner, q in zip(owners, msg.queries, strict=True):
            if owner not in mine:
                raise ProtocolError(f"vertical-lr: {self.party!r} decrypts the gradients of {sorted(mine)}, not of {owner!r}.")
            if owner in self._decrypted:
                raise ProtocolError(f"vertical-lr: {owner!r}'s gradient of iteration {self.iteration} was already decrypted; a repeat is refused.")
            cols = self.roles.columns(owner)
            try:
                s = self.secret.decrypt_sums(_ciphertexts(q, cols, f"{owner}'s masked products"), used=min(self.n, lr_slots()))
            except CryptoError as exc:
                raise ProtocolError(f"vertical-lr: {owner}'s masked products: {exc}") from None
            if self.plan is not None:
                s = s + self.rng.normal(0.0, self.plan.z * self.plan.sensitivity(cols), size=s.shape)
            self._decrypted.add(owner)
            sums.append(s)
        return (DecryptAnswer(iteration=self.iteration, owners=owners, sums=tuple(sums)),)

    def _update(self, msg: GradientAnswer) -> tuple[object, ...]:
        if self.expect != "answer":
            raise ProtocolError(f"vertical-lr: a gradient answer now is out of order (expecting {self.expect!r} of iteration {self.iteration}).")
        _iteration(msg.iteration, self.iteration, "the gradient answer")
        answer = _answer(msg.answer, self.x.shape[1], f"the returned gradient of {self.party}")
        assert self._mask is not None
        self.w = _step(self.w, (answer - self._mask) / self.n, self.params, intercept=False)
        self._mask = None
        self.iteration += 1
        if self.iteration >= self.params.iterations:
            self.expect = "done"
            return ()
        return (self._logits(),)


# ----------------------------------------------------------------------------------- label holder


def _only(inbox: Inbox, party: str, cls: type, what: str) -> object:
    got = [m for m in inbox.get(party, ()) if isinstance(m, cls)]
    if len(got) != 1:
        raise ProtocolError(f"vertical-lr: expected one {cls.__name__} ({what}) from {party!r}, got {len(got)}.")
    return got[0]


def _sums_for(answer: DecryptAnswer, owners: Sequence[str], roles: Roles, iteration: int, holder: str) -> dict[str, np.ndarray]:
    _iteration(answer.iteration, iteration, f"{holder}'s decrypted sums")
    if tuple(answer.owners) != tuple(owners) or not isinstance(answer.sums, tuple) or len(answer.sums) != len(owners):
        raise ProtocolError(f"vertical-lr: {holder!r} answered for {list(answer.owners)}, asked for {list(owners)}.")
    return {o: _answer(s, roles.columns(o), f"{o}'s decrypted sums") for o, s in zip(owners, answer.sums, strict=True)}


def lr_multi_active(x: np.ndarray, y: np.ndarray, *, roles: Roles, adverts: Mapping[str, LrMultiAdvert], params: VerticalLrParams,
                    plan: MultiLrDpPlan | None, rng: np.random.Generator | None, record: Recorder | None = None, first: int = 0,
                    weights: np.ndarray | None = None, final: tuple[object, ...] = (), on_iteration: Callable[[int], None] | None = None,
                    checkpoint: Callable[[int, np.ndarray], None] | None = None) -> Generator[Outbox, Inbox, tuple[np.ndarray, Inbox]]:
    """The label holder's side as a generator of outboxes (``{passive: messages}``); returns its weights (intercept last) and the last inbox.

    ``adverts``: each passive party's :class:`LrMultiAdvert` (checked against ``roles``); ``final``
    rides with the last gradient answers (e.g. a prediction request). ``checkpoint(done, weights)``
    runs when every passive party's logits of iteration ``done`` say it applied iteration ``done - 1``.
    """
    if not isinstance(rng, np.random.Generator):
        raise ProtocolError("vertical-lr: the label holder needs an explicit numpy Generator (flooding noise).")
    xa = _matrix(x, "the label holder's rows", plan)
    yy = np.asarray(y, dtype=np.float64)
    n = xa.shape[0]
    if yy.shape != (n,) or not np.all((yy == 0) | (yy == 1)):
        raise ProtocolError(f"vertical-lr: labels must be {n} values in {{0, 1}}.")
    if xa.shape[1] != roles.features[roles.active]:
        raise ProtocolError(f"vertical-lr: the label holder holds {xa.shape[1]} feature(s), the spec gives it {roles.features[roles.active]}.")
    xa = np.hstack([xa, np.ones((n, 1))])
    w = np.zeros(xa.shape[1]) if weights is None else np.asarray(weights, dtype=np.float64).copy()
    if w.shape != (xa.shape[1],) or not np.isfinite(w).all():
        raise ProtocolError(f"vertical-lr: the label holder's starting weights must be {xa.shape[1]} finite values, got shape {w.shape}.")
    if set(adverts) != set(roles.passives):
        raise ProtocolError(f"vertical-lr: adverts from {sorted(adverts)}, expected {sorted(roles.passives)}.")
    keys: list[LrPublicContext] = []
    for p in roles.passives:
        adv = adverts[p]
        if not isinstance(adv, LrMultiAdvert) or adv.party != p or adv.n_records != n or adv.n_features != roles.features[p]:
            raise ProtocolError(f"vertical-lr: {p!r}'s advert must name it with {n} records and {roles.features[p]} feature(s).")
        if p in roles.holders:
            try:
                keys.append(LrPublicContext.from_bytes(adv.context, field=f"{p}'s advert.context", public_key=True))
            except CryptoError as exc:
                raise ProtocolError(f"vertical-lr: {exc}") from None
        elif adv.context:
            raise ProtocolError(f"vertical-lr: {p!r} is not a key holder; its advert must carry no context.")
    h0, h1 = roles.holders
    k1, k2 = keys
    inbox = yield {p: (LrMultiKeys(first=adverts[h0].context, second=adverts[h1].context),) for p in roles.passives}
    for it in range(first, params.iterations):
        shares = {}
        for p in roles.passives:
            sl = _only(inbox, p, SharedLogits, "its encrypted share")
            assert isinstance(sl, SharedLogits)
            _iteration(sl.iteration, it, f"{p}'s encrypted share")
            shares[p] = (_ciphertexts(sl.first, lr_n_chunks(n), f"{p}'s share under the first key"),
                         _ciphertexts(sl.second, lr_n_chunks(n), f"{p}'s share under the second key"))
        if it > first and checkpoint is not None:
            checkpoint(it, w.copy())
        a = _share(0.25 * (xa @ w) + 0.5 - yy, plan, "the label holder's residual share")
        for ev in contribution_releases(roles, roles.active, it, plan):
            if record is not None:
                record(ev, a.tobytes())
        try:
            residual = {p: (k2 if p == h0 else k1).add([shares[q][1 if p == h0 else 0] for q in roles.passives if q != p], offset=a, n=n)
                        for p in roles.passives}
            mine, mask = k1.masked_products(k1.add([shares[q][0] for q in roles.passives], n=n), offset=a, x=xa,
                                            flood_std=float(params.flood_std), generator=rng)
        except CryptoError as exc:
            raise ProtocolError(f"vertical-lr: the passive parties' shares: {exc}") from None
        out: dict[str, tuple[object, ...]] = {p: (MultiResidual(iteration=it, residual=tuple(residual[p])),) for p in roles.passives}
        out[h0] += (DecryptRequest(iteration=it, owners=(roles.active,), queries=(tuple(mine),)),)
        inbox = yield out
        queries: dict[str, tuple[bytes, ...]] = {}
        for p in roles.passives:
            mq = _only(inbox, p, MultiQuery, "its masked products")
            assert isinstance(mq, MultiQuery)
            _iteration(mq.iteration, it, f"{p}'s masked products")
            queries[p] = _ciphertexts(mq.query, roles.columns(p), f"{p}'s masked products")
        got = _only(inbox, h0, DecryptAnswer, "the label holder's decrypted sums")
        assert isinstance(got, DecryptAnswer)
        g_a = (_sums_for(got, (roles.active,), roles, it, h0)[roles.active] - mask) / n
        w = _step(w, g_a, params, intercept=True)
        others = tuple(p for p in roles.passives if p != h0)
        inbox = yield {h0: (DecryptRequest(iteration=it, owners=others, queries=tuple(queries[p] for p in others)),),
                       h1: (DecryptRequest(iteration=it, owners=(h0,), queries=(queries[h0],)),)}
        a0 = _only(inbox, h0, DecryptAnswer, "the other passive parties' decrypted sums")
        a1 = _only(inbox, h1, DecryptAnswer, f"{h0}'s decrypted sums")
        assert isinstance(a0, DecryptAnswer) and isinstance(a1, DecryptAnswer)
        answers = {**_sums_for(a0, others, roles, it, h0), **_sums_for(a1, (h0,), roles, it, h1)}
        last = it == params.iterations - 1
        inbox = yield {p: (GradientAnswer(iteration=it, answer=answers[p]), *(final if last else ())) for p in roles.passives}
        if on_iteration is not None:
            on_iteration(it)
    return w, inbox


# ----------------------------------------------------------------------------------- in process


@dataclass(frozen=True)
class MultiLrResult:
    """Every party's weights (the label holder's with the intercept last), every release by party, the bytes that crossed."""

    active_weights: np.ndarray
    intercept: float
    passive_weights: dict[str, np.ndarray]
    releases: dict[str, list[Release]]
    wire_bytes: int
    seconds_per_iteration: float


@dataclass(frozen=True)
class MultiLrStart:
    """Where a resumed run picks up: the iterations done and each party's weights after them (the label holder's intercept last)."""

    iterations: int
    active_weights: np.ndarray
    passive_weights: Mapping[str, np.ndarray]


def train_vertical_lr_multi_in_process(active: tuple[str, np.ndarray, np.ndarray], passives: Sequence[tuple[str, np.ndarray]], *,
                                       iterations: int, learning_rate: float, l2: float = 0.0, rng: np.random.Generator | None = None,
                                       record: Recorder | None = None, plan: MultiLrDpPlan | None = None, flood_std: float = LR_FLOOD_STD,
                                       on_message: Callable[[str, object], None] | None = None, start: MultiLrStart | None = None,
                                       on_checkpoint: Callable[[MultiLrStart], None] | None = None,
                                       seen: Callable[[str, str, object], None] | None = None) -> MultiLrResult:
    """The several-passive protocol with every party as an object in this process (the label holder relaying, as a coordinator would).

    ``record(release, payload)`` sees every release first (a raise stops the run); ``seen(sender,
    receiver, message)`` every message; ``on_message(receiver, message)`` as in the two-party driver.
    """
    a_name, x_a, y = active
    roles = Roles(active=a_name, passives=tuple(p for p, _ in passives),
                  features={a_name: int(np.asarray(x_a).shape[1]), **{p: int(np.asarray(x).shape[1]) for p, x in passives}})
    params = VerticalLrParams(iterations=iterations, learning_rate=float(learning_rate), l2=float(l2), flood_std=float(flood_std))
    root = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
    gens = root.spawn(1 + len(passives))
    releases: dict[str, list[Release]] = {a_name: [], **{p: [] for p, _ in passives}}

    def rec(ev: Release, payload: bytes) -> None:
        if record is not None:
            record(ev, payload)
        releases[ev.party].append(ev)

    first = 0 if start is None else int(start.iterations)
    if start is not None and not 1 <= first < iterations:
        raise ProtocolError(f"vertical-lr: a resumed run starts after 1..{iterations - 1} iteration(s), got {first!r}.")
    nodes = {p: LrMultiPassive(p, x, roles=roles, params=params, plan=plan, rng=gens[i + 1], record=rec, first=first,
                               weights=None if start is None else start.passive_weights.get(p))
             for i, (p, x) in enumerate(passives)}
    wire = 0

    def hand(sender: str, to: str, msg: object) -> None:
        nonlocal wire
        wire += _nbytes(msg)
        if seen is not None:
            seen(sender, to, msg)
        if on_message is not None:
            on_message(to, msg)

    adverts = {}
    for p, node in nodes.items():
        adverts[p] = node.advert()
        hand(p, a_name, adverts[p])

    def ckpt(done: int, w: np.ndarray) -> None:
        if on_checkpoint is not None:
            on_checkpoint(MultiLrStart(iterations=done, active_weights=w, passive_weights={p: nd.w.copy() for p, nd in nodes.items()}))

    gen = lr_multi_active(x_a, y, roles=roles, adverts=adverts, params=params, plan=plan, rng=gens[0], record=rec, first=first,
                          weights=None if start is None else start.active_weights, checkpoint=ckpt)
    t0 = time.perf_counter()
    try:
        outbox = next(gen)
        while True:
            inbox: dict[str, tuple[object, ...]] = {}
            for p, msgs in outbox.items():
                replies: list[object] = []
                for m in msgs:
                    hand(a_name, p, m)
                    for r in nodes[p].handle(m):
                        hand(p, a_name, r)
                        replies.append(r)
                inbox[p] = tuple(replies)
            outbox = gen.send(inbox)
    except StopIteration as stop:
        w, _ = stop.value
    spi = (time.perf_counter() - t0) / max(1, iterations - first)
    return MultiLrResult(active_weights=w[:-1].copy(), intercept=float(w[-1]), passive_weights={p: nd.w.copy() for p, nd in nodes.items()},
                         releases=releases, wire_bytes=wire, seconds_per_iteration=spi)


__all__ = ["DecryptAnswer", "DecryptRequest", "LrMultiAdvert", "LrMultiKeys", "LrMultiPassive", "MultiLrDpPlan", "MultiLrResult",
           "MultiLrStart", "MultiQuery", "MultiResidual", "PROTOCOL", "Roles", "SharedLogits", "contribution_releases", "lr_multi_active",
           "plan_multi_lr_dp", "train_vertical_lr_multi_in_process"]
