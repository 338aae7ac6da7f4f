"""HE primitives on real TenSEAL BFV: parameters, exact sums, context custody, hostile input, key packages, signatures."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import CryptoError
from fedcollab.crypto import (
    BFV_4096,
    HeParameters,
    aggregate_message,
    generate_keypair,
    load_public_context,
    load_secret_context,
    new_secret_context,
    open_key_package,
    seal_key_package,
    sign,
    upload_hash,
    verify,
)
from fedcollab.crypto._he import MAX_COEFF_BITS_128, check_parameters
from fedcollab.privacy.accounting import public_key_hex


@pytest.fixture(scope="module")
def ctx():
    return new_secret_context()


@pytest.fixture(scope="module")
def pub(ctx):
    return ctx.public()


class TestParameters:
    def test_default_is_128_bit_and_batching(self):
        """BFV_4096 stays under 109 modulus bits at N = 4096, and t = 1 mod 2N gives N slots."""
        check_parameters(BFV_4096)
        assert sum(BFV_4096.coeff_mod_bit_sizes) <= MAX_COEFF_BITS_128[4096]
        assert BFV_4096.plain_modulus % (2 * 4096) == 1 and BFV_4096.slots == 4096

    def test_spec_bound_agrees_with_crypto(self):
        """The spec layer's copy of (t - 1) / 2 is the crypto parameter set's."""
        from fedcollab.spec._he import HE_MAX_ABS

        assert HE_MAX_ABS == BFV_4096.max_abs

    def test_insecure_parameters_refused(self):
        """A coefficient modulus above the 128-bit bound, or a t unusable for batching, is refused by name."""
        with pytest.raises(CryptoError, match="coeff_mod_bit_sizes"):
            check_parameters(HeParameters(name="x", poly_modulus_degree=4096, plain_modulus=BFV_4096.plain_modulus, coeff_mod_bit_sizes=(60, 60)))
        with pytest.raises(CryptoError, match="plain_modulus"):
            check_parameters(HeParameters(name="x", poly_modulus_degree=4096, plain_modulus=65537 + 2, coeff_mod_bit_sizes=(40, 60)))


class TestExactSums:
    def test_sum_of_three_equals_numpy(self, ctx, pub):
        """Three parties' signed vectors over two ciphertexts add up exactly (BFV is exact modulo t)."""
        rng = np.random.default_rng(1)
        vs = [rng.integers(-(BFV_4096.max_abs // 3), BFV_4096.max_abs // 3, size=5000) for _ in range(3)]
        uploads = {f"p{i}": ctx.encrypt(v) for i, v in enumerate(vs)}
        assert all(len(u) == 2 for u in uploads.values())
        total, rejected = pub.sum_uploads(uploads, n_ciphertexts=2)
        assert rejected == {}
        np.testing.assert_array_equal(ctx.decrypt(total, length=5000), np.sum(vs, axis=0))

    def test_sixty_four_additions_stay_exact(self, ctx, pub):
        """64 uploads at the largest range that cannot wrap still decrypt exactly (noise margin)."""
        rng = np.random.default_rng(2)
        lim = BFV_4096.max_abs // 64
        vs = [rng.integers(-lim, lim, size=4096) for _ in range(64)]
        total = pub.add([ctx.encrypt(v) for v in vs])
        np.testing.assert_array_equal(ctx.decrypt(total, length=4096), np.sum(vs, axis=0))

    def test_out_of_range_values_refused(self, ctx):
        """Values outside [-(t-1)/2, (t-1)/2] would wrap: refused, naming the field."""
        with pytest.raises(CryptoError, match="`values` must lie in"):
            ctx.encrypt(np.asarray([BFV_4096.max_abs + 1]))
        with pytest.raises(CryptoError, match="integer array"):
            ctx.encrypt(np.asarray([0.5]))


class TestContextCustody:
    def test_public_context_has_no_secret_key(self, ctx, pub):
        """What the coordinator holds carries no secret key and cannot encrypt; its repr names no key."""
        assert not pub.has_secret_key()
        assert "secret" not in repr(pub).lower() and "secret key held" in repr(ctx)
        assert not hasattr(pub, "decrypt") and not hasattr(pub, "encrypt")
        reloaded = load_public_context(pub.data, params=BFV_4096)
        assert reloaded.digest == pub.digest

    def test_secret_context_refused_where_public_expected(self, ctx):
        """Bytes carrying the secret key are refused by load_public_context, with a clear message."""
        with pytest.raises(CryptoError, match="carries a secret key"):
            load_public_context(ctx.secret_bytes(), params=BFV_4096)

    def test_public_context_refused_where_secret_expected(self, pub):
        with pytest.raises(CryptoError, match="must carry the secret key"):
            load_secret_context(pub.data, params=BFV_4096)

    def test_other_parameters_refused(self):
        """A context under another plaintext modulus is refused."""
        other = HeParameters(name="other", poly_modulus_degree=4096, plain_modulus=1032193, coeff_mod_bit_sizes=(40, 60))
        data = new_secret_context(other).public().data
        with pytest.raises(CryptoError, match="must use the parameters"):
            load_public_context(data, params=BFV_4096)

    @pytest.mark.parametrize("data", [b"", b"not a context", bytes(200)])
    def test_garbage_context_refused(self, data):
        with pytest.raises(CryptoError):
            load_public_context(data, params=BFV_4096)


@pytest.fixture(scope="module")
def good(ctx):
    return ctx.encrypt(np.arange(10))


class TestHostileCiphertexts:
    @pytest.mark.parametrize("mutate", ["truncate", "tail", "garbage", "zeros", "huge", "other_t", "not_bytes"])
    def test_bad_upload_is_left_out_by_name(self, ctx, pub, good, mutate):
        """A malformed, truncated, oversized or foreign ciphertext rejects that upload only, naming it."""
        blob = good[0]
        if mutate == "truncate":
            bad = blob[:100]
        elif mutate == "tail":
            bad = blob[:-10]
        elif mutate == "garbage":
            bad = b"garbage!" * 50
        elif mutate == "zeros":
            bad = blob[:20] + bytes(200) + blob[220:]
        elif mutate == "huge":
            bad = blob * 10
        elif mutate == "other_t":
            other = HeParameters(name="other", poly_modulus_degree=4096, plain_modulus=1032193, coeff_mod_bit_sizes=(40, 60))
            bad = new_secret_context(other).encrypt(np.arange(10))[0]
        else:
            bad = "text"
        total, rejected = pub.sum_uploads({"good": good, "evil": [bad]}, n_ciphertexts=1)
        assert set(rejected) == {"evil"} and "`evil.ct" in rejected["evil"]
        np.testing.assert_array_equal(ctx.decrypt(total, length=10), np.arange(10))

    def test_wrong_number_of_ciphertexts(self, pub, good):
        _, rejected = pub.sum_uploads({"evil": good + good}, n_ciphertexts=1)
        assert "must be 1 ciphertexts, got 2" in rejected["evil"]

    def test_decrypt_refuses_truncated(self, ctx, good):
        with pytest.raises(CryptoError, match=r"ciphertexts\[0\]"):
            ctx.decrypt([good[0][:300]], length=10)
        with pytest.raises(CryptoError, match="must number 1"):
            ctx.decrypt(good + good, length=10)


@pytest.fixture()
def parties():
    holder = Ed25519PrivateKey.generate()
    recipient_x, recipient_pub = generate_keypair()
    return holder, recipient_x, recipient_pub


class TestKeyPackage:
    def test_round_trip_gives_the_same_key(self, ctx, parties):
        """The recipient opens the package and decrypts what the holder encrypted; fingerprints agree."""
        holder, rx, rpub = parties
        pkg = seal_key_package(ctx, run_id="run1", sender="a", recipient="b", recipient_x25519=rpub, signing_key=holder)
        got = open_key_package(pkg, run_id="run1", me="b", my_x25519=rx, sender="a", sender_public_hex=public_key_hex(holder), params=BFV_4096)
        assert got.fingerprint == ctx.fingerprint
        np.testing.assert_array_equal(got.decrypt(ctx.encrypt(np.arange(-3, 3)), length=6), np.arange(-3, 3))

    @pytest.mark.parametrize("attack", ["unsigned", "other_signer", "tampered_sealed", "tampered_fingerprint", "other_run", "other_recipient",
                                        "other_sender", "missing_field", "wrong_params"])
    def test_attacks_refused(self, ctx, parties, attack):
        """Unsigned or mis-signed packages, another run, recipient or sender, altered bytes: CryptoError, never a key."""
        holder, rx, rpub = parties
        pkg = seal_key_package(ctx, run_id="run1", sender="a", recipient="b", recipient_x25519=rpub, signing_key=holder)
        kw = {"run_id": "run1", "me": "b", "sender": "a", "sender_public_hex": public_key_hex(holder)}
        if attack == "unsigned":
            pkg["signature"] = b""
        elif attack == "other_signer":
            # A coordinator re-signs with its own key: the recipient checks its own roster copy of the holder's key.
            pkg["signature"] = Ed25519PrivateKey.generate().sign(b"x")
        elif attack == "tampered_sealed":
            pkg["sealed"] = pkg["sealed"][:-1] + bytes([pkg["sealed"][-1] ^ 1])
        elif attack == "tampered_fingerprint":
            pkg["fingerprint"] = "0" * 64
        elif attack == "other_run":
            kw["run_id"] = "run2"
        elif attack == "other_recipient":
            kw["me"] = "c"
        elif attack == "other_sender":
            kw["sender"] = "c"
        elif attack == "missing_field":
            del pkg["ephemeral"]
        else:
            pkg["params"] = "bfv-8192"
        with pytest.raises(CryptoError):
            open_key_package(pkg, my_x25519=rx, params=BFV_4096, **kw)

    def test_wrong_recipient_key_cannot_open(self, ctx, parties):
        """Correctly signed but sealed to another X25519 key: AES-GCM fails."""
        holder, _, rpub = parties
        other_x, _ = generate_keypair()
        pkg = seal_key_package(ctx, run_id="r", sender="a", recipient="b", recipient_x25519=rpub, signing_key=holder)
        with pytest.raises(CryptoError, match="AES-GCM"):
            open_key_package(pkg, run_id="r", me="b", my_x25519=other_x, sender="a", sender_public_hex=public_key_hex(holder), params=BFV_4096)


class TestSignatures:
    def test_upload_hash_binds_every_field(self, ctx):
        cts = ctx.encrypt(np.arange(5))
        h = upload_hash(run_id="r", round_=1, partner="a", ciphertexts=cts)
        assert h != upload_hash(run_id="r", round_=2, partner="a", ciphertexts=cts)
        assert h != upload_hash(run_id="r", round_=1, partner="b", ciphertexts=cts)
        assert h != upload_hash(run_id="r", round_=1, partner="a", ciphertexts=ctx.encrypt(np.arange(5)))

    def test_aggregate_signature_covers_included_list(self):
        key = Ed25519PrivateKey.generate()
        msg = aggregate_message(run_id="r", round_=1, ciphertexts=[b"c"], included=["a:1", "b:2"])
        sig = sign(key, msg)
        verify(public_key_hex(key), msg, sig, what="agg")
        with pytest.raises(CryptoError, match="does not verify"):
            verify(public_key_hex(key), aggregate_message(run_id="r", round_=1, ciphertexts=[b"c"], included=["a:1"]), sig, what="agg")
        with pytest.raises(CryptoError, match="64-byte"):
            verify(public_key_hex(key), msg, None, what="agg")
