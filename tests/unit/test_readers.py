import gzip

import pytest

from biogen.chem.readers import ReaderOptions, inspect_input, iter_records, resolve_inputs
from biogen.errors import ConfigError, InputError


def read_all(path, **kw):
    opts = ReaderOptions(**kw)
    return list(iter_records(inspect_input(path, opts), opts))


def test_smi_with_and_without_ids_skips_comments_and_empty_lines(data_dir):
    recs = read_all(data_dir / "mixed.smi")
    assert [r.record for r in recs][:3] == [2, 3, 4]  # line numbers, comment on line 1
    assert recs[0].text == "CCO" and recs[0].id == "ethanol"
    assert 5 not in [r.record for r in recs]  # the empty line
    assert recs[-1].id is None and recs[-1].text.startswith("CC(C)NCC")
    assert all(r.error is None for r in recs)


def test_csv_columns_quotes_props_and_bad_rows(data_dir):
    recs = read_all(data_dir / "compounds.csv")
    by_id = {r.id: r for r in recs}
    assert by_id["paracetamol"].props == {"activity_nM": "1200", "note": "analgesic, antipyretic"}
    assert by_id["isoprenaline"].error[0] == "field_count"
    assert "expected 4 fields" in by_id["isoprenaline"].error[1]
    assert by_id["empty-smiles"].error[0] == "empty_smiles"
    assert by_id["nicotine"].record == 4


def test_tsv_with_hash_header_as_in_benchmark_sets(tmp_path):
    p = tmp_path / "x.dat.gz"
    with gzip.open(p, "wt") as fh:
        fh.write("# Mol_Title\tID\tSMILES\nZINC1\tA_1\tCCO\nZINC2\tA_2\tc1ccccc1\n")
    recs = read_all(p)
    assert [(r.id, r.text) for r in recs] == [("A_1", "CCO"), ("A_2", "c1ccccc1")]
    assert recs[0].props == {"Mol_Title": "ZINC1"}


def test_configured_columns_and_missing_column_error(data_dir):
    recs = read_all(data_dir / "compounds.csv", smiles_column="smiles", id_column="")
    assert all(r.id is None for r in recs)
    with pytest.raises(InputError, match=r"column 'SMILES_X' \(reader.smiles_column\) is not in the header"):
        read_all(data_dir / "compounds.csv", smiles_column="SMILES_X")


def test_no_smiles_column_found(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("structure,name\nCCO,x\n")
    with pytest.raises(InputError, match="no SMILES column found.*reader.smiles_column"):
        read_all(p)


def test_wrong_delimiter_is_named(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("smiles\tid\nCCO\tx\n")
    with pytest.raises(InputError, match="looks tab-separated; set reader.delimiter=tab"):
        read_all(p)
    assert [r.id for r in read_all(p, delimiter="\t")] == ["x"]


def test_sdf_props_ids_and_broken_block(data_dir):
    recs = read_all(data_dir / "small.sdf")
    assert [r.record for r in recs] == [1, 2, 3, 4]
    assert recs[0].id == "aspirin" and recs[0].props == {"CAS": "50-78-2", "vendor": "A"}
    assert recs[1].id == "broken-caffeine"
    ids = [r.id for r in read_all(data_dir / "small.sdf", sdf_id_property="CAS")]
    assert ids == ["50-78-2", "58-08-2", "15307-86-5", "657-24-9"]


def test_gzip_detected_by_content_and_truncation_becomes_a_record(tmp_path, data_dir):
    data = (data_dir / "mixed.smi").read_bytes() * 200
    full = tmp_path / "deposit.smi.gz"
    full.write_bytes(gzip.compress(data))
    assert len(read_all(full)) == 11 * 200
    cut = tmp_path / "cut.smi.gz"
    cut.write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    info = inspect_input(cut, ReaderOptions())
    assert info.truncated and "truncated" in info.truncated
    recs = list(iter_records(info, ReaderOptions()))
    assert recs[-1].error[0] == "truncated_input"
    assert "ends early" in recs[-1].error[1]
    assert 0 < len(recs) - 1 < 11 * 200


def test_empty_file_and_missing_paths(tmp_path):
    empty = tmp_path / "empty.smi"
    empty.write_text("")
    assert inspect_input(empty, ReaderOptions()).records_estimate == 0
    assert read_all(empty) == []
    with pytest.raises(InputError, match="input file not found: .*nope.smi"):
        resolve_inputs(str(tmp_path / "nope.smi"))
    with pytest.raises(InputError, match="matches no file"):
        resolve_inputs(str(tmp_path / "*.sdf"))
    with pytest.raises(InputError, match="is a directory"):
        resolve_inputs(str(tmp_path))


def test_glob_and_list_order(tmp_path):
    for n in ("b.smi", "a.smi"):
        (tmp_path / n).write_text("CCO\n")
    assert [p.name for p in resolve_inputs(str(tmp_path / "*.smi"))] == ["a.smi", "b.smi"]
    assert [p.name for p in resolve_inputs([str(tmp_path / "b.smi"), str(tmp_path / "a.smi")])] == ["b.smi", "a.smi"]
    with pytest.raises(InputError, match="same file twice"):
        resolve_inputs([str(tmp_path / "a.smi"), str(tmp_path / "a.smi")])


def test_unknown_extension_and_bad_options(tmp_path):
    p = tmp_path / "x.mol2"
    p.write_text("x")
    with pytest.raises(InputError, match="set reader.format to one of smi, csv, tsv, sdf"):
        read_all(p)
    with pytest.raises(ConfigError, match="reader.format='smiles' is not a known format"):
        ReaderOptions(format="smiles")


def test_unbalanced_quote_does_not_swallow_records_silently(tmp_path):
    p = tmp_path / "q.csv"
    p.write_text('smiles,id,name\nCCO,m1,"ethanol\nCCN,m2,x\nCCC,m3,y\nCCCC,m4,z\n')
    recs = read_all(p)
    assert len(recs) == 1 and recs[0].error[0] == "multiline_record" and recs[0].record == 2
    assert "line 2 to line 5" in recs[0].error[1] and "CCCC" in recs[0].raw
    p.write_text('smiles,id,name\nCCO,m1,ok\n"CCN,m2,x\nCCC,m3,y\n')
    recs = read_all(p)
    assert recs[0].id == "m1" and recs[0].error is None and recs[1].record == 3 and recs[1].error


def test_tsv_quotes_are_characters_and_bom_is_ignored(tmp_path):
    p = tmp_path / "x.tsv"
    p.write_bytes('\ufeffsmiles\tid\nCCO\t"weird name\nCCN\tplain\n'.encode("utf-8"))
    recs = read_all(p)
    assert [(r.text, r.id) for r in recs] == [("CCO", '"weird name'), ("CCN", "plain")]


def test_delimiter_aliases():
    assert ReaderOptions(delimiter="tab").delimiter == "\t"
    assert ReaderOptions(delimiter="\\t").delimiter == "\t"
    with pytest.raises(ConfigError, match="reader.delimiter='::' must be one character"):
        ReaderOptions(delimiter="::")


def test_single_mol_file_and_padded_gzip(tmp_path, data_dir):
    block = (data_dir / "small.sdf").read_text().split("$$$$\n")[0]
    mol = tmp_path / "aspirin.mol"
    mol.write_text(block)
    assert inspect_input(mol, ReaderOptions()).records_estimate == 1
    assert [r.id for r in read_all(mol)] == ["aspirin"]
    padded = tmp_path / "p.smi.gz"
    padded.write_bytes(gzip.compress(b"CCO a\nCCN b\n") + b"\0" * 4096)
    info = inspect_input(padded, ReaderOptions())
    assert info.truncated is None and info.records_estimate == 2
    assert [r.id for r in read_all(padded)] == ["a", "b"]


def test_sdf_value_starting_with_gt_and_runaway_block(tmp_path, data_dir, monkeypatch):
    from biogen.chem import readers

    block = (data_dir / "small.sdf").read_text().split("$$$$\n")[0]
    p = tmp_path / "v.sdf"
    p.write_text(block.replace(">  <vendor>\nA\n", ">  <vendor>\n>A<\n") + "$$$$\n")
    assert read_all(p)[0].props == {"CAS": "50-78-2", "vendor": ">A<"}
    limit = block.count("\n") + 5
    monkeypatch.setattr(readers, "MAX_SDF_RECORD_LINES", limit)
    text = "junk line\n" * (2 * limit) + "$$$$\n" + block + "$$$$\n"
    p.write_text(text)
    recs = read_all(p)
    assert recs[0].error[0] == "record_too_long" and recs[1].id == "aspirin" and recs[1].record == 2


def test_record_batch_pickles_column_wise_and_round_trips():
    """Chunks cross to the Ray tasks as RecordBatch: every field kind survives pickling,
    and the batch pickles as columns (a few objects), not one object per record."""
    import pickle
    import pickletools

    from biogen.chem.records import RawRecord, RecordBatch

    recs = [RawRecord("in.csv", 2, "smiles", "CCO", "CCO,a1,x", "a1", {"note": "x"}),
            RawRecord("in.csv", 3, "smiles", "", "bad", None, None, ("field_count", "expected 3 fields")),
            RawRecord("in.sdf", 1, "molblock", "\n  RDKit\n\nM  END", "raw block", "m1", {"p": "ü"})]
    batch = RecordBatch(recs * 50)
    blob = pickle.dumps(batch, protocol=5)
    back = pickle.loads(blob)
    assert isinstance(back, RecordBatch) and back == batch and list(back) == recs * 50
    assert len(back) == 150 and back[4] == recs[1] and back[-1] == recs[2]
    # one reference to the record class's constructor for the whole batch, not 150
    ops = [op.name for op, _, _ in pickletools.genops(blob)]
    assert ops.count("REDUCE") + ops.count("NEWOBJ") + ops.count("BUILD") < 5
    assert RecordBatch() == RecordBatch([]) and len(pickle.loads(pickle.dumps(RecordBatch()))) == 0
