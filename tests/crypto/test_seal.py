"""Sealed party-to-party channels: what a relaying coordinator can and cannot do to them."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcollab.core import CryptoError
from fedcollab.crypto import SealAdvert, SealKey


def _roster_key(sk: Ed25519PrivateKey) -> str:
    return sk.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


@pytest.fixture()
def pair():
    ska, skb = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    a, b = SealKey.generate("run1", "clinic"), SealKey.generate("run1", "lab")
    ca = a.channel(b.advert(skb), roster_key=_roster_key(skb))
    cb = b.channel(a.advert(ska), roster_key=_roster_key(ska))
    return ca, cb, (a, b, ska, skb)


def test_round_trip_both_directions_in_order(pair):
    ca, cb, _ = pair
    for i in range(3):
        assert cb.open("query", ca.seal("query", b"q%d" % i)) == b"q%d" % i
        assert ca.open("reply", cb.seal("reply", b"r%d" % i)) == b"r%d" % i


def test_ciphertext_hides_payload_and_is_fresh(pair):
    ca, cb, _ = pair
    payload = b"threshold=42.5" * 4
    s1, s2 = ca.seal("k", payload), ca.seal("k", payload)
    assert payload not in s1 and b"threshold" not in s1
    assert s1[8:] != s2[8:]  # random nonces: the same payload never seals the same way


def test_altered_replayed_reordered_or_rekinded_messages_are_refused(pair):
    ca, cb, _ = pair
    s0, s1 = ca.seal("k", b"zero"), ca.seal("k", b"one")
    bad = bytearray(s0)
    bad[-1] ^= 1
    with pytest.raises(CryptoError, match="authentication failed"):
        cb.open("k", bytes(bad))
    with pytest.raises(CryptoError, match="sequence number 1, expected 0"):
        cb.open("k", s1)  # reordered (s0 not yet delivered)
    with pytest.raises(CryptoError, match="authentication failed"):
        cb.open("other-kind", s0)  # moved to another message kind
    assert cb.open("k", s0) == b"zero"
    with pytest.raises(CryptoError, match="sequence number 0, expected 1"):
        cb.open("k", s0)  # replayed
    assert cb.open("k", s1) == b"one"


def test_own_messages_cannot_be_reflected_back(pair):
    ca, cb, _ = pair
    s = ca.seal("k", b"x")
    with pytest.raises(CryptoError):
        ca.open("k", s)  # the other direction has another key


def test_other_run_cannot_open(pair):
    ca, _, (a, b, ska, skb) = pair
    other_b = SealKey.generate("run2", "lab")
    with pytest.raises(CryptoError, match="does not verify"):
        # an advert signed for run1 presented in run2
        other_b.channel(SealAdvert(party="clinic", public=a.public, signature=a.advert(ska).signature), roster_key=_roster_key(ska))


def test_coordinator_key_in_the_middle_is_refused(pair):
    _, _, (a, b, ska, skb) = pair
    mallory_sk = Ed25519PrivateKey.generate()
    m = SealKey.generate("run1", "lab")
    forged = m.advert(mallory_sk)  # claims to be the lab, signed by the coordinator's own key
    with pytest.raises(CryptoError, match="does not verify against the roster key"):
        a.channel(forged, roster_key=_roster_key(skb))
    swapped = SealAdvert(party="lab", public=m.public, signature=b.advert(skb).signature)  # the lab's signature on another key
    with pytest.raises(CryptoError, match="does not verify"):
        a.channel(swapped, roster_key=_roster_key(skb))
    with pytest.raises(CryptoError, match="itself"):
        a.channel(a.advert(ska), roster_key=_roster_key(ska))
