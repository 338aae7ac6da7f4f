"""Cryptographic primitives on real libraries (``cryptography``; TenSEAL later).

Keys come from the OS CSPRNG; no home-made cipher, PRG or key agreement.
"""

from fedcollab.crypto._keys import generate_signing_key, load_signing_key
from fedcollab.crypto._secagg_primitives import (
    X25519_KEY_BYTES,
    agree,
    decrypt,
    derive_key,
    encrypt,
    expand_mask,
    generate_keypair,
    load_private,
    private_bytes,
    public_bytes,
)
from fedcollab.crypto._shamir import PRIME as SHAMIR_PRIME
from fedcollab.crypto._shamir import SHARE_BYTES as SHAMIR_SHARE_BYTES
from fedcollab.crypto._shamir import combine as combine_shares
from fedcollab.crypto._shamir import share_from_bytes, share_to_bytes
from fedcollab.crypto._shamir import split as split_secret
from fedcollab.crypto._tls import TrialCertificates, certificate_sans, generate_node_auth_key, load_node_auth_public_key, make_trial_certificates

__all__ = [
    "SHAMIR_PRIME",
    "SHAMIR_SHARE_BYTES",
    "X25519_KEY_BYTES",
    "TrialCertificates",
    "agree",
    "certificate_sans",
    "combine_shares",
    "decrypt",
    "derive_key",
    "encrypt",
    "expand_mask",
    "generate_keypair",
    "generate_node_auth_key",
    "generate_signing_key",
    "load_node_auth_public_key",
    "load_private",
    "load_signing_key",
    "make_trial_certificates",
    "private_bytes",
    "public_bytes",
    "share_from_bytes",
    "share_to_bytes",
    "split_secret",
]
