"""Per-node, per-feature, per-bin sums of gradients and hessians, their sum, and their secagg encoding.

A histogram of one tree level has shape ``(n_open, n_slots, 2)``: for every open tree node,
every slot of the :class:`BinLayout` (each feature's value bins, then its missing bin), the sum
of ``g`` (``[..., 0]``) and of ``h`` (``[..., 1]``) over the rows in that node and bin. Leaf sums
have shape ``(n_leaves, 2)``. Both are pure functions of the binned rows, ``g``, ``h`` and the
row-to-open-node position (``-1``: the row is not in an open node).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.protocols.quantize import check_headroom, dequantize, quantize
from fedcollab.protocols.gbdt._binning import BinLayout


def _check_rows(bins: np.ndarray, g: np.ndarray, h: np.ndarray, position: np.ndarray) -> None:
    n = bins.shape[0]
    for name, a in (("g", g), ("h", h), ("position", position)):
        if a.shape != (n,):
            raise ProtocolError(f"`{name}` must have shape ({n},) like the binned rows, got {a.shape}.")
    if not (np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
        raise ProtocolError("`g` and `h` must be finite.")


def build_histograms(bins: np.ndarray, g: np.ndarray, h: np.ndarray, position: np.ndarray, *, n_open: int, layout: BinLayout) -> np.ndarray:
    """Gradient and hessian sums per open node and slot, shape ``(n_open, n_slots, 2)``."""
    g = np.asarray(g, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    position = np.asarray(position, dtype=np.int64)
    _check_rows(bins, g, h, position)
    if bins.ndim != 2 or bins.shape[1] != layout.n_features:
        raise ProtocolError(f"binned rows must have shape (n, {layout.n_features}), got {bins.shape}.")
    if position.size and (position.max() >= n_open or position.min() < -1):
        raise ProtocolError(f"`position` must lie in [-1, {n_open}), got [{position.min()}, {position.max()}].")
    keep = position >= 0
    rows = bins if keep.all() else bins[keep]
    pk, gk, hk = (position, g, h) if keep.all() else (position[keep], g[keep], h[keep])
    out = np.empty((n_open, layout.n_slots, 2))
    # One bincount per feature and statistic: no (rows x features) temporaries.
    for j, (off, nb) in enumerate(zip(layout.offsets, layout.n_bins)):
        width = int(nb) + 1
        key = pk * width + rows[:, j]
        out[:, off : off + width, 0] = np.bincount(key, weights=gk, minlength=n_open * width).reshape(n_open, width)
        out[:, off : off + width, 1] = np.bincount(key, weights=hk, minlength=n_open * width).reshape(n_open, width)
    return out


def leaf_sums(g: np.ndarray, h: np.ndarray, position: np.ndarray, *, n_leaves: int) -> np.ndarray:
    """Gradient and hessian sums per leaf, shape ``(n_leaves, 2)`` (``position``: leaf index or -1)."""
    g = np.asarray(g, dtype=np.float64)
    h = np.asarray(h, dtype=np.float64)
    position = np.asarray(position, dtype=np.int64)
    keep = position >= 0
    return np.stack([np.bincount(position[keep], weights=g[keep], minlength=n_leaves),
                     np.bincount(position[keep], weights=h[keep], minlength=n_leaves)], axis=-1)


def sum_histograms(histograms: Sequence[np.ndarray]) -> np.ndarray:
    """The coordinator's sum of the partners' histograms (all of one shape)."""
    if not histograms:
        raise ProtocolError("no histograms to sum.")
    shape = np.shape(histograms[0])
    for i, hist in enumerate(histograms):
        if np.shape(hist) != shape:
            raise ProtocolError(f"histogram {i} has shape {np.shape(hist)}, expected {shape} like the first.")
    return np.sum(np.stack([np.asarray(x, dtype=np.float64) for x in histograms]), axis=0)


def histogram_bound(*, max_rows: int, grad_clip: float, hess_clip: float, noise_margin: float = 0.0) -> float:
    """Largest magnitude of one partner's cell: ``max_rows`` rows of clipped g or h, plus a noise margin."""
    return float(max_rows) * max(float(grad_clip), float(hess_clip)) + float(noise_margin)


def encode_histograms(hist: np.ndarray, *, bound: float, scale: float, n_parties: int, bits: int = 64) -> np.ndarray:
    """A partner's histogram as fixed point modulo 2^bits, ready for SecAgg+ masking.

    ``bound`` is a public bound on every cell (see :func:`histogram_bound`); the headroom check
    makes sure ``n_parties`` such vectors sum without wrapping. A cell beyond ``bound`` is refused
    (a :class:`ProtocolError`), never silently clipped, since clipping would bias the split.
    """
    arr = np.asarray(hist, dtype=np.float64).ravel()
    check_headroom(n_parties=n_parties, max_abs=bound, scale=scale, bits=bits)
    if arr.size and float(np.max(np.abs(arr))) > bound:
        raise ProtocolError(f"a histogram cell of magnitude {float(np.max(np.abs(arr))):.6g} exceeds the public bound {bound:g}; raise the bound (max rows per partner).")
    return quantize(arr, clip=bound, scale=scale, bits=bits, n_parties=n_parties)


def decode_histograms(total: np.ndarray, *, shape: tuple[int, ...], scale: float, bits: int = 64) -> np.ndarray:
    """The coordinator's summed histogram from the modular sum of :func:`encode_histograms` vectors."""
    flat = dequantize(np.asarray(total), scale=scale, bits=bits)
    if flat.size != int(np.prod(shape)):
        raise ProtocolError(f"the summed vector has {flat.size} entries, expected {int(np.prod(shape))} for shape {shape}.")
    return flat.reshape(shape)
