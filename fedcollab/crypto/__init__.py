"""Cryptographic primitives on real libraries (``cryptography``; TenSEAL later).

Keys come from the OS CSPRNG; no home-made cipher, PRG or key agreement.
"""

from fedcollab.crypto._keys import generate_signing_key, load_signing_key

__all__ = ["generate_signing_key", "load_signing_key"]
