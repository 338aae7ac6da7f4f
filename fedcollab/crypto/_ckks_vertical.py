"""CKKS (TenSEAL) primitives for vertical logistic regression: two parties, two keys, masked gradients.

Each party owns one CKKS key (:class:`LrSecretContext`, never leaves it) and hands the other party
its context *without any key* (:class:`LrPublicContext`: load ciphertexts, add and multiply by
plaintexts, nothing else; it refuses bytes carrying a secret key). Values are packed one record a
slot, ``slots`` records a ciphertext (the last one zero-padded).

The one circuit evaluated under the other party's key (:meth:`LrPublicContext.masked_products`):
for an encrypted residual part ``Enc(b)`` (one ciphertext per chunk of records), a plaintext
offset ``a`` and plaintext features ``X`` (n, d), per feature ``j``

    ct_j = sum_chunks (Enc(b_c) + a_c) * X_c[:, j] + r_j + e_j

one plaintext product (one rescale), then a fresh mask ``r_j`` in every slot (uniform on
[-MASK_BOUND, MASK_BOUND], from the OS CSPRNG) and flooding noise ``e_j`` (Gaussian, std
``flood_std`` per slot, from the generator passed in). The key owner decrypts, sums the first
``min(n, slots)`` slots and gets ``(X^T (a + b))_j + sum r_j + sum e_j``; the evaluator, who knows
``sum r_j``, removes the mask. No rotation, hence no Galois keys; no ciphertext product, hence no
relinearisation keys: the public context is a few hundred bytes.

Notes
-----
Parameters: N = 8192 (4096 slots), coefficient modulus [60, 40, 60] bits (160 <= 218 bits allowed
for 128-bit security at N = 8192, HE standard), scale 2^40, symmetric encryption (only the key
owner encrypts). After the single rescale a slot holds |value| < 2^19 exactly; masks are below
2^16, and the protocol keeps |a + b| * |x| far below (it refuses partial logits over 2^10).

Masking is statistical, not perfect: CKKS slots are reals, so ``v + r`` with ``r`` uniform on
[-B, B] is at statistical distance at most ``|v| / (2B)`` from ``r`` alone (B = 2^16: about 2e-5
per slot for |v| <= 1.5). Flooding: the decryption error of ``ct_j`` depends on the evaluator's
plaintexts (CKKS is not circuit-private, Li & Micciancio 2021); the flooding noise (default 2^-10)
is about 2^14 times the computation error (measured ~5e-8 per slot, mostly the encoding of the masks)
and hides it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedcollab.core import CryptoError, MissingExtra
from fedcollab.crypto._ckks_scoring import _chain_bits

POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 40, 60)
SCALE_BITS = 40
#: Masks are uniform on [-MASK_BOUND, MASK_BOUND] in every slot.
MASK_BOUND = 2.0**16
#: Default flooding noise (std per slot) on every masked product.
DEFAULT_FLOOD_STD = 2.0**-10
#: Largest |value| a party may encrypt or add as an offset, and largest |feature|.
MAX_ABS_VALUE = 2.0**10
#: Stand-in for an all-zero plaintext column chunk (SEAL refuses a product that would be transparent).
_ZERO_STAND_IN = 2.0**-30
_MAX_CT_BYTES = 2 * 2 * POLY_MODULUS_DEGREE * 3 * 8 + 4096


def _ts() -> Any:
    try:
        import tenseal
    except ImportError as exc:  # pragma: no cover - tenseal is a node dependency
        raise MissingExtra("vertical logistic regression needs TenSEAL: pip install 'fedcollab[node]'") from exc
    return tenseal


def slots() -> int:
    """Records per ciphertext."""
    return POLY_MODULUS_DEGREE // 2


def n_chunks(n: int) -> int:
    """Ciphertexts for ``n`` records."""
    return -(-int(n) // slots())


def uniform_masks(shape: tuple[int, ...], bound: float = MASK_BOUND) -> np.ndarray:
    """Masks uniform on [-bound, bound] from the OS CSPRNG (53 random bits each)."""
    k = int(np.prod(shape))
    raw = np.frombuffer(os.urandom(8 * k), dtype=np.uint64) >> np.uint64(11)
    u = raw.astype(np.float64) / float(1 << 53)
    return ((2.0 * u - 1.0) * bound).reshape(shape)


def _finite(v: np.ndarray, what: str, limit: float = MAX_ABS_VALUE) -> np.ndarray:
    arr = np.asarray(v, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise CryptoError(f"`{what}` must be finite.")
    if arr.size and np.abs(arr).max() > limit:
        raise CryptoError(f"`{what}` must satisfy |value| <= {limit:g}, got {np.abs(arr).max():g}.")
    return arr


def _serialize_public(ctx: Any, *, public_key: bool = False) -> bytes:
    return bytes(ctx.serialize(save_public_key=public_key, save_secret_key=False, save_galois_keys=False, save_relin_keys=False))


def _has_public_key(ctx: Any) -> bool:
    try:
        return bool(ctx.has_public_key())
    except ValueError:  # TenSEAL raises for a symmetric context instead of answering False
        return False


def _encrypt(ctx: Any, values: np.ndarray) -> list[bytes]:
    """``values`` (n,), one a slot, zero-padded to whole ciphertexts, under ``ctx``'s key."""
    ts = _ts()
    v = _finite(values, "values")
    if v.ndim != 1 or v.size == 0:
        raise CryptoError(f"`values` must be a non-empty 1-D array, got shape {v.shape}.")
    s = slots()
    out = []
    for c in range(n_chunks(v.size)):
        block = np.zeros(s)
        part = v[c * s:(c + 1) * s]
        block[: part.size] = part
        out.append(bytes(ts.ckks_vector(ctx, block.tolist()).serialize()))
    return out


class _Base:
    def __init__(self, ctx: Any) -> None:
        self._ctx = ctx

    def load(self, blob: object, *, field: str, fresh: bool) -> Any:
        """A CKKS vector of ``slots`` values from bytes, checked (fresh: at the first level, scale 2^40)."""
        ts = _ts()
        if not isinstance(blob, (bytes, bytearray)) or not 0 < len(blob) <= _MAX_CT_BYTES:
            raise CryptoError(f"`{field}` must be 1 to {_MAX_CT_BYTES} bytes of a CKKS ciphertext.")
        try:
            vec = ts.ckks_vector_from(self._ctx, bytes(blob))
            cts = vec.data.ciphertext()
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError on bad protobufs
            raise CryptoError(f"`{field}` is not a CKKS ciphertext under this context ({type(exc).__name__}).") from None
        if vec.size() != slots() or len(cts) != 1 or cts[0].size() != 2:
            raise CryptoError(f"`{field}` must be one 2-part ciphertext of {slots()} slots.")
        data = self._ctx.seal_context().data
        level = data.first_parms_id() if fresh else data.last_parms_id()
        if cts[0].parms_id() != level:
            raise CryptoError(f"`{field}` must be at the {'first' if fresh else 'last'} level of the chain.")
        if not math.isclose(cts[0].scale, 2.0**SCALE_BITS, rel_tol=1e-3):
            raise CryptoError(f"`{field}` must have scale ~2^{SCALE_BITS}.")
        return vec


class LrSecretContext(_Base):
    """A party's own CKKS key: encrypts its values and decrypts what is computed under it. Never leaves the party."""

    def __repr__(self) -> str:  # never the key
        return "LrSecretContext(ckks-8192, secret key held)"

    @classmethod
    def generate(cls, *, public_key: bool = False) -> LrSecretContext:
        """A fresh key; SEAL draws it and the encryption noise from the OS CSPRNG.

        ``public_key``: an asymmetric key whose public part travels with :meth:`public_bytes`, so
        that other parties can encrypt under it (the key holders of the several-passive protocol);
        otherwise symmetric (only the owner encrypts).
        """
        ts = _ts()
        kind = ts.ENCRYPTION_TYPE.ASYMMETRIC if public_key else ts.ENCRYPTION_TYPE.SYMMETRIC
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=POLY_MODULUS_DEGREE, coeff_mod_bit_sizes=list(COEFF_MOD_BIT_SIZES),
                         encryption_type=kind, n_threads=1)
        ctx.global_scale = 2.0**SCALE_BITS
        out = cls(ctx)
        out._public = bool(public_key)
        return out

    _public = False

    def has_secret_key(self) -> bool:
        """True (a secret context)."""
        return bool(self._ctx.has_secret_key())

    def public_bytes(self) -> bytes:
        """The context without its secret key (what the other parties receive): with the public key only if generated with one."""
        return _serialize_public(self._ctx, public_key=self._public)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """``values`` (n,), one a slot, zero-padded to whole ciphertexts."""
        return _encrypt(self._ctx, values)

    def decrypt_sums(self, blobs: Sequence[bytes], *, used: int) -> np.ndarray:
        """Each ciphertext (a :meth:`LrPublicContext.masked_products` result) decrypted, its first ``used`` slots summed."""
        if not 0 < used <= slots():
            raise CryptoError(f"`used` must be in [1, {slots()}], got {used}.")
        out = np.empty(len(blobs))
        for j, blob in enumerate(blobs):
            vec = self.load(blob, field=f"ciphertexts[{j}]", fresh=False)
            out[j] = float(np.sum(np.asarray(vec.decrypt(), dtype=np.float64)[:used]))
        return out


class LrPublicContext(_Base):
    """The other party's context, no key: load its ciphertexts, add and multiply plaintexts."""

    def __repr__(self) -> str:
        return "LrPublicContext(ckks-8192, no key)"

    @classmethod
    def from_bytes(cls, data: object, *, field: str = "context", public_key: bool = False) -> LrPublicContext:
        """Load and check the other party's context: CKKS, these parameters, no secret key (``public_key``: its public key required)."""
        ts = _ts()
        if not isinstance(data, (bytes, bytearray)) or not 0 < len(data) <= (1 << 20):
            raise CryptoError(f"`{field}` must be 1 to {1 << 20} bytes.")
        try:
            ctx = ts.context_from(bytes(data), n_threads=1)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError on bad protobufs
            raise CryptoError(f"`{field}` is not a TenSEAL context ({type(exc).__name__}).") from None
        if ctx.has_secret_key() or ctx.is_private():
            raise CryptoError(f"`{field}` must not carry a secret key (refused; the sender should make a new key).")
        parms = ctx.seal_context().data.key_context_data().parms()
        if str(parms.scheme()).rsplit(".", 1)[-1] != "CKKS" or int(parms.poly_modulus_degree()) != POLY_MODULUS_DEGREE:
            raise CryptoError(f"`{field}` must be a CKKS context with N = {POLY_MODULUS_DEGREE}.")
        bits = _chain_bits(ctx)
        if tuple(bits) != COEFF_MOD_BIT_SIZES or not math.isclose(ctx.global_scale, 2.0**SCALE_BITS):
            raise CryptoError(f"`{field}` must have coefficient modulus {list(COEFF_MOD_BIT_SIZES)} bits and scale 2^{SCALE_BITS}, got {bits}.")
        if public_key and not _has_public_key(ctx):
            raise CryptoError(f"`{field}` must carry the key holder's public key (others encrypt under it).")
        return cls(ctx)

    def encrypt(self, values: np.ndarray) -> list[bytes]:
        """``values`` under the key owner's public key (fresh ciphertexts, as :meth:`LrSecretContext.encrypt`); needs a public key."""
        if not _has_public_key(self._ctx):
            raise CryptoError("this context carries no public key; only its owner encrypts under it.")
        return _encrypt(self._ctx, values)

    def add(self, parts: Sequence[Sequence[bytes]], *, offset: np.ndarray | None = None, n: int) -> list[bytes]:
        """Chunk by chunk, the sum of several parties' fresh ciphertexts of ``n`` values, plus a plaintext ``offset`` (n,).

        The sums stay at the first level (scale 2^40): what :meth:`masked_products` takes.
        """
        k = n_chunks(n)
        if not parts or any(len(p) != k for p in parts):
            raise CryptoError(f"`parts` must be one or more lists of {k} ciphertexts, got {[len(p) for p in parts]}.")
        off = None if offset is None else _finite(offset, "offset")
        if off is not None and off.shape != (n,):
            raise CryptoError(f"`offset` must have shape ({n},), got {off.shape}.")
        s = slots()
        out = []
        for c in range(k):
            acc = None
            for i, p in enumerate(parts):
                vec = self.load(p[c], field=f"parts[{i}][{c}]", fresh=True)
                acc = vec if acc is None else acc + vec
            assert acc is not None
            if off is not None:
                block = np.zeros(s)
                piece = off[c * s:(c + 1) * s]
                block[: piece.size] = piece
                acc = acc + block.tolist()
            out.append(bytes(acc.serialize()))
        return out

    def has_secret_key(self) -> bool:
        """Always False (checked on loading)."""
        return bool(self._ctx.has_secret_key())

    def masked_products(self, chunks: Sequence[bytes], *, offset: np.ndarray, x: np.ndarray, flood_std: float,
                        generator: np.random.Generator) -> tuple[list[bytes], np.ndarray]:
        """Per feature ``j``: ``Enc(sum_c (b_c + offset_c) x_c[:, j] + r_j + e_j)``; and ``sum r_j`` over the used slots.

        ``chunks`` are the key owner's fresh ciphertexts of ``b`` (n values), ``offset`` (n,) and
        ``x`` (n, d) the evaluator's plaintexts. See the module docstring.
        """
        xx = _finite(x, "x")
        off = _finite(offset, "offset")
        n = off.shape[0] if off.ndim == 1 else -1
        if xx.ndim != 2 or xx.shape[0] != n or n < 1 or xx.shape[1] < 1:
            raise CryptoError(f"`x` must have shape (n, d) and `offset` (n,), got {xx.shape} and {off.shape}.")
        if len(chunks) != n_chunks(n):
            raise CryptoError(f"`chunks` must be {n_chunks(n)} ciphertexts for {n} records, got {len(chunks)}.")
        if not (isinstance(flood_std, float) and math.isfinite(flood_std) and flood_std > 0):
            raise CryptoError(f"`flood_std` must be a finite float > 0, got {flood_std!r}.")
        if not isinstance(generator, np.random.Generator):
            raise CryptoError("`generator` must be a numpy Generator (randomness is passed in, never global).")
        s = slots()
        resid = []
        for c, blob in enumerate(chunks):
            vec = self.load(blob, field=f"chunks[{c}]", fresh=True)
            block = np.zeros(s)
            part = off[c * s:(c + 1) * s]
            block[: part.size] = part
            resid.append(vec + block.tolist())
        d = xx.shape[1]
        used = min(n, s)
        masks = uniform_masks((d, s))
        out = []
        for j in range(d):
            acc = None
            for c, r in enumerate(resid):
                col = np.zeros(s)
                part = xx[c * s:(c + 1) * s, j]
                col[: part.size] = part
                if not col.any():
                    col[0] = _ZERO_STAND_IN
                prod = r * col.tolist()
                acc = prod if acc is None else acc + prod
            assert acc is not None
            acc = acc + (masks[j] + generator.normal(0.0, flood_std, size=s)).tolist()
            out.append(bytes(acc.serialize()))
        return out, masks[:, :used].sum(axis=1)
