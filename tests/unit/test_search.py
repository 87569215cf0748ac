"""Similarity search: metrics, exact threshold tables, Numba kernels, the index and the
sharded (Ray) search, checked against RDKit's Bulk*Similarity on real molecules."""

from __future__ import annotations

import gzip
import itertools

import numpy as np
import pytest
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

from biogen.chem.fingerprints import FingerprintSpec, popcounts
from biogen.datasets import dataset_path
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.kernels.cpu import block_sketch, query_blocks, row_popcounts, threshold_candidates
from biogen.library.ingest import build_library
from biogen.library.store import Library
from biogen.search import Metric, Queries, SimilarityIndex
from biogen.search.cpu import CpuEngine
from biogen.search.metrics import NEVER
from biogen.search.neighbors import neighbor_graph
from biogen.search.plan import popcount_starts

METRICS = [Metric("tanimoto"), Metric("dice"), Metric("tversky", 0.3, 0.7), Metric("tversky", 1.0, 0.0),
           Metric("tversky", 0.0, 0.0)]


def ebv(bits, n=256):
    v = DataStructs.ExplicitBitVect(n)
    v.SetBitsFromList([int(b) for b in bits])
    return v


def rdkit_scores(metric: Metric, q, targets) -> np.ndarray:
    if metric.name == "tanimoto":
        return np.asarray(DataStructs.BulkTanimotoSimilarity(q, targets))
    if metric.name == "dice":
        return np.asarray(DataStructs.BulkDiceSimilarity(q, targets))
    return np.asarray(DataStructs.BulkTverskySimilarity(q, targets, metric.alpha, metric.beta))


# ----------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.label)
def test_scores_equal_rdkit_bit_for_bit_including_empty_fingerprints(metric):
    rng = np.random.default_rng(1)
    sets = [rng.choice(256, rng.integers(0, 70), replace=False) for _ in range(300)] + [[], [3]]
    vecs = [ebv(s) for s in sets]
    b = np.array([v.GetNumOnBits() for v in vecs])
    for qs in sets[:40] + [[], [3]]:
        q = ebv(qs)
        c = np.array([(q & v).GetNumOnBits() for v in vecs])
        ours = metric.score(c, q.GetNumOnBits(), b)
        assert np.array_equal(ours, rdkit_scores(metric, q, vecs))  # exact float64 equality


@pytest.mark.parametrize("metric", METRICS, ids=lambda m: m.label)
@pytest.mark.parametrize("t", [0.0, 0.1, 1 / 3, 0.4, 0.7, 0.8571428571428571, 1.0])
def test_min_common_is_the_exact_float_threshold_test(metric, t):
    nbits = 128
    for a in (0, 1, 5, 37, 64, 128):
        table = metric.min_common(a, t, nbits)[0]
        for b in range(nbits + 1):
            c = np.arange(min(a, b) + 1)
            passes = metric.score(c, a, b) >= t
            expected = c[passes].min() if passes.any() else NEVER
            assert table[b] == expected, (a, b, t)


def test_metric_codes_are_the_kernels_codes():
    import biogen.kernels.cpu as kcpu

    for name in ("tanimoto", "dice", "tversky"):
        assert Metric(name).code == getattr(kcpu, f"METRIC_{name.upper()}")


def test_metric_config_errors():
    with pytest.raises(ConfigError, match="valid: tanimoto, dice, tversky"):
        Metric("cosine")
    with pytest.raises(ConfigError, match="alpha >= 0"):
        Metric("tversky", -1, 0.5)


# ----------------------------------------------------------------------------- kernels
def random_db(n, w, rng, density=0.02):
    bits = rng.random((n, w * 64)) < density
    fps = np.packbits(bits, axis=1, bitorder="little").view("<u8")
    pcs = popcounts(fps)
    order = np.argsort(pcs, kind="stable")
    return np.ascontiguousarray(fps[order]), pcs[order]


def brute(queries, mc, lo, hi, fps, pcs):
    out = set()
    for j, q in enumerate(queries):
        c = np.bitwise_count(fps & q).sum(axis=1)
        for r in range(lo[j], hi[j]):
            if c[r] >= mc[j][pcs[r]]:
                out.add((j, r, int(c[r])))
    return out


def test_select_top_k_matches_a_full_sort(monkeypatch):
    from biogen.kernels.cpu import select_top_k

    rng = np.random.default_rng(3)
    n, nq = 5000, 40
    qi = rng.integers(0, nq, n).astype(np.int32)
    qi[qi == 7] = 8  # a query without candidates
    score = rng.integers(0, 20, n) / 19.0  # many ties
    key = rng.permutation(n).astype(np.int64)
    order = np.lexsort((key, -score, qi))
    for k in (1, 5, 200, n):  # 200: more than some queries have
        got = select_top_k(qi, score, key, 0, nq, k)
        first = np.arange(n) - np.searchsorted(qi[order], qi[order]) < k
        assert np.array_equal(got, order[first])
        halves = np.concatenate([select_top_k(qi, score, key, 0, 13, k), select_top_k(qi, score, key, 13, nq, k)])
        assert np.array_equal(halves, got)  # disjoint query ranges (the threaded split)
    import biogen.search.index as index_mod

    monkeypatch.setattr(index_mod, "SELECT_PARALLEL_PAIRS", 1000)  # split 5000 pairs over 3 threads
    threaded = index_mod._select_top_k((qi, np.arange(n), score, key), 5, workers=3)
    assert np.array_equal(threaded[1], order[np.arange(n) - np.searchsorted(qi[order], qi[order]) < 5])


def test_block_sketch_layout_and_saturation():
    rng = np.random.default_rng(7)
    fps, _ = random_db(200, 5, rng, density=0.15)  # 16-bit blocks of ~2.4 bits: many saturate
    fps[3, 2] = np.uint64(0xFFFF_0000_0003_0001)  # blocks of 1, 2, 0 and 16 bits
    sk = block_sketch(fps)
    assert sk.shape == (4, 5, 64) and not sk[3, :, 200 - 192:].any()  # padding rows are zero
    blocks = np.bitwise_count(fps.view("<u2")).reshape(200, 5, 4)
    flat = sk.transpose(0, 2, 1).reshape(-1, 5)[:200]
    for j in range(4):
        assert np.array_equal((flat >> 2 * j) & 3, np.minimum(blocks[:, :, j], 3))
    assert flat[3, 2] == 1 | 2 << 2 | 0 << 4 | 3 << 6 and (blocks > 3).any()
    assert np.array_equal(query_blocks(fps), blocks)


@pytest.mark.parametrize("w,density", [(3, 0.02), (16, 0.02), (32, 0.02), (2, 0.3), (8, 0.45)],
                         ids=["w3", "w16", "w32", "saturated", "over-255-bits"])
def test_numba_kernel_matches_plain_python(w, density):
    """Sparse fingerprints (the block bound), dense ones (saturated sketch codes) and
    queries of more than 255 bits (counted directly) give the plain-Python answer."""
    rng = np.random.default_rng(w)
    fps, pcs = random_db(3000, w, rng, density)
    if w == 8:
        assert (pcs > 255).any() and (pcs <= 255).any()
    nbits = w * 64
    assert np.array_equal(row_popcounts(fps), pcs)
    queries = fps[rng.integers(0, len(fps), 40)]
    qpop = popcounts(queries)
    mc = np.concatenate([Metric("tanimoto").min_common(a, t, nbits) for a, t in
                         zip(qpop, rng.choice([0.0, 0.3, 0.5, 1.0], len(qpop)))])
    lo = rng.integers(0, 1500, len(queries))
    hi = lo + rng.integers(0, 1500, len(queries))  # includes empty ranges
    expected = brute(queries, mc, lo, hi, fps, pcs)
    for win in [(0, len(fps)), (700, 2100)]:
        qi, r, c = threshold_candidates(queries, query_blocks(queries), mc, lo, hi, fps,
                                        block_sketch(fps), pcs, *win)
        got = set(zip(qi.tolist(), r.tolist(), c.tolist()))
        assert got == {x for x in expected if win[0] <= x[1] < win[1]}
    for workers in (1, 2):
        eng = CpuEngine(fps, pcs, workers=workers)
        got = set(zip(*(x.tolist() for x in eng.candidates(queries, mc, lo, hi))))
        assert got == expected
        single = set(zip(*(x.tolist() for x in eng.candidates(queries[:1], mc[:1], lo[:1], hi[:1]))))
        assert single == {x for x in expected if x[0] == 0}
        eng.close()
    qi, r, c = CpuEngine(fps, pcs, 2).candidates(queries[:0], mc[:0], lo[:0], hi[:0])
    assert len(qi) == len(r) == len(c) == 0
    with pytest.raises(ValueError, match="sorted by popcount"):  # the engine contract
        CpuEngine(fps[::-1], pcs[::-1])


# ----------------------------------------------------------------------------- real library
N_MOLS = 1200


@pytest.fixture(scope="module")
def moses_lib(tmp_path_factory):
    """A 4-shard library of real ZINC molecules (MOSES test) and RDKit's view of it."""
    d = tmp_path_factory.mktemp("search")
    src = d / "moses.csv"
    with gzip.open(dataset_path("moses_test"), "rt") as f, open(src, "w") as o:
        o.writelines(itertools.islice(f, N_MOLS + 1))
    from biogen.runtime import RuntimeSpec

    build_library(str(src), d / "lib", descriptors=(), chunk_size=350,
                  runtime=RuntimeSpec(mode="inline", progress=False))
    lib = Library.open(d / "lib")
    meta = lib.read_metadata(["id", "smiles"])
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    smiles = meta.column("smiles").to_pylist()
    return {"path": d / "lib", "lib": lib, "ids": meta.column("id").to_pylist(), "smiles": smiles,
            "ebvs": [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles], "gen": gen}


QUERIES = ["CC(=O)Nc1ccc(O)cc1", "c1ccc2[nH]ccc2c1", "O=C(O)c1ccccc1O", "CCN(CC)CC"]


def per_query(table, i):
    d = table.to_pydict()
    sel = [j for j, q in enumerate(d["query_index"]) if q == i]
    return [d["hit_id"][j] for j in sel], [d["score"][j] for j in sel], [d["rank"][j] for j in sel]


def oracle(m, metric, smiles):
    return rdkit_scores(metric, m["gen"].GetFingerprint(Chem.MolFromSmiles(smiles)), m["ebvs"])


def check_threshold(m, table, queries, metric, t):
    for i, s in enumerate(queries):
        sc = oracle(m, metric, s)
        ids, scores, ranks = per_query(table, i)
        assert set(zip(ids, scores)) == {(m["ids"][j], sc[j]) for j in np.flatnonzero(sc >= t)}
        assert ranks == list(range(1, len(ids) + 1))
        assert scores == sorted(scores, reverse=True)


def check_top_k(m, table, queries, metric, k):
    for i, s in enumerate(queries):
        sc = oracle(m, metric, s)
        order = sorted(range(len(sc)), key=lambda j: (-sc[j], m["ids"][j]))[:k]
        ids, scores, ranks = per_query(table, i)
        assert ids == [m["ids"][j] for j in order]
        assert scores == [sc[j] for j in order]
        assert ranks == list(range(1, len(order) + 1))


@pytest.fixture(scope="module", params=[(1, None), (2, None), (2, 120_000)], ids=["w1", "w2", "w2-streamed"])
def index(request, moses_lib):
    workers, part_bytes = request.param
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=workers, part_bytes=part_bytes)
    assert idx.streamed == (part_bytes is not None)
    yield idx
    idx.close()


@pytest.mark.parametrize("metric", METRICS[:4], ids=lambda m: m.label)
def test_threshold_equals_rdkit(index, moses_lib, metric):
    queries = QUERIES + moses_lib["smiles"][:2]  # two queries identical to library members
    for t in (0.0, 0.4, 0.7, 1.0):
        check_threshold(moses_lib, index.threshold(queries, t, metric), queries, metric, t)


@pytest.mark.parametrize("metric", METRICS[:4], ids=lambda m: m.label)
def test_top_k_equals_rdkit_with_ties_by_id(index, moses_lib, metric):
    queries = QUERIES + moses_lib["smiles"][:2]
    for k in (1, 10, 100, N_MOLS + 50):  # k larger than the library returns it all
        check_top_k(moses_lib, index.top_k(queries, k, metric), queries, metric, k)
    tab = index.top_k(moses_lib["smiles"][5], 1)
    assert tab.column("score").to_pylist() == [1.0]  # a library member finds itself


@pytest.mark.parametrize("margin", [1, 4])
def test_top_k_speculative_scan_is_exact_whether_it_completes_or_not(moses_lib, monkeypatch, margin):
    """Small rounds make every query speculate; margin 1 makes many speculations fail."""
    import biogen.search.index as index_mod

    monkeypatch.setattr(index_mod, "FIRST_ROUND_ROWS", 16)
    monkeypatch.setattr(index_mod, "SPECULATE_ROWS", 64)
    monkeypatch.setattr(index_mod, "SPECULATE_MARGIN", margin)
    queries = QUERIES + moses_lib["smiles"][100:140:2]
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=2)
    for k in (1, 3, 10):
        check_top_k(moses_lib, idx.top_k(queries, k), queries, Metric(), k)
    assert idx.speculation["complete"] > 0
    if margin == 1:
        assert idx.speculation["failed"] > 0
    idx.close()


def test_edge_cases(moses_lib):
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    spec = moses_lib["lib"].featurizer
    empty_q = Queries(np.zeros((1, spec.n_words), np.uint64), ["empty"], [None], spec)
    assert idx.threshold(empty_q, 0.01).num_rows == 0  # an empty fingerprint scores 0 with all
    tab = idx.top_k(empty_q, 3)  # all scores 0: the 3 smallest ids
    assert tab.column("hit_id").to_pylist() == sorted(moses_lib["ids"])[:3]
    assert idx.threshold(["C"], 0.99).num_rows == 0  # no hits: an empty, typed table
    assert idx.top_k(Queries(np.zeros((0, spec.n_words), np.uint64), [], [], spec), 5).num_rows == 0
    with pytest.raises(ConfigError, match="k=0"):
        idx.top_k("C", 0)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        idx.threshold("C", 1.5)
    with pytest.raises(ConfigError, match="topk or threshold"):
        idx.search("C", mode="knn")
    with pytest.raises(InputError, match="neither an existing file"):
        idx.queries("not_a_file.smi")


def test_query_files_and_rejects(moses_lib, tmp_path):
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    f = tmp_path / "q.smi"
    f.write_text("CC(=O)Nc1ccc(O)cc1 para\nC1CC( broken\nc1ccccc1 benzene\n")
    q = idx.queries(str(f))
    assert q.ids == ["para", "benzene"]
    assert [(r.record, r.reason) for r in q.rejects] == [(2, "parse_error")]
    check_top_k(moses_lib, idx.top_k(q, 5), ["CC(=O)Nc1ccc(O)cc1", "c1ccccc1"], Metric(), 5)


def test_featurizer_mismatch_is_refused(moses_lib, tmp_path):
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    other = FingerprintSpec(radius=3)
    q = Queries(np.zeros((1, other.n_words), np.uint64), ["x"], [None], other)
    with pytest.raises(LibraryError, match="radius: query=3, library=2"):
        idx.top_k(q, 5)
    from biogen.runtime import RuntimeSpec

    src = tmp_path / "few.smi"
    src.write_text("CCO a\nCCN b\n")
    build_library(str(src), tmp_path / "maccs", featurizer=FingerprintSpec(type="maccs"), descriptors=(),
                  runtime=RuntimeSpec(mode="inline", progress=False))
    with pytest.raises(LibraryError, match="type: query='maccs', library='morgan'"):
        idx.top_k(str(tmp_path / "maccs"), 5)  # a library as query, made with other parameters


def test_library_as_query(moses_lib):
    idx = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=2)
    tab = idx.top_k(moses_lib["path"], 1)
    assert tab.num_rows == N_MOLS
    assert set(tab.column("score").to_pylist()) == {1.0}


def test_neighbor_graph_equals_brute_force(moses_lib):
    fps = moses_lib["lib"].fingerprints()[:300]
    spec = moses_lib["lib"].featurizer
    ebvs = moses_lib["ebvs"][:300]
    g = neighbor_graph(fps, spec, threshold=0.5, block=64)
    k = neighbor_graph(fps, spec, k=3, block=70)
    for i in range(300):
        sc = np.asarray(DataStructs.BulkTanimotoSimilarity(ebvs[i], ebvs))
        sc[i] = -1
        j, s = g.neighbors(i)
        assert set(zip(j.tolist(), s.tolist())) == {(x, sc[x]) for x in np.flatnonzero(sc >= 0.5)}
        j, s = k.neighbors(i)
        best = sorted(range(300), key=lambda x: (-sc[x], str(x)))[:3]
        assert j.tolist() == best and s.tolist() == [sc[x] for x in best]
    assert g.to_table().num_rows == len(g.indices)


@pytest.mark.ray
def test_sharded_search_on_ray_actors_equals_one_index(moses_lib, ray_local):
    from biogen.search.distributed import ShardedSearch, split_shards

    assert split_shards([5, 5, 5, 5], 2) == [(0, 2), (2, 4)]
    assert split_shards([5], 3) == [(0, 1)]
    one = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    with ShardedSearch(moses_lib["path"], actors=2, engine="cpu", workers=1) as sharded:
        assert len(sharded.actors) == 2
        for k in (1, 10, 1000):
            assert sharded.top_k(QUERIES, k).equals(one.top_k(QUERIES, k))
        assert sharded.threshold(QUERIES, 0.4).equals(one.threshold(QUERIES, 0.4))
        assert sharded.streamed == [False, False]
    # a memory budget per actor: each streams its slice in parts, with the same hits
    with ShardedSearch(moses_lib["path"], actors=2, engine="cpu", workers=1, part_bytes=64 << 10) as sharded:
        assert sharded.streamed == [True, True]
        assert sharded.top_k(QUERIES, 10).equals(one.top_k(QUERIES, 10))
    # more actors than the cluster can place would wait forever: refused at once
    with pytest.raises(ConfigError, match=r"actors=8 with engine=cpu needs 8 CPUs but the Ray cluster has 2"):
        ShardedSearch(moses_lib["path"], actors=8, engine="cpu", workers=1)
    with pytest.raises(ConfigError, match=r"actors=2 with engine=cpu needs 6 CPUs"):
        ShardedSearch(moses_lib["path"], actors=2, engine="cpu", workers=3)


def test_search_actors_on_one_node_share_its_memory():
    from biogen.search.distributed import node_share

    assert node_share(actors=4, cpus_per_actor=1, node_cpus=2) == 0.5   # 2 of them fit on the node
    assert node_share(actors=2, cpus_per_actor=1, node_cpus=64) == 0.5  # both may land on it
    assert node_share(actors=8, cpus_per_actor=16, node_cpus=16) == 1.0  # one per node
    assert node_share(actors=1, cpus_per_actor=1, node_cpus=64) == 1.0


def test_popcount_starts():
    pcs = np.array([0, 0, 2, 2, 2, 5], np.int32)
    assert popcount_starts(pcs, 6).tolist() == [0, 2, 2, 5, 5, 5, 6, 6]


def test_the_default_budget_leaves_room_for_the_per_row_state_and_streamed_parts_are_let_go(moses_lib,
                                                                                          monkeypatch):
    """The default memory budget is for parts: the ids, SMILES and ranks the index keeps per
    row come off it first; a streamed index lets go of each part before it builds the next."""
    lib = moses_lib["lib"]
    resident = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    assert not resident.streamed
    part = SimilarityIndex.part_row_bytes(lib.featurizer, "cpu")
    assert part == 2 * 2048 // 8 + 2048 // 64 + 40  # the words twice (part + shard pages), the sketch, ~40 B
    fixed = resident.resident_bytes()
    assert fixed > 16 * N_MOLS  # ids and SMILES too
    # a budget that holds all rows in one part only if the per-row state is not counted
    monkeypatch.setattr(SimilarityIndex, "_default_part_bytes", lambda self: part * N_MOLS + fixed // 2)
    streamed = SimilarityIndex.open(moses_lib["path"], engine="cpu", workers=1)
    assert streamed.streamed and len(streamed._groups) >= 2
    seen = []
    for p, engine in streamed._parts():
        if seen:
            assert seen[-1].fps is None  # the previous part was released before this one was built
        seen.append(p)
        assert p.fps is not None and engine.fps is not None
    assert seen[-1].fps is None
    q = moses_lib["smiles"][:3]
    assert streamed.top_k(q, 20).equals(resident.top_k(q, 20))
