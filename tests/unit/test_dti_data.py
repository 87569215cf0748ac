"""DTI data readers: KIBA as DeepDTA prepared it (real, from ../shared) and a generic pair CSV,
with every unusable record a reject with its reason and every other pair kept."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from biogen.dti import read_kiba, read_pairs
from biogen.errors import InputError


KINASE = "MSGPRAGFYRQELNKTVWEVPQRLQGLRPVGSGAYGSVCSAYDARLRQKVAVKKLSRPFQSLIHARRTYRELRLLKHLKHENVIGLLDVFTP"
OTHER = "MENFQKVEKIGEGTYGVVYKARNKLTGEVVALKKIRLDTETEGVPSTAIREISLLKELNHPNIVKLLDVIHTENKLYLVFEFLHQDLKKFMDA"


def test_kiba_reads_every_measured_pair_with_deepdtas_folds(kiba):
    assert (len(kiba), len(kiba.compound_ids), len(kiba.protein_ids)) == (118_254, 2_111, 229)
    assert not kiba.rejects and kiba.active_threshold == 12.1
    assert kiba.fps.shape == (2_111, 32) and kiba.fps.dtype == np.uint64
    assert 0 <= kiba.y.min() and kiba.y.max() <= 17.3
    folds = kiba.folds
    assert len(folds["test"]) == 19_709 and [len(f) for f in folds["train"]] == [19_709] * 5
    every = np.concatenate([folds["test"], *folds["train"]])
    assert len(np.unique(every)) == len(every) == len(kiba)  # disjoint and complete
    assert np.array_equal(kiba.pair_index, np.arange(len(kiba)))
    assert min(len(s) for s in kiba.sequences) == 215 and max(len(s) for s in kiba.sequences) == 4_128


def _deepdta(folder, ligands: dict, proteins: dict, Y: np.ndarray, test: list[int], train: list[list[int]]):
    folder.mkdir()
    (folder / "folds").mkdir()
    (folder / "ligands_can.txt").write_text(json.dumps(ligands))
    with gzip.open(folder / "proteins.txt.gz", "wt") as fh:
        json.dump(proteins, fh)
    np.savetxt(folder / "kiba_binding_affinity_v2.txt", Y)
    (folder / "folds" / "test_fold_setting1.txt").write_text(json.dumps(test))
    (folder / "folds" / "train_fold_setting1.txt").write_text(json.dumps(train))
    return folder


def test_a_bad_compound_or_protein_is_rejected_with_its_pairs_and_the_folds_follow(tmp_path):
    Y = np.array([[11.0, np.nan, 12.5],
                  [np.nan, 13.0, 10.0],   # compound B cannot be parsed
                  [12.2, 11.5, np.nan]])  # protein Q has a digit in it
    d = _deepdta(tmp_path / "kiba", {"A": "CCO", "B": "C1CC", "C": "c1ccccc1O"},
                 {"P": KINASE, "Q": "MKV1", "R": OTHER}, Y, test=[0, 2], train=[[1, 3], [4, 5]])
    data = read_kiba(d)
    # measured pairs row by row: (A,P) (A,R) (B,Q) (B,R) (C,P) (C,Q)
    assert data.compound_ids == ["A", "C"] and data.protein_ids == ["P", "R"]
    assert data.pairs.tolist() == [[0, 0], [0, 1], [1, 0]]
    assert data.y.tolist() == pytest.approx([11.0, 12.5, 12.2])
    assert data.pair_index.tolist() == [0, 1, 4]
    assert [(r.record, r.reason) for r in data.rejects] == [(2, "parse_error"), (2, "invalid_sequence")]
    assert "compound B" in data.rejects[0].detail and "2 measured pair(s)" in data.rejects[0].detail
    assert "protein Q" in data.rejects[1].detail and "'1'" in data.rejects[1].detail
    assert data.folds["test"].tolist() == [0] and [f.tolist() for f in data.folds["train"]] == [[1], [2]]


def test_kiba_files_that_do_not_belong_together_are_refused(tmp_path):
    d = _deepdta(tmp_path / "kiba", {"A": "CCO"}, {"P": KINASE, "R": OTHER}, np.array([[1.0, 2.0], [3.0, 4.0]]),
                 [0], [[1]])
    with pytest.raises(InputError, match="2 x 2 but there are 1 ligands and 2 proteins"):
        read_kiba(d)
    with pytest.raises(InputError, match="is not a folder"):
        read_kiba(tmp_path / "nowhere")


def test_pair_csv_finds_its_columns_and_rejects_bad_lines_with_their_numbers(tmp_path):
    csv = tmp_path / "pairs.csv"
    csv.write_text("ligand_id,smiles,prot_id,aa_sequence,affinity_score\n"
                   f"L1,CCO,P1,{KINASE},11.2\n"
                   f"L2,c1ccccc1O,P1,{KINASE},12.9\n"
                   f"L1,CCO,P2,{OTHER},10.1\n"
                   f"L3,C1CC,P2,{OTHER},13.0\n"          # unparsable SMILES
                   f"L4,CCN,P2,{OTHER},n/a\n"            # no value
                   "L5,CCC,P3,MKV*Q,11.0\n"              # invalid sequence
                   "L6,CCC,P3\n"                         # short line
                   f"L2,c1ccccc1O,P2,{OTHER.lower()},14.0\n")
    data = read_pairs(csv)
    assert data.compound_ids == ["L1", "L2"] and data.protein_ids == ["P1", "P2"]
    assert data.sequences == [KINASE, OTHER]  # lower case accepted, one row per sequence
    assert data.pairs.tolist() == [[0, 0], [1, 0], [0, 1], [1, 1]]
    assert data.y.tolist() == pytest.approx([11.2, 12.9, 10.1, 14.0])
    assert data.pair_index.tolist() == [2, 3, 4, 9]
    assert [(r.record, r.reason) for r in data.rejects] == [
        (5, "parse_error"), (6, "bad_value"), (7, "invalid_sequence"), (8, "bad_columns")]
    assert "'*'" in data.rejects[2].detail


def test_pair_csv_without_a_needed_column_names_the_option(tmp_path):
    csv = tmp_path / "pairs.tsv"
    csv.write_text(f"smiles\tseq\tkd\nCCO\t{KINASE}\t5\n")
    with pytest.raises(InputError, match="train_data.sequence_column=<column>"):
        read_pairs(csv)
    data = read_pairs(csv, sequence_column="seq", value_column="kd", active_threshold=6.0)
    assert len(data) == 1 and data.protein_ids == ["P1"] and data.active_threshold == 6.0
    with pytest.raises(InputError, match="no column 'pkd' for the value"):
        read_pairs(csv, sequence_column="seq", value_column="pkd")
