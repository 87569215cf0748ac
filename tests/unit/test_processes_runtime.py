"""runtime.mode=processes: shards on a pool of spawned local processes, without Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from biogen.errors import BiogenError
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards, run_shards_on_actors

from .test_runtime import BrokenWorker, fail_on_three, shards, write_square

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def proc_rt() -> RuntimeSpec:
    return RuntimeSpec(mode="processes", workers=2, progress=False)


class StatefulWorker:
    """Counts the shards it ran (state kept across shards, as a model-holding worker does) and
    reports its process and its thread environment."""

    def __init__(self, root: str):
        self.root = Path(root)
        self.seen = 0

    def run(self, i: int):
        self.seen += 1
        if i == 99:
            os._exit(1)  # the worker process dies mid-shard
        path = self.root / f"out-{i}.txt"
        path.write_text(str(i * i))
        return [path.name], {"value": i * i, "seen": self.seen, "pid": os.getpid(),
                             "omp": os.environ.get("OMP_NUM_THREADS")}


def test_tasks_run_in_other_processes_and_resume(tmp_path, proc_rt):
    with ray_session(proc_rt) as slots:
        assert slots == 2
        led = Ledger(tmp_path / "ledger.jsonl", "job")
        res = run_shards(write_square, shards(tmp_path, 7), ledger=led, spec=proc_rt, slots=slots, desc="t",
                         total=7)
    assert {k: v["value"] for k, v in res.items()} == {f"s{i}": i * i for i in range(7)}
    assert sorted(Ledger(tmp_path / "ledger.jsonl", "job").entries) == [f"s{i}" for i in range(7)]
    (tmp_path / "out-2.txt").write_text("tampered")  # a damaged output is redone, the rest skipped
    before = {i: (tmp_path / f"out-{i}.txt").stat().st_mtime_ns for i in range(7)}
    res2 = run_shards(write_square, shards(tmp_path, 8), ledger=Ledger(tmp_path / "ledger.jsonl", "job"),
                      spec=proc_rt, slots=2, desc="t")
    assert res2["s2"]["value"] == 4 and (tmp_path / "out-2.txt").read_text() == "4"
    assert (tmp_path / "out-7.txt").read_text() == "49"
    assert all((tmp_path / f"out-{i}.txt").stat().st_mtime_ns == before[i] for i in (0, 1, 3, 4, 5, 6))


def test_a_failing_shard_fails_the_job_and_is_recorded(tmp_path, proc_rt):
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with pytest.raises(BiogenError, match="shard s3 failed: ValueError: bad shard.*rerun the same command"):
        run_shards(fail_on_three, shards(tmp_path, 6), ledger=led, spec=proc_rt, slots=2, desc="t")
    failed = [e for e in led.events if e["event"] == "failed"]
    assert len(failed) == 1 and failed[0]["key"] == "s3" and "bad shard" in failed[0]["error"]
    assert "s3" not in led.entries


def test_workers_keep_state_per_process_with_one_thread_each(tmp_path, proc_rt, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    res = run_shards_on_actors(StatefulWorker, (str(tmp_path),), ((f"s{i}", (i,)) for i in range(12)), ledger=led,
                               spec=proc_rt, slots=2, desc="t", total=12)
    assert {k: v["value"] for k, v in res.items()} == {f"s{i}": i * i for i in range(12)}
    pids = {r["pid"] for r in res.values()}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2
    for pid in pids:  # each process built its worker once: its count runs 1, 2, ... over its shards
        assert sorted(r["seen"] for r in res.values() if r["pid"] == pid) == list(
            range(1, 1 + sum(r["pid"] == pid for r in res.values())))
    assert {r["omp"] for r in res.values()} == {"1"}


def test_a_user_thread_setting_is_kept(tmp_path, proc_rt, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    res = run_shards_on_actors(StatefulWorker, (str(tmp_path),), [("s0", (0,))], ledger=Ledger(
        tmp_path / "ledger.jsonl", "job"), spec=proc_rt, slots=1, desc="t")
    assert res["s0"]["omp"] == "3"


def test_a_worker_constructor_error_is_reported(tmp_path, proc_rt):
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with pytest.raises(BiogenError, match="workers could not start.*damaged; retrain"):
        run_shards_on_actors(BrokenWorker, (str(tmp_path),), ((f"s{i}", (i,)) for i in range(3)), ledger=led,
                             spec=proc_rt, slots=2, desc="t")


def test_a_dead_worker_process_fails_the_job_keeping_finished_shards(tmp_path, proc_rt):
    led = Ledger(tmp_path / "ledger.jsonl", "job")
    with pytest.raises(BiogenError, match="shard s99 failed.*BrokenProcessPool.*rerun the same command"):
        run_shards_on_actors(StatefulWorker, (str(tmp_path),), [("s0", (0,)), ("s99", (99,))], ledger=led,
                             spec=RuntimeSpec(mode="processes", workers=1, progress=False), slots=1, desc="t")
    assert "s0" in Ledger(tmp_path / "ledger.jsonl", "job").entries


def test_a_library_build_on_processes_equals_inline_and_imports_no_ray(tmp_path, data_dir):
    """The same shard bytes as an inline build, in a fresh interpreter that never imports Ray."""
    code = (
        "import json, sys\n"
        "from biogen.library.ingest import build_library\n"
        "from biogen.runtime import RuntimeSpec\n"
        "rt = RuntimeSpec(mode=sys.argv[3], workers=2, progress=False)\n"
        "build_library(sys.argv[1], sys.argv[2], chunk_size=4, runtime=rt)\n"
        "print(json.dumps({'ray': 'ray' in sys.modules}))\n")
    shas = {}
    for mode in ("processes", "inline"):
        out = subprocess.run([sys.executable, "-c", code, str(data_dir / "mixed.smi"), str(tmp_path / mode), mode],
                             capture_output=True, text=True, cwd=ROOT, check=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == {"ray": False}
        manifest = json.loads((tmp_path / mode / "manifest.json").read_text())
        shas[mode] = [(s["name"], s["rows"], s["files"]) for s in manifest["shards"]]
    assert shas["processes"] == shas["inline"] and len(shas["inline"]) > 1
