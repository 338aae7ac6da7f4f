"""A membership-inference check: how well a loss-threshold attacker does, against what DP allows.

Numpy only. Given the trained model's per-example losses on training rows (members) and on
held-out rows (non-members), the attacker of Yeom et al. (2018) guesses "member" when the loss is
at most a threshold. This module reports that attack's AUC and best advantage (TPR − FPR), and
the largest advantage any attacker can have against an (ε, δ)-DP training run:

    advantage ≤ (e^ε − 1 + 2δ) / (e^ε + 1)

It follows from the (ε, δ) hypothesis-testing region, TPR ≤ e^ε FPR + δ and
1 − FPR ≤ e^ε (1 − TPR) + δ (Kairouz, Oh & Viswanath 2015, Theorem 2.1), maximised at their
intersection; it is the bound used for membership inference by Humphries et al. (2023), and for
δ = 0 it tightens Yeom et al.'s (2018) e^ε − 1.

Limits: one trained model is one draw of the training randomness; the best threshold is chosen on
the same rows it is scored on (optimistic, so the check also reports a DKW lower confidence bound);
the bound assumes the members were a random subset of the rows. A low advantage shows this attack
failed, not that every attack would.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from fedcollab.core import PrivacyError
from fedcollab.privacy.accounting import check_delta, check_epsilon


def advantage_bound(*, epsilon: float, delta: float) -> float:
    """Largest membership advantage (TPR − FPR) under (ε, δ)-DP: (e^ε − 1 + 2δ) / (e^ε + 1)."""
    if math.isinf(epsilon):
        return 1.0
    # (e^eps - 1 + 2 delta) / (e^eps + 1) = tanh(eps / 2) + 2 delta / (e^eps + 1), stable for large eps.
    return min(1.0, math.tanh(epsilon / 2.0) + 2.0 * delta / (math.exp(min(epsilon, 700.0)) + 1.0))


@dataclass(frozen=True)
class MiaResult:
    """What the loss-threshold attack achieved, and what DP allows.

    ``advantage_lower`` is a lower confidence bound on the attack's true best advantage
    (Dvoretzky–Kiefer–Wolfowitz inequality with Massart's constant, on each group's loss
    distribution); ``exceeds_bound`` is True only when even that lower bound is above the DP bound.
    """

    members: int
    non_members: int
    auc: float
    advantage: float
    advantage_lower: float
    threshold: float
    tpr: float
    fpr: float
    epsilon: float | None
    delta: float | None
    bound: float | None
    exceeds_bound: bool
    summary: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (infinities as ``None``)."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in asdict(self).items()}


def _losses(name: str, values: Any) -> np.ndarray:
    arr = np.asarray(values, dtype=float).ravel()
    if arr.size == 0:
        raise PrivacyError(f"`{name}` must hold at least one loss, got an empty array.")
    if not np.all(np.isfinite(arr)):
        raise PrivacyError(f"`{name}` must be finite losses, got {int((~np.isfinite(arr)).sum())} NaN or inf values.")
    return arr


def _auc(members: np.ndarray, non_members: np.ndarray) -> float:
    """P(non-member loss > member loss) + P(tie) / 2, i.e. the AUC of the score −loss."""
    nm = np.sort(non_members)
    greater = len(nm) - np.searchsorted(nm, members, side="right")
    ties = np.searchsorted(nm, members, side="right") - np.searchsorted(nm, members, side="left")
    return float((greater.sum() + 0.5 * ties.sum()) / (len(members) * len(nm)))


def membership_inference_check(
    member_losses: Any,
    non_member_losses: Any,
    *,
    epsilon: float | None = None,
    delta: float | None = None,
    confidence: float = 0.95,
) -> MiaResult:
    """Run the loss-threshold attack and compare it with the (ε, δ) bound.

    Parameters
    ----------
    member_losses, non_member_losses : array-like
        Per-example losses of the trained model on training rows and on held-out rows.
    epsilon, delta : float, optional
        The guarantee of the training run (record level); without them no bound is reported.
    confidence : float
        Confidence of ``advantage_lower``.
    """
    mem = _losses("member_losses", member_losses)
    non = _losses("non_member_losses", non_member_losses)
    if not 0.5 <= confidence < 1.0:
        raise PrivacyError(f"`confidence` must be in [0.5, 1), got {confidence!r}.")
    bound: float | None = None
    if epsilon is not None or delta is not None:
        if epsilon is None or delta is None:
            raise PrivacyError("give both `epsilon` and `delta` for the DP bound, or neither.")
        epsilon = math.inf if epsilon == math.inf else check_epsilon(epsilon)
        delta = check_delta(delta, allow_zero=True)
        bound = advantage_bound(epsilon=epsilon, delta=delta)

    # Guess "member" when loss <= t; t over every observed loss (and below all: advantage 0).
    ms, ns = np.sort(mem), np.sort(non)
    thresholds = np.unique(np.concatenate([ms, ns]))
    tpr = np.searchsorted(ms, thresholds, side="right") / len(ms)
    fpr = np.searchsorted(ns, thresholds, side="right") / len(ns)
    gap = tpr - fpr
    i = int(np.argmax(gap))
    if gap[i] > 0:
        advantage, threshold, best_tpr, best_fpr = float(gap[i]), float(thresholds[i]), float(tpr[i]), float(fpr[i])
    else:  # no threshold beats guessing "non-member" for everyone
        advantage, threshold, best_tpr, best_fpr = 0.0, -math.inf, 0.0, 0.0
    # DKW (Massart 1990): sup_t |F_n(t) - F(t)| <= sqrt(ln(2 / a) / (2 n)) w.p. 1 - a, for each group.
    a = (1.0 - confidence) / 2.0
    slack = math.sqrt(math.log(2.0 / a) / (2 * len(ms))) + math.sqrt(math.log(2.0 / a) / (2 * len(ns)))
    lower = max(0.0, advantage - slack)
    auc = _auc(mem, non)
    exceeds = bound is not None and lower > bound

    accuracy = (1.0 + advantage) / 2.0
    summary = (
        f"An attacker guessing membership from the model's loss is right {accuracy:.1%} of the time on a "
        f"50/50 guess (a coin flip: 50%): an advantage (TPR - FPR) of {advantage:.2f}, AUC {auc:.2f}"
    )
    if bound is not None:
        summary += f"; the DP guarantee (epsilon {epsilon:.3g}, delta {delta:.3g}) caps the advantage at {bound:.2f}"
        if exceeds:
            summary += f", and even the cautious estimate {lower:.2f} is above it: the guarantee does not hold as claimed."
        else:
            summary += "."
    else:
        summary += "."
    return MiaResult(
        members=len(ms),
        non_members=len(ns),
        auc=auc,
        advantage=advantage,
        advantage_lower=lower,
        threshold=threshold,
        tpr=best_tpr,
        fpr=best_fpr,
        epsilon=epsilon,
        delta=delta,
        bound=bound,
        exceeds_bound=exceeds,
        summary=summary,
    )
