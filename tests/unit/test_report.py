"""The screen report's HTML: sections, embedded images, no external references, escaping,
the empty screen, the enrichment curve against a brute-force count, large inputs."""

from __future__ import annotations

import base64
import re
import time
from html.parser import HTMLParser

import matplotlib
import numpy as np
import pyarrow as pa
import pytest

from biogen.screen.metrics import EnrichmentMetrics, NullModel
from biogen.screen.report import (
    MAX_TABLE_ROWS,
    ReportData,
    ReportEnrichment,
    _enrichment_curve,
    render_report,
    write_report,
)

SECTIONS = ("summary", "funnel", "scores", "enrichment", "property-space", "structures",
            "hits", "timing", "config", "versions")
EVIL_ID = '<script>alert("id")</script>'
EVIL_SMILES = "C&C<x>"  # not a valid SMILES either: drawn as a placeholder


class _Page(HTMLParser):
    """Collects tags, img sources, links and text of a rendered report."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[str] = []
        self.imgs: list[dict] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if "id" in a:
            self.ids.add(a["id"])
        if tag == "img":
            self.imgs.append(a)
        for key in ("href", "src", "srcset", "action", "poster", "data"):
            if key in a and tag != "img":
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _hits(n: int, rng: np.random.Generator) -> pa.Table:
    smiles = ["c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", EVIL_SMILES, "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"]
    ids = [EVIL_ID if i == 0 else f"MOL{i:05d}" for i in range(n)]
    return pa.table({
        "rank": np.arange(1, n + 1, dtype=np.int64),
        "id": ids,
        "smiles": [smiles[i % len(smiles)] for i in range(n)],
        "score": np.sort(rng.random(n))[::-1],
        "similarity": rng.random(n),
        "qed": np.where(np.arange(n) % 7 == 3, np.nan, rng.random(n)),
        "scaffold": ["c1ccccc1"] * n,
        "label": (np.arange(n) % 3 == 0),
    })


def make_data(n: int = 5_000, n_hits: int = 150, *, empty: bool = False, seed: int = 0) -> ReportData:
    rng = np.random.default_rng(seed)
    fused = rng.normal(size=n)
    labels = rng.random(n) < 0.02
    fused[labels] += 1.5
    if empty:
        hits = pa.table({"rank": pa.array([], pa.int64()), "id": pa.array([], pa.string()),
                         "smiles": pa.array([], pa.string()), "score": pa.array([], pa.float64())})
    else:
        hits = _hits(n_hits, rng)
    lib = {"mw": rng.normal(350, 60, n), "clogp": rng.normal(2.5, 1, n), "tpsa": rng.gamma(4, 18, n)}
    hit_props = {k: (np.empty(0) if empty else v[:n_hits]) for k, v in lib.items()}
    return ReportData(
        title=f"biogen screen: <target> vs lib & co ({n:,} molecules)",
        summary={"library": "tiny", "molecules": n, "target": "CHEMBL204", "hits": hits.num_rows,
                 "wall time (s)": 12.345},
        funnel=[("library", n), ("standardize", n - 3), ("pains", 0 if empty else n // 2),
                ("select", 0 if empty else n_hits)],
        stage_seconds=[("build", 1.5), ("pains", 0.25), ("report", 0.01)],
        scores={"similarity": np.where(rng.random(n) < 0.1, np.nan, rng.random(n)),
                "qed $cost$": rng.random(n // 2), "never": np.full(4, np.nan)},
        hits=hits,
        property_space={"library": lib, "hits": hit_props},
        enrichment=ReportEnrichment(
            fused, labels, EnrichmentMetrics(0.91, 27.5, 11.0, 0.587, int(labels.sum()), n, 23),
            "held-out CHEMBL204 test actives (pKi >= 7)",
            NullModel("heavy_atoms", True, EnrichmentMetrics(0.62, 3.25, 2.5, 0.11, int(labels.sum()), n, 2)),
            {"actives_in_hits": 4}, null_scores=rng.normal(size=n) + labels),
        config_yaml="screen:\n  target: CHEMBL204  # <not a tag>\n",
        notes=["filters removed every molecule: no hits"] if empty else [],
        versions={"biogen": "0.1.0", "rdkit": "x"},
        n_structures=12,
    )


@pytest.fixture(scope="module")
def full_html() -> str:
    return render_report(make_data())


@pytest.fixture(scope="module")
def empty_html() -> str:
    return render_report(make_data(empty=True))


def _decode(src: str) -> tuple[str, bytes]:
    m = re.fullmatch(r"data:(image/png|image/svg\+xml);base64,([A-Za-z0-9+/=]+)", src)
    assert m, f"image not embedded as a base64 data: URI: {src[:80]}"
    return m.group(1), base64.b64decode(m.group(2), validate=True)


def _check_self_contained(text: str) -> _Page:
    page = _Page(text)
    assert page.imgs, "no images"
    for img in page.imgs:
        mime, payload = _decode(img["src"])
        if mime == "image/png":
            assert payload.startswith(b"\x89PNG\r\n\x1a\n") and len(payload) > 1000
        else:
            assert b"<svg" in payload[:500]
        assert img.get("alt")
    # links only to anchors in the page; no scripts, stylesheets or fonts fetched
    assert all(link.startswith("#") for link in page.links), page.links
    assert not {"script", "link", "iframe", "object", "embed", "base"} & set(page.tags)
    without_data = re.sub(r"data:[^\"']+", "", text)
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}|url\(|@import", without_data, re.I)
    return page


def test_every_section_present(full_html):
    page = _check_self_contained(full_html)
    assert set(SECTIONS) <= page.ids
    assert "notes" in page.ids  # the undrawable SMILES is reported
    # funnel, scores, enrichment, property space, timing plots + 12 structures
    pngs = [i for i in page.imgs if i["src"].startswith("data:image/png")]
    svgs = [i for i in page.imgs if i["src"].startswith("data:image/svg+xml")]
    assert len(pngs) == 5
    assert len(svgs) == 12
    text = "".join(page.text)
    for caption in ("Molecules remaining after each stage", "Enrichment of held-out CHEMBL204",
                    "Wall time per stage", "best-ranked hits"):
        assert caption in text
    assert "<details>" in full_html and "Composed configuration" in text


def test_headline_shows_recovered_actives_and_metrics(full_html):
    page = _Page(full_html)
    text = " ".join(page.text)
    assert "headline" in page.ids
    assert re.search(r"23 / \d+", text)
    assert "recovered in top 1%" in text
    assert "27.5" in text and "0.587" in text and "EF1%" in text and "BEDROC20" in text
    assert full_html.index('id="headline"') < full_html.index('id="funnel"')  # near the top


def test_the_null_model_stands_beside_the_screen(full_html):
    """The report states what ranking by a property alone gives, in the headline and the
    metrics table, and draws its curve."""
    headline = full_html[full_html.index('id="headline"'):full_html.index('id="funnel"')]
    assert "Null model, ranking by heavy_atoms (high first) alone: EF1% 3.25, AUROC 0.62" in headline
    section = full_html[full_html.index('id="enrichment"'):]
    section = section[:section.index("</section>")]
    assert "null model: heavy_atoms (high first)" in section and "the dashed line ranks by" in section
    row = re.search(r"<td>ef1</td><td>([^<]*)</td><td>([^<]*)</td>", section)
    assert row and row.groups() == ("27.5", "3.25")
    assert "<td>actives_in_hits</td><td>4</td>" in section


def test_text_is_escaped(full_html):
    assert EVIL_ID not in full_html
    assert "&lt;script&gt;alert(&quot;id&quot;)&lt;/script&gt;" in full_html
    assert "C&amp;C&lt;x&gt;" in full_html and EVIL_SMILES not in full_html
    assert "&lt;target&gt; vs lib &amp; co" in full_html
    assert "# &lt;not a tag&gt;" in full_html
    assert "script" not in _Page(full_html).tags


def test_invalid_smiles_gets_a_placeholder_and_a_note(full_html):
    page = _Page(full_html)
    svgs = [_decode(i["src"])[1] for i in page.imgs if i["src"].startswith("data:image/svg+xml")]
    assert sum(b"cannot draw SMILES" in s for s in svgs) == 3  # ranks 3, 7, 11 of 12
    notes = full_html[full_html.index('id="notes"'):full_html.index('id="summary"')]
    assert "3 of the top hits could not be drawn" in notes and "MOL00002" in notes


def test_without_rdkit_drawing_the_report_says_why_and_renders(monkeypatch):
    """A node whose image lacks libXrender cannot load RDKit's drawing module (seen on a CUDA
    node): the screen's report still renders, with the reason and the fix in its notes."""
    from biogen.screen import report

    why = "RDKit's drawing module could not load (libXrender.so.1); install libxrender1"
    monkeypatch.setattr(report, "_drawing", lambda: (None, why))
    text = render_report(make_data(n=500, n_hits=20))
    notes = text[text.index('id="notes"'):text.index('id="summary"')]
    assert "Structures are not drawn" in notes and "libxrender1" in notes
    structures = text[text.index('id="structures"'):text.index('id="hits"')]
    assert "structures not drawn" in structures and "<img" not in structures
    assert "could not be drawn (SMILES" not in notes  # not blamed on the hits' SMILES


def test_hits_table_rows_columns_and_formatting(full_html):
    table = full_html[full_html.index('<table class="hits">'):]
    table = table[:table.index("</table>")]
    assert table.count("<tr>") == MAX_TABLE_ROWS + 1  # header + first 100 of 150
    for col in ("rank", "id", "smiles", "score", "similarity", "qed", "scaffold", "label"):
        assert f">{col}</th>" in table
    assert "first 100 of 150 hits" in full_html
    assert "–" in table  # NaN qed
    assert re.search(r'<td class="n">0\.\d{1,4}</td>', table)  # 4 significant digits


def test_empty_screen_renders_with_notes(empty_html):
    page = _check_self_contained(empty_html)
    assert set(SECTIONS) <= page.ids
    notes = empty_html[empty_html.index('id="notes"'):empty_html.index('id="summary"')]
    assert "filters removed every molecule: no hits" in notes
    assert "stage &#x27;pains&#x27; removed every remaining molecule" in notes
    for sid in ("structures", "hits"):
        section = empty_html[empty_html.index(f'id="{sid}"'):]
        assert "no data" in section[:section.index("</section>")]


def test_minimal_input_renders_everywhere_no_data():
    data = ReportData(title="nothing", summary={}, funnel=[], stage_seconds=[], scores={},
                      hits=pa.table({}), property_space=None, enrichment=None, config_yaml="")
    text = render_report(data)
    page = _Page(text)
    assert set(SECTIONS) <= page.ids
    assert text.count('class="nodata"') >= 8
    assert "no hits: the screen selected no molecules" in text  # derived note
    assert not page.imgs


def test_enrichment_without_actives_and_all_nan_scores():
    data = make_data(n=500, n_hits=5)
    data.enrichment.labels = np.zeros(500, bool)
    data.enrichment.null_scores = None
    data.scores = {"nan": np.full(100, np.nan)}
    text = render_report(data)
    section = text[text.index('id="enrichment"'):]
    assert "no actives among the ranked molecules" in section[:section.index("</section>")]


def test_enrichment_curve_matches_brute_force():
    rng = np.random.default_rng(3)
    n = 2_000
    scores = np.round(rng.normal(size=n), 1)  # many ties
    scores[rng.random(n) < 0.05] = np.nan  # not scored: ranked last, tied with -inf
    scores[:7] = -np.inf
    labels = rng.random(n) < 0.05
    x, y = _enrichment_curve(scores, labels)
    assert x[0] == 0 and y[0] == 0 and x[-1] == 1 and y[-1] == pytest.approx(1)
    assert np.all(np.diff(x) > 0) and np.all(np.diff(y) >= 0)
    key = [-np.inf if np.isnan(v) else float(v) for v in scores]
    ranked_keys = sorted(key, reverse=True)
    for xi, yi in zip(x[1:], y[1:]):
        k = round(xi * n)
        # expected actives in the top k under a random order within each tie block
        cut = ranked_keys[k - 1]
        above = [i for i in range(n) if key[i] > cut]
        tied = [i for i in range(n) if key[i] == cut]
        expected = sum(labels[above]) + (k - len(above)) * sum(labels[tied]) / len(tied)
        assert yi == pytest.approx(expected / labels.sum())
    assert _enrichment_curve(scores, np.zeros(n, bool)) is None


def test_contract_violations_name_the_field():
    data = make_data(n=200, n_hits=5)
    data.hits = data.hits.drop_columns(["smiles"])
    with pytest.raises(ValueError, match=r"hits lacks column\(s\) \['smiles'\]"):
        render_report(data)
    data = make_data(n=200, n_hits=5)
    data.enrichment.labels = np.zeros(3, bool)
    with pytest.raises(ValueError, match="200 scores but 3 labels"):
        render_report(data)


def test_write_report_is_atomic_and_leaves_matplotlib_alone(tmp_path):
    backend = matplotlib.get_backend()
    rc = dict(matplotlib.rcParams)
    out = write_report(make_data(n=300, n_hits=10), tmp_path / "run" / "report.html")
    assert out == tmp_path / "run" / "report.html"
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")
    assert [p.name for p in out.parent.iterdir()] == ["report.html"]
    assert matplotlib.get_backend() == backend
    assert dict(matplotlib.rcParams) == rc


def test_one_million_scores_small_and_fast(tmp_path):
    n = 1_000_000
    data = make_data(n=n, n_hits=500)
    t0 = time.perf_counter()
    path = write_report(data, tmp_path / "report.html")
    seconds = time.perf_counter() - t0
    size = path.stat().st_size
    print(f"1M-molecule report: {seconds:.2f} s, {size / 1e6:.2f} MB")
    assert size < 3_000_000
    assert seconds < 20  # about 1.5 s on one free core; generous for shared CI machines
    assert "20,000 drawn" in path.read_text(encoding="utf-8")  # library scatter was sampled
