"""The budget gate: every release a node makes passes here before it leaves.

Order (dp-accounting's ``compose``: check, then record, then release): (1) check the policy and
whether the release would exceed the dataset's budget, composed with everything in the node's
on-disk ledger; (2) append the signed entry; (3) only then may the caller send the release.
A refusal is recorded too, and raises before anything is sent.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from fedcollab.core import BudgetExhausted, PolicyRefused
from fedcollab.privacy.accounting._events import Release
from fedcollab.privacy.accounting._ledger import (
    PartyLedger,
    claim,
    commitment,
    counts_toward_budget,
    keep_nonce,
    release_bodies,
    spent,
)
from fedcollab.spec import NodePolicy

#: Relative slack when comparing a spend with its budget (accountant round-off).
BUDGET_RTOL = 1e-9


class BudgetGate:
    """Checks and records one party's releases about one dataset."""

    def __init__(self, ledger: PartyLedger, policy: NodePolicy, *, dataset: str, nonce_path: str | Path) -> None:
        self.ledger = ledger
        self.policy = policy
        self.dataset = dataset
        self.nonce_path = Path(nonce_path)

    def _history(self, unit: str, observer: str) -> list[tuple[str, Release]]:
        out = []
        for ln, r in release_bodies(self.ledger.lines(), self.ledger.party):
            body = ln.entry["body"]
            if body["dataset"] == self.dataset and r.unit == unit and r.observer == observer:
                out.append((str(ln.entry["run_id"]), r))
        return out

    def would_spend(self, release: Release, *, run_id: str) -> tuple[float, float, dict[str, float] | None]:
        """(epsilon of this run, epsilon over all runs, budget) if ``release`` were made."""
        budget = self.policy.budget(self.dataset, release.unit)
        delta = budget.delta if budget else 1e-5
        accountant = budget.accountant if budget else "rdp"
        hist = self._history(release.unit, release.observer)
        total = spent([r for _, r in hist] + [release], delta=delta, accountant=accountant)
        run = spent([r for rid, r in hist if rid == run_id] + [release], delta=delta, accountant=accountant)
        return run, total, ({"epsilon": budget.epsilon, "delta": budget.delta} if budget else None)

    def would_spend_all(self, releases: list[Release], *, run_id: str) -> dict[tuple[str, str], tuple[float, float, float, dict[str, float] | None]]:
        """A run's planned releases composed with the ledger, per (unit, observer).

        Returns ``(unit, observer) -> (epsilon of this run, epsilon spent so far, epsilon over all
        runs, budget)`` for every group with a counted release; nothing is recorded (a preflight).
        """
        out: dict[tuple[str, str], tuple[float, float, float, dict[str, float] | None]] = {}
        for unit, observer in sorted({(r.unit, r.observer) for r in releases if counts_toward_budget(r)}):
            budget = self.policy.budget(self.dataset, unit)
            delta = budget.delta if budget else 1e-5
            accountant = budget.accountant if budget else "rdp"
            planned = [r for r in releases if (r.unit, r.observer) == (unit, observer)]
            hist = self._history(unit, observer)
            so_far = spent([r for _, r in hist], delta=delta, accountant=accountant)
            total = spent([r for _, r in hist] + planned, delta=delta, accountant=accountant)
            run = spent([r for rid, r in hist if rid == run_id] + planned, delta=delta, accountant=accountant)
            out[(unit, observer)] = (run, so_far, total, {"epsilon": budget.epsilon, "delta": budget.delta} if budget else None)
        return out

    def _refuse(self, release: Release, *, run_id: str, code: int, reason: str, would_be: float | None, budget: dict | None) -> None:
        self.ledger.append(
            kind="refusal",
            run_id=run_id,
            round=release.round,
            body={"dataset": self.dataset, "release": release.model_dump(mode="json"), "code": code, "reason": reason,
                  "would_be_epsilon": would_be, "budget": budget},
        )

    def refuse_request(self, *, run_id: str, round: int, code: int, reason: str) -> bytes:
        """Record a refused request that is not a release (a policy violation at setup)."""
        return self.ledger.append(kind="refusal", run_id=run_id, round=round, body={"dataset": self.dataset, "code": code, "reason": reason})

    def record(self, release: Release, *, run_id: str, payload: bytes) -> bytes:
        """Check, then append the signed entry; returns the ledger line to send with the release.

        Raises
        ------
        PolicyRefused, BudgetExhausted
            After recording the refusal; nothing may be sent.
        """
        from fedcollab.core import NodeErrorCode

        if release.about == "test" and self.policy.resolved_test_metrics == "off":
            self._refuse(release, run_id=run_id, code=int(NodeErrorCode.POLICY_REFUSED), reason="test metrics are off (policy test_metrics)",
                         would_be=None, budget=None)
            raise PolicyRefused("the policy releases no test metrics (test_metrics = 'off')")
        if release.non_private and release.about == "test" and self.policy.resolved_test_metrics != "public":
            self._refuse(release, run_id=run_id, code=int(NodeErrorCode.POLICY_REFUSED), reason="non-private test metrics not allowed",
                         would_be=None, budget=None)
            raise PolicyRefused("the policy forbids non-private test metrics")
        counted = counts_toward_budget(release)
        eps_run = eps_total = 0.0
        budget = None
        if counted:
            eps_run, eps_total, budget = self.would_spend(release, run_id=run_id)
            if release.non_private and not self.policy.allow_non_private_training:
                self._refuse(release, run_id=run_id, code=int(NodeErrorCode.POLICY_REFUSED), reason="non-private release about training rows",
                             would_be=None, budget=budget)
                raise PolicyRefused("the policy forbids non-private releases about training rows")
            if release.non_private and budget is not None:
                # Infinite epsilon exceeds any budget: non-private training is only for unbudgeted data.
                self._refuse(release, run_id=run_id, code=int(NodeErrorCode.BUDGET_EXHAUSTED), reason="a non-private release exceeds any budget",
                             would_be=None, budget=budget)
                raise BudgetExhausted(f"a non-private release about {self.dataset!r} would exceed its budget")
            if not release.non_private:
                if budget is None:
                    self._refuse(release, run_id=run_id, code=int(NodeErrorCode.BUDGET_EXHAUSTED), reason="no budget for this dataset and unit",
                                 would_be=eps_total, budget=None)
                    raise BudgetExhausted(f"no budget for dataset {self.dataset!r} and unit {release.unit!r}")
                if eps_total > budget["epsilon"] * (1 + BUDGET_RTOL):
                    self._refuse(release, run_id=run_id, code=int(NodeErrorCode.BUDGET_EXHAUSTED), reason="budget would be exceeded",
                                 would_be=eps_total, budget=budget)
                    raise BudgetExhausted(f"epsilon would reach {eps_total:.4g} > budget {budget['epsilon']:.4g}")
        nonce = secrets.token_bytes(32)
        c = commitment(nonce, payload)
        bud = self.policy.budget(self.dataset, release.unit)
        body = {
            "dataset": self.dataset,
            "release": release.model_dump(mode="json"),
            "non_private": release.non_private,
            "counted": counted,
            "claim": claim(eps_run, eps_total, delta=bud.delta if bud else 1e-5, accountant=bud.accountant if bud else "rdp") if counted else None,
            "budget": budget if counted else None,
            "commitment": c,
        }
        line = self.ledger.append(kind="release", run_id=run_id, round=release.round, body=body)
        self._keep_nonce(c, nonce)
        return line

    def _keep_nonce(self, c: str, nonce: bytes) -> None:
        # The nonce stays at the node: with it the partner can open a commitment to an auditor.
        keep_nonce(self.nonce_path, c, nonce)
