"""DTI splits (no leak across train/test for the unseen-* kinds) and metrics (CI, AUPR)."""

from __future__ import annotations

import numpy as np
import pytest

from biogen.dti.splits import average_precision, concordance_index, protein_clusters, split_pairs
from biogen.errors import ConfigError, InputError

RNG = np.random.default_rng(7)
SEQS = ["".join(RNG.choice(list("ACDEFGHIKLMNPQRSTVWY"), 120)) for _ in range(12)]
SEQS[5] = SEQS[4][:60] + "W" + SEQS[4][61:]     # a point mutant of protein 4
SEQS[9] = SEQS[8][:110]                          # a truncated protein 8
PAIRS = np.array([(c, p) for c in range(40) for p in range(12) if (c + p) % 3], dtype=np.int64)


def _naive_ci(y, p):
    num = den = 0.0
    for i in range(len(y)):
        for j in range(len(y)):
            if y[i] > y[j]:
                den += 1
                num += 1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0
    return num / den


def test_concordance_index_equals_the_quadratic_definition_with_ties():
    for _ in range(30):
        n = int(RNG.integers(2, 50))
        y, p = RNG.integers(0, 5, n).astype(float), RNG.integers(0, 6, n).astype(float)
        if len(set(y)) > 1:
            assert concordance_index(y, p) == pytest.approx(_naive_ci(y, p), abs=1e-12)
    assert np.isnan(concordance_index([1.0, 1.0], [0.0, 1.0]))
    assert concordance_index([1, 2, 3], [3, 2, 1]) == 0.0 and concordance_index([1, 2, 3], [5, 6, 7]) == 1.0


def test_average_precision_by_hand():
    # ranked: A, I, A, I -> precision at the actives 1/1 and 2/3
    assert average_precision(np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])) == pytest.approx((1 + 2 / 3) / 2)
    assert np.isnan(average_precision(np.zeros(3), np.arange(3)))


def test_near_duplicate_proteins_share_a_cluster_and_others_do_not():
    ids = protein_clusters(SEQS)
    assert ids[4] == ids[5] and ids[8] == ids[9]
    assert len(set(ids)) == 10


@pytest.mark.parametrize("kind", ["unseen_compound", "unseen_protein", "unseen_both"])
def test_unseen_splits_hold_out_whole_compounds_or_protein_clusters(kind):
    parts = split_pairs(PAIRS, kind, val_fraction=0.1, test_fraction=0.25, seed=3, sequences=SEQS)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    assert len(tr) and len(te) and not set(tr) & set(te) and not set(tr) & set(va) and not set(va) & set(te)
    clusters = protein_clusters(SEQS)
    if kind in ("unseen_compound", "unseen_both"):
        assert not set(PAIRS[tr, 0]) & set(PAIRS[te, 0])
    if kind in ("unseen_protein", "unseen_both"):
        assert not set(clusters[PAIRS[tr, 1]]) & set(clusters[PAIRS[te, 1]])
    if kind == "unseen_both":
        assert parts["dropped"] == len(PAIRS) - len(tr) - len(va) - len(te) > 0
    else:
        assert len(tr) + len(va) + len(te) == len(PAIRS)


def test_random_and_folds_splits_and_their_errors():
    parts = split_pairs(PAIRS, "random", val_fraction=0.1, test_fraction=0.2, seed=0)
    assert sorted(np.concatenate([parts["train"], parts["val"], parts["test"]]).tolist()) == list(range(len(PAIRS)))
    assert len(parts["test"]) == round(0.2 * len(PAIRS))
    folds = {"test": np.arange(10), "train": [np.arange(10, 20), np.arange(20, 30)]}
    f = split_pairs(PAIRS, "folds", folds=folds)
    assert f["test"].tolist() == list(range(10)) and f["val"].tolist() == list(range(10, 20))
    assert f["train"].tolist() == list(range(20, len(PAIRS)))
    with pytest.raises(ConfigError, match="train_data=kiba"):
        split_pairs(PAIRS, "folds")
    with pytest.raises(ConfigError, match="not a DTI split"):
        split_pairs(PAIRS, "scaffold")
    with pytest.raises(InputError, match="too few compounds or protein clusters"):
        split_pairs(PAIRS[PAIRS[:, 1] == 0], "unseen_protein", sequences=SEQS)
