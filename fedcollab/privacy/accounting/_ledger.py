"""The privacy ledger: signed, hash-chained JSON Lines of privacy events.

Every line is byte-identical to its canonical form (RFC 8785 JSON Canonicalization Scheme) and
carries ``schema_version``, the author ``party``, its position ``seq`` in the party's chain, the
SHA-256 ``prev`` of the party's previous line, the run id and round, a kind-specific ``body``
and the party's Ed25519 ``signature`` (lowercase hex) over the canonical form without it.

Kinds: ``release`` (a privacy event, recorded before the release leaves the party),
``refusal`` (a release refused by policy or budget), ``scoring`` (an encrypted-scoring request
answered or refused by a model holder, with the querier's row count and key fingerprint), ``receipt`` (the coordinator chains the
hashes of node entries in arrival order), ``close`` (the coordinator lists every party's chain
head), ``countersign`` (a node signs the close entry's hash). JSON Schema:
``schemas/ledger.schema.json``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedcollab.core import BudgetExhausted, ExitCode, FedcollabError, write_private
from fedcollab.privacy.accounting._accountant import accountant_version, compute_epsilon, merge_mechanisms
from fedcollab.privacy.accounting._events import Release

LEDGER_SCHEMA_VERSION = 1
GENESIS = "0" * 64
#: Encrypted scoring charges each answered row twice against the querier's row budget: a CKKS
#: slot is complex, and a querier that packs complex values gets ``w . Re(x) + b`` and
#: ``w . Im(x)``, two linear equations in the model, per row (issue 13, attack 7).
SCORING_CHARGE_PER_ROW = 2
EntryKind = Literal["release", "refusal", "receipt", "close", "countersign", "key_custody", "aggregate", "scoring", "abort"]


class LedgerError(FedcollabError):
    """A ledger line is unreadable, tampered, unsigned or out of chain."""

    exit_code = ExitCode.LEDGER_TAMPERED

    def __init__(self, message: str, *, line: int | None = None) -> None:
        self.line = line
        super().__init__(f"line {line}: {message}" if line is not None else message)


class LedgerRolledBack(BudgetExhausted):
    """A party's ledger file is shorter than, or diverges from, the head its anchor recorded.

    The budget rests on the ledger: a rolled-back file would hand back spent epsilon, so every
    release is refused (node code ``BUDGET_EXHAUSTED``; CLI exit 20, ``LEDGER_TAMPERED``).
    """

    exit_code = ExitCode.LEDGER_TAMPERED


def canonical(obj: Any) -> bytes:
    """RFC 8785 canonical JSON bytes."""
    import rfc8785

    return rfc8785.dumps(obj)


def keep_nonce(path: str | Path, commitment_hex: str, nonce: bytes) -> None:
    """Append ``{"commitment", "nonce"}`` to the party's own nonce file (mode 0600): with the nonce it can open the commitment to an auditor."""
    write_private(path, json.dumps({"commitment": commitment_hex, "nonce": nonce.hex()}).encode() + b"\n", mode="append")


def line_hash(line: bytes) -> str:
    """SHA-256 (hex) of a ledger line (without its newline)."""
    return hashlib.sha256(line).hexdigest()


def public_key_hex(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """Raw Ed25519 public key, lowercase hex."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def key_fingerprint(public_hex: str) -> str:
    """Short fingerprint of a public key: SHA-256 of its raw bytes, first 16 hex digits."""
    return hashlib.sha256(bytes.fromhex(public_hex)).hexdigest()[:16]


def commitment(nonce: bytes, payload: bytes) -> str:
    """Payload commitment SHA-256(32-byte nonce || payload), hex."""
    if len(nonce) != 32:
        raise ValueError("the commitment nonce must be 32 bytes")
    return hashlib.sha256(nonce + payload).hexdigest()


def sign_entry(entry: dict[str, Any], key: Ed25519PrivateKey) -> bytes:
    """The canonical line of ``entry`` with its signature added."""
    body = {k: v for k, v in entry.items() if k != "signature"}
    sig = key.sign(canonical(body)).hex()
    return canonical({**body, "signature": sig})


def verify_signature(entry: dict[str, Any], public_hex: str) -> bool:
    """Whether ``entry['signature']`` is ``public_hex``'s signature over the rest."""
    sig = entry.get("signature")
    if not isinstance(sig, str):
        return False
    try:
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(public_hex))
        pub.verify(bytes.fromhex(sig), canonical({k: v for k, v in entry.items() if k != "signature"}))
    except (InvalidSignature, ValueError):
        return False
    return True


@dataclass(frozen=True)
class LedgerLine:
    """One parsed line: its 1-based number, its bytes and its content."""

    number: int
    raw: bytes
    entry: dict[str, Any]

    @property
    def hash(self) -> str:
        """SHA-256 of the line."""
        return line_hash(self.raw)


def parse_lines(data: bytes) -> list[LedgerLine]:
    """Parse ledger bytes; every line must be canonical JSON (else :class:`LedgerError` naming it)."""
    out = []
    if data and not data.endswith(b"\n"):
        raise LedgerError("the ledger does not end with a newline (truncated?)", line=data.count(b"\n") + 1)
    for i, raw in enumerate(data.split(b"\n")[:-1] if data else [], start=1):
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LedgerError("not valid JSON", line=i) from None
        if not isinstance(entry, dict):
            raise LedgerError("not a JSON object", line=i)
        try:
            canon = canonical(entry)
        except Exception:  # noqa: BLE001 - rfc8785 raises its own types for odd numbers
            raise LedgerError("cannot be canonicalised", line=i) from None
        if canon != raw:
            raise LedgerError("not in canonical form (RFC 8785): altered", line=i)
        out.append(LedgerLine(i, raw, entry))
    return out


def read_ledger(path: str | Path) -> list[LedgerLine]:
    """Read and parse a ledger file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read {path}: {exc.strerror}") from None
    return parse_lines(data)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PartyLedger:
    """A party's own append-only chain on disk (the source of truth for its budget).

    Each append re-reads the file, so the budget never rests on run memory.
    """

    def __init__(self, path: str | Path, *, party: str, key: Ed25519PrivateKey, anchor_path: str | Path | None = None) -> None:
        self.path = Path(path)
        self.party = party
        self.key = key
        self.anchor_path = Path(anchor_path) if anchor_path is not None else None
        self._parsed: list[LedgerLine] = []
        self._parsed_bytes = 0
        self._parsed_digest = ""
        if self.anchor_path is not None:
            self.check_anchor()

    # --- the anchor: the chain head kept apart from the file, so truncation is detected ----------
    def read_anchor(self) -> tuple[int, str] | None:
        """(seq, hash) of the last entry the anchor recorded, or None when there is no anchor file."""
        if self.anchor_path is None or not self.anchor_path.exists():
            return None
        try:
            doc = json.loads(self.anchor_path.read_bytes())
            heads = doc["heads"]
            if not isinstance(heads, dict):
                raise ValueError
            if self.party not in heads:
                return None
            seq, h = heads[self.party]["seq"], heads[self.party]["hash"]
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0 or not isinstance(h, str):
                raise ValueError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise LedgerRolledBack(f"the ledger anchor {self.anchor_path.name} is unreadable; "
                                   "refusing every release until it is restored") from None
        return seq, h

    def check_anchor(self, lines: list[LedgerLine] | None = None) -> None:
        """Refuse (:class:`LedgerRolledBack`) a ledger file shorter than, or diverging from, its anchor.

        A missing anchor is accepted only for a ledger without entries of this party (a new
        node); otherwise deleting the anchor would be a way to roll back unseen.
        """
        own = [ln for ln in (self._read() if lines is None else lines) if ln.entry.get("party") == self.party]
        anchor = self.read_anchor()
        if anchor is None:
            if own:
                raise LedgerRolledBack(f"{self.path.name} holds {len(own)} entries but its anchor is missing ({self.anchor_path}); refusing every "
                                      "release (to keep anchors in FEDCOLLAB_ANCHOR_DIR, move the folder's there first: fedcollab node anchor)")
            return
        seq, h = anchor
        if len(own) <= seq or own[seq].hash != h or int(own[seq].entry.get("seq", -1)) != seq:
            raise LedgerRolledBack(f"{self.path.name} ends before (or diverges from) the entry {seq} its anchor recorded: "
                                   "the ledger was rolled back; refusing every release")

    def _write_anchor(self, seq: int, h: str) -> None:
        assert self.anchor_path is not None
        heads: dict[str, Any] = {}
        if self.anchor_path.exists():
            heads = dict(json.loads(self.anchor_path.read_bytes()).get("heads", {}))
        heads[self.party] = {"seq": seq, "hash": h}
        tmp = self.anchor_path.with_name(self.anchor_path.name + ".tmp")
        write_private(tmp, json.dumps({"heads": heads}, sort_keys=True).encode())
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.anchor_path)
        dfd = os.open(self.anchor_path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def lines(self) -> list[LedgerLine]:
        """The chain as on disk (empty if the file does not exist), re-read on every call.

        The file is append-only: bytes already parsed are not parsed again, but if the file no
        longer starts with them (it was truncated or rewritten) it is read whole. With an anchor,
        a file that fell behind it raises :class:`LedgerRolledBack` (on every read, so a
        rollback while the node runs is caught too).
        """
        out = self._read()
        if self.anchor_path is not None:
            self.check_anchor(out)
        return out

    def _read(self) -> list[LedgerLine]:
        if not self.path.exists():
            self._parsed, self._parsed_bytes = [], 0
            return []
        data = self.path.read_bytes()
        done = self._parsed_bytes
        if done and (len(data) < done or line_hash(data[:done]) != self._parsed_digest):
            self._parsed, done = [], 0
        if len(data) > done:
            fresh = parse_lines(data[done:])
            offset = len(self._parsed)
            self._parsed = self._parsed + [LedgerLine(ln.number + offset, ln.raw, ln.entry) for ln in fresh]
            self._parsed_bytes = len(data)
            self._parsed_digest = line_hash(data)
        return list(self._parsed)

    def head(self) -> tuple[int, str]:
        """(next seq, hash of the last line)."""
        own = [ln for ln in self.lines() if ln.entry.get("party") == self.party]
        if not own:
            return 0, GENESIS
        return int(own[-1].entry["seq"]) + 1, own[-1].hash

    def append(self, *, kind: EntryKind, run_id: str, round: int, body: dict[str, Any]) -> bytes:
        """Sign and append one entry; returns its line (without newline)."""
        seq, prev = self.head()
        entry = {
            "schema_version": LEDGER_SCHEMA_VERSION,
            "kind": kind,
            "party": self.party,
            "seq": seq,
            "prev": prev,
            "run_id": run_id,
            "round": round,
            "time": _now(),
            "body": body,
        }
        line = sign_entry(entry, self.key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as fh:
            fh.write(line + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        if self.anchor_path is not None:
            self._write_anchor(seq, line_hash(line))
        return line


def counts_toward_budget(release: Release) -> bool:
    """Whether a release is charged to the party's budget for its dataset.

    Noise added by this party about its rows counts, test-split metrics released with DP (the
    policy's ``test_metrics = "dp"``) included; non-private test-split metrics (governed by the
    policy's ``test_metrics``) and releases declared public do not. Central
    DP releases (noise added by the coordinator, observer ``model_recipients``) count in the
    coordinator's own chain, grouped by the partner's dataset; they never enter a node's budget.
    """
    if (release.about == "test" and release.non_private) or release.declared_public:
        return False
    return release.added_by == release.party or release.kind == "central_dp_update"


def group_key(body: dict[str, Any]) -> tuple[str, str, str]:
    """(dataset, unit, observer) of a release or refusal body."""
    r = body["release"]
    return body["dataset"], r["unit"], r["observer"]


def release_bodies(lines: Iterable[LedgerLine], party: str) -> list[tuple[LedgerLine, Release]]:
    """The party's release entries with their parsed releases."""
    out = []
    for ln in lines:
        e = ln.entry
        if e.get("party") == party and e.get("kind") == "release":
            out.append((ln, Release.model_validate(e["body"]["release"])))
    return out


def spent(
    releases: Sequence[Release], *, delta: float, accountant: str
) -> float:
    """Epsilon of the counted releases composed in order (inf if one is non-private)."""
    mechs = merge_mechanisms([r.mechanism for r in releases if counts_toward_budget(r)])
    if not mechs:
        return 0.0
    return compute_epsilon(mechs, delta=delta, accountant=accountant).epsilon  # type: ignore[arg-type]


def claim(eps_run: float, eps_total: float, *, delta: float, accountant: str) -> dict[str, Any]:
    """A claim block (infinite epsilon as null)."""

    def enc(x: float) -> float | None:
        return None if x == float("inf") else float(x)

    return {
        "epsilon_run": enc(eps_run),
        "epsilon_total": enc(eps_total),
        "delta": delta,
        "accountant": accountant,
        "accountant_version": accountant_version(),
    }


def ledger_entry_json_schema() -> dict[str, Any]:
    """JSON Schema of one ledger line (published as ``schemas/ledger.schema.json``)."""
    release = Release.model_json_schema(ref_template="#/$defs/{model}")
    defs: dict[str, Any] = release.pop("$defs", {})
    defs["Release"] = release
    hex64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
    eps = {"type": ["number", "null"], "description": "null = infinite (a non-private release)"}
    defs["Claim"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["epsilon_run", "epsilon_total", "delta", "accountant", "accountant_version"],
        "properties": {"epsilon_run": eps, "epsilon_total": eps, "delta": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                       "accountant": {"enum": ["rdp", "pld", "exact"]},
                       "accountant_version": {"type": "string"}},
        "description": "The party's epsilon for (dataset, unit, observer): this run, and over its whole chain.",
    }
    defs["Budget"] = {"type": "object", "additionalProperties": False, "required": ["epsilon", "delta"],
                      "properties": {"epsilon": {"type": "number", "exclusiveMinimum": 0},
                                     "delta": {"type": "number", "minimum": 0, "exclusiveMaximum": 1}}}
    nullable = lambda ref: {"anyOf": [{"$ref": f"#/$defs/{ref}"}, {"type": "null"}]}  # noqa: E731
    defs["ReleaseBody"] = {
        "type": "object", "additionalProperties": False,
        "required": ["dataset", "release", "non_private", "counted", "claim", "budget", "commitment"],
        "properties": {"dataset": {"type": "string"}, "release": {"$ref": "#/$defs/Release"}, "non_private": {"type": "boolean"},
                       "counted": {"type": "boolean"}, "claim": nullable("Claim"), "budget": nullable("Budget"),
                       "commitment": {**hex64, "description": "SHA-256(32-byte nonce || payload); the nonce stays at the node"}},
    }
    defs["RefusalBody"] = {
        "type": "object", "additionalProperties": False, "required": ["dataset", "code", "reason"],
        "properties": {"dataset": {"type": "string"}, "code": {"type": "integer"}, "reason": {"type": "string"},
                       "release": {"$ref": "#/$defs/Release"}, "would_be_epsilon": {"type": ["number", "null"]}, "budget": nullable("Budget")},
    }
    defs["ReceiptBody"] = {
        "type": "object", "additionalProperties": False, "required": ["entries"],
        "properties": {"entries": {"type": "array", "items": {"type": "object", "additionalProperties": False, "required": ["party", "hash"],
                                                              "properties": {"party": {"type": "string"}, "hash": hex64}}}},
    }
    defs["CloseBody"] = {"type": "object", "additionalProperties": False, "required": ["heads", "partners"],
                         "properties": {"heads": {"type": "object", "additionalProperties": hex64},
                                        "partners": {"type": "array", "items": {"type": "string"}, "uniqueItems": True,
                                                     "description": "every partner of the run (roster or spec), listed or not in heads; "
                                                                    "each must countersign"}}}
    defs["AbortBody"] = {
        "type": "object", "additionalProperties": False, "required": ["reason", "exit_code", "codes", "heads"],
        "description": "The coordinator ends a run that failed or was interrupted (no close, no countersignatures).",
        "properties": {"reason": {"type": "string", "description": "error class (never exception text), or `interrupted`"},
                       "exit_code": {"type": "integer"},
                       "codes": {"type": "object", "additionalProperties": {"type": "array", "items": {"type": "integer"}},
                                 "description": "node error codes by partner"},
                       "heads": {"type": "object", "additionalProperties": hex64}},
    }
    defs["CountersignBody"] = {"type": "object", "additionalProperties": False, "required": ["close"], "properties": {"close": hex64}}
    defs["ScoringBody"] = {
        "type": "object", "additionalProperties": False,
        "required": ["querier", "model", "request", "rows", "rows_before", "budget", "outcome", "code"],
        "properties": {"querier": {"type": "string", "description": "the querier named in the request"},
                       "querier_key": {"type": ["string", "null"], "pattern": "^[0-9a-f]{16}$",
                                       "description": "fingerprint of the querier's key in the holder's roster (the key the signature was "
                                                      "checked against); null when the querier is not in the roster"},
                       "reason": {"enum": ["unknown_querier", "bad_signature", "replay", "budget"], "description": "why a request was refused"},
                       "model": {**hex64, "description": "SHA-256 of the model file"},
                       "request": {**hex64, "description": "SHA-256 of the request file"},
                       "rows": {"type": "integer", "minimum": 0, "description": "rows (queries) in the request"},
                       "rows_before": {"type": "integer", "minimum": 0,
                                       "description": "budget rows charged before, same querier and model (2 per answered row)"},
                       "charged": {"type": "integer", "minimum": 0, "description": "budget rows this request is charged: 2 per row"},
                       "budget": {"type": "integer", "minimum": 0}, "outcome": {"enum": ["answered", "refused"]},
                       "code": {"type": ["integer", "null"], "description": "node error code of a refusal"},
                       "flood_std": {"type": "number"}, "params": {"type": "object"}},
    }
    by_kind = {"release": "ReleaseBody", "refusal": "RefusalBody", "receipt": "ReceiptBody", "close": "CloseBody", "countersign": "CountersignBody", "scoring": "ScoringBody",
               "abort": "AbortBody"}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://fedcollab.dev/schema/ledger.schema.json",
        "title": "fedcollab ledger entry (one JSON Lines line, RFC 8785 canonical form)",
        "type": "object",
        "additionalProperties": False,
        "required": ["schema_version", "kind", "party", "seq", "prev", "run_id", "round", "time", "body", "signature"],
        "properties": {
            "schema_version": {"const": LEDGER_SCHEMA_VERSION},
            "kind": {"enum": ["release", "refusal", "receipt", "close", "countersign", "key_custody", "aggregate", "scoring", "abort"]},
            "party": {"type": "string"},
            "seq": {"type": "integer", "minimum": 0},
            "prev": {**hex64, "description": "SHA-256 of the party's previous line; 64 zeros for the first"},
            "run_id": {"type": "string"},
            "round": {"type": "integer", "minimum": 0},
            "time": {"type": "string"},
            "body": {"type": "object"},
            "signature": {"type": "string", "pattern": "^[0-9a-f]{128}$", "description": "Ed25519 over the canonical entry without this field"},
        },
        "allOf": [
            {"if": {"properties": {"kind": {"const": k}}}, "then": {"properties": {"body": {"$ref": f"#/$defs/{ref}"}}}}
            for k, ref in by_kind.items()
        ],
        "$defs": defs,
    }
