"""``fedcollab audit report``: an HTML and Markdown report of a ledger, for people.

The report starts with :func:`~fedcollab.audit.verify_ledger`'s verdict, then shows, from the
ledger alone (and the roster): cumulative epsilon over rounds against each budget (claimed and
recomputed, one PNG), the mechanisms used, the releases made without noise, the refusals, and
who holds which keys. A ledger that does not verify is still described, marked as unverified.

``report.html`` is self-contained (inline CSS, the plot as base64 PNG); ``report.md`` carries the
same content and refers to the PNG by file name. Every text from the ledger is escaped.
Imports no torch, opacus, tenseal or flwr (import-linter contract); matplotlib is used through
its object API and Agg canvas, so no GUI backend is touched and no global pyplot state is left.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcollab.audit._verify import Finding, Report, verify_ledger
from fedcollab.core import ExitCode, FedcollabError, NodeErrorCode
from fedcollab.privacy.accounting import (
    LedgerError,
    LedgerLine,
    NonPrivate,
    Release,
    accountant_version,
    compute_epsilon,
    counts_toward_budget,
    key_fingerprint,
    merge_mechanisms,
    parse_lines,
    spent,
)
from fedcollab.spec import Roster

#: Entry kinds this report knows; any other kind is listed as it is.
KNOWN_KINDS = ("release", "refusal", "receipt", "close", "countersign", "key_custody", "aggregate", "scoring", "abort")
PLOT_NAME = "epsilon.png"
HTML_NAME = "report.html"
MD_NAME = "report.md"
_DEFAULT_DELTA, _DEFAULT_ACCOUNTANT = 1e-5, "rdp"  # what the budget gate and verify assume without a claim


# --- reading ----------------------------------------------------------------------------------


@dataclass
class _Rel:
    line: int
    author: str
    run_id: str
    round: int
    dataset: str
    release: Release
    counted: bool
    claim: dict[str, Any] | None
    budget: dict[str, Any] | None


@dataclass
class _Ledger:
    """What the ledger says (whether or not it verified)."""

    entries: list[LedgerLine] = field(default_factory=list)
    unreadable: list[tuple[int, str]] = field(default_factory=list)
    releases: list[_Rel] = field(default_factory=list)
    refusals: list[tuple[LedgerLine, dict[str, Any]]] = field(default_factory=list)
    custody: list[LedgerLine] = field(default_factory=list)
    aggregates: list[LedgerLine] = field(default_factory=list)
    scoring: list[LedgerLine] = field(default_factory=list)
    unknown: list[LedgerLine] = field(default_factory=list)
    complete: dict[str, bool] = field(default_factory=dict)
    runs: list[str] = field(default_factory=list)


def _lenient_lines(data: bytes) -> tuple[list[LedgerLine], list[tuple[int, str]]]:
    """Every line that is a JSON object, and the numbers of those that are not (for a ledger that failed to parse)."""
    good, bad = [], []
    for i, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            entry = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad.append((i, "not valid JSON"))
            continue
        if isinstance(entry, dict):
            good.append(LedgerLine(i, raw, entry))
        else:
            bad.append((i, "not a JSON object"))
    return good, bad


def _read(path: Path) -> _Ledger:
    led = _Ledger()
    try:
        data = path.read_bytes()
    except OSError:
        return led  # verify_ledger reports it
    try:
        led.entries = parse_lines(data)
    except LedgerError:
        led.entries, led.unreadable = _lenient_lines(data)
    for ln in led.entries:
        e = ln.entry
        party, kind = str(e.get("party")), e.get("kind")
        led.complete.setdefault(party, e.get("seq") == 0)
        run = str(e.get("run_id"))
        if run not in led.runs:
            led.runs.append(run)
        body = e.get("body") if isinstance(e.get("body"), dict) else {}
        try:
            rnd = int(e.get("round", 0))
            if kind == "release":
                r = Release.model_validate(body["release"])
                claim, budget = body.get("claim"), body.get("budget")
                led.releases.append(_Rel(ln.number, party, run, rnd, str(body.get("dataset")), r, counts_toward_budget(r),
                                         claim if isinstance(claim, dict) else None, budget if isinstance(budget, dict) else None))
            elif kind == "refusal":
                led.refusals.append((ln, body))
            elif kind == "key_custody":
                led.custody.append(ln)
            elif kind == "aggregate":
                led.aggregates.append(ln)
            elif kind == "scoring":
                led.scoring.append(ln)
            elif kind not in KNOWN_KINDS:
                led.unknown.append(ln)
        except (KeyError, TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
            led.unreadable.append((ln.number, f"{kind} entry not understood ({type(exc).__name__})"))
    return led


# --- numbers ----------------------------------------------------------------------------------


def _f(x: Any) -> float | None:
    """A JSON number as float (null -> None)."""
    return None if x is None else float(x)


def _eps(x: float | None, *, missing: str = "—") -> str:
    if x is None:
        return missing
    return "∞" if math.isinf(x) else f"{x:.6g}"


def _num(x: Any) -> str:
    return "—" if x is None else f"{float(x):.4g}"


def _num_or_text(x: Any) -> str:
    """A number as in :func:`_num`; anything else (a tampered entry) as its text, never an exception."""
    try:
        return _num(x)
    except (TypeError, ValueError):
        return str(x)


def _ranges(xs: Iterable[int]) -> str:
    vals = sorted(set(xs))
    out: list[str] = []
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}–{vals[j]}")
        i = j + 1
    return ", ".join(out)


def _safe_spent(rels: Sequence[Release], delta: float, accountant: str) -> float | None:
    try:
        return spent(rels, delta=delta, accountant=accountant)
    except (FedcollabError, ValueError):
        return None


def _safe_epsilon(mechs: Sequence[Any], delta: float, accountant: str) -> float | None:
    try:
        return compute_epsilon(merge_mechanisms(mechs), delta=delta, accountant=accountant).epsilon  # type: ignore[arg-type]
    except (FedcollabError, ValueError):
        return None


GroupKey = tuple[str, str, str, str]  # author, dataset, unit, observer


@dataclass
class _Point:
    x: float
    round: int
    run_id: str
    line: int
    claimed: float | None  # None: no claim; inf: claimed infinite
    recomputed: float | None  # None: could not recompute


@dataclass
class _Series:
    key: GroupKey
    points: list[_Point] = field(default_factory=list)
    budgets: list[float] = field(default_factory=list)
    delta: float = _DEFAULT_DELTA
    accountant: str = _DEFAULT_ACCOUNTANT
    refused: list[tuple[float, float]] = field(default_factory=list)  # (x, would-be epsilon)


def _x_offsets(led: _Ledger) -> dict[str, int]:
    """Runs laid end to end on one round axis (a node ledger may span several runs)."""
    last: dict[str, int] = defaultdict(int)
    for ln in led.entries:
        try:
            last[str(ln.entry.get("run_id"))] = max(last[str(ln.entry.get("run_id"))], int(ln.entry.get("round", 0)))
        except (TypeError, ValueError):
            continue
    out, acc = {}, 0
    for run in led.runs:
        out[run] = acc
        acc += last[run] + 1
    return out


def _series(led: _Ledger, offsets: dict[str, int]) -> list[_Series]:
    out: dict[GroupKey, _Series] = {}
    hist: dict[GroupKey, list[Release]] = defaultdict(list)
    for rel in led.releases:
        if not rel.counted:
            continue
        key = (rel.author, rel.dataset, rel.release.unit, rel.release.observer)
        s = out.setdefault(key, _Series(key))
        c = rel.claim or {}
        try:
            s.delta = float(c.get("delta", s.delta))
        except (TypeError, ValueError):
            pass
        s.accountant = str(c.get("accountant", s.accountant))
        hist[key].append(rel.release)
        claimed: float | None = None
        if rel.claim is not None:
            try:
                claimed = math.inf if c.get("epsilon_total") is None else float(c["epsilon_total"])
            except (TypeError, ValueError):
                claimed = None
        s.points.append(_Point(offsets.get(rel.run_id, 0) + rel.round, rel.round, rel.run_id, rel.line, claimed,
                               _safe_spent(hist[key], s.delta, s.accountant)))
        if rel.budget is not None:
            try:
                b = float(rel.budget["epsilon"])
            except (KeyError, TypeError, ValueError):
                continue
            if b not in s.budgets:
                s.budgets.append(b)
    for ln, body in led.refusals:
        r = body.get("release")
        w = body.get("would_be_epsilon")
        if not isinstance(r, dict) or w is None:
            continue
        key = (str(ln.entry.get("party")), str(body.get("dataset")), str(r.get("unit")), str(r.get("observer")))
        s = out.setdefault(key, _Series(key))
        try:
            s.refused.append((offsets.get(str(ln.entry.get("run_id")), 0) + int(ln.entry.get("round", 0)), float(w)))
        except (TypeError, ValueError):
            continue
        b = body.get("budget")
        if isinstance(b, dict) and isinstance(b.get("epsilon"), int | float) and float(b["epsilon"]) not in s.budgets:
            s.budgets.append(float(b["epsilon"]))
    return sorted(out.values(), key=lambda s: s.key)


def _label(key: GroupKey, all_keys: Sequence[GroupKey]) -> str:
    author, dataset, unit, observer = key
    if sum(1 for k in all_keys if k[0] == author) == 1 and dataset == author:
        return author
    return f"{author}: {dataset} / {unit} / {observer}"


def _plot(series: Sequence[_Series], path: Path, *, several_runs: bool) -> Any:
    """One figure: a line per (party, dataset, unit, observer), each budget dashed."""
    # A bare Figure renders through the Agg canvas without pyplot: no GUI backend, no global state
    # (matplotlib.use("Agg") would switch, and close, the figures of a caller already using pyplot).
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(10, 5), dpi=110)
    ax = fig.add_subplot()
    keys = [s.key for s in series]
    colors = matplotlib.colormaps["tab10"]
    color_of = {s.key: colors(i % 10) for i, s in enumerate(series)}

    def fin(v: float | None) -> float:
        return math.nan if v is None or math.isinf(v) else v

    # Partners with the same plan spend the same epsilon: each line gets its own marker and line
    # style and a small horizontal offset, so identical curves stay distinguishable.
    markers, styles = "osD^vPX*", ["-", "--", "-.", ":"]
    n = len(series)
    for i, s in enumerate(series):
        color, name = color_of[s.key], _label(s.key, keys)
        dx = (i - (n - 1) / 2) * min(0.08, 0.4 / max(n, 1))
        xs = [p.x + dx for p in s.points]
        if s.points:
            ax.plot(xs, [fin(p.recomputed) for p in s.points], linestyle=styles[i % 4], marker=markers[i % 8], ms=4, color=color, lw=1.6,
                    label=f"{name}: recomputed")
            ax.plot(xs, [fin(p.claimed) for p in s.points], "o", color=color, ms=7, mfc="none", alpha=0.6, label=f"{name}: claimed")
        inf_x = [p.x for p in s.points if p.recomputed is not None and math.isinf(p.recomputed)]
        if inf_x:  # drawn at the top edge: infinite epsilon has no place on the axis
            ax.plot(inf_x, [0.97] * len(inf_x), "^", color=color, ms=8, transform=ax.get_xaxis_transform(), clip_on=False,
                    label=f"{name}: ε = ∞ (no noise, charged)")
        if s.refused:
            ax.plot([x for x, _ in s.refused], [w for _, w in s.refused], "x", color=color, ms=8, mew=2, label=f"{name}: refused (would-be ε)")
    # Budgets: one dashed line per value; several groups with the same budget share a grey one.
    by_budget: dict[float, list[_Series]] = defaultdict(list)
    for s in series:
        for b in s.budgets:
            by_budget[b].append(s)
    # The axis scales to what was spent (and refused), not to a far larger budget: a budget above
    # twice the largest value is named at the top edge instead of flattening every curve.
    values = [v for s in series for p in s.points for v in (p.recomputed, p.claimed) if v is not None and math.isfinite(v)]
    values += [w for s in series for _, w in s.refused if math.isfinite(w)]
    data_top = max(values, default=0.0)
    top = None
    if data_top > 0:
        within = [b for b in by_budget if b <= 2 * data_top]
        top = 1.15 * max([data_top, *within])
    above = []
    for b, owners in sorted(by_budget.items()):
        names = [_label(s.key, keys) for s in owners]
        who = names[0] if len(names) == 1 else f"{len(names)} groups" if len(names) > 3 else ", ".join(names)
        if top is not None and b > top:
            above.append(f"budget ε = {b:g} ({who})")
            continue
        ax.axhline(b, color=color_of[owners[0].key] if len(owners) == 1 else "dimgrey", ls="--", lw=1.2, label=f"budget ε = {b:g} ({who})")
    if above:
        ax.text(0.99, 0.98, "above the axis: " + "; ".join(above), transform=ax.transAxes, ha="right", va="top", fontsize=7, color="dimgrey")
    if several_runs:
        for x in sorted({p.x - p.round for s in series for p in s.points} - {0}):
            ax.axvline(x - 0.5, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("round (runs laid end to end; dotted lines start a new run)" if several_runs else "round")
    ax.set_ylabel("cumulative ε")
    ax.set_title("Cumulative ε over rounds against each budget")
    ax.set_ylim(bottom=0, top=top)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.savefig(path, format="png", bbox_inches="tight", metadata={"Software": None})
    return fig


# --- the document: one structure, rendered to HTML and Markdown -------------------------------


@dataclass
class _Doc:
    title: str
    blocks: list[tuple[Any, ...]] = field(default_factory=list)

    def h(self, text: str) -> None:
        self.blocks.append(("h", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def verdict(self, ok: bool, text: str) -> None:
        self.blocks.append(("verdict", ok, text))

    def ul(self, items: Sequence[str]) -> None:
        self.blocks.append(("ul", list(items)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", list(headers), [[str(c) for c in r] for r in rows]))

    def img(self, name: str, alt: str, png: bytes) -> None:
        self.blocks.append(("img", name, alt, base64.b64encode(png).decode("ascii")))


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; max-width: 72rem; margin: 2rem auto; padding: 0 1rem; color: #1f2328; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.25rem; margin-top: 2rem; border-bottom: 1px solid #d0d7de; padding-bottom: .2rem; }
table { border-collapse: collapse; margin: .6rem 0; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
.verdict { padding: .7rem 1rem; border-radius: 6px; font-weight: 600; }
.verdict.ok { background: #dafbe1; border: 1px solid #4ac26b; }
.verdict.bad { background: #ffebe9; border: 1px solid #ff8182; }
img { max-width: 100%; }
"""


def _render_html(doc: _Doc) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">', f"<title>{e(doc.title)}</title>",
           f"<style>{_CSS}</style>", "</head>", "<body>", f"<h1>{e(doc.title)}</h1>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h2>{e(b[1])}</h2>")
        elif kind == "p":
            out.append(f"<p>{e(b[1])}</p>")
        elif kind == "verdict":
            out.append(f'<p class="verdict {"ok" if b[1] else "bad"}">{e(b[2])}</p>')
        elif kind == "ul":
            out.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif kind == "table":
            head = "".join(f"<th>{e(h)}</th>" for h in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in b[2])
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "img":
            out.append(f'<p><img alt="{e(b[2])}" src="data:image/png;base64,{b[3]}"></p>')
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


_MD_SPECIAL = str.maketrans({c: "\\" + c for c in "\\`*_[]<>#|!"})


def _md(text: str) -> str:
    """Markdown-safe text: special characters escaped, one line."""
    return " ".join(str(text).split()).translate(_MD_SPECIAL)


def _render_md(doc: _Doc) -> str:
    out = [f"# {_md(doc.title)}", ""]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out += [f"## {_md(b[1])}", ""]
        elif kind == "p":
            out += [_md(b[1]), ""]
        elif kind == "verdict":
            out += [f"> **{_md(b[2])}**", ""]
        elif kind == "ul":
            out += [f"- {_md(i)}" for i in b[1]] + [""]
        elif kind == "table":
            out.append("| " + " | ".join(_md(h) for h in b[1]) + " |")
            out.append("|" + "---|" * len(b[1]))
            out += ["| " + " | ".join(_md(c) for c in r) + " |" for r in b[2]]
            out.append("")
        elif kind == "img":
            out += [f"![{_md(b[2])}]({b[1]})", ""]
    return "\n".join(out)


# --- sections ---------------------------------------------------------------------------------


def _verdict(doc: _Doc, rep: Report, led: _Ledger, ledger: Path, series: Sequence[_Series]) -> None:
    doc.h("Verdict")
    recomputed_with = "; ".join(f"{a}: {accountant_version(a)}" for a in sorted({s.accountant for s in series} or {_DEFAULT_ACCOUNTANT}))
    what = "run ledger" if rep.run_ledger else "node ledger" if rep.lines else "ledger"
    if rep.exit_code == ExitCode.OK:
        doc.verdict(True, f"verified: every chain, signature, claim and budget checks out ({rep.lines} entries, {what})")
    elif rep.exit_code == ExitCode.LEDGER_ABORTED and rep.abort is not None:
        a = rep.abort
        doc.verdict(True, f"verified, run aborted: the run ended with the coordinator's signed abort at line {a['line']} (reason {a['reason']}, "
                          f"exit {a['exit_code']}, partner codes {a.get('codes') or 'none'}); every chain, signature, claim and budget "
                          f"before it checks out ({rep.lines} entries, {what})")
    else:
        code = rep.exit_code
        doc.verdict(False, f"NOT verified: exit code {int(code)} ({code.name}), {len(rep.findings)} finding(s)")
        doc.table(["line", "finding", "exit code", "message"],
                  [["—" if f.line is None else f.line, f.code.name.lower(), int(f.code), f.message] for f in rep.findings])
        doc.p("Everything below shows what the ledger says; it did not verify, so none of it is established.")
    doc.ul([
        f"ledger: {ledger}",
        f"entries: {len(led.entries)}; runs: {', '.join(led.runs) or 'none'}",
        f"recomputed with {recomputed_with}; the checks are those of fedcollab audit verify",
        f"generated: {_dt.datetime.now(_dt.UTC).strftime('%Y-%m-%d %H:%M:%S UTC')}",
    ])
    if led.unreadable:
        doc.p("Lines that could not be read as ledger entries:")
        doc.table(["line", "problem"], led.unreadable)


def _overview(doc: _Doc, led: _Ledger, roster: Roster) -> None:
    doc.h("Entries")
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for ln in led.entries:
        counts[str(ln.entry.get("party"))][str(ln.entry.get("kind"))] += 1
    rows = []
    for party in sorted(counts):
        entry = roster.parties.get(party)
        kinds = ", ".join(f"{k}: {n}" for k, n in sorted(counts[party].items()))
        rows.append([party, entry.role if entry else "not in roster", sum(counts[party].values()), kinds,
                     "complete (from seq 0)" if led.complete.get(party) else "partial (starts after seq 0)"])
    if rows:
        doc.table(["party", "role", "entries", "by kind", "history in this ledger"], rows)
    else:
        doc.p("The ledger holds no readable entries.")


def _epsilon_section(doc: _Doc, led: _Ledger, series: Sequence[_Series], out: Path, written: list[Path]) -> None:
    doc.h("Cumulative ε over rounds")
    if not series:
        doc.p("No release in this ledger was charged to a budget (no noise added by a party about its own training rows).")
        return
    plot = out / PLOT_NAME
    _plot(series, plot, several_runs=len(led.runs) > 1)
    written.append(plot)
    doc.img(PLOT_NAME, "Cumulative epsilon over rounds against each budget", plot.read_bytes())
    doc.p("Lines: epsilon recomputed from the recorded events, composed in ledger order with the claim's accountant and delta; "
          "circles: the total the party claimed when it made the release; dashed: its budget; crosses: refused releases at the "
          "epsilon they would have reached; triangles at the top: infinite epsilon (a release without noise charged to a budget).")
    rows = []
    for s in series:
        last = s.points[-1] if s.points else None
        rec = last.recomputed if last else 0.0
        budget = s.budgets[-1] if s.budgets else None
        left = None if budget is None or rec is None else budget - rec
        match = "—"
        if last is not None and last.claimed is not None and rec is not None:
            match = "yes" if (math.isinf(rec) and math.isinf(last.claimed)) or math.isclose(rec, last.claimed, rel_tol=1e-9, abs_tol=1e-12) \
                else "NO"
        rows.append([*s.key, len(s.points), _eps(last.claimed if last else None), _eps(rec), match, f"{s.delta:g}", s.accountant,
                     _eps(budget, missing="none"), _eps(left) if left is not None and not math.isinf(left) else "—",
                     "complete" if led.complete.get(s.key[0]) else "partial: covers this ledger only"])
    doc.table(["party", "dataset", "unit", "observer", "charged releases", "claimed ε", "recomputed ε", "equal", "δ", "accountant",
               "budget ε", "budget left", "history"], rows)


def _mech_params(m: Any) -> tuple[str, str, str, int]:
    """(σ, q, other parameters, steps or releases) of a mechanism."""
    name = m.mechanism
    if name == "poisson_subsampled_gaussian":
        return _num(m.noise_multiplier), _num(m.sample_rate), "—", int(m.steps)
    if name == "gaussian":
        return _num(m.noise_multiplier), "1 (no subsampling)", "—", int(m.releases)
    if name == "laplace":
        return "—", "—", f"b = {m.scale_b:.4g}, Δ₁ = {m.sensitivity_l1:.4g}", int(m.releases)
    if name == "zcdp":
        return "—", "—", f"ρ = {m.rho:.4g} per release", int(m.releases)
    return "—", "—", "—", 0


def _mechanisms_section(doc: _Doc, led: _Ledger, series: dict[tuple[str, str, str, str], _Series]) -> None:
    doc.h("Mechanisms")
    rows_by: dict[tuple[Any, ...], list[_Rel]] = defaultdict(list)
    for rel in led.releases:
        m = rel.release.mechanism
        if isinstance(m, NonPrivate):
            continue
        sigma, q, other, _ = _mech_params(m)
        rows_by[(rel.author, rel.dataset, rel.release.unit, rel.release.observer, m.mechanism, sigma, q, other, rel.counted)].append(rel)
    if not rows_by:
        doc.p("No release in this ledger carries noise.")
        return
    rows = []
    for key in sorted(rows_by, key=lambda k: tuple(str(x) for x in k)):
        rels = rows_by[key]
        author, dataset, unit, observer, mech, sigma, q, other, counted = key
        s = series.get((author, dataset, unit, observer))
        delta = s.delta if s else _DEFAULT_DELTA
        accountant = s.accountant if s else _DEFAULT_ACCOUNTANT
        versions = sorted({str(r.claim["accountant_version"]) for r in rels if r.claim and "accountant_version" in r.claim})
        eps = _safe_epsilon([r.release.mechanism for r in rels], delta, accountant)
        rows.append([author, dataset, unit, observer, mech, sigma, q, other, sum(_mech_params(r.release.mechanism)[3] for r in rels),
                     len(rels), _ranges(r.round for r in rels), "yes" if counted else "no", _eps(eps, missing="not computable"),
                     f"{delta:g}", accountant, "; ".join(versions) or f"(none recorded; {accountant_version(accountant)})"])
    doc.table(["party", "dataset", "unit", "observer", "mechanism", "σ (noise multiplier)", "q (sample rate)", "other", "steps / releases",
               "entries", "rounds", "charged", "ε of these releases", "δ", "accountant", "accountant version (claimed)"], rows)
    doc.p("ε of each row is recomputed for that row's releases alone at its group's δ; when a group has several rows, "
          "the group's total is in the table above. Steps are summed over the row's entries.")


def _non_private_section(doc: _Doc, led: _Ledger) -> None:
    doc.h("Releases without noise")
    groups: dict[tuple[Any, ...], list[_Rel]] = defaultdict(list)
    for rel in led.releases:
        r = rel.release
        if r.non_private:
            groups[(rel.author, rel.dataset, r.kind, r.about, r.observer, r.declared_public, rel.counted)].append(rel)
    if not groups:
        doc.p("Every release in this ledger carries noise.")
        return
    rows = []
    for key in sorted(groups, key=lambda k: tuple(str(x) for x in k)):
        rels = groups[key]
        author, dataset, kind, about, observer, public, counted = key
        details = {json.dumps(r.release.details, sort_keys=True) for r in rels}
        d = ", ".join(f"{k}: {v}" for k, v in sorted(rels[0].release.details.items())) if len(details) == 1 else \
            "varies: " + ", ".join(sorted({k for r in rels for k in r.release.details}))
        rows.append([author, dataset, kind, about, observer, _ranges(r.round for r in rels), len(rels), "yes" if public else "no",
                     "yes (ε = ∞)" if counted else "no", d or "—"])
    doc.table(["party", "dataset", "kind", "about", "observer", "rounds", "releases", "declared public", "charged to budget", "details"], rows)
    doc.p("Test-split metrics and releases declared public are not charged to a budget; a release without noise about training "
          "rows is charged and makes epsilon infinite (only a partner's policy can allow it).")


def _code_name(code: Any) -> str:
    try:
        return f"{int(code)} ({NodeErrorCode(int(code)).name})"
    except (TypeError, ValueError):
        return str(code)


def _refusals_section(doc: _Doc, led: _Ledger) -> None:
    doc.h("Refusals")
    if not led.refusals:
        doc.p("No release was refused.")
        return
    rows = []
    for ln, body in led.refusals:
        r = body.get("release") if isinstance(body.get("release"), dict) else {}
        b = body.get("budget") if isinstance(body.get("budget"), dict) else {}
        try:
            would = _eps(_f(body.get("would_be_epsilon")))
            budget = _eps(_f(b.get("epsilon")), missing="none")
        except (TypeError, ValueError):
            would, budget = str(body.get("would_be_epsilon")), str(b.get("epsilon"))
        what = f"{r.get('kind')} about {r.get('about')}" if r else "request (not a release)"
        rows.append([ln.number, ln.entry.get("party"), ln.entry.get("run_id"), ln.entry.get("round"), body.get("dataset"), what,
                     _code_name(body.get("code")), body.get("reason"), would, budget])
    doc.table(["line", "party", "run", "round", "dataset", "refused", "code", "reason", "would-be ε", "budget ε"], rows)


def _compact(body: Any, limit: int = 300) -> str:
    text = json.dumps(body, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _custody_section(doc: _Doc, led: _Ledger, roster: Roster) -> None:
    doc.h("Key custody")
    rows = []
    for name, entry in sorted(roster.parties.items()):
        rows.append([name, entry.role, key_fingerprint(entry.signing_key), entry.flower_node_key or "none"])
    doc.table(["party", "role", "signing key fingerprint", "Flower node key"], rows)
    items = [
        "Signing keys (Ed25519): each party's private key is generated at that party (the node's home, or the coordinator's "
        "folder: signing_key.pem, mode 0600) and held by it alone. The roster, obtained out of band, holds only the public "
        "keys; a fingerprint is the first 16 hex digits of SHA-256 over the raw public key.",
        "Commitment nonces stay at each node (nonces.jsonl, mode 0600): with one, the partner can open a release's commitment "
        "to an auditor.",
    ]
    if led.custody:
        items.append("Encryption keys: the ledger records their custody below (entries of kind key_custody).")
    else:
        items.append("Encryption keys: this ledger has no key custody entries (plain aggregation), so there are no encryption "
                      "keys: the coordinator sees each partner's (noised) update. When HE is used, its key custody records "
                      "(entries of kind key_custody: who generated, holds and can use each key) will appear here.")
    doc.ul(items)
    if led.custody:
        doc.table(["line", "party", "run", "round", "record"],
                  [[ln.number, ln.entry.get("party"), ln.entry.get("run_id"), ln.entry.get("round"), _compact(ln.entry.get("body"))]
                   for ln in led.custody])
    seen: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for rel in led.releases:
        seen[rel.release.observer][rel.author].add(rel.release.kind)
    if seen:
        doc.p("Who sees what (each release names the party that observes it):")
        doc.table(["observer", "party", "release kinds seen"],
                  [[obs, author, ", ".join(sorted(kinds))] for obs in sorted(seen) for author, kinds in sorted(seen[obs].items())])


def _aggregates_section(doc: _Doc, led: _Ledger) -> None:
    if not led.aggregates:
        return
    doc.h("Aggregation rounds")
    doc.p("How each round's aggregate was formed under partner-level DP (entries of kind aggregate, signed by the coordinator): "
          "who was invited, whose update is in the sum, who dropped out, the trust threshold and the noise the sum carries.")
    rows = []
    for ln in led.aggregates:
        b = ln.entry.get("body") if isinstance(ln.entry.get("body"), dict) else {}
        summed = b.get("summed") if isinstance(b.get("summed"), list) else []
        dropped = b.get("dropped") if isinstance(b.get("dropped"), list) else []
        rows.append([ln.number, ln.entry.get("run_id"), ln.entry.get("round"), b.get("mode"), b.get("aggregation"), len(summed),
                     ", ".join(map(str, dropped)) or "none", b.get("threshold", "—"), b.get("t_min", "—"), b.get("colluders", "—"),
                     _num_or_text(b.get("noise_std_on_sum")), _num_or_text(b.get("wraparound_bound")) if "wraparound_bound" in b else "—"])
    doc.table(["line", "run", "round", "mode", "aggregation", "summed", "dropped", "threshold", "t_min", "colluders",
               "noise std on sum", "wrap-around bound"], rows)


def _scoring_section(doc: _Doc, led: _Ledger) -> None:
    if not led.scoring:
        return
    doc.h("Encrypted scoring")
    doc.p("Scoring requests this model holder answered or refused (entries of kind scoring): one scored row is one query "
          "against the querier's budget; a linear model with d features is recovered from about d + 1 rows.")
    rows = []
    for ln in led.scoring:
        b = ln.entry.get("body") if isinstance(ln.entry.get("body"), dict) else {}
        rows.append([ln.number, ln.entry.get("party"), b.get("querier"), b.get("querier_key") or "unknown", str(b.get("model", ""))[:16],
                     b.get("rows"), b.get("rows_before"), b.get("budget"), b.get("outcome"),
                     _code_name(b.get("code")) if b.get("code") is not None else "", b.get("reason", "")])
    doc.table(["line", "holder", "querier", "querier key", "model", "rows", "rows before", "budget", "outcome", "code", "reason"], rows)


def _unknown_section(doc: _Doc, led: _Ledger) -> None:
    if not led.unknown:
        return
    doc.h("Other entries")
    doc.p("Entries of kinds this report does not know, listed as they are:")
    doc.table(["line", "party", "kind", "run", "round", "body"],
              [[ln.number, ln.entry.get("party"), ln.entry.get("kind"), ln.entry.get("run_id"), ln.entry.get("round"),
                _compact(ln.entry.get("body"))] for ln in led.unknown])


# --- entry point ------------------------------------------------------------------------------


def write_report(ledger: str | Path, roster: Roster, out: str | Path) -> list[Path]:
    """Verify ``ledger`` against ``roster`` and write ``report.html``, ``report.md`` and the ε plot into ``out``.

    Returns the paths written. A ledger that does not verify is reported, never raised.
    """
    ledger, out = Path(ledger), Path(out)
    try:
        rep = verify_ledger(ledger, roster)
    except (FedcollabError, KeyError, TypeError, ValueError) as exc:
        rep = Report(findings=[Finding(ExitCode.LEDGER_UNREADABLE, None, f"verification failed: {exc}")])
    led = _read(ledger)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    doc = _Doc(f"Privacy ledger report: {ledger.name}")
    series = _series(led, _x_offsets(led))
    _verdict(doc, rep, led, ledger, series)
    _overview(doc, led, roster)
    _epsilon_section(doc, led, series, out, written)
    _mechanisms_section(doc, led, {s.key: s for s in series})
    _non_private_section(doc, led)
    _refusals_section(doc, led)
    _aggregates_section(doc, led)
    _scoring_section(doc, led)
    _custody_section(doc, led, roster)
    _unknown_section(doc, led)
    for name, text in ((HTML_NAME, _render_html(doc)), (MD_NAME, _render_md(doc))):
        p = out / name
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written


__all__ = ["write_report"]
