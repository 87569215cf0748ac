"""Library build / append / info / verify through the Python API, on real Ray."""

import csv
import gzip
import json
import shutil

import numpy as np
import pyarrow.compute as pac
import pytest
from rdkit import Chem
from rdkit.Chem import rdFingerprintGenerator

from biogen.chem.fingerprints import FingerprintSpec, popcounts, unpack_bits
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.library import Library
from biogen.library.ingest import append_library, build_library
from biogen.library.verify import format_info, library_info, verify_library

pytestmark = pytest.mark.ray


def rejects(lib, name="000-build"):
    with open(lib / "rejects" / f"{name}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_build_mixed_deposits(tmp_path, data_dir, ray_rt):
    lib_dir = tmp_path / "lib"
    rep = build_library([str(data_dir / "mixed.smi"), str(data_dir / "compounds.csv"),
                         str(data_dir / "small.sdf")], lib_dir, chunk_size=4, runtime=ray_rt)
    lib = Library.open(lib_dir)
    meta = lib.read_metadata()
    ids = set(meta.column("id").to_pylist())
    assert {"ethanol", "benzene", "aspirin", "caffeine", "ibuprofen", "paracetamol", "nicotine",
            "diclofenac", "metformin", "salbutamol", "salicylic-acid", "pyridine"} <= ids
    # the id-less record got a generated registry id
    assert any(i.startswith("BG") and len(i) == 11 for i in ids)
    rej = {(r["id"], r["reason"]) for r in rejects(lib_dir)}
    assert rej == {
        ("ethanol-again", "duplicate_inchikey"), ("aspirin-sodium", "duplicate_inchikey"),
        ("broken-ring", "parse_error"), ("pentavalent-carbon", "parse_error"),
        ("aspirin", "duplicate_id"),  # pyridine deposited under the id "aspirin"
        ("isoprenaline", "field_count"), ("empty-smiles", "empty_smiles"),
        ("broken-caffeine", "parse_error"),
        ("aspirin", "duplicate_inchikey"),  # aspirin again, from the SDF
    }
    # nothing lost: every record is a row or a reject
    assert rep.records_read == 11 + 7 + 4 == lib.n_rows + len(rejects(lib_dir))
    assert rep.rows_added == lib.n_rows and rep.rejected == len(rejects(lib_dir))
    dup = [r for r in rejects(lib_dir) if r["id"] == "ethanol-again"][0]
    assert dup["detail"] == f"same compound (InChIKey {Chem.MolToInchiKey(Chem.MolFromSmiles('CCO'))}) as library id ethanol"
    assert dup["source"].endswith("mixed.smi") and dup["record"] == "3" and dup["raw"] == "OCC ethanol-again"
    # the same facts for programs: the identity key and the kept row's id; empty for other reasons
    assert (dup["key"], dup["duplicate_of"]) == (Chem.MolToInchiKey(Chem.MolFromSmiles("CCO")), "ethanol")
    assert all(r["key"] == r["duplicate_of"] == "" for r in rejects(lib_dir) if r["reason"] == "parse_error")
    # manifest: provenance and counts
    m = lib.manifest
    assert m["schema_version"] == 1 and m["featurizer"]["type"] == "morgan"
    assert m["featurizer"]["rdkit_version"]
    h = m["history"][0]
    assert [i["sha256"] for i in h["inputs"]][0] == __import__("hashlib").sha256((data_dir / "mixed.smi").read_bytes()).hexdigest()
    assert h["rejected_by_reason"]["duplicate_inchikey"] == 3
    assert sum(s["rows"] for s in m["shards"]) == m["n_rows"]
    # SDF props kept; source and record kept
    row = meta.filter(pac.equal(meta.column("id"), "diclofenac"))
    assert json.loads(row.column("props")[0].as_py()) == {"CAS": "15307-86-5", "vendor": "A"}
    assert row.column("record")[0].as_py() == 3


def test_shards_sorted_by_popcount_and_fingerprints_exact(tmp_path, data_dir, ray_rt):
    lib_dir = tmp_path / "lib"
    build_library(str(data_dir / "mixed.smi"), lib_dir, chunk_size=5, runtime=ray_rt,
                  standardize=StandardizeSpec(enabled=False))
    lib = Library.open(lib_dir)
    assert len(lib.shards) == 3
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    seen = []
    for shard, fps, pc in lib.iter_fingerprints():
        assert isinstance(fps, np.memmap) and fps.dtype == np.dtype("<u8")
        assert np.all(np.diff(pc) >= 0)
        np.testing.assert_array_equal(pc, popcounts(np.asarray(fps)))
        meta = shard.metadata(["smiles", "ordinal"])
        for row, smi in zip(fps, meta.column("smiles").to_pylist()):
            on = set(np.flatnonzero(unpack_bits(np.asarray(row)[None])[0]))
            assert on == set(gen.GetFingerprint(Chem.MolFromSmiles(smi)).GetOnBits())
        seen += meta.column("ordinal").to_pylist()
        lo, hi = shard.popcount_range(int(pc[0]), int(pc[0]))
        assert lo == 0 and hi == int(np.sum(pc == pc[0]))
    assert sorted(seen) == list(range(lib.n_rows))


def test_keep_all_flags_duplicates(tmp_path, data_dir, ray_rt):
    build_library(str(data_dir / "mixed.smi"), tmp_path / "lib", dedupe="keep_all", runtime=ray_rt)
    meta = Library.open(tmp_path / "lib").read_metadata(["id", "duplicate_of"]).to_pylist()
    dups = {r["id"]: r["duplicate_of"] for r in meta if r["duplicate_of"]}
    assert dups == {"ethanol-again": "ethanol", "aspirin-sodium": "aspirin"}


def test_dedupe_by_canonical_smiles_without_inchikeys(tmp_path, data_dir, inline_rt):
    """dedupe_key=smiles: the same duplicates as by InChIKey on these deposits (salts and
    charges are standardized away first), no InChIKey computed, the key used by appends too."""
    inputs = [str(data_dir / "mixed.smi"), str(data_dir / "compounds.csv"), str(data_dir / "small.sdf")]
    by_key = build_library(inputs, tmp_path / "ik", chunk_size=4, runtime=inline_rt)
    rep = build_library(inputs, tmp_path / "smi", chunk_size=4, dedupe_key="smiles", runtime=inline_rt)
    lib = Library.open(tmp_path / "smi")
    assert lib.manifest["dedupe"] == {"key": "smiles", "mode": "keep_first"}
    meta = lib.read_metadata()
    assert meta.column("inchikey").null_count == meta.num_rows  # never computed
    assert rep.rows_added == by_key.rows_added and rep.duplicates == by_key.duplicates == 3
    assert meta.column("smiles").to_pylist() == Library.open(tmp_path / "ik").read_metadata().column("smiles").to_pylist()
    rej = {(r["id"], r["reason"]): r for r in rejects(tmp_path / "smi")}
    assert {k for k in rej if k[1] in ("duplicate_smiles", "duplicate_inchikey")} == {
        ("ethanol-again", "duplicate_smiles"), ("aspirin-sodium", "duplicate_smiles"), ("aspirin", "duplicate_smiles")}
    assert rej[("ethanol-again", "duplicate_smiles")]["detail"] == "same compound (canonical SMILES CCO) as library id ethanol"
    assert (rej[("ethanol-again", "duplicate_smiles")]["key"], rej[("ethanol-again", "duplicate_smiles")]["duplicate_of"]) \
        == ("CCO", "ethanol")
    assert lib.manifest["history"][0]["rejected_by_reason"]["duplicate_smiles"] == 3
    assert "dedupe       keep_first by smiles" in format_info(library_info(tmp_path / "smi"))
    # an append dedupes against the stored canonical SMILES (other spellings of the same molecules)
    new = tmp_path / "deposit2.smi"
    new.write_text("OCC ethanol-3\nC(C)O ethanol-4\nCCN(CC)CC triethylamine\n")
    add = append_library(tmp_path / "smi", str(new), runtime=inline_rt)
    assert add.rows_added == 1 and add.duplicates == 2
    assert {r["id"] for r in rejects(tmp_path / "smi", "001-append")} == {"ethanol-3", "ethanol-4"}
    assert verify_library(tmp_path / "smi").ok
    with pytest.raises(ConfigError, match="dedupe_key='inchi' is not valid; choose one of inchikey, smiles"):
        build_library(inputs, tmp_path / "bad", dedupe_key="inchi", runtime=inline_rt)


def test_append_dedupes_against_library_and_records_history(tmp_path, data_dir, ray_rt):
    lib_dir = tmp_path / "lib"
    build_library(str(data_dir / "compounds.csv"), lib_dir, runtime=ray_rt)
    before = Library.open(lib_dir)
    shard_hashes = {s["name"]: s["files"] for s in before.manifest["shards"]}
    new = tmp_path / "deposit2.smi.gz"
    new.write_bytes(gzip.compress(b"CC(=O)Nc1ccc(O)cc1 paracetamol-again\nCCN(CC)CC triethylamine\nO=C(O)c1ccccc1O salicylic-acid\n"))
    rep = append_library(lib_dir, str(new), runtime=ray_rt)
    lib = Library.open(lib_dir)
    assert rep.rows_added == 1 and lib.n_rows == before.n_rows + 1
    assert [h["action"] for h in lib.manifest["history"]] == ["build", "append"]
    rej = {(r["id"], r["reason"]) for r in rejects(lib_dir, "001-append")}
    assert rej == {("paracetamol-again", "duplicate_inchikey"), ("salicylic-acid", "duplicate_inchikey")}
    # old shards untouched, new shard added, ordinals continue
    for s in lib.manifest["shards"][: len(shard_hashes)]:
        assert s["files"] == shard_hashes[s["name"]]
    newest = lib.shards[-1].metadata().to_pylist()
    assert newest[0]["id"] == "triethylamine" and newest[0]["ordinal"] == before.n_rows
    assert verify_library(lib_dir).ok
    info = library_info(lib_dir)
    assert info["rows"] == lib.n_rows and len(info["history"]) == 2 and info["bytes_on_disk"] > 0


def test_generated_ids_continue_across_appends(tmp_path, ray_rt):
    a, b = tmp_path / "a.smi", tmp_path / "b.smi"
    a.write_text("CCO\nCCN\n")
    b.write_text("CCC\nCCCl\n")
    build_library(str(a), tmp_path / "lib", runtime=ray_rt)
    append_library(tmp_path / "lib", str(b), runtime=ray_rt)
    ids = sorted(Library.open(tmp_path / "lib").read_metadata(["id"]).column("id").to_pylist())
    assert ids == ["BG000000001", "BG000000002", "BG000000003", "BG000000004"]


def test_output_directory_guards(tmp_path, data_dir, ray_rt):
    lib_dir = tmp_path / "lib"
    build_library(str(data_dir / "mixed.smi"), lib_dir, runtime=ray_rt)
    # same inputs and parameters again: nothing to do
    assert build_library(str(data_dir / "mixed.smi"), lib_dir, runtime=ray_rt).already_done
    with pytest.raises(LibraryError, match="already holds a different library.*biogen library append.*overwrite=true"):
        build_library(str(data_dir / "compounds.csv"), lib_dir, runtime=ray_rt)
    rep = build_library(str(data_dir / "compounds.csv"), lib_dir, overwrite=True, runtime=ray_rt)
    assert Library.open(lib_dir).n_rows == rep.rows_added == 5
    other = tmp_path / "notes"
    other.mkdir()
    (other / "thesis.docx").write_text("precious")
    with pytest.raises(LibraryError, match="not a biogen library"):
        build_library(str(data_dir / "mixed.smi"), other, overwrite=True, runtime=ray_rt)
    assert (other / "thesis.docx").read_text() == "precious"


def test_empty_inputs_are_refused_without_leaving_anything(tmp_path, ray_rt):
    empty = tmp_path / "empty.smi"
    empty.write_text("")
    with pytest.raises(InputError, match="no records in .*empty.smi .empty files"):
        build_library(str(empty), tmp_path / "lib", runtime=ray_rt)
    blank = tmp_path / "blank.smi"
    blank.write_text("\n\n# only a comment\n")
    with pytest.raises(InputError, match="no records found"):
        build_library(str(blank), tmp_path / "lib2", runtime=ray_rt)
    assert not (tmp_path / "lib").exists() and not (tmp_path / "lib2").exists()
    with pytest.raises(InputError, match="input file not found"):
        build_library(str(tmp_path / "missing.smi"), tmp_path / "lib3", runtime=ray_rt)
    assert not (tmp_path / "lib3").exists()


def test_empty_file_beside_a_good_one_is_reported_not_fatal(tmp_path, data_dir, ray_rt, caplog):
    empty = tmp_path / "empty.sdf"
    empty.write_text("")
    rep = build_library([str(empty), str(data_dir / "small.sdf")], tmp_path / "lib", runtime=ray_rt)
    assert rep.rows_added == 3
    assert "holds no records" in caplog.text


def test_truncated_gzip_keeps_what_was_read_and_says_so(tmp_path, data_dir, ray_rt):
    text = "".join(f"{'C' * (i % 20 + 1)}O mol{i}\n" for i in range(3000)).encode()
    cut = tmp_path / "cut.smi.gz"
    full = gzip.compress(text)
    cut.write_bytes(full[: len(full) * 2 // 3])
    rep = build_library(str(cut), tmp_path / "lib", runtime=ray_rt)
    rows = rejects(tmp_path / "lib")
    assert rows[-1]["reason"] == "truncated_input"
    assert rep.records_read == Library.open(tmp_path / "lib").n_rows + len(rows)
    assert rep.by_reason["duplicate_inchikey"] > 0  # 20 distinct molecules only


def test_verify_names_the_corrupted_shard(tmp_path, data_dir, ray_rt):
    lib_dir = tmp_path / "lib"
    build_library(str(data_dir / "mixed.smi"), lib_dir, chunk_size=4, runtime=ray_rt)
    assert verify_library(lib_dir).ok
    victim = Library.open(lib_dir).shards[1]
    fp = victim.path / "fp.npy"
    data = bytearray(fp.read_bytes())
    data[-1] ^= 0xFF
    fp.write_bytes(bytes(data))
    rep = verify_library(lib_dir)
    assert not rep.ok and len(rep.problems) == 1
    assert rep.problems[0].startswith(f"shard {victim.name}: fp.npy sha256 differs")
    shutil.rmtree(Library.open(lib_dir).shards[0].path)
    assert any("missing file" in p for p in verify_library(lib_dir).problems)


def test_featurizer_choices_and_typos(tmp_path, data_dir, ray_rt):
    build_library(str(data_dir / "small.sdf"), tmp_path / "maccs", featurizer=FingerprintSpec(type="maccs"),
                  descriptors=["mw"], runtime=ray_rt)
    lib = Library.open(tmp_path / "maccs")
    assert lib.featurizer.n_words == 3 and lib.shards[0].fingerprints.shape[1] == 3
    assert lib.read_metadata().column_names[-2:] == ["mw", "props"]
    with pytest.raises(ConfigError, match="unknown descriptor"):
        build_library(str(data_dir / "small.sdf"), tmp_path / "x", descriptors=["weight"], runtime=ray_rt)
    with pytest.raises(ConfigError, match="dedupe='first' is not valid"):
        build_library(str(data_dir / "small.sdf"), tmp_path / "x", dedupe="first", runtime=ray_rt)


def test_real_benchmark_set_with_valence_failures(tmp_path, vs_benchmark, ray_rt):
    """DUD fxa actives: 64 records, most written as N=[CH+](N)... which RDKit rejects."""
    src = vs_benchmark / "DUD" / "cmp_list_DUD_fxa_actives.dat.gz"
    rep = build_library(str(src), tmp_path / "lib", runtime=ray_rt)
    rows = rejects(tmp_path / "lib")
    n_records = sum(1 for line in gzip.open(src, "rt") if line.strip() and not line.startswith("#"))
    assert rep.records_read == n_records == rep.rows_added + len(rows)
    valence = [r for r in rows if r["reason"] == "parse_error" and "valence" in r["detail"]]
    assert len(valence) > 40 and all("[CH+]" in r["raw"] for r in valence)


def test_rdkit_shipped_sdf_and_moses_subset(tmp_path, ray_rt):
    from biogen.datasets import dataset_path

    rep = build_library(dataset_path("rdkit_egfr"), tmp_path / "egfr", runtime=ray_rt, chunk_size=100)
    assert rep.records_read == 365 == rep.rows_added + rep.rejected
    assert_scaffolds_stored(tmp_path / "egfr")
    try:
        moses = dataset_path("moses_test")
    except InputError as exc:
        pytest.skip(str(exc))
    head = tmp_path / "moses_head.csv"
    with gzip.open(moses, "rt") as fh, open(head, "w") as out:
        for _, line in zip(range(2001), fh):
            out.write(line)
    rep = build_library(str(head), tmp_path / "moses", runtime=ray_rt, chunk_size=500)
    assert rep.records_read == 2000 and rep.rows_added + rep.rejected == 2000
    assert rep.rows_added > 1990  # MOSES is curated: almost everything is kept
    assert_scaffolds_stored(tmp_path / "moses")


def assert_scaffolds_stored(path):
    """The stored ``scaffold`` descriptor is RDKit's MurckoScaffoldSmiles of the stored
    SMILES (full path, sanitized), the value a screen would otherwise compute."""
    from biogen.chem.scaffolds import murcko_scaffolds

    lib = Library.open(path)
    assert "scaffold" in lib.manifest["descriptors"]
    meta = lib.read_metadata(["smiles", "scaffold"])
    assert meta.schema.field("scaffold").type == "string"
    stored = meta.column("scaffold").to_pylist()
    assert stored == murcko_scaffolds(meta.column("smiles").to_pylist())
    assert "" in stored or len(set(stored)) > 10  # real scaffolds, not one placeholder


def test_generated_ids_skip_ids_given_in_the_deposit(tmp_path, ray_rt):
    p = tmp_path / "d.smi"
    p.write_text("CCO BG000000002\nCCN\nCCC\nCCCl\nCCBr BG000000002\n")
    rep = build_library(str(p), tmp_path / "lib", runtime=ray_rt)
    ids = Library.open(tmp_path / "lib").read_metadata(["id", "smiles"]).to_pylist()
    assert sorted(r["id"] for r in ids) == ["BG000000002", "BG000000003", "BG000000004", "BG000000005"]
    assert rep.by_reason == {"duplicate_id": 1}  # only the id given twice by the depositor


def test_appending_the_same_deposit_again_is_a_no_op(tmp_path, data_dir, ray_rt):
    build_library(str(data_dir / "compounds.csv"), tmp_path / "lib", runtime=ray_rt)
    first = append_library(tmp_path / "lib", str(data_dir / "mixed.smi"), runtime=ray_rt)
    assert not first.already_done and first.rows_added == 6
    again = append_library(tmp_path / "lib", str(data_dir / "mixed.smi"), runtime=ray_rt)
    assert again.already_done
    assert len(Library.open(tmp_path / "lib").manifest["history"]) == 2
