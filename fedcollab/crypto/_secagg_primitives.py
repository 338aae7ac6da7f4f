"""The primitives secure aggregation needs, all from ``cryptography``.

* X25519 key pairs and agreement (``generate_keypair``, ``agree``);
* HKDF-SHA256 key derivation (``derive_key``);
* AES-256-GCM authenticated encryption with a random 96-bit nonce (``encrypt``, ``decrypt``);
* mask expansion: the AES-256-CTR keystream under the whole 32-byte seed (``expand_mask``).

Notes
-----
Nothing here is home-made: the cipher, the PRG and the key agreement are the ones of
``cryptography`` (OpenSSL). Keys and nonces come from the OS CSPRNG. Flower's SecAgg+ expands
masks with ``np.random.RandomState`` seeded by a 32-bit fold of the shared secret, so a server
can search 2^32 seeds; here the whole 256-bit seed keys AES, and numpy never draws a mask.

Speed of :func:`expand_mask` (one core of a shared 2-core x86-64 VM with AES-NI,
``cryptography`` 50): 1.2-1.4 G parameters/s for uint32 and 0.4-0.76 G parameters/s for uint64,
measured by ``tests/crypto/test_primitives.py::TestExpandMask::test_speed``, which prints it.
"""

from __future__ import annotations

import os

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcollab.core import CryptoError

#: Raw X25519 public and private keys are 32 bytes.
X25519_KEY_BYTES = 32
#: A mask seed keys AES-256: 32 bytes, all of them used.
SEED_BYTES = 32
#: AES-GCM nonce (96 bits, random per message) and tag lengths.
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
#: Mask dtypes: the modulus is 2^32 or 2^64.
MASK_DTYPES = (np.dtype(np.uint32), np.dtype(np.uint64))

# Each mask key is used for exactly one keystream (fresh per round and pair), so a fixed
# initial counter block is safe; it is the counter's start, not a secret.
_CTR_START = bytes(16)
_ZEROS = bytes(1 << 20)


def _require_bytes(name: str, value: object, length: int | None = None) -> bytes:
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise CryptoError(f"`{name}` must be bytes (got {type(value).__name__}).")
    value = bytes(value)
    if length is not None and len(value) != length:
        raise CryptoError(f"`{name}` must be {length} bytes, got {len(value)}.")
    return value


def generate_keypair() -> tuple[X25519PrivateKey, bytes]:
    """A fresh X25519 key pair from the OS CSPRNG: ``(private key, raw 32-byte public key)``."""
    private = X25519PrivateKey.generate()
    return private, public_bytes(private)


def public_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte public key of ``private``."""
    return private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def private_bytes(private: X25519PrivateKey) -> bytes:
    """The raw 32-byte private key (only to secret-share it or keep it in the node's own state)."""
    return private.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def load_private(raw: bytes) -> X25519PrivateKey:
    """An X25519 private key from its raw 32 bytes (``CryptoError`` on a wrong length)."""
    raw = _require_bytes("private key", raw, X25519_KEY_BYTES)
    return X25519PrivateKey.from_private_bytes(raw)


def load_public(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from its raw 32 bytes (``CryptoError`` on a wrong length)."""
    raw = _require_bytes("public key", raw, X25519_KEY_BYTES)
    return X25519PublicKey.from_public_bytes(raw)


def agree(private: X25519PrivateKey | bytes, peer_public: bytes) -> bytes:
    """The X25519 shared secret (32 bytes) of ``private`` and the peer's raw public key.

    Raises
    ------
    CryptoError
        On a wrong key length, or a low-order peer key (an all-zero shared secret, which
        ``cryptography`` refuses).
    """
    key = private if isinstance(private, X25519PrivateKey) else load_private(private)
    peer = load_public(peer_public)
    try:
        return key.exchange(peer)
    except ValueError:
        raise CryptoError("X25519 agreement failed: the peer's public key is a low-order point.") from None


def derive_key(secret: bytes, *, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with no salt; ``info`` binds the key to its context."""
    secret = _require_bytes("secret", secret)
    info = _require_bytes("info", info)
    if isinstance(length, bool) or not isinstance(length, int) or not 16 <= length <= 255 * 32:
        raise CryptoError(f"`length` must be an int in [16, 8160], got {length!r}.")
    if len(secret) < 16:
        raise CryptoError(f"`secret` must be at least 16 bytes, got {len(secret)}.")
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def encrypt(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: ``nonce (12 random bytes) ‖ ciphertext ‖ tag (16 bytes)``."""
    key = _require_bytes("key", key, 32)
    plaintext = _require_bytes("plaintext", plaintext)
    aad = _require_bytes("aad", aad)
    nonce = os.urandom(GCM_NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    """Open :func:`encrypt`'s output; ``CryptoError`` if it is too short, altered, or for other AAD."""
    key = _require_bytes("key", key, 32)
    ciphertext = _require_bytes("ciphertext", ciphertext)
    aad = _require_bytes("aad", aad)
    if len(ciphertext) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
        raise CryptoError(
            f"ciphertext must be at least {GCM_NONCE_BYTES + GCM_TAG_BYTES} bytes, got {len(ciphertext)}."
        )
    nonce, body = ciphertext[:GCM_NONCE_BYTES], ciphertext[GCM_NONCE_BYTES:]
    try:
        return AESGCM(key).decrypt(nonce, body, aad)
    except InvalidTag:
        raise CryptoError("AES-GCM authentication failed: wrong key, altered ciphertext or other context.") from None


def expand_mask(seed: bytes, n: int, *, dtype: np.dtype | type) -> np.ndarray:
    """``n`` uniform integers of ``dtype`` (uint32 or uint64): the AES-256-CTR keystream under ``seed``.

    Parameters
    ----------
    seed : bytes
        32 bytes; all of them key AES-256 (never folded to fewer bits).
    n : int
        Number of mask coordinates (parameters), ``n >= 0``.
    dtype : numpy dtype
        ``np.uint32`` (modulus 2^32) or ``np.uint64`` (modulus 2^64).

    Returns
    -------
    numpy.ndarray
        Writeable, native byte order; the keystream is read little-endian, so the mask is the
        same on every platform.

    Notes
    -----
    AES-CTR is a PRF-based stream: indistinguishable from uniform bytes for anyone without the
    key, and every byte of the key matters. A key is used for one stream only (seeds are fresh
    per round and per pair), so the initial counter block is fixed at zero.
    """
    seed = _require_bytes("seed", seed, SEED_BYTES)
    dt = np.dtype(dtype)
    if dt not in MASK_DTYPES:
        raise CryptoError(f"`dtype` must be uint32 or uint64, got {dt}.")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise CryptoError(f"`n` must be a non-negative int, got {n!r}.")
    nbytes = int(n) * dt.itemsize
    encryptor = Cipher(algorithms.AES(seed), modes.CTR(_CTR_START)).encryptor()
    # Encrypt a cached block of zeros chunk by chunk straight into the output buffer:
    # no per-call zero allocation and no copy (update_into wants 15 spare bytes).
    buf = np.empty(nbytes + 15, dtype=np.uint8)
    out_view = memoryview(buf)
    zeros = memoryview(_ZEROS)
    offset = 0
    while offset < nbytes:
        m = min(len(_ZEROS), nbytes - offset)
        encryptor.update_into(zeros[:m], out_view[offset : offset + m + 15])
        offset += m
    return buf[:nbytes].view(dt.newbyteorder("<")).astype(dt, copy=False)
