"""Files only their owner may read: keys, secrets, nonces and vectors waiting at a node."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

_FLAGS = {"replace": os.O_TRUNC, "new": os.O_EXCL, "append": os.O_APPEND}


def write_private(path: str | Path, data: bytes, *, mode: Literal["replace", "new", "append"] = "replace") -> None:
    """Write ``data`` to ``path`` (parents created); a file this creates is readable by its owner only (0600).

    ``replace`` truncates an existing file, ``new`` refuses one (``FileExistsError``, for keys that
    must never be overwritten), ``append`` adds to its end.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | _FLAGS[mode], 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
