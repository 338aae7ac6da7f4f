"""Encrypted per-bin sums for vertical SecureBoost: SEAL's BFV through TenSEAL's ``sealapi``.

The label holder (active party) owns the key. It encrypts its quantised per-record gradients
``g`` and hessians ``h`` (row 0 and row 1 of SEAL's 2 x N/2 batching matrix, so every operation
works on both at once). A passive party multiplies the ciphertext by its secret one-hot
"record -> (tree node, feature bin)" matrix and returns the encrypted bin sums; only the label
holder can decrypt them. Nothing here is a home-made cryptosystem: encryption, plaintext
multiplication, rotation and decryption are SEAL's; this module only arranges them.

Matrix-vector product (Halevi & Shoup, CRYPTO 2014, the diagonal method with baby-step giant-step):
records are padded to ``p`` (a power of two dividing the row size ``s``) and tiled ``s / p`` times,
so ``rot(v, k)[j] = g[(j + k) mod p]``; with ``diag_k[j] = M[j, (j + k) mod p]``,
``y = sum_k diag_k * rot(v, k)``. Writing ``k = a n1 + b`` gives ``y = sum_a rot(sum_b
rot(diag_k, -a n1) * rot(v, b), a n1)``: ``n1 - 1`` baby rotations (by 1, repeated) and ``n2 - 1``
giant ones (by ``n1``, Horner), so only two Galois keys are shared. Up to ``s`` outputs per
ciphertext; more outputs take more output groups (the baby rotations are shared), more records
more input chunks (their results add).

Parameters: N = 8192 with SEAL's default 128-bit coefficient modulus (218 bits), a 40-bit
batching plain modulus. Sums are exact integers modulo t: callers quantise, and check headroom.

Circuit privacy (what the key holder may learn from a returned ciphertext beyond the sums): the
passive party switches the result to the last modulus level and adds a fresh public-key
encryption of zero. That re-randomises the ciphertext but is not noise flooding, so the noise term
may still carry some information about the passive party's matrix to the key holder: a residual
risk written up in docs/vertical.md (Paillier, as FATE uses, re-randomises perfectly; it cost 9 ms
per record encryption here against 5 ms per 4096 records for BFV).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcollab.core import CryptoError

POLY_MODULUS_DEGREE = 8192
PLAIN_MODULUS_BITS = 40
ROW = POLY_MODULUS_DEGREE // 2  # slots per batching row
MAX_CIPHERTEXT_BYTES = 4 << 20
SWITCH_LEVELS = 2  # modulus levels dropped before a result is returned (smaller, less noise detail; budget measured in tests)
MAX_BUNDLE_BYTES = 32 << 20


def _sa() -> Any:
    try:
        import tenseal.sealapi as sa
    except ImportError as exc:  # pragma: no cover - tenseal is a node dependency
        raise CryptoError("vertical SecureBoost needs TenSEAL: pip install 'fedcollab[node]'") from exc
    return sa


def _context() -> tuple[Any, Any]:
    sa = _sa()
    parms = sa.EncryptionParameters(sa.SCHEME_TYPE.BFV)
    parms.set_poly_modulus_degree(POLY_MODULUS_DEGREE)
    parms.set_coeff_modulus(sa.CoeffModulus.BFVDefault(POLY_MODULUS_DEGREE, sa.SEC_LEVEL_TYPE.TC128))
    parms.set_plain_modulus(sa.PlainModulus.Batching(POLY_MODULUS_DEGREE, PLAIN_MODULUS_BITS))
    ctx = sa.SEALContext(parms, True, sa.SEC_LEVEL_TYPE.TC128)
    if not ctx.parameters_set():
        raise CryptoError("SEAL refused the BFV parameters.")  # pragma: no cover
    return ctx, parms


def _save(obj: Any) -> bytes:
    fd, path = tempfile.mkstemp(prefix="fedcollab-bfv-")
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def _load(factory: Any, ctx: Any, data: bytes, what: str, limit: int) -> Any:
    if not isinstance(data, (bytes, bytearray)) or not data:
        raise CryptoError(f"`{what}` must be non-empty bytes, got {type(data).__name__}.")
    if len(data) > limit:
        raise CryptoError(f"`{what}` is {len(data)} bytes, over the {limit}-byte limit.")
    fd, path = tempfile.mkstemp(prefix="fedcollab-bfv-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj = factory()
        try:
            obj.load(ctx, path)
        except Exception as exc:  # SEAL checks the object against the parameters
            raise CryptoError(f"`{what}` is not a valid SEAL object for these BFV parameters.") from exc
        return obj
    finally:
        os.unlink(path)


def baby_step(p: int) -> int:
    """``n1`` of the baby-step giant-step split for ``p`` padded records (a power of two)."""
    return 1 << (int(math.log2(p)) + 1) // 2


def padded(n: int) -> int:
    """Records of one input chunk padded to a power of two (at least 2, at most the row size)."""
    if n < 1 or n > ROW:
        raise CryptoError(f"an input chunk holds 1 to {ROW} records, got {n}.")
    return max(2, 1 << (n - 1).bit_length())


def _galois_elements(steps: Sequence[int]) -> list[int]:
    return sorted({pow(3, k, 2 * POLY_MODULUS_DEGREE) for k in steps})


@dataclass
class BfvPublic:
    """What a passive party holds: the parameters, the public key and two Galois keys. No secret key."""

    _ctx: Any
    _pk: Any
    _gk: Any
    _plain_modulus: int

    @property
    def plain_modulus(self) -> int:
        """The batching plain modulus t."""
        return self._plain_modulus

    @classmethod
    def from_bundle(cls, bundle: Sequence[bytes]) -> BfvPublic:
        """Load ``[public key, galois keys]`` as sent by the key holder; refuses anything SEAL does not accept."""
        sa = _sa()
        if not isinstance(bundle, (list, tuple)) or len(bundle) != 2:
            raise CryptoError(f"a BFV public bundle is [public key, galois keys], got {type(bundle).__name__} of length {len(bundle) if hasattr(bundle, '__len__') else '?'}.")
        ctx, parms = _context()
        pk = _load(sa.PublicKey, ctx, bundle[0], "public key", MAX_BUNDLE_BYTES)
        gk = _load(sa.GaloisKeys, ctx, bundle[1], "galois keys", MAX_BUNDLE_BYTES)
        return cls(ctx, pk, gk, int(parms.plain_modulus().value()))

    def load_ciphertext(self, data: bytes, what: str = "ciphertext") -> Any:
        """A ciphertext from bytes (size-checked, validated by SEAL)."""
        return _load(_sa().Ciphertext, self._ctx, data, what, MAX_CIPHERTEXT_BYTES)

    def encrypt_rows(self, g: np.ndarray, h: np.ndarray) -> list[bytes]:
        """Integer vectors ``g`` and ``h`` as ciphertexts of up to ``ROW`` records each (row 0: g, row 1: h)."""
        sa = _sa()
        g = np.asarray(g, dtype=np.int64)
        h = np.asarray(h, dtype=np.int64)
        if g.shape != h.shape or g.ndim != 1 or g.size == 0:
            raise CryptoError(f"`g` and `h` must be equal-length non-empty 1-D integer vectors, got {g.shape} and {h.shape}.")
        half = self._plain_modulus // 2
        if np.abs(g).max() >= half or np.abs(h).max() >= half:
            raise CryptoError("a quantised value does not fit the plain modulus.")
        enc = sa.Encryptor(self._ctx, self._pk)
        be = sa.BatchEncoder(self._ctx)
        out = []
        p = padded(min(g.size, ROW))  # every chunk padded alike: two Galois keys serve them all
        for start in range(0, g.size, ROW):
            gc, hc = g[start : start + ROW], h[start : start + ROW]
            gp = np.zeros(p, dtype=np.int64)
            hp = np.zeros(p, dtype=np.int64)
            gp[: gc.size], hp[: hc.size] = gc, hc
            pt = sa.Plaintext()
            be.encode(np.concatenate([np.tile(gp, ROW // p), np.tile(hp, ROW // p)]).tolist(), pt)
            ct = sa.Ciphertext()
            enc.encrypt(pt, ct)
            out.append(_save(ct))
        return out

    def bin_sums(self, chunks: Sequence[bytes], outputs: np.ndarray, n_outputs: int, *, noise: np.ndarray | None = None) -> list[bytes]:
        """Encrypted ``(sum g, sum h)`` per output index: ``outputs[i, f]`` is the output record ``i`` adds to (``-1``: none).

        ``chunks`` are :meth:`encrypt_rows` ciphertexts of the same records; ``noise`` (optional,
        integers of shape ``(2, n_outputs)``) is added to the sums before they are re-randomised.
        Returns one ciphertext per group of ``ROW`` outputs.
        """
        sa = _sa()
        outputs = np.asarray(outputs, dtype=np.int64)
        if outputs.ndim != 2:
            raise CryptoError(f"`outputs` must be a (records, features) index matrix, got shape {outputs.shape}.")
        n = outputs.shape[0]
        if len(chunks) != max(1, math.ceil(n / ROW)):
            raise CryptoError(f"{n} records need {math.ceil(n / ROW)} ciphertext chunk(s), got {len(chunks)}.")
        if outputs.size and (outputs.max() >= n_outputs or outputs.min() < -1):
            raise CryptoError(f"`outputs` indices must lie in [-1, {n_outputs}).")
        ev = sa.Evaluator(self._ctx)
        be = sa.BatchEncoder(self._ctx)
        groups = max(1, math.ceil(n_outputs / ROW))
        accs: list[Any] = [None] * groups
        for c, data in enumerate(chunks):
            ct = self.load_ciphertext(data, f"gradient chunk {c}")
            rows = outputs[c * ROW : (c + 1) * ROW]
            p = padded(min(n, ROW))
            n1 = baby_step(p)
            n2 = p // n1
            babies = [ct]
            for _ in range(1, n1):
                nxt = sa.Ciphertext()
                ev.rotate_rows(babies[-1], 1, self._gk, nxt)
                babies.append(nxt)
            for baby in babies:  # plaintext products in NTT form: about 2x faster than SEAL's coefficient-form multiply_plain
                ev.transform_to_ntt_inplace(baby)
            parms_id = babies[0].parms_id()
            for grp in range(groups):
                # dense 0/1 matrix of this group's outputs: M[j, i] = 1 if record i adds to output grp*ROW + j
                m = np.zeros((ROW, p), dtype=np.int64)
                rec, feat = np.nonzero((rows >= grp * ROW) & (rows < (grp + 1) * ROW))
                np.add.at(m, (rows[rec, feat] - grp * ROW, rec), 1)
                if not m.any():
                    continue
                j = np.arange(ROW)
                total = None
                for a in reversed(range(n2)):  # Horner: total = inner_a + rot(total, n1)
                    inner = None
                    for b in range(n1):
                        k = a * n1 + b
                        d = np.roll(m[j, (j + k) % p], a * n1)
                        if not d.any():
                            continue
                        pt = sa.Plaintext()
                        be.encode(np.concatenate([d, d]).tolist(), pt)
                        ev.transform_to_ntt_inplace(pt, parms_id)
                        prod = sa.Ciphertext()
                        ev.multiply_plain(babies[b], pt, prod)
                        if inner is None:
                            inner = prod
                        else:
                            ev.add_inplace(inner, prod)
                    if inner is not None:
                        ev.transform_from_ntt_inplace(inner)
                    if total is not None:
                        ev.rotate_rows_inplace(total, n1, self._gk)
                        if inner is not None:
                            ev.add_inplace(total, inner)
                    else:
                        total = inner
                if total is None:
                    continue
                if accs[grp] is None:
                    accs[grp] = total
                else:
                    ev.add_inplace(accs[grp], total)
        enc = sa.Encryptor(self._ctx, self._pk)
        out = []
        for grp in range(groups):
            acc = accs[grp]
            extra = np.zeros((2, ROW), dtype=np.int64)
            if noise is not None:
                nz = np.asarray(noise, dtype=np.int64)
                if nz.shape != (2, n_outputs):
                    raise CryptoError(f"`noise` must have shape (2, {n_outputs}), got {nz.shape}.")
                part = nz[:, grp * ROW : (grp + 1) * ROW]
                extra[:, : part.shape[1]] = part
            pt = sa.Plaintext()
            be.encode(np.concatenate([extra[0], extra[1]]).tolist(), pt)
            fresh = sa.Ciphertext()
            enc.encrypt(pt, fresh)  # a fresh encryption of the noise (or of zero) re-randomises the result
            if acc is None:
                acc = fresh
            else:
                ev.add_inplace(acc, fresh)
            for _ in range(SWITCH_LEVELS):
                ev.mod_switch_to_next_inplace(acc)
            out.append(_save(acc))
        return out


@dataclass
class BfvSecret(BfvPublic):
    """The label holder's key pair (the secret key never leaves it)."""

    _sk: Any = None

    @classmethod
    def generate(cls, *, records: int) -> BfvSecret:
        """Fresh keys from SEAL's CSPRNG, with Galois keys for the two rotation steps that ``records`` aligned records need."""
        sa = _sa()
        ctx, parms = _context()
        kg = sa.KeyGenerator(ctx)
        pk = sa.PublicKey()
        kg.create_public_key(pk)
        gk = sa.GaloisKeys()
        n1 = baby_step(padded(min(max(records, 1), ROW)))
        kg.create_galois_keys(_galois_elements(sorted({1, n1})), gk)
        return cls(ctx, pk, gk, int(parms.plain_modulus().value()), kg.secret_key())

    def public_bundle(self) -> list[bytes]:
        """``[public key, galois keys]`` for the passive parties."""
        return [_save(self._pk), _save(self._gk)]

    def decrypt_sums(self, cts: Sequence[bytes], n_outputs: int) -> np.ndarray:
        """``(n_outputs, 2)`` integer sums (g, h) from :meth:`bin_sums` ciphertexts (centred modulo t)."""
        sa = _sa()
        groups = max(1, math.ceil(n_outputs / ROW))
        if len(cts) != groups:
            raise CryptoError(f"{n_outputs} outputs come in {groups} ciphertext(s), got {len(cts)}.")
        dec = sa.Decryptor(self._ctx, self._sk)
        be = sa.BatchEncoder(self._ctx)
        t = self._plain_modulus
        parts = []
        for i, data in enumerate(cts):
            ct = self.load_ciphertext(data, f"bin sums {i}")
            if dec.invariant_noise_budget(ct) <= 0:
                raise CryptoError(f"bin sums {i}: the ciphertext has no noise budget left (not a valid result).")
            pt = sa.Plaintext()
            dec.decrypt(ct, pt)
            vals = np.array(be.decode_uint64(pt), dtype=np.uint64).astype(object)
            centred = np.array([int(v) - t if int(v) > t // 2 else int(v) for v in vals], dtype=np.int64)
            parts.append(np.stack([centred[:ROW], centred[ROW:]], axis=1))
        return np.concatenate(parts, axis=0)[:n_outputs]
