"""The coordinator's run ledger: node entries verbatim, chained by signed receipts, then a close.

Node entries are checked against the roster (never against keys a node sends), appended as
received, and after each batch the coordinator appends a ``receipt`` entry listing their hashes
in arrival order. ``close`` lists every party's chain head; each node then countersigns it, so
deleting any entry, the last one included, is detected by ``fedcollab audit verify``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import (
    PartyLedger,
    Release,
    claim,
    commitment,
    keep_nonce,
    parse_lines,
    release_bodies,
    spent,
    verify_signature,
)
from fedcollab.spec import Roster

COORDINATOR = "coordinator"


class RunLedger:
    """Append-only run ledger kept by the coordinator."""

    def __init__(self, path: str | Path, *, key: Ed25519PrivateKey, roster: Roster, run_id: str) -> None:
        self.path = Path(path)
        self.own = PartyLedger(self.path, party=COORDINATOR, key=key)
        self.roster = roster
        self.run_id = run_id
        self.heads: dict[str, str] = {}
        self.releases: list[Release] = []

    def accept(self, lines: list[str], *, party: str, round: int) -> None:
        """Verify ``party``'s entries, append them and a receipt; raises ProtocolError on any doubt."""
        entry_key = self.roster.parties.get(party)
        if entry_key is None:
            raise ProtocolError(f"{party!r} is not in the roster")
        parsed = []
        for text in lines:
            try:
                (ln,) = parse_lines(text.encode() + b"\n")
            except Exception as exc:  # noqa: BLE001 - any parse failure is a protocol error
                raise ProtocolError(f"{party}: malformed ledger entry") from exc
            e = ln.entry
            if e.get("party") != party or e.get("run_id") != self.run_id or not verify_signature(e, entry_key.signing_key):
                raise ProtocolError(f"{party}: a ledger entry not signed by {party} for this run")
            if e.get("kind") not in {"release", "refusal", "countersign", "key_custody"}:
                raise ProtocolError(f"{party}: unexpected ledger entry kind")
            parsed.append(ln)
        if not parsed:
            return
        with open(self.path, "ab") as fh:
            for ln in parsed:
                fh.write(ln.raw + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        for ln in parsed:
            self.heads[party] = ln.hash
            if ln.entry["kind"] == "release":
                self.releases.append(Release.model_validate(ln.entry["body"]["release"]))
        self.own.append(kind="receipt", run_id=self.run_id, round=round, body={"entries": [{"party": party, "hash": ln.hash} for ln in parsed]})

    def release(self, release: Release, *, dataset: str, delta: float, accountant: str, payload: bytes) -> bytes:
        """Record a release the coordinator itself makes (central DP noise it added), with its claim.

        The claim is recomputed over the coordinator's own entries for the same dataset, unit and
        observer, exactly as ``audit verify`` recomputes it. The nonce of the commitment is kept
        beside the ledger (mode 0600), like a node keeps its own.
        """
        import secrets

        hist = [r for ln, r in release_bodies(self.own.lines(), COORDINATOR)
                if ln.entry["body"]["dataset"] == dataset and r.unit == release.unit and r.observer == release.observer]
        eps = spent([*hist, release], delta=delta, accountant=accountant)
        nonce = secrets.token_bytes(32)
        c = commitment(nonce, payload)
        body = {"dataset": dataset, "release": release.model_dump(mode="json"), "non_private": release.non_private, "counted": True,
                "claim": claim(eps, eps, delta=delta, accountant=accountant), "budget": None, "commitment": c}
        line = self.own.append(kind="release", run_id=self.run_id, round=release.round, body=body)
        keep_nonce(self.path.parent / "coordinator-nonces.jsonl", c, nonce)
        self.releases.append(release)
        return line

    def aggregate(self, round: int, body: dict[str, object]) -> bytes:
        """Record how a round's aggregate was formed: participants, dropouts, threshold, effective noise."""
        return self.own.append(kind="aggregate", run_id=self.run_id, round=round, body=body)

    def close(self, round: int, *, partners: Sequence[str] | None = None) -> bytes:
        """Append the close entry listing every party's chain head and every partner of the run.

        ``partners`` (the spec's partners; default: every partner in the roster) are all listed,
        whether or not they sent entries: each must countersign, and a node refuses to
        countersign a close whose partner list is not its own spec's (``countersign_close``),
        so the coordinator cannot leave a partner out of the run's record.
        """
        return self.own.append(kind="close", run_id=self.run_id, round=round, body=close_body(self.heads, self.roster, partners))


    def abort(self, round: int, *, reason: str, exit_code: int, codes: dict[str, list[int]]) -> bytes:
        """Append a signed ``abort`` entry: the run ends without a close (it failed or was interrupted).

        It lists every party's chain head like a close (so entries removed after it are detected),
        the reason (an error class name and exit code, never exception text) and the partners'
        error codes. Nodes do not countersign it: an abort may come when they cannot answer.
        ``fedcollab audit verify`` reports a ledger ending so as aborted, not tampered.
        """
        body = {"reason": str(reason), "exit_code": int(exit_code),
                "codes": {str(k): [int(c) for c in v] for k, v in sorted(codes.items())},
                "heads": dict(sorted(self.heads.items()))}
        return self.own.append(kind="abort", run_id=self.run_id, round=round, body=body)


def close_body(heads: dict[str, str], roster: Roster, partners: Sequence[str] | None) -> dict[str, object]:
    """The close entry's body: ``heads`` of the parties with entries, ``partners`` = every partner of the run."""
    names = sorted(set(partners) if partners is not None else {n for n, e in roster.parties.items() if e.role == "partner"})
    unknown = sorted(set(names) - set(roster.parties))
    if unknown:
        raise ProtocolError(f"`partners` of the close must be roster parties, got {unknown} that are not")
    return {"heads": dict(sorted(heads.items())), "partners": names}
