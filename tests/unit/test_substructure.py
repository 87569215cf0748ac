"""Substructure search: exact against a brute-force oracle, cache, errors, runtimes, max_hits."""

from __future__ import annotations

import gzip
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
from rdkit import Chem, rdBase

from biogen.errors import BiogenError, ConfigError, InputError
from biogen.library import Library
from biogen.library.ingest import build_library
from biogen.runtime import RuntimeSpec
from biogen.search import substructure as ss
from biogen.search.substructure import compile_query, substructure_search

INLINE = RuntimeSpec(mode="inline", progress=False)

# stereo pairs, so use_chirality has something to tell apart
STEREO = """N[C@@H](C)C(=O)O L-alanine
N[C@H](C)C(=O)O D-alanine
C[C@H](C(=O)O)c1ccc(CC(C)C)cc1 S-ibuprofen
C[C@@H](C(=O)O)c1ccc(CC(C)C)cc1 R-ibuprofen
N[C@@H](Cc1ccccc1)C(=O)O L-phenylalanine
"""

QUERIES = [
    "c1ccccc1",                 # benzene ring
    "C(=O)N",                   # amide
    "[Cl,Br,I]",                # heavy halogen
    "[Sn]C#[Xe]",               # nothing in the library
    "[$(C=O);!$(C(=O)O)]",      # recursive: carbonyl carbon that is not an acid/ester
    "[#6;$([#6]([#6])[!#6])]",  # recursive (RDKit #1498 once broke the pattern fingerprint on it)
    "c1ccc2[nH]ccc2c1",         # indole
    "S(=O)(=O)N",               # sulfonamide
    "C1CC1",                    # cyclopropane
    "NC(C)C(=O)O",              # plain SMILES as SMARTS
]


@pytest.fixture(scope="module")
def library(tmp_path_factory) -> Path:
    """~1,070 real molecules (MOSES head when installed, RDKit's EGFR actives, a few
    stereoisomers) in shards of 200 rows."""
    from biogen.datasets import dataset_path

    d = tmp_path_factory.mktemp("sss")
    inputs = [dataset_path("rdkit_egfr")]
    stereo = d / "stereo.smi"
    stereo.write_text(STEREO)
    inputs.append(str(stereo))
    try:
        moses = dataset_path("moses_test")
    except InputError:
        moses = None
    if moses:
        head = d / "moses_head.csv"
        with gzip.open(moses, "rt") as fh, open(head, "w") as out:
            for _, line in zip(range(701), fh):
                out.write(line)
        inputs.insert(0, str(head))
    build_library(inputs, d / "lib", chunk_size=200, descriptors=(), runtime=INLINE)
    return d / "lib"


@pytest.fixture(scope="module")
def rows(library) -> list[tuple[str, str, str, int, Chem.Mol]]:
    """(id, smiles, shard, row, mol) for every library row, in library order."""
    out = []
    for shard in Library.open(library).shards:
        meta = shard.metadata(["id", "smiles"])
        for r, (rid, smi) in enumerate(zip(meta.column("id").to_pylist(), meta.column("smiles").to_pylist())):
            out.append((rid, smi, shard.name, r, Chem.MolFromSmiles(smi)))
    return out


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One pattern-fingerprint cache for the tests that do not look at the cache."""
    return tmp_path_factory.mktemp("pattern_fp")


@pytest.fixture(scope="module")
def all_fps(rows) -> np.ndarray:
    return ss.pattern_fingerprints([s for _, s, *_ in rows])


def oracle(rows, smarts: str, chirality: bool = False) -> list[tuple[str, str, str, int]]:
    q = Chem.MolFromSmarts(smarts)
    return [(i, s, sh, r) for i, s, sh, r, m in rows if m.HasSubstructMatch(q, useChirality=chirality)]


def hits(res) -> list[tuple[str, str, str, int]]:
    t = res.table
    return list(zip(*(t.column(c).to_pylist() for c in ("hit_id", "smiles", "shard", "row"))))


def copy_library(library: Path, dst: Path) -> Path:
    shutil.copytree(library, dst, ignore=shutil.ignore_patterns("cache"))
    return dst


def test_library_is_multi_shard(library, rows):
    lib = Library.open(library)
    assert len(lib.shards) >= 2 and len(rows) == lib.n_rows
    assert all(m is not None for *_, m in rows)


@pytest.mark.parametrize("smarts", QUERIES)
def test_matches_brute_force_oracle(library, rows, smarts, shared_cache):
    expected = oracle(rows, smarts)
    res = substructure_search(library, smarts, runtime=INLINE, cache_dir=shared_cache, progress=False)
    assert hits(res) == expected
    assert res.table.schema.names == ["hit_id", "smiles", "shard", "row"]
    assert str(res.table.schema.field("row").type) == "int64"
    assert res.n_matches == len(expected) and res.complete
    assert res.n_screened == res.n_library == len(rows)
    assert res.n_library >= res.n_candidates >= res.n_checked >= res.n_matches
    assert res.n_checked == res.n_candidates and res.n_unparsable == 0
    if smarts == "[Sn]C#[Xe]":
        assert len(res) == 0 and res.n_candidates < res.n_library  # prefilter removes rows
    if smarts in ("C1CC1", "S(=O)(=O)N", "c1ccc2[nH]ccc2c1"):
        assert res.selectivity < 0.5  # specific queries: the prefilter does real work


@pytest.mark.parametrize("smarts", QUERIES + ["[NX3;H2]", "c-,:n", "*1**1", "[#6]!@[#6]", "C#N", "[O-]"])
def test_prefilter_never_drops_a_match(rows, all_fps, smarts):
    """Direct check of the screen: every true match passes the pattern-fingerprint test."""
    q = compile_query(smarts)
    qfp = ss.query_fingerprint(q)
    assert qfp.shape == (32,) and qfp.dtype == np.dtype("<u8")
    passed = set(ss.prefilter(all_fps, qfp).tolist())
    truth = {k for k, (*_, m) in enumerate(rows) if m.HasSubstructMatch(q)}
    assert truth <= passed


@pytest.mark.parametrize("smarts", ["N[C@@H](C)C(=O)O", "C[C@H](C(=O)O)c1ccccc1", "[#6][C@H]([#7])[#6]"])
def test_chirality(library, rows, smarts, shared_cache):
    with_ = substructure_search(library, smarts, use_chirality=True, runtime=INLINE, cache_dir=shared_cache,
                                progress=False)
    without = substructure_search(library, smarts, runtime=INLINE, cache_dir=shared_cache, progress=False)
    assert hits(with_) == oracle(rows, smarts, chirality=True)
    assert hits(without) == oracle(rows, smarts)
    assert len(with_) < len(without)


def test_cache_created_reused_and_stale_files_recomputed(library, tmp_path, monkeypatch):
    lib_dir = copy_library(library, tmp_path / "lib")
    lib = Library.open(lib_dir)
    first = substructure_search(lib_dir, "C(=O)N", runtime=INLINE, progress=False)
    cache = lib_dir / "cache" / "pattern_fp"
    assert first.cache == {"computed": len(lib.shards)} and first.cache_dir == str(cache.resolve())
    names = sorted(p.name for p in cache.iterdir())
    expected = sorted(f"{s['name']}-{s['files']['meta.parquet']['sha256'][:16]}-rdkit{rdBase.rdkitVersion}-2048.npy"
                      for s in lib.manifest["shards"])
    assert names == expected
    for s in lib.shards:
        arr = np.load(cache / ss.cache_file_name(s.name, lib.manifest["shards"][lib.shards.index(s)]
                                                 ["files"]["meta.parquet"]["sha256"]))
        assert arr.shape == (s.rows, 32) and arr.dtype == np.dtype("<u8")
    mtimes = {p: p.stat().st_mtime_ns for p in cache.iterdir()}

    def boom(smiles):
        raise AssertionError("pattern fingerprints recomputed although cached")

    with monkeypatch.context() as m:
        m.setattr(ss, "pattern_fingerprints", boom)
        second = substructure_search(lib_dir, "C(=O)N", runtime=INLINE, progress=False)
    assert second.cache == {"cached": len(lib.shards)}
    assert hits(second) == hits(first)
    assert {p: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes

    # a file with the right name but the wrong shape, and one that is not an .npy at all
    bad_shape, garbage = (cache / n for n in names[:2])
    np.save(bad_shape, np.zeros((3, 32), dtype="<u8"))
    garbage.write_bytes(b"not a numpy file")
    third = substructure_search(lib_dir, "C(=O)N", runtime=INLINE, progress=False)
    assert third.cache == {"cached": len(lib.shards) - 2, "computed": 2}
    assert hits(third) == hits(first)
    for p in (bad_shape, garbage):
        assert np.load(p).shape[1] == 32 and np.load(p).shape[0] > 3


@pytest.mark.parametrize("bad", ["C1CC(", "[Xy]", "[Q]", "c1ccccc1)", "C1CC"])
def test_invalid_smarts_is_an_input_error(bad, tmp_path):
    with pytest.raises(InputError) as exc:
        compile_query(bad)
    msg = str(exc.value)
    assert repr(bad) in msg and "SMARTS" in msg and "e.g. c1ccccc1C(=O)N" in msg
    assert "RDKit:" in msg
    # checked before the library is even opened
    with pytest.raises(InputError, match=r"not valid SMARTS"):
        substructure_search(tmp_path / "no-such-library", bad, runtime=INLINE, progress=False)


def test_xx_is_valid_smarts(library, rows, shared_cache):
    """``[Xx]`` looks like a typo but is SMARTS: total connectivity 1 (X) and a ring bond (x)."""
    assert compile_query("[Xx]").GetNumAtoms() == 1
    res = substructure_search(library, "[Xx]", runtime=INLINE, cache_dir=shared_cache, progress=False)
    assert hits(res) == oracle(rows, "[Xx]")


@pytest.mark.parametrize("empty", ["", "   "])
def test_empty_query_is_an_input_error(empty):
    with pytest.raises(InputError, match="empty.*e.g. c1ccccc1C"):
        compile_query(empty)


def test_bad_max_hits(library):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="max_hits"):
            substructure_search(library, "C", max_hits=bad, runtime=INLINE, progress=False)


def test_max_hits_returns_the_first_matches_in_library_order(library, rows, shared_cache):
    expected = oracle(rows, "c1ccccc1")
    n = len(expected)
    for k in (1, 7, 220, n - 1, n, n + 5):
        res = substructure_search(library, "c1ccccc1", max_hits=k, runtime=INLINE, cache_dir=shared_cache,
                                  progress=False)
        assert hits(res) == expected[:k], k
        assert res.n_matches >= len(res) and res.n_shards_searched <= res.n_shards
        if k < n:
            assert not res.complete, k   # more matches exist
        elif k > n:
            assert res.complete and res.n_shards_searched == res.n_shards, k
        # k == n: complete only when the n-th match lies in the last shard
    one = substructure_search(library, "c1ccccc1", max_hits=1, runtime=INLINE, cache_dir=shared_cache,
                              progress=False)
    assert one.n_shards_searched == 1 < one.n_shards  # stopped after the first shard
    assert one.n_checked < one.n_candidates           # and early inside it


def _same_as_inline(library, tmp_path, inline_rt, other):
    for smarts, k in [("c1ccccc1", None), ("[Cl,Br,I]", None), ("[$(C=O);!$(C(=O)O)]", None),
                      ("[Sn]C#[Xe]", None), ("C(=O)N", 300), ("c1ccccc1", 1)]:
        a = substructure_search(library, smarts, max_hits=k, runtime=inline_rt, cache_dir=tmp_path / "a")
        b = substructure_search(library, smarts, max_hits=k, runtime=other, cache_dir=tmp_path / "b")
        assert a.table.equals(b.table), smarts
        assert b.complete == a.complete and b.n_matches >= len(b)
        if k is None:
            assert (a.n_candidates, a.n_matches, a.n_screened) == (b.n_candidates, b.n_matches, b.n_screened)
    # the workers (Ray's, or the processes') wrote the same cache files as the inline run
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted(p.name for p in (tmp_path / "b").iterdir())


@pytest.mark.ray
def test_inline_and_ray_identical(library, tmp_path, ray_rt, inline_rt):
    _same_as_inline(library, tmp_path, inline_rt, ray_rt)


@pytest.mark.slow  # ~9 s; the processes runner has its own fast tests (test_processes_runtime.py)
def test_inline_and_processes_identical(library, tmp_path, inline_rt):
    _same_as_inline(library, tmp_path, inline_rt, RuntimeSpec(mode="processes", workers=2, progress=False))


@pytest.mark.parametrize("mode", ["inline", "processes"])
def test_a_broken_shard_fails_the_search_naming_it(library, tmp_path, mode):
    """runtime=processes (and Ray) names the shard and its path; inline raises the shard's own error."""
    lib_dir = copy_library(library, tmp_path / "lib")
    broken = Library.open(lib_dir).shards[1]
    (broken.path / "meta.parquet").write_bytes(b"not parquet")
    rt = RuntimeSpec(mode=mode, workers=2, progress=False)
    if mode == "inline":
        with pytest.raises(Exception, match="Parquet") as exc:
            substructure_search(lib_dir, "C(=O)N", runtime=rt, cache_dir=tmp_path / "c")
        assert not isinstance(exc.value, BiogenError)
    else:
        where = re.escape(f"substructure search of shard {broken.name} ({broken.path}) failed: ArrowInvalid: ")
        with pytest.raises(BiogenError, match=f"^{where}.*Parquet"):
            substructure_search(lib_dir, "C(=O)N", runtime=rt, cache_dir=tmp_path / "c")


def test_read_only_library_falls_back_to_user_cache(library, tmp_path, monkeypatch, caplog):
    lib_dir = copy_library(library, tmp_path / "lib")
    xdg = tmp_path / "xdg"
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    if os.geteuid() == 0:  # root writes through chmod: make the probe see what a user would
        real = ss._writable_dir
        monkeypatch.setattr(ss, "_writable_dir",
                            lambda p: False if Path(p).resolve().is_relative_to(lib_dir.resolve()) else real(p))
    mode = stat.S_IMODE(lib_dir.stat().st_mode)
    lib_dir.chmod(0o555)
    try:
        with caplog.at_level(logging.WARNING, logger="biogen.search.substructure"):
            res = substructure_search(lib_dir, "C(=O)N", runtime=INLINE, progress=False)
    finally:
        lib_dir.chmod(mode)
    user = xdg / "biogen" / "pattern_fp" / "lib"
    assert res.cache_dir == str(user) and res.cache == {"computed": len(Library.open(lib_dir).shards)}
    assert len(list(user.glob("*.npy"))) == len(Library.open(lib_dir).shards)
    assert not (lib_dir / "cache").exists()
    assert "cannot be written" in caplog.text and str(user) in caplog.text


def test_read_only_library_cache_is_still_read(library, tmp_path, monkeypatch):
    """A cache prepared beside a shared read-only library serves every user."""
    lib_dir = copy_library(library, tmp_path / "lib")
    substructure_search(lib_dir, "C", runtime=INLINE, progress=False)  # fills <lib>/cache/pattern_fp
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(ss, "_writable_dir", lambda p: not Path(p).resolve().is_relative_to(lib_dir.resolve()))
    monkeypatch.setattr(ss, "pattern_fingerprints", lambda smiles: pytest.fail("recomputed"))
    res = substructure_search(lib_dir, "C(=O)N", runtime=INLINE, progress=False)
    assert res.cache == {"cached": len(Library.open(lib_dir).shards)}
    assert not list((tmp_path / "xdg").rglob("*.npy"))


def test_user_cache_root_defaults_to_home(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ss.user_cache_root() == tmp_path / ".cache" / "biogen" / "pattern_fp"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert ss.user_cache_root() == tmp_path / "x" / "biogen" / "pattern_fp"


def test_unwritable_cache_dir_still_searches(library, rows, tmp_path, monkeypatch):
    """An unwritable cache_dir: missing cache files are computed for this search only."""
    monkeypatch.setattr(ss, "_writable_dir", lambda p: False)
    res = substructure_search(library, "[Cl,Br,I]", runtime=INLINE, cache_dir=tmp_path / "ro", progress=False)
    assert hits(res) == oracle(rows, "[Cl,Br,I]")
    assert res.cache_dir is None and set(res.cache) == {"uncached"}
