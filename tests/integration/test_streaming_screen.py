"""The streaming screen (``streaming=true``: no whole-library column in the driver) against the
in-memory screen on the same small library: the same hits, metrics, null model, funnel and
per-row scores and ranks; rank fusion over two scorers with several sample-sort buckets and a
candidate list small enough to be doubled, zscore fusion, filters that remove everything, no
labels, a resume after a failed round, and runtime=local (Ray)."""

import dataclasses
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biogen.library import Library
from biogen.screen import streaming
from biogen.screen.pipeline import FusionSpec, run_screen
from biogen.screen.presets import LibrarySpec, preset_library
from biogen.screen.selection import SelectionSpec
from biogen.screen.stages import PropertyFilter, SimilarityScorer
from biogen.screen.streaming import StreamingSpec
from biogen.screen.target import TargetSpec, held_out_actives

LIMIT = 1500
THROMBIN = TargetSpec(name="CHEMBL204_Ki", moleculeace="CHEMBL204_Ki")
# the test knobs: 3 buckets in each sample sort; 50 first candidates (top_m 200: doubled to 400);
# at most 3 tasks in a per-shard round, so the 5 shards go 2 to a task
KNOBS = StreamingSpec("true", buckets=3, candidates=50, tasks_per_round=3)


@pytest.fixture(scope="module")
def lib_spec(tmp_path_factory, moleculeace) -> LibrarySpec:
    # several shards (chunk_size 400): the rounds merge across shards
    return LibrarySpec(limit=LIMIT, cache_dir=str(tmp_path_factory.mktemp("cache")), chunk_size=400)


def _scorers():
    return [SimilarityScorer(name="similarity"), SimilarityScorer(fusion="mean", metric="dice", name="dice_mean")]


def _screen(lib_spec, run_dir, runtime, streaming, *, target=THROMBIN, filters=None, fusion=FusionSpec(), **kw):
    filters = [PropertyFilter("lipinski", name="lipinski")] if filters is None else filters
    return run_screen(lib_spec, target, filters, _scorers(), fusion=fusion, selection=SelectionSpec(n=20, top_m=200),
                      runtime=runtime, run_dir=run_dir, streaming=streaming, **kw)


def _columns_equal(a: pa.Table, b: pa.Table, tol: float = 0.0, where: str = "") -> None:
    assert a.column_names == b.column_names, where
    assert a.schema.types == b.schema.types, where
    for name in a.column_names:
        x, y = a.column(name), b.column(name)
        assert x.null_count == y.null_count and x.is_null().equals(y.is_null()), f"{where} {name}: nulls differ"
        if pa.types.is_floating(x.type):
            xv, yv = x.to_numpy(zero_copy_only=False), y.to_numpy(zero_copy_only=False)
            if tol:
                np.testing.assert_allclose(xv, yv, rtol=0, atol=tol, err_msg=f"{where} {name}")
            else:
                np.testing.assert_array_equal(xv, yv, err_msg=f"{where} {name}")
        else:
            assert x.to_pylist() == y.to_pylist(), f"{where} {name}"


def _metrics_equal(a: dict | None, b: dict | None, tol: float = 0.0) -> None:
    """summary.json's metrics: floats within ``tol`` (BEDROC within 1e-12 at least: the counts
    path sums a geometric series per tie block; AUROC, EF and counts are bit for bit)."""
    assert (a is None) == (b is None)
    if a is None:
        return
    assert a.keys() == b.keys()
    for k, v in a.items():
        if k == "null_model":
            _metrics_equal(v, b[k], tol)
        elif isinstance(v, float):
            assert abs(v - b[k]) <= (max(tol, 1e-12) if k == "bedroc20" else tol), (k, v, b[k])
        else:
            assert v == b[k], k


def _streamed_scores(run_dir) -> pa.Table:
    parts = [pq.read_table(p) for p in sorted((run_dir / "scores").glob("*.parquet"))]
    return pa.concat_tables(parts).sort_by([("shard", "ascending"), ("row", "ascending")])


def _same(mem, stream, tol: float = 0.0) -> None:
    """Everything the two screens wrote agrees (floats within ``tol``; 0: bit for bit)."""
    assert not (stream.run_dir / "scores.parquet").exists()
    _columns_equal(mem.hits, stream.hits, tol, "hits")
    assert mem.funnel == stream.funnel
    _metrics_equal(mem.metrics, stream.metrics, tol)
    by_row = [("shard", "ascending"), ("row", "ascending")]
    _columns_equal(pq.read_table(mem.run_dir / "scores.parquet").sort_by(by_row), _streamed_scores(stream.run_dir),
                   tol, "scores")
    a, b = (json.loads((r.run_dir / "summary.json").read_text()) for r in (mem, stream))
    assert a.keys() == b.keys() and a["funnel"] == b["funnel"] and a["notes"] == b["notes"]
    funnels = [json.loads((r.run_dir / "funnel.json").read_text()) for r in (mem, stream)]
    assert funnels[0] == funnels[1]


def test_rank_fusion_of_two_scorers_matches_in_memory(lib_spec, tmp_path, inline_rt):
    mem = _screen(lib_spec, tmp_path / "mem", inline_rt, False)
    stream = _screen(lib_spec, tmp_path / "stream", inline_rt, KNOBS)
    assert mem.summary.shards >= 4 and mem.metrics["actives_in_library"] == 215
    _same(mem, stream)
    ledger = (stream.run_dir / "ledger.jsonl").read_text()
    # K grew from 50 by the walk's fill rate (at least 2x a round): the scaffold cap's walk
    # needs more than 200 of the best rows to hold top_m = 200 candidates; then it stops.
    # Each round fetches the ranks after the last one's only.
    ranges = sorted({(int(a), int(b)) for a, b in re.findall(r'"screen: top ([0-9]+)-([0-9]+)"',
                                                               ledger.replace(",", ""))})
    tops = [b for _, b in ranges]
    assert '"screen: rank similarity"' in ledger and ranges[0] == (1, 50) and len(tops) >= 2
    assert [a for a, _ in ranges] == [1] + [b + 1 for b in tops[:-1]]
    assert all(b >= 2 * a for a, b in zip(tops, tops[1:])) and tops[-1] >= 200
    # the per-shard rounds ran two shards a task, the bucket rounds one bucket a task
    keys = [json.loads(x)["key"] for x in ledger.splitlines() if '"outputs"' in x]
    n = mem.summary.shards
    assert {k.split("-", 2)[2] for k in keys if "-stats-" in k} == {f"stats-{a:06d}+{min(2, n - a) - 1}"
                                                                    for a in range(0, n, 2)}
    assert sum("-order-b" in k for k in keys) == 3 and not any("-order-b" in k and "+" in k for k in keys)
    # the score round too (its shards' files are written one per shard all the same)
    names = [s.name for s in Library.open(stream.summary.library).shards]
    assert [k for k in keys if k.startswith("shard-")] == [f"shard-{names[a]}+{min(2, n - a) - 1}"
                                                            for a in range(0, n, 2)]
    assert all((stream.run_dir / "shards" / f"{x}.arrow").exists() for x in names)
    # the report shows the same numbers (its plots come from a sample and from the counts)
    for sid in ("funnel", "enrichment", "hits"):
        assert _section(mem.run_dir, sid) == _section(stream.run_dir, sid), sid
    assert "Null model, ranking by" in _section(stream.run_dir, "summary")


def test_stored_scaffolds_give_the_same_hits(lib_spec, tmp_path, inline_rt, monkeypatch):
    """A library that stores its scaffolds: the top-K tasks key the stored column (the other
    tests' library has none, so its tasks compute them from the SMILES); same hits. And the
    walk holds 60 ranks at most: it reads each top-K round's range in pieces, same hits."""
    spec = dataclasses.replace(lib_spec, descriptors=(*lib_spec.descriptors, "scaffold"))
    mem = _screen(spec, tmp_path / "mem", inline_rt, False)
    fed = []

    class Walk(streaming.CapWalk):
        def feed(self, keys):
            fed.append(len(keys))
            return super().feed(keys)

    def no_scaffolds(*a, **k):
        raise AssertionError("the streaming screen computed scaffolds that the library stores")

    monkeypatch.setattr(streaming, "CapWalk", Walk)
    monkeypatch.setattr(streaming, "murcko_scaffolds", no_scaffolds)
    stream = _screen(spec, tmp_path / "stream", inline_rt, dataclasses.replace(KNOBS, ranks_per_round=60))
    assert "scaffold" in Library.open(stream.summary.library).manifest["descriptors"]
    _same(mem, stream)
    assert stream.hits.column("scaffold").to_pylist() == mem.hits.column("scaffold").to_pylist()
    ledger = (stream.run_dir / "ledger.jsonl").read_text().replace(",", "")
    ranges = sorted({(int(a), int(b)) for a, b in re.findall(r'"screen: top ([0-9]+)-([0-9]+)"', ledger)})
    assert ranges[0] == (1, 50) and ranges[1][1] >= 100
    assert [a for a, _ in ranges] == [1] + [b + 1 for _, b in ranges[:-1]]
    # the first round's 50 ranks in one piece; the later ranges in pieces of 60 (the last one
    # may stop early: the walk ends once its pool is full)
    assert fed[0] == 50 and max(fed) == 60 and len(fed) > len(ranges)
    assert sum(fed) > ranges[-2][1]


def _section(run_dir, sid: str) -> str:
    """A report section's HTML without its images."""
    html = (run_dir / "report.html").read_text()
    body = re.search(rf'<section id="{sid}">.*?</section>', html, re.S).group(0)
    return re.sub(r'data:image/[^"]+', "IMG", body)


def test_zscore_fusion_and_no_filters_match_within_rounding(lib_spec, tmp_path, inline_rt):
    z = FusionSpec(method="zscore", weights={"dice_mean": 2.0})
    mem = _screen(lib_spec, tmp_path / "mem", inline_rt, False, filters=[], fusion=z, report=False)
    stream = _screen(lib_spec, tmp_path / "stream", inline_rt, StreamingSpec("true", buckets=2), filters=[],
                     fusion=z, report=False)
    _same(mem, stream, tol=1e-12)


def test_filters_that_remove_everything(lib_spec, tmp_path, inline_rt):
    tiny = [PropertyFilter(ranges={"mw": [0, 10]}, name="tiny")]
    mem = _screen(lib_spec, tmp_path / "mem", inline_rt, False, filters=tiny, report=False)
    stream = _screen(lib_spec, tmp_path / "stream", inline_rt, KNOBS, filters=tiny)
    assert stream.hits.num_rows == 0 and stream.funnel[-1] == ("selected", 0)
    assert any("removed every molecule" in n for n in stream.summary.notes)
    assert "removed every molecule" in (stream.run_dir / "report.html").read_text()
    _same(mem, stream)


def test_a_target_without_labels(lib_spec, tmp_path, inline_rt):
    lib = Library.open(preset_library(lib_spec, THROMBIN.name, held_out_actives(THROMBIN), inline_rt))
    actives = tmp_path / "actives.smi"
    actives.write_text("CC(C)Cc1ccc(cc1)C(C)C(=O)O a1\nCN1C=NC2=C1C(=O)N(C(=O)N2C)C a2\n")
    target = TargetSpec(name="custom", actives=str(actives))
    spec = LibrarySpec(path=str(lib.path))
    mem = _screen(spec, tmp_path / "mem", inline_rt, False, target=target, report=False)
    stream = _screen(spec, tmp_path / "stream", inline_rt, KNOBS, target=target)
    assert stream.metrics is None and "label" not in stream.hits.column_names
    _same(mem, stream)


def test_a_failed_round_resumes(lib_spec, tmp_path, inline_rt, monkeypatch):
    from biogen.screen.streaming import StreamingScreen

    real = StreamingScreen.final

    def fail(self, i, *a):
        if i == 2:
            raise RuntimeError("killed in the final round")
        return real(self, i, *a)

    monkeypatch.setattr(StreamingScreen, "final", fail)
    with pytest.raises(RuntimeError, match="killed in the final round"):
        _screen(lib_spec, tmp_path / "run", inline_rt, KNOBS, report=False)
    monkeypatch.setattr(StreamingScreen, "final", real)
    ledger = tmp_path / "run" / "ledger.jsonl"
    before = [json.loads(x)["key"] for x in ledger.read_text().splitlines() if '"outputs"' in x]
    again = _screen(lib_spec, tmp_path / "run", inline_rt, KNOBS, report=False)
    after = [json.loads(x)["key"] for x in ledger.read_text().splitlines() if '"outputs"' in x]
    assert after[:len(before)] == before and not set(before) & set(after[len(before):])  # nothing done twice
    assert any("-final-000002" in k for k in after[len(before):])
    mem = _screen(lib_spec, tmp_path / "mem", inline_rt, False, report=False)
    _same(mem, again)
    # a rerun of the finished screen finds every round in the ledger, the top-K rounds too
    assert any("-top" in k for k in after)
    third = _screen(lib_spec, tmp_path / "run", inline_rt, KNOBS, report=False)
    assert [json.loads(x)["key"] for x in ledger.read_text().splitlines() if '"outputs"' in x] == after
    _same(mem, third)


@pytest.mark.ray
def test_streaming_on_ray_matches_in_memory(lib_spec, tmp_path, inline_rt, ray_rt):
    mem = _screen(lib_spec, tmp_path / "mem", inline_rt, False, report=False)
    stream = _screen(lib_spec, tmp_path / "ray", ray_rt, KNOBS, report=False)
    _same(mem, stream)


def test_a_stage_with_whole_library_outputs_keeps_the_screen_in_memory(tmp_path, caplog):
    """``Stage.whole_library_outputs`` (the protein-aware panel): streaming=true is refused
    before anything runs; auto keeps such a screen in memory, with a warning."""
    from types import SimpleNamespace

    from biogen.errors import ConfigError
    from biogen.screen.pipeline import _streams

    panel = SimilarityScorer(name="panel")
    panel.whole_library_outputs = True
    with pytest.raises(ConfigError, match=r"streaming=true cannot run stage\(s\) \['panel'\].*streaming=false"):
        run_screen(LibrarySpec(path=str(tmp_path / "nolib")), THROMBIN, [], [panel], run_dir=tmp_path / "run",
                   streaming="true")
    big = SimpleNamespace(n_rows=3_000_000)
    assert _streams(StreamingSpec("auto"), big, _scorers())
    assert not _streams(StreamingSpec("auto"), big, [*_scorers(), panel])
    assert "need the whole library in the driver" in caplog.text
    assert not _streams(StreamingSpec("auto"), SimpleNamespace(n_rows=1000), _scorers())
