"""biogen screen end to end on real data: a MOSES slice with thrombin's held-out actives
mixed in (the default preset, built small), inline and on Ray, resume, bad input, CLI."""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biogen.chem.scaffolds import murcko_scaffolds
from biogen.errors import ConfigError
from biogen.library import Library
from biogen.screen.pipeline import run_screen
from biogen.screen.presets import LibrarySpec
from biogen.screen.selection import SelectionSpec
from biogen.screen.stages import PropertyFilter, SimilarityScorer
from biogen.screen.target import TargetSpec
from tests_support import run_biogen

LIMIT = 1500
THROMBIN = TargetSpec(name="CHEMBL204_Ki", moleculeace="CHEMBL204_Ki")


@pytest.fixture(scope="module")
def lib_spec(tmp_path_factory, moleculeace) -> LibrarySpec:
    return LibrarySpec(limit=LIMIT, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _screen(lib_spec, run_dir, runtime, filters=None, **kw):
    filters = [PropertyFilter("lipinski", name="lipinski")] if filters is None else filters
    return run_screen(lib_spec, THROMBIN, filters, [SimilarityScorer(name="similarity")],
                      selection=SelectionSpec(n=20, top_m=200), runtime=runtime, run_dir=run_dir, **kw)


def test_screen_inline_outputs_and_resume(lib_spec, tmp_path, inline_rt):
    res = _screen(lib_spec, tmp_path / "run", inline_rt)
    d = res.run_dir
    for name in ("hits.parquet", "hits.csv", "hits.sdf", "scores.parquet", "summary.json", "funnel.json",
                 "report.html", "library_manifest.json", "ledger.jsonl"):
        assert (d / name).is_file(), name
    scores = pq.read_table(d / "scores.parquet")
    n = LIMIT + 215  # MOSES slice + thrombin's held-out test actives (pKi >= 7)
    assert scores.num_rows == res.funnel[0][1] == n
    assert len(set(scores.column("id").to_pylist())) == n
    counts = [c for _, c in res.funnel]
    assert counts == sorted(counts, reverse=True) and res.funnel[-1] == ("selected", 20)
    passed = np.array(scores.column("lipinski_pass").to_pylist())
    sim = scores.column("similarity").to_numpy(zero_copy_only=False)
    assert np.isnan(sim[~passed.astype(bool)]).all() and not np.isnan(sim[passed.astype(bool)]).any()
    hits = res.hits
    assert hits.column("rank").to_pylist() == list(range(1, 21))
    s = hits.column("score").to_numpy()
    assert np.all(np.diff(s) <= 0)
    # held-out actives are labelled and the similarity screen enriches them strongly
    m = res.metrics
    assert m["actives_in_library"] == 215 and m["n"] == n
    assert m["ef1"] > 5 and m["auroc"] > 0.7
    summary = json.loads((d / "summary.json").read_text())
    assert summary["known_actives"] == 985 and summary["metrics"]["ef1"] == m["ef1"]
    # the null model: ranking by MW or heavy-atom count alone, the better way round, over the
    # same rows (filtered-out molecules last); thrombin's actives are larger than MOSES's
    nm = m["null_model"]
    assert nm["property"] in ("mw", "heavy_atoms") and nm["high_first"] and nm["n"] == n
    mw = pq.read_table(Library.open(summary["library"]).shards[0].path / "meta.parquet", columns=["mw"])
    assert mw.num_rows > 0 and nm["auroc"] > 0.7
    report = (d / "report.html").read_text()
    assert "Null model, ranking by" in report
    sdf = (d / "hits.sdf").read_text()
    assert sdf.count("$$$$") == 20 and ">  <similarity>" in sdf
    # rows in library order with the library's ids (the driver joins them to the shards'
    # scores); hits carry the library's SMILES and their scaffolds by RDKit's full path
    lib = Library.open(summary["library"])
    meta = pa.concat_tables([sh.metadata(["id", "smiles"]) for sh in lib.shards])
    assert scores.column("id").to_pylist() == meta.column("id").to_pylist()
    smiles_of = dict(zip(meta.column("id").to_pylist(), meta.column("smiles").to_pylist()))
    assert hits.column("smiles").to_pylist() == [smiles_of[i] for i in hits.column("id").to_pylist()]
    assert hits.column("scaffold").to_pylist() == murcko_scaffolds(hits.column("smiles").to_pylist())
    # a rerun in the same directory resumes: every shard is taken from the ledger
    def shard_lines():
        return [x for x in (d / "ledger.jsonl").read_text().splitlines() if '"outputs"' in x]

    before = shard_lines()
    again = _screen(lib_spec, tmp_path / "run", inline_rt)
    assert shard_lines() == before  # no shard run again
    starts = [json.loads(x) for x in (d / "ledger.jsonl").read_text().splitlines() if '"start"' in x]
    assert [s["resumed"] for s in starts] == [0, len(before)]
    assert again.hits.equals(res.hits)


def test_labels_of_a_library_deduplicated_by_smiles(lib_spec, tmp_path, inline_rt, monkeypatch):
    """A library built with dedupe_key=smiles has no InChIKeys: held-out actives are matched by
    canonical SMILES and the screen's enrichment equals the InChIKey-keyed preset's. Built
    with the scaffold descriptor, its screen reads the scaffolds that the preset's screen
    computes: the same hits."""
    from biogen.library import Library
    from biogen.library.ingest import build_library
    from biogen.screen.presets import preset_library
    from biogen.screen.target import held_out_actives

    preset = Library.open(preset_library(lib_spec, THROMBIN.name, held_out_actives(THROMBIN), inline_rt))
    m = preset.manifest
    build_library([i["path"] for i in m["history"][0]["inputs"]], tmp_path / "lib", chunk_size=500,
                  featurizer=preset.featurizer, standardize=preset.standardize,
                  descriptors=[*m["descriptors"], "scaffold"], dedupe_key="smiles", runtime=inline_rt)
    assert "scaffold" not in m["descriptors"]
    theirs = _screen(lib_spec, tmp_path / "ik", inline_rt)
    import biogen.screen.pipeline

    def no_computing(*a, **k):
        raise AssertionError("a library that stores scaffolds had them computed")

    monkeypatch.setattr(biogen.screen.pipeline, "murcko_scaffolds", no_computing)
    ours = _screen(LibrarySpec(path=str(tmp_path / "lib")), tmp_path / "smi", inline_rt)
    assert ours.metrics["actives_in_library"] == theirs.metrics["actives_in_library"] == 215
    assert ours.metrics == theirs.metrics
    for col in ("smiles", "scaffold", "score"):
        assert ours.hits.column(col).to_pylist() == theirs.hits.column(col).to_pylist()


def test_prefetch_reads_library_columns_at_idle_priority(lib_spec, inline_rt):
    """The columns a screen's outputs need are read while the shards run, in a thread that
    only gets CPU time nothing else wants (Linux SCHED_IDLE): the same table as a plain read."""
    from biogen.screen.pipeline import _library_columns, _prefetch_library_columns
    from biogen.screen.presets import preset_library
    from biogen.screen.target import held_out_actives

    lib = Library.open(preset_library(lib_spec, THROMBIN.name, held_out_actives(THROMBIN), inline_rt))
    pool, table = _prefetch_library_columns(lib, ["id", "inchikey", "mw"])
    policy = pool.submit(os.sched_getscheduler, 0).result() if hasattr(os, "sched_getscheduler") else None
    pool.shutdown()
    assert table.result().equals(_library_columns(lib, ["id", "inchikey", "mw"]))
    assert table.result().num_rows == lib.n_rows == LIMIT + 215
    if sys.platform.startswith("linux"):
        assert policy == os.SCHED_IDLE


def test_metadata_that_does_not_match_the_fingerprints_is_refused(lib_spec, tmp_path, inline_rt):
    """A shard whose metadata lost a row (the fingerprints did not): the screen names the
    library and `biogen library verify` instead of writing misaligned ids."""
    import shutil

    from biogen.errors import CorruptLibraryError
    from biogen.screen.presets import preset_library
    from biogen.screen.target import held_out_actives

    src = Library.open(preset_library(lib_spec, THROMBIN.name, held_out_actives(THROMBIN), inline_rt))
    shutil.copytree(src.path, tmp_path / "lib")
    meta = tmp_path / "lib" / "shards" / src.shards[0].name / "meta.parquet"
    pq.write_table(pq.read_table(meta).slice(1), meta)
    with pytest.raises(CorruptLibraryError, match="rows of metadata but its shards .* fingerprints.*library verify"):
        _screen(LibrarySpec(path=str(tmp_path / "lib")), tmp_path / "run", inline_rt, filters=[])


@pytest.mark.ray
def test_screen_on_ray_actors_matches_inline(lib_spec, tmp_path, inline_rt, ray_rt):
    lib_spec_small = LibrarySpec(limit=LIMIT, cache_dir=lib_spec.cache_dir, chunk_size=400)  # several shards
    a = _screen(lib_spec_small, tmp_path / "inline", inline_rt, report=False)
    b = _screen(lib_spec_small, tmp_path / "ray", ray_rt, report=False)
    assert a.summary.shards >= 4
    assert a.hits.equals(b.hits)
    assert a.funnel == b.funnel and a.metrics == b.metrics


def test_filters_that_remove_everything(lib_spec, tmp_path, inline_rt):
    res = _screen(lib_spec, tmp_path / "run", inline_rt, filters=[PropertyFilter(ranges={"mw": [0, 10]}, name="tiny")])
    assert res.hits.num_rows == 0 and res.funnel[-1] == ("selected", 0)
    assert any("removed every molecule" in n for n in res.summary.notes)
    assert "removed every molecule" in (res.run_dir / "report.html").read_text()


def test_screen_refusals(lib_spec, tmp_path, inline_rt):
    with pytest.raises(ConfigError, match="no scorer"):
        run_screen(lib_spec, THROMBIN, [], [], runtime=inline_rt, run_dir=tmp_path)
    with pytest.raises(ConfigError, match="unique"):
        run_screen(lib_spec, THROMBIN, [PropertyFilter("lipinski", name="x")], [SimilarityScorer(name="x")],
                   runtime=inline_rt, run_dir=tmp_path)
    # a fusion typo fails before any shard runs (it used to surface only after all of them)
    from biogen.screen.pipeline import FusionSpec

    for fusion, msg in ((FusionSpec(weights={"simlarity": 2.0}), r"weights names \['simlarity'\].*scorers: similarity"),
                        (FusionSpec(method="borda"), "method='borda' is not valid"),
                        (FusionSpec(weights={"similarity": 0.0}), "no scorer with a non-zero fusion weight")):
        with pytest.raises(ConfigError, match=msg):
            run_screen(lib_spec, THROMBIN, [], [SimilarityScorer(name="similarity")], fusion=fusion,
                       runtime=inline_rt, run_dir=tmp_path / "typo")
        assert not (tmp_path / "typo" / "ledger.jsonl").exists()


def _biogen(args, cwd, env_extra=None):
    return run_biogen(*args, cwd=cwd, extra_env=env_extra)


def test_cli_screen_and_config_errors(lib_spec, tmp_path):
    env = {"BIOGEN_CACHE_DIR": str(tmp_path / "cache")}
    p = _biogen(["screen", f"library.limit={LIMIT}", "scoring=similarity", "selection=top", "selection.n=10",
                 "runtime=inline", "filters.lipinski=null", f"output={tmp_path / 'out'}"], tmp_path, env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "funnel: library 1,715 -> scored 1,715 -> selected 10" in p.stdout
    assert "labelled actives: 215 in the library" in p.stdout
    assert (tmp_path / "out" / "report.html").is_file()
    typo = _biogen(["screen", "filterz=none"], tmp_path, env)
    assert typo.returncode == 2 and "'filterz' is not a setting" in typo.stderr
    assert "selection, streaming, target" in typo.stderr
    typo2 = _biogen(["screen", "selection.nn=3"], tmp_path, env)
    assert "valid keys at 'selection': diversity, n, scaffold_cap, seed, top_m" in typo2.stderr
    preset = _biogen(["screen", "filters=nope"], tmp_path, env)
    assert preset.returncode != 0 and "lipinski" in preset.stderr and "druglike" in preset.stderr
    bad_stage = _biogen(["screen", "selection.n=0", "runtime=inline", f"library.limit={LIMIT}"], tmp_path, env)
    assert bad_stage.returncode == 2 and "selection.n=0" in bad_stage.stderr
    helptext = _biogen(["screen", "--help"], tmp_path, env)
    assert helptext.returncode == 0 and "experiment=" in helptext.stdout and "filters=" in helptext.stdout


def test_screen_with_qsar_trained_in_the_run(lib_spec, tmp_path, inline_rt):
    from biogen.screen.stages import QSARScorer

    res = run_screen(lib_spec, THROMBIN, [], [SimilarityScorer(name="similarity"),
                                              QSARScorer(model={"max_epochs": 3, "patience": 2}, name="qsar")],
                     selection=SelectionSpec(n=20, top_m=200), runtime=inline_rt, run_dir=tmp_path / "run",
                     report=False)
    assert list((tmp_path / "run" / "model").glob("*.ckpt"))
    scores = pq.read_table(tmp_path / "run" / "scores.parquet")
    q = scores.column("qsar").to_numpy(zero_copy_only=False)
    assert q.shape == (LIMIT + 215,) and np.isfinite(q).all() and q.std() > 0
    assert res.summary.qsar_train_metrics["qsar"]  # validation metrics of the model trained here
    assert set(res.hits.column_names) >= {"similarity", "qsar", "score", "rank"}
    # a rerun in the same directory reuses that model and resumes every shard
    ckpt = next((tmp_path / "run" / "model").glob("*.ckpt"))
    mtime = ckpt.stat().st_mtime_ns
    again = run_screen(lib_spec, THROMBIN, [], [SimilarityScorer(name="similarity"),
                                                QSARScorer(model={"max_epochs": 3, "patience": 2}, name="qsar")],
                       selection=SelectionSpec(n=20, top_m=200), runtime=inline_rt, run_dir=tmp_path / "run",
                       report=False)
    assert ckpt.stat().st_mtime_ns == mtime and again.hits.equals(res.hits)


def test_qsar_checkpoint_refusals(lib_spec, tmp_path, inline_rt):
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.errors import BiogenError
    from biogen.models.qsar import QSARSpec, fit_qsar
    from biogen.screen.stages import QSARScorer
    from biogen.search.queries import Queries
    from biogen.chem.standardize import StandardizeSpec

    fcfp = FingerprintSpec(use_features=True)
    smiles = ["CCO", "CCN", "c1ccccc1O", "CC(=O)O", "CCCCN", "c1ccncc1"] * 4
    q = Queries.from_smiles(smiles, fcfp, StandardizeSpec(enabled=False))
    model = fit_qsar(q.fps, np.linspace(5, 8, len(smiles)), QSARSpec(max_epochs=1, split="random"), fcfp)
    ckpt = model.save(tmp_path / "fcfp.ckpt")
    with pytest.raises(BiogenError, match="use_features") as err:
        run_screen(lib_spec, THROMBIN, [], [QSARScorer(checkpoint=str(ckpt), name="qsar")],
                   runtime=inline_rt, run_dir=tmp_path / "run")
    assert "library" in str(err.value)
    with pytest.raises(BiogenError, match="biogen train") as err:
        run_screen(lib_spec, THROMBIN, [], [QSARScorer(checkpoint=str(tmp_path / "missing.ckpt"), name="qsar")],
                   runtime=inline_rt, run_dir=tmp_path / "run2")
    assert "missing.ckpt" in str(err.value)


@pytest.mark.slow
def test_readme_main_job_biogen_screen(tmp_path, moleculeace):
    """README command 1's job exactly as a user runs it: `biogen screen`, fresh cache."""
    import time

    env = {"BIOGEN_CACHE_DIR": str(tmp_path / "cache")}
    t0 = time.perf_counter()
    p = _biogen(["screen", f"output={tmp_path / 'out'}"], tmp_path, env)
    wall = time.perf_counter() - t0
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["molecules"] > 176_000 and summary["known_actives"] == 985
    m = summary["metrics"]
    assert m["actives_in_library"] == 215
    # the held-out actives are strongly enriched (measured here: EF1% 86, BEDROC 0.88), but
    # ranking by molecular weight alone does as well: they are larger than MOSES's molecules
    assert m["ef1"] > 40 and m["bedroc20"] > 0.6
    assert m["null_model"]["property"] == "mw" and m["null_model"]["ef1"] > 40
    assert "labelled actives: 215 in the library" in p.stdout and "null model, ranking by mw" in p.stdout
    for name in ("report.html", "hits.sdf", "config.yaml", "model/model.ckpt"):
        assert (tmp_path / "out" / name).is_file(), name
    print(f"biogen screen (first run, preset built): {wall:.0f} s; stages {summary['seconds']}")
