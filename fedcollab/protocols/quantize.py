"""Fixed-point encoding of float vectors for secure aggregation modulo 2^32 or 2^64.

A node clips its vector, scales it to fixed point, rounds, and maps negatives into [0, 2^k)
two's-complement style; masked sums then wrap modulo 2^k, and :func:`dequantize` reads the
sum back as signed and divides by the scale. The sum is exact as long as no partial sum leaves
(-2^(k-1), 2^(k-1)); :func:`check_headroom` makes sure of that before anything is sent.

FedAvg weights travel inside the masked vector: :func:`pack` sends ``(w·x, w)``, so the
aggregate is ``(Σ w·x, Σ w)`` and the coordinator never sees a single node's weight.
:func:`encode_update` / :func:`decode_update` do the whole node / coordinator path.

Model arrays become one vector and back in one way, for every protocol (SecAgg+, distributed DP,
HE, central DP): :func:`flatten_arrays` (named arrays, in order, as float64) and
:func:`unflatten_arrays` (shaped and typed like a template, the size checked).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np

from fedcollab.core import PrivacyError, ProtocolError, UpdateError
from fedcollab.privacy.mechanisms import clip_l2

Bits = Literal[32, 64]
_DTYPES: dict[int, type[np.unsignedinteger]] = {32: np.uint32, 64: np.uint64}
_SIGNED: dict[int, type[np.signedinteger]] = {32: np.int32, 64: np.int64}


def flatten_arrays(arrays: Mapping[str, Any], names: Sequence[str] | None = None) -> np.ndarray:
    """One float64 vector of the named arrays, in order (``names``: all, in the mapping's order).

    The arrays are numpy arrays or anything with ``.numpy()`` (Flower's ``Array``).
    """
    keys = list(arrays) if names is None else list(names)
    if not keys:
        return np.zeros(0)
    return np.concatenate([np.asarray(a.numpy() if hasattr(a, "numpy") else a, dtype=np.float64).ravel()
                           for a in (arrays[k] for k in keys)])


def unflatten_arrays(flat: np.ndarray, like: Mapping[str, Any]) -> OrderedDict[str, np.ndarray]:
    """``flat`` as arrays shaped and typed like ``like`` (same names, same order).

    Raises
    ------
    UpdateError
        ``flat`` does not have the template's total size.
    """
    flat = np.asarray(flat)
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    offset = 0
    for k, ref in like.items():
        ref = np.asarray(ref.numpy() if hasattr(ref, "numpy") else ref)
        if offset + ref.size > flat.size:
            raise UpdateError(f"a vector of {flat.size} values, expected {sum(np.size(v.numpy() if hasattr(v, 'numpy') else v) for v in like.values())}")
        out[k] = flat[offset:offset + ref.size].reshape(ref.shape).astype(ref.dtype)
        offset += ref.size
    if offset != flat.size:
        raise UpdateError(f"a vector of {flat.size} values, expected {offset}")
    return out


def dtype_for(bits: int) -> np.dtype:
    """The unsigned dtype carrying values modulo 2^bits (``bits`` is 32 or 64)."""
    if isinstance(bits, bool) or bits not in _DTYPES:
        raise ProtocolError(f"`bits` must be 32 or 64, got {bits!r}.")
    return np.dtype(_DTYPES[bits])


def _positive_finite(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ProtocolError(f"`{name}` must be a number (got {type(value).__name__}).")
    v = float(value)
    if not math.isfinite(v) or v <= 0:
        raise ProtocolError(f"`{name}` must be finite and > 0, got {value!r}.")
    return v


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ProtocolError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def check_headroom(*, n_parties: int, max_abs: float, scale: float, bits: int) -> None:
    """Refuse parameters under which a sum of ``n_parties`` encoded vectors could wrap.

    Each party's fixed-point value is at most ``q = floor(max_abs * scale) + 1`` in magnitude
    (the +1 covers rounding, deterministic or stochastic); the sum stays decodable when
    ``n_parties * q <= 2^(bits-1) - 1``, i.e. a little stricter than ``n · max|x| · scale < 2^bits / 2``.

    Raises
    ------
    ProtocolError
        Naming the modulus and the largest scale that would fit.
    """
    n = _positive_int("n_parties", n_parties)
    m = _positive_finite("max_abs", max_abs)
    s = _positive_finite("scale", scale)
    dtype_for(bits)
    limit = (1 << (bits - 1)) - 1
    per_party = math.floor(m * s) + 1
    if n * per_party > limit:
        fits = (limit // n - 1) / m
        raise ProtocolError(
            f"no headroom: {n} parties x max|x| {m:g} x scale {s:g} does not fit modulo 2^{bits} "
            f"(needs n·(max|x|·scale + 1) <= 2^{bits - 1} - 1); use scale <= {fits:.6g} or bits = 64."
        )


def clip_vector(x: np.ndarray, *, bound: float, norm: Literal["linf", "l2"] = "linf") -> np.ndarray:
    """Clip ``x`` to L∞ ``bound`` per coordinate, or scale it to L2 norm at most ``bound``.

    A zero vector stays zero (no division by a zero norm); NaN or ±inf (or an L2 norm that
    overflows) is an :class:`UpdateError`. The L2 scaling is :func:`fedcollab.privacy.mechanisms.clip_l2`.
    """
    c = _positive_finite("bound", bound)
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise UpdateError(f"the vector must be 1-D, got shape {arr.shape}.")
    if not np.all(np.isfinite(arr)):
        raise UpdateError("the vector contains NaN or infinite values.")
    if norm == "linf":
        return np.clip(arr, -c, c)
    if norm == "l2":
        try:
            out = clip_l2(arr, c)  # the one L2 clipper (privacy.mechanisms), also the audit probe's
        except PrivacyError:  # its only failure left here: a norm that overflows float64
            raise UpdateError("the vector's L2 norm overflows (not finite).") from None
        return np.clip(out, -c, c)  # the clip only absorbs float rounding
    raise ProtocolError(f"`norm` must be 'linf' or 'l2', got {norm!r}.")


def quantize(
    x: np.ndarray,
    *,
    clip: float,
    scale: float,
    bits: int,
    n_parties: int,
    norm: Literal["linf", "l2"] = "linf",
    rounding: Literal["nearest", "stochastic"] = "nearest",
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """Encode a float vector as unsigned integers modulo 2^bits.

    Parameters
    ----------
    x : array of float
        1-D, finite.
    clip : float
        Bound on every coordinate (L∞), in the units of ``x``; with ``norm="l2"`` the vector is
        first scaled to L2 norm ``clip`` (which also bounds every coordinate).
    scale : float
        Fixed-point scale: a coordinate becomes ``round(x * scale)``; the error is at most
        ``0.5 / scale`` per coordinate and party (``1 / scale`` with stochastic rounding), as long
        as ``clip * scale <= 2^53`` (beyond that float64 itself rounds; only relevant for bits = 64).
    bits : {32, 64}
        The modulus 2^bits; the result has dtype uint32 or uint64.
    n_parties : int
        How many vectors will be summed; :func:`check_headroom` runs first.
    rounding : {"nearest", "stochastic"}
        Round half to even, or round up with probability equal to the fraction (unbiased),
        which needs an explicit ``generator``.
    """
    check_headroom(n_parties=n_parties, max_abs=clip, scale=scale, bits=bits)
    arr = clip_vector(x, bound=clip, norm=norm)
    v = arr * float(scale)
    if rounding == "nearest":
        q = np.rint(v)
    elif rounding == "stochastic":
        if not isinstance(generator, np.random.Generator):
            raise ProtocolError("stochastic rounding needs an explicit `generator` (a numpy Generator).")
        low = np.floor(v)
        q = low + (generator.random(v.shape) < (v - low))
    else:
        raise ProtocolError(f"`rounding` must be 'nearest' or 'stochastic', got {rounding!r}.")
    signed = q.astype(np.int64)
    if bits == 32:
        return (signed & 0xFFFFFFFF).astype(np.uint32)
    return signed.view(np.uint64).copy()


def dequantize(total: np.ndarray, *, scale: float, bits: int) -> np.ndarray:
    """Read a (summed) vector modulo 2^bits back as signed fixed point and divide by ``scale``."""
    s = _positive_finite("scale", scale)
    dt = dtype_for(bits)
    arr = np.asarray(total)
    if arr.dtype != dt or arr.ndim != 1:
        raise ProtocolError(f"expected a 1-D {dt} vector for bits = {bits}, got {arr.dtype} with shape {arr.shape}.")
    return arr.view(_SIGNED[bits]).astype(np.float64) / s


def pack(update: np.ndarray, weight: float) -> np.ndarray:
    """``(w·x_1, ..., w·x_d, w)``: the weighted update with the weight as one more coordinate."""
    ok = not isinstance(weight, bool) and isinstance(weight, (int, float, np.integer, np.floating))
    w = float(weight) if ok else math.nan
    if not math.isfinite(w) or w < 0:
        raise UpdateError(f"`weight` must be finite and >= 0, got {weight!r}.")
    arr = np.asarray(update, dtype=np.float64)
    if arr.ndim != 1:
        raise UpdateError(f"the update must be 1-D, got shape {arr.shape}.")
    return np.concatenate([w * arr, [w]])


def unpack(total: np.ndarray) -> tuple[np.ndarray, float]:
    """Split a decoded aggregate of :func:`pack` vectors into ``(Σ w·x, Σ w)``."""
    arr = np.asarray(total, dtype=np.float64)
    if arr.ndim != 1 or arr.size < 1:
        raise ProtocolError(f"a packed aggregate must be 1-D and non-empty, got shape {arr.shape}.")
    return arr[:-1].copy(), float(arr[-1])


def encode_update(
    update: np.ndarray,
    *,
    weight: float,
    max_weight: float,
    clip: float,
    scale: float,
    bits: int,
    n_parties: int,
    norm: Literal["linf", "l2"] = "linf",
    rounding: Literal["nearest", "stochastic"] = "nearest",
    generator: np.random.Generator | None = None,
) -> np.ndarray:
    """Node side of FedAvg under secure aggregation: clip, weight, pack, quantize.

    The weight is sent relative to the public ``max_weight`` (so every coordinate stays within
    ``max(clip, 1)`` and the scale can be large); the weighted mean is unchanged by that factor.
    The update is the difference from the global model, never the full weights.
    """
    w_max = _positive_finite("max_weight", max_weight)
    ok = not isinstance(weight, bool) and isinstance(weight, (int, float, np.integer, np.floating))
    if not ok or not math.isfinite(float(weight)) or not 0 <= float(weight) <= w_max:
        raise UpdateError(f"`weight` must be in [0, max_weight = {w_max:g}], got {weight!r}.")
    clipped = clip_vector(update, bound=clip, norm=norm)
    packed = pack(clipped, float(weight) / w_max)
    return quantize(
        packed,
        clip=max(float(clip), 1.0),
        scale=scale,
        bits=bits,
        n_parties=n_parties,
        norm="linf",
        rounding=rounding,
        generator=generator,
    )


def decode_update(total: np.ndarray, *, max_weight: float, scale: float, bits: int) -> tuple[np.ndarray, float]:
    """Coordinator side: the weighted mean update and the total weight from the modular sum.

    Raises
    ------
    ProtocolError
        If the total weight is not positive (nothing to average).
    """
    weighted, rel_total = unpack(dequantize(total, scale=scale, bits=bits))
    if not rel_total > 0:
        raise ProtocolError(f"the aggregate's total weight must be > 0, got {rel_total:g}.")
    return weighted / rel_total, rel_total * _positive_finite("max_weight", max_weight)
