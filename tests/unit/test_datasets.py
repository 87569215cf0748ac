"""Packaged data sets and the BIOGEN_DATA_DIR folder that an offline node reads them from."""

from __future__ import annotations

import gzip

import pytest

from biogen import datasets
from biogen.datasets import dataset_path
from biogen.errors import InputError


@pytest.mark.parametrize("var", ["BIOGEN_DATA_DIR", "BIOGEN_DEVDATA"])
def test_the_data_folder_is_searched_first(tmp_path, monkeypatch, var):
    for v in datasets.DATA_DIR_VARS:
        monkeypatch.delenv(v, raising=False)
    with gzip.open(tmp_path / "moses_test.csv.gz", "wt") as f:
        f.write("SMILES,SPLIT\nCCO,test\n")
    monkeypatch.setenv(var, str(tmp_path))
    assert dataset_path("moses_test") == str(tmp_path / "moses_test.csv.gz")


def test_a_data_folder_without_the_file_falls_back_to_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("BIOGEN_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(datasets, "_locate", lambda dist, rel, install, what: f"<{dist}>/{rel}")
    assert dataset_path("moses_train") == "<molsets>/moses/dataset/data/train.csv.gz"


def test_a_missing_debian_data_set_names_the_package_and_the_folder(tmp_path, monkeypatch):
    for v in datasets.DATA_DIR_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setitem(datasets.DATASETS, "uniprot_20k", ("debian:mmseqs2-examples", str(tmp_path / "DB.fasta.gz"),
                                                           "apt-get install mmseqs2-examples", "UniProt"))
    with pytest.raises(InputError, match=r"apt-get install mmseqs2-examples.*BIOGEN_DATA_DIR as uniprot_20k\.fasta\.gz"):
        dataset_path("uniprot_20k")
    (tmp_path / "DB.fasta.gz").write_bytes(gzip.compress(b">p\nMKV\n"))
    assert dataset_path("uniprot_20k") == str(tmp_path / "DB.fasta.gz")


def test_unknown_data_set_lists_the_known_ones():
    with pytest.raises(InputError, match="unknown data set 'nope'; known: moses_train"):
        dataset_path("nope")
