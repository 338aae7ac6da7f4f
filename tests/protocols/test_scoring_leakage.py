"""Issue 13, attack 7: a querier packing complex slots must not read ``w . Im(x)`` from the imaginary parts."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.crypto._ckks_scoring import PublicScoringContext, SecretScoringContext, real_parts_mod_q


@pytest.fixture(scope="module")
def ctxs():
    sec = SecretScoringContext.generate()
    return sec, PublicScoringContext.from_bytes(sec.public_bytes())


def _complex_columns(sec, pub, cols: np.ndarray):
    """What a querier with raw SEAL sends: fresh symmetric encryptions of complex slot values (one ciphertext per feature)."""
    import tenseal.sealapi as sa

    data = pub._ctx.seal_context().data
    enc = sa.CKKSEncoder(data)
    encryptor = sa.Encryptor(data, sec._ctx.secret_key().data)
    out = []
    for col in cols.T:
        pt = sa.Plaintext()
        v = np.zeros(pub.params.slots, dtype=complex)
        v[: len(col)] = col
        enc.encode(v.tolist(), data.first_parms_id(), 2.0**pub.params.scale_bits, pt)
        ct = sa.Ciphertext(data)
        encryptor.encrypt_symmetric(pt, ct)
        out.append(ct)
    return out


def _decode(sec, pub, blob):
    import tenseal.sealapi as sa

    from fedcollab.crypto._ckks_scoring import _load_seal

    data = sec._ctx.seal_context().data
    ct = _load_seal(data, blob, field="r")
    pt = sa.Plaintext()
    sa.Decryptor(data, sec._ctx.secret_key().data).decrypt(ct, pt)
    q = data.get_context_data(ct.parms_id()).parms().coeff_modulus()[0].value()
    return np.asarray(sa.CKKSEncoder(data).decode_complex(pt)), q / ct.scale


def test_imaginary_parts_no_longer_reveal_the_weights(ctxs):
    """d = 4 features, 3 rows with imaginary parts e_j * 100: before the fix Im(score_j) = 100 w_j; now it is uniform mod q."""
    sec, pub = ctxs
    rng = np.random.default_rng(11)
    w, b, d = np.array([0.7, -1.3, 2.1, 0.4]), 0.5, 4
    re = rng.normal(size=(d, d))
    x = re + 1j * 100.0 * np.eye(d)
    blob = pub.score_linear(_complex_columns(sec, pub, x), weights=w, bias=b, rows=d, flood_std=2.0**-10, generator=np.random.default_rng(3))
    slots, big_q = _decode(sec, pub, blob)
    # The real parts are the scores (read mod q), within the real flooding.
    np.testing.assert_allclose(real_parts_mod_q(slots, modulus_over_scale=big_q)[:d], re @ w + b, atol=8 * 2.0**-10)
    # The imaginary parts: the attacker's estimate of w is off by far more than the real part's flooding.
    w_hat = slots[:d].imag / 100.0
    assert np.abs(w_hat - w).min() > 0.05, (w_hat, w)
    # ... and across the slots they spread over the whole range mod q (std of a uniform on [-Q/2, Q/2] is Q / sqrt(12)).
    im = slots.imag
    assert np.std(im) > 0.1 * big_q * np.sqrt(pub.params.slots) / np.sqrt(12) / 100


def test_recovering_w_from_many_imaginary_rows_fails(ctxs):
    """Least squares on 64 rows of crafted imaginary parts gives no estimate of w (error >> the real part's 1e-3)."""
    sec, pub = ctxs
    rng = np.random.default_rng(5)
    w, d, n = np.array([0.3, -0.8, 1.5]), 3, 64
    im = rng.normal(size=(n, d)) * 50.0
    blob = pub.score_linear(_complex_columns(sec, pub, 1j * im), weights=w, bias=0.0, rows=n, flood_std=2.0**-10,
                            generator=np.random.default_rng(9))
    slots, _ = _decode(sec, pub, blob)
    w_hat, *_ = np.linalg.lstsq(im, slots[:n].imag, rcond=None)
    assert np.abs(w_hat - w).max() > 0.1, (w_hat, w)
