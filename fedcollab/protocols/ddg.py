"""The distributed discrete Gaussian (DDG) mechanism as pure functions.

Kairouz, Liu & Steinke 2021, "The Distributed Discrete Gaussian Mechanism for Federated Learning
with Secure Aggregation" (ICML; arXiv 2102.06387, Algorithm 1 and Theorem 1), with the discrete
Gaussian sampler of Canonne, Kamath & Steinke 2020 ("The Discrete Gaussian for Differential
Privacy", Algorithm 3: rejection from a discrete Laplace).

Node side (:func:`ddg_encode`): clip to L2 norm ``C``, scale by ``1/gamma``, randomised rounding
conditioned on the rounded norm (bound from :func:`ddg_norm_bound`), add discrete Gaussian
noise of variance ``sigma_share^2 = (sigma_total / gamma)^2 / n_noise_shares`` and map modulo
``2^bits``. The sum under secure aggregation carries at least ``n_noise_shares`` honest shares,
so the coordinator sees the sum of clipped, rounded vectors plus noise of variance at least
``sigma_total^2`` (real units). :func:`ddg_decode` reads the modular sum back.

Accounting (:func:`ddg_zcdp`) returns a ``ZCDPMechanism`` for the accounting core.
Wrap-around (:func:`wraparound_probability`, :func:`check_wraparound`) bounds the chance that a
coordinate of the modular sum leaves the signed range. :func:`check_honest_minimum` makes a node
refuse when fewer parties remain than the noise was sized for.

Not done here: the random rotation (Walsh-Hadamard) of KLS21 Algorithm 1 is skipped, so
the per-coordinate bound used for wrap-around is the worst case (the whole L2 bound on one
coordinate); that is safe, only pessimistic. Randomness is passed in explicitly: in a run it
is :func:`ddg_generator` (``os.urandom``, a CSPRNG); tests may pass a seeded numpy ``Generator``.
The Bernoulli probabilities are float64, so the sampler is exact up to float64 rounding of
``exp`` (not the rational-arithmetic version of CKS20).
"""

from __future__ import annotations

import math
import os

import numpy as np

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import ZCDPMechanism
from fedcollab.protocols.quantize import (
    _positive_finite,
    _positive_int,
    clip_vector,
    dtype_for,
)

_SIGNED: dict[int, type[np.signedinteger]] = {32: np.int32, 64: np.int64}
_MAX_ROUNDING_TRIES = 1000


class SystemRandomSource:
    """Uniform and geometric draws straight from the operating system's CSPRNG (``os.urandom``).

    The sampler only needs ``random(n)`` (uniform in [0, 1) with 53 random bits) and
    ``geometric(p, n)`` (support 1, 2, ..., by inversion of a uniform), so noise shares come
    from a cryptographic generator without writing one. A numpy ``Generator`` has the same two
    methods and stays accepted for reproducible tests.
    """

    def random(self, n: int) -> np.ndarray:
        """``n`` uniforms in [0, 1), 53 bits each."""
        raw = np.frombuffer(os.urandom(8 * int(n)), dtype=np.uint64)
        return (raw >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)

    def geometric(self, p: float, n: int) -> np.ndarray:
        """``n`` geometric draws (number of Bernoulli(p) trials up to the first success)."""
        u = 1.0 - self.random(n)  # in (0, 1]
        return (np.floor(np.log(u) / math.log1p(-p)) + 1.0).astype(np.int64)


def ddg_generator() -> SystemRandomSource:
    """The randomness source for noise shares: :class:`SystemRandomSource` (``os.urandom``)."""
    return SystemRandomSource()


def _check_generator(generator: object) -> np.random.Generator | SystemRandomSource:
    if not isinstance(generator, np.random.Generator | SystemRandomSource):
        raise ProtocolError(
            "an explicit `generator` (ddg_generator(), or a numpy Generator in tests) is required; "
            f"got {type(generator).__name__}."
        )
    return generator


def _beta(beta: object) -> float:
    ok = not isinstance(beta, bool) and isinstance(beta, (int, float, np.integer, np.floating))
    b = float(beta) if ok else math.nan
    if not 0.0 <= b < 1.0:
        raise ProtocolError(f"`beta` must be in [0, 1), got {beta!r}.")
    return b


def sample_discrete_gaussian(sigma2: float, size: int, *, generator: np.random.Generator | SystemRandomSource) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian ``N_Z(0, sigma2)``, as int64.

    ``P(X = x) ∝ exp(-x^2 / (2 sigma2))`` on the integers (CKS20, Definition 1). Algorithm 3 of
    CKS20, vectorised: with ``t = floor(sigma) + 1`` draw ``Y`` from the discrete Laplace
    ``P(Y = y) ∝ exp(-|y| / t)`` (the difference of two geometric variables) and accept it with
    probability ``exp(-(|Y| - sigma2 / t)^2 / (2 sigma2))``. ``sigma2`` is the scale parameter;
    the variance is below ``sigma2`` and indistinguishable from it for ``sigma2 >= 1`` (CKS20).
    """
    s2 = _positive_finite("sigma2", sigma2)
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 0:
        raise ProtocolError(f"`size` must be an int >= 0, got {size!r}.")
    gen = _check_generator(generator)
    n = int(size)
    sigma = math.sqrt(s2)
    t = math.floor(sigma) + 1
    p = -math.expm1(-1.0 / t)  # success probability of each geometric: 1 - exp(-1/t)
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        need = n - filled
        m = max(2 * need + 64, 1024)
        y = (gen.geometric(p, m) - gen.geometric(p, m)).astype(np.int64)
        a = np.abs(y).astype(np.float64)
        keep = gen.random(m) < np.exp(-((a - s2 / t) ** 2) / (2.0 * s2))
        acc = y[keep][:need]
        out[filled : filled + acc.size] = acc
        filled += acc.size
    return out


def ddg_norm_bound(*, clip_l2: float, gamma: float, beta: float, d: int) -> float:
    """L2 bound of a clipped, scaled and conditionally rounded vector, in integer units.

    With ``c = clip_l2 / gamma`` (KLS21 Theorem 1 / Algorithm 1)::

        min( c + sqrt(d),  sqrt(c^2 + d/4 + sqrt(2 log(1/beta)) * (c + sqrt(d)/2)) )

    The first term always holds (each coordinate moves by < 1); the second is the conditional
    rounding bound, used only when ``beta > 0``. The real-unit bound is this times ``gamma``
    (at most ``clip_l2 + sqrt(d) * gamma``, the re-clip bound of the issue).
    """
    c = _positive_finite("clip_l2", clip_l2) / _positive_finite("gamma", gamma)
    b = _beta(beta)
    dim = _positive_int("d", d)
    bound_1 = c + math.sqrt(dim)
    if b == 0.0:
        return bound_1
    bound_2 = math.sqrt(c * c + dim / 4.0 + math.sqrt(2.0 * math.log(1.0 / b)) * (c + math.sqrt(dim) / 2.0))
    return min(bound_1, bound_2)


def _share_sigma2(sigma_total: float, gamma: float, n_noise_shares: int) -> float:
    """Per-share discrete Gaussian parameter in integer units: ``(sigma_total / gamma)^2 / n``."""
    s = _positive_finite("sigma_total", sigma_total) / _positive_finite("gamma", gamma)
    return s * s / _positive_int("n_noise_shares", n_noise_shares)


def _squared_norm(v: np.ndarray) -> int:
    """Exact squared L2 norm of an int64 vector (Python ints when int64 could overflow)."""
    top = int(np.max(np.abs(v))) if v.size else 0
    if top * top * v.size < 2**62:
        return int(np.dot(v, v))
    return sum(int(a) * int(a) for a in v.tolist())


def ddg_encode(
    x: np.ndarray,
    *,
    clip_l2: float,
    gamma: float,
    beta: float,
    n_noise_shares: int,
    sigma_total: float,
    bits: int = 32,
    generator: np.random.Generator | SystemRandomSource,
    n_parties: int | None = None,
    wrap_limit: float = 1e-9,
) -> np.ndarray:
    """Node side of KLS21 Algorithm 1 (without the rotation): a noised vector modulo ``2^bits``.

    Parameters
    ----------
    x : array of float
        1-D, finite; clipped to L2 norm ``clip_l2``.
    gamma : float
        Granularity (``1 / scale``).
    beta : float
        Conditional rounding bias bound in [0, 1), e.g. ``exp(-0.5)``: the rounding is redrawn
        until the rounded norm is within :func:`ddg_norm_bound`.
    n_noise_shares : int
        How many honest shares the noise is sized for: ``t_min - colluders``.
    sigma_total : float
        Std of the summed noise of ``n_noise_shares`` shares, in the units of ``x``.
    n_parties : int, optional
        How many vectors will be summed; when given, :func:`check_wraparound` runs first with
        ``wrap_limit``. The caller must run it otherwise.

    Returns
    -------
    array of uint32 (bits = 32) or uint64 (bits = 64)
    """
    gen = _check_generator(generator)
    dtype_for(bits)
    arr = clip_vector(x, bound=clip_l2, norm="l2")
    d = arr.size
    if d == 0:
        raise ProtocolError("the vector must be non-empty.")
    bound = ddg_norm_bound(clip_l2=clip_l2, gamma=gamma, beta=beta, d=d)
    s2 = _share_sigma2(sigma_total, gamma, n_noise_shares)
    if n_parties is not None:
        check_wraparound(
            d=d,
            n=_positive_int("n_parties", n_parties),
            max_abs_per_party=math.floor(bound),
            sigma_share=math.sqrt(s2),
            bits=bits,
            limit=wrap_limit,
        )
    v = arr / float(gamma)
    low = np.floor(v)
    frac = v - low
    for _ in range(_MAX_ROUNDING_TRIES):
        rounded = (low + (gen.random(d) < frac)).astype(np.int64)
        if _squared_norm(rounded) <= bound * bound:
            break
    else:  # probability <= beta ** tries
        raise ProtocolError(f"conditional rounding failed {_MAX_ROUNDING_TRIES} times; check `beta` and `gamma`.")
    z = rounded + sample_discrete_gaussian(s2, d, generator=gen)
    if bits == 32:
        return (z & 0xFFFFFFFF).astype(np.uint32)
    return z.view(np.uint64).copy()


def ddg_decode(total: np.ndarray, *, gamma: float, bits: int = 32) -> np.ndarray:
    """Coordinator side: the modular sum read as signed integers, times ``gamma``."""
    g = _positive_finite("gamma", gamma)
    dt = dtype_for(bits)
    arr = np.asarray(total)
    if arr.dtype != dt or arr.ndim != 1:
        raise ProtocolError(f"expected a 1-D {dt} vector for bits = {bits}, got {arr.dtype} with shape {arr.shape}.")
    return arr.view(_SIGNED[bits]).astype(np.float64) * g


def ddg_tau(sigma_share2: float, n: int) -> float:
    """KLS21's ``tau = 10 * sum_{k=1}^{n-1} exp(-2 pi^2 sigma^2 k / (k + 1))`` (integer units).

    It bounds how far the sum of ``n`` discrete Gaussians of parameter ``sigma^2`` is from one of
    parameter ``n sigma^2`` (zero for ``n = 1``).
    """
    s2 = _positive_finite("sigma_share2", sigma_share2)
    count = _positive_int("n", n)
    return 10.0 * sum(math.exp(-2.0 * math.pi**2 * s2 * k / (k + 1)) for k in range(1, count))


def ddg_zcdp(
    *,
    clip_l2: float,
    gamma: float,
    beta: float,
    d: int,
    sigma_total: float,
    n_honest: int,
    releases: int = 1,
) -> ZCDPMechanism:
    """The zCDP event of one DDG sum (add/remove or zero-out of one party's vector).

    In integer units, with ``Δ2 = ddg_norm_bound(...)``, ``Δ1 = Δ2 * min(sqrt(d), Δ2)``
    (an integer vector has L1 <= L2^2), ``s = sigma_total / gamma`` (std of the ``n_honest``
    honest shares summed) and ``tau = ddg_tau(s^2 / n_honest, n_honest)``, KLS21 Theorem 1 gives
    Rényi divergences of order ``alpha`` at most the minimum of

    * ``alpha/2 * Δ2^2/s^2 + tau*d``
    * ``alpha/2 * (Δ2^2/s^2 + 2*Δ1*tau/s + tau^2*d)``
    * ``alpha/2 * (Δ2/s + tau*sqrt(d))^2``

    (the form used by the authors' accounting code, google-research/federated
    ``distributed_dp``; the theorem number is from the arXiv version and not re-checked against
    the ICML text). The first is ``<= alpha * (Δ2^2/(2 s^2) + tau*d)`` for every ``alpha >= 1``,
    so the mechanism is ``rho``-zCDP with::

        rho = min(Δ2^2/(2 s^2) + tau*d, (Δ2^2/s^2 + 2*Δ1*tau/s + tau^2*d)/2, (Δ2/s + tau*sqrt(d))^2/2)

    With ``tau`` negligible this is the Gaussian mechanism's ``Δ^2 / (2 sigma^2)``. Colluders'
    noise is known to them, so only ``n_honest = t_min - colluders`` shares count; more honest
    shares only add independent noise (post-processing).
    """
    delta2 = ddg_norm_bound(clip_l2=clip_l2, gamma=gamma, beta=beta, d=d)
    n = _positive_int("n_honest", n_honest)
    s = _positive_finite("sigma_total", sigma_total) / _positive_finite("gamma", gamma)
    delta1 = delta2 * min(math.sqrt(d), delta2)
    tau = ddg_tau(s * s / n, n)
    l2 = delta2 / s
    l1 = delta1 / s
    rho = min(
        l2 * l2 / 2.0 + tau * d,
        (l2 * l2 + 2.0 * l1 * tau + tau * tau * d) / 2.0,
        (l2 + tau * math.sqrt(d)) ** 2 / 2.0,
    )
    return ZCDPMechanism(rho=float(rho), releases=_positive_int("releases", releases))


def wraparound_probability(*, d: int, n: int, max_abs_per_party: float, sigma_share: float, bits: int) -> float:
    """Upper bound on P(some coordinate of the sum of ``n`` encoded vectors leaves the signed range).

    All in integer units: each party's rounded coordinate is at most ``max_abs_per_party`` in
    magnitude (``floor(ddg_norm_bound(...))`` without rotation) and carries a discrete Gaussian of
    parameter ``sigma_share^2``. The discrete Gaussian is sub-Gaussian with the same parameter
    (CKS20: ``E[exp(tX)] <= exp(t^2 sigma^2 / 2)``), so the noise sum ``Z`` of ``n`` shares has
    ``P(|Z| >= t) <= 2 exp(-t^2 / (2 n sigma_share^2))``. A coordinate wraps only if
    ``|Z| >= 2^(bits-1) - n * max_abs_per_party``; a union bound over the ``d`` coordinates gives
    the result (1 when there is no headroom at all).
    """
    dim = _positive_int("d", d)
    count = _positive_int("n", n)
    m = max_abs_per_party
    ok = not isinstance(m, bool) and isinstance(m, (int, float, np.integer, np.floating))
    m = float(m) if ok else math.nan
    if not (math.isfinite(m) and m >= 0):
        raise ProtocolError(f"`max_abs_per_party` must be finite and >= 0, got {max_abs_per_party!r}.")
    s = _positive_finite("sigma_share", sigma_share)
    dtype_for(bits)
    headroom = 2.0 ** (bits - 1) - count * m
    if headroom <= 0:
        return 1.0
    log_p = math.log(2.0 * dim) - headroom * headroom / (2.0 * count * s * s)
    return math.exp(log_p) if log_p < 0 else 1.0


def check_wraparound(
    *, d: int, n: int, max_abs_per_party: float, sigma_share: float, bits: int, limit: float = 1e-9
) -> float:
    """:func:`wraparound_probability`, raising :class:`ProtocolError` when it exceeds ``limit``.

    Returns the bound, to be recorded with the round.
    """
    lim = _positive_finite("limit", limit)
    p = wraparound_probability(d=d, n=n, max_abs_per_party=max_abs_per_party, sigma_share=sigma_share, bits=bits)
    if p > lim:
        raise ProtocolError(
            f"wrap-around probability bound {p:.3g} exceeds {lim:g} modulo 2^{bits} "
            f"(d = {d}, n = {n}, max|x| = {max_abs_per_party:g}, sigma_share = {sigma_share:g}); "
            "use a coarser gamma, fewer parties, or bits = 64."
        )
    return p


def check_honest_minimum(received: int, t_min: int, colluders: int) -> int:
    """Refuse (``ProtocolError``) when fewer honest shares remain than the noise was sized for.

    The noise is sized for ``t_min - colluders`` honest shares; with ``received`` parties still
    in the round, at worst ``received - colluders`` are honest. A node calls this before
    releasing its masked vector. Returns the number of honest shares the noise was sized for.
    """
    for name, value in (("received", received), ("t_min", t_min), ("colluders", colluders)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ProtocolError(f"`{name}` must be an int >= 0, got {value!r}.")
    sized_for = int(t_min) - int(colluders)
    if sized_for < 1:
        raise ProtocolError(f"t_min = {t_min} with {colluders} colluders leaves no honest share to carry the noise.")
    honest = int(received) - int(colluders)
    if honest < sized_for:
        raise ProtocolError(
            f"only {received} parties remain ({honest} honest at worst with {colluders} colluders); "
            f"the noise was sized for {sized_for} honest shares (t_min = {t_min}): refusing to release."
        )
    return sized_for
