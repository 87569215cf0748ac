"""The benchmark pieces: valence policy, seeded draws, scorers against RDKit, report
aggregation, and (real data) the published similarity level on DUD and ChEMBL set I."""

import gzip

import numpy as np
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from biogen.chem.fingerprints import Fingerprinter, FingerprintSpec
from biogen.errors import ConfigError
from biogen.evaluation import report
from biogen.evaluation.data import CHEMBL_SET_I, list_targets, load_list, parse_smiles, target_files
from biogen.evaluation.protocol import ProtocolSpec, draw_split, evaluate_target
from biogen.evaluation.scorers import (LogisticScorer, NaiveBayesScorer, NamedScorer, PropertyScorer,
                                       QuerySimilarityScorer, RankFusionScorer, Split, TargetContext)
from tests_support import compose_config

FXA = "N=[CH+](N)c1cccc(Cn2c(C(N)=O)cc3ccccc32)c1"
ACTIVES = ["c1ccccc1O", "c1ccccc1N", "c1ccccc1CO", "c1ccc(O)cc1O", "c1ccccc1C(=O)O", "Oc1ccc(N)cc1"]
DECOYS = ["CCCCCC", "CCOCC", "CC(C)CC(=O)N", "C1CCCCC1", "CCN(CC)CC", "OCCO", "CCCCCCCCO", "CC#N",
          "C1CCNCC1", "CCSCC", "CC(=O)OC", "NCCN"]
ECFP = {"e": FingerprintSpec(nbits=1024)}


def _context(actives=ACTIVES, decoys=DECOYS, specs=ECFP):
    mols = [Chem.MolFromSmiles(s) for s in actives + decoys]
    fps = {k: Fingerprinter(v).compute(mols) for k, v in specs.items()}
    labels = np.arange(len(mols)) < len(actives)
    return TargetContext(fps, labels)


def test_valence_policy():
    mol, status, reason = parse_smiles(FXA)
    assert mol is not None and status == "partial" and "valence" in reason.lower()
    assert Fingerprinter(FingerprintSpec()).compute([mol]).any()
    assert parse_smiles(FXA, "reject")[:2] == (None, "rejected")
    assert parse_smiles("c1ccccc1")[1] == "ok"
    assert parse_smiles("C1CC(")[1] == "rejected"
    with pytest.raises(ConfigError, match="partial, reject"):
        parse_smiles("C", "drop")


def test_load_list_counts_every_problem(tmp_path):
    path = tmp_path / "cmp_list_DUD_x_actives.dat.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("# Mol_Title\tID\tSMILES\nZ1\tA_1\tc1ccccc1O\nZ2\tA_2\t" + FXA + "\nZ3\tA_3\tnot_a_smiles\n")
    out = load_list(path, ECFP)
    assert out.ids == ["A_1", "A_2"] and out.fps["e"].shape == (2, 16)
    assert [(n.id, n.status) for n in out.notes] == [("A_2", "partial"), ("A_3", "rejected")]
    rej = load_list(path, ECFP, invalid="reject")
    assert rej.ids == ["A_1"] and len(rej.notes) == 2


def test_draws_are_seeded_per_target_and_repeat():
    a = draw_split(1, "DUD", "fxa", 5, 3, 64, 2000, 0.2)
    b = draw_split(1, "DUD", "fxa", 5, 3, 64, 2000, 0.2)
    c = draw_split(1, "DUD", "fxa", 5, 4, 64, 2000, 0.2)
    assert np.array_equal(a.queries, b.queries) and np.array_equal(a.train_decoys, b.train_decoys)
    assert not np.array_equal(a.queries, c.queries)
    assert a.queries.size == 5 and a.queries.max() < 64 and len(set(a.queries)) == 5
    assert a.train_decoys.size == 400 and a.train_decoys.min() >= 64 and len(set(a.train_decoys)) == 400
    with pytest.raises(ConfigError, match="leave no active"):
        draw_split(1, "DUD", "x", 10, 0, 10, 100, 0.2)


@pytest.mark.parametrize("fusion", ["max", "mean", "topk"])
def test_similarity_scores_equal_rdkit(fusion):
    ctx = _context()
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in ACTIVES + DECOYS]
    split = Split(np.array([0, 2, 3]), np.array([7]))
    ranked = np.array([1, 4, 5, 6, 8, 9, 10, 11])
    sims = np.array([DataStructs.BulkTanimotoSimilarity(fps[q], [fps[i] for i in ranked]) for q in split.queries])
    want = {"max": sims.max(0), "mean": sims.mean(0), "topk": np.sort(sims, 0)[-2:].mean(0)}[fusion]
    got = QuerySimilarityScorer("e", fusion, k=2).score(ctx, split, ranked)
    np.testing.assert_array_equal(got, want)


def test_trained_scorers_rank_actives_first_on_an_easy_set():
    ctx = _context()
    split = Split(np.array([0, 1, 2]), np.array([6, 7, 8, 9, 10]))
    ranked = np.array([3, 4, 5, 11, 12, 13, 14, 15, 16, 17])
    from biogen.screen.metrics import auroc

    for scorer in (LogisticScorer("e", C=1.0), NaiveBayesScorer("e"),
                   RankFusionScorer((LogisticScorer("e"), QuerySimilarityScorer("e")))):
        s = scorer.score(ctx, split, ranked)
        assert s.shape == (10,) and np.isfinite(s).all()
        assert auroc(s, ctx.labels[ranked]) > 0.8


def test_rank_fusion_scorer_is_the_screens_weighted_fusion():
    """The benchmark's fusion is ``weighted_fusion`` of its members' scores, a NaN of a member
    ranked last by that member; all-zero weights are refused."""
    from biogen.screen.metrics import weighted_fusion

    ctx = _context()
    split = Split(np.array([0, 1]), np.array([6, 7, 8]))
    ranked = np.array([2, 3, 4, 5, 9, 10, 11, 12, 13, 14, 15, 16, 17])
    members = (LogisticScorer("e"), QuerySimilarityScorer("e"), QuerySimilarityScorer("e", "mean"))
    got = RankFusionScorer(members, (1.0, 2.0, 0.5)).score(ctx, split, ranked)
    want = weighted_fusion([m.score(ctx, split, ranked) for m in members], (1.0, 2.0, 0.5))
    assert np.array_equal(got, want)
    with pytest.raises(ConfigError, match="all 0"):
        RankFusionScorer(members, (0.0, 0.0, 0.0))


def test_evaluate_target_rows_and_pairing():
    ctx = _context()
    scorers = [NamedScorer("sim", QuerySimilarityScorer("e")), NamedScorer("lr", LogisticScorer("e"))]
    spec = ProtocolSpec(n_queries=(2, 3), repeats=4, decoy_fraction=0.25, ml_repeats=2)
    rows = evaluate_target(ctx, scorers, spec, "DUD", "toy")
    assert len([r for r in rows if r["scorer"] == "sim"]) == 8
    assert len([r for r in rows if r["scorer"] == "lr"]) == 4
    # every scorer of a repeat ranks the same list: actives minus queries, decoys minus 3 training decoys
    for r in rows:
        assert r["n"] == len(ACTIVES) - r["n_queries"] + len(DECOYS) - 3
        assert r["n_actives"] == len(ACTIVES) - r["n_queries"]
    again = evaluate_target(ctx, scorers, spec, "DUD", "toy")  # deterministic apart from timings
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in rows] == [
        {k: v for k, v in r.items() if k != "seconds"} for r in again]


def test_property_null_model_follows_the_queries():
    """Ranks by the property in the direction the query actives point to, with no labels of
    the ranked list: here the actives (benzene rings with substituents) are heavier than most
    decoys. load_list computes the properties."""

    mols = [Chem.MolFromSmiles(s) for s in ACTIVES + DECOYS]
    heavy = np.array([m.GetNumHeavyAtoms() for m in mols], dtype=np.float64)
    ctx = TargetContext({}, np.arange(len(mols)) < len(ACTIVES), props={"heavy_atoms": heavy})
    split = Split(np.array([0, 1]), np.array([], dtype=np.int64))
    ranked = np.arange(2, len(mols))
    s = PropertyScorer("heavy_atoms").score(ctx, split, ranked)
    assert np.array_equal(s, heavy[ranked])  # queries (7 atoms) above the list's median: high first
    light = Split(np.array([len(ACTIVES) + 7]), np.array([], dtype=np.int64))  # a 3-atom "query"
    assert np.array_equal(PropertyScorer("heavy_atoms").score(ctx, light, ranked), -heavy[ranked])
    with pytest.raises(ConfigError, match="'tpsa' is not computed; available: heavy_atoms"):
        PropertyScorer("tpsa").score(ctx, split, ranked)


def test_load_list_computes_the_null_model_properties(tmp_path):
    path = tmp_path / "cmp_list_DUD_x_actives.dat.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("# Mol_Title\tID\tSMILES\nZ1\tA_1\tc1ccccc1O\nZ2\tA_2\tCCO\n")
    out = load_list(path, ECFP)
    assert out.props["heavy_atoms"].tolist() == [7, 3]
    assert out.props["mw"] == pytest.approx([94.113, 46.069], abs=1e-3)


def test_scorers_are_built_from_the_catalog_by_target_and_errors():
    """Each catalog entry is a _target_ node (biogen.cli.config.from_config); a fusion's
    members are other entries by interpolation."""
    from biogen.cli.evaluate import _scorers

    cfg = compose_config("evaluate", "scorers=[fused-lr-sim-ecfp4_1024,sim-ecfp4_1024-max,null-mw]")
    f, sim, null = _scorers(cfg)
    assert f.uses_decoys and not sim.uses_decoys and null.scorer == PropertyScorer("mw")
    assert f.scorer.members == (LogisticScorer("ecfp4_1024", C=0.1), sim.scorer) and hash(f.scorer)
    w = _scorers(compose_config("evaluate", "scorers=[fused-lr-sim-ecfp4_1024]",
                                "+scorer_catalog.fused-lr-sim-ecfp4_1024.weights=[1,2]"))[0]
    assert w.scorer.weights == (1.0, 2.0)
    with pytest.raises(ConfigError, match=r"scorers \['knn'\] are not in scorer_catalog"):
        _scorers(compose_config("evaluate", "scorers=[knn]"))
    with pytest.raises(ConfigError, match=r"unknown scorer_catalog.sim-maccs-max key\(s\) \['fingerprnt'\]; valid keys: fingerprint"):
        _scorers(compose_config("evaluate", "scorers=[sim-maccs-max]", "+scorer_catalog.sim-maccs-max.fingerprnt=e"))
    with pytest.raises(ConfigError, match="fusion='median'"):
        _scorers(compose_config("evaluate", "scorers=[sim-maccs-max]", "scorer_catalog.sim-maccs-max.fusion=median"))


def test_report_groups_anchor_and_verdict():
    rows = []
    for t, ds in (("fxa", "DUD"), ("25", "ChEMBL"), ("999", "ChEMBL")):
        for s, auc, ef in (("sim", 0.9, 20.0), ("lr", 0.95, 25.0)):
            for rep in range(2):
                rows.append({"dataset": ds, "target": t, "scorer": s, "n_queries": 20, "repeat": rep,
                             "auroc": auc + 0.01 * rep, "ef1": ef, "ef5": 5.0, "bedroc20": 0.5})
    targets = report.per_target(rows)
    assert len(targets) == 6 and targets[0]["repeats"] == 2 and targets[0]["auroc"] == pytest.approx(0.905)
    summ = report.group_means(targets)
    groups = {(r["group"], r["scorer"]): r["targets"] for r in summ}
    assert groups[("DUD", "sim")] == 1 and groups[("ChEMBL", "sim")] == 2 and groups[("ChEMBL-I", "sim")] == 1
    assert groups[("all", "lr")] == 3
    anchors = report.anchors(summ, "sim")
    assert {(a["group"], a["n_queries"]) for a in anchors} == {("DUD", 20), ("ChEMBL-I", 20)}
    v = report.verdict(summ, {"sim"}, {"lr"})
    assert v == [pytest.approx(v[0])] and v[0]["beats"] and v[0]["best_sim_auroc_scorer"] == "sim"
    md = report.markdown(summ, anchors, v, ["sim", "lr"])
    assert "### DUD (1 targets)" in md and "| lr | 2 | 0.955 | 25.0 | 0.500 |" in md


@pytest.mark.slow
def test_published_similarity_level_on_real_data(vs_benchmark):
    """ECFP4-1024, max fusion, 20 queries: AUROC 0.96 on DUD, 0.88 on ChEMBL set I (+-0.02)."""
    spec = ProtocolSpec(n_queries=(20,), repeats=4)
    scorer = [NamedScorer("sim", QuerySimilarityScorer("e"))]
    assert len(list_targets(vs_benchmark, "DUD")) == 21 and len(list_targets(vs_benchmark, "ChEMBL")) == 80
    aucs = {"DUD": [], "ChEMBL": []}
    shared = None
    for ds in ("DUD", "ChEMBL"):
        for t in list_targets(vs_benchmark, ds):
            if ds == "ChEMBL" and t not in CHEMBL_SET_I:
                continue
            act_path, dec_path = target_files(vs_benchmark, ds, t)
            act = load_list(act_path, ECFP)
            if ds == "ChEMBL":
                shared = shared or load_list(dec_path, ECFP)
                dec = shared
            else:
                dec = load_list(dec_path, ECFP)
            if t == "fxa":
                assert sum(n.status == "partial" for n in act.notes) == 58 and len(act) == 64
            ctx = TargetContext({"e": np.concatenate([act.fps["e"], dec.fps["e"]])},
                                np.arange(len(act) + len(dec)) < len(act))
            aucs[ds].append(np.mean([r["auroc"] for r in evaluate_target(ctx, scorer, spec, ds, t)]))
    assert len(aucs["ChEMBL"]) == 50
    assert np.mean(aucs["DUD"]) == pytest.approx(0.96, abs=0.02)
    assert np.mean(aucs["ChEMBL"]) == pytest.approx(0.88, abs=0.02)


def test_qsar_scorer_trains_the_project_mlp():
    pytest.importorskip("biogen.models.qsar")
    from biogen.evaluation.scorers import MLPScorer

    ctx = _context(specs={"e": FingerprintSpec(nbits=1024)})
    ctx.specs = {"e": FingerprintSpec(nbits=1024)}
    split = Split(np.array([0, 1, 2]), np.array([6, 7, 8, 9, 10, 11, 12]))
    ranked = np.array([3, 4, 5, 13, 14, 15, 16, 17])
    s = MLPScorer("e", hidden=(16,), max_epochs=3, patience=2).score(ctx, split, ranked)
    assert s.shape == (8,) and np.isfinite(s).all()
    with pytest.raises(ConfigError, match="parameters of fingerprint 'e' are unknown"):
        MLPScorer("e", max_epochs=1).score(_context(), split, ranked)
