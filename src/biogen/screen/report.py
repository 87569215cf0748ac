"""The screen job's report: one self-contained HTML file with tables and plots.

The screen pipeline fills a :class:`ReportData` and calls :func:`write_report`. The file
references nothing outside itself: plots are PNGs and structures are SVGs, both embedded
as base64 ``data:`` URIs; CSS is inline and there is no script. It can be mailed,
archived with the run, or opened offline.

Sections, in order (each is an element with a fixed ``id``, which tests rely on):
``notes`` (warnings, only when there are any), ``summary`` (key facts, and the
enrichment headline when labels are known), ``funnel``, ``scores``, ``enrichment``,
``property-space``, ``structures``, ``hits``, ``timing``, ``config``, ``versions``.
A section without data says so ("no data: ...") instead of drawing an empty plot, so a
screen whose filters removed every molecule still gets a complete report.

Plots are drawn on ``matplotlib.figure.Figure`` objects directly, never through
``pyplot``: ``Figure.savefig`` renders PNG with the Agg canvas, so the process-wide
backend and pyplot's figure registry are left untouched, and style settings are applied
with ``rc_context`` (restored on exit). Large inputs stay cheap: histograms are binned
with numpy before matplotlib sees them, the enrichment curve is drawn at a few hundred
points whatever the library size, and scatter plots draw a seeded random sample of the
library (``MAX_SCATTER_POINTS``). A 1M-molecule screen gives a report of well under 1 MB.
"""

from __future__ import annotations

import base64
import datetime as _dt
import functools
import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from biogen.files import atomic_path
from biogen.screen.metrics import EnrichmentMetrics, NullModel, TieCounts

__all__ = ["ReportData", "ReportEnrichment", "write_report", "render_report", "MAX_TABLE_ROWS", "MAX_SCATTER_POINTS"]

MAX_TABLE_ROWS = 100  # rows of the hits table written into the HTML
MAX_SCATTER_POINTS = 20_000  # library points drawn in each property-space panel (seeded sample)
MAX_SCATTER_HITS = 5_000  # hit points drawn in each property-space panel
HIST_BINS = 60
CURVE_POINTS = 400  # points per enrichment-curve panel
SCATTER_SEED = 0
REQUIRED_HIT_COLUMNS = ("rank", "id", "smiles", "score")
STRUCTURE_SIZE = (260, 200)  # pixels per drawn structure

_LIBRARY_COLOR = "#9aa5b1"
_HIT_COLOR = "#d1495b"
_ACCENT = "#1f5f8b"


@dataclass
class ReportData:
    """Everything the screen report shows. Arrays are numpy, the hits table is Arrow.

    title: page title, e.g. ``"biogen screen: CHEMBL204_Ki vs moses_test (176,289 molecules)"``.
    summary: ordered key facts shown as a table at the top (library, molecules, target,
        actives, hits, engine, wall time, run dir ...).
    funnel: ``("library", N)`` then ``(stage name, molecules remaining after it)`` in order.
    stage_seconds: wall time per stage, including build/train/io rows.
    scores: score name -> float array (shape N_reached) of the molecules that reached that
        scorer; NaN means not scored. One histogram panel per score.
    hits: ranked hits with at least the columns ``rank, id, smiles, score`` (fused score),
        plus per-stage score columns and optionally ``scaffold``, ``label``. An empty
        table (any columns) means no hits.
    property_space: ``{"library": {"mw": a, "clogp": b, "tpsa": c}, "hits": {...}}`` with
        1-D arrays of equal length per group (the library may be a random sample);
        ``tpsa`` is optional. None: the section says it was not computed.
    enrichment: a ``ReportEnrichment`` when labels are known (the metrics are shown as
        given: the pipeline owns their definitions; the curves are computed here from the
        scores and labels). None: labels unknown.
    config_yaml: the composed configuration, shown collapsed.
    notes: warnings shown prominently at the top, e.g. "filters removed every molecule".
    versions: package name -> version, shown at the bottom.
    n_structures: number of top hits drawn in the structure grid.
    """

    title: str
    summary: dict[str, object]
    funnel: list[tuple[str, int]]
    stage_seconds: list[tuple[str, float]]
    scores: dict[str, np.ndarray]
    hits: pa.Table
    property_space: dict[str, dict[str, np.ndarray]] | None
    enrichment: "ReportEnrichment | None"
    config_yaml: str
    notes: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    n_structures: int = 24
    sections: list["ReportSection"] = field(default_factory=list)


@dataclass
class ReportEnrichment:
    """How the screen ranked the labelled actives.

    scores: the fused score of every molecule (filtered-out ones -inf; shape N); labels:
    bool N; metrics: the screen's ``EnrichmentMetrics``; label_name: what the labels are;
    null: the property null model (``NullModel``: its curve and metrics are drawn beside
    the screen's), or None when the library stores no property to rank by; details: more
    rows for the metrics table (actives through the funnel...)."""

    scores: np.ndarray
    labels: np.ndarray
    metrics: EnrichmentMetrics
    label_name: str = "labelled actives"
    null: NullModel | None = None
    details: dict = field(default_factory=dict)
    null_scores: np.ndarray | None = None  # the null model's ranking (shape N), for its curve
    # a streaming screen gives its rankings as tie counts instead (scores and labels empty):
    # the curves then come from the counts (``metrics.TieCounts``)
    counts: TieCounts | None = None
    null_counts: TieCounts | None = None


@dataclass
class ReportSection:
    """A stage's own section (e.g. the protein-aware model and its panel): key facts and
    tables (caption, pyarrow table), shown after the enrichment."""

    title: str
    facts: dict[str, object] = field(default_factory=dict)
    tables: list[tuple[str, pa.Table]] = field(default_factory=list)
    intro: str = ""


def write_report(data: ReportData, path: str | Path) -> Path:
    """Render ``data`` to one self-contained HTML file at ``path``; returns the path.

    The file is written next to its destination and renamed into place, so a reader never
    sees half a report. Parent directories are created.
    """
    path = Path(path)
    text = render_report(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def render_report(data: ReportData) -> str:
    """The report as an HTML string (what :func:`write_report` writes)."""
    _check(data)
    notes = list(data.notes) + _derived_notes(data)
    structures_html, undrawable = _structures_section(data)
    if _drawing()[0] is None and data.hits.num_rows:
        notes.append(f"Structures are not drawn: {_drawing()[1]}.")
    if undrawable:
        shown = ", ".join(undrawable[:10]) + (" ..." if len(undrawable) > 10 else "")
        notes.append(f"{len(undrawable)} of the top hits could not be drawn (SMILES RDKit "
                     f"cannot parse): {shown}")
    sections = [
        _notes_section(notes),
        _summary_section(data),
        _funnel_section(data),
        _scores_section(data),
        _enrichment_section(data),
        *(_stage_section(i, sec) for i, sec in enumerate(data.sections)),
        _property_section(data),
        structures_html,
        _hits_section(data),
        _timing_section(data),
        _config_section(data),
        _versions_section(data),
    ]
    generated = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")
    toc_items = list(_TOC)
    at = [sid for sid, _ in toc_items].index("property-space")
    toc_items[at:at] = [(f"stage-{i}", sec.title) for i, sec in enumerate(data.sections)]
    toc = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name in toc_items)
    return _PAGE.format(
        title=_e(data.title),
        css=_CSS,
        generated=_e(generated),
        toc=toc,
        body="\n".join(s for s in sections if s),
    )


# ----------------------------------------------------------------------------- checks


def _check(data: ReportData) -> None:
    """Refuse inputs that break the contract, naming the field (programming errors)."""
    if not isinstance(data.hits, pa.Table):
        raise TypeError(f"ReportData.hits must be a pyarrow.Table, got {type(data.hits).__name__}")
    if data.hits.num_rows:
        missing = [c for c in REQUIRED_HIT_COLUMNS if c not in data.hits.column_names]
        if missing:
            raise ValueError(f"ReportData.hits lacks column(s) {missing}; it has "
                             f"{data.hits.column_names}, expected at least {list(REQUIRED_HIT_COLUMNS)}")
    if data.enrichment is not None:
        if not isinstance(data.enrichment, ReportEnrichment):
            raise TypeError(f"ReportData.enrichment must be a ReportEnrichment or None, got "
                            f"{type(data.enrichment).__name__}")
        if data.enrichment.counts is not None:
            return
        n_s = len(data.enrichment.scores)
        n_l = len(data.enrichment.labels)
        if n_s != n_l:
            raise ValueError(f"ReportData.enrichment: {n_s} scores but {n_l} labels; "
                             "they must describe the same molecules")
        if data.enrichment.null_scores is not None and len(data.enrichment.null_scores) != n_s:
            raise ValueError(f"ReportData.enrichment: {len(data.enrichment.null_scores)} null-model scores but "
                             f"{n_s} scores; they must describe the same molecules")


def _derived_notes(data: ReportData) -> list[str]:
    """Warnings the report can state from the data itself (added after the given notes)."""
    out: list[str] = []
    for (prev_name, prev_n), (name, n) in zip(data.funnel, data.funnel[1:]):
        if prev_n > 0 and n == 0:
            out.append(f"stage '{name}' removed every remaining molecule "
                       f"({prev_n:,} -> 0): nothing reached the later stages")
            break
    if data.funnel and data.funnel[0][1] == 0:
        out.append("the library is empty: nothing was screened")
    if data.hits.num_rows == 0:
        text = "no hits: the screen selected no molecules"
        if not any("no hits" in n.lower() for n in data.notes):
            out.append(text)
    return out


# ----------------------------------------------------------------------------- formatting


def _e(value: object) -> str:
    """HTML-escape any value's text (quotes included, safe in attributes)."""
    return html.escape(str(value), quote=True)


def _fmt(value: object) -> str:
    """A value as display text: thousands separators for ints, 4 significant digits."""
    if value is None:
        return "–"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "–"
        if math.isinf(v):
            return "∞" if v > 0 else "-∞"
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        if abs(v) >= 1000:
            return f"{v:,.1f}"
        return f"{v:.4g}"
    return str(value)


def _cell(value: object, column: str) -> str:
    """One hits-table cell; ids and ranks are shown without thousands separators."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) \
            and column in ("rank", "id", "index", "row"):
        return str(int(value))
    return _fmt(value)


def _mpl_text(text: object) -> str:
    """Text for a matplotlib label: '$' would start mathtext, so escape it."""
    return str(text).replace("$", r"\$")


def _seconds(s: float) -> str:
    if s >= 3600:
        return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"
    if s >= 60:
        return f"{int(s // 60)} min {s % 60:04.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1000:.0f} ms"


def _nodata(reason: str) -> str:
    return f'<div class="nodata">no data: {_e(reason)}</div>'


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], cls: str = "") -> str:
    """An HTML table from already-escaped cell strings."""
    head = "".join(f"<th>{h}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _section(sid: str, title: str, body: str, intro: str = "") -> str:
    intro_html = f'<p class="intro">{intro}</p>' if intro else ""
    return f'<section id="{sid}"><h2>{_e(title)}</h2>{intro_html}{body}</section>'


def _figure(uri: str, alt: str, caption: str, cls: str = "plot") -> str:
    return (f'<figure class="{cls}"><img src="{uri}" alt="{_e(alt)}">'
            f"<figcaption>{caption}</figcaption></figure>")


# ----------------------------------------------------------------------------- matplotlib


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png_uri(fig) -> str:
    """Render with Agg (Figure.savefig needs no pyplot and no global backend)."""
    import matplotlib

    buf = io.BytesIO()
    with matplotlib.rc_context(_RC):
        fig.savefig(buf, format="png", dpi=110, facecolor="white")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plot(draw, width: float, height: float) -> str:
    """Create a figure under the report's rc settings, let ``draw(fig)`` fill it, encode it."""
    import matplotlib

    with matplotlib.rc_context(_RC):
        fig = _new_figure(width, height)
        draw(fig)
        return _png_uri(fig)


_RC = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "legend.frameon": False,
    "legend.fontsize": 8,
}


# ----------------------------------------------------------------------------- sections


_TOC = [
    ("summary", "Summary"),
    ("funnel", "Funnel"),
    ("scores", "Scores"),
    ("enrichment", "Enrichment"),
    ("property-space", "Property space"),
    ("structures", "Structures"),
    ("hits", "Hits"),
    ("timing", "Timing"),
    ("config", "Configuration"),
]


def _notes_section(notes: list[str]) -> str:
    if not notes:
        return ""
    items = "".join(f"<li>{_e(n)}</li>" for n in notes)
    return f'<section id="notes" class="notes"><h2>Warnings</h2><ul>{items}</ul></section>'


def _headline(enr: ReportEnrichment) -> str:
    """The result in one line: actives recovered in the top 1 %, EF1 %, BEDROC, AUROC, and
    what ranking by a simple property alone gives (the null model)."""
    m = enr.metrics
    tiles = [("recovered in top 1%", f"{_fmt(m.recovered_top_1pct)} / {_fmt(m.n_actives)}"),
             ("EF1%", _fmt(m.ef1)), ("BEDROC20", _fmt(m.bedroc20)), ("AUROC", _fmt(m.auroc))]
    tiles_html = "".join(f'<div class="tile"><div class="value">{_e(v)}</div>'
                         f'<div class="label">{_e(k)}</div></div>' for k, v in tiles)
    null = ""
    if enr.null is not None:
        n = enr.null.metrics
        null = (f'<div class="caption">Null model, ranking by {_e(enr.null.label)} alone: '
                f"EF1% {_e(_fmt(n.ef1))}, AUROC {_e(_fmt(n.auroc))} (what the actives' size alone gives)</div>")
    return (f'<div class="headline" id="headline"><div class="tiles">{tiles_html}</div>'
            f'<div class="caption">Labels: {_e(enr.label_name or "labelled actives")}</div>{null}</div>')


def _summary_section(data: ReportData) -> str:
    rows = [(_e(k), _e(_fmt(v))) for k, v in data.summary.items()]
    table = _table(["", ""], rows, cls="kv") if rows else _nodata("no summary given")
    headline = _headline(data.enrichment) if data.enrichment is not None else ""
    return _section("summary", "Summary", headline + table)


def _funnel_section(data: ReportData) -> str:
    funnel = [(str(n), int(c)) for n, c in data.funnel]
    if not funnel:
        return _section("funnel", "Funnel", _nodata("no stages recorded"))
    total = funnel[0][1]
    rows = []
    prev = None
    for name, n in funnel:
        share = f"{100.0 * n / total:.3g} %" if total else "–"
        removed = "" if prev is None else f"{prev - n:,}"
        rows.append((_e(name), f"{n:,}", removed, share))
        prev = n
    table = _table(["stage", "molecules remaining", "removed", "of library"], rows, cls="num")

    def draw(fig):
        from matplotlib.ticker import EngFormatter

        ax = fig.add_subplot()
        names = [_mpl_text(n) for n, _ in funnel]
        counts = np.array([c for _, c in funnel], dtype=float)
        y = np.arange(len(funnel))
        positive = counts[counts > 0]
        log = positive.size > 0 and positive.max() / positive.min() > 100
        ax.barh(y, np.where(counts > 0, counts, np.nan), color=_ACCENT, height=0.6)
        if log:
            ax.set_xscale("log")
            ax.minorticks_off()  # log minor ticks: a third of the report's drawing time
            ax.set_xlim(max(0.5, positive.min() / 3), positive.max() * 8)
        else:
            ax.set_xlim(0, max(1.0, counts.max()) * 1.25)
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 200k, 1M rather than a 1e6 offset
        for yi, c in zip(y, counts):
            text = f"{int(c):,}" + (f"  ({100 * c / total:.3g}%)" if total else "")
            x = c if c > 0 else (ax.get_xlim()[0] if not log else max(0.5, positive.min() / 3))
            ax.text(x, yi, "  " + text, va="center", fontsize=8,
                    color=_HIT_COLOR if c == 0 else "black")
        ax.set_yticks(y, names)
        ax.set_ylim(len(funnel) - 0.5, -0.5)  # first stage on top; NaN bars break autoscaling
        ax.set_xlabel("molecules remaining" + (" (log scale)" if log else ""))
        ax.grid(axis="y", visible=False)

    uri = _plot(draw, 8.0, 0.45 * len(funnel) + 1.0)
    fig = _figure(uri, "funnel", "Molecules remaining after each stage, starting from the library.")
    return _section("funnel", "Funnel", fig + table)


def _finite(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64).ravel()
    return a[np.isfinite(a)]


def _draw_histograms(fig, stats: list[tuple], binned: dict, cutoffs: dict, nrows: int, ncols: int) -> None:
    """One histogram per score (log y when counts span three decades), the lowest hit marked."""
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.ravel()[len(stats):]:
        ax.set_visible(False)
    for ax, (name, n, vals) in zip(axes.ravel(), stats):
        ax.set_title(_mpl_text(name))
        if name not in binned:
            ax.text(0.5, 0.5, "no data: no molecule scored", ha="center", va="center",
                    transform=ax.transAxes, color="#666")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        counts, edges = binned[name]
        ax.stairs(counts, edges, fill=True, color=_LIBRARY_COLOR, label="scored molecules")
        if counts.max() > 0 and counts[counts > 0].min() * 1000 < counts.max():
            ax.set_yscale("log")
            ax.minorticks_off()  # log minor ticks: a third of the report's drawing time
        if name in cutoffs:
            ax.axvline(cutoffs[name], color=_HIT_COLOR, lw=1.2, ls="--")
        ax.set_xlabel("score")
        ax.set_ylabel("molecules")


def _scores_section(data: ReportData) -> str:
    if not data.scores:
        return _section("scores", "Score distributions", _nodata("no scorer ran"))
    names = list(data.scores)
    cutoffs = {}
    if data.hits.num_rows:
        for name in names:
            if name in data.hits.column_names:
                col = _finite(data.hits.column(name).to_numpy(zero_copy_only=False))
                if col.size:
                    cutoffs[name] = float(col.min())
    stats = []
    binned = {}
    for name in names:
        raw = np.asarray(data.scores[name]).ravel()
        vals = _finite(raw)
        stats.append((name, raw.size, vals))
        if vals.size:
            lo, hi = float(vals.min()), float(vals.max())
            if lo == hi:
                lo, hi = lo - 0.5, hi + 0.5
            binned[name] = np.histogram(vals, bins=HIST_BINS, range=(lo, hi))

    ncols = min(3, len(names))
    nrows = math.ceil(len(names) / ncols)
    uri = _plot(lambda fig: _draw_histograms(fig, stats, binned, cutoffs, nrows, ncols), 3.6 * ncols, 2.7 * nrows)
    rows = []
    for name, n, vals in stats:
        if vals.size:
            q = np.percentile(vals, [50, 99])
            rows.append((_e(name), f"{n:,}", f"{vals.size:,}", _fmt(vals.min()), _fmt(q[0]),
                         _fmt(q[1]), _fmt(vals.max()), _fmt(cutoffs.get(name))))
        else:
            rows.append((_e(name), f"{n:,}", "0", "–", "–", "–", "–", _fmt(cutoffs.get(name))))
    table = _table(["score", "reached", "scored", "min", "median", "99th pct", "max", "lowest hit"],
                   rows, cls="num")
    caption = ("Distribution of each score over the molecules that reached its scorer "
               "(not-scored molecules excluded; log y-axis when counts span three decades). "
               "The red dashed line marks the lowest score among the hits, where the hits "
               "table has that column.")
    return _section("scores", "Score distributions", _figure(uri, "score histograms", caption) + table)


def _enrichment_curve(scores: np.ndarray, labels: np.ndarray):
    """Fraction screened vs fraction of actives found, best score first (NaN/-inf last).

    Tied scores have no order, so within a block of ``m`` tied molecules holding ``k``
    actives each position finds ``k/m`` of an active (the expected count under a random
    order of the block, the convention of ``biogen.screen.metrics``); the curve is exact
    at block ends and straight inside a block (e.g. the tail of filtered molecules).
    Returns (x, y) on a grid of at most ~2 * CURVE_POINTS ranks (log- and linear-spaced)
    from (0, 0) to (1, 1), or None when there are no actives.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    lab = np.asarray(labels, dtype=bool).ravel()
    n = s.size
    n_act = int(np.count_nonzero(lab))
    if n == 0 or n_act == 0:
        return None
    key = np.where(np.isnan(s), -np.inf, s)
    order = np.argsort(-key, kind="stable")
    ks = key[order]
    starts = np.flatnonzero(np.r_[True, ks[1:] != ks[:-1]])  # first position of each tie block
    sizes = np.diff(np.r_[starts, n])
    k_block = np.add.reduceat(lab[order].astype(np.int64), starts)
    before = np.r_[0, np.cumsum(k_block)[:-1]]  # actives ranked above each block
    ranks = _curve_grid(n)
    block = np.searchsorted(starts, ranks - 1, side="right") - 1
    found = before[block] + (ranks - starts[block]) * k_block[block] / sizes[block]
    x = np.concatenate([[0.0], ranks / n])
    y = np.concatenate([[0.0], found / n_act])
    return x, y


def _curve_grid(n: int) -> np.ndarray:
    """The ranks an enrichment curve is drawn at: log- and linear-spaced from 1 to ``n``."""
    return np.unique(np.concatenate([
        np.geomspace(1, n, CURVE_POINTS).astype(np.int64),
        np.linspace(1, n, CURVE_POINTS).astype(np.int64),
    ]))


def _counts_curve(counts: TieCounts):
    """``_enrichment_curve`` from tie counts: the blocks holding actives (start ``greater``,
    size ``equal``, ``actives`` of them), best first; the same grid and tie rule."""
    n, g, e, a = counts.n, counts.greater, counts.equal, counts.actives
    n_act = int(a.sum())
    if n == 0 or n_act == 0:
        return None
    ranks = _curve_grid(n)
    full = np.searchsorted(g + e, ranks, side="right")  # blocks wholly within the first r
    before = np.r_[0, np.cumsum(a)][full]
    nxt = np.minimum(full, len(g) - 1)
    partial = np.where((full < len(g)) & (g[nxt] < ranks), (ranks - g[nxt]) * a[nxt] / e[nxt], 0.0)
    found = before + partial
    return np.concatenate([[0.0], ranks / n]), np.concatenate([[0.0], found / n_act])


def _enrichment_section(data: ReportData) -> str:
    title = "Enrichment"
    if data.enrichment is None:
        return _section("enrichment", title,
                        _nodata("no activity labels for this library, so no enrichment curve"))
    enr = data.enrichment
    label = enr.label_name or "labelled actives"
    if enr.counts is not None:
        curve, n, n_act = _counts_curve(enr.counts), enr.counts.n, int(enr.counts.actives.sum())
        null_curve = None if enr.null_counts is None else _counts_curve(enr.null_counts)
    else:
        curve = _enrichment_curve(enr.scores, enr.labels)
        null_curve = None if enr.null_scores is None else _enrichment_curve(enr.null_scores, enr.labels)
        n = len(enr.scores)
        n_act = int(np.count_nonzero(np.asarray(enr.labels, dtype=bool)))
    screen = enr.metrics.as_dict()
    null = enr.null.metrics.as_dict() if enr.null is not None else {}
    mrows = [(_e(k), _e(_fmt(v)), _e(_fmt(null[k])) if k in null else "") for k, v in screen.items()]
    mrows += [(_e(k), _e(_fmt(v)), "") for k, v in enr.details.items()]
    null_head = f"null model: {enr.null.label}" if enr.null is not None else "null model: no property stored"
    mtable = _table(["metric", "screen", _e(null_head)], mrows, cls="kv num") if mrows else ""
    if curve is None:
        why = "no molecules ranked" if n == 0 else "no actives among the ranked molecules"
        return _section("enrichment", title, _nodata(why) + mtable)
    x, y = curve

    def draw(fig):
        axes = fig.subplots(1, 2)
        for ax, log in zip(axes, (False, True)):
            ax.plot(x, y, color=_ACCENT, lw=1.6, label="screen")
            if null_curve is not None:
                ax.plot(null_curve[0], null_curve[1], color=_LIBRARY_COLOR, lw=1.2, ls="--",
                        label=f"null: {enr.null.label}")
            ax.plot(x[1:], x[1:], color="#888", lw=1, ls=":", label="random")  # same grid: straight on both axes
            for frac, text in ((0.01, "1%"), (0.05, "5%")):
                ax.axvline(frac, color=_HIT_COLOR, lw=0.8, ls="--", alpha=0.7)
                if log:
                    ax.text(frac, 0.94, " " + text, color=_HIT_COLOR, fontsize=7)
            if log:
                ax.set_xscale("log")
                ax.minorticks_off()  # log minor ticks: a third of the report's drawing time
                ax.set_xlim(max(1.0 / n, 1e-5), 1)
                ax.set_title("log fraction screened")
            else:
                ax.set_xlim(0, 1)
                ax.set_title("fraction screened")
            ax.set_ylim(0, 1.02)
            ax.set_xlabel("fraction of library screened (best score first)")
            ax.set_ylabel("fraction of actives found")
            ax.legend(loc="lower right")

    uri = _plot(draw, 9.0, 3.4)
    caption = (f"Enrichment of {_e(label)}: {n_act:,} actives among {n:,} ranked molecules. "
               "Left: linear axis; right: log axis, which shows the early enrichment that "
               "matters for a screen. The dotted line is random ranking"
               + (f"; the dashed line ranks by {_e(enr.null.label)} alone (the null model: what the "
                  "actives' property differences give without any model)." if enr.null is not None else "."))
    return _section("enrichment", title, _figure(uri, "enrichment curve", caption) + mtable)


def _property_section(data: ReportData) -> str:
    title = "Hits in property space"
    ps = data.property_space
    if not ps:
        return _section("property-space", title, _nodata("properties were not computed"))
    lib = {k: np.asarray(v, dtype=np.float64) for k, v in (ps.get("library") or {}).items()}
    hits = {k: np.asarray(v, dtype=np.float64) for k, v in (ps.get("hits") or {}).items()}
    pairs = [("mw", "clogp")]
    if "tpsa" in lib or "tpsa" in hits:
        pairs.append(("mw", "tpsa"))
    pairs = [(a, b) for a, b in pairs if (a in lib and b in lib) or (a in hits and b in hits)]
    if not pairs:
        return _section("property-space", title,
                        _nodata(f"needs 'mw' and 'clogp'; got library {sorted(lib)}, hits {sorted(hits)}"))
    rng = np.random.default_rng(SCATTER_SEED)

    def sample(group: dict, a: str, b: str, cap: int):
        if a not in group or b not in group:
            return np.empty(0), np.empty(0), 0
        xa, xb = group[a], group[b]
        ok = np.flatnonzero(np.isfinite(xa) & np.isfinite(xb))
        total = ok.size
        if ok.size > cap:
            ok = np.sort(rng.choice(ok, size=cap, replace=False))
        return xa[ok], xb[ok], total

    labels = {"mw": "molecular weight (Da)", "clogp": "cLogP", "tpsa": "TPSA (Å²)"}
    drawn = []
    for a, b in pairs:
        drawn.append((a, b, sample(lib, a, b, MAX_SCATTER_POINTS), sample(hits, a, b, MAX_SCATTER_HITS)))

    def draw(fig):
        axes = fig.subplots(1, len(drawn), squeeze=False).ravel()
        for ax, (a, b, (lx, ly, ln), (hx, hy, hn)) in zip(axes, drawn):
            if lx.size:
                lab = f"library ({lx.size:,} of {ln:,})" if lx.size < ln else f"library ({ln:,})"
                ax.scatter(lx, ly, s=3, c=_LIBRARY_COLOR, alpha=0.35, linewidths=0,
                           label=lab, rasterized=True)
            if hx.size:
                lab = f"hits ({hx.size:,} of {hn:,})" if hx.size < hn else f"hits ({hn:,})"
                ax.scatter(hx, hy, s=14, c=_HIT_COLOR, alpha=0.9, linewidths=0.3,
                           edgecolors="white", label=lab, zorder=3)
            if not lx.size and not hx.size:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_xlabel(labels.get(a, a))
            ax.set_ylabel(labels.get(b, b))
            if lx.size or hx.size:
                ax.legend(loc="upper right", markerscale=2)

    uri = _plot(draw, 4.6 * len(drawn), 3.8)
    lib_n = drawn[0][2][2]
    hit_n = drawn[0][3][2]
    caption = (f"Hits (red, {hit_n:,}) against the library (grey, {lib_n:,} with properties"
               + (f"; a seeded random {MAX_SCATTER_POINTS:,} drawn" if lib_n > MAX_SCATTER_POINTS else "")
               + ").")
    if hit_n == 0:
        caption += " No hits to highlight."
    return _section("property-space", title, _figure(uri, "property space", caption))


# ----------------------------------------------------------------------------- structures


def _placeholder_svg(text: str) -> str:
    w, h = STRUCTURE_SIZE
    return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}px' height='{h}px' "
            f"viewBox='0 0 {w} {h}'><rect width='{w}' height='{h}' fill='#fafafa' "
            f"stroke='#ccc' stroke-dasharray='4 3'/><text x='{w / 2}' y='{h / 2}' "
            f"font-family='sans-serif' font-size='14' fill='#999' text-anchor='middle'>"
            f"{html.escape(text)}</text></svg>")


@functools.cache
def _drawing() -> tuple[object | None, str]:
    """RDKit's 2D drawing module, or (None, why) where it cannot load. Its shared library
    links the X11 render libraries even for SVG; minimal images (CUDA containers, HPC nodes)
    often lack them, and a screen must still write its report."""
    try:
        from rdkit.Chem.Draw import rdMolDraw2D
    except ImportError as exc:
        missing = str(exc).split(":")[0]
        return None, (f"RDKit's drawing module could not load ({missing}); install the X11 render libraries "
                      "(Debian/Ubuntu: apt-get install libxrender1 libxext6) to draw structures")
    return rdMolDraw2D, ""


def _mol_svg(smiles: object) -> str | None:
    """A structure as SVG text, or None when RDKit cannot parse or draw it."""
    from rdkit import Chem, rdBase

    rdMolDraw2D, _ = _drawing()
    if rdMolDraw2D is None or not isinstance(smiles, str) or not smiles.strip():
        return None
    with rdBase.BlockLogs():  # a bad SMILES is reported once in the notes, not per atom on stderr
        mol = Chem.MolFromSmiles(smiles)
        if mol is None or mol.GetNumAtoms() == 0:
            return None
        try:
            drawer = rdMolDraw2D.MolDraw2DSVG(*STRUCTURE_SIZE)
            opts = drawer.drawOptions()
            opts.clearBackground = False
            opts.padding = 0.08
            rdMolDraw2D.PrepareAndDrawMolecule(drawer, mol)
            drawer.FinishDrawing()
            return drawer.GetDrawingText()
        except Exception:  # noqa: BLE001 - any drawing failure becomes a counted placeholder
            return None


def _svg_uri(svg: str) -> str:
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode("utf-8")).decode("ascii")


def _structures_section(data: ReportData) -> tuple[str, list[str]]:
    """The grid of the top hits and the ids of hits that could not be drawn."""
    title = "Top structures"
    n = max(0, int(data.n_structures))
    if data.hits.num_rows == 0:
        return _section("structures", title, _nodata("no hits to draw")), []
    if n == 0:
        return _section("structures", title, _nodata("n_structures = 0")), []
    if _drawing()[0] is None:
        return _section("structures", title, _nodata(f"structures not drawn: {_drawing()[1]}")), []
    top = data.hits.slice(0, n).select(list(REQUIRED_HIT_COLUMNS)).to_pylist()
    cards = []
    bad = []
    for row in top:
        svg = _mol_svg(row["smiles"])
        if svg is None:
            bad.append(str(row["id"]))
            svg = _placeholder_svg("cannot draw SMILES")
        cards.append(
            f'<figure class="mol"><img src="{_svg_uri(svg)}" alt="{_e(row["smiles"])}" '
            f'width="{STRUCTURE_SIZE[0]}" height="{STRUCTURE_SIZE[1]}">'
            f'<figcaption><span class="rank">#{_e(_cell(row["rank"], "rank"))}</span> '
            f'<span class="id">{_e(row["id"])}</span> '
            f'<span class="score">{_e(_fmt(row["score"]))}</span></figcaption></figure>')
    intro = (f"The {len(top):,} best-ranked hits (rank, id, fused score), drawn by RDKit "
             f"from their SMILES.")
    return _section("structures", title, f'<div class="grid">{"".join(cards)}</div>', intro), bad


def _arrow_table(t: pa.Table) -> str:
    """Any small table as HTML (numbers right-aligned, SMILES as code)."""
    cols = t.column_names
    numeric = {c for c in cols if pa.types.is_integer(t.schema.field(c).type)
               or pa.types.is_floating(t.schema.field(c).type)}
    head = "".join(f'<th class="{"n" if c in numeric else "t"}">{_e(c)}</th>' for c in cols)
    trs = []
    for row in t.to_pylist():
        cells = []
        for c in cols:
            text = _e(_cell(row[c], c))
            if c in ("smiles", "scaffold"):
                text = f'<code class="smiles">{text}</code>'
            cells.append(f'<td class="{"n" if c in numeric else "t"}">{text}</td>')
        trs.append("<tr>" + "".join(cells) + "</tr>")
    return f'<div class="scroll"><table class="hits"><thead><tr>{head}</tr></thead><tbody>{"".join(trs)}</tbody></table></div>'


def _stage_section(i: int, sec: ReportSection) -> str:
    rows = [(_e(k), _e(_fmt(v))) for k, v in sec.facts.items()]
    body = _table(["", ""], rows, cls="kv") if rows else ""
    for caption, t in sec.tables:
        body += f"<h3>{_e(caption)}</h3>" + (_arrow_table(t.slice(0, MAX_TABLE_ROWS)) if t.num_rows
                                             else _nodata("no rows"))
    return _section(f"stage-{i}", sec.title, body, _e(sec.intro))


def _hits_section(data: ReportData) -> str:
    title = "Top hits"
    t = data.hits
    if t.num_rows == 0:
        return _section("hits", title, _nodata("no molecule passed the screen"))
    first = [c for c in REQUIRED_HIT_COLUMNS if c in t.column_names]
    cols = first + [c for c in t.column_names if c not in first]
    rows = t.slice(0, MAX_TABLE_ROWS).select(cols).to_pylist()
    body = []
    for row in rows:
        cells = []
        for c in cols:
            v = row[c]
            text = _e(_cell(v, c))
            if c in ("smiles", "scaffold"):
                text = f'<code class="smiles">{text}</code>'
            cells.append(text)
        body.append(cells)
    numeric = {c for c in cols if pa.types.is_integer(t.schema.field(c).type)
               or pa.types.is_floating(t.schema.field(c).type)}
    head = "".join(f'<th class="{"n" if c in numeric else "t"}">{_e(c)}</th>' for c in cols)
    trs = "".join("<tr>" + "".join(
        f'<td class="{"n" if c in numeric else "t"}">{v}</td>' for c, v in zip(cols, r)) + "</tr>"
        for r in body)
    shown = (f"the first {len(rows):,} of {t.num_rows:,} hits" if t.num_rows > len(rows)
             else f"all {t.num_rows:,} hits")
    table = (f'<div class="scroll"><table class="hits"><thead><tr>{head}</tr></thead>'
             f"<tbody>{trs}</tbody></table></div>")
    return _section("hits", title, table, f"Ranked by fused score; {shown}, all columns.")


def _timing_section(data: ReportData) -> str:
    title = "Time per stage"
    st = [(str(n), float(s)) for n, s in data.stage_seconds]
    if not st:
        return _section("timing", title, _nodata("no timings recorded"))
    total = sum(s for _, s in st)
    rows = [(_e(n), _e(_seconds(s)), f"{100 * s / total:.1f} %" if total > 0 else "–") for n, s in st]
    rows.append(("<b>total</b>", f"<b>{_e(_seconds(total))}</b>", ""))
    table = _table(["stage", "wall time", "share"], rows, cls="num")

    def draw(fig):
        ax = fig.add_subplot()
        y = np.arange(len(st))
        secs = np.array([s for _, s in st])
        ax.barh(y, secs, color=_ACCENT, height=0.6)
        for yi, s in zip(y, secs):
            ax.text(s, yi, "  " + _seconds(s), va="center", fontsize=8)
        ax.set_yticks(y, [_mpl_text(n) for n, _ in st])
        ax.invert_yaxis()
        ax.set_xlim(0, max(secs.max(), 1e-3) * 1.25)
        ax.set_xlabel("wall time (s)")
        ax.grid(axis="y", visible=False)

    uri = _plot(draw, 8.0, 0.4 * len(st) + 1.0)
    fig = _figure(uri, "time per stage", f"Wall time per stage; {_e(_seconds(total))} in all.")
    return _section("timing", title, fig + table)


def _config_section(data: ReportData) -> str:
    text = data.config_yaml or "(no configuration recorded)"
    body = (f"<details><summary>Composed configuration ({len(text.splitlines())} lines)</summary>"
            f"<pre>{_e(text)}</pre></details>")
    return _section("config", "Configuration", body)


def _versions_section(data: ReportData) -> str:
    if not data.versions:
        return '<footer id="versions">Made by biogen.</footer>'
    items = " · ".join(f"{_e(k)} {_e(v)}" for k, v in data.versions.items())
    return f'<footer id="versions">Made with {items}.</footer>'


# ----------------------------------------------------------------------------- page


_CSS = """
:root { --fg:#1d2733; --muted:#5b6875; --line:#dde3e9; --accent:#1f5f8b; --warn:#b3261e; }
* { box-sizing: border-box; }
body { margin:0; background:#f5f7f9; color:var(--fg);
  font: 14px/1.5 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 28px 40px; background:#fff;
  min-height:100vh; box-shadow: 0 0 0 1px var(--line); }
header h1 { font-size: 22px; margin: 0 0 4px; }
header .meta { color: var(--muted); font-size: 12px; }
nav { margin: 14px 0 8px; padding: 8px 0; border-top:1px solid var(--line);
  border-bottom:1px solid var(--line); font-size: 13px; }
nav a { color: var(--accent); text-decoration:none; margin-right: 14px; }
section { margin: 28px 0; }
h2 { font-size: 17px; margin: 0 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--accent); }
p.intro { color: var(--muted); margin: 0 0 10px; }
.notes { border-left: 5px solid var(--warn); background: #fdecea; padding: 10px 16px; }
.notes h2 { color: var(--warn); border-bottom: none; margin-bottom: 4px; }
.notes ul { margin: 0; padding-left: 20px; font-weight: 600; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
thead th { background: #eef2f6; font-weight: 600; }
table.kv td:first-child { color: var(--muted); white-space: nowrap; }
table.kv thead { display: none; }
table.num td + td { text-align: right; font-variant-numeric: tabular-nums; }
.scroll { overflow-x: auto; max-height: 720px; overflow-y: auto; border: 1px solid var(--line); }
table.hits { margin: 0; font-size: 12px; width: 100%; }
table.hits thead th { position: sticky; top: 0; cursor: default; white-space: nowrap; }
table.hits thead th::after { content: " \\2195"; color: #aab4bf; font-size: 10px; }
table.hits td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
table.hits tbody tr:nth-child(even) { background: #f8fafc; }
code.smiles { font-size: 11px; word-break: break-all; display: inline-block; max-width: 360px; }
figure { margin: 8px 0 14px; }
figure.plot img { max-width: 100%; height: auto; display: block; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 10px; }
figure.mol { margin: 0; border: 1px solid var(--line); border-radius: 6px; padding: 6px; background:#fff; }
figure.mol img { width: 100%; height: auto; display: block; }
figure.mol figcaption { text-align: center; color: var(--fg); word-break: break-all; }
figure.mol .rank { font-weight: 700; color: var(--accent); }
figure.mol .score { color: var(--muted); }
.nodata { padding: 18px; text-align: center; color: var(--muted); background: #f8fafc;
  border: 1px dashed var(--line); border-radius: 6px; }
.headline { border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; margin: 6px 0 14px;
  background: linear-gradient(#f4f9fd, #fff); }
.tiles { display: flex; flex-wrap: wrap; gap: 28px; }
.tile .value { font-size: 26px; font-weight: 700; color: var(--accent); font-variant-numeric: tabular-nums; }
.tile .label { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .04em; }
.headline .caption { color: var(--muted); font-size: 12px; margin-top: 6px; }
details summary { cursor: pointer; color: var(--accent); }
pre { background: #f6f8fa; border: 1px solid var(--line); padding: 10px; overflow-x: auto; font-size: 12px; }
footer { margin-top: 36px; padding-top: 10px; border-top: 1px solid var(--line); color: var(--muted); font-size: 12px; }
@media print { body { background:#fff; } main { box-shadow:none; } .scroll { max-height:none; } }
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="biogen">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<main>
<header><h1>{title}</h1><div class="meta">generated {generated}</div></header>
<nav>{toc}</nav>
{body}
</main>
</body>
</html>
"""
