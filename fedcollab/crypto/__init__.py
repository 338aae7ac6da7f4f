"""Cryptographic primitives on real libraries (``cryptography``, TenSEAL).

Empty for now: secure aggregation and homomorphic encryption arrive with their own capabilities.
"""

__all__: list[str] = []
