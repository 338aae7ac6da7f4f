"""Secure-aggregation primitives: AES-GCM, X25519 + HKDF, AES-CTR mask expansion, Shamir sharing."""

from __future__ import annotations

import itertools
import os
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcollab.core import CryptoError
from fedcollab.crypto import (
    SHAMIR_PRIME,
    SHAMIR_SHARE_BYTES,
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


class TestAesGcm:
    def test_round_trip(self):
        """decrypt(encrypt(m)) == m under the same key and AAD; the nonce is fresh per call."""
        key, aad = os.urandom(32), b"run|round|u|v"
        ct1, ct2 = encrypt(key, b"share pair", aad), encrypt(key, b"share pair", aad)
        assert decrypt(key, ct1, aad) == b"share pair"
        assert ct1[:12] != ct2[:12] and len(ct1) == 12 + len(b"share pair") + 16

    @pytest.mark.parametrize("where", [0, 12, 20, -1])
    def test_tampered_ciphertext_is_refused(self, where):
        """Flipping any bit (nonce, body or tag) fails authentication with CryptoError."""
        key = os.urandom(32)
        ct = bytearray(encrypt(key, b"0123456789", b"aad"))
        ct[where] ^= 1
        with pytest.raises(CryptoError, match="authentication failed"):
            decrypt(key, bytes(ct), b"aad")

    def test_other_aad_or_key_is_refused(self):
        """The AAD binds the context: another sender/recipient or key does not open it."""
        key = os.urandom(32)
        ct = encrypt(key, b"x", b"u->v")
        with pytest.raises(CryptoError):
            decrypt(key, ct, b"v->u")
        with pytest.raises(CryptoError):
            decrypt(os.urandom(32), ct, b"u->v")

    def test_short_ciphertext_and_wrong_key_length(self):
        """Too short a ciphertext or a non-256-bit key is a CryptoError, not a library exception."""
        with pytest.raises(CryptoError, match="at least 28 bytes"):
            decrypt(os.urandom(32), b"short", b"")
        with pytest.raises(CryptoError, match="must be 32 bytes"):
            encrypt(os.urandom(16), b"x", b"")


class TestAgreement:
    def test_both_sides_agree_and_hkdf_binds_context(self):
        """X25519 gives both parties the same secret; HKDF with another info gives another key."""
        a_sk, a_pk = generate_keypair()
        b_sk, b_pk = generate_keypair()
        s1, s2 = agree(a_sk, b_pk), agree(private_bytes(b_sk), a_pk)
        assert s1 == s2 and len(s1) == 32
        k1 = derive_key(s1, info=b"run|1|a|b|share")
        assert k1 == derive_key(s2, info=b"run|1|a|b|share")
        assert k1 != derive_key(s1, info=b"run|2|a|b|share")
        assert public_bytes(load_private(private_bytes(a_sk))) == a_pk

    def test_bad_peer_keys(self):
        """A wrong-length or low-order (all-zero) public key is a CryptoError."""
        sk, _ = generate_keypair()
        with pytest.raises(CryptoError, match="32 bytes"):
            agree(sk, b"\x01" * 31)
        with pytest.raises(CryptoError, match="low-order"):
            agree(sk, bytes(32))


class TestExpandMask:
    def test_deterministic_per_seed_and_seeds_differ(self):
        """The same seed gives the same mask; another seed gives another one."""
        seed = os.urandom(32)
        a, b = expand_mask(seed, 1000, dtype=np.uint32), expand_mask(seed, 1000, dtype=np.uint32)
        assert a.dtype == np.uint32 and a.shape == (1000,) and np.array_equal(a, b)
        assert not np.array_equal(a, expand_mask(os.urandom(32), 1000, dtype=np.uint32))

    @pytest.mark.parametrize("byte", [0, 4, 8, 31])
    def test_every_seed_byte_matters(self, byte):
        """Flipping any one byte of the 32 (the last included) changes the mask: no 32-bit fold."""
        seed = bytearray(os.urandom(32))
        a = expand_mask(bytes(seed), 64, dtype=np.uint64)
        seed[byte] ^= 0x80
        b = expand_mask(bytes(seed), 64, dtype=np.uint64)
        assert np.count_nonzero(a == b) == 0

    def test_prefix_consistent_and_uniform_looking(self):
        """A shorter mask is a prefix of a longer one; uint32 words average near 2^31."""
        seed = os.urandom(32)
        long = expand_mask(seed, 300_001, dtype=np.uint32)
        assert np.array_equal(long[:5], expand_mask(seed, 5, dtype=np.uint32))
        assert abs(long.astype(np.float64).mean() / 2**31 - 1) < 0.01
        assert len(np.unique(long)) > 299_000

    def test_refuses_bad_arguments(self):
        """Only 32-byte seeds, non-negative n and uint32/uint64 are accepted."""
        with pytest.raises(CryptoError, match="32 bytes"):
            expand_mask(b"\x00" * 4, 10, dtype=np.uint32)
        with pytest.raises(CryptoError, match="uint32 or uint64"):
            expand_mask(os.urandom(32), 10, dtype=np.int64)
        with pytest.raises(CryptoError, match="non-negative"):
            expand_mask(os.urandom(32), -1, dtype=np.uint32)
        assert expand_mask(os.urandom(32), 0, dtype=np.uint32).shape == (0,)

    def test_speed(self, capsys):
        """Prints parameters/s (one core); the floor only catches an accidental pure-Python PRG."""
        seed, n = os.urandom(32), 1_000_000
        rates = {}
        for dtype in (np.uint32, np.uint64):
            expand_mask(seed, n, dtype=dtype)
            start = time.perf_counter()
            for _ in range(5):
                expand_mask(seed, n, dtype=dtype)
            rates[np.dtype(dtype).name] = 5 * n / (time.perf_counter() - start)
        with capsys.disabled():
            print("\nexpand_mask: " + ", ".join(f"{k} {v / 1e6:.0f} M parameters/s" for k, v in rates.items()))
        assert min(rates.values()) > 5e6


class TestShamir:
    def test_any_t_of_n_reconstruct(self):
        """Every subset of t (or more) of n shares gives the secret back."""
        secret = os.urandom(32)
        shares = split_secret(secret, threshold=3, xs=[2, 3, 5, 7, 11])
        for k in (3, 4, 5):
            for subset in itertools.combinations(shares, k):
                assert combine_shares({x: shares[x] for x in subset}, threshold=3, length=32) == secret

    def test_t_minus_one_shares_fail_or_give_a_wrong_secret(self):
        """Fewer than t shares are refused; forcing a lower threshold gives no information back."""
        secret = os.urandom(32)
        shares = split_secret(secret, threshold=3, n_shares=5)
        two = {x: shares[x] for x in (1, 4)}
        with pytest.raises(CryptoError, match="fewer than t shares"):
            combine_shares(two, threshold=3, length=32)
        try:
            wrong = combine_shares(two, threshold=2, length=32)
        except CryptoError:
            pass  # the interpolated value does not even fit in 32 bytes
        else:
            assert wrong != secret

    def test_altered_share_detected_with_extra_shares(self):
        """With more than t shares, an altered one is detected rather than silently used."""
        shares = split_secret(os.urandom(32), threshold=2, n_shares=4)
        shares[4] = (shares[4] + 1) % SHAMIR_PRIME
        with pytest.raises(CryptoError, match="inconsistent"):
            combine_shares(shares, threshold=2, length=32)

    @settings(max_examples=25, deadline=None)
    @given(secret=st.binary(min_size=1, max_size=64), t=st.integers(1, 5), extra=st.integers(0, 3))
    def test_round_trip_property(self, secret, t, extra):
        """Secrets of 1..64 bytes survive split/serialise/combine for any t and n >= t."""
        shares = split_secret(secret, threshold=t, n_shares=t + extra)
        wire = {x: share_to_bytes(y) for x, y in shares.items()}
        assert all(len(b) == SHAMIR_SHARE_BYTES for b in wire.values())
        back = {x: share_from_bytes(b) for x, b in wire.items()}
        assert combine_shares(back, threshold=t, length=len(secret)) == secret

    def test_bad_arguments(self):
        """Clear CryptoErrors for oversize secrets, duplicate x, t > n, bad share bytes."""
        with pytest.raises(CryptoError, match="1 to 64 bytes"):
            split_secret(b"x" * 65, threshold=2, n_shares=3)
        with pytest.raises(CryptoError, match="distinct"):
            split_secret(b"x", threshold=2, xs=[1, 1, 2])
        with pytest.raises(CryptoError, match="threshold"):
            split_secret(b"x", threshold=4, n_shares=3)
        with pytest.raises(CryptoError, match="exactly one"):
            split_secret(b"x", threshold=2)
        with pytest.raises(CryptoError, match="66 bytes"):
            share_from_bytes(b"\x00" * 65)
        with pytest.raises(CryptoError, match="below p"):
            share_from_bytes(b"\xff" * 66)
