"""CKKS (TenSEAL) primitives for encrypted scoring of a linear model.

Column packing: one ciphertext per encoded feature holding up to ``slots`` rows (one row per
slot). The model holder multiplies feature ``j``'s ciphertext by a plaintext vector that holds
its weight ``w_j`` in the first ``n`` slots and 0 in every other slot (so unused slots are
masked at no extra depth), sums the products, rescales once, adds the bias in the first ``n``
slots and floods every slot (real and imaginary part) with fresh Gaussian noise. No rotation,
hence no Galois keys; no ciphertext-ciphertext product, hence no relinearisation keys.

Two context types (TenSEAL's secure default, made a type): :class:`SecretScoringContext` stays
with the querier; :class:`PublicScoringContext` is what the model holder loads, and it refuses
a context that carries a secret key.

Notes
-----
Parameters: N = 8192, coefficient modulus [60, 50, 60] bits (170 <= 218 bits allowed for
128-bit security at N = 8192, HE standard), scale 2^50, symmetric encryption (the holder never
encrypts, so no public key travels: the public context is about 100 bytes). After the single
rescale the result sits on the 60-bit prime at scale ~2^50, so decrypted scores are exact only
for |score| < 2^9; larger logits wrap (the querier learns nothing more than the logit modulo
2^10 and the holder nothing at all).

Noise flooding: the result's decryption error depends on the holder's weights (CKKS noise is
not circuit-private; Li & Micciancio 2021 show approximate decryptions leak). Fresh complex
Gaussian noise of standard deviation ``flood_std`` (default 2^-10 logits per real and
imaginary part, in every slot) is added to the result; the computation error is about 1e-11
logits, so the flooding noise is about 2^26 times larger and statistically hides it (an
imaginary part, usable by a querier that encrypts complex values with raw SEAL, is flooded
too).
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedcollab.core import CryptoError

#: The only parameter set the model holder accepts (a querier may not weaken it).
POLY_MODULUS_DEGREE = 8192
COEFF_MOD_BIT_SIZES = (60, 50, 60)
SCALE_BITS = 50
#: Default flooding noise, standard deviation in logits of each real and imaginary slot part.
DEFAULT_FLOOD_STD = 2.0**-10
#: Stand-in for an exact zero weight (SEAL refuses a product with an all-zero plaintext).
ZERO_WEIGHT = 2.0**-40
#: Largest |feature| a querier may encrypt (keeps every product far from the modulus).
MAX_ABS_FEATURE = 2.0**20


def _tenseal() -> Any:
    try:
        import tenseal
        import tenseal.sealapi  # noqa: F401 - SEAL's own binding, shipped with TenSEAL
    except ImportError as exc:  # pragma: no cover - tenseal is a node dependency
        err = CryptoError("encrypted scoring needs TenSEAL: pip install 'fedcollab[node]'")
        err.exit_code = 10
        raise err from exc
    return tenseal


@dataclass(frozen=True)
class ScoringParams:
    """CKKS parameters of a scoring exchange (recorded in the request, checked by the holder)."""

    poly_modulus_degree: int = POLY_MODULUS_DEGREE
    coeff_mod_bit_sizes: tuple[int, ...] = COEFF_MOD_BIT_SIZES
    scale_bits: int = SCALE_BITS

    @property
    def slots(self) -> int:
        """Rows per ciphertext."""
        return self.poly_modulus_degree // 2

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"scheme": "ckks", "poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "scale_bits": self.scale_bits}


SCORING_PARAMS = ScoringParams()


def check_scoring_params(data: Any) -> ScoringParams:
    """The request's declared parameters; anything but :data:`SCORING_PARAMS` is refused."""
    want = SCORING_PARAMS.to_dict()
    if data != want:
        raise CryptoError(f"`params` must be {want}, got {data!r}")
    return SCORING_PARAMS


def _chain_bits(ctx: Any) -> list[int]:
    data = ctx.seal_context().data
    c = data.key_context_data()
    totals = []
    while c is not None:
        totals.append(int(c.total_coeff_modulus_bit_count()))
        c = c.next_context_data()
    # Totals per level, key level first -> bit size of each prime (the last one is the special prime).
    sizes = [totals[i] - totals[i + 1] for i in range(len(totals) - 1)] + [totals[-1]]
    return list(reversed(sizes[1:])) + [sizes[0]]


class _TempFiles:
    """SEAL's Python binding saves and loads ciphertexts only through file paths."""

    def __enter__(self) -> Path:
        self._dir = tempfile.TemporaryDirectory(prefix="fedcollab-ckks-")
        os.chmod(self._dir.name, 0o700)
        return Path(self._dir.name)

    def __exit__(self, *exc: object) -> None:
        self._dir.cleanup()


def _save_seal(ct: Any) -> bytes:
    with _TempFiles() as d:
        p = d / "ct"
        ct.save(str(p))
        return p.read_bytes()


def _load_seal(seal_context: Any, blob: bytes, *, field: str) -> Any:
    ts = _tenseal()
    ct = ts.sealapi.Ciphertext()
    with _TempFiles() as d:
        p = d / "ct"
        p.write_bytes(blob)
        try:
            ct.load(seal_context, str(p))
        except Exception as exc:  # noqa: BLE001 - SEAL raises plain RuntimeError/ValueError/logic_error
            raise CryptoError(f"`{field}` must be a SEAL ciphertext valid for the scoring context, got {len(blob)} bytes that are not ({type(exc).__name__})") from None
    return ct


class SecretScoringContext:
    """The querier's CKKS context with its secret key: never leaves the querier."""

    def __init__(self, ctx: Any, params: ScoringParams = SCORING_PARAMS) -> None:
        if not ctx.is_private():
            raise CryptoError("a SecretScoringContext needs a context holding its secret key")
        self._ctx = ctx
        self.params = params

    def __repr__(self) -> str:
        return f"SecretScoringContext(N={self.params.poly_modulus_degree}, secret key withheld)"

    @classmethod
    def generate(cls, params: ScoringParams = SCORING_PARAMS) -> SecretScoringContext:
        """A fresh context; SEAL draws keys and encryption noise from the OS CSPRNG."""
        ts = _tenseal()
        ctx = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=params.poly_modulus_degree,
                         coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes), encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        ctx.global_scale = 2.0**params.scale_bits
        return cls(ctx, params)

    def public_bytes(self) -> bytes:
        """The context without its secret key (what the model holder receives)."""
        return bytes(self._ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False))

    def secret_bytes(self) -> bytes:
        """The context with its secret key (explicit; store with mode 0600)."""
        return bytes(self._ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False))

    @classmethod
    def from_secret_bytes(cls, data: bytes, *, field: str = "secret context") -> SecretScoringContext:
        """Load a context saved by :meth:`secret_bytes`."""
        ts = _tenseal()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError on bad protobufs
            raise CryptoError(f"`{field}` must be a serialized TenSEAL context, got {len(data)} bytes that are not ({type(exc).__name__})") from None
        if not ctx.is_private():
            raise CryptoError(f"`{field}` must hold a secret key, got a public context")
        return cls(ctx)

    def encrypt_columns(self, x: np.ndarray, *, progress: Callable[[int], None] | None = None) -> list[list[bytes]]:
        """Encrypt rows ``x`` (n, d), column-packed: ``out[chunk][feature]`` is one ciphertext."""
        ts = _tenseal()
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] == 0:
            raise CryptoError(f"`rows` must be a non-empty 2-D array (rows, features), got shape {x.shape}")
        bad = ~np.isfinite(x)
        if bad.any():
            r, c = np.argwhere(bad)[0]
            raise CryptoError(f"`rows` must be finite, got {x[r, c]} in row {r}, feature {c}")
        if np.abs(x).max() > MAX_ABS_FEATURE:
            raise CryptoError(f"`rows` must satisfy |x| <= 2^20, got {np.abs(x).max():g}")
        out: list[list[bytes]] = []
        s = self.params.slots
        for start in range(0, x.shape[0], s):
            block = x[start : start + s]
            cols = []
            for j in range(block.shape[1]):
                cols.append(bytes(ts.ckks_vector(self._ctx, block[:, j].tolist()).serialize()))
                if progress:
                    progress(1)
            out.append(cols)
        return out

    def decrypt_scores(self, blob: bytes, *, rows: int, field: str = "score ciphertext") -> np.ndarray:
        """Decrypt one result ciphertext; the first ``rows`` real slot parts are the scores."""
        ts = _tenseal()
        data = self._ctx.seal_context().data
        ct = _load_seal(data, blob, field=field)
        if ct.parms_id() != data.last_parms_id() or ct.size() != 2:
            raise CryptoError(f"`{field}` must be a rescaled 2-part ciphertext at the last level, got {ct.size()} parts at another level")
        if not math.isclose(ct.scale, 2.0**self.params.scale_bits, rel_tol=1e-3):
            raise CryptoError(f"`{field}` must have scale ~2^{self.params.scale_bits}, got 2^{math.log2(ct.scale):.2f}")
        pt = ts.sealapi.Plaintext()
        ts.sealapi.Decryptor(data, self._ctx.secret_key().data).decrypt(ct, pt)
        values = np.asarray(ts.sealapi.CKKSEncoder(data).decode_double(pt), dtype=np.float64)
        if not 0 < rows <= len(values):
            raise CryptoError(f"`rows` must be in [1, {len(values)}], got {rows}")
        return values[:rows]


class PublicScoringContext:
    """The querier's context as the model holder loads it: evaluation only, no secret key."""

    def __init__(self, ctx: Any, params: ScoringParams) -> None:
        self._ctx = ctx
        self.params = params

    def __repr__(self) -> str:
        return f"PublicScoringContext(N={self.params.poly_modulus_degree})"

    @classmethod
    def from_bytes(cls, data: bytes, params: ScoringParams = SCORING_PARAMS, *, field: str = "context") -> PublicScoringContext:
        """Load and check a querier's public context."""
        ts = _tenseal()
        try:
            ctx = ts.context_from(data)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError on bad protobufs
            raise CryptoError(f"`{field}` must be a serialized TenSEAL context, got {len(data)} bytes that are not ({type(exc).__name__})") from None
        if ctx.is_private():
            raise CryptoError(f"`{field}` must not carry a secret key (the querier sent its secret key to the model holder; "
                              "the request is refused and the querier should generate a new key)")
        parms = ctx.seal_context().data.key_context_data().parms()
        if str(parms.scheme()).rsplit(".", 1)[-1] != "CKKS":
            raise CryptoError(f"`{field}` must be a CKKS context, got {parms.scheme()}")
        got = {"poly_modulus_degree": int(parms.poly_modulus_degree()), "coeff_mod_bit_sizes": _chain_bits(ctx),
               "scale_bits": math.log2(ctx.global_scale) if ctx.global_scale > 0 else None}
        want = {"poly_modulus_degree": params.poly_modulus_degree, "coeff_mod_bit_sizes": list(params.coeff_mod_bit_sizes),
                "scale_bits": float(params.scale_bits)}
        if got != want:
            raise CryptoError(f"`{field}` must have CKKS parameters {want}, got {got}")
        return cls(ctx, params)

    def load_column(self, blob: bytes, *, rows: int, field: str) -> Any:
        """A fresh feature ciphertext of ``rows`` rows (TenSEAL format), checked; its SEAL ciphertext."""
        ts = _tenseal()
        try:
            vec = ts.ckks_vector_from(self._ctx, blob)
        except Exception as exc:  # noqa: BLE001 - TenSEAL raises ValueError/RuntimeError on bad protobufs
            raise CryptoError(f"`{field}` must be a TenSEAL CKKS vector, got {len(blob)} bytes that are not ({type(exc).__name__})") from None
        if vec.size() != rows:
            raise CryptoError(f"`{field}` must hold {rows} rows, got {vec.size()}")
        cts = vec.data.ciphertext()
        data = self._ctx.seal_context().data
        if len(cts) != 1:
            raise CryptoError(f"`{field}` must be one ciphertext, got {len(cts)}")
        ct = cts[0]
        if ct.size() != 2 or ct.parms_id() != data.first_parms_id() or not ct.is_ntt_form:
            raise CryptoError(f"`{field}` must be a fresh 2-part ciphertext at the first level, got {ct.size()} parts at another level")
        if not math.isclose(ct.scale, 2.0**self.params.scale_bits, rel_tol=1e-9):
            raise CryptoError(f"`{field}` must have scale 2^{self.params.scale_bits}, got {ct.scale!r}")
        return ct

    def score_linear(self, columns: Sequence[Any], *, weights: np.ndarray, bias: float, rows: int, flood_std: float,
                     generator: np.random.Generator) -> bytes:
        """``sum_j w_j x_j + b`` on the first ``rows`` slots, 0 elsewhere, plus flooding noise; serialized.

        Parameters
        ----------
        columns : sequence of SEAL ciphertexts
            One per feature, from :meth:`load_column`.
        weights : array (d,)
            Plaintext weights (they never leave the holder).
        rows : int
            Slots to keep; every other slot is multiplied by 0 (masked).
        flood_std : float
            Standard deviation of the flooding noise, per real and imaginary slot part, in score units.
        generator : numpy Generator
            Source of the flooding noise (seeded from the OS CSPRNG by the caller).
        """
        ts = _tenseal()
        sa = ts.sealapi
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) != len(columns) or not np.isfinite(w).all() or not math.isfinite(bias):
            raise CryptoError(f"`weights` must be {len(columns)} finite numbers, got shape {w.shape}")
        if not (isinstance(flood_std, float) and math.isfinite(flood_std) and flood_std > 0):
            raise CryptoError(f"`flood_std` must be a finite float > 0, got {flood_std!r}")
        if not isinstance(generator, np.random.Generator):
            raise CryptoError("`generator` must be a numpy Generator (randomness is passed in, never global)")
        s = self.params.slots
        if not 0 < rows <= s:
            raise CryptoError(f"`rows` must be in [1, {s}], got {rows}")
        data = self._ctx.seal_context().data
        enc, ev = sa.CKKSEncoder(data), sa.Evaluator(data)
        mask = np.zeros(s)
        acc = None
        for j, ct in enumerate(columns):
            # SEAL refuses a product with an all-zero plaintext (a "transparent" ciphertext would
            # reveal nothing is there); a zero weight becomes ZERO_WEIGHT, whose contribution
            # (< 2^-20 for |x| <= 2^20) is far below the flooding noise.
            mask[:rows] = w[j] if w[j] != 0.0 else ZERO_WEIGHT
            pt = sa.Plaintext()
            enc.encode(mask.tolist(), ct.parms_id(), ct.scale, pt)
            ev.multiply_plain_inplace(ct, pt)  # ct is this call's own copy (see load_column)
            if acc is None:
                acc = ct
            else:
                ev.add_inplace(acc, ct)
        assert acc is not None
        ev.rescale_to_next_inplace(acc)
        mask[:rows] = bias
        pt = sa.Plaintext()
        enc.encode(mask.tolist(), acc.parms_id(), acc.scale, pt)
        ev.add_plain_inplace(acc, pt)
        noise = generator.normal(0.0, flood_std, size=s) + 1j * generator.normal(0.0, flood_std, size=s)
        pt = sa.Plaintext()
        enc.encode(noise.tolist(), acc.parms_id(), acc.scale, pt)
        ev.add_plain_inplace(acc, pt)
        return _save_seal(acc)
