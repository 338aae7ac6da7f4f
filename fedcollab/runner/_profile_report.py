"""``profile.html``: the AI-readiness report of a profile, self-contained (inline CSS, PNGs as base64).

Same conventions as ``fedcollab audit report``: matplotlib through its object API and the Agg
canvas (no pyplot state), every text escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

import numpy as np

from fedcollab.protocols.profile import Profile
from fedcollab.spec import Spec

_CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f3f3f3}td:first-child{text-align:left}.warning{color:#a60}.error{color:#b00}.info{color:#06c}"
        "img{max-width:100%}")


def _png(fig: object) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)  # type: ignore[arg-type]
    return base64.b64encode(buf.getvalue()).decode()


def shown_usable(rows: float, usable: float) -> float:
    """Usable rows as displayed: at most the rows (both are noisy; projecting onto usable <= rows is post-processing)."""
    return min(max(usable, 0.0), max(rows, 0.0))


def shown_hist(counts: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Normalised bar heights and their noise error bars for one silo's noisy histogram.

    Bins whose noisy count is below 2 sigma are drawn as 0: they are indistinguishable from an empty
    bin, and drawing them paints bars past the data's range. Post-processing only: no new release.
    """
    h = np.asarray(counts, dtype=np.float64)
    h = np.where(h >= 2 * sigma, h, 0.0)
    total = h.sum()
    if total <= 0:
        return h, np.zeros_like(h)
    return h / total, np.where(h > 0, sigma / total, 0.0)


def _hist_figure(prof: Profile, features: list[str]) -> str:
    from matplotlib.figure import Figure

    cols = 3
    rows = math.ceil(len(features) / cols)
    fig = Figure(figsize=(4 * cols, 2.6 * rows), layout="constrained")
    blocks = {b.column: b for b in prof.blocks if b.kind == "hist"}
    for i, f in enumerate(features):
        ax = fig.add_subplot(rows, cols, i + 1)
        b = blocks[f]
        labels = list(b.levels) if b.levels else [f"{x:g}" for x in b.edges()[:-1]]
        x = np.arange(len(labels))
        width = 0.8 / max(len(prof.silos), 1)
        for j, s in enumerate(prof.silos):
            h, err = shown_hist(np.asarray(s.hists[f]), prof.plan.sigma_rest)
            ax.bar(x + j * width, h, width=width, label=s.name, yerr=err, error_kw={"elinewidth": 0.6, "capsize": 1.5})
        ax.set_title(f, fontsize=9)
        ax.set_xticks(x + 0.4 - width / 2, labels, fontsize=6, rotation=45)
        ax.tick_params(axis="y", labelsize=6)
    if prof.silos:
        fig.axes[0].legend(fontsize=6)
    fig.suptitle("Per-feature distributions (noisy, normalised per silo; bars: ±1 noise std; bins below 2 std not drawn)", fontsize=10)
    return _png(fig)


def _missing_figure(prof: Profile, columns: list[str]) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1 + 0.5 * len(columns), 1 + 0.45 * len(prof.silos)), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    m = np.array([[min(max(s.missing.get(c, 0.0) / s.rows, 0.0), 1.0) if s.rows > 0 else 0.0 for c in columns] for s in prof.silos])
    im = ax.imshow(m, vmin=0, vmax=1, cmap="Oranges", aspect="auto")
    ax.set_xticks(range(len(columns)), columns, rotation=60, fontsize=7)
    ax.set_yticks(range(len(prof.silos)), [s.name for s in prof.silos], fontsize=8)
    fig.colorbar(im, ax=ax, label="share missing (noisy)")
    return _png(fig)


def _label_figure(prof: Profile) -> str:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 2.5), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    names = [s.name for s in prof.silos]
    pos = [max(s.usable_pos, 0) for s in prof.silos]
    neg = [max(s.usable_neg, 0) for s in prof.silos]
    sd = prof.plan.sigma_core
    ax.barh(names, neg, label="negative", color="#4a90d9", xerr=[sd] * len(names), error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.barh(names, pos, left=neg, label="positive", color="#d9534f", xerr=[sd] * len(names), error_kw={"elinewidth": 0.8, "capsize": 2})
    ax.set_xlabel(f"usable rows (noisy; error bars ±{sd:.1f}, one noise std)")
    ax.legend(fontsize=7)
    return _png(fig)


def write_profile_report(prof: Profile, spec: Spec, out: str | Path) -> Path:
    """Write ``OUT/profile.html`` and return its path."""
    e = html.escape
    features = list(spec.data_schema.features)
    columns = [c.name for c in spec.data_schema.columns]
    p = prof.plan
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>AI-readiness profile: {e(spec.name)}</title><style>{_CSS}</style></head><body>",
             f"<h1>AI-readiness profile: {e(spec.name)}</h1>",
             f"<p>Each silo released its figures with its own Gaussian noise (record level, against the coordinator), "
             f"&epsilon; = {p.epsilon:g}, &delta; = {p.delta:g} per silo, charged to its budget: noise std {p.sigma_core:.2f} on row and label "
             f"counts, {p.sigma_rest:.2f} on missing counts, histograms and zero counts. Totals are sums of the noisy figures.</p>",
             "<h2>Findings</h2>"]
    if prof.findings:
        parts.append("<ul>" + "".join(f"<li class='{e(f['level'])}'><b>{e(f['level'])}</b>: {e(f['message'])}</li>" for f in prof.findings) + "</ul>")
    else:
        parts.append("<p>No findings.</p>")
    sd_rows, sd_usable = p.sigma_core, math.sqrt(2.0) * p.sigma_core  # usable = positive + negative: two noisy counts
    parts.append(f"<h2>Silos</h2><p>Rows and usable rows (rows with every feature and the label) are separate noisy counts "
                 f"(noise std {sd_rows:.1f} and {sd_usable:.1f}); usable rows are shown at most equal to rows.</p>"
                 "<table><tr><th>silo</th><th>schema</th><th>rows</th><th>usable rows</th><th>positive rate</th></tr>")
    for s in prof.silos:
        rate = "n/a" if s.positive_rate is None else f"{s.positive_rate:.2f}"
        parts.append(f"<tr><td>{e(s.name)}</td><td>conforms</td><td>{s.rows:.0f} ± {sd_rows:.0f}</td>"
                     f"<td>{shown_usable(s.rows, s.usable):.0f} ± {sd_usable:.0f}</td><td>{rate}</td></tr>")
    for name, code in sorted(prof.failed.items()):
        parts.append(f"<tr><td>{e(name)}</td><td class='error'>refused (code {code})</td><td></td><td></td><td></td></tr>")
    total_rows = sum(s.rows for s in prof.silos)
    total_usable = sum(shown_usable(s.rows, s.usable) for s in prof.silos)
    parts.append(f"<tr><th>total</th><th></th><th>{total_rows:.0f}</th><th>{total_usable:.0f}</th><th></th></tr></table>")
    if prof.silos:
        parts.append("<h2>Label balance</h2>" f"<img alt='label balance' src='data:image/png;base64,{_label_figure(prof)}'>")
        parts.append("<h2>Missing values</h2>" f"<img alt='missing values' src='data:image/png;base64,{_missing_figure(prof, columns)}'>")
        parts.append("<h2>Distributions</h2>" f"<img alt='distributions' src='data:image/png;base64,{_hist_figure(prof, features)}'>")
        parts.append("<h2>Drift between silos</h2><p>Total variation distance between a silo's histogram and the other silos' pooled histogram.</p>")
        parts.append("<table><tr><th>feature</th>" + "".join(f"<th>{e(s.name)}</th>" for s in prof.silos) + "</tr>")
        for f in features:
            cells = "".join(f"<td>{prof.drift.get(f, {}).get(s.name, float('nan')):.2f}</td>" for s in prof.silos)
            parts.append(f"<tr><td>{e(f)}</td>{cells}</tr>")
        parts.append("</table>")
    parts.append("</body></html>\n")
    path = Path(out) / "profile.html"
    path.write_text("".join(parts))
    return path
