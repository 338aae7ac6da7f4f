"""SecAgg+ (Bell et al. 2020) as pure stage functions: no Flower, no network, no clock.

Spec: ``docs/protocols/secagg.md``. Five stages (:class:`Stage`), each a pure function
``(state, inbound) -> (state, outbound)`` on frozen dataclasses:

==============  =====================================  ======================================
stage           node                                   coordinator
==============  =====================================  ======================================
ADVERTISE       :func:`node_advertise`                 :func:`coord_start`,
                                                       :func:`coord_collect_advertisements`
SHARE           :func:`node_share`                     :func:`coord_route_shares`
MASKED_INPUT    :func:`node_masked_input`              :func:`coord_collect_masked`
CONSISTENCY     :func:`node_consistency`               :func:`coord_collect_signatures`
UNMASK          :func:`node_unmask`                    :func:`coord_unmask`
==============  =====================================  ======================================

Every state and message has ``to_wire()`` / ``from_wire()`` to a flat ``dict`` of ``str``,
``int``, ``bytes`` and lists of those (what a Flower ``ConfigRecord`` carries). A state records
the next stage it accepts; a call out of order, a message of the wrong kind, run or round, a
wrong length, a duplicated or replayed key, a bad signature or a share for an unknown node
raises :class:`ProtocolError` or :class:`CryptoError` and changes nothing (the caller still
holds the previous state). Rounds that fall below the threshold abort with a
``ProtocolError`` whose message starts with ``"fewer than t"``.

Notes
-----
Primitives are those of ``fedcollab.crypto`` (``cryptography``: X25519, HKDF-SHA256,
AES-256-GCM, AES-256-CTR); keys, seeds and nonces come from the OS CSPRNG, fresh every round.
The neighbour graph and share x-coordinates are public functions of the config, so neither side
chooses them after seeing keys. A node reveals, per peer, either the self-mask share (peer
survived) or the masking-key share (peer dropped), never both, and only once per round; with
``t > k/2`` the coordinator can therefore never hold ``t`` shares of both secrets of one node.

The consistency stage (Bonawitz et al. 2017, Sec. 4, round 4; Bell et al. 2020) stops a malicious
coordinator from telling different nodes different survivor sets: every survivor signs the one
survivor set it is shown (once per round), and a node reveals shares only for the set it signed
itself, and only when the unmask request carries valid signatures on that same set from a quorum
of distinct participants (:func:`consistency_quorum`: at least ``t`` and a strict majority, so two
different sets can never both gather a quorum of honest signers).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, ClassVar

import numpy as np
import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcollab.core import ConfigError, CryptoError, ProtocolError, UpdateError
from fedcollab.crypto import (
    SHAMIR_SHARE_BYTES,
    X25519_KEY_BYTES,
    agree,
    combine_shares,
    decrypt,
    derive_key,
    encrypt,
    expand_mask,
    generate_keypair,
    load_private,
    private_bytes,
    public_bytes,
    share_from_bytes,
    share_to_bytes,
    split_secret,
)

__all__ = [
    "PROTOCOL",
    "SEED_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "Advertisement",
    "ConsistencyRequest",
    "ConsistencySignature",
    "CoordState",
    "MaskedInput",
    "NodeIdentity",
    "NodeState",
    "RevealedShares",
    "SecAggConfig",
    "ShareBundle",
    "SharesForNode",
    "Stage",
    "UnmaskRequest",
    "advertisements_from_wire",
    "advertisements_to_wire",
    "coord_collect_advertisements",
    "consistency_quorum",
    "coord_collect_masked",
    "coord_collect_signatures",
    "coord_route_shares",
    "coord_start",
    "coord_unmask",
    "neighbour_graph",
    "node_advertise",
    "node_consistency",
    "node_masked_input",
    "node_share",
    "node_unmask",
    "run_round_in_memory",
    "survivor_set_bytes",
]

#: Protocol identifier, bound into every signature, key derivation and AAD.
PROTOCOL = "fedcollab-secagg/2"  # 2: the signed consistency stage (issue 13)
#: Self-mask seeds and X25519 keys are 32 bytes.
SEED_BYTES = 32
#: An encrypted share pair: nonce (12) + b-share (66) + s-share (66) + tag (16).
SHARE_CIPHERTEXT_BYTES = 12 + 2 * SHAMIR_SHARE_BYTES + 16
_ED25519_SIG_BYTES = 64
_DTYPES = {32: np.dtype(np.uint32), 64: np.dtype(np.uint64)}


class Stage(StrEnum):
    """Protocol stages, in order; ``DONE`` marks a finished state."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASKED_INPUT = "masked-input"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


# --------------------------------------------------------------------------- helpers


def _context(*parts: str | int | bytes) -> bytes:
    """Unambiguous concatenation (each part length-prefixed), led by the protocol id."""
    out = bytearray()
    for part in (PROTOCOL, *parts):
        if isinstance(part, str):
            raw = part.encode()
        elif isinstance(part, int):
            raw = part.to_bytes(8, "big", signed=True)
        else:
            raw = bytes(part)
        out += len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolError(message)


def _stage_check(state_stage: Stage, expected: Stage, who: str) -> None:
    if state_stage != expected:
        raise ProtocolError(f"{who}: out of order, the state is at stage '{state_stage}' but '{expected}' was called.")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_names(what: str, names: object) -> tuple[str, ...]:
    if isinstance(names, (str, bytes)) or not isinstance(names, Iterable):
        raise ProtocolError(f"`{what}` must be a list of names (got {type(names).__name__}).")
    out = tuple(names)
    for n in out:
        _require(isinstance(n, str) and n != "", f"`{what}` must hold non-empty strings, got {n!r}.")
    _require(len(set(out)) == len(out), f"`{what}` repeats a name: {sorted(out)}.")
    return out


class _Wire:
    """Typed reads from a flat wire dict; every failure is a :class:`ProtocolError`."""

    def __init__(self, wire: object, what: str, kind: str | None) -> None:
        if not isinstance(wire, Mapping):
            raise ProtocolError(f"{what}: expected a mapping, got {type(wire).__name__}.")
        self.wire, self.what = wire, what
        if kind is not None:
            proto = wire.get("protocol")
            _require(proto == PROTOCOL, f"{what}: protocol must be '{PROTOCOL}', got {proto!r}.")
            got = wire.get("kind")
            _require(got == kind, f"{what}: expected a '{kind}' message, got {got!r} (wrong stage).")

    def _get(self, key: str) -> Any:
        if key not in self.wire:
            raise ProtocolError(f"{self.what}: field `{key}` is missing.")
        return self.wire[key]

    def has(self, key: str) -> bool:
        return key in self.wire

    def text(self, key: str) -> str:
        v = self._get(key)
        _require(isinstance(v, str), f"{self.what}: field `{key}` must be str (got {type(v).__name__}).")
        return v

    def integer(self, key: str) -> int:
        v = self._get(key)
        _require(_is_int(v), f"{self.what}: field `{key}` must be int (got {type(v).__name__}).")
        return v

    def blob(self, key: str, length: int | None = None) -> bytes:
        v = self._get(key)
        _require(isinstance(v, bytes), f"{self.what}: field `{key}` must be bytes (got {type(v).__name__}).")
        if length is not None:
            _require(len(v) == length, f"{self.what}: field `{key}` must be {length} bytes, got {len(v)}.")
        return v

    def strs(self, key: str) -> list[str]:
        v = self._get(key)
        ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        _require(ok, f"{self.what}: field `{key}` must be a list of str.")
        return list(v)

    def bytes_list(self, key: str, n: int) -> list[bytes]:
        v = self._get(key)
        ok = isinstance(v, list) and all(isinstance(x, bytes) for x in v)
        _require(ok, f"{self.what}: field `{key}` must be a list of bytes.")
        _require(len(v) == n, f"{self.what}: field `{key}` must have {n} entries, got {len(v)}.")
        return list(v)

    def pairs(self, names_key: str, values_key: str) -> dict[str, bytes]:
        names = self.strs(names_key)
        values = self.bytes_list(values_key, len(names))
        _require(len(set(names)) == len(names), f"{self.what}: field `{names_key}` repeats a name.")
        return dict(zip(names, values, strict=True))


def _header(kind: str, run_id: str, round_: int) -> dict[str, Any]:
    return {"protocol": PROTOCOL, "kind": kind, "run_id": run_id, "round": round_}


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """The public parameters of one round; both sides derive the neighbour graph from them.

    Parameters
    ----------
    run_id, round
        Bind every key, signature and mask to this round; keys are fresh every round.
    participants
        Names of the invited nodes (stored sorted); share x-coordinates are positions + 1.
    k
        Neighbours per node (even), a circulant graph; ``k >= n - 1`` is the complete graph.
        The effective degree is ``min(k, n - 1)``.
    threshold
        t, shares needed to reconstruct a node's secrets: ``degree/2 < t <= degree - max_dropouts``.
    max_dropouts
        Dropouts tolerated in any neighbourhood (over the whole round).
    bits
        The modulus 2^bits of the masked vectors (32 or 64).
    length
        Coordinates of the masked vector (weight included).
    """

    run_id: str
    round: int
    participants: tuple[str, ...]
    k: int
    threshold: int
    max_dropouts: int
    bits: int
    length: int

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.run_id, str) or not self.run_id:
            problems.append(f"`run_id` must be a non-empty str, got {self.run_id!r}.")
        if not _is_int(self.round) or self.round < 0:
            problems.append(f"`round` must be an int >= 0, got {self.round!r}.")
        try:
            names = tuple(sorted(_check_names("participants", self.participants)))
        except ProtocolError as exc:
            problems.append(str(exc))
            names = ()
        object.__setattr__(self, "participants", names)
        n = len(names)
        if names and n < 3:
            problems.append(f"`participants` must name at least 3 nodes (a sum of 2 reveals the other), got {n}.")
        for name in ("k", "threshold", "max_dropouts", "bits", "length"):
            if not _is_int(getattr(self, name)):
                problems.append(f"`{name}` must be an int, got {getattr(self, name)!r}.")
        if not problems:
            degree = min(self.k, n - 1)
            if self.k < 2:
                problems.append(f"`k` must be >= 2, got {self.k}.")
            elif self.k < n - 1 and self.k % 2:
                problems.append(f"`k` must be even when below n - 1 = {n - 1} (a circulant graph), got {self.k}.")
            if self.max_dropouts < 0:
                problems.append(f"`max_dropouts` must be >= 0, got {self.max_dropouts}.")
            if 2 * self.threshold <= degree:
                problems.append(
                    f"`threshold` must be > degree/2 = {degree / 2:g} (else the coordinator could gather both"
                    f" secrets of one node), got {self.threshold}."
                )
            if self.threshold > degree - max(self.max_dropouts, 0):
                problems.append(
                    f"`threshold` must be <= degree - max_dropouts = {degree} - {self.max_dropouts}"
                    f" = {degree - self.max_dropouts} (else tolerated dropouts abort the round), got {self.threshold}."
                )
            if self.bits not in _DTYPES:
                problems.append(f"`bits` must be 32 or 64, got {self.bits}.")
            if self.length < 1:
                problems.append(f"`length` must be >= 1, got {self.length}.")
        if problems:
            raise ConfigError("invalid secure aggregation parameters:", problems=problems)

    @property
    def degree(self) -> int:
        """Neighbours per node: ``min(k, n - 1)``."""
        return min(self.k, len(self.participants) - 1)

    @property
    def dtype(self) -> np.dtype:
        """uint32 or uint64."""
        return _DTYPES[self.bits]

    def x_of(self, name: str) -> int:
        """The Shamir x-coordinate of ``name`` (its position among sorted participants, plus 1)."""
        return self.participants.index(name) + 1

    def to_wire(self) -> dict[str, Any]:
        """Flat record (sent by the coordinator with the ADVERTISE request)."""
        return {
            "protocol": PROTOCOL,
            "kind": "config",
            "run_id": self.run_id,
            "round": self.round,
            "participants": list(self.participants),
            "k": self.k,
            "threshold": self.threshold,
            "max_dropouts": self.max_dropouts,
            "bits": self.bits,
            "length": self.length,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SecAggConfig:
        """Parse and validate; invalid parameters from the wire are a :class:`ProtocolError`."""
        r = _Wire(wire, "secagg config", "config")
        try:
            return cls(
                run_id=r.text("run_id"),
                round=r.integer("round"),
                participants=tuple(r.strs("participants")),
                k=r.integer("k"),
                threshold=r.integer("threshold"),
                max_dropouts=r.integer("max_dropouts"),
                bits=r.integer("bits"),
                length=r.integer("length"),
            )
        except ConfigError as exc:
            raise ProtocolError("secagg config from the wire is invalid:", problems=exc.problems) from None

    def _wire_prefixed(self) -> dict[str, Any]:
        return {f"cfg.{k}": v for k, v in self.to_wire().items()}

    @classmethod
    def _from_prefixed(cls, wire: Mapping[str, Any]) -> SecAggConfig:
        return cls.from_wire({k[4:]: v for k, v in wire.items() if k.startswith("cfg.")})


def neighbour_graph(cfg: SecAggConfig) -> dict[str, tuple[str, ...]]:
    """Each participant's neighbours (sorted): a circulant k-regular graph on a per-round order.

    The order sorts names by SHA-256 of (protocol, run_id, round, name), so the graph changes
    every round but is fixed before any key exists; each node's neighbours are the k/2 before
    and the k/2 after it on that cycle. With ``k >= n - 1`` the graph is complete.
    """
    names = cfg.participants
    n = len(names)
    if cfg.k >= n - 1:
        return {u: tuple(v for v in names if v != u) for u in names}
    order = sorted(names, key=lambda p: hashlib.sha256(_context(cfg.run_id, cfg.round, p, "graph")).digest())
    half = cfg.k // 2
    out: dict[str, tuple[str, ...]] = {}
    for i, u in enumerate(order):
        near = {order[(i + d) % n] for d in range(-half, half + 1) if d}
        out[u] = tuple(sorted(near))
    return out


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, kw_only=True)
class NodeIdentity:
    """A node's name and its roster Ed25519 signing key (never leaves the node)."""

    name: str
    signing_key: Ed25519PrivateKey = field(repr=False)


@dataclass(frozen=True, kw_only=True)
class Advertisement:
    """A node's two fresh X25519 public keys for one round, signed with its roster key."""

    KIND: ClassVar[str] = "advertisement"
    run_id: str
    round: int
    node: str
    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk"):
            v = getattr(self, name)
            _require(isinstance(v, bytes), f"advertisement: `{name}` must be bytes (got {type(v).__name__}).")
            _require(
                len(v) == X25519_KEY_BYTES,
                f"advertisement of {self.node!r}: `{name}` must be {X25519_KEY_BYTES} bytes, got {len(v)}.",
            )
        _require(isinstance(self.signature, bytes), "advertisement: `signature` must be bytes.")
        _require(isinstance(self.node, str) and self.node != "", "advertisement: `node` must be a non-empty str.")
        _require(isinstance(self.run_id, str) and _is_int(self.round), "advertisement: bad `run_id` or `round`.")

    def signed_bytes(self) -> bytes:
        """RFC 8785 canonical JSON of (protocol, kind, run_id, round, node, c_pk, s_pk)."""
        body = {
            "protocol": PROTOCOL,
            "kind": self.KIND,
            "run_id": self.run_id,
            "round": self.round,
            "node": self.node,
            "c_pk": self.c_pk.hex(),
            "s_pk": self.s_pk.hex(),
        }
        return rfc8785.dumps(body)

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        return {
            **_header(self.KIND, self.run_id, self.round),
            "node": self.node,
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
            "signature": self.signature,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> Advertisement:
        """Parse (lengths checked; the signature is checked by the stage functions)."""
        r = _Wire(wire, "advertisement", cls.KIND)
        return cls(
            run_id=r.text("run_id"),
            round=r.integer("round"),
            node=r.text("node"),
            c_pk=r.blob("c_pk"),
            s_pk=r.blob("s_pk"),
            signature=r.blob("signature"),
        )


def advertisements_to_wire(ads: Mapping[str, Advertisement]) -> dict[str, Any]:
    """Several advertisements in one flat record (the coordinator's SHARE request)."""
    names = sorted(ads)
    return {
        **_header("advertisements", *_run_round(ads.values())),
        "nodes": names,
        "c_pk": [ads[n].c_pk for n in names],
        "s_pk": [ads[n].s_pk for n in names],
        "signature": [ads[n].signature for n in names],
        "ad_run_id": [ads[n].run_id for n in names],
        "ad_round": [ads[n].round for n in names],
    }


def advertisements_from_wire(wire: Mapping[str, Any]) -> dict[str, Advertisement]:
    """Inverse of :func:`advertisements_to_wire`."""
    r = _Wire(wire, "advertisements", "advertisements")
    names = r.strs("nodes")
    _require(len(set(names)) == len(names), "advertisements: a node appears twice.")
    c, s, sig = (r.bytes_list(k, len(names)) for k in ("c_pk", "s_pk", "signature"))
    runs, rounds = r.strs("ad_run_id"), r._get("ad_round")
    _require(isinstance(rounds, list) and all(_is_int(x) for x in rounds), "advertisements: bad `ad_round`.")
    _require(len(runs) == len(names) == len(rounds), "advertisements: list lengths differ.")
    return {
        n: Advertisement(run_id=runs[i], round=rounds[i], node=n, c_pk=c[i], s_pk=s[i], signature=sig[i])
        for i, n in enumerate(names)
    }


def _run_round(ads: Iterable[Advertisement]) -> tuple[str, int]:
    first = next(iter(ads), None)
    return (first.run_id, first.round) if first is not None else ("", 0)


@dataclass(frozen=True, kw_only=True)
class ShareBundle:
    """Node -> coordinator: one encrypted (b-share, s-share) pair per neighbour."""

    KIND: ClassVar[str] = "share-bundle"
    run_id: str
    round: int
    sender: str
    ciphertexts: Mapping[str, bytes]

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        names = sorted(self.ciphertexts)
        return {
            **_header(self.KIND, self.run_id, self.round),
            "sender": self.sender,
            "recipients": names,
            "ciphertexts": [self.ciphertexts[n] for n in names],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ShareBundle:
        """Parse."""
        r = _Wire(wire, "share bundle", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), sender=r.text("sender"),
                   ciphertexts=r.pairs("recipients", "ciphertexts"))


@dataclass(frozen=True, kw_only=True)
class SharesForNode:
    """Coordinator -> node: the encrypted shares its neighbours sent it."""

    KIND: ClassVar[str] = "shares-for-node"
    run_id: str
    round: int
    recipient: str
    ciphertexts: Mapping[str, bytes]

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        names = sorted(self.ciphertexts)
        return {
            **_header(self.KIND, self.run_id, self.round),
            "recipient": self.recipient,
            "senders": names,
            "ciphertexts": [self.ciphertexts[n] for n in names],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SharesForNode:
        """Parse."""
        r = _Wire(wire, "shares for node", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), recipient=r.text("recipient"),
                   ciphertexts=r.pairs("senders", "ciphertexts"))


@dataclass(frozen=True, kw_only=True)
class MaskedInput:
    """Node -> coordinator: the masked vector ``y`` (unsigned, modulo 2^bits)."""

    KIND: ClassVar[str] = "masked-input"
    run_id: str
    round: int
    node: str
    vector: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        v = self.vector
        ok = isinstance(v, np.ndarray) and v.ndim == 1 and v.dtype in _DTYPES.values()
        _require(ok, f"masked input of {self.node!r}: the vector must be 1-D uint32 or uint64.")

    def to_wire(self) -> dict[str, Any]:
        """Flat record; the vector travels as little-endian bytes."""
        bits = self.vector.dtype.itemsize * 8
        return {
            **_header(self.KIND, self.run_id, self.round),
            "node": self.node,
            "bits": bits,
            "length": int(self.vector.size),
            "vector": self.vector.astype(self.vector.dtype.newbyteorder("<"), copy=False).tobytes(),
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> MaskedInput:
        """Parse; the byte length must match ``bits`` and ``length``."""
        r = _Wire(wire, "masked input", cls.KIND)
        bits, length = r.integer("bits"), r.integer("length")
        _require(bits in _DTYPES, f"masked input: `bits` must be 32 or 64, got {bits}.")
        _require(length >= 1, f"masked input: `length` must be >= 1, got {length}.")
        dt = _DTYPES[bits]
        raw = r.blob("vector", length * dt.itemsize)
        vec = np.frombuffer(raw, dtype=dt.newbyteorder("<")).astype(dt)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), node=r.text("node"), vector=vec)


def survivor_set_bytes(cfg: SecAggConfig, survivors: Iterable[str]) -> bytes:
    """What a node signs at the consistency stage: RFC 8785 JSON of (protocol, run_id, round, participants, U3).

    The participants (the round's config) and the sorted survivor set U3 are both bound, so one
    signature vouches for one survivor set of one round of one run.
    """
    body = {
        "protocol": PROTOCOL,
        "kind": "survivor-set",
        "run_id": cfg.run_id,
        "round": cfg.round,
        "participants": list(cfg.participants),
        "survivors": sorted(survivors),
    }
    return rfc8785.dumps(body)


def consistency_quorum(cfg: SecAggConfig) -> int:
    """Signatures an unmask request must carry: ``max(t, floor(n / 2) + 1)`` for ``n`` participants.

    Notes
    -----
    Each honest node signs one survivor set per round, so two different sets can both gather a
    quorum only if ``2 q > n`` fails. ``t`` alone is not enough when ``2 t <= n`` (n = 10, t = 5:
    two disjoint groups of five could each sign a different set and, between them, reveal the
    masking keys of every node outside a chosen pair). In the complete graph a majority always
    signs when at most ``max_dropouts <= n - 1 - t`` nodes drop, since ``t >= floor(n / 2)``.
    """
    return max(cfg.threshold, len(cfg.participants) // 2 + 1)


@dataclass(frozen=True, kw_only=True)
class ConsistencyRequest:
    """Coordinator -> survivor: the whole survivor set U3 (nodes whose masked inputs are in the sum), to sign."""

    KIND: ClassVar[str] = "consistency-request"
    run_id: str
    round: int
    recipient: str
    survivors: tuple[str, ...]

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        return {**_header(self.KIND, self.run_id, self.round), "recipient": self.recipient, "survivors": list(self.survivors)}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ConsistencyRequest:
        """Parse."""
        r = _Wire(wire, "consistency request", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), recipient=r.text("recipient"),
                   survivors=tuple(r.strs("survivors")))


@dataclass(frozen=True, kw_only=True)
class ConsistencySignature:
    """Survivor -> coordinator: its roster Ed25519 signature on :func:`survivor_set_bytes` of U3."""

    KIND: ClassVar[str] = "consistency-signature"
    run_id: str
    round: int
    node: str
    signature: bytes

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        return {**_header(self.KIND, self.run_id, self.round), "node": self.node, "signature": self.signature}

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> ConsistencySignature:
        """Parse (64-byte signature; verified by the stage functions)."""
        r = _Wire(wire, "consistency signature", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), node=r.text("node"),
                   signature=r.blob("signature", _ED25519_SIG_BYTES))


@dataclass(frozen=True, kw_only=True)
class UnmaskRequest:
    """Coordinator -> node: which of its neighbours survived and which dropped, with the signed survivor set.

    ``signed_survivors`` is the whole U3 every signer signed; ``signatures`` maps each signer (U4)
    to its roster signature on :func:`survivor_set_bytes` of that set.
    """

    KIND: ClassVar[str] = "unmask-request"
    run_id: str
    round: int
    recipient: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    signed_survivors: tuple[str, ...] = ()
    signatures: Mapping[str, bytes] = field(default_factory=dict)

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        signers = sorted(self.signatures)
        return {
            **_header(self.KIND, self.run_id, self.round),
            "recipient": self.recipient,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
            "signed_survivors": list(self.signed_survivors),
            "signers": signers,
            "signatures": [self.signatures[n] for n in signers],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> UnmaskRequest:
        """Parse; the signed survivor set and the signatures are required (a request without them is refused)."""
        r = _Wire(wire, "unmask request", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), recipient=r.text("recipient"),
                   survivors=tuple(r.strs("survivors")), dropped=tuple(r.strs("dropped")),
                   signed_survivors=tuple(r.strs("signed_survivors")), signatures=r.pairs("signers", "signatures"))


@dataclass(frozen=True, kw_only=True)
class RevealedShares:
    """Node -> coordinator: b-shares of surviving neighbours, s-shares of dropped ones (66 bytes each)."""

    KIND: ClassVar[str] = "revealed-shares"
    run_id: str
    round: int
    node: str
    b_shares: Mapping[str, bytes]
    s_shares: Mapping[str, bytes]

    def to_wire(self) -> dict[str, Any]:
        """Flat record."""
        b, s = sorted(self.b_shares), sorted(self.s_shares)
        return {
            **_header(self.KIND, self.run_id, self.round),
            "node": self.node,
            "b_owners": b,
            "b_shares": [self.b_shares[n] for n in b],
            "s_owners": s,
            "s_shares": [self.s_shares[n] for n in s],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> RevealedShares:
        """Parse."""
        r = _Wire(wire, "revealed shares", cls.KIND)
        return cls(run_id=r.text("run_id"), round=r.integer("round"), node=r.text("node"),
                   b_shares=r.pairs("b_owners", "b_shares"), s_shares=r.pairs("s_owners", "s_shares"))


def _check_header(msg: Any, cfg: SecAggConfig, what: str) -> None:
    if msg.run_id != cfg.run_id or msg.round != cfg.round:
        raise ProtocolError(
            f"{what} is for run {msg.run_id!r} round {msg.round}, but this is run {cfg.run_id!r} round {cfg.round}"
            " (replayed or misrouted)."
        )


# --------------------------------------------------------------------------- shared checks


def _roster_key(name: str, roster: Mapping[str, Any]) -> Ed25519PublicKey:
    if name not in roster:
        raise ProtocolError(f"{name!r} is not in the roster; its advertisement cannot be checked.")
    value = roster[name]
    if isinstance(value, Ed25519PublicKey):
        return value
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else bytes(value)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError):
        raise CryptoError(f"the roster key of {name!r} is not a raw Ed25519 public key.") from None


def _verify_advertisements(
    cfg: SecAggConfig, ads: Mapping[str, Advertisement], roster: Mapping[str, Any]
) -> dict[str, tuple[bytes, bytes]]:
    """Check every advertisement against the roster; ``{node: (c_pk, s_pk)}``."""
    if not isinstance(ads, Mapping):
        raise ProtocolError(f"advertisements must be a mapping node -> Advertisement (got {type(ads).__name__}).")
    seen: dict[bytes, str] = {}
    out: dict[str, tuple[bytes, bytes]] = {}
    for name, ad in ads.items():
        _require(isinstance(ad, Advertisement), f"the advertisement under {name!r} is not an Advertisement.")
        _require(ad.node == name, f"the advertisement under {name!r} names {ad.node!r}.")
        _require(name in cfg.participants, f"advertisement from unknown node {name!r} (not a participant).")
        _check_header(ad, cfg, f"the advertisement of {name!r}")
        key = _roster_key(name, roster)
        if not ad.signature:
            raise CryptoError(f"the advertisement of {name!r} is unsigned.")
        if len(ad.signature) != _ED25519_SIG_BYTES:
            raise CryptoError(f"the advertisement of {name!r} has a {len(ad.signature)}-byte signature, not 64.")
        try:
            key.verify(ad.signature, ad.signed_bytes())
        except InvalidSignature:
            raise CryptoError(f"the advertisement of {name!r} does not verify against its roster key.") from None
        for pk in (ad.c_pk, ad.s_pk):
            if pk in seen:
                other = seen[pk]
                who = f"{other!r} and {name!r}" if other != name else f"{name!r} (for both keys)"
                raise ProtocolError(f"duplicated key: {who} advertise the same public key.")
            seen[pk] = name
        out[name] = (ad.c_pk, ad.s_pk)
    return out


def _share_key(cfg: SecAggConfig, c_sk: bytes, peer_c_pk: bytes, u: str, v: str) -> bytes:
    secret = agree(c_sk, peer_c_pk)
    return derive_key(secret, info=_context(cfg.run_id, cfg.round, min(u, v), max(u, v), "share"))


def _share_aad(cfg: SecAggConfig, sender: str, recipient: str) -> bytes:
    return _context(cfg.run_id, cfg.round, sender, recipient, "share")


def _pair_mask(cfg: SecAggConfig, s_sk: bytes, peer_s_pk: bytes, u: str, v: str) -> np.ndarray:
    secret = agree(s_sk, peer_s_pk)
    seed = derive_key(secret, info=_context(cfg.run_id, cfg.round, min(u, v), max(u, v), "mask"))
    return expand_mask(seed, cfg.length, dtype=cfg.dtype)


def _pairs_to_wire(prefix: str, mapping: Mapping[str, tuple[bytes, bytes]], a: str, b: str) -> dict[str, Any]:
    names = sorted(mapping)
    return {prefix: names, f"{prefix}.{a}": [mapping[n][0] for n in names], f"{prefix}.{b}": [mapping[n][1] for n in names]}


def _pairs_from_wire(r: _Wire, prefix: str, a: str, b: str) -> dict[str, tuple[bytes, bytes]]:
    names = r.strs(prefix)
    first, second = r.bytes_list(f"{prefix}.{a}", len(names)), r.bytes_list(f"{prefix}.{b}", len(names))
    return {n: (first[i], second[i]) for i, n in enumerate(names)}


# --------------------------------------------------------------------------- node side


@dataclass(frozen=True, kw_only=True)
class NodeState:
    """A node's protocol state between stages.

    Holds private keys, the self-mask seed and neighbours' shares: keep it (and its
    ``to_wire()``) in the node's own context state; it never goes to the coordinator. Secrets
    are erased from the state as soon as a stage no longer needs them.
    """

    KIND: ClassVar[str] = "node-state"
    cfg: SecAggConfig
    name: str
    stage: Stage
    c_pk: bytes
    s_pk: bytes
    c_sk: bytes | None = field(default=None, repr=False)
    s_sk: bytes | None = field(default=None, repr=False)
    seed: bytes | None = field(default=None, repr=False)
    peers: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict)
    held: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    signed: tuple[str, ...] = ()  # the survivor set U3 this node signed (consistency stage)

    def to_wire(self) -> dict[str, Any]:
        """Flat record. Contains secrets: for the node's own storage only."""
        out: dict[str, Any] = {
            **self.cfg._wire_prefixed(),
            "protocol": PROTOCOL,
            "kind": self.KIND,
            "name": self.name,
            "stage": str(self.stage),
            "c_pk": self.c_pk,
            "s_pk": self.s_pk,
            **_pairs_to_wire("peers", self.peers, "c_pk", "s_pk"),
            **_pairs_to_wire("held", self.held, "b", "s"),
            "signed": list(self.signed),
        }
        for key in ("c_sk", "s_sk", "seed"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> NodeState:
        """Parse."""
        r = _Wire(wire, "node state", cls.KIND)
        try:
            stage = Stage(r.text("stage"))
        except ValueError:
            raise ProtocolError(f"node state: unknown stage {wire.get('stage')!r}.") from None
        opt = {k: r.blob(k, 32) for k in ("c_sk", "s_sk", "seed") if r.has(k)}
        return cls(
            cfg=SecAggConfig._from_prefixed(wire),
            name=r.text("name"),
            stage=stage,
            c_pk=r.blob("c_pk", 32),
            s_pk=r.blob("s_pk", 32),
            peers=_pairs_from_wire(r, "peers", "c_pk", "s_pk"),
            held=_pairs_from_wire(r, "held", "b", "s"),
            signed=tuple(r.strs("signed")),
            **opt,
        )


def node_advertise(cfg: SecAggConfig, identity: NodeIdentity) -> tuple[NodeState, Advertisement]:
    """ADVERTISE: fresh X25519 pairs ``c`` (encryption) and ``s`` (masking), signed with the roster key."""
    _require(isinstance(cfg, SecAggConfig), "node_advertise: `cfg` must be a SecAggConfig.")
    _require(identity.name in cfg.participants, f"node {identity.name!r} is not a participant of this round.")
    c_priv, c_pk = generate_keypair()
    s_priv, s_pk = generate_keypair()
    if c_pk == s_pk:  # 2^-252; refuse rather than advertise a duplicated key
        raise CryptoError("key generation returned the same key twice.")
    unsigned = Advertisement(run_id=cfg.run_id, round=cfg.round, node=identity.name, c_pk=c_pk, s_pk=s_pk)
    ad = replace(unsigned, signature=identity.signing_key.sign(unsigned.signed_bytes()))
    state = NodeState(
        cfg=cfg, name=identity.name, stage=Stage.SHARE, c_pk=c_pk, s_pk=s_pk,
        c_sk=private_bytes(c_priv), s_sk=private_bytes(s_priv),
    )
    return state, ad


def node_share(
    state: NodeState, advertisements: Mapping[str, Advertisement], roster_public_keys: Mapping[str, Any]
) -> tuple[NodeState, ShareBundle]:
    """SHARE: verify advertisements against the roster, Shamir-share ``b`` and ``s_sk`` among neighbours.

    ``roster_public_keys`` maps names to Ed25519 public keys (objects, raw bytes or hex) from the
    roster obtained out of band, never keys the coordinator relayed.
    """
    _stage_check(state.stage, Stage.SHARE, "node_share")
    cfg = state.cfg
    keys = _verify_advertisements(cfg, advertisements, roster_public_keys)
    if state.name in keys and keys[state.name] != (state.c_pk, state.s_pk):
        raise ProtocolError(f"the advertisement relayed for {state.name!r} is not the one it sent (replaced).")
    active = [v for v in neighbour_graph(cfg)[state.name] if v in keys]
    if len(active) < cfg.threshold:
        raise ProtocolError(
            f"fewer than t = {cfg.threshold} neighbours of {state.name!r} advertised keys ({len(active)});"
            " the round must abort."
        )
    if state.c_sk is None or state.s_sk is None:
        raise ProtocolError("node_share: the state holds no private keys (corrupted state).")
    seed = os.urandom(SEED_BYTES)
    xs = [cfg.x_of(v) for v in active]
    b_shares = split_secret(seed, threshold=cfg.threshold, xs=xs)
    s_shares = split_secret(state.s_sk, threshold=cfg.threshold, xs=xs)
    out: dict[str, bytes] = {}
    for v in active:
        x = cfg.x_of(v)
        plaintext = share_to_bytes(b_shares[x]) + share_to_bytes(s_shares[x])
        key = _share_key(cfg, state.c_sk, keys[v][0], state.name, v)
        out[v] = encrypt(key, plaintext, _share_aad(cfg, state.name, v))
    new = replace(state, stage=Stage.MASKED_INPUT, seed=seed, peers={v: keys[v] for v in active})
    return new, ShareBundle(run_id=cfg.run_id, round=cfg.round, sender=state.name, ciphertexts=out)


def node_masked_input(
    state: NodeState, shares_for_me: SharesForNode, vector: np.ndarray
) -> tuple[NodeState, MaskedInput]:
    """MASKED_INPUT: ``y = x + PRG(b) + Σ ±PRG(s_uv) mod 2^bits``; keep the decrypted shares.

    The pairwise masks are with exactly the neighbours whose shares arrived (they completed
    SHARE, so the coordinator can cancel their masks if they drop later): ``+`` towards a
    neighbour with a larger name, ``-`` towards a smaller one.
    """
    _stage_check(state.stage, Stage.MASKED_INPUT, "node_masked_input")
    cfg = state.cfg
    _require(isinstance(shares_for_me, SharesForNode), "node_masked_input: expected SharesForNode.")
    _check_header(shares_for_me, cfg, "the shares message")
    _require(shares_for_me.recipient == state.name,
             f"shares addressed to {shares_for_me.recipient!r} were delivered to {state.name!r}.")
    if not isinstance(vector, np.ndarray) or vector.dtype != cfg.dtype or vector.shape != (cfg.length,):
        got = f"{vector.dtype} {vector.shape}" if isinstance(vector, np.ndarray) else type(vector).__name__
        raise UpdateError(f"the vector must be {cfg.dtype} of shape ({cfg.length},), got {got}.")
    held: dict[str, tuple[bytes, bytes]] = {}
    for sender, ct in shares_for_me.ciphertexts.items():
        if sender not in state.peers:
            raise ProtocolError(f"shares from {sender!r}, which is not a neighbour that advertised keys.")
        _require(isinstance(ct, bytes) and len(ct) == SHARE_CIPHERTEXT_BYTES,
                 f"the share ciphertext from {sender!r} must be {SHARE_CIPHERTEXT_BYTES} bytes.")
        if state.c_sk is None:
            raise ProtocolError("node_masked_input: the state holds no private keys (corrupted state).")
        key = _share_key(cfg, state.c_sk, state.peers[sender][0], state.name, sender)
        plain = decrypt(key, ct, _share_aad(cfg, sender, state.name))
        b_raw, s_raw = plain[:SHAMIR_SHARE_BYTES], plain[SHAMIR_SHARE_BYTES:]
        share_from_bytes(b_raw), share_from_bytes(s_raw)  # validate now, not at unmask time
        held[sender] = (b_raw, s_raw)
    if len(held) < cfg.threshold:
        raise ProtocolError(
            f"fewer than t = {cfg.threshold} neighbours of {state.name!r} sent shares ({len(held)});"
            " masking with fewer would expose the input, the round must abort."
        )
    if state.seed is None or state.s_sk is None:
        raise ProtocolError("node_masked_input: the state holds no mask secrets (corrupted state).")
    y = vector.astype(cfg.dtype, copy=True)
    y += expand_mask(state.seed, cfg.length, dtype=cfg.dtype)
    for v in sorted(held):
        mask = _pair_mask(cfg, state.s_sk, state.peers[v][1], state.name, v)
        if state.name < v:
            y += mask
        else:
            y -= mask
    new = replace(state, stage=Stage.CONSISTENCY, c_sk=None, s_sk=None, seed=None, held=held)
    return new, MaskedInput(run_id=cfg.run_id, round=cfg.round, node=state.name, vector=y)


def _verify_survivor_signatures(
    cfg: SecAggConfig, survivors: tuple[str, ...], signatures: Mapping[str, bytes], roster: Mapping[str, Any], who: str
) -> tuple[str, ...]:
    """Check every consistency signature on ``survivors`` against the roster; the signers, sorted.

    A signer must be a participant in the signed set (U4 is a subset of U3); a signature that is
    not 64 bytes or does not verify under the signer's roster key is a :class:`CryptoError`.
    """
    if not isinstance(signatures, Mapping):
        raise ProtocolError(f"{who}: `signatures` must be a mapping signer -> bytes (got {type(signatures).__name__}).")
    message = survivor_set_bytes(cfg, survivors)
    in_set = set(survivors)
    for signer, sig in signatures.items():
        _require(isinstance(signer, str) and signer in cfg.participants,
                 f"{who}: a consistency signature from {signer!r}, which is not a participant.")
        _require(signer in in_set, f"{who}: {signer!r} signed a survivor set it is not in (signers must be survivors).")
        if not isinstance(sig, bytes) or len(sig) != _ED25519_SIG_BYTES:
            got = len(sig) if isinstance(sig, bytes) else type(sig).__name__
            raise CryptoError(f"{who}: the consistency signature of {signer!r} must be {_ED25519_SIG_BYTES} bytes, got {got}.")
        try:
            _roster_key(signer, roster).verify(sig, message)
        except InvalidSignature:
            raise CryptoError(
                f"{who}: the consistency signature of {signer!r} does not verify on this survivor set under its roster key."
            ) from None
    return tuple(sorted(signatures))


def node_consistency(
    state: NodeState, request: ConsistencyRequest, identity: NodeIdentity
) -> tuple[NodeState, ConsistencySignature]:
    """CONSISTENCY: sign the survivor set U3 the coordinator shows this node, once per round.

    Refuses a set it is not in, a name that is not a participant, and a set leaving it fewer than
    t surviving neighbours whose shares it holds (it would refuse to unmask anyway). The signed set
    is kept in the state: the node later reveals shares only for that set.
    """
    _stage_check(state.stage, Stage.CONSISTENCY, "node_consistency")
    cfg = state.cfg
    _require(isinstance(request, ConsistencyRequest), "node_consistency: expected a ConsistencyRequest.")
    _require(isinstance(identity, NodeIdentity) and identity.name == state.name,
             "node_consistency: `identity` must be this node's NodeIdentity.")
    _check_header(request, cfg, "the consistency request")
    _require(request.recipient == state.name,
             f"a consistency request for {request.recipient!r} was delivered to {state.name!r}.")
    survivors = tuple(sorted(_check_names("survivors", request.survivors)))
    unknown = sorted(set(survivors) - set(cfg.participants))
    _require(not unknown, f"refused: the survivor set names non-participants {unknown}.")
    _require(state.name in survivors, f"refused: {state.name!r} sent its masked input but is not in the survivor set.")
    alive = [v for v in state.held if v in survivors]
    if len(alive) < cfg.threshold:
        raise ProtocolError(
            f"fewer than t = {cfg.threshold} neighbours of {state.name!r} are in the survivor set ({len(alive)});"
            " refusing to sign."
        )
    sig = identity.signing_key.sign(survivor_set_bytes(cfg, survivors))
    new = replace(state, stage=Stage.UNMASK, signed=survivors)
    return new, ConsistencySignature(run_id=cfg.run_id, round=cfg.round, node=state.name, signature=sig)


def node_unmask(
    state: NodeState, request: UnmaskRequest, roster_public_keys: Mapping[str, Any]
) -> tuple[NodeState, RevealedShares]:
    """UNMASK: reveal b-shares of surviving neighbours and s-shares of dropped ones, once.

    Only after the consistency stage: the request must be for exactly the survivor set this node
    signed, carry valid roster signatures on it from at least :func:`consistency_quorum` distinct
    participants (``roster_public_keys``, obtained out of band), and its survivor and dropped lists
    must be what that set says of the neighbours whose shares the node holds. Refuses
    (:class:`ProtocolError`, or :class:`CryptoError` for signatures) anything else, as well as a
    name in both lists, a non-neighbour or a neighbour whose shares it does not hold, being listed
    as dropped itself, and fewer than t surviving neighbours.
    """
    _stage_check(state.stage, Stage.UNMASK, "node_unmask")
    cfg = state.cfg
    _require(isinstance(request, UnmaskRequest), "node_unmask: expected an UnmaskRequest.")
    _check_header(request, cfg, "the unmask request")
    _require(request.recipient == state.name,
             f"an unmask request for {request.recipient!r} was delivered to {state.name!r}.")
    survivors = set(_check_names("survivors", request.survivors))
    dropped = set(_check_names("dropped", request.dropped))
    signed = tuple(sorted(_check_names("signed_survivors", request.signed_survivors)))
    if signed != state.signed:
        raise ProtocolError(
            f"refused: the unmask request is for survivor set {list(signed)}, not the set {list(state.signed)}"
            f" {state.name!r} signed."
        )
    signers = _verify_survivor_signatures(cfg, signed, request.signatures, roster_public_keys, "the unmask request")
    quorum = consistency_quorum(cfg)
    if len(signers) < quorum:
        raise CryptoError(
            f"refused: {len(signers)} valid signatures on the survivor set, fewer than the quorum"
            f" max(t, n // 2 + 1) = {quorum}."
        )
    both = survivors & dropped
    if both:
        raise ProtocolError(f"refused: asked for both share kinds of {sorted(both)} (survivor and dropped).")
    if state.name in dropped:
        raise ProtocolError(f"refused: {state.name!r} is listed as dropped, yet it is asked to unmask.")
    survivors.discard(state.name)
    nbrs = set(neighbour_graph(cfg)[state.name])
    for v in sorted(survivors | dropped):
        if v not in nbrs:
            raise ProtocolError(f"refused: {v!r} is not a neighbour of {state.name!r}.")
        if v not in state.held:
            raise ProtocolError(f"refused: {state.name!r} holds no shares of {v!r}.")
    in_set = set(signed)
    want_survivors = {v for v in state.held if v in in_set}
    want_dropped = {v for v in state.held if v not in in_set}
    if survivors != want_survivors or dropped != want_dropped:
        raise ProtocolError(
            "refused: the survivor and dropped lists do not match the signed survivor set"
            f" (survivors {sorted(survivors)} vs {sorted(want_survivors)}, dropped {sorted(dropped)} vs {sorted(want_dropped)})."
        )
    if len(survivors & nbrs) < cfg.threshold:
        raise ProtocolError(
            f"fewer than t = {cfg.threshold} neighbours of {state.name!r} survived ({len(survivors & nbrs)});"
            " refusing to unmask."
        )
    reveal = RevealedShares(
        run_id=cfg.run_id, round=cfg.round, node=state.name,
        b_shares={v: state.held[v][0] for v in sorted(survivors)},
        s_shares={v: state.held[v][1] for v in sorted(dropped)},
    )
    return replace(state, stage=Stage.DONE, held={}), reveal


# --------------------------------------------------------------------------- coordinator side


@dataclass(frozen=True, kw_only=True)
class CoordState:
    """The coordinator's protocol state: public keys, who completed which stage, masked vectors."""

    KIND: ClassVar[str] = "coord-state"
    cfg: SecAggConfig
    roster: Mapping[str, bytes] = field(repr=False)
    stage: Stage
    keys: Mapping[str, tuple[bytes, bytes]] = field(default_factory=dict, repr=False)
    shared: tuple[str, ...] = ()
    masked: Mapping[str, np.ndarray] = field(default_factory=dict, repr=False)
    signatures: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def signers(self) -> tuple[str, ...]:
        """U4: survivors whose consistency signatures were accepted (asked to unmask)."""
        return tuple(sorted(self.signatures))

    @property
    def advertised(self) -> tuple[str, ...]:
        """U1: nodes whose advertisements were accepted."""
        return tuple(sorted(self.keys))

    @property
    def survivors(self) -> tuple[str, ...]:
        """U3: nodes whose masked inputs are in the sum."""
        return tuple(sorted(self.masked))

    @property
    def dropped(self) -> tuple[str, ...]:
        """Nodes that shared keys but sent no masked input (their pairwise masks get cancelled)."""
        return tuple(sorted(set(self.shared) - set(self.masked)))

    def to_wire(self) -> dict[str, Any]:
        """Flat record (masked vectors as little-endian bytes)."""
        names = sorted(self.masked)
        dt = self.cfg.dtype.newbyteorder("<")
        return {
            **self.cfg._wire_prefixed(),
            "protocol": PROTOCOL,
            "kind": self.KIND,
            "stage": str(self.stage),
            "roster": sorted(self.roster),
            "roster.keys": [self.roster[n] for n in sorted(self.roster)],
            **_pairs_to_wire("keys", self.keys, "c_pk", "s_pk"),
            "shared": list(self.shared),
            "masked": names,
            "masked.vectors": [self.masked[n].astype(dt, copy=False).tobytes() for n in names],
            "signers": sorted(self.signatures),
            "signatures": [self.signatures[n] for n in sorted(self.signatures)],
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> CoordState:
        """Parse."""
        r = _Wire(wire, "coordinator state", cls.KIND)
        cfg = SecAggConfig._from_prefixed(wire)
        try:
            stage = Stage(r.text("stage"))
        except ValueError:
            raise ProtocolError(f"coordinator state: unknown stage {wire.get('stage')!r}.") from None
        names = r.strs("masked")
        raw = r.bytes_list("masked.vectors", len(names))
        dt = cfg.dtype
        for n, b in zip(names, raw, strict=True):
            _require(len(b) == cfg.length * dt.itemsize, f"coordinator state: the vector of {n!r} has a wrong length.")
        return cls(
            cfg=cfg,
            roster=r.pairs("roster", "roster.keys"),
            stage=stage,
            keys=_pairs_from_wire(r, "keys", "c_pk", "s_pk"),
            shared=tuple(r.strs("shared")),
            masked={n: np.frombuffer(b, dtype=dt.newbyteorder("<")).astype(dt) for n, b in zip(names, raw, strict=True)},
            signatures=r.pairs("signers", "signatures"),
        )


def _raw_ed25519(name: str, value: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    key = _roster_key(name, {name: value})
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def coord_start(cfg: SecAggConfig, roster_public_keys: Mapping[str, Any]) -> tuple[CoordState, dict[str, Any]]:
    """Open a round: the state and the ADVERTISE request (the config's wire form) for every participant."""
    _require(isinstance(cfg, SecAggConfig), "coord_start: `cfg` must be a SecAggConfig.")
    missing = [n for n in cfg.participants if n not in roster_public_keys]
    _require(not missing, f"participants missing from the roster: {missing}.")
    roster = {n: _raw_ed25519(n, roster_public_keys[n]) for n in cfg.participants}
    return CoordState(cfg=cfg, roster=roster, stage=Stage.ADVERTISE), cfg.to_wire()


def _abort_if_below(count: int, cfg: SecAggConfig, what: str) -> None:
    if count < cfg.threshold:
        raise ProtocolError(f"fewer than t = {cfg.threshold} {what} ({count}); the round aborts, nothing is unmasked.")


def coord_collect_advertisements(
    state: CoordState, advertisements: Mapping[str, Advertisement]
) -> tuple[CoordState, dict[str, dict[str, Advertisement]]]:
    """ADVERTISE -> SHARE: verify, then send each node its neighbours' advertisements (and its own)."""
    _stage_check(state.stage, Stage.ADVERTISE, "coord_collect_advertisements")
    cfg = state.cfg
    keys = _verify_advertisements(cfg, advertisements, state.roster)
    _abort_if_below(len(keys), cfg, "nodes advertised keys")
    graph = neighbour_graph(cfg)
    out: dict[str, dict[str, Advertisement]] = {}
    for u in sorted(keys):
        live = [v for v in graph[u] if v in keys]
        _abort_if_below(len(live), cfg, f"neighbours of {u!r} advertised keys")
        out[u] = {v: advertisements[v] for v in [*live, u]}
    return replace(state, stage=Stage.SHARE, keys=dict(keys)), out


def coord_route_shares(
    state: CoordState, bundles: Mapping[str, ShareBundle]
) -> tuple[CoordState, dict[str, SharesForNode]]:
    """SHARE -> MASKED_INPUT: check each bundle went to exactly the sender's live neighbours, then route."""
    _stage_check(state.stage, Stage.SHARE, "coord_route_shares")
    cfg = state.cfg
    _require(isinstance(bundles, Mapping), "share bundles must be a mapping sender -> ShareBundle.")
    graph = neighbour_graph(cfg)
    for sender, bundle in bundles.items():
        _require(isinstance(bundle, ShareBundle), f"the bundle under {sender!r} is not a ShareBundle.")
        _require(bundle.sender == sender, f"the bundle under {sender!r} names sender {bundle.sender!r}.")
        _require(sender in state.keys, f"a share bundle from {sender!r}, which has no accepted advertisement.")
        _check_header(bundle, cfg, f"the share bundle of {sender!r}")
        expected = {v for v in graph[sender] if v in state.keys}
        got = set(bundle.ciphertexts)
        unknown, missing = sorted(got - expected), sorted(expected - got)
        _require(not unknown, f"{sender!r} sent shares for unknown or non-neighbour nodes {unknown}.")
        _require(not missing, f"{sender!r} sent no shares for its neighbours {missing}.")
        for v, ct in bundle.ciphertexts.items():
            _require(isinstance(ct, bytes) and len(ct) == SHARE_CIPHERTEXT_BYTES,
                     f"the share from {sender!r} to {v!r} must be {SHARE_CIPHERTEXT_BYTES} bytes.")
    shared = tuple(sorted(bundles))
    _abort_if_below(len(shared), cfg, "nodes sent shares")
    out: dict[str, SharesForNode] = {}
    for u in shared:
        senders = [v for v in graph[u] if v in bundles]
        _abort_if_below(len(senders), cfg, f"neighbours of {u!r} sent shares")
        out[u] = SharesForNode(run_id=cfg.run_id, round=cfg.round, recipient=u,
                               ciphertexts={v: bundles[v].ciphertexts[u] for v in senders})
    return replace(state, stage=Stage.MASKED_INPUT, shared=shared), out


def coord_collect_masked(
    state: CoordState, masked: Mapping[str, MaskedInput]
) -> tuple[CoordState, dict[str, ConsistencyRequest]]:
    """MASKED_INPUT -> CONSISTENCY: keep the masked vectors; ask every survivor to sign the survivor set U3."""
    _stage_check(state.stage, Stage.MASKED_INPUT, "coord_collect_masked")
    cfg = state.cfg
    _require(isinstance(masked, Mapping), "masked inputs must be a mapping node -> MaskedInput.")
    shared = set(state.shared)
    vectors: dict[str, np.ndarray] = {}
    for name, msg in masked.items():
        _require(isinstance(msg, MaskedInput), f"the masked input under {name!r} is not a MaskedInput.")
        _require(msg.node == name, f"the masked input under {name!r} names {msg.node!r}.")
        _require(name in shared, f"a masked input from {name!r}, which did not complete the share stage.")
        _check_header(msg, cfg, f"the masked input of {name!r}")
        _require(msg.vector.dtype == cfg.dtype and msg.vector.shape == (cfg.length,),
                 f"the masked input of {name!r} must be {cfg.dtype} of length {cfg.length},"
                 f" got {msg.vector.dtype} of length {msg.vector.size}.")
        vectors[name] = msg.vector
    survivors = set(vectors)
    _abort_if_below(len(survivors), cfg, "nodes sent masked inputs")
    graph = neighbour_graph(cfg)
    out: dict[str, UnmaskRequest] = {}
    for u in sorted(shared):
        holders = [w for w in graph[u] if w in survivors and w in state.keys]
        role = "surviving" if u in survivors else "dropped"
        _abort_if_below(len(holders), cfg, f"surviving neighbours hold shares of {role} node {u!r}")
    u3 = tuple(sorted(survivors))
    out: dict[str, ConsistencyRequest] = {
        u: ConsistencyRequest(run_id=cfg.run_id, round=cfg.round, recipient=u, survivors=u3) for u in u3
    }
    return replace(state, stage=Stage.CONSISTENCY, masked=vectors), out


def coord_collect_signatures(
    state: CoordState, signatures: Mapping[str, ConsistencySignature]
) -> tuple[CoordState, dict[str, UnmaskRequest]]:
    """CONSISTENCY -> UNMASK: verify the survivors' signatures on U3; ask each signer about its neighbours.

    The signers are U4 (a subset of U3); every unmask request carries U3 and all of U4's
    signatures. Aborts ("fewer than t ...") below :func:`consistency_quorum` signers or when a
    node's secrets would have fewer than t signers among its neighbours to rebuild them.
    """
    _stage_check(state.stage, Stage.CONSISTENCY, "coord_collect_signatures")
    cfg = state.cfg
    _require(isinstance(signatures, Mapping), "consistency signatures must be a mapping node -> ConsistencySignature.")
    u3 = state.survivors
    sigs: dict[str, bytes] = {}
    for name, msg in signatures.items():
        _require(isinstance(msg, ConsistencySignature), f"the reply under {name!r} is not a ConsistencySignature.")
        _require(msg.node == name, f"the consistency signature under {name!r} names {msg.node!r}.")
        _require(name in state.masked, f"a consistency signature from {name!r}, which sent no masked input.")
        _check_header(msg, cfg, f"the consistency signature of {name!r}")
        sigs[name] = msg.signature
    _verify_survivor_signatures(cfg, u3, sigs, state.roster, "coord_collect_signatures")
    quorum = consistency_quorum(cfg)
    if len(sigs) < quorum:
        raise ProtocolError(
            f"fewer than t = {cfg.threshold} (quorum {quorum}) survivors signed the survivor set ({len(sigs)});"
            " the round aborts, nothing is unmasked."
        )
    graph = neighbour_graph(cfg)
    shared, survivors = set(state.shared), set(u3)
    for u in sorted(shared):
        holders = [w for w in graph[u] if w in sigs]
        role = "surviving" if u in survivors else "dropped"
        _abort_if_below(len(holders), cfg, f"signing neighbours hold shares of {role} node {u!r}")
    out: dict[str, UnmaskRequest] = {}
    for u in sorted(sigs):
        mine = [v for v in graph[u] if v in shared]
        out[u] = UnmaskRequest(run_id=cfg.run_id, round=cfg.round, recipient=u,
                               survivors=tuple(v for v in mine if v in survivors),
                               dropped=tuple(v for v in mine if v not in survivors),
                               signed_survivors=u3, signatures=dict(sigs))
    return replace(state, stage=Stage.UNMASK, signatures=sigs), out


def coord_unmask(state: CoordState, revealed: Mapping[str, RevealedShares]) -> tuple[CoordState, np.ndarray]:
    """UNMASK -> DONE: reconstruct ``b_u`` of survivors and ``s_sk_v`` of dropped nodes; the sum of survivors' x.

    Returns the modular sum (``cfg.dtype``) of the survivors' input vectors; see
    :attr:`CoordState.survivors` for whose inputs it holds.
    """
    _stage_check(state.stage, Stage.UNMASK, "coord_unmask")
    cfg = state.cfg
    _require(isinstance(revealed, Mapping), "revealed shares must be a mapping node -> RevealedShares.")
    graph = neighbour_graph(cfg)
    survivors, dropped = set(state.masked), set(state.dropped)
    b_pts: dict[str, dict[int, int]] = {u: {} for u in survivors}
    s_pts: dict[str, dict[int, int]] = {v: {} for v in dropped}
    for name, msg in revealed.items():
        _require(isinstance(msg, RevealedShares), f"the reply under {name!r} is not RevealedShares.")
        _require(msg.node == name, f"the reply under {name!r} names {msg.node!r}.")
        _require(name in state.signatures, f"revealed shares from {name!r}, which was not asked to unmask.")
        _check_header(msg, cfg, f"the revealed shares of {name!r}")
        mine = {v for v in graph[name] if v in state.shared}
        asked_b, asked_s = mine & survivors, mine & dropped
        extra = sorted((set(msg.b_shares) - asked_b) | (set(msg.s_shares) - asked_s))
        _require(not extra, f"{name!r} revealed shares it was not asked for: {extra}.")
        x = cfg.x_of(name)
        for owner, raw in msg.b_shares.items():
            b_pts[owner][x] = share_from_bytes(raw)
        for owner, raw in msg.s_shares.items():
            s_pts[owner][x] = share_from_bytes(raw)
    _abort_if_below(len(revealed), cfg, "signing nodes answered the unmask request")
    total = np.zeros(cfg.length, dtype=cfg.dtype)
    for u in sorted(survivors):
        _abort_if_below(len(b_pts[u]), cfg, f"shares of the self-mask seed of {u!r} were revealed")
        seed = combine_shares(b_pts[u], threshold=cfg.threshold, length=SEED_BYTES)
        total += state.masked[u]
        total -= expand_mask(seed, cfg.length, dtype=cfg.dtype)
    for v in sorted(dropped):
        _abort_if_below(len(s_pts[v]), cfg, f"shares of the masking key of dropped node {v!r} were revealed")
        s_sk = combine_shares(s_pts[v], threshold=cfg.threshold, length=X25519_KEY_BYTES)
        if public_bytes(load_private(s_sk)) != state.keys[v][1]:
            raise CryptoError(f"the masking key reconstructed for {v!r} does not match its advertised key (altered shares).")
        for u in graph[v]:
            if u not in survivors:
                continue
            mask = _pair_mask(cfg, s_sk, state.keys[u][1], v, u)
            # u added +mask if u < v, else -mask; take it back out.
            if u < v:
                total -= mask
            else:
                total += mask
    return replace(state, stage=Stage.DONE), total


# --------------------------------------------------------------------------- in-memory driver


def run_round_in_memory(
    vectors: Mapping[str, np.ndarray],
    *,
    cfg: SecAggConfig,
    signing_keys: Mapping[str, Ed25519PrivateKey],
    drop_at: Mapping[Stage, Iterable[str]] | None = None,
    through_wire: bool = True,
    transcript: list[tuple[Stage, str, Any]] | None = None,
) -> tuple[np.ndarray, CoordState]:
    """Run one round with every node in-process; ``drop_at[stage]`` names nodes that stop replying there.

    A node dropped at a stage sends nothing from that stage on. With ``through_wire`` every
    message and state goes through ``to_wire()`` / ``from_wire()`` on its way. Returns the
    aggregate (the modular sum of the survivors' vectors) and the final coordinator state.
    ``transcript``, if given, receives ``(stage, node, message)`` for every message the
    coordinator received (its whole view of the round).
    Raises what the stage functions raise (``ProtocolError`` "fewer than t ..." when a round
    falls below the threshold).
    """
    drop_at = drop_at or {}
    gone: set[str] = set()

    def wire(obj: Any) -> Any:
        return type(obj).from_wire(obj.to_wire()) if through_wire else obj

    def seen(stage: Stage, received: Mapping[str, Any]) -> None:
        if transcript is not None:
            transcript.extend((stage, n, m) for n, m in sorted(received.items()))

    def alive(stage: Stage, names: Iterable[str]) -> list[str]:
        gone.update(drop_at.get(stage, ()))
        return [n for n in names if n not in gone]

    roster = {n: k.public_key() for n, k in signing_keys.items()}
    coord, request = coord_start(cfg, roster)
    node_cfg = SecAggConfig.from_wire(request) if through_wire else cfg
    nodes: dict[str, NodeState] = {}
    ads: dict[str, Advertisement] = {}
    for n in alive(Stage.ADVERTISE, cfg.participants):
        nodes[n], ads[n] = node_advertise(node_cfg, NodeIdentity(name=n, signing_key=signing_keys[n]))
        nodes[n], ads[n] = wire(nodes[n]), wire(ads[n])
    seen(Stage.ADVERTISE, ads)
    coord, to_nodes = coord_collect_advertisements(wire(coord), ads)
    bundles: dict[str, ShareBundle] = {}
    for n in alive(Stage.SHARE, to_nodes):
        inbound = advertisements_from_wire(advertisements_to_wire(to_nodes[n])) if through_wire else to_nodes[n]
        nodes[n], bundle = node_share(nodes[n], inbound, roster)
        nodes[n], bundles[n] = wire(nodes[n]), wire(bundle)
    seen(Stage.SHARE, bundles)
    coord, routed = coord_route_shares(wire(coord), bundles)
    masked: dict[str, MaskedInput] = {}
    for n in alive(Stage.MASKED_INPUT, routed):
        nodes[n], msg = node_masked_input(nodes[n], wire(routed[n]), vectors[n])
        nodes[n], masked[n] = wire(nodes[n]), wire(msg)
    seen(Stage.MASKED_INPUT, masked)
    coord, checks = coord_collect_masked(wire(coord), masked)
    signed: dict[str, ConsistencySignature] = {}
    for n in alive(Stage.CONSISTENCY, checks):
        nodes[n], sig = node_consistency(nodes[n], wire(checks[n]), NodeIdentity(name=n, signing_key=signing_keys[n]))
        nodes[n], signed[n] = wire(nodes[n]), wire(sig)
    seen(Stage.CONSISTENCY, signed)
    coord, requests = coord_collect_signatures(wire(coord), signed)
    revealed: dict[str, RevealedShares] = {}
    for n in alive(Stage.UNMASK, requests):
        nodes[n], reply = node_unmask(nodes[n], wire(requests[n]), roster)
        revealed[n] = wire(reply)
    seen(Stage.UNMASK, revealed)
    coord, total = coord_unmask(wire(coord), revealed)
    return total, coord
