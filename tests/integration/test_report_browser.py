"""The screen report opened in a real headless Chromium: it renders, every image decodes,
and nothing is fetched but the file itself (data: URIs aside), for a full screen and for
one whose filters removed every molecule."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from biogen.screen.metrics import EnrichmentMetrics, NullModel
from biogen.screen.report import ReportData, ReportEnrichment, write_report

# the first use may install chromium (conftest: up to 600 s) before the page opens
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # a real browser: the second tier

VIEWPORT = {"width": 1280, "height": 900}
SECTIONS = ("summary", "funnel", "scores", "enrichment", "property-space", "structures",
            "hits", "timing", "config", "versions")


def _report_data(n: int, n_hits: int, *, empty: bool = False) -> ReportData:
    rng = np.random.default_rng(7)
    fused = rng.normal(size=n)
    labels = rng.random(n) < 0.01
    fused[labels] += 2.0
    smiles = ["c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "not a smiles", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
              "O=C(O)c1ccccc1OC(C)=O"]
    k = 0 if empty else n_hits
    order = np.argsort(-fused)[:k]
    hits = pa.table({
        "rank": pa.array(np.arange(1, k + 1), pa.int64()),
        "id": pa.array([f"MOL<{i}>" for i in order], pa.string()),
        "smiles": pa.array([smiles[i % len(smiles)] for i in range(k)], pa.string()),
        "score": pa.array(fused[order], pa.float64()),
        "similarity": pa.array(rng.random(k), pa.float64()),
        "label": pa.array(labels[order], pa.bool_()),
    })
    lib = {"mw": rng.normal(350, 60, n), "clogp": rng.normal(2.5, 1.2, n), "tpsa": rng.gamma(4, 18, n)}
    return ReportData(
        title=f"biogen screen: CHEMBL204_Ki vs test library ({n:,} molecules)",
        summary={"library": "test", "molecules": n, "target": "CHEMBL204", "hits": k},
        funnel=[("library", n), ("pains", 0 if empty else n // 2), ("select", k)],
        stage_seconds=[("build", 3.2), ("pains", 1.1), ("similarity", 0.4)],
        scores={"similarity": rng.beta(2, 8, n), "qed": rng.random(n // 2)},
        hits=hits,
        property_space={"library": lib, "hits": {key: v[order] for key, v in lib.items()}},
        enrichment=ReportEnrichment(
            fused, labels, EnrichmentMetrics(0.9, 30.1, 12.0, 0.6, int(labels.sum()), n, 12),
            "held-out CHEMBL204 test actives (pKi >= 7)",
            NullModel("heavy_atoms", True,
                      EnrichmentMetrics(0.6, 3.0, 2.0, 0.1, int(labels.sum()), n, 1)),
            null_scores=rng.normal(size=n) + labels),
        config_yaml="screen:\n  target: CHEMBL204\n",
        notes=["filters removed every molecule: no hits"] if empty else [],
        versions={"biogen": "test"},
        n_structures=24,
    )


def _open(browser, html_path: Path, screenshot: Path) -> dict:
    """Load the file with every request watched; return what the page did and showed."""
    url = html_path.resolve().as_uri()
    context = browser.new_context(viewport=VIEWPORT, offline=True)
    seen = {"requests": [], "blocked": [], "failed": [], "errors": []}

    def route(r):
        if r.request.url == url or r.request.url.startswith("data:"):
            r.continue_()
        else:
            seen["blocked"].append(r.request.url)
            r.abort()

    context.route("**/*", route)
    page = context.new_page()
    page.on("request", lambda r: seen["requests"].append(r.url))
    page.on("requestfailed", lambda r: seen["failed"].append(f"{r.url}: {r.failure}"))
    page.on("pageerror", lambda e: seen["errors"].append(str(e)))
    page.on("console", lambda m: seen["errors"].append(m.text) if m.type == "error" else None)
    try:
        page.goto(url, wait_until="load")
        seen["images"] = page.evaluate(
            """() => Array.from(document.images).map(i => ({
                   src: i.currentSrc.slice(0, 30), complete: i.complete,
                   width: i.naturalWidth, height: i.naturalHeight,
                   shown: i.getBoundingClientRect().width}))""")
        seen["visible"] = {sid: page.locator(f"#{sid}").is_visible() for sid in SECTIONS}
        seen["text"] = page.inner_text("body")
        page.screenshot(path=str(screenshot), full_page=True)
    finally:
        context.close()
    return seen


def _check_screenshot(path: Path, min_height: int) -> None:
    from PIL import Image

    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 50_000
    with Image.open(path) as im:
        assert im.width == VIEWPORT["width"] and im.height >= min_height
        colors = im.convert("RGB").resize((im.width // 4, im.height // 4)).getcolors(1 << 20)
        assert len(colors) > 100  # plots and structures, not a blank page


def _check_loaded(seen: dict, url: str) -> None:
    assert not seen["blocked"], f"report fetched external resources: {seen['blocked']}"
    assert not seen["failed"], seen["failed"]
    assert not seen["errors"], seen["errors"]
    assert all(u == url or u.startswith("data:") for u in seen["requests"]), seen["requests"]
    bad = [i for i in seen["images"] if not (i["complete"] and i["width"] > 0 and i["height"] > 0
                                             and i["shown"] > 0)]
    assert not bad, f"images that did not render: {bad}"
    hidden = [sid for sid, shown in seen["visible"].items() if not shown]
    assert not hidden, f"sections not rendered: {hidden}"


def test_full_report_renders_offline(browser, tmp_path):
    path = write_report(_report_data(50_000, 300), tmp_path / "report.html")
    shot = tmp_path / "report.png"
    seen = _open(browser, path, shot)
    _check_loaded(seen, path.resolve().as_uri())
    assert len(seen["images"]) == 5 + 24  # five plots, 24 structures
    assert "12 / " in seen["text"] and "RECOVERED IN TOP 1%" in seen["text"].upper()
    _check_screenshot(shot, min_height=3000)


def test_empty_report_renders_with_warning(browser, tmp_path):
    path = write_report(_report_data(5_000, 0, empty=True), tmp_path / "empty.html")
    shot = tmp_path / "empty.png"
    seen = _open(browser, path, shot)
    _check_loaded(seen, path.resolve().as_uri())
    assert "filters removed every molecule: no hits" in seen["text"]
    assert "no data: no hits to draw" in seen["text"]
    _check_screenshot(shot, min_height=1500)


def test_watch_catches_an_external_fetch(browser, tmp_path):
    """The checks above are not vacuous: a page that loads a remote image is caught."""
    path = tmp_path / "leaky.html"
    path.write_text('<!DOCTYPE html><html><body><img src="https://example.invalid/x.png" alt="x">'
                    "</body></html>", encoding="utf-8")
    seen = _open(browser, path, tmp_path / "leaky.png")
    assert seen["blocked"] == ["https://example.invalid/x.png"]
    assert seen["images"][0]["width"] == 0
