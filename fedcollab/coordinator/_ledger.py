"""The coordinator's run ledger: node entries verbatim, chained by signed receipts, then a close.

Node entries are checked against the roster (never against keys a node sends), appended as
received, and after each batch the coordinator appends a ``receipt`` entry listing their hashes
in arrival order. ``close`` lists every party's chain head; each node then countersigns it, so
deleting any entry, the last one included, is detected by ``fedcollab audit verify``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedcollab.core import ProtocolError
from fedcollab.privacy.accounting import PartyLedger, Release, parse_lines, verify_signature
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

    def close(self, round: int) -> bytes:
        """Append the close entry listing every party's chain head."""
        return self.own.append(kind="close", run_id=self.run_id, round=round, body={"heads": dict(sorted(self.heads.items()))})
