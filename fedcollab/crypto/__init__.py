"""Cryptographic primitives on real libraries (``cryptography``, TenSEAL).

Keys come from the OS CSPRNG; no home-made cipher, PRG or key agreement.
"""

from fedcollab.crypto._bfv_histogram import BfvPublic, BfvSecret
from fedcollab.crypto._ckks_scoring import (
    SCORING_PARAMS,
    PublicScoringContext,
    ScoringParams,
    SecretScoringContext,
    check_scoring_params,
)
from fedcollab.crypto._ckks_vertical import DEFAULT_FLOOD_STD as LR_FLOOD_STD
from fedcollab.crypto._ckks_vertical import MAX_ABS_VALUE as LR_MAX_ABS_VALUE
from fedcollab.crypto._ckks_vertical import LrPublicContext, LrSecretContext
from fedcollab.crypto._ckks_vertical import n_chunks as lr_n_chunks
from fedcollab.crypto._ckks_vertical import slots as lr_slots
from fedcollab.crypto._he import (
    BFV_4096,
    PARAMETER_SETS as HE_PARAMETER_SETS,
    HeParameters,
    PublicContext,
    SecretContext,
    aggregate_message,
    context_fingerprint,
    key_advert_message,
    load_public_context,
    load_secret_context,
    new_secret_context,
    open_key_package,
    public_context_message,
    seal_key_package,
    sign,
    upload_hash,
    verify,
)
from fedcollab.crypto._keys import generate_signing_key, load_signing_key
from fedcollab.crypto._seal import SealAdvert, SealedChannel, SealKey
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
    "BFV_4096",
    "BfvPublic",
    "BfvSecret",
    "HE_PARAMETER_SETS",
    "HeParameters",
    "LR_FLOOD_STD",
    "LR_MAX_ABS_VALUE",
    "LrPublicContext",
    "LrSecretContext",
    "PublicContext",
    "PublicScoringContext",
    "SCORING_PARAMS",
    "SHAMIR_PRIME",
    "SHAMIR_SHARE_BYTES",
    "ScoringParams",
    "SealAdvert",
    "SealKey",
    "SealedChannel",
    "SecretContext",
    "SecretScoringContext",
    "TrialCertificates",
    "X25519_KEY_BYTES",
    "aggregate_message",
    "agree",
    "certificate_sans",
    "check_scoring_params",
    "combine_shares",
    "context_fingerprint",
    "decrypt",
    "derive_key",
    "encrypt",
    "expand_mask",
    "generate_keypair",
    "generate_node_auth_key",
    "generate_signing_key",
    "key_advert_message",
    "load_node_auth_public_key",
    "load_private",
    "load_public_context",
    "load_secret_context",
    "load_signing_key",
    "lr_n_chunks",
    "lr_slots",
    "make_trial_certificates",
    "new_secret_context",
    "open_key_package",
    "private_bytes",
    "public_bytes",
    "public_context_message",
    "seal_key_package",
    "share_from_bytes",
    "share_to_bytes",
    "sign",
    "split_secret",
    "upload_hash",
    "verify",
]
