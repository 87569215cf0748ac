"""slurm/precompute.sh, slurm/array_build.sbatch and slurm/array_embed.sbatch under a real SLURM
(slurmctld + slurmd + munged on this machine, tests/slurm_support.py): the input split, one
array task per chunk, the merge job after them (--dependency=afterok), the result equal to one
build / one embed; a failed task cancels the merge, is resubmitted alone, and a rerun finishes."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from biogen.library import Library
from biogen.library.ingest import build_library
from biogen.library.verify import verify_library
from biogen.runtime import RuntimeSpec
from integration.test_merge import assert_same_rows, rows

pytestmark = [pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PRECOMPUTE = ROOT / "slurm" / "precompute.sh"
ARRAY_BUILD = ROOT / "slurm" / "array_build.sbatch"
JOB_TIMEOUT = 240
INLINE = RuntimeSpec(mode="inline", progress=False)


def job_env(cluster, tmp_path: Path) -> dict[str, str]:
    """The submitting shell: biogen's venv first on PATH (sbatch exports it to the jobs)."""
    venv_bin = str(Path(sys.executable).parent)
    return {**cluster.env, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "BIOGEN_RUNS_DIR": str(tmp_path / "runs"), "RAY_USAGE_STATS_ENABLED": "0"}


def precompute(cluster, tmp_path: Path, *args: str) -> tuple[str, str, str]:
    p = subprocess.run([str(PRECOMPUTE), *args], cwd=tmp_path, env=job_env(cluster, tmp_path),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    ids = dict(re.findall(r"^(ARRAY_JOB_ID|MERGE_JOB_ID)=(\S+)$", p.stdout, re.M))
    return ids["ARRAY_JOB_ID"], ids["MERGE_JOB_ID"], p.stderr


def wait_all(cluster, array_id: str, tasks: int, merge_id: str | None) -> None:
    for i in range(tasks):
        state = cluster.wait(f"{array_id}_{i}", JOB_TIMEOUT)
        assert state == ("COMPLETED", 0), (i, state, cluster.output(f"{array_id}_{i}"))
    if merge_id:
        state = cluster.wait(merge_id, JOB_TIMEOUT)
        assert state == ("COMPLETED", 0), (state, cluster.output(merge_id))


def chunk_files(parts: Path) -> list[str]:
    return (parts / "chunks.txt").read_text().split()


@pytest.mark.ray
def test_array_build_and_merge_equal_one_build(slurm, tmp_path):
    """600 MOSES molecules (ids, id-less records, duplicates and an id used again across chunks,
    one bad SMILES) in 3 tasks of 2 CPUs (a private local Ray each), then the merge job.
    Of the 6 extra records, 4 are duplicates of earlier chunks' molecules, 1 reuses an id."""
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        next(fh)
        smiles = [line.strip() for _, line in zip(range(600), fh)]
    lines = [s if i % 50 == 0 else f"{s} M{i}" for i, s in enumerate(smiles)]
    lines[250:250] = [f"{smiles[3]} again3", smiles[100], "C1CC broken", "CCO M5"]
    lines[480:480] = [smiles[300], f"{smiles[10]} M10"]
    src = tmp_path / "deposit.smi.gz"
    src.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))

    array_id, merge_id, log = precompute(slurm, tmp_path, "--tasks", "3", "--sbatch", "--cpus-per-task=2",
                                         "library", str(src), "lib", "chunk_size=100")
    out, parts = tmp_path / "lib", tmp_path / "lib.parts"
    assert f"array job {array_id}: 3 tasks" in log and f"merge job {merge_id}" in log
    chunks = chunk_files(parts)
    assert [Path(c).name for c in chunks] == ["part-000.smi", "part-001.smi", "part-002.smi"]
    # meanwhile: one build of the chunks in order, and one of the whole deposit
    build_library(chunks, tmp_path / "single", chunk_size=100, runtime=INLINE)
    build_library(str(src), tmp_path / "whole", chunk_size=100, runtime=INLINE)
    wait_all(slurm, array_id, 3, merge_id)

    task_log = slurm.output(f"{array_id}_1")
    assert "runtime=local runtime.workers=2" in task_log and "exit status 0" in task_log, task_log
    assert (parts / "logs" / f"slurm-{array_id}_2.out").is_file()
    merge_log = slurm.output(merge_id)
    assert "added 600 molecules" in merge_log and "exit status 0" in merge_log, merge_log
    assert sorted(p.name for p in parts.glob("part-*")) == ["part-0", "part-1", "part-2"]
    assert_same_rows(out, tmp_path / "single")
    assert verify_library(out).ok
    # against the unsplit deposit: the same molecules, ids and ordinals (source/record name the chunks)
    a, fa = rows(out)
    b, fb = rows(tmp_path / "whole")
    for col in ("id", "smiles", "inchikey", "ordinal", "duplicate_of", "id_generated", "mw", "qed"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert np.array_equal(fa, fb)
    h = Library.open(out).manifest["history"][0]
    assert h["action"] == "merge" and h["rejected_by_reason"] == {
        "duplicate_inchikey": 4, "duplicate_id": 1, "parse_error": 1}


def test_failed_task_cancels_the_merge_then_resubmit_and_rerun(slurm, tmp_path):
    """@LIST: the user's own chunks. Task 1 fails (an empty file): exit status 2, the merge job is
    cancelled. Fixed, the task runs again alone (sbatch --array=1); the same precompute.sh
    command then leaves both pieces as they are and merges."""
    a, b = tmp_path / "a.smi", tmp_path / "b.smi"
    a.write_text("CCO ethanol\nc1ccccc1 benzene\nCCN\n")
    b.write_text("")
    (tmp_path / "inputs.txt").write_text("a.smi\nb.smi\n")
    args = ("@inputs.txt", "lib")
    array_id, merge_id, _ = precompute(slurm, tmp_path, "library", *args)
    parts = tmp_path / "lib.parts"
    assert slurm.wait(f"{array_id}_0", JOB_TIMEOUT) == ("COMPLETED", 0)
    state = slurm.wait(f"{array_id}_1", JOB_TIMEOUT)
    failed_log = slurm.output(f"{array_id}_1")
    assert state == ("FAILED", 2), failed_log
    assert "no records in" in failed_log and "exit status 2" in failed_log, failed_log
    merge_state = slurm.wait(merge_id, JOB_TIMEOUT)
    assert merge_state[0] == "CANCELLED", (merge_state, slurm.job(merge_id))
    assert not (tmp_path / "lib").exists()

    b.write_text("OCC ethanol-again\nCCCl\n")
    env = job_env(slurm, tmp_path)
    again = slurm.sbatch(["--array=1", f"--output={parts}/logs/retry-%A_%a.out", str(ARRAY_BUILD),
                          str(parts / "chunks.txt"), str(parts)], cwd=tmp_path, env=env)
    assert slurm.wait(f"{again}_1", JOB_TIMEOUT) == ("COMPLETED", 0), slurm.output(f"{again}_1")
    first_piece = (parts / "part-0" / "manifest.json").read_bytes()

    array_id, merge_id, log = precompute(slurm, tmp_path, "library", *args)
    wait_all(slurm, array_id, 2, merge_id)
    assert "nothing to do" in slurm.output(f"{array_id}_0") and "nothing to do" in slurm.output(f"{array_id}_1")
    assert (parts / "part-0" / "manifest.json").read_bytes() == first_piece
    build_library([str(a), str(b)], tmp_path / "single", runtime=INLINE)
    assert_same_rows(tmp_path / "lib", tmp_path / "single")
    ids = Library.open(tmp_path / "lib").read_metadata(["id"]).column("id").to_pylist()
    assert sorted(ids) == ["BG000000003", "BG000000004", "benzene", "ethanol"]


def test_array_embed_and_merge_equal_one_embed(slurm, tmp_path):
    from esm_fixtures import build, random_sequences

    from biogen.protein.job import embed_proteins
    from biogen.protein.search import search_store
    from biogen.protein.store import EmbeddingStore

    model = build(tmp_path, "tiny", 2, 32, 4, formats=("fair-esm",))
    seqs = random_sequences([40, 90, 25, 60, 130, 75, 50, 33, 81, 22], seed=11)
    body = "".join(f">s{i} protein {i}\n{s}\n" for i, s in enumerate(seqs))
    body += f">s2-copy\n{seqs[2]}\n>bad\nMKT1X\n"  # s2's sequence again, in the second chunk
    src = tmp_path / "proteins.fasta.gz"
    src.write_bytes(gzip.compress(body.encode()))
    array_id, merge_id, _ = precompute(slurm, tmp_path, "--tasks", "2", "embed", str(src), "emb",
                                       f"model={model.pt_path}", "shard_size=3", "device=cpu")
    chunks = chunk_files(tmp_path / "emb.parts")
    assert len(chunks) == 2
    embed_proteins(chunks, tmp_path / "single", model=str(model.pt_path), shard_size=3, runtime=INLINE)
    wait_all(slurm, array_id, 2, merge_id)
    assert "runtime=inline" in slurm.output(f"{array_id}_0")
    assert "merged 2 stores: 10 unique sequences" in slurm.output(merge_id)

    m, s = EmbeddingStore.open(tmp_path / "emb"), EmbeddingStore.open(tmp_path / "single")
    assert m.keys == s.keys and m.ids == s.ids and m.ids[m.by_id()["s2"]] == ["s2", "s2-copy"]
    assert np.allclose(m.vectors(), s.vectors(), atol=1e-5)
    assert m.manifest["n_records"] == 12 and m.manifest["rejected"] == 1
    assert [Path(p["path"]).name for p in m.manifest["merged_from"]] == ["part-0", "part-1"]
    q = tmp_path / "q.fa"
    q.write_text(f">q\n{seqs[7]}\n")
    assert search_store(str(tmp_path / "emb"), str(q), k=1).column("hit_id").to_pylist() == ["s7"]


@pytest.mark.parametrize("kind, ext, body, per, chunks", [
    # blank lines and comments at a chunk boundary go with the chunk before: no chunk without records
    ("lines", "smi", "CCO a\nCCN b\n\n# note\nCCC c\n\n", 2, [["CCO a", "CCN b", "", "# note"], ["CCC c", ""]]),
    ("lines", "smi", "CCO a\nCCN b\n\n\n", 2, [["CCO a", "CCN b", "", ""]]),
    ("header", "csv", "smiles,id\nCCO,a\nCCN,b\n\n", 2, [["smiles,id", "CCO,a", "CCN,b", ""]]),
    ("sdf", "sdf", "m1\n$$$$\nm2\n$$$$\n\n", 1, [["m1", "$$$$"], ["m2", "$$$$", ""]]),
])
def test_precompute_split_makes_no_chunk_without_records(tmp_path, kind, ext, body, per, chunks):
    src = tmp_path / f"in.{ext}"
    src.write_text(body)
    (tmp_path / "out").mkdir()
    funcs = re.findall(r"^(?:count_records|split_input)\(\) \{.*?^\}", PRECOMPUTE.read_text(), re.S | re.M)
    script = "\n".join(funcs) + f'\nsplit_input "{src}" {kind} {per} "{tmp_path / "out"}" {ext}\n'
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    paths = p.stdout.split()
    assert [Path(x).read_text().split("\n")[:-1] for x in paths] == chunks
