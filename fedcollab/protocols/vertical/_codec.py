"""Wire form of the vertical stage messages: a closed set of dataclasses, numbers, bytes and arrays.

A message is ``header length (4 bytes) ‖ JSON header ‖ blobs``. The header describes the value:
JSON scalars as themselves, ``{"$b": i}`` for the i-th blob of bytes, ``{"$a": i, "dtype", "shape"}``
for an array (dtype bool, int64 or float64 only), ``{"$t": [...]}`` for a tuple and
``{"$c": name, "f": {...}}`` for one of the message classes of :data:`MESSAGES`. Decoding builds
only those classes, with exactly their fields (never a class or function named by the sender),
and checks every array's size against its blob. What the values mean is checked by the stage
functions that take them.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from typing import Any

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.protocols.psi import BlindedSet, IntersectionNotice, PassiveReply
from fedcollab.protocols.vertical._logistic import EncryptedLogits, GradientAnswer, GradientExchange, LrKeyAdvert, PartialLogits, ResidualQuery
from fedcollab.protocols.vertical._secureboost import (
    EncryptedBinSums,
    EncryptedGradients,
    KeyBundle,
    LevelPartitions,
    LevelQuery,
    LevelSplits,
    PassiveAdvert,
    SplitNotice,
    SplitPartition,
)

_MESSAGE_CLASSES: list[type] = [BlindedSet, PassiveReply, IntersectionNotice, PassiveAdvert, KeyBundle, EncryptedGradients, LevelQuery,
                                EncryptedBinSums, SplitNotice, LevelSplits, SplitPartition, LevelPartitions,
                                LrKeyAdvert, EncryptedLogits, ResidualQuery, GradientExchange, GradientAnswer, PartialLogits]
#: The classes a vertical message may hold, by name (extended by :func:`register`).
MESSAGES: dict[str, type] = {c.__name__: c for c in _MESSAGE_CLASSES}
_DTYPES = {"bool": np.dtype(bool), "int64": np.dtype(np.int64), "float64": np.dtype(np.float64)}
_LEN = struct.Struct(">I")
MAX_DEPTH = 8


def register(cls: type) -> type:
    """Add a message class of this package (a frozen dataclass) to :data:`MESSAGES`."""
    assert dataclasses.is_dataclass(cls), cls
    MESSAGES[cls.__name__] = cls
    return cls


def encode(value: Any) -> bytes:
    """The wire form of ``value`` (a message, a tuple of messages, or plain values)."""
    blobs: list[bytes] = []

    def enc(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("a vertical message nests too deeply")
        if v is None or isinstance(v, (bool, str)):
            return v
        if isinstance(v, (np.bool_,)):
            return bool(v)
        if isinstance(v, (int, np.integer)):
            return int(v)
        if isinstance(v, (float, np.floating)):
            return float(v)
        if isinstance(v, (bytes, bytearray, memoryview)):
            blobs.append(bytes(v))
            return {"$b": len(blobs) - 1}
        if isinstance(v, np.ndarray):
            arr = np.ascontiguousarray(v)
            name = next((k for k, d in _DTYPES.items() if arr.dtype == d), None)
            if name is None:
                arr = arr.astype(np.int64) if arr.dtype.kind in "iu" else arr.astype(np.float64)
                name = "int64" if arr.dtype.kind == "i" else "float64"
            blobs.append(arr.tobytes())
            return {"$a": len(blobs) - 1, "dtype": name, "shape": list(arr.shape)}
        if isinstance(v, (tuple, list)):
            return {"$t": [enc(x, depth + 1) for x in v]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type) and MESSAGES.get(type(v).__name__) is type(v):
            return {"$c": type(v).__name__, "f": {f.name: enc(getattr(v, f.name), depth + 1) for f in dataclasses.fields(v) if f.init}}
        raise ProtocolError(f"a vertical message cannot carry a {type(v).__name__}")

    header = json.dumps(enc(value, 0), separators=(",", ":"), allow_nan=False).encode()
    out = bytearray(_LEN.pack(len(header)) + header)
    for b in blobs:
        out += _LEN.pack(len(b)) + b
    return bytes(out)


def decode(data: bytes, *, expect: type | tuple[type, ...] | None = None) -> Any:
    """The value of :func:`encode`'s output; ``ProtocolError`` naming what is wrong otherwise.

    ``expect``: the message class(es) the value (or every item of a tuple value) must be.
    """
    if not isinstance(data, (bytes, bytearray)) or len(data) < _LEN.size:
        raise ProtocolError(f"a vertical message must be bytes of at least {_LEN.size}, got {type(data).__name__}")
    data = bytes(data)
    (n,) = _LEN.unpack_from(data, 0)
    if _LEN.size + n > len(data):
        raise ProtocolError(f"a vertical message's header claims {n} bytes, {len(data) - _LEN.size} are there")
    try:
        header = json.loads(data[_LEN.size:_LEN.size + n])
    except ValueError:
        raise ProtocolError("a vertical message's header is not JSON") from None
    blobs: list[bytes] = []
    at = _LEN.size + n
    while at < len(data):
        if at + _LEN.size > len(data):
            raise ProtocolError("a vertical message ends inside a blob length")
        (m,) = _LEN.unpack_from(data, at)
        at += _LEN.size
        if at + m > len(data):
            raise ProtocolError(f"a vertical message's blob {len(blobs)} claims {m} bytes, {len(data) - at} are there")
        blobs.append(data[at:at + m])
        at += m
    used: set[int] = set()

    def blob(i: Any) -> bytes:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < len(blobs) or i in used:
            raise ProtocolError(f"a vertical message refers to blob {i!r}, which is not an unused blob of {len(blobs)}")
        used.add(i)
        return blobs[i]

    def dec(v: Any, depth: int) -> Any:
        if depth > MAX_DEPTH:
            raise ProtocolError("a vertical message nests too deeply")
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if not isinstance(v, dict):
            raise ProtocolError(f"a vertical message holds a bare {type(v).__name__}")
        if set(v) == {"$b"}:
            return blob(v["$b"])
        if set(v) == {"$a", "dtype", "shape"}:
            dt = _DTYPES.get(v["dtype"]) if isinstance(v["dtype"], str) else None
            shape = v["shape"]
            if dt is None or not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
                raise ProtocolError(f"a vertical message's array has dtype {v['dtype']!r} and shape {shape!r}; expected one of "
                                    f"{sorted(_DTYPES)} and non-negative integer dimensions")
            raw = blob(v["$a"])
            if len(raw) != int(np.prod(shape, dtype=np.int64)) * dt.itemsize:
                raise ProtocolError(f"a vertical message's array of shape {shape} and dtype {v['dtype']} needs "
                                    f"{int(np.prod(shape)) * dt.itemsize} bytes, got {len(raw)}")
            return np.frombuffer(raw, dtype=dt).reshape(shape).copy()
        if set(v) == {"$t"} and isinstance(v["$t"], list):
            return tuple(dec(x, depth + 1) for x in v["$t"])
        if set(v) == {"$c", "f"} and isinstance(v["f"], dict):
            cls = MESSAGES.get(v["$c"]) if isinstance(v["$c"], str) else None
            if cls is None:
                raise ProtocolError(f"a vertical message names class {v['$c']!r}; expected one of {sorted(MESSAGES)}")
            names = {f.name for f in dataclasses.fields(cls) if f.init}
            if set(v["f"]) != names:
                raise ProtocolError(f"a vertical {cls.__name__} has fields {sorted(v['f'])}, expected {sorted(names)}")
            return cls(**{k: dec(x, depth + 1) for k, x in v["f"].items()})
        raise ProtocolError(f"a vertical message holds an object with keys {sorted(v)[:5]}, which is none of bytes, array, tuple or message")

    value = dec(header, 0)
    if len(used) != len(blobs):
        raise ProtocolError(f"a vertical message carries {len(blobs) - len(used)} blob(s) its header does not use")
    if expect is not None:
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if not isinstance(item, expect):
                want = expect.__name__ if isinstance(expect, type) else " or ".join(t.__name__ for t in expect)
                raise ProtocolError(f"expected a vertical {want}, got {type(item).__name__}")
    return value


__all__ = ["MESSAGES", "decode", "encode", "register"]
