"""ECDH private set intersection on ristretto255, a prime-order group (docs/protocols/psi.md).

Two parties hold record ids (strings): the *active* party (label holder) and the *passive* one.
With a per-run domain separator ``domain`` both hash each id to the group,
``H(x) = from_hash(SHA-512("fedcollab.psi.v2" || len(domain) || domain || len(x) || x))``
(libsodium's ``crypto_core_ristretto255_from_hash``: RFC 9496's hash-to-group, two Elligator maps
added, uniform on the group), and each draws a fresh secret scalar per run from the CSPRNG it is
given. Two messages, then a notice:

1. active -> passive, :class:`BlindedSet`: ``H(a)^alpha`` for its ids, shuffled.
2. passive -> active, :class:`PassiveReply`: ``H(a)^(alpha beta)`` in the active party's order
   and ``H(b)^beta`` for its own ids, shuffled.
3. The active party computes ``H(b)^(beta alpha)`` and matches: it learns which of its own rows
   are common. It sends :class:`IntersectionNotice`: with ``reveal == "both"`` the positions (in
   the passive party's shuffled list) of the common records, with ``"label_holder"`` the size only.

Both parties list the common records in the same canonical order: by the bytes of the
double-blinded point ``H(x)^(alpha beta)`` (random per run), so that row ``i`` of the aligned
data is the same record at both. Only 32-byte ristretto255 encodings cross; every received point
is validated (libsodium's ``crypto_scalarmult_ristretto255`` refuses an encoding that is not the
canonical encoding of a group element, and the identity as input or result; a point that is only
compared and matches nothing is checked with ``crypto_core_ristretto255_is_valid_point``). The
group has prime order, so there is no cofactor and no subgroup check. Curve arithmetic is
libsodium's (through ``rbcl``, which bundles libsodium and binds its ristretto255 functions),
never ours.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from fedcollab.core import DataValidationError, MissingExtra, ProtocolError
from fedcollab.privacy.accounting import NonPrivate, Release

try:
    import rbcl as _rb
except ImportError as exc:  # pragma: no cover - rbcl is a node dependency
    raise MissingExtra("private set intersection needs rbcl (libsodium's ristretto255): pip install 'fedcollab[node]'") from exc

PROTOCOL = "fedcollab.psi.ecdh-ristretto255.v1"
POINT_BYTES = 32
HASH_PREFIX = b"fedcollab.psi.v2"
CHUNK = 4096  # points per task of the thread pool (libsodium is called through ctypes, without the GIL)
_IDENTITY = bytes(POINT_BYTES)  # ristretto255's encoding of the neutral element
_INVALID = ("is not a valid point of the prime-order group (not the canonical encoding of a ristretto255 "
            "element, or the identity).")

Reveal = Literal["both", "label_holder"]
RngBytes = Callable[[int], bytes]


# ----------------------------------------------------------------------------------- primitives


def _workers(workers: int | None) -> int:
    return max(1, int(workers) if workers is not None else min(os.cpu_count() or 1, 8))


def _map_chunks(fn: Callable[[int, int], list[bytes]], n: int, workers: int) -> list[bytes]:
    """``fn(lo, hi)`` over chunks of ``range(n)``, in a thread pool when ``workers > 1``; results in order."""
    bounds = [(lo, min(lo + CHUNK, n)) for lo in range(0, n, CHUNK)]
    if workers <= 1 or len(bounds) <= 1:
        parts = [fn(lo, hi) for lo, hi in bounds]
    else:
        with ThreadPoolExecutor(max_workers=workers) as ex:
            parts = list(ex.map(lambda b: fn(*b), bounds))
    return [p for part in parts for p in part]


def domain_tag(domain: bytes) -> bytes:
    """SHA-256 of the run's domain separator (sent so both parties check they hash alike)."""
    return hashlib.sha256(HASH_PREFIX + b"/domain" + bytes(domain)).digest()


def hash_to_group(ids: Sequence[str], domain: bytes, *, workers: int | None = None) -> list[bytes]:
    """Each id's point ``H(x)`` in ristretto255 (32-byte encodings, in input order)."""
    dom = bytes(domain)
    base = hashlib.sha512(HASH_PREFIX + len(dom).to_bytes(8, "big") + dom)
    from_hash = _rb.crypto_core_ristretto255_from_hash
    enc = [str(x).encode("utf-8") for x in ids]

    def run(lo: int, hi: int) -> list[bytes]:
        out = []
        for e in enc[lo:hi]:
            h = base.copy()
            h.update(len(e).to_bytes(8, "big") + e)
            out.append(from_hash(h.digest()))
        return out

    return _map_chunks(run, len(enc), _workers(workers))


def new_scalar(rng_bytes: RngBytes) -> bytes:
    """A secret scalar, uniform modulo the group order ``L`` (64 CSPRNG bytes reduced), never zero."""
    raw = rng_bytes(64)
    if not isinstance(raw, bytes | bytearray) or len(raw) != 64:
        raise ProtocolError("psi: the random source must return the number of bytes asked for.")
    k = _rb.crypto_core_ristretto255_scalar_reduce(bytes(raw))
    if k == bytes(32):
        raise ProtocolError("psi: the random source gave a zero scalar.")
    return k


def blind(scalar: bytes, points: Sequence[bytes], *, field_name: str, workers: int | None = None) -> list[bytes]:
    """``P^scalar`` for every point; a point that is not a valid element of the group is refused, by index."""
    mul = _rb.crypto_scalarmult_ristretto255

    def run(lo: int, hi: int) -> list[bytes]:
        out = []
        for i in range(lo, hi):
            p = points[i]
            try:
                out.append(mul(scalar, p))
            except (RuntimeError, TypeError, ValueError):  # libsodium refused the encoding, or the identity
                raise ProtocolError(f"psi: `{field_name}[{i}]` {_INVALID}") from None
        return out

    return _map_chunks(run, len(points), _workers(workers))


def _check_valid(points: Sequence[bytes], *, field_name: str, indices: Sequence[int], workers: int | None) -> None:
    is_valid = _rb.crypto_core_ristretto255_is_valid_point
    idx = list(indices)

    def run(lo: int, hi: int) -> list[bytes]:
        for i in idx[lo:hi]:
            if not is_valid(points[i]) or points[i] == _IDENTITY:
                raise ProtocolError(f"psi: `{field_name}[{i}]` {_INVALID}")
        return []

    _map_chunks(run, len(idx), _workers(workers))


def split_points(buf: bytes, *, field_name: str, expected: int | None = None) -> list[bytes]:
    """A message's concatenated 32-byte encodings as a list; wrong length, count or duplicates are refused."""
    if not isinstance(buf, bytes | bytearray):
        raise ProtocolError(f"psi: `{field_name}` must be bytes (32-byte point encodings), got {type(buf).__name__}.")
    if len(buf) % POINT_BYTES:
        raise ProtocolError(f"psi: `{field_name}` has {len(buf)} bytes, not a whole number of {POINT_BYTES}-byte points.")
    b = bytes(buf)
    pts = [b[i:i + POINT_BYTES] for i in range(0, len(b), POINT_BYTES)]
    if expected is not None and len(pts) != expected:
        raise ProtocolError(f"psi: `{field_name}` has {len(pts)} points, expected {expected}.")
    # RFC 9496 refuses an encoding >= p; libsodium ignores the top bit, so two strings would name one
    # element (and slip past the duplicate check): a set top bit is refused here, before any arithmetic.
    top = np.flatnonzero(np.frombuffer(b, dtype=np.uint8)[POINT_BYTES - 1::POINT_BYTES] & 0x80)
    if top.size:
        raise ProtocolError(f"psi: `{field_name}[{int(top[0])}]` {_INVALID}")
    if len(set(pts)) != len(pts):
        raise ProtocolError(f"psi: `{field_name}` repeats a point; duplicates are refused.")
    return pts


def shuffle_order(n: int, rng_bytes: RngBytes) -> np.ndarray:
    """A uniformly random permutation of ``range(n)``: argsort of 128-bit CSPRNG keys (ties have probability < n^2 / 2^129)."""
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    raw = rng_bytes(16 * n)
    if len(raw) != 16 * n:
        raise ProtocolError("psi: the random source must return the number of bytes asked for.")
    keys = np.frombuffer(bytes(raw), dtype=">u8").reshape(n, 2)
    return np.lexsort((keys[:, 1], keys[:, 0])).astype(np.int64)


def _check_ids(ids: Sequence[str], *, party: str) -> list[str]:
    out = list(ids)
    bad = [i for i, x in enumerate(out) if not isinstance(x, str)]
    if bad:
        raise DataValidationError(f"psi: {party}'s record ids must be strings; row {bad[0]} is {type(out[bad[0]]).__name__}.")
    if len(set(out)) != len(out):
        n_dup = len(out) - len(set(out))
        raise DataValidationError(f"psi: {party}'s record ids repeat ({n_dup} duplicate(s)); each record id must be unique.")
    return out


def _release(*, party: str, observer: Literal["label_holder", "passive_party"], size: int, membership: bool, ids_in: int) -> Release:
    # Declared: the intersection is the price of a vertical collaboration, recorded in full (size,
    # membership or not, ids in), never charged as DP (no noise could hide membership and still align).
    return Release(kind="psi_intersection", about="train+test", unit="record", observer=observer, added_by=party, party=party,
                   round=0, mechanism=NonPrivate(), declared_public=True,
                   details={"size": int(size), "membership": bool(membership), "ids_in": int(ids_in)})


# ----------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class BlindedSet:
    """Active -> passive: ``H(a)^alpha`` for the active party's ids, shuffled (concatenated 32-byte encodings)."""

    protocol: str
    domain_tag: bytes
    reveal: Reveal
    points: bytes = field(repr=False)


@dataclass(frozen=True)
class PassiveReply:
    """Passive -> active: ``H(a)^(alpha beta)`` in the order received, and ``H(b)^beta`` for its own ids, shuffled."""

    reblinded: bytes = field(repr=False)
    points: bytes = field(repr=False)


@dataclass(frozen=True)
class IntersectionNotice:
    """Active -> passive: the intersection size; with reveal ``both`` also the common records as positions in the
    passive party's shuffled list, in the canonical order (by double-blinded point)."""

    size: int
    positions: np.ndarray | None = field(default=None, repr=False)


@dataclass(frozen=True)
class PsiResult:
    """What a party learnt: its own rows of the common records in the canonical order (``membership``), or only the size."""

    size: int
    membership: bool
    rows: np.ndarray = field(repr=False)


# ----------------------------------------------------------------------------------- active side


@dataclass(frozen=True)
class ActiveState:
    """What the active node keeps (never leaves it)."""

    party: str
    reveal: Reveal
    n_ids: int
    scalar: bytes = field(repr=False)
    order: np.ndarray = field(repr=False)  # sent position k holds own row order[k]
    result: PsiResult | None = None


def active_init(ids: Sequence[str], domain: bytes, *, party: str = "active", reveal: Reveal = "both",
                rng_bytes: RngBytes | None = None, workers: int | None = None) -> tuple[ActiveState, BlindedSet]:
    """Hash and blind the active party's ids with a fresh scalar; send them shuffled."""
    if reveal not in ("both", "label_holder"):
        raise ProtocolError(f"psi: reveal must be 'both' or 'label_holder', got {reveal!r}.")
    rng = rng_bytes or os.urandom
    own = _check_ids(ids, party=party)
    alpha = new_scalar(rng)
    order = shuffle_order(len(own), rng)
    pts = hash_to_group([own[i] for i in order], domain, workers=workers)
    sent = blind(alpha, pts, field_name="own points", workers=workers)
    state = ActiveState(party=party, reveal=reveal, n_ids=len(own), scalar=alpha, order=order)
    return state, BlindedSet(protocol=PROTOCOL, domain_tag=domain_tag(domain), reveal=reveal, points=b"".join(sent))


def active_match(state: ActiveState, reply: PassiveReply, *, workers: int | None = None) -> tuple[ActiveState, IntersectionNotice, Release]:
    """Re-blind the passive party's points, match, order canonically; the notice to send and this party's release."""
    if state.result is not None:
        raise ProtocolError("psi: the passive party's reply was already received; a second one is refused.")
    again = split_points(reply.reblinded, field_name="PassiveReply.reblinded", expected=state.n_ids)
    theirs = split_points(reply.points, field_name="PassiveReply.points")
    double = blind(state.scalar, theirs, field_name="PassiveReply.points", workers=workers)  # validates `points`
    where = {p: j for j, p in enumerate(double)}
    hits = [(again[k], k, where[again[k]]) for k in range(len(again)) if again[k] in where]
    # A matching point equals one computed here from validated points; the others are checked one by one.
    hit_set = {k for _, k, _ in hits}
    _check_valid(again, field_name="PassiveReply.reblinded", indices=[k for k in range(len(again)) if k not in hit_set], workers=workers)
    hits.sort()  # canonical order: by the double-blinded point's bytes
    rows = np.array([int(state.order[k]) for _, k, _ in hits], dtype=np.int64)
    positions = np.array([j for _, _, j in hits], dtype=np.int64)
    both = state.reveal == "both"
    notice = IntersectionNotice(size=len(hits), positions=positions if both else None)
    result = PsiResult(size=len(hits), membership=True, rows=rows)
    event = _release(party=state.party, observer="passive_party", size=len(hits), membership=both, ids_in=state.n_ids)
    return replace(state, result=result), notice, event


# ----------------------------------------------------------------------------------- passive side


@dataclass(frozen=True)
class PassiveState:
    """What the passive node keeps (never leaves it)."""

    party: str
    n_ids: int
    domain_tag: bytes
    scalar: bytes = field(repr=False)
    order: np.ndarray = field(repr=False)  # sent position k holds own row order[k]
    own: tuple[bytes, ...] = field(default=(), repr=False)
    n_active: int = -1
    reveal: Reveal | None = None
    result: PsiResult | None = None


def passive_init(ids: Sequence[str], domain: bytes, *, party: str = "passive", rng_bytes: RngBytes | None = None,
                 workers: int | None = None) -> PassiveState:
    """Hash and blind the passive party's ids with a fresh scalar (before, or while, the active party's set arrives)."""
    rng = rng_bytes or os.urandom
    own = _check_ids(ids, party=party)
    beta = new_scalar(rng)
    order = shuffle_order(len(own), rng)
    pts = hash_to_group([own[i] for i in order], domain, workers=workers)
    blinded = blind(beta, pts, field_name="own points", workers=workers)
    return PassiveState(party=party, n_ids=len(own), domain_tag=domain_tag(domain), scalar=beta, order=order, own=tuple(blinded))


def passive_reply(state: PassiveState, msg: BlindedSet, *, workers: int | None = None) -> tuple[PassiveState, PassiveReply]:
    """Re-blind the active party's points (in its order) and send them with this party's own blinded points.

    This reply lets the active party learn which of its records this party holds; the release is
    recorded by :func:`passive_finish`, when the size is known here too.
    """
    if state.reveal is not None:
        raise ProtocolError("psi: the active party's set was already answered; a second one is refused.")
    if msg.protocol != PROTOCOL:
        raise ProtocolError(f"psi: `BlindedSet.protocol` is {msg.protocol!r}, this party speaks {PROTOCOL!r}.")
    if msg.domain_tag != state.domain_tag:
        raise ProtocolError("psi: `BlindedSet.domain_tag` differs: the two parties hash with different domain separators.")
    if msg.reveal not in ("both", "label_holder"):
        raise ProtocolError(f"psi: `BlindedSet.reveal` must be 'both' or 'label_holder', got {msg.reveal!r}.")
    theirs = split_points(msg.points, field_name="BlindedSet.points")
    again = blind(state.scalar, theirs, field_name="BlindedSet.points", workers=workers)  # validates every point
    reply = PassiveReply(reblinded=b"".join(again), points=b"".join(state.own))
    return replace(state, own=(), n_active=len(theirs), reveal=msg.reveal), reply


def passive_finish(state: PassiveState, notice: IntersectionNotice) -> tuple[PassiveState, PsiResult, Release]:
    """Map the notice's positions back to this party's rows (reveal ``both``) or keep the size only; this party's release."""
    if state.reveal is None:
        raise ProtocolError("psi: an intersection notice before the active party's set.")
    if state.result is not None:
        raise ProtocolError("psi: the intersection notice was already received; a second one is refused.")
    size = notice.size
    if not isinstance(size, int | np.integer) or isinstance(size, bool) or not 0 <= int(size) <= min(state.n_ids, state.n_active):
        raise ProtocolError(f"psi: `IntersectionNotice.size` must be an integer in [0, {min(state.n_ids, state.n_active)}], got {size!r}.")
    size = int(size)
    if state.reveal == "both":
        if notice.positions is None:
            raise ProtocolError("psi: `IntersectionNotice.positions` is missing; reveal 'both' was agreed.")
        pos = np.asarray(notice.positions)
        if pos.shape != (size,) or (pos.size and (pos.dtype.kind not in "iu" or pos.min() < 0 or pos.max() >= state.n_ids)):
            raise ProtocolError(f"psi: `IntersectionNotice.positions` must be {size} integer positions in [0, {state.n_ids}).")
        if np.unique(pos).size != pos.size:
            raise ProtocolError("psi: `IntersectionNotice.positions` repeats a position; duplicates are refused.")
        rows = state.order[pos.astype(np.int64)].astype(np.int64)
        result = PsiResult(size=size, membership=True, rows=rows)
    else:
        if notice.positions is not None:
            raise ProtocolError("psi: `IntersectionNotice.positions` must be absent under reveal 'label_holder'.")
        result = PsiResult(size=size, membership=False, rows=np.zeros(0, dtype=np.int64))
    event = _release(party=state.party, observer="label_holder", size=size, membership=True, ids_in=state.n_ids)
    return replace(state, result=result), result, event


# ----------------------------------------------------------------------------------- in-process


def psi_align(ids_active: Sequence[str], ids_passive: Sequence[str], domain: bytes, *, reveal: Reveal = "both",
              rng_bytes: RngBytes | None = None, active: str = "active", passive: str = "passive",
              workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[Release]]:
    """The whole PSI in-process: (active rows, passive rows, [active's release, passive's release]).

    Row ``i`` of both arrays is the same record (canonical order). Under reveal ``label_holder`` the
    passive party learns only the size: its array is empty (vertical training needs ``both``).
    """
    a_state, blinded = active_init(ids_active, domain, party=active, reveal=reveal, rng_bytes=rng_bytes, workers=workers)
    p_state = passive_init(ids_passive, domain, party=passive, rng_bytes=rng_bytes, workers=workers)
    p_state, reply = passive_reply(p_state, blinded, workers=workers)
    a_state, notice, a_event = active_match(a_state, reply, workers=workers)
    _, p_result, p_event = passive_finish(p_state, notice)
    assert a_state.result is not None
    return a_state.result.rows, p_result.rows, [a_event, p_event]
