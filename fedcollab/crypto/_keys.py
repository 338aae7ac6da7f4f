"""Ed25519 signing keys on disk (PKCS#8 PEM, file mode 0600, optional passphrase)."""

from __future__ import annotations

from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import CryptoError, write_private


def generate_signing_key(path: str | Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Create a fresh Ed25519 key (from the OS CSPRNG) and write it with mode 0600; never overwrites."""
    p = Path(path)
    key = Ed25519PrivateKey.generate()
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    try:
        write_private(p, pem, mode="new")
    except FileExistsError:
        raise CryptoError(f"{p} exists; refusing to overwrite a signing key") from None
    return key


def load_signing_key(path: str | Path, *, passphrase: bytes | None = None) -> Ed25519PrivateKey:
    """Load an Ed25519 key written by :func:`generate_signing_key`."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise CryptoError(f"cannot read signing key {p}: {exc.strerror}") from None
    if p.stat().st_mode & 0o077:
        raise CryptoError(f"signing key {p} is readable by others (chmod 600 it)")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except (ValueError, TypeError):
        raise CryptoError(f"cannot load signing key {p}: wrong passphrase or not a PEM key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise CryptoError(f"{p} is not an Ed25519 key")
    return key
