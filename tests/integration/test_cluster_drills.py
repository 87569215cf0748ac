"""Failure drills on a real multi-node Ray cluster on this machine (a head and two worker
nodes, `ray start` on loopback, token authentication on): a worker node killed in the
middle of a library build, the driver killed and the job rerun, a wrong token, no cluster,
GPUs asked of a cluster without any. Every disturbed build must end with exactly the rows
and shard hashes of an undisturbed one, and `biogen status` must tell what happened."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from biogen.library.dedupe import work_tag
from local_cluster import LocalCluster
from tests_support import moses_subset, shard_signature
from tests_support import run_biogen as biogen

pytestmark = [pytest.mark.ray, pytest.mark.slow]
N_MOLECULES = 6000
CHUNK = 150  # 40 shards per phase: a kill always lands in the middle
NODE_DEATH_S = 300  # how long a drill waits for the GCS to count a killed node dead


def ledger_shards(lib: Path) -> int:
    ledger = lib / "_work" / "000-build" / "ledger.jsonl"
    if not ledger.exists():
        return 0
    return sum('"outputs"' in line for line in ledger.read_text().splitlines())


def wait_for_shards(lib: Path, n: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while ledger_shards(lib) < n:
        if proc.poll() is not None:
            pytest.fail(f"the build ended before {n} shards were recorded: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"fewer than {n} shards recorded in {timeout} s")
        time.sleep(0.2)


def wait_until_running_a_task(cluster: LocalCluster, i: int, timeout: float = 60) -> None:
    """Until a Ray worker process of worker node ``i`` runs a task (its title is then
    ``ray::<task>``, not ``ray::IDLE``): a kill right after a shard was recorded could
    otherwise land while that node waits for its next shard, and lose nothing."""
    from local_cluster import _descendants

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in _descendants(cluster.workers[i].pid):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            except OSError:
                continue
            if title.startswith("ray::") and title != "ray::IDLE" and not title.endswith("Agent"):
                return
        time.sleep(0.02)
    pytest.fail(f"worker node {i} ran no task for {timeout} s")


@pytest.fixture(scope="module")
def smiles(tmp_path_factory) -> Path:
    return moses_subset(N_MOLECULES, tmp_path_factory.mktemp("drill") / "deposit.smi")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    return {**os.environ, "BIOGEN_RUNS_DIR": str(tmp_path_factory.mktemp("runs")), "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def reference(smiles, env, tmp_path_factory) -> tuple[int, list]:
    """The undisturbed build (in-process runtime: the output does not depend on where shards run)."""
    cwd = tmp_path_factory.mktemp("ref")
    p = biogen("library", "build", f"input={smiles}", "output=lib", f"chunk_size={CHUNK}", "runtime=inline",
               "runtime.progress=false", env=env, cwd=cwd)
    assert p.returncode == 0, p.stderr
    return shard_signature(cwd / "lib")


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(head_cpus=0, worker_cpus=[1, 1]) as c:
        yield c


def test_wrong_token_no_token_mode_and_no_cluster_are_clear_errors(cluster, smiles, env, tmp_path):
    args = ["library", "build", f"input={smiles}", "output=lib", "runtime=ray_cluster"]
    wrong = {**env, **cluster.env, "RAY_AUTH_TOKEN": "0" * 64}
    wrong.pop("RAY_AUTH_TOKEN_PATH")
    t0 = time.monotonic()
    p = biogen(*args, f"runtime.address={cluster.address}", env=wrong, cwd=tmp_path, timeout=180)
    assert p.returncode == 2, p.stderr
    assert "could not connect to the Ray cluster" in p.stderr and "token" in p.stderr
    no_token_mode = {**env, **cluster.env, "RAY_AUTH_MODE": "disabled"}
    p = biogen(*args, f"runtime.address={cluster.address}", env=no_token_mode, cwd=tmp_path, timeout=180)
    assert p.returncode == 2 and "RAY_AUTH_MODE=token" in p.stderr
    p = biogen(*args, "runtime.address=127.0.0.1:1", env={**env, **cluster.env}, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and "could not connect to the Ray cluster at runtime.address='127.0.0.1:1'" in p.stderr
    assert time.monotonic() - t0 < 150  # refused, never a hang
    assert not (tmp_path / "lib" / "manifest.json").exists()


def test_gpus_asked_of_a_cluster_without_gpus(cluster, env, tmp_path):
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from esm_fixtures import build, random_sequences

    model = build(tmp_path, "tiny", 2, 32, 4, formats=("fair-esm",)).pt_path
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(random_sequences([40, 60, 80], seed=1))))
    run_env = {**env, **cluster.env}
    common = ["embed", f"input={fasta}", f"model={model}", "runtime=ray_cluster", f"runtime.address={cluster.address}",
              "runtime.progress=false"]
    p = biogen(*common, "output=emb_gpu", "device=cuda", env=run_env, cwd=tmp_path, timeout=240)
    assert p.returncode == 2, p.stderr
    assert "device=cuda but no node of the Ray cluster has a GPU" in p.stderr and "device=auto" in p.stderr
    p = biogen(*common, "output=emb_auto", "device=auto", env=run_env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr  # auto: falls back to the CPU actors
    assert json.loads((tmp_path / "emb_auto" / "manifest.json").read_text())["device"] == "cpu"


def test_driver_killed_then_rerun_resumes(cluster, smiles, env, reference, tmp_path):
    args = ["library", "build", f"input={smiles}", "output=lib", f"chunk_size={CHUNK}", "runtime=ray_cluster",
            f"runtime.address={cluster.address}", "runtime.progress=false"]
    run_env = {**env, **cluster.env}
    proc = biogen(*args, env=run_env, cwd=tmp_path, wait=False)
    wait_for_shards(tmp_path / "lib", 6, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_at_kill = ledger_shards(tmp_path / "lib")

    st = biogen("status", "lib", env=env, cwd=tmp_path, timeout=60)
    assert st.returncode == 4, st.stdout + st.stderr  # stopped: killed, resumable
    assert "STOPPED" in st.stdout and "not running" in st.stdout
    assert "resume:    rerun the same command: biogen library build" in st.stdout
    assert "build: featurize" in st.stdout

    p = biogen(*args, env=run_env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert shard_signature(tmp_path / "lib") == reference  # same rows, same bytes, no duplicates
    hist = json.loads((tmp_path / "lib" / "manifest.json").read_text())["history"][-1]
    assert hist["run"]["driver_sessions"] == 2 and hist["resumed_shard_steps"] >= done_at_kill - 1 > 0
    st = biogen("status", "lib", "--json", env=env, cwd=tmp_path, timeout=60)
    info = json.loads(st.stdout)
    assert st.returncode == 0 and info["state"] == "complete" and info["rows"] == reference[0]
    assert info["sessions"] == 2 and info["resumed_shards"] > 0


def ledger_keys(lib: Path, prefix: str) -> int:
    ledger = lib / "_work" / "000-build" / "ledger.jsonl"
    if not ledger.exists():
        return 0
    return sum(f'"key": "{prefix}' in line or f'"key":"{prefix}' in line for line in ledger.read_text().splitlines())


def test_worker_node_killed_mid_partitioned_dedupe(cluster, smiles, env, reference, tmp_path):
    """The hash-partitioned dedupe (6 key partitions, 40 parts) on the cluster, a worker
    node killed while its tasks run: the library equals the serial planner's, byte for byte."""
    args = ["library", "build", f"input={smiles}", "output=lib", f"chunk_size={CHUNK}", "runtime=ray_cluster",
            f"runtime.address={cluster.address}", "runtime.progress=false", "dedupe_partitions=6"]
    lib = tmp_path / "lib"
    proc = biogen(*args, env={**env, **cluster.env}, cwd=tmp_path, wait=False)
    deadline = time.monotonic() + 300
    while ledger_keys(lib, f"{work_tag(6)}-split") < 4:
        assert proc.poll() is None, f"the build ended before its dedupe was under way: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no dedupe task recorded in 300 s"
        time.sleep(0.02)
    cluster.kill_worker(1)
    ranked_at_kill = ledger_keys(lib, f"{work_tag(6)}-rank")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert ranked_at_kill < 40  # the kill landed before the dedupe's last round finished
    assert shard_signature(lib) == reference  # the serial planner's rows and bytes
    lost = json.loads((lib / "manifest.json").read_text())["history"][-1]["run"]["retries"]
    assert all(any(w in r["error"] for w in ("NodeDied", "WorkerCrashed", "ObjectLost", "Died")) for r in lost)
    cluster.add_worker(1)  # the next drill starts from a head and two worker nodes again
    # the GCS marks the killed node dead after its health checks fail: seconds on a quiet
    # machine, over 90 s once seen on a loaded one (a 30M-row benchmark beside this tier)
    deadline = time.monotonic() + NODE_DEATH_S
    while cluster.alive_nodes() != 3 and time.monotonic() < deadline:
        time.sleep(1)
    assert cluster.alive_nodes() == 3


def test_worker_node_killed_mid_build(cluster, smiles, env, reference, tmp_path):
    """Last in this module: it leaves the cluster with one worker node."""
    args = ["library", "build", f"input={smiles}", "output=lib", f"chunk_size={CHUNK}", "runtime=ray_cluster",
            f"runtime.address={cluster.address}", "runtime.progress=false"]
    proc = biogen(*args, env={**env, **cluster.env}, cwd=tmp_path, wait=False)
    wait_for_shards(tmp_path / "lib", 6, proc)
    wait_until_running_a_task(cluster, 0)
    cluster.kill_worker(0)  # raylet, object store and workers of that node, at once
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    # the head and the surviving worker: the GCS marks the killed node dead after its health
    # checks fail (seconds; see NODE_DEATH_S), which a fast build can outrun
    deadline = time.monotonic() + NODE_DEATH_S
    while cluster.alive_nodes() != 2 and time.monotonic() < deadline:
        time.sleep(2)
    assert cluster.alive_nodes() == 2

    rows, shards = shard_signature(tmp_path / "lib")
    assert (rows, shards) == reference  # exactly the undisturbed rows and bytes
    import pyarrow.parquet as pq

    ids = [i for s in shards for i in pq.read_table(tmp_path / "lib" / "shards" / s[0] / "meta.parquet",
                                                     columns=["id"]).column("id").to_pylist()]
    assert len(ids) == len(set(ids)) == rows  # no duplicates

    hist = json.loads((tmp_path / "lib" / "manifest.json").read_text())["history"][-1]
    lost = hist["run"]["retries"]
    assert lost, "the killed node was running shards: their loss must be on record"
    assert all(any(w in r["error"] for w in ("NodeDied", "WorkerCrashed", "ObjectLost", "Died")) for r in lost)
    st = biogen("status", "lib", env=env, cwd=tmp_path, timeout=60)
    assert st.returncode == 0 and "COMPLETE" in st.stdout
    assert f"retries:   {len(lost)} shard run(s) lost with their worker or node" in st.stdout
    assert lost[0]["key"] in st.stdout


def test_worker_node_killed_mid_embed(cluster, env, tmp_path):
    """Actors (one per CPU, each holding the model) and a node that dies under them: its
    actors cannot be replaced there, the others are full, so the job must go on with the
    actors left (never wait forever for room), redo the lost shards, and finish complete."""
    def live() -> int:
        return sum(w is not None for w in cluster.workers)

    deadline = time.monotonic() + 120
    while cluster.alive_nodes() > 1 + live() and time.monotonic() < deadline:  # a node killed before: declared dead
        time.sleep(1)
    while live() < 2:  # two worker nodes of 1 CPU, whatever ran before
        cluster.add_worker(1)
    sys.path.insert(0, str(Path(__file__).parents[1]))
    import numpy as np

    from biogen.protein.embed import EmbedSpec, Embedder
    from biogen.protein.store import EmbeddingStore
    from esm_fixtures import build, random_sequences

    model = build(tmp_path, "esm2_t6_8M_UR50D", 6, 320, 20, formats=("fair-esm",))
    n = 120
    seqs = random_sequences([int(x) for x in np.random.default_rng(5).integers(100, 300, size=n)], seed=11)
    fasta = tmp_path / "p.fasta"
    fasta.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    args = ["embed", f"input={fasta}", "output=store", f"model={model.pt_path}", "shard_size=2", "device=cpu",
            "token_budget=2048", "runtime=ray_cluster", f"runtime.address={cluster.address}", "runtime.progress=false",
            "dtype=float32"]  # the same vectors on any CPU (auto may take int8 or bf16)
    proc = biogen(*args, env={**env, **cluster.env}, cwd=tmp_path, wait=False)
    ledger = tmp_path / "store" / "_work" / "ledger.jsonl"
    deadline = time.monotonic() + 300
    while not ledger.exists() or ledger.read_text().count('"outputs"') < 4:
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "fewer than 4 shards in 300 s"
        time.sleep(0.1)
    victim = next(i for i, w in enumerate(cluster.workers) if w is not None)
    cluster.kill_worker(victim)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    assert "lost with its node; going on with 1 worker(s)" in err  # no room for a replacement: no wait

    store = EmbeddingStore.open(tmp_path / "store")
    assert len(store) == n and sorted(store.keys) == sorted(set(store.keys))
    ref = Embedder(str(model.pt_path), EmbedSpec(dtype="float32")).embed(seqs[:4])
    layer = next(iter(ref[0]["pooled"]))
    assert np.allclose(store.vectors()[:4], np.stack([r["pooled"][layer] for r in ref]), atol=1e-5)
    run = json.loads((tmp_path / "store" / "manifest.json").read_text())["run"]
    assert run["retries"], "the actors of the killed node were running shards: their loss must be on record"
    st = biogen("status", "store", env=env, cwd=tmp_path, timeout=60)
    assert st.returncode == 0 and "retries:" in st.stdout
