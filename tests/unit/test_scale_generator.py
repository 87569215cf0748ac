"""The synthetic-library generator of benchmarks/scale_driver.py: a valid library (verify,
open, search), the prefix property its size views rely on, and parts whose duplicate count
is known exactly (the oracle the dedupe measurements are checked against)."""

from __future__ import annotations

import gzip
import itertools
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from biogen.datasets import dataset_path
from biogen.library import Library
from biogen.library.ingest import build_library
from biogen.library.parts import Dedupe, plan_dedupe
from biogen.library.verify import verify_library
from biogen.runtime import RuntimeSpec
from biogen.search import SimilarityIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import scale_driver as sd  # noqa: E402

SHARD_ROWS = 400
SEED = 7


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A real 300-molecule library (MOSES test) to resample, with a descriptor column."""
    d = tmp_path_factory.mktemp("scale_src")
    src = d / "moses.csv"
    with gzip.open(dataset_path("moses_test"), "rt") as f, open(src, "w") as o:
        o.writelines(itertools.islice(f, 301))
    build_library(str(src), d / "lib", descriptors=("scaffold",), chunk_size=100,
                  runtime=RuntimeSpec(mode="inline", progress=False))
    return d / "lib"


def _view(pool: Path, source: Path, rows: int, out: Path) -> Path:
    entries, gen = sd.extend_library_pool(pool, source, rows, SHARD_ROWS, SEED, procs=1)
    return sd.library_view(pool, entries, gen["source_manifest"], gen["source_rows"], out, SEED)


def test_library_is_valid_and_searchable(source, tmp_path):
    lib_dir = _view(tmp_path / "pool", source, 1000, tmp_path / "lib")  # rounded up to whole shards
    report = verify_library(lib_dir, deep=True)
    assert report.ok, report.problems
    lib = Library.open(lib_dir)
    assert lib.n_rows == 3 * SHARD_ROWS and len(lib.shards) == 3
    meta = lib.read_metadata(["id", "inchikey", "ordinal", "duplicate_of", "scaffold"])
    ids = meta.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert sorted(meta.column("ordinal").to_pylist()) == list(range(lib.n_rows))
    assert all(i == f"BG{o + 1:09d}" for i, o in zip(ids, meta.column("ordinal").to_pylist()))
    # a repeat cites the first copy of the same molecule; every source molecule's first copy is there
    key_of = dict(zip(ids, meta.column("inchikey").to_pylist()))
    dups = [(k, d) for k, d in zip(meta.column("inchikey").to_pylist(), meta.column("duplicate_of").to_pylist()) if d]
    src = Library.open(source)
    assert len(dups) == lib.n_rows - src.n_rows
    assert all(key_of[d] == k for k, d in dups)
    # the fingerprints are the source molecules' own (by InChIKey)
    src_meta = src.read_metadata(["inchikey"]).column("inchikey").to_pylist()
    src_fp = dict(zip(src_meta, src.fingerprints()))
    fps = lib.fingerprints()
    assert all(np.array_equal(fps[i], src_fp[k]) for i, k in enumerate(meta.column("inchikey").to_pylist()))
    # searchable: the top hit of a library molecule scores 1.0, as a fresh index over the same rows
    queries = src.read_metadata(["smiles"]).column("smiles").to_pylist()[:3]
    hits = SimilarityIndex.open(lib_dir, engine="cpu", workers=1).top_k(queries, k=5)
    ref = SimilarityIndex.from_fingerprints(fps, lib.featurizer, ids=ids, engine="cpu", workers=1)
    ref_hits = ref.top_k(queries, k=5)
    assert hits.column("score").to_pylist() == ref_hits.column("score").to_pylist()
    assert hits.column("hit_id").to_pylist() == ref_hits.column("hit_id").to_pylist()
    assert max(hits.column("score").to_pylist()) == 1.0


def test_library_pool_grows_by_prefix(source, tmp_path):
    small = sd.extend_library_pool(tmp_path / "a", source, 2 * SHARD_ROWS, SHARD_ROWS, SEED, procs=1)[0]
    grown = sd.extend_library_pool(tmp_path / "a", source, 4 * SHARD_ROWS, SHARD_ROWS, SEED, procs=1)[0]
    direct = sd.extend_library_pool(tmp_path / "b", source, 4 * SHARD_ROWS, SHARD_ROWS, SEED, procs=1)[0]
    assert grown[:2] == small
    assert grown == direct  # same bytes (sha256) whether written at once or grown, by 1 or 2 processes


def test_parts_have_a_known_duplicate_count(tmp_path):
    part_rows, frac = 2_000, 0.05
    g = sd.extend_parts_pool(tmp_path / "pool", 10 * part_rows, part_rows, frac, SEED, procs=1)
    keys, ids = [], []
    for p in range(g["parts"]):
        t = pq.read_table(tmp_path / "pool" / f"{p:06d}.parquet")
        keys += t.column("inchikey").to_pylist()
        ids += t.column("id").to_pylist()
    assert len(keys) == 10 * part_rows and len(set(ids)) == len(ids)
    assert all(len(k) == 27 and k[14] == "-" and k[25] == "-" for k in keys)
    assert g["duplicates"] == len(keys) - len(set(keys))
    assert 0.03 < g["duplicates"] / len(keys) < 0.07
    # grown by prefix: the first parts are the same files
    h = sd.extend_parts_pool(tmp_path / "pool2", 4 * part_rows, part_rows, frac, SEED, procs=1)
    assert h["duplicates"] == len(keys[:4 * part_rows]) - len(set(keys[:4 * part_rows]))
    # the serial planner agrees
    view = sd.build_view(tmp_path / "pool", g["parts"], tmp_path / "build")
    st = Dedupe({}, set(), 0, "keep_first", "BG", "inchikey")
    kept = sum(int(plan.keep.sum()) for plan in plan_dedupe(view / "_work" / "000-build", list(range(g["parts"])), st))
    assert st.duplicates == g["duplicates"] and kept == len(keys) - g["duplicates"]
