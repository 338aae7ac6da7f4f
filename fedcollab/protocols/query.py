"""Federated statistics queries as pure functions: layout, calibration, accounting, decoding.

A query becomes one integer vector per node: for every group (the declared levels of
``group_by``, or one group ``all``) a fixed list of *blocks*:

* ``rows``          rows in the group (always present: suppression reads it);
* ``n:COL``         rows whose ``COL`` is not missing (mean, variance);
* ``sum:COL``       sum of ``COL - c`` (clamped to its public bounds ``[lo, hi]``, ``c`` their midpoint);
* ``sumsq:COL``     sum of ``(COL - c)^2`` (variance);
* ``hist:COL:B``    B-bin histogram over the public bounds (or one bin per level).

Every row contributes at most ``R = RESOLUTION`` integer units to at most one coordinate of
each block: counts and bins add ``R``, ``sum`` adds ``round(R * (x - c) / h)`` and ``sumsq``
``round(R * (x - c)^2 / h^2)`` with ``h = (hi - lo) / 2`` (centring halves the noise in real
units compared with ``x / max|x|``; the variance is shift-invariant). So one row changes the vector by at most ``Δ2 = R sqrt(K)`` in L2
and ``Δ1 = R K`` in L1 for ``K`` blocks, whatever the data (bounded sensitivity), and a single
discrete Gaussian noise level ``sigma = z R`` serves every block: the query's budget is split
equally across its blocks (in zCDP, each gets ``1 / (2 z^2)``).

Noise under secure aggregation is the distributed discrete Gaussian (Kairouz, Liu & Steinke
2021): each node adds ``N_Z(0, sigma^2 / n_honest)`` (:func:`~fedcollab.protocols.ddg.sample_discrete_gaussian`)
and the vectors are summed modulo ``2^64``. Accounting (:func:`query_zcdp`) is KLS21 Theorem 1
with the exact integer sensitivities (no rounding term: the vector is integral by construction).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcollab.core import PrivacyError, ProtocolError
from fedcollab.privacy.accounting import NonPrivate, ZCDPMechanism, compute_epsilon
from fedcollab.protocols.ddg import check_wraparound, ddg_tau, sample_discrete_gaussian
from fedcollab.spec import QuerySpec, SchemaSpec

#: Integer units one row may contribute to a coordinate (fixed-point resolution of sums).
RESOLUTION = 2**20
QUERY_BITS = 64
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class Block:
    """One block of a group's slice of the vector."""

    name: str
    kind: str  # rows | n | sum | sumsq | hist
    column: str | None
    width: int
    lo: float = 0.0
    hi: float = 1.0
    levels: tuple[str, ...] = ()

    @property
    def center(self) -> float:
        """Midpoint of the public bounds: sums are of ``x - center``."""
        return (self.lo + self.hi) / 2.0

    @property
    def scale(self) -> float:
        """Real units of ``R`` integer units (sum: half-width h, sumsq: h^2, counts: 1)."""
        m = (self.hi - self.lo) / 2.0
        if self.kind == "sum":
            return m
        if self.kind == "sumsq":
            return m * m
        return 1.0

    def edges(self) -> list[float]:
        """Histogram bin edges (numbers) over the public bounds."""
        return np.linspace(self.lo, self.hi, self.width + 1).tolist()


@dataclass(frozen=True)
class Layout:
    """Where each group's blocks lie in the vector."""

    groups: tuple[str, ...]
    blocks: tuple[Block, ...]
    group_column: str | None

    @property
    def group_width(self) -> int:  # noqa: D102
        return sum(b.width for b in self.blocks)

    @property
    def length(self) -> int:
        """Length of the vector."""
        return len(self.groups) * self.group_width

    @property
    def n_blocks(self) -> int:
        """K: blocks a single row can touch (one group only)."""
        return len(self.blocks)

    def offset(self, group: int, block: int) -> int:
        """Start of ``block`` of ``group``."""
        return group * self.group_width + sum(b.width for b in self.blocks[:block])


def _bounds(schema: SchemaSpec, column: str) -> tuple[float, float]:
    col = schema.column(column)
    if col.type == "bool":
        return 0.0, 1.0
    if col.bounds is None:
        raise ProtocolError(f"column {column!r} has no public bounds")
    return float(col.bounds[0]), float(col.bounds[1])


def group_levels(schema: SchemaSpec, column: str | None) -> tuple[str, ...]:
    """The group domain: the schema's declared levels (bools: false, true), never the data's values."""
    if column is None:
        return ("all",)
    col = schema.column(column)
    if col.type == "bool":
        return ("false", "true")
    return tuple(str(v) for v in col.levels or [])


def query_layout(query: QuerySpec, schema: SchemaSpec) -> Layout:
    """The vector layout of ``query`` (same at every node and the coordinator)."""
    blocks: dict[str, Block] = {"rows": Block("rows", "rows", None, 1)}

    def add(b: Block) -> None:
        blocks.setdefault(b.name, b)

    for s in query.statistics:
        c = s.column
        if c is None:
            continue
        col = schema.column(c)
        if s.kind in ("sum", "mean", "variance"):
            lo, hi = _bounds(schema, c)
            add(Block(f"n:{c}", "n", c, 1))
            add(Block(f"sum:{c}", "sum", c, 1, lo, hi))
            if s.kind == "variance":
                add(Block(f"sumsq:{c}", "sumsq", c, 1, lo, hi))
        elif col.type == "category" and s.kind == "histogram":
            levels = tuple(str(v) for v in col.levels or [])
            add(Block(f"hist:{c}:levels", "hist", c, len(levels), levels=levels))
        else:
            lo, hi = _bounds(schema, c)
            add(Block(f"hist:{c}:{s.bins}", "hist", c, s.bins, lo, hi))
    return Layout(groups=group_levels(schema, query.group_by), blocks=tuple(blocks.values()), group_column=query.group_by)


# --- calibration and accounting ------------------------------------------------------------------


def rho_for(epsilon: float, delta: float) -> float:
    """Largest rho whose zCDP guarantee implies (epsilon, delta)-DP by Bun & Steinke 2016, Prop. 1.3.

    ``epsilon = rho + 2 sqrt(rho log(1/delta))`` solved for rho.
    """
    if not (epsilon > 0 and math.isfinite(epsilon)) or not 0 < delta < 1:
        raise PrivacyError(f"query privacy: expected epsilon > 0 and 0 < delta < 1, got epsilon={epsilon!r}, delta={delta!r}.")
    lg = math.log(1.0 / delta)
    return (math.sqrt(lg + epsilon) - math.sqrt(lg)) ** 2


def query_zcdp(*, n_blocks: int, sigma: float, n_honest: int, d: int, resolution: int = RESOLUTION) -> ZCDPMechanism:
    """The zCDP event of one query release (add/remove one row), KLS21 Theorem 1.

    ``sigma`` is the std of the summed honest noise in integer units; ``Δ2 = R sqrt(K)``,
    ``Δ1 = R K``; ``tau = ddg_tau(sigma^2 / n_honest, n_honest)``; then, as in
    :func:`~fedcollab.protocols.ddg.ddg_zcdp`, ``rho`` is the minimum of the three bounds.
    """
    if n_blocks < 1 or n_honest < 1 or d < 1 or not (sigma > 0 and math.isfinite(sigma)):
        raise PrivacyError("query accounting: blocks, honest shares, length and sigma must be positive.")
    d2 = resolution * math.sqrt(n_blocks) / sigma
    d1 = resolution * n_blocks / sigma
    tau = ddg_tau(sigma * sigma / n_honest, n_honest)
    rho = min(d2 * d2 / 2.0 + tau * d, (d2 * d2 + 2.0 * d1 * tau + tau * tau * d) / 2.0, (d2 + tau * math.sqrt(d)) ** 2 / 2.0)
    return ZCDPMechanism(rho=float(rho))


def honest_minimum(query: QuerySpec, *, n_partners: int, threshold: int) -> int:
    """Honest noise shares a query's noise is sized for: ``min_honest``, else the secure-aggregation threshold.

    Both sides derive it from their own spec and the query (a node never takes it from a request).
    A value above ``n_partners`` could never be met by a sum of the spec's partners: the noise would
    be sized for shares that do not exist (a 3-party sum with ``n_honest = 4`` carries 3/4 of the
    calibrated variance), so it is refused (:class:`ProtocolError`).
    """
    n_honest = query.min_honest if query.min_honest is not None else max(1, threshold)
    if n_honest > n_partners:
        raise ProtocolError(
            f"`min_honest` must be at most the {n_partners} partners of the spec (the sum could never hold that many"
            f" noise shares), got {n_honest}."
        )
    return n_honest


@dataclass(frozen=True)
class QueryPlan:
    """The public noise parameters of a query, the same at every node."""

    layout: Layout
    mode: str
    n_honest: int
    sigma: float  # std of the summed honest noise, integer units (0 in exact mode)
    mechanism: Any  # ZCDPMechanism or NonPrivate

    @property
    def noise_std_units(self) -> float:
        """Noise std of a count (rows), with ``n_honest`` shares."""
        return self.sigma / RESOLUTION


def plan_query(query: QuerySpec, schema: SchemaSpec, *, n_honest: int) -> QueryPlan:
    """Calibrate the noise of ``query``: the smallest sigma whose zCDP event meets (epsilon, delta).

    Checked with the RDP accountant, which is never looser than the Prop. 1.3 conversion.
    """
    layout = query_layout(query, schema)
    if query.mode == "exact":
        return QueryPlan(layout, "exact", n_honest, 0.0, NonPrivate())
    assert query.epsilon is not None
    rho = rho_for(query.epsilon, query.delta)
    z = math.sqrt(layout.n_blocks / (2.0 * rho))

    def mech(sigma: float) -> ZCDPMechanism:
        return query_zcdp(n_blocks=layout.n_blocks, sigma=sigma, n_honest=n_honest, d=layout.length)

    sigma = smallest_scale(lambda x: mech(x), z * RESOLUTION, epsilon=query.epsilon, delta=query.delta)
    return QueryPlan(layout, "dp", n_honest, sigma, mech(sigma))


def smallest_scale(mechanism: Any, start: float, *, epsilon: float, delta: float, iterations: int = 30) -> float:
    """Bisection for the smallest noise scale whose mechanism spends at most ``epsilon`` (RDP accountant).

    ``start`` is a scale known or expected to meet the target (the Prop. 1.3 conversion is looser
    than RDP's); the result always meets it, checked with :func:`compute_epsilon`.
    """
    def ok(x: float) -> bool:
        return compute_epsilon([mechanism(x)], delta=delta, accountant="rdp").epsilon <= epsilon

    hi = start
    for _ in range(60):
        if ok(hi):
            break
        hi *= 1.5
    else:
        raise PrivacyError(f"no noise level meets epsilon = {epsilon}")
    lo = hi / 4.0
    for _ in range(iterations):
        mid = (lo + hi) / 2.0
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


# --- node side: noise and encoding ----------------------------------------------------------------


def encode_query_vector(aggregates: np.ndarray, plan: QueryPlan, *, n_parties: int, max_rows: int,
                        generator: np.random.Generator | None) -> np.ndarray:
    """Add this node's share of the noise and map to ``uint64`` (modulo 2^64) for secure aggregation.

    ``aggregates`` are the node's exact integer block sums (int64); ``max_rows`` bounds any
    node's rows (wrap-around check with :func:`~fedcollab.protocols.ddg.check_wraparound`).
    """
    v = np.asarray(aggregates, dtype=np.int64)
    if v.ndim != 1 or v.size != plan.layout.length:
        raise ProtocolError(f"expected {plan.layout.length} aggregates, got shape {v.shape}")
    if plan.mode == "dp":
        if generator is None:
            raise PrivacyError("a generator is required to add noise (randomness is passed in).")
        share2 = plan.sigma**2 / plan.n_honest
        check_wraparound(d=v.size, n=n_parties, max_abs_per_party=float(max_rows) * RESOLUTION, sigma_share=math.sqrt(share2),
                         bits=QUERY_BITS)
        v = v + sample_discrete_gaussian(share2, v.size, generator=generator)
    return v.view(np.uint64).copy()


def decode_query_vector(total: np.ndarray) -> np.ndarray:
    """The modular sum read as signed integers, in real units of ``R`` (float64)."""
    arr = np.asarray(total)
    if arr.dtype != np.uint64 or arr.ndim != 1:
        raise ProtocolError(f"expected a 1-D uint64 sum, got {arr.dtype} with shape {arr.shape}")
    return arr.view(np.int64).astype(np.float64) / RESOLUTION


# --- coordinator side: results -------------------------------------------------------------------


@dataclass
class QueryRow:
    """One number (or list) of the result, with its noise."""

    group: str
    statistic: str
    column: str | None
    value: Any
    noise_std: float | None
    suppressed: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"group": self.group, "statistic": self.statistic, "column": self.column, "value": self.value,
                "noise_std": self.noise_std, "suppressed": self.suppressed, **self.extra}


def _quantiles(counts: np.ndarray, edges: list[float], qs: list[float]) -> list[float | None]:
    c = np.clip(counts, 0.0, None)
    total = float(c.sum())
    if total <= 0:
        return [None for _ in qs]
    cum = np.concatenate([[0.0], np.cumsum(c)])
    out: list[float | None] = []
    for q in qs:
        target = q * total
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(max(i, 1), len(c))
        lo_c, hi_c = cum[i - 1], cum[i]
        frac = 0.0 if hi_c <= lo_c else (target - lo_c) / (hi_c - lo_c)
        out.append(float(edges[i - 1] + frac * (edges[i] - edges[i - 1])))
    return out


def query_result(query: QuerySpec, plan: QueryPlan, total: np.ndarray, *, n_shares: int, min_group_size: int) -> list[QueryRow]:
    """Statistics from the decoded sum; groups whose noisy row count is below ``min_group_size`` are suppressed.

    ``n_shares`` is how many noise shares the sum holds (the participants in it); the noise std
    stated next to each number is the actual one, ``sigma * sqrt(n_shares / n_honest)``, in the
    number's units (first-order for ratios: mean, variance).
    """
    lay = plan.layout
    vec = decode_query_vector(total)
    s = plan.noise_std_units * math.sqrt(n_shares / plan.n_honest) if plan.mode == "dp" else 0.0
    idx = {b.name: i for i, b in enumerate(lay.blocks)}
    rows: list[QueryRow] = []
    for g, group in enumerate(lay.groups):
        def block(name: str) -> np.ndarray:
            i = idx[name]
            o = lay.offset(g, i)
            return vec[o:o + lay.blocks[i].width] * lay.blocks[i].scale

        n_rows = float(block("rows")[0])
        small = n_rows < min_group_size
        for st in query.statistics:
            c = st.column
            if small:
                rows.append(QueryRow(group, st.kind, c, None, None, suppressed=True))
                continue
            if st.kind == "count":
                rows.append(QueryRow(group, "count", None, n_rows, s))
            elif st.kind == "sum":
                b = lay.blocks[idx[f"sum:{c}"]]
                n = float(block(f"n:{c}")[0])
                rows.append(QueryRow(group, "sum", c, float(block(f"sum:{c}")[0]) + b.center * n, math.hypot(s * b.scale, s * b.center)))
            elif st.kind in ("mean", "variance"):
                n = float(block(f"n:{c}")[0])
                sm = float(block(f"sum:{c}")[0])  # centred: sum of x - center
                center = lay.blocks[idx[f"sum:{c}"]].center
                sd_sum = s * lay.blocks[idx[f"sum:{c}"]].scale
                if n < max(min_group_size, 2):
                    rows.append(QueryRow(group, st.kind, c, None, None, suppressed=True))
                    continue
                mean = sm / n
                if st.kind == "mean":
                    std = math.sqrt(sd_sum**2 + (mean * s) ** 2) / n
                    rows.append(QueryRow(group, "mean", c, center + mean, std))
                else:
                    sq = float(block(f"sumsq:{c}")[0])
                    sd_sq = s * lay.blocks[idx[f"sumsq:{c}"]].scale
                    var = max((sq - sm * sm / n) / (n - 1), 0.0)
                    # First-order (delta method) std of var = (sq - sm^2/n) / (n - 1).
                    d_sq, d_sm = 1.0 / (n - 1), -2.0 * sm / (n * (n - 1))
                    d_n = (sm * sm / (n * n)) / (n - 1) - (sq - sm * sm / n) / (n - 1) ** 2
                    std = math.sqrt((d_sq * sd_sq) ** 2 + (d_sm * sd_sum) ** 2 + (d_n * s) ** 2)
                    rows.append(QueryRow(group, "variance", c, var, std))
            else:
                hb = lay.blocks[idx[f"hist:{c}:levels"] if f"hist:{c}:levels" in idx else idx[f"hist:{c}:{st.bins}"]]
                counts = block(hb.name)
                if st.kind == "histogram":
                    extra = {"levels": list(hb.levels)} if hb.levels else {"edges": hb.edges()}
                    rows.append(QueryRow(group, "histogram", c, [float(x) for x in counts], s, extra=extra))
                else:
                    qv = _quantiles(counts, hb.edges(), list(st.quantiles))
                    rows.append(QueryRow(group, "quantiles", c, qv, s, extra={"quantiles": list(st.quantiles), "bins": st.bins,
                                                                             "noise": "std of each histogram count"}))
    return rows


__all__ = [
    "Block",
    "Layout",
    "QUERY_BITS",
    "QueryPlan",
    "QueryRow",
    "RESOLUTION",
    "decode_query_vector",
    "encode_query_vector",
    "group_levels",
    "honest_minimum",
    "plan_query",
    "query_layout",
    "query_result",
    "query_zcdp",
    "rho_for",
    "smallest_scale",
]
