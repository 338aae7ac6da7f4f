"""ECDH-PSI (fedcollab.protocols.psi): correctness, canonical order, the wire, refusals, releases."""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

import numpy as np
import pytest
import rbcl

from fedcollab.core import DataValidationError, ProtocolError
from fedcollab.protocols.psi import (
    POINT_BYTES,
    BlindedSet,
    IntersectionNotice,
    PassiveReply,
    active_init,
    active_match,
    hash_to_group,
    passive_finish,
    passive_init,
    passive_reply,
    psi_align,
)

DOMAIN = b"test-run-1"
IDENTITY = bytes(32)  # ristretto255's neutral element: a valid encoding, refused as input


def _ids(rng: random.Random, n: int, prefix: str = "c") -> list[str]:
    return [f"{prefix}{rng.getrandbits(40):010x}" for _ in range(n)]


def _run(ids_a, ids_b, *, reveal="both"):
    a, blinded = active_init(ids_a, DOMAIN, reveal=reveal, workers=1)
    p = passive_init(ids_b, DOMAIN, workers=1)
    p, reply = passive_reply(p, blinded, workers=1)
    a, notice, ev_a = active_match(a, reply, workers=1)
    p, res_p, ev_p = passive_finish(p, notice)
    return a, p, blinded, reply, notice, res_p, ev_a, ev_p


def _check_aligned(ids_a, ids_b, ia, ib):
    common = set(ids_a) & set(ids_b)
    assert len(ia) == len(ib) == len(common)
    assert [ids_a[i] for i in ia] == [ids_b[j] for j in ib]
    assert {ids_a[i] for i in ia} == common


@pytest.mark.parametrize("n_a, n_b, n_common", [(200, 300, 120), (50, 60, 0), (80, 80, 80), (0, 10, 0), (1, 1, 1)])
def test_intersection_matches_sets_in_one_canonical_order(n_a, n_b, n_common):
    rng = random.Random(n_a * 1000 + n_b)
    common = _ids(rng, n_common, "x")
    ids_a = common + _ids(rng, n_a - n_common, "a")
    ids_b = common + _ids(rng, n_b - n_common, "b")
    rng.shuffle(ids_a)
    rng.shuffle(ids_b)
    ia, ib, events = psi_align(ids_a, ids_b, DOMAIN, workers=2)
    _check_aligned(ids_a, ids_b, ia, ib)
    assert ia.dtype == ib.dtype == np.int64
    assert [e.details["size"] for e in events] == [n_common, n_common]


def test_duplicate_ids_refused():
    with pytest.raises(DataValidationError, match="active's record ids repeat"):
        psi_align(["a", "b", "a"], ["a"], DOMAIN)
    with pytest.raises(DataValidationError, match="passive's record ids repeat"):
        psi_align(["a", "b"], ["c", "c"], DOMAIN)
    with pytest.raises(DataValidationError, match="must be strings"):
        psi_align(["a", 3], ["c"], DOMAIN)  # type: ignore[list-item]


def test_wire_carries_only_valid_points_and_no_id_bytes():
    rng = random.Random(7)
    common = _ids(rng, 40, "x")
    ids_a = common + _ids(rng, 30, "a")
    ids_b = common + _ids(rng, 50, "b")
    _, _, blinded, reply, notice, _, _, _ = _run(ids_a, ids_b)
    fields = {"BlindedSet.points": blinded.points, "PassiveReply.reblinded": reply.reblinded, "PassiveReply.points": reply.points}
    assert len(blinded.points) == 70 * POINT_BYTES and len(reply.reblinded) == 70 * POINT_BYTES and len(reply.points) == 90 * POINT_BYTES
    for name, buf in fields.items():
        pts = [buf[i:i + 32] for i in range(0, len(buf), 32)]
        assert all(rbcl.crypto_core_ristretto255_is_valid_point(p) for p in pts), name
    wire = b"".join(fields.values()) + blinded.domain_tag + notice.positions.tobytes()
    for x in ids_a + ids_b:
        e = x.encode()
        for needle in (e, hashlib.sha256(e).digest(), hashlib.sha512(e).digest()[:32]):
            assert needle not in wire
    assert DOMAIN not in wire


def test_shuffled_and_fresh_per_run():
    ids = [f"r{i}" for i in range(64)]
    _, b1 = active_init(ids, DOMAIN, workers=1)
    _, b2 = active_init(ids, DOMAIN, workers=1)
    s1 = {b1.points[i:i + 32] for i in range(0, len(b1.points), 32)}
    s2 = {b2.points[i:i + 32] for i in range(0, len(b2.points), 32)}
    assert not s1 & s2  # fresh scalars: no blinded point repeats across runs
    # injected randomness: deterministic for tests, and the order is shuffled (not the input order)
    stream = random.Random(3)
    a, b3 = active_init(ids, DOMAIN, rng_bytes=lambda n: stream.randbytes(n), workers=1)
    assert sorted(a.order.tolist()) == list(range(64)) and a.order.tolist() != list(range(64))
    stream = random.Random(3)
    _, b4 = active_init(ids, DOMAIN, rng_bytes=lambda n: stream.randbytes(n), workers=1)
    assert b3.points == b4.points


def _bad_points():
    rng = random.Random(11)
    while True:
        junk = rng.randbytes(32)
        if not rbcl.crypto_core_ristretto255_is_valid_point(junk):
            break
    # a valid element's encoding with the top bit set: not canonical (s >= 2^255 > p, RFC 9496), which
    # libsodium decodes as the same element (it ignores that bit): the protocol refuses it itself
    good = rbcl.crypto_core_ristretto255_from_hash(hashlib.sha512(b"x").digest())
    non_canonical = good[:31] + bytes([good[31] | 0x80])
    assert rbcl.crypto_core_ristretto255_is_valid_point(non_canonical)
    # an edwards25519 point of order 8 (valid there, and an attack on cofactor groups): not a ristretto255 encoding
    torsion = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
    assert not rbcl.crypto_core_ristretto255_is_valid_point(torsion)
    return {"random bytes": junk, "identity": IDENTITY, "non-canonical": non_canonical, "edwards torsion": torsion}


@pytest.mark.parametrize("kind", ["random bytes", "identity", "non-canonical", "edwards torsion"])
def test_wrong_group_elements_refused(kind):
    bad = _bad_points()[kind]
    ids_a, ids_b = [f"a{i}" for i in range(20)], [f"a{i}" for i in range(10, 30)]
    a, blinded = active_init(ids_a, DOMAIN, workers=1)
    p = passive_init(ids_b, DOMAIN, workers=1)
    forged = replace(blinded, points=blinded.points[:5 * 32] + bad + blinded.points[6 * 32:])
    with pytest.raises(ProtocolError, match=r"`BlindedSet.points\[5\]` is not a valid point"):
        passive_reply(p, forged, workers=1)
    p, reply = passive_reply(p, blinded, workers=1)
    with pytest.raises(ProtocolError, match=r"`PassiveReply.points\[3\]` is not a valid point"):
        active_match(a, replace(reply, points=reply.points[:3 * 32] + bad + reply.points[4 * 32:]), workers=1)
    # a re-blinded point that matches nothing is checked too; find one of the active's non-common positions
    _, _, ev = active_match(a, reply, workers=1)
    k = next(k for k in range(20) if ids_a[int(a.order[k])] not in set(ids_b))
    with pytest.raises(ProtocolError, match=rf"`PassiveReply.reblinded\[{k}\]` is not a valid point"):
        active_match(a, replace(reply, reblinded=reply.reblinded[:k * 32] + bad + reply.reblinded[(k + 1) * 32:]), workers=1)


def test_malformed_messages_refused():
    ids_a, ids_b = [f"a{i}" for i in range(20)], [f"a{i}" for i in range(10, 30)]
    a, blinded = active_init(ids_a, DOMAIN, workers=1)
    p = passive_init(ids_b, DOMAIN, workers=1)
    with pytest.raises(ProtocolError, match="`BlindedSet.points` has 639 bytes"):
        passive_reply(p, replace(blinded, points=blinded.points[:-1]), workers=1)
    with pytest.raises(ProtocolError, match="`BlindedSet.points` repeats a point"):
        passive_reply(p, replace(blinded, points=blinded.points + blinded.points[:32]), workers=1)
    with pytest.raises(ProtocolError, match="different domain separators"):
        passive_reply(passive_init(ids_b, b"other", workers=1), blinded, workers=1)
    with pytest.raises(ProtocolError, match="speaks"):
        passive_reply(p, replace(blinded, protocol="v0"), workers=1)
    p2, reply = passive_reply(p, blinded, workers=1)
    with pytest.raises(ProtocolError, match="already answered"):
        passive_reply(p2, blinded, workers=1)
    with pytest.raises(ProtocolError, match=r"`PassiveReply.reblinded` has 19 points, expected 20"):
        active_match(a, replace(reply, reblinded=reply.reblinded[:-32]), workers=1)
    with pytest.raises(ProtocolError, match="`PassiveReply.points` has 33 bytes"):
        active_match(a, PassiveReply(reblinded=reply.reblinded, points=reply.points[:33]), workers=1)
    a2, notice, _ = active_match(a, reply, workers=1)
    with pytest.raises(ProtocolError, match="already received"):
        active_match(a2, reply, workers=1)
    with pytest.raises(ProtocolError, match="`IntersectionNotice.size`"):
        passive_finish(p2, IntersectionNotice(size=21, positions=None))
    with pytest.raises(ProtocolError, match="`IntersectionNotice.positions` must be 10"):
        passive_finish(p2, IntersectionNotice(size=10, positions=notice.positions[:9]))
    with pytest.raises(ProtocolError, match="repeats a position"):
        passive_finish(p2, IntersectionNotice(size=10, positions=np.full(10, notice.positions[0])))
    with pytest.raises(ProtocolError, match="missing"):
        passive_finish(p2, IntersectionNotice(size=10))
    with pytest.raises(ProtocolError, match="before the active"):
        passive_finish(p, notice)


@pytest.mark.parametrize("reveal", ["both", "label_holder"])
def test_releases_and_what_each_party_learns(reveal):
    ids_a = [f"a{i}" for i in range(30)]
    ids_b = [f"a{i}" for i in range(20, 45)]
    a, p, blinded, _, notice, res_p, ev_a, ev_p = _run(ids_a, ids_b, reveal=reveal)
    assert blinded.reveal == reveal
    assert a.result is not None and a.result.membership and a.result.size == 10
    assert sorted(ids_a[i] for i in a.result.rows) == sorted(set(ids_a) & set(ids_b))
    for ev, party, observer, ids_in in ((ev_a, "active", "passive_party", 30), (ev_p, "passive", "label_holder", 25)):
        assert (ev.kind, ev.about, ev.unit, ev.observer, ev.party, ev.added_by) == ("psi_intersection", "train+test", "record", observer, party, party)
        assert ev.non_private and ev.declared_public
        assert ev.details["size"] == 10 and ev.details["ids_in"] == ids_in
    assert ev_p.details["membership"] is True  # the active party always learns which of its records the passive one holds
    if reveal == "both":
        assert ev_a.details["membership"] is True and res_p.membership
        _check_aligned(ids_a, ids_b, a.result.rows, res_p.rows)
    else:
        assert ev_a.details["membership"] is False
        assert notice.positions is None and not res_p.membership and res_p.size == 10 and res_p.rows.size == 0
        with pytest.raises(ProtocolError, match="must be absent"):
            passive_finish(p.__class__(**{**p.__dict__, "result": None}), IntersectionNotice(size=10, positions=np.arange(10)))


def test_psi_align_fits_the_aligner_signature():
    from functools import partial

    aligner = partial(psi_align, reveal="both", active="hospital", passive="bank")
    ia, ib, events = aligner(["a", "b", "c"], ["c", "a", "z"], b"dom")
    assert sorted(["a", "b", "c"][i] for i in ia) == ["a", "c"] and [["c", "a", "z"][j] for j in ib] == [["a", "b", "c"][i] for i in ia]
    assert [e.party for e in events] == ["hospital", "bank"]
    assert isinstance(BlindedSet, type)


def test_hash_to_group_is_rfc_9496():
    """The map under H is RFC 9496's hash-to-group (its appendix A.3 vector), and H is domain-separated per run."""
    label = b"Ristretto is traditionally a short shot of espresso coffee"
    got = rbcl.crypto_core_ristretto255_from_hash(hashlib.sha512(label).digest())
    assert got.hex() == "3066f82a1a747d45120d1740f14358531a8f04bbffe6a819f86dfe50f44a0a46"
    a, b = hash_to_group(["id-1", "id-2"], b"run-a", workers=1), hash_to_group(["id-1"], b"run-b", workers=1)
    assert len(set(a)) == 2 and a[0] != b[0] and all(rbcl.crypto_core_ristretto255_is_valid_point(p) for p in a)
