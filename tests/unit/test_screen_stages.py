"""Screening stages, fused similarity, fusion and selection against oracles (RDKit)."""

import numpy as np
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import Descriptors, rdFingerprintGenerator

from biogen.chem.fingerprints import FingerprintSpec, pack_bits, popcounts
from biogen.chem.scaffolds import murcko_scaffolds
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError
from biogen.screen.selection import (CapWalk, SelectionSpec, best_first, fuse_scores, scaffold_keys,
                                    select_hits, walk_pool)
from biogen.screen.stages import AlertFilter, MoleculeBatch, PropertyFilter, SimilarityScorer, SmartsFilter
from biogen.screen.target import TargetSpec, load_target
from biogen.search.fused import fused_similarity
from biogen.search.metrics import Metric

SMILES = [
    "CC(=O)Oc1ccccc1C(=O)O", "CC(C)Cc1ccc(cc1)C(C)C(=O)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C",
    "c1ccc2c(c1)cc1ccc3cccc4ccc2c1c34", "O=C(O)c1ccccc1O", "CCN(CC)CC", "c1ccccc1", "C",
    "CC(=O)Nc1ccc(O)cc1", "COc1ccc2[nH]cc(CCN(C)C)c2c1", "S=C1SC(=Cc2ccccc2)C(=O)N1",
    "CCCCCCCCCCCCCCCCCC(=O)OCC(O)CO", "Clc1ccc(cc1)C(c1ccccc1)N1CCN(CC1)CCOCC(=O)O",
    "O=C1NC(=O)C(N1)(c1ccccc1)c1ccccc1", "CC12CCC3C(CCC4=CC(=O)CCC34C)C1CCC2O",
]


def _fps(smiles, nbits=2048):
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=nbits)
    mols = [Chem.MolFromSmiles(s) for s in smiles]
    ebv = [gen.GetFingerprint(m) for m in mols]
    packed = pack_bits(np.array([gen.GetFingerprintAsNumPy(m) for m in mols], dtype=np.uint8))
    return ebv, packed, popcounts(packed)


def _batch(smiles):
    _, fps, pc = _fps(smiles)
    return MoleculeBatch(np.arange(len(smiles)), list(smiles), fps, pc)


@pytest.mark.parametrize("metric", [Metric("tanimoto"), Metric("dice"), Metric("tversky", 0.7, 0.3)])
def test_fused_similarity_equals_rdkit(metric):
    ebv, fps, pc = _fps(SMILES)
    q = [0, 2, 8, 9]
    bulk = {"tanimoto": DataStructs.BulkTanimotoSimilarity, "dice": DataStructs.BulkDiceSimilarity}
    if metric.name == "tversky":
        ref = np.array([DataStructs.BulkTverskySimilarity(ebv[i], ebv, metric.alpha, metric.beta) for i in q]).T
    else:
        ref = np.array([bulk[metric.name](ebv[i], ebv) for i in q]).T  # N x Q
    assert np.array_equal(fused_similarity(fps[q], pc[q], fps, pc, metric, "max"), ref.max(1))
    top2 = np.sort(ref, axis=1)[:, ::-1][:, :2].mean(1)
    assert np.array_equal(fused_similarity(fps[q], pc[q], fps, pc, metric, "top_n", 2), top2)
    assert np.allclose(fused_similarity(fps[q], pc[q], fps, pc, metric, "mean"), ref.mean(1), rtol=0, atol=1e-15)
    # top_n larger than the number of queries: the mean over all of them
    assert np.allclose(fused_similarity(fps[q], pc[q], fps, pc, metric, "top_n", 10), ref.mean(1), atol=1e-15)


def test_fused_similarity_empty_fingerprint_and_errors():
    _, fps, pc = _fps(SMILES[:3])
    empty = np.zeros((1, fps.shape[1]), dtype=np.uint64)
    got = fused_similarity(fps, pc, np.vstack([fps, empty]), np.r_[pc, 0], Metric(), "max")
    assert got[-1] == 0.0 and np.all(got[:3] == 1.0)
    with pytest.raises(InputError, match="empty"):
        fused_similarity(fps[:0], pc[:0], fps, pc)
    with pytest.raises(ConfigError, match="fusion"):
        fused_similarity(fps, pc, fps, pc, fusion="median")


def test_property_filter_presets_and_on_the_fly_descriptors():
    batch = _batch(SMILES)
    passed = PropertyFilter("lipinski")(batch)
    mols = [Chem.MolFromSmiles(s) for s in SMILES]
    from rdkit.Chem import Crippen, Lipinski

    viol = [(Descriptors.MolWt(m) > 500) + (Crippen.MolLogP(m) > 5) + (Lipinski.NumHDonors(m) > 5)
            + (Lipinski.NumHAcceptors(m) > 10) for m in mols]
    assert passed.tolist() == [v <= 1 for v in viol]
    assert not passed[SMILES.index("CCCCCCCCCCCCCCCCCC(=O)OCC(O)CO")] or viol[11] <= 1
    strict = PropertyFilter(ranges={"mw": [100, 200]})(batch)
    mw = np.array([Descriptors.MolWt(m) for m in mols])
    assert strict.tolist() == ((mw >= 100) & (mw <= 200)).tolist()
    with pytest.raises(ConfigError, match="lipinski"):
        PropertyFilter("ro5")
    with pytest.raises(ConfigError):
        PropertyFilter(ranges={"weight": [0, 1]})
    with pytest.raises(ConfigError, match="numeric descriptors.*scaffold"):
        PropertyFilter(ranges={"scaffold": [0, 1]})


def test_alert_and_smarts_filters():
    batch = _batch(SMILES)
    ok = AlertFilter(["PAINS_A", "PAINS_B", "PAINS_C"])(batch)
    rhodanine = SMILES.index("S=C1SC(=Cc2ccccc2)C(=O)N1")  # ene_rhod: a PAINS_A alert
    assert not ok[rhodanine] and ok[SMILES.index("CC(=O)Oc1ccccc1C(=O)O")]
    with pytest.raises(ConfigError, match="PAINS"):
        AlertFilter(["PAINZ"])
    acids = SmartsFilter(include=["C(=O)[OH]"])(batch)
    assert acids.tolist() == [Chem.MolFromSmiles(s).HasSubstructMatch(Chem.MolFromSmarts("C(=O)[OH]")) for s in SMILES]
    no_n = SmartsFilter(exclude=["[#7]"])(batch)
    assert no_n.tolist() == ["N" not in s and "n" not in s for s in SMILES]
    with pytest.raises(ConfigError, match="invalid SMARTS"):
        SmartsFilter(include=["C(("])
    # a molecule that cannot be parsed fails the filter instead of crashing it
    bad = MoleculeBatch(np.arange(1), ["C1CC"], np.zeros((1, 32), np.uint64), np.zeros(1, np.int32))
    assert AlertFilter()(bad).tolist() == [False]


def test_similarity_scorer_needs_actives(tmp_path):
    from biogen.screen.stages import ScreenContext

    with pytest.raises(ConfigError, match="known actives"):
        SimilarityScorer().prepare(ScreenContext(FingerprintSpec(), None, None, tmp_path))


@pytest.mark.parametrize("kind", ["ties", "distinct", "one", "all_equal", "empty"])
def test_fractional_ranks_equal_scipy_rankdata(kind):
    from scipy.stats import rankdata

    from biogen.screen.metrics import fractional_ranks as _ranks

    rng = np.random.default_rng(7)
    x = {"ties": rng.integers(0, 20, 500).astype(float), "distinct": rng.random(500), "one": np.array([0.3]),
         "all_equal": np.full(9, 2.0), "empty": np.zeros(0)}[kind]
    expect = rankdata(x, method="average") / max(len(x), 1)
    assert np.allclose(_ranks(x), expect, rtol=0, atol=1e-15)
    y = x.copy()
    if len(y) > 1:
        y[1] = np.nan  # no rank for a NaN score
        r = _ranks(y)
        assert np.isnan(r[1]) and np.isfinite(np.delete(r, 1)).all()


def test_fuse_scores_rank_and_zscore():
    a = np.array([0.9, 0.1, 0.5, 0.5])
    b = np.array([1.0, 3.0, 2.0, 0.0])
    assert np.array_equal(fuse_scores({"a": a}), a)  # one scorer: its own scores
    r = fuse_scores({"a": a, "b": b}, method="rank")
    # ranks a: [4, 1, 2.5, 2.5]/4; b: [2, 4, 3, 1]/4 -> means
    assert np.allclose(r, [(4 + 2) / 8, (1 + 4) / 8, (2.5 + 3) / 8, (2.5 + 1) / 8])
    w = fuse_scores({"a": a, "b": b}, {"a": 3.0, "b": 1.0}, method="rank")
    assert np.allclose(w, [(3 * 4 + 2) / 16, (3 * 1 + 4) / 16, (3 * 2.5 + 3) / 16, (3 * 2.5 + 1) / 16])
    z = fuse_scores({"a": a, "b": b}, method="zscore")
    za, zb = (a - a.mean()) / a.std(), (b - b.mean()) / b.std()
    assert np.allclose(z, (za + zb) / 2)
    assert np.array_equal(fuse_scores({"a": a, "b": b}, {"b": 0.0}), a)
    with pytest.raises(ConfigError, match="not scorers"):
        fuse_scores({"a": a}, {"qsar": 1.0})
    with pytest.raises(ConfigError, match="rank"):
        fuse_scores({"a": a}, method="borda")


def test_best_first_is_a_stable_descending_argsort():
    """Ties in index order, NaN last, -0.0 tied with 0.0: exactly np.argsort(-x, kind="stable")."""
    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 7, 1000, 50_000):
        for _ in range(5):
            x = rng.integers(0, max(1, n // 3) + 1, n).astype(float)  # many ties
            x[rng.random(n) < 0.1] = np.nan
            x[rng.random(n) < 0.05] = -0.0
            assert np.array_equal(best_first(x), np.argsort(-x, kind="stable"))
    x = rng.random(10_000)  # no ties
    assert np.array_equal(best_first(x), np.argsort(-x, kind="stable"))


def test_fuse_scores_in_threads_equals_one_scorer_at_a_time():
    """A large screen ranks each scorer in its own thread: same fused scores as computed serially."""
    from biogen.screen.metrics import average_ranks

    rng = np.random.default_rng(1)
    n = 150_000  # over the threading threshold
    a, b = rng.random(n).round(3), rng.normal(size=n)
    a[::97] = np.nan
    want = (2.0 * average_ranks(a) / n + 1.0 * average_ranks(b) / n) / 3.0
    got = fuse_scores({"a": a, "b": b}, {"a": 2.0, "b": 1.0})
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.allclose(got, want, equal_nan=True)


def test_scaffolds_of_canonical_smiles_equal_rdkits_full_path():
    """The fast path (canonical SMILES read without re-sanitizing) gives RDKit's
    MurckoScaffoldSmiles for molecules with stereo, charges, isotopes, aromatic heteroatoms,
    fused and bridged rings, from RDKit's own shipped data sets."""
    import gzip
    import os

    from rdkit import RDConfig

    smiles = []
    for name in ("NCI/first_200.props.sdf", "NCI/first_5K.smi"):
        path = os.path.join(RDConfig.RDDataDir, name)
        if name.endswith(".sdf"):
            smiles += [Chem.MolToSmiles(m) for m in Chem.SDMolSupplier(path) if m is not None]
        else:
            with (gzip.open if path.endswith(".gz") else open)(path, "rt") as fh:
                for line in fh:
                    m = Chem.MolFromSmiles(line.split()[0]) if line.strip() else None
                    if m is not None:
                        smiles.append(Chem.MolToSmiles(m))
    smiles += [Chem.MolToSmiles(Chem.MolFromSmiles(s)) for s in (
        "C[C@H](N)C(=O)O", "[NH3+]CCc1ccc(O)cc1", "[2H]c1ccccc1C1CC1", "c1ccc2[nH]ccc2c1", "C1CC2CCC1C2",
        "O=S(=O)(c1ccccc1)c1ccccc1", "c1cc[se]c1", "C/C=C/c1ccccc1", "CCO", "[Na+].[O-]C(=O)c1ccccc1")]
    assert len(smiles) > 1000
    assert murcko_scaffolds(smiles, canonical=True) == murcko_scaffolds(smiles)
    assert murcko_scaffolds(["not a smiles", "CCO"], canonical=True) == ["", ""]


def test_select_hits_scaffold_cap_and_maxmin():
    smiles = ["c1ccccc1CC", "c1ccccc1CCC", "c1ccccc1CCCC", "c1ccccc1CCCCC", "C1CCNCC1C", "C1CCNCC1CC",
              "c1ccc2ccccc2c1C", "CCO", "CCCO", "c1ccncc1C"]
    _, fps, _ = _fps(smiles)
    order = np.arange(len(smiles))

    def scaffolds_of(idx):
        return murcko_scaffolds([smiles[i] for i in idx])

    chosen, scaff = select_hits(order, scaffolds_of, lambda idx: fps[idx],
                                SelectionSpec(n=5, top_m=5, diversity="none", scaffold_cap=2))
    assert chosen.tolist() == [0, 1, 4, 5, 6]  # at most 2 benzene-scaffold molecules, rank order kept
    assert scaff[0] == murcko_scaffolds(["c1ccccc1CC"])[0] == "c1ccccc1"
    # candidates are fetched in blocks: the block size changes nothing
    for block in (1, 3):
        again = select_hits(order, scaffolds_of, lambda idx: fps[idx],
                            SelectionSpec(n=5, top_m=5, diversity="none", scaffold_cap=2), block=block)
        assert again[0].tolist() == chosen.tolist() and again[1] == scaff
    chosen, _ = select_hits(order, scaffolds_of, lambda idx: fps[idx], SelectionSpec(n=4, top_m=10, scaffold_cap=None))
    assert len(chosen) == 4 and chosen[0] == 0 and list(chosen) == sorted(chosen)
    # MaxMin spreads the pick: not simply the 4 best (3 of which share the benzene scaffold)
    assert chosen.tolist() != [0, 1, 2, 3]
    with pytest.raises(ConfigError):
        SelectionSpec(n=10, top_m=5)
    # the walk keeps the scaffolds of its pool only, not of every candidate it examined
    pool, kept = walk_pool(order, scaffolds_of, SelectionSpec(n=5, top_m=5, diversity="none", scaffold_cap=2))
    assert pool == [0, 1, 4, 5, 6] and sorted(kept) == pool  # 2 and 3 were examined and passed over


@pytest.mark.parametrize("seed", range(6))
def test_the_vectorized_cap_walk_equals_the_walk(seed):
    """``CapWalk`` on scaffold keys (the streaming screen's walk) picks the same pool as
    ``walk_pool`` on the strings, for every cap, pool size and diversity setting."""
    rng = np.random.default_rng(seed)
    for trial in range(40):
        n, m = int(rng.integers(0, 300)), int(rng.integers(1, 50))
        scaffolds = [f"c1ccc{x}cc1" if x else "" for x in rng.integers(0, m, n)]
        n_hits = int(rng.integers(1, 30))
        spec = SelectionSpec(n=n_hits, top_m=int(rng.integers(n_hits, 90)), diversity=["maxmin", "none"][trial % 2],
                             scaffold_cap=[None, 1, 2, 3][trial % 4])
        pool, _ = walk_pool(np.arange(n), lambda idx: [scaffolds[i] for i in idx], spec, block=int(rng.integers(1, 40)))
        keys = scaffold_keys(scaffolds)
        assert CapWalk(spec).feed(keys).tolist() == pool
        # fed in pieces (a streaming screen's top-K rounds), the walk picks the same pool
        walk, got = CapWalk(spec), []
        cuts = [0, *sorted(rng.integers(0, n + 1, int(rng.integers(0, 5))).tolist()), n]
        for a, b in zip(cuts, cuts[1:]):
            got += (a + walk.feed(keys[a:b])).tolist()
        assert got == pool and walk.full == (len(pool) == walk.want)
    keys = scaffold_keys(["c1ccccc1", "", "c1ccccc1", "C1CC1"])
    assert keys.shape == (4, 2) and keys.dtype == np.uint64
    assert (keys[0] == keys[2]).all() and len({tuple(k) for k in keys.tolist()}) == 3


def test_target_from_moleculeace_and_files(tmp_path, moleculeace):
    spec = FingerprintSpec()
    t = load_target(TargetSpec(name="thrombin", moleculeace="CHEMBL204_Ki"), spec, StandardizeSpec(enabled=False))
    assert len(t.training.y) == 2201 and t.training.fps.shape == (2201, 32)
    assert len(t.actives) == int((t.training.y >= 7.0).sum()) == 985
    assert len(t.held_out_smiles) == 215 and 200 <= len(t.label_keys) <= 215
    assert len(t.label_smiles) == len(t.label_keys)  # the same molecules, keyed by canonical SMILES
    f = tmp_path / "actives.smi"
    f.write_text("CC(=O)Oc1ccccc1C(=O)O a1\nnot_a_smiles a2\nCCN(CC)CC a3\n")
    t2 = load_target(TargetSpec(name="x", actives=str(f)), spec, StandardizeSpec(enabled=False))
    assert t2.actives.ids == ["a1", "a3"] and len(t2.rejects) == 1 and t2.rejects[0].id == "a2"
    empty = tmp_path / "bad.smi"
    empty.write_text("xyz b1\n")
    with pytest.raises(InputError, match="no usable known actives"):
        load_target(TargetSpec(name="x", actives=str(empty)), spec, StandardizeSpec(enabled=False))
    with pytest.raises(ConfigError, match="no compounds"):
        TargetSpec(name="x")
    acts = tmp_path / "acts.csv"
    acts.write_text("smiles,ki_nM\nCCO,10\nCCN,abc\nCCC,-1\n")
    t3 = load_target(TargetSpec(name="x", activities=str(acts), value_column="ki_nM"), spec, StandardizeSpec(enabled=False))
    assert t3.training.y.tolist() == [8.0] and len(t3.rejects) == 2 and len(t3.actives) == 1
    assert {r.reason for r in t3.rejects} == {"bad_value"} and [r.record for r in t3.rejects] == [3, 4]
    # the same reader as biogen train: the activity column found by its name, uM, infinities refused
    tsv = tmp_path / "acts.tsv"
    tsv.write_text("smiles\tic50\nCCO\t0.01\nCCN\tinf\n")
    t4 = load_target(TargetSpec(name="x", activities=str(tsv), value_unit="uM"), spec, StandardizeSpec(enabled=False))
    assert t4.training.y.tolist() == [8.0] and "not finite" in t4.rejects[0].detail


def test_admet_stage_with_the_real_pretrained_model(tmp_path):
    """ADMET-AI's Chemprop-2 checkpoints (pip install 'biogen[admet]'; it pins an older RDKit,
    so it lives in its own environment: this test runs there and is skipped elsewhere)."""
    pytest.importorskip("admet_ai", reason="optional extra: pip install 'biogen[admet]' (own environment)")
    from biogen.screen.stages import ADMETScorer, ScreenContext

    stage = ADMETScorer(endpoint="hERG")
    stage.prepare(ScreenContext(FingerprintSpec(), None, None, tmp_path))
    scores = stage(_batch(["CC(=O)Oc1ccccc1C(=O)O", "CN1CCC(CC1)C(c1ccccc1)c1ccccc1"]))
    assert scores.shape == (2,) and np.all((scores >= 0) & (scores <= 1))
    assert scores[0] > scores[1]  # aspirin: low hERG liability; a lipophilic diphenylmethylpiperidine: high
    with pytest.raises(ConfigError, match="no endpoint"):
        ADMETScorer(endpoint="nope")(_batch(["CCO"]))


def test_admet_stage_without_the_package_says_how_to_install(tmp_path, monkeypatch):
    import builtins

    from biogen.screen.stages import ADMETScorer, ScreenContext

    real = builtins.__import__

    def no_admet(name, *a, **k):
        if name == "admet_ai":
            raise ImportError("No module named 'admet_ai'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_admet)
    with pytest.raises(ConfigError, match=r"pip install 'biogen\[admet\]'"):
        ADMETScorer().prepare(ScreenContext(FingerprintSpec(), None, None, tmp_path))
