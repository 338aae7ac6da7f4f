"""Homomorphic encryption (TenSEAL BFV) for server-blind aggregation: contexts, ciphertexts, key packages.

Two context types, never confused (STYLE C9):

* :class:`SecretContext` holds the BFV secret key. It lives at a partner; it leaves only sealed
  inside a key package for another partner (:func:`seal_key_package`).
* :class:`PublicContext` holds the parameters and nothing else: enough to load and add
  ciphertexts, not to decrypt and not to encrypt (the context is symmetric, there is no public
  key). It is what the coordinator holds; :func:`load_public_context` refuses bytes that carry a
  secret key.

Parameters (:data:`BFV_4096`): BFV, N = 4096, coefficient modulus [40, 60] bits (100 bits in
all, under the 109 bits the HE security standard allows for 128-bit security at N = 4096; SEAL
itself refuses anything above), plaintext modulus t = 16,760,833 (a 24-bit prime, t = 1 mod 2N,
so batching gives N = 4096 slots). Additions only: no relinearisation or Galois keys are made.
One ciphertext carries 4096 integers modulo t and serialises (SEAL's zstd) to about 49 kB: 3.0x
the bytes of the same values as float32.

Key packages: ephemeral X25519 -> HKDF-SHA256 -> AES-256-GCM to the recipient's X25519 key,
AAD = run id || recipient || context fingerprint, signed with the generating partner's Ed25519
roster key. Recipients verify against their own roster copy (never a key the coordinator relays).

Every TenSEAL failure is translated to :class:`~fedcollab.core.CryptoError` here (STYLE C5).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedcollab.core import CryptoError
from fedcollab.crypto._secagg_primitives import agree, decrypt, derive_key, encrypt, generate_keypair


@dataclass(frozen=True)
class HeParameters:
    """An HE parameter set (all public).

    Attributes
    ----------
    name : str
        Identifier carried in messages and the ledger.
    poly_modulus_degree : int
        N; also the number of batching slots of one BFV ciphertext.
    plain_modulus : int
        t, a prime with t = 1 (mod 2N); plaintext slots hold integers modulo t.
    coeff_mod_bit_sizes : tuple of int
        Bit sizes of the coefficient-modulus primes (the last is SEAL's special prime).
    """

    name: str
    poly_modulus_degree: int
    plain_modulus: int
    coeff_mod_bit_sizes: tuple[int, ...]

    @property
    def slots(self) -> int:
        """Integers per ciphertext."""
        return self.poly_modulus_degree

    @property
    def max_abs(self) -> int:
        """Largest |value| a slot (or a sum) carries unambiguously: (t - 1) / 2."""
        return (self.plain_modulus - 1) // 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for the ledger)."""
        return {"name": self.name, "scheme": "bfv", "poly_modulus_degree": self.poly_modulus_degree,
                "plain_modulus": self.plain_modulus, "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes),
                "security_bits": 128, "encryption": "symmetric"}


#: Total coefficient-modulus bits allowed for 128-bit security (HE standard, ternary secret).
MAX_COEFF_BITS_128 = {2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
#: The default parameter set (see the module docstring and docs/he.md).
BFV_4096 = HeParameters(name="bfv-4096-t24", poly_modulus_degree=4096, plain_modulus=16760833, coeff_mod_bit_sizes=(40, 60))
PARAMETER_SETS = {BFV_4096.name: BFV_4096}
#: A serialised ciphertext larger than this many times its expected size is refused unread.
_MAX_CT_FACTOR = 2
_FP_TAG = b"fedcollab/he/context-fingerprint/v1"
_KP_TAG = b"fedcollab/he/key-package/v1"


def _ts() -> Any:
    try:
        import tenseal as ts
    except ImportError as exc:  # pragma: no cover - tenseal is a node/coordinator dependency
        raise CryptoError("HE needs TenSEAL: pip install 'fedcollab[node,coordinator]'") from exc
    return ts


def check_parameters(params: HeParameters) -> None:
    """Refuse a parameter set below 128-bit security or unusable for batching."""
    n, t = params.poly_modulus_degree, params.plain_modulus
    if n not in MAX_COEFF_BITS_128:
        raise CryptoError(f"`poly_modulus_degree` must be one of {sorted(MAX_COEFF_BITS_128)}, got {n}.")
    total = sum(params.coeff_mod_bit_sizes)
    if total > MAX_COEFF_BITS_128[n]:
        raise CryptoError(f"`coeff_mod_bit_sizes` must total at most {MAX_COEFF_BITS_128[n]} bits at N = {n} (128-bit security), got {total}.")
    if t < 3 or t % (2 * n) != 1:
        raise CryptoError(f"`plain_modulus` must be a prime = 1 mod {2 * n} (batching), got {t}.")


def _ctx_params_match(ctx: Any, params: HeParameters) -> bool:
    ts = _ts()
    try:
        sc = ctx.seal_context()
        key_data, first = sc.key_context_data(), sc.first_context_data()
        return (
            key_data.parms().scheme() == ts.SCHEME_TYPE.BFV.value
            and key_data.parms().poly_modulus_degree() == params.poly_modulus_degree
            and key_data.plain_upper_half_threshold() == (params.plain_modulus + 1) // 2
            and key_data.total_coeff_modulus_bit_count() == sum(params.coeff_mod_bit_sizes)
            and first.total_coeff_modulus_bit_count() == sum(params.coeff_mod_bit_sizes[:-1])
        )
    except (AttributeError, RuntimeError, ValueError, TypeError):
        return False


def _serialize(ctx: Any, *, secret: bool) -> bytes:
    return bytes(ctx.serialize(save_public_key=False, save_secret_key=secret, save_galois_keys=False, save_relin_keys=False))


class PublicContext:
    """Parameters only: load and add ciphertexts; no secret key, no public key (see :func:`load_public_context`)."""

    __slots__ = ("_ctx", "params", "data")

    def __init__(self, ctx: Any, params: HeParameters, data: bytes) -> None:
        if ctx.has_secret_key() or ctx.is_private():
            raise CryptoError("a public HE context must not carry a secret key")
        self._ctx = ctx
        self.params = params
        self.data = data

    def __repr__(self) -> str:
        return f"PublicContext({self.params.name})"

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of the public serialisation."""
        return hashlib.sha256(self.data).hexdigest()

    def has_secret_key(self) -> bool:
        """Always False (checked at construction); here so tests and callers can assert it."""
        return bool(self._ctx.has_secret_key())

    # --- ciphertexts ----------------------------------------------------------------------
    def load(self, blob: bytes, *, field: str = "ciphertext") -> Any:
        """A BFV ciphertext (one TenSEAL vector of at most N slots) from bytes, checked."""
        ts = _ts()
        if not isinstance(blob, (bytes, bytearray)):
            raise CryptoError(f"`{field}` must be bytes (got {type(blob).__name__}).")
        limit = _MAX_CT_FACTOR * expected_ciphertext_bytes(self.params)
        if not 0 < len(blob) <= limit:
            raise CryptoError(f"`{field}` must be 1 to {limit} bytes, got {len(blob)}.")
        try:
            vec = ts.bfv_vector_from(self._ctx, bytes(blob))
        except (ValueError, RuntimeError, TypeError) as exc:
            raise CryptoError(f"`{field}` is not a BFV ciphertext under these parameters ({type(exc).__name__}).") from None
        if vec.size() != self.params.slots:
            raise CryptoError(f"`{field}` must fill {self.params.slots} slots, got {vec.size()}.")
        return vec

    def sum_uploads(self, uploads: dict[str, Sequence[bytes]], *, n_ciphertexts: int) -> tuple[list[bytes], dict[str, str]]:
        """Add the uploads that load (``n_ciphertexts`` valid ciphertexts each): ``(sum, {party: why rejected})``.

        An upload with a malformed, truncated or foreign ciphertext is left out whole and named;
        the others are still added.
        """
        acc: list[Any] | None = None
        rejected: dict[str, str] = {}
        for party in sorted(uploads):
            blobs = uploads[party]
            try:
                if not isinstance(blobs, (list, tuple)) or len(blobs) != n_ciphertexts:
                    raise CryptoError(f"`{party}.ct` must be {n_ciphertexts} ciphertexts, got {len(blobs) if isinstance(blobs, (list, tuple)) else type(blobs).__name__}.")
                loaded = [self.load(b, field=f"{party}.ct[{j}]") for j, b in enumerate(blobs)]
            except CryptoError as exc:
                rejected[party] = str(exc)
                continue
            if acc is None:
                acc = loaded
            else:
                for a, b in zip(acc, loaded, strict=True):
                    a.add_(b)
        return ([bytes(a.serialize()) for a in acc] if acc is not None else []), rejected

    def add(self, uploads: Sequence[Sequence[bytes]]) -> list[bytes]:
        """The slot-wise sum (mod t) of several uploads, each a list of the same number of ciphertexts."""
        if not uploads:
            raise CryptoError("`uploads` must hold at least one upload, got none.")
        n_ct = len(uploads[0])
        for i, up in enumerate(uploads):
            if len(up) != n_ct or n_ct == 0:
                raise CryptoError(f"`uploads[{i}]` must hold {n_ct} ciphertexts, got {len(up)}.")
        out = []
        for j in range(n_ct):
            acc = self.load(uploads[0][j], field=f"uploads[0][{j}]")
            for i in range(1, len(uploads)):
                acc.add_(self.load(uploads[i][j], field=f"uploads[{i}][{j}]"))
            out.append(bytes(acc.serialize()))
        return out


class SecretContext:
    """The BFV secret key and parameters: encrypt and decrypt. Stays at partners (see module docstring)."""

    __slots__ = ("_ctx", "params", "_secret_data", "_public_data")

    def __init__(self, ctx: Any, params: HeParameters, secret_data: bytes) -> None:
        self._ctx = ctx
        self.params = params
        self._secret_data = secret_data
        # Serialised once, before any use: TenSEAL's serialisation changes after an encryption.
        self._public_data = _serialize(ctx, secret=False)

    def __repr__(self) -> str:  # never the key
        return f"SecretContext({self.params.name}, secret key held)"

    def public(self) -> PublicContext:
        """The parameters without any key: what may leave the partner."""
        return load_public_context(self._public_data, params=self.params)

    def secret_bytes(self) -> bytes:
        """The serialisation *with* the secret key (only to seal a key package or keep at the node, mode 0600)."""
        return self._secret_data

    @property
    def fingerprint(self) -> str:
        """See :func:`context_fingerprint`."""
        return context_fingerprint(self._public_data, self._secret_data)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """Integers in [-(t-1)/2, (t-1)/2], packed N to a ciphertext (the last one zero-padded)."""
        ts = _ts()
        v = np.asarray(values)
        if v.ndim != 1 or v.size == 0 or not np.issubdtype(v.dtype, np.integer):
            raise CryptoError(f"`values` must be a non-empty 1-D integer array, got dtype {v.dtype} and shape {v.shape}.")
        lim = self.params.max_abs
        if int(np.abs(v.astype(np.int64)).max()) > lim:
            raise CryptoError(f"`values` must lie in [-{lim}, {lim}] (plaintext modulus), got max |value| {int(np.abs(v).max())}.")
        n = self.params.slots
        n_ct = -(-v.size // n)
        padded = np.zeros(n_ct * n, dtype=np.int64)
        padded[: v.size] = v
        return [bytes(ts.bfv_vector(self._ctx, padded[i * n:(i + 1) * n].tolist()).serialize()) for i in range(n_ct)]

    def decrypt(self, blobs: Sequence[bytes], *, length: int) -> np.ndarray:
        """The first ``length`` signed integers (centred modulo t) of the ciphertexts ``blobs``."""
        n = self.params.slots
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise CryptoError(f"`length` must be an int >= 1, got {length!r}.")
        if len(blobs) != -(-length // n):
            raise CryptoError(f"`ciphertexts` must number {-(-length // n)} for {length} values, got {len(blobs)}.")
        ts = _ts()
        out = np.empty(len(blobs) * n, dtype=np.int64)
        for i, blob in enumerate(blobs):
            if not isinstance(blob, (bytes, bytearray)) or not 0 < len(blob) <= _MAX_CT_FACTOR * expected_ciphertext_bytes(self.params):
                raise CryptoError(f"`ciphertexts[{i}]` must be bytes of a plausible ciphertext size.")
            try:
                vec = ts.bfv_vector_from(self._ctx, bytes(blob))
                if vec.size() != n:
                    raise CryptoError(f"`ciphertexts[{i}]` must fill {n} slots, got {vec.size()}.")
                out[i * n:(i + 1) * n] = vec.decrypt()
            except (ValueError, RuntimeError, TypeError) as exc:
                raise CryptoError(f"`ciphertexts[{i}]` is not a BFV ciphertext under this key ({type(exc).__name__}).") from None
        t = self.params.plain_modulus
        out = np.mod(out, t)
        out[out > t // 2] -= t
        return out[:length]


def expected_ciphertext_bytes(params: HeParameters) -> int:
    """An upper estimate of one serialised ciphertext: two polynomials at the data level, 8 bytes a coefficient."""
    return 2 * params.poly_modulus_degree * 8 * max(1, len(params.coeff_mod_bit_sizes) - 1) + 1024


def new_secret_context(params: HeParameters = BFV_4096) -> SecretContext:
    """A fresh BFV secret key (SEAL draws it from the OS CSPRNG) under ``params``; symmetric encryption, no public key."""
    ts = _ts()
    check_parameters(params)
    try:
        ctx = ts.context(ts.SCHEME_TYPE.BFV, poly_modulus_degree=params.poly_modulus_degree, plain_modulus=params.plain_modulus,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC, n_threads=1)
    except (ValueError, RuntimeError) as exc:
        raise CryptoError(f"TenSEAL refused the parameters {params.name} ({type(exc).__name__}).") from None
    return SecretContext(ctx, params, _serialize(ctx, secret=True))


def _load_context(data: object, *, field: str) -> Any:
    ts = _ts()
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise CryptoError(f"`{field}` must be non-empty bytes (got {type(data).__name__}).")
    if len(data) > (1 << 20):
        raise CryptoError(f"`{field}` must be at most {1 << 20} bytes, got {len(data)}.")
    try:
        return ts.context_from(bytes(data), n_threads=1)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise CryptoError(f"`{field}` is not a TenSEAL context ({type(exc).__name__}).") from None


def _has(ctx: Any, what: str) -> bool:
    try:
        return bool(getattr(ctx, what)())
    except ValueError:  # TenSEAL: "not supported for symmetric encryption", i.e. there is none
        return False


def load_public_context(data: bytes, *, params: HeParameters) -> PublicContext:
    """The coordinator's context: refuses one carrying a secret key or other parameters.

    Raises
    ------
    CryptoError
        ``"...carries a secret key..."`` when ``data`` holds one: whoever hands the coordinator a
        secret key must not be able to make it hold one; other parameters, or unparsable bytes.
    """
    ctx = _load_context(data, field="public context")
    if ctx.has_secret_key() or ctx.is_private():
        raise CryptoError("`public context` carries a secret key; a context without one was expected (refusing to hold it).")
    if _has(ctx, "has_public_key") or _has(ctx, "has_relin_keys") or _has(ctx, "has_galois_keys"):
        raise CryptoError("`public context` must carry no keys at all (symmetric, additions only), got key material.")
    if not _ctx_params_match(ctx.data, params):
        raise CryptoError(f"`public context` must use the parameters {params.name}, got others.")
    return PublicContext(ctx, params, bytes(data))


def load_secret_context(data: bytes, *, params: HeParameters) -> SecretContext:
    """A partner's context with its secret key (from its own folder or an opened key package)."""
    ctx = _load_context(data, field="secret context")
    if not ctx.has_secret_key():
        raise CryptoError("`secret context` must carry the secret key, got a context without one.")
    if not _ctx_params_match(ctx.data, params):
        raise CryptoError(f"`secret context` must use the parameters {params.name}, got others.")
    return SecretContext(ctx, params, bytes(data))


def context_fingerprint(public_data: bytes, secret_data: bytes) -> str:
    """SHA-256 over the public serialisation's hash and a hash of the secret serialisation (hex).

    Notes
    -----
    The public part alone does not identify the key (a symmetric context has no public key), so
    the fingerprint also commits to the secret serialisation, through SHA-256 (preimage
    resistant: the key, 4096 ternary coefficients, cannot be recovered from it). Key holders can
    recompute it; the coordinator checks the public half (:func:`public_digest`).
    """
    key_id = hashlib.sha256(b"fedcollab/he/key-id/v1\x00" + secret_data).digest()
    return hashlib.sha256(_FP_TAG + b"\x00" + hashlib.sha256(public_data).digest() + key_id).hexdigest()


def public_digest(public_data: bytes) -> str:
    """SHA-256 (hex) of a public context's serialisation."""
    return hashlib.sha256(public_data).hexdigest()


# --- signatures ------------------------------------------------------------------------------

def _frame(*parts: bytes | str | int) -> bytes:
    """Length-prefixed concatenation (no ambiguity between fields)."""
    out = bytearray()
    for p in parts:
        b = p.encode() if isinstance(p, str) else (struct.pack(">q", p) if isinstance(p, int) else bytes(p))
        out += struct.pack(">I", len(b)) + b
    return bytes(out)


def sign(key: Ed25519PrivateKey, message: bytes) -> bytes:
    """Ed25519 signature (64 bytes)."""
    return key.sign(message)


def verify(public_hex: str, message: bytes, signature: object, *, what: str) -> None:
    """Check an Ed25519 signature against a roster key (hex); ``CryptoError`` naming ``what`` otherwise."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 64:
        raise CryptoError(f"`{what}` must carry a 64-byte Ed25519 signature, got {type(signature).__name__}.")
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        pub.verify(bytes(signature), message)
    except (InvalidSignature, ValueError):
        raise CryptoError(f"`{what}`: the signature does not verify against the roster key.") from None


def upload_hash(*, run_id: str, round_: int, partner: str, ciphertexts: Sequence[bytes]) -> str:
    """SHA-256 (hex) naming one upload: run, round, partner and every ciphertext."""
    h = hashlib.sha256(_frame(b"fedcollab/he/upload/v1", run_id, round_, partner, len(ciphertexts)))
    for c in ciphertexts:
        h.update(_frame(hashlib.sha256(c).digest()))
    return h.hexdigest()


def aggregate_message(*, run_id: str, round_: int, ciphertexts: Sequence[bytes], included: Sequence[str]) -> bytes:
    """What the coordinator signs: the aggregate's ciphertexts together with the included upload hashes."""
    h = hashlib.sha256()
    for c in ciphertexts:
        h.update(_frame(hashlib.sha256(c).digest()))
    return _frame(b"fedcollab/he/aggregate/v1", run_id, round_, h.digest(), json.dumps(sorted(included)))


def public_context_message(*, run_id: str, public_data: bytes, fingerprint: str) -> bytes:
    """What the key holder signs about the context it hands the coordinator."""
    return _frame(b"fedcollab/he/public-context/v1", run_id, public_data, fingerprint)


# --- key packages ----------------------------------------------------------------------------

def key_advert_message(*, run_id: str, partner: str, x25519_public: bytes) -> bytes:
    """What a recipient signs to advertise the X25519 key its package is sealed to."""
    return _frame(b"fedcollab/he/key-advert/v1", run_id, partner, x25519_public)


def _package_aad(*, run_id: str, recipient: str, fingerprint: str) -> bytes:
    return _frame(_KP_TAG, run_id, recipient, fingerprint)


def _package_message(*, run_id: str, sender: str, recipient: str, fingerprint: str, ephemeral: bytes, sealed: bytes) -> bytes:
    return _frame(_KP_TAG, run_id, sender, recipient, fingerprint, ephemeral, hashlib.sha256(sealed).digest())


def seal_key_package(ctx: SecretContext, *, run_id: str, sender: str, recipient: str, recipient_x25519: bytes,
                     signing_key: Ed25519PrivateKey) -> dict[str, Any]:
    """The secret context sealed to ``recipient``: ephemeral X25519 -> HKDF-SHA256 -> AES-256-GCM, signed by ``sender``.

    Returns a wire dict (ConfigRecord-ready: str and bytes values).
    """
    fp = ctx.fingerprint
    eph, eph_pub = generate_keypair()
    key = derive_key(agree(eph, recipient_x25519), info=_frame(_KP_TAG, run_id, recipient, eph_pub, recipient_x25519))
    sealed = encrypt(key, ctx.secret_bytes(), _package_aad(run_id=run_id, recipient=recipient, fingerprint=fp))
    msg = _package_message(run_id=run_id, sender=sender, recipient=recipient, fingerprint=fp, ephemeral=eph_pub, sealed=sealed)
    return {"sender": sender, "recipient": recipient, "fingerprint": fp, "params": ctx.params.name, "ephemeral": eph_pub,
            "sealed": sealed, "signature": sign(signing_key, msg)}


def open_key_package(package: dict[str, Any], *, run_id: str, me: str, my_x25519: Any, sender: str, sender_public_hex: str,
                     params: HeParameters) -> SecretContext:
    """Verify ``sender``'s signature (roster key), decrypt, and check the fingerprint; the secret context.

    Raises
    ------
    CryptoError
        Unsigned or mis-signed package, another run or recipient, altered ciphertext, or a
        context whose fingerprint or parameters differ from what was signed.
    """
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    try:
        fields = {k: package[k] for k in ("sender", "recipient", "fingerprint", "params", "ephemeral", "sealed", "signature")}
    except (KeyError, TypeError):
        raise CryptoError("`key package` must hold sender, recipient, fingerprint, params, ephemeral, sealed and signature.") from None
    if fields["sender"] != sender or fields["recipient"] != me:
        raise CryptoError(f"`key package` must be from {sender!r} to {me!r}, got from {fields['sender']!r} to {fields['recipient']!r}.")
    if fields["params"] != params.name:
        raise CryptoError(f"`key package` must use the parameters {params.name}, got {fields['params']!r}.")
    for k in ("ephemeral", "sealed", "signature"):
        if not isinstance(fields[k], (bytes, bytearray)):
            raise CryptoError(f"`key package.{k}` must be bytes (got {type(fields[k]).__name__}).")
    fp = str(fields["fingerprint"])
    msg = _package_message(run_id=run_id, sender=sender, recipient=me, fingerprint=fp, ephemeral=bytes(fields["ephemeral"]),
                           sealed=bytes(fields["sealed"]))
    verify(sender_public_hex, msg, fields["signature"], what="key package")
    priv = my_x25519 if isinstance(my_x25519, X25519PrivateKey) else X25519PrivateKey.from_private_bytes(bytes(my_x25519))
    mine = priv.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = derive_key(agree(priv, bytes(fields["ephemeral"])), info=_frame(_KP_TAG, run_id, me, bytes(fields["ephemeral"]), mine))
    secret = decrypt(key, bytes(fields["sealed"]), _package_aad(run_id=run_id, recipient=me, fingerprint=fp))
    ctx = load_secret_context(secret, params=params)
    if ctx.fingerprint != fp:
        raise CryptoError("`key package`: the context's fingerprint differs from the signed one.")
    return ctx
