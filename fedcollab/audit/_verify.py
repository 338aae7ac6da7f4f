"""``fedcollab audit verify``: check a ledger offline with nothing but the roster.

Checks, in order, each failure naming the line:

1. every line is canonical JSON (RFC 8785), signed by its party's roster key;
2. every party's entries form an unbroken chain (``seq`` + 1, ``prev`` = hash of its previous line);
3. in a run ledger: every node entry is receipted by the coordinator in arrival order, the run
   ends with a ``close`` listing each party's chain head, countersigned by every node listed, or
   with the coordinator's signed ``abort`` (the run failed or was interrupted: reported as aborted,
   exit 25, not as tampered; a ledger with neither is cut short, exit 20);
4. every claim: epsilon per (party, dataset, unit, observer) recomputed from the recorded events
   with the same accountant equals the claim (relative 1e-9);
5. every budget recorded in an entry holds;
6. encrypted scoring (``scoring`` entries): per (party, model, querier) the rows answered before
   each entry, recomputed from the chain, equal its ``rows_before``, and never exceed its budget.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollab.core import ExitCode
from fedcollab.privacy.accounting import (
    GENESIS,
    SCORING_CHARGE_PER_ROW,
    LedgerError,
    LedgerLine,
    Release,
    accountant_version,
    counts_toward_budget,
    key_fingerprint,
    parse_lines,
    spent,
    verify_signature,
)
from fedcollab.spec import Roster

CLAIM_RTOL = 1e-9
KNOWN_KINDS = {"release", "refusal", "receipt", "close", "countersign", "key_custody", "aggregate", "scoring", "abort"}
COORDINATOR_ROLE = "coordinator"


@dataclass
class Finding:
    """One problem: its exit code, the line (if any) and what is wrong."""

    code: ExitCode
    line: int | None
    message: str

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {"code": int(self.code), "kind": self.code.name.lower(), "line": self.line, "message": self.message}


@dataclass
class GroupSpend:
    """A party's recomputed spend for one (dataset, unit, observer)."""

    party: str
    dataset: str
    unit: str
    observer: str
    epsilon: float | None
    delta: float
    accountant: str
    budget: float | None
    complete_history: bool
    releases: int

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return dict(self.__dict__)


@dataclass
class Report:
    """Everything ``audit verify`` found."""

    lines: int = 0
    findings: list[Finding] = field(default_factory=list)
    spends: list[GroupSpend] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)
    run_ledger: bool = False
    abort: dict[str, Any] | None = None
    closed: bool = False

    @property
    def status(self) -> str:
        """How the run ended: ``completed`` (a close), ``aborted`` (the coordinator's abort), ``cut_short`` (neither), ``open`` (a node's ledger)."""
        if self.abort is not None:
            return "aborted"
        if not self.run_ledger:
            return "open"
        return "completed" if self.closed else "cut_short"

    @property
    def exit_code(self) -> ExitCode:
        """The most serious finding's code (tampering first), then LEDGER_ABORTED for an intact aborted run, or OK."""
        order = [ExitCode.LEDGER_UNREADABLE, ExitCode.LEDGER_TAMPERED, ExitCode.CLAIM_MISMATCH, ExitCode.LEDGER_BUDGET_EXCEEDED]
        for code in order:
            if any(f.code == code for f in self.findings):
                return code
        return ExitCode.LEDGER_ABORTED if self.abort is not None else ExitCode.OK

    def to_dict(self) -> dict[str, Any]:  # noqa: D102
        return {
            "verified": self.exit_code in (ExitCode.OK, ExitCode.LEDGER_ABORTED),
            "exit_code": int(self.exit_code),
            "status": self.status,
            "abort": self.abort,
            "lines": self.lines,
            "run_ledger": self.run_ledger,
            "findings": [f.to_dict() for f in self.findings],
            "parties": self.fingerprints,
            "spend": [s.to_dict() for s in self.spends],
            "accountant_version": accountant_version(),
        }


def _enc(x: float) -> float | None:
    return None if math.isinf(x) else x


def _close(a: float | None, b: float | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return math.isclose(a, b, rel_tol=CLAIM_RTOL, abs_tol=1e-12)


def verify_lines(lines: list[LedgerLine], roster: Roster) -> Report:
    """Verify parsed ledger lines against ``roster``."""
    rep = Report(lines=len(lines))
    rep.fingerprints = {name: key_fingerprint(e.signing_key) for name, e in sorted(roster.parties.items())}
    tam = rep.findings.append

    # 1. signatures
    good: list[LedgerLine] = []
    for ln in lines:
        e = ln.entry
        party = e.get("party")
        entry = roster.parties.get(party) if isinstance(party, str) else None
        if entry is None:
            tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, f"party {party!r} is not in the roster"))
            continue
        if not verify_signature(e, entry.signing_key):
            tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, f"missing or invalid signature of {party!r}"))
            continue
        good.append(ln)
    if rep.findings:
        return rep

    unknown = [ln for ln in good if ln.entry.get("kind") not in KNOWN_KINDS or ln.entry.get("schema_version") != 1]
    for ln in unknown:
        tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, f"unknown entry kind {ln.entry.get('kind')!r} or schema version"))
    if rep.findings:
        return rep

    # 1b. every body against the published schema (a signed but malformed body is tampering, never a crash)
    for ln in good:
        problem = schema_problem(ln.entry)
        if problem is not None:
            tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, problem))
    if rep.findings:
        return rep

    # 2. chains
    last: dict[str, LedgerLine] = {}
    first: dict[str, LedgerLine] = {}
    for ln in good:
        p = ln.entry["party"]
        prev = last.get(p)
        if prev is None:
            first[p] = ln
            if ln.entry.get("seq") == 0 and ln.entry.get("prev") != GENESIS:
                tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, f"{p}: the first entry does not start from genesis"))
        else:
            if ln.entry.get("seq") != prev.entry.get("seq", -2) + 1 or ln.entry.get("prev") != prev.hash:
                tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number,
                            f"{p}: chain broken after line {prev.number} (an entry is missing, reordered or duplicated)"))
        last[p] = ln

    # 3. receipts, close and countersignatures (run ledgers)
    coordinators = {n for n, e in roster.parties.items() if e.role == COORDINATOR_ROLE}
    rep.run_ledger = any(ln.entry["party"] in coordinators for ln in good)
    if rep.run_ledger:
        for p in sorted(coordinators & set(first)):
            if first[p].entry.get("seq") != 0:
                tam(Finding(ExitCode.LEDGER_TAMPERED, first[p].number, f"{p}: a run ledger's coordinator chain must start at genesis (entries before it are missing)"))
        _check_run_structure(good, coordinators, rep, {n for n, e in roster.parties.items() if e.role == "partner"})

    # 4-5. claims and budgets
    try:
        _check_claims(good, rep)
    except Exception as exc:  # noqa: BLE001 - schema-valid values the accountant still cannot compose
        tam(Finding(ExitCode.LEDGER_TAMPERED, None, f"epsilon cannot be recomputed from the recorded events ({type(exc).__name__})"))
    # 6. encrypted-scoring row budgets
    _check_scoring(good, rep)
    return rep


def _schema_validator() -> Any:
    global _VALIDATOR
    if _VALIDATOR is None:
        import jsonschema

        from fedcollab.privacy.accounting import ledger_entry_json_schema

        schema = ledger_entry_json_schema()
        _VALIDATOR = jsonschema.Draft202012Validator(schema, format_checker=None)
    return _VALIDATOR


_VALIDATOR: Any = None


def schema_problem(entry: dict[str, Any]) -> str | None:
    """Why ``entry`` does not follow ``schemas/ledger.schema.json`` (naming the field), or None.

    Release bodies are also checked against the pydantic :class:`Release` model the schema is
    generated from, so every later step may index the fields it needs.
    """
    import jsonschema

    v = _schema_validator()
    errors = sorted(v.iter_errors(entry), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        where = ".".join(str(p) for p in err.absolute_path) or "(entry)"
        msg = err.message if len(err.message) <= 160 else err.message[:157] + "..."
        return f"malformed {entry.get('kind')!r} entry: field `{where}` does not follow the ledger schema ({msg})"
    body = entry.get("body") or {}
    for key in ("release",):
        if key in body:
            try:
                Release.model_validate(body[key])
            except Exception as exc:  # noqa: BLE001 - pydantic's ValidationError; a bad body is a finding, not a crash
                first = getattr(exc, "errors", lambda: [{}])()
                loc = ".".join(str(x) for x in (first[0].get("loc", ()) if first else ()))
                return f"malformed {entry.get('kind')!r} entry: field `body.{key}{'.' + loc if loc else ''}` is not a valid release"
    return None


def _check_scoring(good: list[LedgerLine], rep: Report) -> None:
    answered: dict[tuple[str, str, str], int] = defaultdict(int)
    complete: dict[str, bool] = {}
    for ln in good:
        e = ln.entry
        complete.setdefault(e["party"], e.get("seq") == 0)
        if e["kind"] != "scoring":
            continue
        b = e.get("body") or {}
        try:
            key = (e["party"], str(b["model"]), str(b["querier"]))
            rows, before, budget, outcome = int(b["rows"]), int(b["rows_before"]), int(b["budget"]), b["outcome"]
        except (KeyError, TypeError, ValueError):
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, ln.number, "scoring entry without rows, rows_before, budget or outcome"))
            continue
        if complete[e["party"]] and before != answered[key]:
            rep.findings.append(Finding(ExitCode.CLAIM_MISMATCH, ln.number,
                                        f"{e['party']}: scoring entry claims {before} rows answered before for {key[2]!r}, recomputed {answered[key]}"))
        charge = SCORING_CHARGE_PER_ROW * rows  # a complex slot answers two equations (issue 13, attack 7)
        if "charged" in b and b["charged"] != charge:
            rep.findings.append(Finding(ExitCode.CLAIM_MISMATCH, ln.number,
                                        f"{e['party']}: scoring entry charges {b['charged']} budget rows for {rows} rows, expected {charge}"))
        if outcome == "answered":
            answered[key] += charge
            if max(answered[key], before + charge) > budget:
                rep.findings.append(Finding(ExitCode.LEDGER_BUDGET_EXCEEDED, ln.number,
                                            f"{e['party']}: {max(answered[key], before + charge)} budget rows charged for {key[2]!r}, budget {budget}"))


def _check_run_structure(good: list[LedgerLine], coordinators: set[str], rep: Report, roster_partners: set[str] = frozenset()) -> None:
    tam = rep.findings.append
    pending: list[LedgerLine] = []
    close: LedgerLine | None = None
    heads: dict[str, str] = {}
    counters: dict[str, LedgerLine] = {}
    aborts: list[tuple[LedgerLine, dict[str, str]]] = []
    for ln in good:
        e = ln.entry
        if e["party"] in coordinators:
            if e["kind"] == "abort":
                aborts.append((ln, dict(heads)))
            elif e["kind"] == "receipt":
                want = [{"party": x.entry["party"], "hash": x.hash} for x in pending]
                if e["body"].get("entries") != want:
                    tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, "receipt does not match the node entries before it (one was removed, altered or inserted)"))
                pending = []
            elif e["kind"] == "close":
                if close is not None:
                    tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, "a second close entry"))
                close = ln
        else:
            if close is not None and e["kind"] != "countersign":
                tam(Finding(ExitCode.LEDGER_TAMPERED, ln.number, "a node entry after the close"))
            if close is None:
                heads[e["party"]] = ln.hash
            if e["kind"] == "countersign":
                counters[e["party"]] = ln
            pending.append(ln)
    end = good[-1].number if good else 0
    rep.closed = close is not None
    if pending:
        tam(Finding(ExitCode.LEDGER_TAMPERED, end + 1, f"entries from line {pending[0].number} on lack the coordinator's receipt (the ledger was cut short)"))
    if close is None:
        if aborts and _check_abort(good, aborts[-1], rep):
            return
        tam(Finding(ExitCode.LEDGER_TAMPERED, end + 1, "the run has no close entry (the ledger was cut short)"))
        return
    listed = close.entry["body"].get("heads", {})
    for party, h in sorted(listed.items()):
        if heads.get(party) != h:
            tam(Finding(ExitCode.LEDGER_TAMPERED, close.number, f"close lists a head for {party} that is not its last entry"))
        c = counters.get(party)
        if c is None:
            tam(Finding(ExitCode.LEDGER_TAMPERED, end + 1, f"no countersignature of the close by {party} (entries missing at the end)"))
        elif c.entry["body"].get("close") != close.hash:
            tam(Finding(ExitCode.LEDGER_TAMPERED, c.number, f"{party} countersigned a different close entry"))
    for party in sorted(set(heads) - set(listed)):
        tam(Finding(ExitCode.LEDGER_TAMPERED, close.number, f"close omits {party}'s chain"))
    _check_close_partners(close, heads, counters, roster_partners, end, rep)


def _check_close_partners(close: LedgerLine, heads: dict[str, str], counters: dict[str, LedgerLine], roster_partners: set[str],
                          end: int, rep: Report) -> None:
    """Every roster partner and every party with entries is in the close's ``partners``, and each listed partner countersigned."""
    tam = rep.findings.append
    partners = set(close.entry["body"].get("partners", []))
    for party in sorted((roster_partners | set(heads)) - partners):
        why = "has entries in the run" if party in heads else "is in the roster"
        tam(Finding(ExitCode.LEDGER_TAMPERED, close.number, f"close omits partner {party}, who {why}"))
    listed_heads = set(close.entry["body"].get("heads", {}))
    for party in sorted(partners - listed_heads):
        c = counters.get(party)
        if c is None:
            tam(Finding(ExitCode.LEDGER_TAMPERED, end + 1, f"no countersignature of the close by {party} (a listed partner)"))
        elif c.entry["body"].get("close") != close.hash:
            tam(Finding(ExitCode.LEDGER_TAMPERED, c.number, f"{party} countersigned a different close entry"))


def _check_abort(good: list[LedgerLine], last_abort: tuple[LedgerLine, dict[str, str]], rep: Report) -> bool:
    """A run ending in the coordinator's abort: its heads must be every node's last entry; nothing may follow it.

    Entries after an earlier abort are a resumed run (``run --resume``, ``submit --resume``), which
    then ends in its own close or abort. Returns whether the abort ends the ledger.
    """
    ln, heads_then = last_abort
    after = [x for x in good if x.number > ln.number]
    if after:
        return False  # entries after the abort without a close: cut short (reported by the caller)
    body = ln.entry.get("body") or {}
    listed = body.get("heads")
    if not isinstance(listed, dict):
        rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, ln.number, "abort entry without the parties' chain heads"))
        return True
    for party in sorted(set(listed) | set(heads_then)):
        if listed.get(party) != heads_then.get(party):
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, ln.number,
                                        f"abort lists a head for {party} that is not its last entry (an entry was removed or altered)"))
    rep.abort = {"line": ln.number, "round": ln.entry.get("round"), "reason": body.get("reason"), "exit_code": body.get("exit_code"),
                 "codes": body.get("codes", {})}
    return True


def _check_claims(good: list[LedgerLine], rep: Report) -> None:
    groups: dict[tuple[str, str, str, str], list[tuple[LedgerLine, Release]]] = defaultdict(list)
    complete = {}
    for ln in good:
        e = ln.entry
        p = e["party"]
        complete.setdefault(p, e.get("seq") == 0)
        if e["kind"] != "release":
            continue
        r = Release.model_validate(e["body"]["release"])
        groups[(p, e["body"]["dataset"], r.unit, r.observer)].append((ln, r))
    for (party, dataset, unit, observer), items in sorted(groups.items(), key=lambda kv: kv[0]):
        counted_items = [(ln, r) for ln, r in items if counts_toward_budget(r)]
        hist: list[Release] = []
        per_run: dict[str, list[Release]] = defaultdict(list)
        delta, accountant, budget_eps = 1e-5, "rdp", None
        total = 0.0
        for ln, r in counted_items:
            body = ln.entry["body"]
            c = body.get("claim") or {}
            delta, accountant = float(c.get("delta", delta)), str(c.get("accountant", accountant))
            hist.append(r)
            per_run[ln.entry["run_id"]].append(r)
            eps_run = spent(per_run[ln.entry["run_id"]], delta=delta, accountant=accountant)
            total = spent(hist, delta=delta, accountant=accountant)
            if not body.get("counted", False):
                rep.findings.append(Finding(ExitCode.CLAIM_MISMATCH, ln.number, f"{party}: a charged release marked as not counted"))
            if not _close(c.get("epsilon_run"), _enc(eps_run)):
                rep.findings.append(Finding(ExitCode.CLAIM_MISMATCH, ln.number,
                                            f"{party}: claimed epsilon {c.get('epsilon_run')} for this run, recomputed {eps_run:.12g}"))
            if complete.get(party) and not _close(c.get("epsilon_total"), _enc(total)):
                rep.findings.append(Finding(ExitCode.CLAIM_MISMATCH, ln.number,
                                            f"{party}: claimed total epsilon {c.get('epsilon_total')}, recomputed {total:.12g}"))
            b = body.get("budget")
            if b is not None:
                budget_eps = float(b["epsilon"])
                claimed_total = c.get("epsilon_total")
                worst = max(total if complete.get(party) else 0.0, math.inf if claimed_total is None else float(claimed_total))
                if worst > budget_eps * (1 + CLAIM_RTOL):
                    rep.findings.append(Finding(ExitCode.LEDGER_BUDGET_EXCEEDED, ln.number,
                                                f"{party}: epsilon {worst:.6g} exceeds the budget {budget_eps:g} of {dataset!r}"))
        rep.spends.append(GroupSpend(party, dataset, unit, observer, _enc(total) if counted_items else 0.0, delta, accountant,
                                     budget_eps, bool(complete.get(party)), len(counted_items)))


def verify_ledger(path: str | Path, roster: Roster) -> Report:
    """Read and verify a ledger file; unreadable input becomes a finding, never a crash."""
    rep = Report()
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        rep.findings.append(Finding(ExitCode.LEDGER_UNREADABLE, None, f"cannot read {path}: {exc.strerror}"))
        return rep
    try:
        lines = parse_lines(data)
    except LedgerError as exc:
        rep.lines = data.count(b"\n")
        rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, exc.line, str(exc).split(": ", 1)[-1]))
        return rep
    return verify_lines(lines, roster)


def check_against_run(rep: Report, node_lines: list[LedgerLine], run_lines: list[LedgerLine], roster: Roster) -> Report:
    """A node ledger against a run ledger: every entry the node sent into the run is still in its chain.

    The run ledger holds, receipted by the coordinator and countersigned by the node, a copy of
    each node entry of the run with its ``seq`` and hash. A node ledger truncated (rolled back)
    to before one of them, or rewritten after it, is reported as tampering (exit 20) at the
    run ledger's line. Only run-ledger entries whose signature verifies against ``roster`` count.
    """
    chains: dict[str, dict[int, str]] = defaultdict(dict)
    for ln in node_lines:
        e = ln.entry
        if isinstance(e.get("party"), str) and isinstance(e.get("seq"), int):
            chains[e["party"]][e["seq"]] = ln.hash
    partners = {n for n, e in roster.parties.items() if e.role != COORDINATOR_ROLE}
    parties = set(chains)
    for ln in run_lines:
        e = ln.entry
        p = e.get("party")
        if not isinstance(p, str) or p not in partners or not isinstance(e.get("seq"), int):
            continue
        if not verify_signature(e, roster.parties[p].signing_key):
            continue
        if not parties:
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, None,
                                        f"the node ledger is empty, but the run ledger holds {p}'s signed entry (line {ln.number}): rolled back?"))
            parties.add(p)
            continue
        if p not in chains:
            continue
        seq, mine = e["seq"], chains[p].get(e["seq"])
        if mine is None:
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, None,
                                        f"{p}'s ledger ends before entry seq {seq} that it sent in run {e.get('run_id')} "
                                        f"(run ledger line {ln.number}): the node ledger was rolled back or cut"))
        elif mine != ln.hash:
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, None,
                                        f"{p}'s entry seq {seq} differs from the one it sent in run {e.get('run_id')} (run ledger line {ln.number})"))
    return rep


def verify_with_run(path: str | Path, run_ledger: str | Path, roster: Roster) -> Report:
    """:func:`verify_ledger` on a node ledger, then :func:`check_against_run` with a run ledger it took part in."""
    rep = verify_ledger(path, roster)
    try:
        node_lines = parse_lines(Path(path).read_bytes())
        run_lines = parse_lines(Path(run_ledger).read_bytes())
    except OSError as exc:
        rep.findings.append(Finding(ExitCode.LEDGER_UNREADABLE, None, f"cannot read {exc.filename}: {exc.strerror}"))
        return rep
    except LedgerError as exc:
        if not rep.findings:
            rep.findings.append(Finding(ExitCode.LEDGER_TAMPERED, exc.line, f"run ledger: {str(exc).split(': ', 1)[-1]}"))
        return rep
    return check_against_run(rep, node_lines, run_lines, roster)
