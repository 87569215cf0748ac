"""``biogen evaluate dti``: the baselines computed as defined (nearest neighbour, EF per
protein, k-mer composition), and one run on real KIBA pairs with every kind of protein
representation (pretrained UniRep, untrained ESM-2, 2-mer composition, none) writing its
tables."""

from __future__ import annotations

import json
import numpy as np
import pytest

from biogen.errors import ConfigError
from tests_support import run_biogen


def _tiny():
    """Four compounds x two proteins with hand-checkable Tanimoto similarities."""
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.dti.data import DTIData

    spec = FingerprintSpec(nbits=64)
    bits = np.zeros((4, 64), np.uint8)
    bits[0, [0, 1, 2, 3]] = 1      # c0
    bits[1, [0, 1, 2, 4]] = 1      # c1: Tanimoto to c0 3/5
    bits[2, [10, 11]] = 1          # c2: 0 to c0
    bits[3, [0, 1, 2, 3, 5]] = 1   # c3: Tanimoto to c0 4/5, to c1 3/6
    from biogen.chem.fingerprints import pack_bits

    fps = pack_bits(bits)
    pairs = np.array([[0, 0], [1, 0], [2, 0], [0, 1], [3, 0], [3, 1]], np.int64)
    y = np.array([10.0, 12.0, 14.0, 11.0, 0.0, 0.0], np.float32)
    return DTIData("tiny", ["c0", "c1", "c2", "c3"], ["C"] * 4, fps, ["p0", "p1"], ["MKTAYIAKQR", "MKTAYIAKQW"],
                   pairs, y, np.arange(6), spec, active_threshold=11.5)


def test_nearest_neighbour_takes_the_most_similar_training_compound_of_the_protein():
    from biogen.evaluation.dti import nearest_neighbour

    data = _tiny()
    pred = nearest_neighbour(data, np.array([0, 1, 2, 3]), np.array([4, 5]))
    # c3 for p0: its nearest training compound is c0 (4/5) -> 10; for p1: only c0 was measured -> 11
    assert pred.tolist() == [10.0, 11.0]
    # an unseen protein borrows its most similar training protein's pairs (p1 ~ p0 by 3-mers)
    pred = nearest_neighbour(data, np.array([0, 1, 2]), np.array([3]))
    assert pred.tolist() == [10.0]


def test_ef_per_protein_and_kmer_composition():
    from biogen.evaluation.dti import ef_per_protein, kmer_composition

    y = np.r_[np.ones(2), np.zeros(98), np.ones(50), np.zeros(50)]
    pred = np.r_[np.arange(100, 0, -1), np.zeros(100)]   # protein 0: both actives ranked first
    prot = np.r_[np.zeros(100), np.ones(100)]
    ef = ef_per_protein(pred, y, prot, 0.5, fraction=0.01, min_pairs=50)
    # protein 0: top 1 of 100 is active -> EF 1 / (2/100) = 50; protein 1: ties in input order -> 1/(1/2) = 2
    assert ef["ef1_proteins"] == 2 and ef["ef1_per_protein_median"] == pytest.approx(26.0)
    k = kmer_composition(["AAC", "XYZ"], 2)
    assert k.shape == (2, 400) and k[0].sum() == pytest.approx(1.0) and k[1].sum() == 0
    from biogen.evaluation.dti import DTIEvalSpec

    with pytest.raises(ConfigError, match="splits"):
        DTIEvalSpec(splits=("sideways",))
    with pytest.raises(ConfigError, match="baselines"):
        DTIEvalSpec(baselines=("oracle",))


@pytest.fixture(scope="module")
def kiba_small(kiba):
    """KIBA's pairs of its first 12 proteins."""
    return kiba.keep_pairs(np.flatnonzero(kiba.pairs[:, 1] < 12))


def test_one_split_with_every_kind_of_representation(kiba_small, tmp_path):
    from biogen.evaluation.dti import DTIEvalSpec, run_dti_evaluation

    spec = DTIEvalSpec(splits=("unseen_protein",), representations=("unirep64", "kmer2", "esm2_random", "agnostic"),
                       model=dict(hidden=64, latent=32, max_epochs=2, patience=1, batch_size=512))
    rows = run_dti_evaluation(kiba_small, spec, tmp_path)
    by = {r["representation"]: r for r in rows}
    assert list(by) == ["nearest_neighbour", "unirep64", "kmer2", "esm2_random", "agnostic"]
    assert by["esm2_random"]["protein_dim"] == 320 and by["agnostic"]["protein_dim"] == 1
    for r in rows:
        assert 0.4 < r["ci"] < 1 and r["n_test"] > 0 and r["rmse"] > 0
    assert len({r["n_test"] for r in rows}) == 1  # the same test pairs for every row
    md = (tmp_path / "dti-results.md").read_text()
    assert "| unseen_protein | esm2_random |" in md and "EF1%" in md
    assert len(json.loads((tmp_path / "dti-results.json").read_text())["rows"]) == 5
    assert not list(tmp_path.glob("**/*.pt"))  # the untrained ESM-2 was scratch


def test_cli_help_and_a_bad_split(tmp_path):
    r = run_biogen("evaluate", "dti", "--help", cwd=tmp_path, check=True)
    assert "nearest-neighbour" in r.stdout and "unseen_protein" in r.stdout
    r = run_biogen("evaluate", "dti", "splits=[sideways]", "data.path=/nonexistent", cwd=tmp_path)
    assert r.returncode != 0 and "splits=['sideways']: choose from" in r.stderr
