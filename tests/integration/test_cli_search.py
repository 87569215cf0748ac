"""`biogen search` as users run it: hits on stdout or in files, run directory, query
rejects, SMILES with Hydra-special characters, errors and exit codes."""

import csv
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from biogen.cli.main import quote_literals
from biogen.library.ingest import build_library
from biogen.runtime import RuntimeSpec
from biogen.search import SimilarityIndex
from .test_cli import run


@pytest.fixture(scope="module")
def lib(tmp_path_factory, data_dir=Path(__file__).resolve().parents[1] / "data"):
    d = tmp_path_factory.mktemp("cli_search")
    build_library(str(data_dir / "mixed.smi"), d / "lib", descriptors=(), chunk_size=4,
                  runtime=RuntimeSpec(mode="inline", progress=False))
    return d / "lib"


def last_run(cwd: Path) -> Path:
    return sorted((cwd / "runs" / "search").iterdir())[-1]


def test_quote_literals_keeps_smiles_verbatim():
    assert quote_literals(["query=CC(=O)O", "k=3"]) == ["query='CC(=O)O'", "k=3"]
    assert quote_literals(["query='already'"]) == ["query='already'"]
    assert quote_literals(["query=F/C=C\\F"]) == ["query='F/C=C\\F'"]


def test_search_prints_hits_to_stdout_and_logs_to_stderr(lib, tmp_path):
    p = run(["search", f"library={lib}", "query=CC(=O)Nc1ccc(O)cc1", "k=3", "engine=cpu"], tmp_path)
    rows = list(csv.DictReader(io.StringIO(p.stdout), delimiter="\t"))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert list(rows[0]) == ["query_index", "query_id", "rank", "hit_id", "score", "smiles", "library_row"]
    expected = SimilarityIndex.open(lib, engine="cpu").top_k("CC(=O)Nc1ccc(O)cc1", 3)
    assert [r["hit_id"] for r in rows] == expected.column("hit_id").to_pylist()
    assert [float(r["score"]) for r in rows] == expected.column("score").to_pylist()
    assert "3 hits (topk)" in p.stderr
    report = json.loads((last_run(tmp_path) / "report.json").read_text())
    assert report["hits"] == 3 and report["engine"] == "cpu" and report["queries"] == 1


def test_search_files_out_and_query_rejects(lib, tmp_path):
    q = tmp_path / "q.smi"
    q.write_text("CC(=O)Nc1ccc(O)cc1 para\nC1CC( broken\nc1ccccc1 benzene\n")
    run(["search", f"library={lib}", f"query={q}", "mode=threshold", "threshold=0.2", "metric=dice",
         f"output={tmp_path / 'hits.parquet'}"], tmp_path)
    t = pq.read_table(tmp_path / "hits.parquet")
    expected = SimilarityIndex.open(lib, engine="cpu").threshold(str(q), 0.2, __import__("biogen").search.Metric("dice"))
    assert t.equals(expected)
    rejects = (last_run(tmp_path) / "query_rejects.csv").read_text()
    assert "broken" in rejects and "parse_error" in rejects
    run(["search", f"library={lib}", f"query={q}", "k=2", f"output={tmp_path / 'hits.csv'}"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "hits.csv")))
    assert {r["query_id"] for r in rows} == {"para", "benzene"} and len(rows) == 4


def test_search_errors(lib, tmp_path):
    p = run(["search", f"library={lib}", "query=C1CC(", "engine=cpu"], tmp_path, check=False)
    assert p.returncode == 2 and "neither an existing file or library nor a valid SMILES" in p.stderr
    p = run(["search", f"library={lib}", "query=CCO", "mode=knn"], tmp_path, check=False)
    assert p.returncode == 2 and "choose one of topk, threshold, substructure" in p.stderr
    p = run(["search", f"library={lib}", "query=CCO", "metric=cosine"], tmp_path, check=False)
    assert p.returncode == 2 and "valid: tanimoto, dice, tversky" in p.stderr
    p = run(["search", f"library={lib}", "query=CCO", "output=hits.xlsx"], tmp_path, check=False)
    assert p.returncode == 2 and ".csv, .tsv or .parquet" in p.stderr
    p = run(["search", f"library={tmp_path / 'nolib'}", "query=CCO"], tmp_path, check=False)
    assert p.returncode == 2 and "nolib" in p.stderr
    p = run(["search", f"library={lib}", "query=CCO", "part_gib=-1"], tmp_path, check=False)
    assert p.returncode == 2 and "part_gib=-1 must be a positive number of GiB" in p.stderr
    p = run(["search", "--help"], tmp_path)
    assert "mode=substructure" in p.stdout and "engine: auto" in p.stdout and "part_gib" in p.stdout
    # a memory budget smaller than the library: streamed in parts, the same hits
    whole = run(["search", f"library={lib}", "query=c1ccccc1O", "engine=cpu", "k=5"], tmp_path).stdout
    parts = run(["search", f"library={lib}", "query=c1ccccc1O", "engine=cpu", "k=5", "part_gib=0.000001"], tmp_path)
    assert parts.stdout == whole and "searches stream" in parts.stderr


def test_substructure_mode(lib, tmp_path):
    from biogen.search.substructure import substructure_search

    p = run(["search", f"library={lib}", "query=c1ccccc1", "mode=substructure", "runtime=inline",
             f"output={tmp_path / 'sub.csv'}"], tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "sub.csv")))
    expected = substructure_search(lib, "c1ccccc1", runtime=RuntimeSpec(mode="inline", progress=False))
    assert [r["hit_id"] for r in rows] == expected.table.column("hit_id").to_pylist() and rows
    report = json.loads((last_run(tmp_path) / "report.json").read_text())
    assert report["n_matches"] == len(rows) and report["mode"] == "substructure"
    bad = run(["search", f"library={lib}", "query=C1CC(", "mode=substructure", "runtime=inline"], tmp_path,
              check=False)
    assert bad.returncode == 2 and "not valid SMARTS" in bad.stderr, p.stderr
