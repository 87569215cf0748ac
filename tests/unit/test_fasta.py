"""The protein FASTA reader: validation, rejects with reasons, dedupe, real UniProt data."""

import gzip

import pytest

from biogen.errors import InputError
from biogen.protein.fasta import ALPHABET, iter_fasta, read_proteins, sequence_key

def _write(tmp_path, text, name="p.fasta", gz=False):
    path = tmp_path / (name + (".gz" if gz else ""))
    data = text.encode() if isinstance(text, str) else text
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
def test_valid_records_lowercase_stop_and_multiline(tmp_path, gz):
    path = _write(tmp_path, ">sp|P1|A first protein\nMKTa\nyIAK*\n>P2\nACDEFGHIKLMNPQRSTVWYXBUZO\n", gz=gz)
    recs = list(iter_fasta(path))
    assert [r.id for r in recs] == ["sp|P1|A", "P2"]
    assert recs[0].sequence == "MKTAYIAK" and recs[0].description == "first protein"
    assert recs[1].sequence == ALPHABET and recs[0].key == sequence_key("MKTAYIAK")
    assert [r.record for r in recs] == [1, 2]


def test_rejects_have_reasons_and_nothing_is_lost(tmp_path):
    text = ("MKV\n"                      # before any header
            ">ok1 good\nMKTAYIAK\n"
            ">empty\n\n"
            ">gapped\nMK-TA.Y\n"
            ">digits\nMKT1AY\n"
            ">ok1 same id again\nMKKK\n"
            ">ok2\nMKTAYIAK\n"            # same sequence as ok1: computed once
            ">ok3\nmktayiakX\n")
    pset = read_proteins(_write(tmp_path, text))
    reasons = {(r.id, r.reason) for r in pset.rejects}
    assert reasons == {(None, "missing_header"), ("empty", "empty_sequence"), ("gapped", "invalid_residue"),
                       ("digits", "invalid_residue"), ("ok1", "duplicate_id")}
    gap = next(r for r in pset.rejects if r.id == "gapped")
    assert "'-' at 3" in gap.detail and "alignment symbols" in gap.detail
    assert len(pset) == 2 and pset.ids[sequence_key("MKTAYIAK")] == ["ok1", "ok2"]
    assert pset.n_ids + sum(r.reason != "missing_header" for r in pset.rejects) == pset.n_records == 7


def test_missing_file_and_binary_header(tmp_path):
    with pytest.raises(InputError, match="not found"):
        list(iter_fasta(tmp_path / "nope.fa"))
    recs = list(iter_fasta(_write(tmp_path, b">bad\xff\xfeid\nMKT\n")))
    assert recs[0].reason == "not_utf8"


def test_real_uniprot_proteins_from_mmseqs2_examples(mmseqs_db):
    pset = read_proteins(mmseqs_db)
    assert pset.n_records == 20000
    assert pset.n_ids + len(pset.rejects) == 20000
    lengths = sorted(len(s) for s in pset.sequences)
    assert 300 <= lengths[len(lengths) // 2] <= 400  # median length about 345 (DATA.md)
    assert all(set(s) <= set(ALPHABET) for s in pset.sequences[:500])
