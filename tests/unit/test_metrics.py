"""Enrichment metrics against hand-computed cases, scikit-learn and RDKit's Scoring module,
and the tie rule against a brute-force average over all orderings of tied molecules."""

import itertools
import math

import numpy as np
import pytest
from rdkit.ML.Scoring import Scoring
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sk_roc_curve

from biogen.screen.metrics import (actives_in_top, auroc, bedroc, enrichment_curve, enrichment_factor,
                                   roc_curve, summary, weighted_fusion)

S4 = np.array([0.9, 0.8, 0.7, 0.6])
Y4 = np.array([True, False, True, False])


def _rdkit_list(scores, labels):
    order = np.argsort(-np.asarray(scores), kind="stable")
    return [[float(scores[i]), bool(labels[i])] for i in order]


def test_hand_computed_case():
    # active at rank 1 beats both inactives, active at rank 3 beats one: 3 of 4 pairs
    assert auroc(S4, Y4) == 0.75
    assert enrichment_factor(S4, Y4, 0.25) == 2.0  # top 1 molecule: 1 active / (2/4)
    assert enrichment_factor(S4, Y4, 0.5) == 1.0   # top 2: 1 active in 2 / (2/4)
    assert enrichment_factor(S4, Y4, 0.01) == 2.0  # ceil(0.04) = 1 molecule
    assert actives_in_top(S4, Y4, 3) == 2.0
    # BEDROC (Truchon & Bayly eq. 36) written out for ranks 1 and 3 of N=4, alpha=1
    a, n, ra = 1.0, 4, 0.5
    rie = ((math.exp(-a / n) + math.exp(-3 * a / n)) / 2) / ((1 / n) * (1 - math.exp(-a)) / (math.exp(a / n) - 1))
    want = rie * ra * math.sinh(a / 2) / (math.cosh(a / 2) - math.cosh(a / 2 - a * ra)) + 1 / (1 - math.exp(a * (1 - ra)))
    assert bedroc(S4, Y4, alpha=1.0) == pytest.approx(want, abs=1e-12)


def test_bedroc_is_one_for_actives_first_and_zero_for_actives_last():
    s = np.arange(100, 0, -1, dtype=float)
    y = np.zeros(100, dtype=bool)
    y[:7] = True
    assert bedroc(s, y) == pytest.approx(1.0, abs=1e-12)
    assert bedroc(-s, y) == pytest.approx(0.0, abs=1e-12)
    assert auroc(s, y) == 1.0 and auroc(-s, y) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_agrees_with_sklearn_and_rdkit_without_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(150, 3000))
    s = rng.normal(size=n)
    y = rng.random(n) < rng.uniform(0.01, 0.3)
    y[0], y[1] = True, False
    ranked = _rdkit_list(s, y)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(s, y) == pytest.approx(Scoring.CalcAUC(ranked, 1), abs=1e-12)
    ef1, ef5 = Scoring.CalcEnrichment(ranked, 1, [0.01, 0.05])
    assert enrichment_factor(s, y, 0.01) == pytest.approx(ef1, abs=1e-12)
    assert enrichment_factor(s, y, 0.05) == pytest.approx(ef5, abs=1e-12)
    for alpha in (20.0, 5.0, 80.5):
        assert bedroc(s, y, alpha) == pytest.approx(Scoring.CalcBEDROC(ranked, 1, alpha), abs=1e-10)
    d = summary(s, y)
    assert d == {"auroc": auroc(s, y), "ef1": enrichment_factor(s, y, 0.01), "ef5": enrichment_factor(s, y, 0.05),
                 "bedroc20": bedroc(s, y), "n_actives": int(y.sum()), "n": n}


@pytest.mark.parametrize("seed", range(3))
def test_ties_are_the_mean_over_all_tie_orderings(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 3, size=8).astype(float)  # 3 values over 8 molecules: big tie blocks
    y = rng.random(8) < 0.4
    y[0], y[1] = True, False
    blocks = [np.flatnonzero(s == v) for v in sorted(set(s), reverse=True)]
    aucs, efs, beds = [], [], []
    for perms in itertools.product(*(itertools.permutations(b) for b in blocks)):
        order = np.concatenate(perms)
        ranked = [[0.0, bool(y[i])] for i in order]
        aucs.append(Scoring.CalcAUC(ranked, 1))
        efs.append(Scoring.CalcEnrichment(ranked, 1, [0.3])[0])
        beds.append(Scoring.CalcBEDROC(ranked, 1, 20.0))
    assert auroc(s, y) == pytest.approx(np.mean(aucs), abs=1e-12)
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert enrichment_factor(s, y, 0.3) == pytest.approx(np.mean(efs), abs=1e-12)
    assert bedroc(s, y) == pytest.approx(np.mean(beds), abs=1e-12)


def test_ties_do_not_depend_on_input_order():
    s = np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.0])
    y = np.array([True, False, False, True, False, False])
    p = np.array([5, 3, 1, 0, 4, 2])
    for f in (auroc, bedroc, lambda a, b: enrichment_factor(a, b, 0.2)):
        assert f(s, y) == f(s[p], y[p])
    assert enrichment_factor(np.ones(10), np.arange(10) < 3, 0.1) == pytest.approx(1.0)


def test_nan_ranks_last():
    s = np.array([np.nan, 0.2, 0.1, np.nan])
    y = np.array([True, True, False, False])
    # ranked: 0.2 (active), 0.1, then the two NaNs tied
    assert auroc(s, y) == pytest.approx(roc_auc_score(y, np.nan_to_num(s, nan=-1.0)))
    assert actives_in_top(s, y, 1) == 1.0
    assert actives_in_top(s, y, 3) == 1.5


def test_curves():
    rng = np.random.default_rng(7)
    s = np.round(rng.random(300), 2)  # ties
    y = rng.random(300) < 0.1
    fpr, tpr, thr = roc_curve(s, y)
    sk_fpr, sk_tpr, sk_thr = sk_roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thr[1:], sk_thr[1:])
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(s, y), abs=1e-12)
    x, found = enrichment_curve(s, y)
    assert x[0] == found[0] == 0.0 and x[-1] == 1.0 and found[-1] == pytest.approx(1.0)
    assert np.all(np.diff(found) >= 0)
    k = 30
    assert found[k] * y.sum() == pytest.approx(actives_in_top(s, y, k))


def test_clear_errors():
    with pytest.raises(ValueError, match="no actives"):
        auroc([0.1, 0.2], [False, False])
    with pytest.raises(ValueError, match="no inactives"):
        summary([0.1, 0.2], [True, True])
    with pytest.raises(ValueError, match="differ in length"):
        auroc([0.1, 0.2, 0.3], [True, False])
    with pytest.raises(ValueError, match="fraction"):
        enrichment_factor(S4, Y4, 0.0)
    with pytest.raises(ValueError, match="alpha"):
        bedroc(S4, Y4, alpha=0)
    with pytest.raises(ValueError, match="booleans"):
        auroc(S4, [0, 2, 1, 0])
    assert auroc(S4, [1, 0, 1, 0]) == 0.75  # 0/1 labels are accepted


def test_enrichment_metrics_value_is_the_summary():
    from biogen.screen.metrics import EnrichmentMetrics

    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.03
    scores = rng.normal(size=2000) + 2 * labels
    m = EnrichmentMetrics.of(scores, labels)
    s = summary(scores, labels)
    assert (m.auroc, m.ef1, m.ef5, m.bedroc20, m.n_actives, m.n) == (
        s["auroc"], s["ef1"], s["ef5"], s["bedroc20"], s["n_actives"], s["n"])
    assert m.recovered_top_1pct == actives_in_top(scores, labels, 20)
    assert list(m.as_dict()) == ["auroc", "ef1", "ef5", "bedroc20", "n_actives", "n", "recovered_top_1%"]


def test_null_model_takes_the_better_property_and_direction():
    """Actives that are small molecules: ranking by heavy-atom count low-first enriches them;
    the null model finds that direction, ranks NaN and filtered-out molecules last."""
    from biogen.screen.metrics import null_model, property_ranking

    rng = np.random.default_rng(4)
    n = 3000
    labels = np.zeros(n, bool)
    labels[:60] = True
    heavy = np.where(labels, rng.normal(14, 2, n), rng.normal(25, 3, n))
    mw = rng.normal(350, 50, n)  # no signal
    nm = null_model({"heavy_atoms": heavy, "mw": mw}, labels)
    assert (nm.prop, nm.high_first, nm.label) == ("heavy_atoms", False, "heavy_atoms (low first)")
    assert nm.metrics.auroc > 0.95 and nm.as_dict()["property"] == "heavy_atoms"
    keep = np.ones(n, bool)
    keep[:30] = False  # half the actives filtered out: they rank last
    assert null_model({"heavy_atoms": heavy}, labels, keep=keep).metrics.recovered_top_1pct <= 30
    assert np.array_equal(property_ranking([1.0, np.nan, 3.0], True, np.array([True, True, False])),
                          [1.0, -np.inf, -np.inf])
    assert null_model({}, labels) is None and null_model({"mw": mw}, np.zeros(n, bool)) is None


def test_weighted_fusion_against_a_plain_reference():
    """sum_k w_k f(s_k) / sum_k |w_k|, f = scipy's average ranks / N (rank) or z-scores; NaN stays
    NaN (a caller passes -inf to rank a missing score last); weight 0 leaves a scorer out."""
    from scipy.stats import rankdata

    rng = np.random.default_rng(5)
    a, b, c = rng.integers(0, 6, 40).astype(float), rng.normal(size=40), rng.random(40)
    ranks = [rankdata(x, method="average") / 40 for x in (a, b, c)]
    got = weighted_fusion([a, b, c], [2.0, -1.0, 0.5])
    assert np.allclose(got, (2 * ranks[0] - ranks[1] + 0.5 * ranks[2]) / 3.5, rtol=0, atol=1e-15)
    z = [(x - x.mean()) / x.std() for x in (a, b)]
    assert np.allclose(weighted_fusion([a, b], [1, 3], "zscore"), (z[0] + 3 * z[1]) / 4, rtol=0, atol=1e-12)
    assert np.array_equal(weighted_fusion([a, b, c], [1, 0, 1], mapper=lambda f, xs: [f(x) for x in xs]),
                          weighted_fusion([a, c], [1, 1]))
    a[3] = np.nan
    fused = weighted_fusion([a, b], [1, 1])
    assert np.isnan(fused[3]) and np.isfinite(np.delete(fused, 3)).all()
    last = weighted_fusion([np.where(np.isnan(a), -np.inf, a), b], [1, 1])
    assert np.isfinite(last).all() and last[3] == (1 / 40 + rankdata(b)[3] / 40) / 2
    with pytest.raises(ValueError, match="rank, zscore"):
        weighted_fusion([a, b], [1, 1], "borda")
    with pytest.raises(ValueError, match="one weight per scorer"):
        weighted_fusion([a, b], [1])
    with pytest.raises(ValueError, match="every fusion weight is 0"):
        weighted_fusion([a, b], [0, 0])
