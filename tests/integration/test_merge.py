"""``library merge`` and ``embed merge``: pieces built separately (as array-job tasks build them)
merge into exactly what one build / one embed of the concatenated inputs makes."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.library import Library
from biogen.library.ingest import build_library
from biogen.library.merge import merge_libraries
from biogen.library.verify import verify_library
from tests_support import run_biogen

N = 3000  # MOSES test molecules, in three pieces of 1000 input lines (plus the extra records below)
PIECES = ("part-8", "part-9", "part-10")  # natural order differs from the lexical one


def write_pieces(root: Path) -> list[Path]:
    """Three SMILES files from the first 3,000 MOSES test molecules, ids Z<n> except every 97th
    record (no id: the build generates one), and records that meet across pieces: duplicate
    molecules (with and without ids), an id used again, given ids equal to ones that one
    build generates (BG000000001 is the first id-less record's), an unparsable SMILES."""
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        next(fh)  # header
        smiles = [line.strip() for _, line in zip(range(N), fh)]
    lines = [[], [], []]
    for i, s in enumerate(smiles):
        lines[i // 1000].append(s if i % 97 == 0 else f"{s} Z{i:05d}")
    # a given id equal to the one the id-less record 1067 (ordinal 1067, piece 2) gets in one build
    lines[0][50] = f"{smiles[50]} BG000001068"
    lines[1][10:10] = [f"{smiles[5]} again5", smiles[200], "C1CC broken"]
    lines[1][500:500] = ["CCO BG000000001"]
    lines[2][3:3] = [f"{smiles[1500]} again1500", f"{smiles[7]} Z00007-again", "c1ccccc1 Z00010",
                     f"{smiles[2500]} again2500"]  # Z02500, later in the piece, is its duplicate
    lines[2][700:700] = [smiles[2], "CCCCCCO BG000001100"]
    paths = []
    for name, body in zip(PIECES, lines):
        path = root / f"{name}.smi"
        path.write_text("\n".join(body) + "\n")
        paths.append(path)
    return paths


def build_pieces_and_single(inputs: list[Path], pieces: Path, single: Path, chunk_size: int, **kw) -> None:
    """Each input built as a piece (``pieces/<stem>``), and one build of all of them in order."""
    from biogen.runtime import RuntimeSpec

    rt = RuntimeSpec(mode="inline", progress=False)
    for path in inputs:
        build_library(str(path), pieces / path.stem, chunk_size=chunk_size, runtime=rt, **kw)
    build_library([str(p) for p in inputs], single, chunk_size=chunk_size, runtime=rt, **kw)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The pieces built one by one, and one build of all three files in order."""
    root = tmp_path_factory.mktemp("merge")
    build_pieces_and_single(write_pieces(root), root / "lib.parts", root / "single", 400)
    return root


def rows(path: Path) -> tuple[pa.Table, np.ndarray]:
    """All rows (metadata and fingerprints) in ordinal order."""
    lib = Library.open(path)
    meta = lib.read_metadata()
    order = np.argsort(meta.column("ordinal").to_numpy())
    return meta.take(pa.array(order)), lib.fingerprints()[order]


def read_rejects(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def assert_same_rows(merged: Path, single: Path) -> None:
    a, fa = rows(merged)
    b, fb = rows(single)
    assert a.column_names == b.column_names
    assert "id_generated" in a.column_names and "mw" in a.column_names
    assert a.num_rows == b.num_rows
    for col in a.column_names:  # id, smiles, inchikey, ordinal, source, record, duplicate_of, descriptors...
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert np.array_equal(fa, fb)
    assert a.column("ordinal").to_pylist() == list(range(a.num_rows))


def test_merge_equals_one_build_of_the_concatenated_inputs(built, inline_rt):
    rep = merge_libraries(str(built / "lib.parts" / "part-*"), built / "lib", runtime=inline_rt)
    assert_same_rows(built / "lib", built / "single")
    assert verify_library(built / "lib").ok

    single = Library.open(built / "single").manifest
    merged = Library.open(built / "lib").manifest
    h, hs = merged["history"][0], single["history"][0]
    assert [x["action"] for x in merged["history"]] == ["merge"]
    for k in ("records_read", "rows_added", "duplicates", "rejected", "rejected_by_reason"):
        assert h[k] == hs[k], k
    assert rep.rows_added == merged["n_rows"] == single["n_rows"] == 3001
    assert merged["rejected_total"] == 9 and h["exact"] and h["not_exact"] == 0
    assert {k: merged[k] for k in ("featurizer", "standardize", "descriptors", "dedupe", "id_prefix")} == \
           {k: single[k] for k in ("featurizer", "standardize", "descriptors", "dedupe", "id_prefix")}
    # the pieces, in natural order, with their manifests' hashes and histories
    assert [Path(p["path"]).name for p in h["pieces"]] == list(PIECES)
    assert [i["path"] for i in h["inputs"]] == [i["path"] for i in hs["inputs"]]
    for p in h["pieces"]:
        m = json.loads((Path(p["path"]) / "manifest.json").read_text())
        assert p["manifest_sha256"] == __import__("hashlib").sha256(
            (Path(p["path"]) / "manifest.json").read_bytes()).hexdigest()
        assert p["rows"] == m["n_rows"] and p["history"] == m["history"]
    # generated ids were renumbered from the merged ordinal: BG<ordinal + 1> unless taken
    meta, _ = rows(built / "lib")
    gen = [(i, o) for i, o, g in zip(meta.column("id").to_pylist(), meta.column("ordinal").to_pylist(),
                                     meta.column("id_generated").to_pylist()) if g]
    assert len(gen) == 31 and all(i.startswith("BG") for i, _ in gen)
    assert [(i, o) for i, o in gen if i != f"BG{o + 1:09d}"] == [("BG000001069", 1067)]  # 1068 was taken
    assert not (built / "lib" / "_work").exists()


def test_rejects_hold_the_cross_piece_duplicates(built, inline_rt):
    merge_libraries(str(built / "lib.parts" / "part-*"), built / "lib2", runtime=inline_rt)
    merged = read_rejects(built / "lib2" / "rejects" / "000-merge.csv")
    single = read_rejects(built / "single" / "rejects" / "000-build.csv")
    # the same records, reasons and details (kept ids of the merged library), in input order
    strip = [{k: v for k, v in r.items() if k != "raw"} for r in merged]
    assert strip == [{k: v for k, v in r.items() if k != "raw"} for r in single]
    by_id = {(r["id"], r["reason"]): r for r in merged}
    assert set(by_id) == {
        ("again5", "duplicate_inchikey"), ("", "duplicate_inchikey"), ("broken", "parse_error"),
        ("BG000000001", "duplicate_id"), ("again1500", "duplicate_inchikey"),
        ("Z00007-again", "duplicate_inchikey"), ("Z00010", "duplicate_id"), ("Z02500", "duplicate_inchikey"),
    }
    assert by_id[("again5", "duplicate_inchikey")]["detail"].endswith("as library id Z00005")
    assert by_id[("again5", "duplicate_inchikey")]["source"].endswith("part-9.smi")
    assert by_id[("Z00010", "duplicate_id")]["source"].endswith("part-10.smi")
    # carried rejects keep their raw input; the merge's own (rows of a piece) have none
    assert by_id[("broken", "parse_error")]["raw"] == "C1CC broken"
    assert by_id[("Z02500", "duplicate_inchikey")]["raw"].endswith(" Z02500")  # a duplicate within its piece
    assert by_id[("Z02500", "duplicate_inchikey")]["detail"].endswith("as library id again2500")
    assert by_id[("Z00010", "duplicate_id")]["raw"] == ""


def test_pieces_with_rejects_files_from_before_the_key_column(built, tmp_path, inline_rt):
    """Rejects files written before they carried ``key``/``duplicate_of`` are read by their
    detail text: the merge's rejects are the same as with new files."""
    import shutil

    pieces = tmp_path / "old"
    shutil.copytree(built / "lib.parts", pieces)
    for f in pieces.glob("part-*/rejects/*.csv"):
        rows = read_rejects(f)
        with open(f, "w", newline="") as fh:
            w = csv.DictWriter(fh, ["source", "record", "id", "reason", "detail", "raw"], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    merge_libraries(str(pieces / "part-*"), tmp_path / "lib", runtime=inline_rt)
    merged = read_rejects(tmp_path / "lib" / "rejects" / "000-merge.csv")
    single = read_rejects(built / "single" / "rejects" / "000-build.csv")
    assert [{k: v for k, v in r.items() if k != "raw"} for r in merged] == \
           [{k: v for k, v in r.items() if k != "raw"} for r in single]
    dups = [r for r in merged if r["reason"] == "duplicate_inchikey"]
    assert len(dups) == 6 and all(r["key"] and r["duplicate_of"] for r in dups)


@pytest.mark.slow  # two more builds of the pieces (~15 s); the InChIKey merge above is in the fast tier
def test_merge_of_pieces_deduplicated_by_smiles(tmp_path, inline_rt):
    """dedupe_key=smiles pieces merge into what one build makes: duplicates across pieces are
    found by canonical SMILES and their rejects name the merged library's kept ids."""
    inputs = write_pieces(tmp_path)
    for path, name in zip(inputs, PIECES):
        build_library(str(path), tmp_path / "parts" / name, chunk_size=400, dedupe_key="smiles", runtime=inline_rt)
    build_library([str(p) for p in inputs], tmp_path / "single", chunk_size=400, dedupe_key="smiles",
                  runtime=inline_rt)
    merge_libraries(str(tmp_path / "parts" / "part-*"), tmp_path / "lib", runtime=inline_rt)
    assert_same_rows(tmp_path / "lib", tmp_path / "single")
    assert Library.open(tmp_path / "lib").manifest["dedupe"] == {"key": "smiles", "mode": "keep_first"}
    merged = read_rejects(tmp_path / "lib" / "rejects" / "000-merge.csv")
    single = read_rejects(tmp_path / "single" / "rejects" / "000-build.csv")
    strip = [{k: v for k, v in r.items() if k != "raw"} for r in merged]
    assert strip == [{k: v for k, v in r.items() if k != "raw"} for r in single]
    dups = {r["id"]: r["detail"] for r in merged if r["reason"] == "duplicate_smiles"}
    assert set(dups) == {"again5", "", "again1500", "Z00007-again", "Z02500"}
    assert dups["again5"].startswith("same compound (canonical SMILES ") and dups["again5"].endswith("library id Z00005")
    # pieces keyed differently cannot be merged
    build_library(str(inputs[0]), tmp_path / "other" / "a", chunk_size=400, runtime=inline_rt)
    with pytest.raises(LibraryError, match="dedupe.key='inchikey'"):
        merge_libraries([str(tmp_path / "parts" / PIECES[0]), str(tmp_path / "other" / "a")], tmp_path / "bad",
                        runtime=inline_rt)


KILLER = """
import os, signal, sys
import biogen.library.merge as merge
from biogen.runtime import RuntimeSpec
real, done = merge.finalize_part, []
def finalize_then_die(*args):
    out = real(*args)  # the shard is renamed into place, not yet recorded in the ledger
    done.append(1)
    if len(done) == int(sys.argv[3]):
        os.kill(os.getpid(), signal.SIGKILL)
    return out
merge.finalize_part = finalize_then_die
merge.merge_libraries(sys.argv[1], sys.argv[2], runtime=RuntimeSpec(mode="inline", progress=False))
"""


def test_killed_merge_resumes_and_a_finished_one_is_not_redone(built, inline_rt):
    out = built / "lib-killed"
    p = subprocess.run([sys.executable, "-c", KILLER, str(built / "lib.parts" / "part-*"), str(out), "5"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert p.returncode == -9, p.stderr[-2000:]
    assert not (out / "manifest.json").exists() and (out / "_work" / "000-merge" / "ledger.jsonl").is_file()
    assert len(list((out / "shards").iterdir())) == 5
    rep = merge_libraries(str(built / "lib.parts" / "part-*"), out, runtime=inline_rt)
    assert rep.resumed_shards == 3 + 4  # the three pieces read, four shards recorded (the fifth is redone)
    assert_same_rows(out, built / "single")
    assert verify_library(out).ok and not verify_library(out).warnings
    assert not (out / "_work").exists()
    sha = (out / "manifest.json").read_bytes()
    again = merge_libraries(str(built / "lib.parts" / "part-*"), out, runtime=inline_rt)
    assert again.already_done and (out / "manifest.json").read_bytes() == sha
    with pytest.raises(LibraryError, match="already holds a different library.*overwrite=true"):
        merge_libraries([built / "lib.parts" / "part-8"], out, runtime=inline_rt)


def test_pieces_in_the_order_given(built, inline_rt):
    """A list is taken in its own order: the merge equals one build of the inputs in that order."""
    order = ["part-10", "part-8", "part-9"]
    merge_libraries([str(built / "lib.parts" / n) for n in order], built / "lib-reordered", runtime=inline_rt)
    h = Library.open(built / "lib-reordered").manifest["history"][0]
    assert [Path(p["path"]).name for p in h["pieces"]] == order
    meta, _ = rows(built / "lib-reordered")
    assert meta.column("source").to_pylist()[0].endswith("part-10.smi")
    assert meta.column("id").to_pylist()[:4] == ["Z02000", "Z02001", "Z02002", "again1500"]


def small(tmp_path, name, text, **kw):
    from biogen.runtime import RuntimeSpec

    path = tmp_path / f"{name}.smi"
    path.write_text(text)
    build_library(str(path), tmp_path / name, runtime=RuntimeSpec(mode="inline", progress=False), **kw)
    return path


def test_incompatible_pieces_are_refused_naming_piece_and_setting(tmp_path, inline_rt):
    small(tmp_path, "a", "CCO a1\nCCN a2\n")
    small(tmp_path, "radius3", "CCC r1\n", featurizer=FingerprintSpec(radius=3))
    small(tmp_path, "keepall", "CCC k1\n", dedupe="keep_all")
    small(tmp_path, "prefix", "CCC\n", id_prefix="XX")
    small(tmp_path, "nodesc", "CCC\n", descriptors=("mw",))
    cases = {"radius3": r"featurizer\.radius=3 but piece .*/a with featurizer\.radius=2",
             "keepall": "dedupe.mode='keep_all'",
             "prefix": "id_prefix='XX'", "nodesc": r"descriptors=\['mw'\]"}
    for name, what in cases.items():
        with pytest.raises(LibraryError, match=f"cannot merge: piece {tmp_path / name} was built with {what}"):
            merge_libraries([tmp_path / "a", tmp_path / name], tmp_path / "out", runtime=inline_rt)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="matches no directory"):
        merge_libraries(str(tmp_path / "nothing-*"), tmp_path / "out", runtime=inline_rt)
    with pytest.raises(ConfigError, match="twice"):
        merge_libraries([tmp_path / "a", tmp_path / "a"], tmp_path / "out", runtime=inline_rt)
    with pytest.raises(LibraryError, match="not a biogen library"):
        merge_libraries([tmp_path / "a", tmp_path], tmp_path / "out", runtime=inline_rt)
    (tmp_path / "unfinished" / "_work").mkdir(parents=True)
    with pytest.raises(LibraryError, match="unfinished build.*sbatch --array"):
        merge_libraries([tmp_path / "a", tmp_path / "unfinished"], tmp_path / "out", runtime=inline_rt)


def test_keep_all_and_pieces_without_rows(tmp_path, inline_rt):
    a = small(tmp_path, "a", "CCO\nCCN n1\nCCO ethanol-again\n", dedupe="keep_all")
    b = small(tmp_path, "b", "C1CC bad\n", dedupe="keep_all")  # no row at all, one reject
    c = small(tmp_path, "c", "OCC ethanol-3\nCCC\nCCN n2\n", dedupe="keep_all")
    from biogen.runtime import RuntimeSpec

    build_library([str(a), str(b), str(c)], tmp_path / "single", dedupe="keep_all",
                  runtime=RuntimeSpec(mode="inline", progress=False))
    for partitions in (0, 2):  # the serial planner, key partitions (a piece without rows: an empty part)
        out = tmp_path / f"m{partitions}"
        merge_libraries([tmp_path / "a", tmp_path / "b", tmp_path / "c"], out, runtime=inline_rt,
                        dedupe_partitions=partitions)
        assert_same_rows(out, tmp_path / "single")
        dup = {r["id"]: r["duplicate_of"] for r in Library.open(out).read_metadata().to_pylist()}
        assert dup == {"BG000000001": None, "n1": None, "ethanol-again": "BG000000001", "ethanol-3": "BG000000001",
                       "BG000000005": None, "n2": "n1"}
        assert [r["reason"] for r in read_rejects(out / "rejects" / "000-merge.csv")] == ["parse_error"]


def test_pieces_from_before_the_id_generated_column(tmp_path, inline_rt):
    """Shards written before ``id_generated`` existed: ids of the generated form are recognized."""
    a = small(tmp_path, "a", "CCO\nCCN n1\n")
    b = small(tmp_path, "b", "CCC\nCCCC\n")
    from biogen.runtime import RuntimeSpec

    build_library([str(a), str(b)], tmp_path / "single", runtime=RuntimeSpec(mode="inline", progress=False))
    for name in ("a", "b"):
        for meta in (tmp_path / name / "shards").glob("*/meta.parquet"):
            pq.write_table(pq.read_table(meta).drop_columns(["id_generated"]), meta)
    merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "m", runtime=inline_rt)
    ids = rows(tmp_path / "m")[0].column("id").to_pylist()
    assert ids == rows(tmp_path / "single")[0].column("id").to_pylist() == \
        ["BG000000001", "n1", "BG000000003", "BG000000004"]


def test_records_one_build_would_keep_stop_an_exact_merge(tmp_path, inline_rt):
    # piece b rejects "CCN again" as a duplicate of its row "CCN X1"; the merge drops that row
    # (X1 is piece a's id), so one build of a + b would keep "CCN again"
    small(tmp_path, "a", "CCO X1\nCCCl\n")
    small(tmp_path, "b", "CCN X1\nCCN again\nCCC\n")
    with pytest.raises(LibraryError, match=r"1 record\(s\) .* would be kept by one build.*b\.smi record 2 \(id again, "
                                           r"duplicate_inchikey.*exact=false"):
        merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "m", runtime=inline_rt)
    rep = merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "m", exact=False, runtime=inline_rt)
    h = Library.open(tmp_path / "m").manifest["history"][0]
    assert rep.rows_added == 3 and not h["exact"] and h["not_exact"] == 1
    assert h["not_exact_records"][0]["id"] == "again" and verify_library(tmp_path / "m").ok
    # a given id equal to an id the piece generated (BG000000001 for its first, id-less record)
    small(tmp_path, "c", "CCCCC\nCCCCCC BG000000001\n")
    with pytest.raises(LibraryError, match=r"c\.smi record 2 \(id BG000000001, duplicate_id"):
        merge_libraries([tmp_path / "a", tmp_path / "c"], tmp_path / "m2", runtime=inline_rt)


def test_cli_library_merge(built, tmp_path):
    pieces = ",".join(str(built / "lib.parts" / name) for name in PIECES)
    p = run_biogen("library", "merge", f"parts=[{pieces}]", f"output={tmp_path / 'lib'}", "runtime.progress=false",
                   cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "added 3001 molecules" in p.stderr
    assert_same_rows(tmp_path / "lib", built / "single")
    p = run_biogen("library", "merge", f"parts={built / 'lib.parts'}/part-*", f"output={built / 'lib.parts' / 'part-9'}",
                   cwd=tmp_path, timeout=300)
    assert p.returncode == 2 and "is one of the pieces" in p.stderr, p.stderr[-2000:]


@pytest.mark.ray
def test_merge_on_ray_writes_the_same_shards(tmp_path, inline_rt, ray_rt):
    small(tmp_path, "a", "CCO\nCCN n1\nc1ccccc1\n")
    small(tmp_path, "b", "OCC again\nCCC\nCCN n1\nCCCl\n")
    merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "inline", runtime=inline_rt)
    merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "ray", runtime=ray_rt)
    merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "ray-p", runtime=ray_rt, dedupe_partitions=2)
    files = [[s["files"] for s in Library.open(tmp_path / d).manifest["shards"]] for d in ("inline", "ray", "ray-p")]
    assert files[0] == files[1] == files[2] and len(files[0]) == 2
    assert strip_raw(tmp_path / "ray-p" / "rejects" / "000-merge.csv") == \
        strip_raw(tmp_path / "inline" / "rejects" / "000-merge.csv")


# ------------------------------------------------------------------ partitioned dedupe
def write_clean_pieces(root: Path) -> list[Path]:
    """Three pieces of 200 MOSES molecules each (ids Z<n>, every 37th id-less) with no given
    id that repeats or looks generated (the partitioned dedupe's own ground), and carried
    rejects whose kept row the merge drops or renumbers: a piece's duplicate of its own copy
    of an earlier piece's molecule (with and without an id, and of an id-less molecule: the
    merged library's generated id), an id used twice within a piece, an unparsable SMILES."""
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        next(fh)
        smiles = [line.strip() for _, line in zip(range(600), fh)]
    lines = [[s if i % 37 == 0 else f"{s} Z{i:05d}" for i, s in enumerate(smiles[k:k + 200], k)] for k in (0, 200, 400)]
    lines[1][10:10] = [f"{smiles[5]} again5", "CCO dupid", "CCN dupid", "C1CC broken"]
    lines[2][3:3] = [f"{smiles[100]} first100", smiles[150], smiles[37], smiles[37], f"{smiles[150]} x150b"]
    lines[2][60:60] = [f"{smiles[100]} second100", f"{smiles[420]} again420"]
    paths = []
    for name, body in zip(("c0", "c1", "c2"), lines):
        paths.append(root / f"{name}.smi")
        paths[-1].write_text("\n".join(body) + "\n")
    return paths


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    from biogen.runtime import RuntimeSpec

    root = tmp_path_factory.mktemp("pmerge")
    build_pieces_and_single(write_clean_pieces(root), root / "pieces", root / "single", 60)
    merge_libraries(str(root / "pieces" / "c*"), root / "serial", runtime=RuntimeSpec(mode="inline", progress=False),
                    dedupe_partitions=0)
    return root


def strip_raw(path: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "raw"} for r in read_rejects(path)]


@pytest.mark.parametrize("partitions", [1, 3, 8])
def test_partitioned_merge_equals_the_serial_merge_and_one_build(clean, inline_rt, partitions, caplog):
    """Key partitions in tasks, no driver index: the same rows, ids, ordinals and rejects (the
    carried duplicates naming the merged library's kept ids) as the serial merge and one build."""
    out = clean / f"p{partitions}"
    with caplog.at_level("INFO"):
        rep = merge_libraries(str(clean / "pieces" / "c*"), out, runtime=inline_rt, dedupe_partitions=partitions)
    assert f"dedupe: {partitions} key partitions" in caplog.text and "serial planner" not in caplog.text
    assert_same_rows(out, clean / "serial")
    assert_same_rows(out, clean / "single")
    merged = strip_raw(out / "rejects" / "000-merge.csv")
    assert merged == strip_raw(clean / "serial" / "rejects" / "000-merge.csv")
    assert merged == strip_raw(clean / "single" / "rejects" / "000-build.csv")
    named = {(r["id"], r["reason"]): r["duplicate_of"] for r in merged}
    # carried duplicates whose kept row the merge dropped name the earlier piece's row
    assert named[("second100", "duplicate_inchikey")] == "Z00100"
    assert named[("x150b", "duplicate_inchikey")] == "Z00150"
    assert named[("", "duplicate_inchikey")] == "BG000000038"  # smiles[37]: id-less, ordinal 37 in one build
    assert ("dupid", "duplicate_id") in named and ("broken", "parse_error") in named
    assert rep.rows_added == Library.open(clean / "single").manifest["n_rows"]
    assert Library.open(out).manifest["history"][0]["exact"] and verify_library(out).ok


@pytest.mark.slow  # eight builds (~11 s); keep_first with InChIKeys is in the fast tier above
def test_partitioned_merge_keep_all_and_smiles_keys(tmp_path, inline_rt):
    """keep_all pieces (duplicates kept with duplicate_of) and dedupe_key=smiles pieces."""
    inputs = write_clean_pieces(tmp_path)
    for kw, tag in (({"dedupe": "keep_all"}, "all"), ({"dedupe_key": "smiles"}, "smi")):
        build_pieces_and_single(inputs, tmp_path / tag, tmp_path / f"{tag}-single", 80, **kw)
        merge_libraries(str(tmp_path / tag / "c*"), tmp_path / f"{tag}-m", runtime=inline_rt, dedupe_partitions=3)
        assert_same_rows(tmp_path / f"{tag}-m", tmp_path / f"{tag}-single")
        assert strip_raw(tmp_path / f"{tag}-m" / "rejects" / "000-merge.csv") == \
            strip_raw(tmp_path / f"{tag}-single" / "rejects" / "000-build.csv")


def test_partitioned_merge_finds_the_inexact_record_and_falls_back_when_it_must(tmp_path, built, inline_rt, caplog):
    # piece b rejects "CCN X1" as a duplicate id of its row "CCO X1"; the merge drops that row
    # (a duplicate of piece a's CCO), so one build of a + b would keep "CCN X1"
    small(tmp_path, "a", "CCO\nCCCl\n")
    small(tmp_path, "b", "CCO X1\nCCN X1\nCCC\n")
    for p in (0, 2):
        with pytest.raises(LibraryError, match=r"1 record\(s\) .* would be kept by one build.*b\.smi record 2 "
                                               r"\(id X1, duplicate_id"):
            merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / f"m{p}", runtime=inline_rt,
                            dedupe_partitions=p)
    merge_libraries([tmp_path / "a", tmp_path / "b"], tmp_path / "m2", runtime=inline_rt, dedupe_partitions=2,
                    exact=False)
    h = Library.open(tmp_path / "m2").manifest["history"][0]
    assert not h["exact"] and h["not_exact"] == 1 and h["not_exact_records"][0]["id"] == "X1"
    assert Library.open(tmp_path / "m2").manifest["n_rows"] == 3  # CCO, CCCl, CCC (CCN X1 stays rejected)
    # given ids that repeat across pieces or look generated: the serial planner decides, same library
    with caplog.at_level("INFO"):
        merge_libraries(str(built / "lib.parts" / "part-*"), tmp_path / "fb", runtime=inline_rt, dedupe_partitions=4)
    assert "the serial planner decides this input" in caplog.text
    assert_same_rows(tmp_path / "fb", built / "single")


def test_partitioned_merge_resumes_after_a_crash_in_its_own_rounds(clean, inline_rt, monkeypatch):
    from biogen.library.merge import MergeDedupe

    real, calls = MergeDedupe.rewrite_carried, []

    def crash(self, piece, *a):
        calls.append(piece)
        if len(calls) == 2:
            raise RuntimeError("node lost")
        return real(self, piece, *a)

    monkeypatch.setattr(MergeDedupe, "rewrite_carried", crash)
    with pytest.raises(RuntimeError, match="node lost"):
        merge_libraries(str(clean / "pieces" / "c*"), clean / "crash", runtime=inline_rt, dedupe_partitions=3)
    monkeypatch.setattr(MergeDedupe, "rewrite_carried", real)
    merge_libraries(str(clean / "pieces" / "c*"), clean / "crash", runtime=inline_rt, dedupe_partitions=3)
    assert_same_rows(clean / "crash", clean / "serial")
    assert strip_raw(clean / "crash" / "rejects" / "000-merge.csv") == \
        strip_raw(clean / "serial" / "rejects" / "000-merge.csv")


# ------------------------------------------------------------------------------------ embed
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from esm_fixtures import build

    return build(tmp_path_factory.mktemp("esm"), "tiny", 2, 32, 4, formats=("fair-esm",))


@pytest.fixture(scope="module")
def fastas(tmp_path_factory):
    from esm_fixtures import random_sequences

    seqs = random_sequences([30, 120, 45, 200, 77, 60, 15, 90, 33, 51], seed=5)
    root = tmp_path_factory.mktemp("fa")
    a, b = root / "a.fasta", root / "b.fasta"
    # seqs[4] is in both pieces under other ids; seqs[1] twice in piece a
    a.write_text("".join(f">a{i}\n{seqs[i]}\n" for i in range(5)) + f">a1-again\n{seqs[1]}\n>bad\nMKT1X\n")
    b.write_text(f">b4\n{seqs[4]}\n" + "".join(f">b{i}\n{seqs[i]}\n" for i in range(5, 10)) + ">empty\n\n")
    return a, b, seqs


@pytest.mark.parametrize("spec_kw", [{}, {"pooling": "both", "per_residue": True, "layers": (1, -1)}],
                         ids=["mean", "both-per-residue"])
def test_embed_merge_equals_one_embed_of_the_union(tiny, fastas, tmp_path, inline_rt, spec_kw):
    from biogen.protein.embed import EmbedSpec
    from biogen.protein.job import embed_proteins
    from biogen.protein.merge import merge_stores
    from biogen.protein.search import search_store
    from biogen.protein.store import EmbeddingStore

    a, b, seqs = fastas
    spec = EmbedSpec(**spec_kw)
    model = str(tiny.pt_path)
    embed_proteins(str(a), tmp_path / "parts" / "part-1", model=model, spec=spec, shard_size=2, runtime=inline_rt)
    embed_proteins(str(b), tmp_path / "parts" / "part-2", model=model, spec=spec, shard_size=2, runtime=inline_rt)
    embed_proteins([str(a), str(b)], tmp_path / "single", model=model, spec=spec, shard_size=2, runtime=inline_rt)
    rep = merge_stores(str(tmp_path / "parts" / "part-*"), tmp_path / "merged", progress=False)
    m, s = EmbeddingStore.open(tmp_path / "merged"), EmbeddingStore.open(tmp_path / "single")
    assert (rep.sequences, rep.ids, rep.records, rep.rejected, rep.shared_sequences) == (10, 12, 14, 2, 1)
    assert m.keys == s.keys and m.ids == s.ids
    assert m.by_id()["a4"] == m.by_id()["b4"] and m.ids[m.by_id()["b4"]] == ["a4", "b4"]
    assert m.ids[m.by_id()["a1"]] == ["a1", "a1-again"]
    assert m.vector_names == s.vector_names
    for v in m.vector_names:
        assert np.allclose(m.vectors(v), s.vectors(v), atol=1e-5), v
    for k in ("n_sequences", "n_ids", "n_records", "rejected", "rejected_by_reason", "dim", "vectors", "model", "spec"):
        if k == "model":
            assert {x: y for x, y in m.manifest[k].items() if x != "checkpoint"} == \
                   {x: y for x, y in s.manifest[k].items() if x != "checkpoint"}
        else:
            assert m.manifest[k] == s.manifest[k], k
    assert m.manifest["inputs"] == s.manifest["inputs"]
    assert [Path(x["path"]).name for x in m.manifest["merged_from"]] == ["part-1", "part-2"]
    assert sum(x["rows"] for x in m.manifest["shards"]) == 10
    assert sorted(r["id"] for r in csv.DictReader(open(tmp_path / "merged" / "rejects.csv"))) == ["bad", "empty"]
    if spec.per_residue:
        row = m.by_id()["b7"]
        starts = np.cumsum([0] + [x.rows for x in m.shards])
        k = int(np.searchsorted(starts, row, "right") - 1)
        res = m.shards[k].residues(2, row - starts[k])
        assert res.shape == (len(seqs[7]), 32)
        assert np.allclose(res.mean(0), m.vectors("mean_L2")[row], atol=1e-5)
    # searchable; a rerun does nothing
    q = tmp_path / "q.fasta"
    q.write_text(f">q\n{seqs[4]}\n>q8\n{seqs[8]}\n")
    hits = search_store(str(tmp_path / "merged"), str(q), k=2).to_pylist()
    assert [(h["hit_id"], h["hit_ids"]) for h in hits if h["rank"] == 1] == [("a4", ["a4", "b4"]), ("b8", ["b8"])]
    assert merge_stores([tmp_path / "parts" / "part-1", tmp_path / "parts" / "part-2"], tmp_path / "merged",
                        progress=False).already_done


def test_embed_merge_refuses_other_settings_and_cli_search(tiny, fastas, tmp_path, inline_rt):
    from biogen.protein.embed import EmbedSpec
    from biogen.protein.job import embed_proteins
    from biogen.protein.merge import merge_stores

    a, b, seqs = fastas
    model = str(tiny.pt_path)
    embed_proteins(str(a), tmp_path / "a", model=model, runtime=inline_rt)
    embed_proteins(str(b), tmp_path / "b", model=model, runtime=inline_rt)
    embed_proteins(str(b), tmp_path / "b-layer1", model=model, spec=EmbedSpec(layers=(1,)), runtime=inline_rt)
    with pytest.raises(LibraryError, match=f"piece {tmp_path / 'b-layer1'} was embedded with layers=\\[1\\] but "
                                           f"piece {tmp_path / 'a'} with layers=\\[2\\]"):
        merge_stores([tmp_path / "a", tmp_path / "b-layer1"], tmp_path / "m", progress=False)
    with pytest.raises(InputError, match="not an embedding store"):
        merge_stores([tmp_path / "a", tmp_path], tmp_path / "m", progress=False)
    p = run_biogen("embed", "merge", f"parts=[{tmp_path / 'a'},{tmp_path / 'b'}]", f"output={tmp_path / 'm'}",
                   "progress=false", cwd=tmp_path, timeout=300)
    assert p.returncode == 0 and "merged 2 stores: 10 unique sequences" in p.stdout, p.stderr[-3000:]
    q = tmp_path / "q.fasta"
    q.write_text(f">q\n{seqs[6]}\n")
    p = run_biogen("embed-search", f"store={tmp_path / 'm'}", f"query={q}", "k=1", cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.splitlines()[1].split("\t")[:3] == ["q", "1", "b6"]


def test_embed_merge_resumes_after_a_crash(tiny, fastas, tmp_path, inline_rt, monkeypatch):
    import biogen.protein.merge as pm
    from biogen.protein.job import embed_proteins
    from biogen.protein.store import EmbeddingStore

    a, b, _ = fastas
    pieces = [tmp_path / "p1", tmp_path / "p2"]
    for piece, fasta in zip(pieces, (a, b)):
        embed_proteins(str(fasta), piece, model=str(tiny.pt_path), shard_size=2, runtime=inline_rt)
    pm.merge_stores(pieces, tmp_path / "at-once", progress=False)
    real, calls = pm.write_shard, []

    def crash(*args):
        if len(calls) == 3:
            raise OSError("the node went away")
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(pm, "write_shard", crash)
    with pytest.raises(OSError, match="went away"):
        pm.merge_stores(pieces, tmp_path / "m", progress=False)
    assert not (tmp_path / "m" / "manifest.json").exists() and (tmp_path / "m" / "_work" / "ledger.jsonl").is_file()
    monkeypatch.setattr(pm, "write_shard", real)
    rep = pm.merge_stores(pieces, tmp_path / "m", progress=False)
    assert rep.shards_done_before == 3 and rep.shards == 6 and not (tmp_path / "m" / "_work").exists()
    m, ref = EmbeddingStore.open(tmp_path / "m"), EmbeddingStore.open(tmp_path / "at-once")
    assert [s["sha256"] for s in m.manifest["shards"]] == [s["sha256"] for s in ref.manifest["shards"]]
    assert m.manifest["run"]["driver_sessions"] == 2
