"""Encrypted per-bin sums (SEAL BFV through TenSEAL's sealapi): exact, refusing malformed input, no secret key at the passive side."""

from __future__ import annotations

import numpy as np
import pytest

from fedcollab.core import CryptoError

pytest.importorskip("tenseal")

from fedcollab.crypto import BfvPublic, BfvSecret  # noqa: E402


def _plain_sums(outputs: np.ndarray, g: np.ndarray, h: np.ndarray, m: int) -> np.ndarray:
    out = np.zeros((m, 2), dtype=np.int64)
    for f in range(outputs.shape[1]):
        k = outputs[:, f] >= 0
        np.add.at(out[:, 0], outputs[k, f], g[k])
        np.add.at(out[:, 1], outputs[k, f], h[k])
    return out


@pytest.fixture(scope="module")
def keys() -> tuple[BfvSecret, BfvPublic]:
    sk = BfvSecret.generate(records=300)
    return sk, BfvPublic.from_bundle(sk.public_bundle())


def test_bin_sums_are_exact_with_noise_and_unassigned_rows(keys: tuple[BfvSecret, BfvPublic]) -> None:
    sk, pub = keys
    rng = np.random.default_rng(3)
    n, m = 300, 70
    g = rng.integers(-(2**20), 2**20, size=n)
    h = rng.integers(0, 2**18, size=n)
    outputs = np.stack([rng.integers(0, 30, size=n), 30 + rng.integers(0, 40, size=n)], axis=1)
    outputs[rng.random(n) < 0.2, 0] = -1  # rows in no open node / feature
    noise = rng.integers(-1000, 1000, size=(2, m))
    got = sk.decrypt_sums(pub.bin_sums(sk.encrypt_rows(g, h), outputs, m, noise=noise), m)
    assert np.array_equal(got, _plain_sums(outputs, g, h, m) + noise.T)


def test_negative_sums_and_a_fresh_ciphertext_each_time(keys: tuple[BfvSecret, BfvPublic]) -> None:
    sk, pub = keys
    g = -np.arange(1, 301)
    h = np.arange(300)
    outputs = np.zeros((300, 1), dtype=np.int64)
    a = pub.bin_sums(sk.encrypt_rows(g, h), outputs, 1)
    b = pub.bin_sums(sk.encrypt_rows(g, h), outputs, 1)
    assert a != b  # encryption and re-randomisation are randomised
    assert sk.decrypt_sums(a, 1).tolist() == [[int(g.sum()), int(h.sum())]]


def test_the_passive_side_holds_no_secret_key(keys: tuple[BfvSecret, BfvPublic]) -> None:
    _, pub = keys
    assert type(pub) is BfvPublic and not hasattr(pub, "decrypt_sums") and not hasattr(pub, "_sk")


def test_malformed_input_is_refused(keys: tuple[BfvSecret, BfvPublic]) -> None:
    sk, pub = keys
    with pytest.raises(CryptoError, match="not a valid SEAL object"):
        pub.bin_sums([b"\x00" * 100], np.zeros((10, 1), dtype=np.int64), 1)
    with pytest.raises(CryptoError, match="indices must lie"):
        pub.bin_sums(sk.encrypt_rows(np.ones(10, dtype=np.int64), np.ones(10, dtype=np.int64)), np.full((10, 1), 5), 2)
    with pytest.raises(CryptoError, match="ciphertext chunk"):
        pub.bin_sums([], np.zeros((10, 1), dtype=np.int64), 1)
    with pytest.raises(CryptoError, match="public bundle"):
        BfvPublic.from_bundle([b"x"])
    with pytest.raises(CryptoError, match="not a valid SEAL object"):
        BfvPublic.from_bundle([b"x" * 64, b"y" * 64])
    with pytest.raises(CryptoError, match="equal-length"):
        sk.encrypt_rows(np.ones(3, dtype=np.int64), np.ones(4, dtype=np.int64))
