"""Sealed party-to-party channels through a relaying coordinator (vertical runs in deployment).

In a vertical run the label holder and each passive party talk *through* the coordinator (the
only party every node connects to), but what they say is for each other only: the instance
space, split notices and partitions, the PSI's blinded points and the intersection. Each pair of
parties therefore seals its messages end to end:

* per run, every party makes a fresh X25519 key (OS CSPRNG) and signs it with its Ed25519 node
  key (:class:`SealAdvert`); the peer checks that signature against the roster key it got out of
  band, so a coordinator cannot put its own key in the middle;
* X25519 agreement, then HKDF-SHA256 bound to the run and both names gives one AES-256-GCM key
  per direction;
* every message's associated data is (run, sender, receiver, message kind, sequence number): a
  message cannot be moved to another run, pair, kind or place in the conversation, and the
  receiver accepts each direction's sequence numbers in order only (no replay, no reordering,
  no dropped message going unnoticed).

All primitives are those of ``cryptography`` (:mod:`fedcollab.crypto._secagg_primitives`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcollab.core import CryptoError
from fedcollab.crypto._he import _frame, sign, verify
from fedcollab.crypto._secagg_primitives import X25519_KEY_BYTES, agree, decrypt, derive_key, encrypt, generate_keypair

SEAL_PROTOCOL = b"fedcollab/seal/v1"
_SEQ = struct.Struct(">Q")


@dataclass(frozen=True)
class SealAdvert:
    """A party's per-run X25519 public key, signed with its Ed25519 node key."""

    party: str
    public: bytes
    signature: bytes

    def check(self, *, run_id: str, roster_key: str) -> None:
        """Refuse an advert whose key is not signed by ``roster_key`` (hex Ed25519) for this run and party."""
        if not isinstance(self.public, bytes) or len(self.public) != X25519_KEY_BYTES:
            raise CryptoError(f"seal advert of {self.party!r}: `public` must be {X25519_KEY_BYTES} bytes.")
        verify(roster_key, _advert_message(run_id, self.party, self.public), self.signature, what=f"seal advert of {self.party!r}")


def _advert_message(run_id: str, party: str, public: bytes) -> bytes:
    return _frame(SEAL_PROTOCOL, b"advert", run_id, party, public)


@dataclass
class SealKey:
    """This party's per-run key (never leaves the node)."""

    run_id: str
    party: str
    _private: X25519PrivateKey = field(repr=False)
    public: bytes = b""

    @classmethod
    def generate(cls, run_id: str, party: str) -> SealKey:
        """A fresh X25519 key for one run."""
        private, public = generate_keypair()
        return cls(run_id=run_id, party=party, _private=private, public=public)

    def advert(self, signing_key: Ed25519PrivateKey) -> SealAdvert:
        """The public half, signed with the node's Ed25519 key."""
        return SealAdvert(party=self.party, public=self.public, signature=sign(signing_key, _advert_message(self.run_id, self.party, self.public)))

    def channel(self, peer: SealAdvert, *, roster_key: str) -> SealedChannel:
        """The channel to ``peer`` (its advert checked against its roster key first)."""
        if peer.party == self.party:
            raise CryptoError(f"a party cannot open a sealed channel to itself ({self.party!r}).")
        peer.check(run_id=self.run_id, roster_key=roster_key)
        shared = agree(self._private, peer.public)
        lo, hi = sorted((self.party, peer.party))
        okm = derive_key(shared, info=_frame(SEAL_PROTOCOL, b"keys", self.run_id, lo, hi), length=64)
        lo_to_hi, hi_to_lo = okm[:32], okm[32:]
        mine_first = self.party == lo
        return SealedChannel(run_id=self.run_id, me=self.party, peer=peer.party, _send=lo_to_hi if mine_first else hi_to_lo,
                             _recv=hi_to_lo if mine_first else lo_to_hi)


@dataclass
class SealedChannel:
    """One party's end of a sealed channel: ``seal`` what it sends, ``open`` what it receives, in order."""

    run_id: str
    me: str
    peer: str
    _send: bytes = field(repr=False)
    _recv: bytes = field(repr=False)
    sent: int = 0
    received: int = 0

    def _aad(self, sender: str, receiver: str, kind: str, seq: int) -> bytes:
        return _frame(SEAL_PROTOCOL, b"message", self.run_id, sender, receiver, kind, seq)

    def seal(self, kind: str, payload: bytes) -> bytes:
        """``sequence (8 bytes) ‖ AES-256-GCM(payload)`` for the peer."""
        seq = self.sent
        out = _SEQ.pack(seq) + encrypt(self._send, payload, self._aad(self.me, self.peer, kind, seq))
        self.sent += 1
        return out

    def open(self, kind: str, sealed: bytes) -> bytes:
        """The payload of the peer's next message of ``kind``; ``CryptoError`` if altered, replayed, reordered or of another kind."""
        if not isinstance(sealed, (bytes, bytearray)) or len(sealed) < _SEQ.size:
            raise CryptoError(f"a sealed message from {self.peer!r} must be bytes of at least {_SEQ.size}, got {type(sealed).__name__}.")
        (seq,) = _SEQ.unpack(bytes(sealed[: _SEQ.size]))
        if seq != self.received:
            raise CryptoError(f"a sealed message from {self.peer!r} has sequence number {seq}, expected {self.received} "
                              "(replayed, reordered or one went missing).")
        payload = decrypt(self._recv, bytes(sealed[_SEQ.size:]), self._aad(self.peer, self.me, kind, seq))
        self.received += 1
        return payload


__all__ = ["SealAdvert", "SealKey", "SealedChannel"]
