"""slurm/ray_cluster.sbatch under a real SLURM (slurmctld + slurmd + munged on this machine,
tests/slurm_support.py): a library build on a two-node Ray cluster, a search that waits for
it through --dependency=afterok, a failing job and its teardown, the per-job port blocks."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from slurm_support import start_slurm

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "slurm" / "ray_cluster.sbatch"
JOB_TIMEOUT = 240


def print_ports(job_id: int | str, **env: str) -> dict[str, int]:
    p = subprocess.run(["bash", str(SCRIPT), "--print-ports", str(job_id)], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=30)
    assert p.returncode == 0, p.stderr
    return {k: int(v) for k, v in (line.split("=") for line in p.stdout.split())}


def job_env(cluster, tmp_path: Path) -> dict[str, str]:
    """The submitting shell: biogen's venv first on PATH (sbatch exports it to the job)."""
    venv_bin = str(Path(sys.executable).parent)
    return {**cluster.env, "PATH": f"{venv_bin}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "BIOGEN_RUNS_DIR": str(tmp_path / "runs"), "RAY_USAGE_STATS_ENABLED": "0"}


def leftovers(job_id: str) -> tuple[list[str], list[str]]:
    """Processes naming the job's Ray temp dir (/tmp/rb<jobid>, a worker's /tmp/rb<jobid>.w0), and
    those dirs."""
    p = subprocess.run(["pgrep", "-af", f"/tmp/rb{job_id}([/. ]|$)"], capture_output=True, text=True)
    procs = [ln for ln in p.stdout.splitlines() if "pgrep" not in ln]
    dirs = [str(d) for d in Path("/tmp").glob(f"rb{job_id}*") if d.name in (f"rb{job_id}", f"rb{job_id}.w0")]
    return procs, dirs


@pytest.fixture(scope="module")
def slurm2():
    """Two SLURM nodes on this host (two slurmd), for a two-node Ray cluster."""
    with start_slurm(nodes=2) as cluster:
        yield cluster


def test_job_ids_get_disjoint_port_blocks():
    blocks = {}
    for job_id in range(7000, 7049):  # any 49 consecutive job ids
        ports = print_ports(job_id)
        assert len(set(ports.values())) == len(ports), ports
        assert 20000 <= min(ports.values()) and max(ports.values()) < 32768  # below the ephemeral range
        assert ports["max_worker"] - ports["min_worker"] >= 200
        blocks[job_id] = set(ports.values()) | set(range(ports["min_worker"], ports["max_worker"] + 1))
    ids = sorted(blocks)
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            assert not blocks[a] & blocks[b], (a, b)
    assert print_ports(7000, BIOGEN_RAY_PORT_BASE="40000")["gcs"] == 40000


def test_build_on_two_nodes_then_dependent_search(slurm2, tmp_path, data_dir):
    from biogen.runtime import RuntimeSpec
    from biogen.search.substructure import substructure_search

    env = job_env(slurm2, tmp_path)
    lib, hits = tmp_path / "lib", tmp_path / "hits.csv"
    build = slurm2.sbatch(["--nodes=2", "--cpus-per-task=2", str(SCRIPT), "library", "build",
                           f"input={data_dir / 'mixed.smi'}", f"output={lib}", "chunk_size=2",
                           "runtime.progress=false"], cwd=tmp_path, env=env)
    search = slurm2.sbatch(["--nodes=1", "--cpus-per-task=2", f"--dependency=afterok:{build}", str(SCRIPT),
                            "search", f"library={lib}", "query=c1ccccc1", "mode=substructure",
                            f"output={hits}"], cwd=tmp_path, env=env)
    state, code = slurm2.wait(build, JOB_TIMEOUT)
    log = slurm2.output(build)
    assert (state, code) == ("COMPLETED", 0), log
    manifest = json.loads((lib / "manifest.json").read_text())
    assert manifest["n_rows"] == 6 and len(manifest["shards"]) == 6

    # the job log: two Ray nodes with the CPUs SLURM gave, token authentication, the job's ports
    ports = print_ports(build)
    assert "2 node(s):" in log and "Ray cluster up: 2 of 2 nodes" in log, log
    assert "head node" in log and "worker node" in log and "2 CPUs, 0 GPUs" in log, log
    assert "token authentication on (RAY_AUTH_MODE=token" in log, log
    assert all(f"{k}={v}" in log for k, v in ports.items()), log
    assert "runtime=ray_cluster runtime.address=" in log and f":{ports['gcs']} " in log, log
    assert "added 6 molecules in 6 shards" in log and "exit status 0" in log, log
    assert leftovers(build) == ([], []), leftovers(build)
    assert not (tmp_path / f"ray-logs-{build}").exists()  # Ray's logs are kept only on failure

    state, code = slurm2.wait(search, JOB_TIMEOUT)
    log = slurm2.output(search)
    assert (state, code) == ("COMPLETED", 0), log
    assert "1 node(s):" in log and "exit status 0" in log, log
    rows = list(csv.DictReader(hits.open()))
    expected = substructure_search(lib, "c1ccccc1", runtime=RuntimeSpec(mode="inline", progress=False))
    assert rows and [r["hit_id"] for r in rows] == expected.table.column("hit_id").to_pylist()
    assert leftovers(search) == ([], []), leftovers(search)


def test_failing_job_exits_with_its_status_and_leaves_nothing(slurm, tmp_path):
    env = job_env(slurm, tmp_path)
    job = slurm.sbatch(["--cpus-per-task=2", str(SCRIPT), "library", "build", f"input={tmp_path / 'missing.smi'}",
                        f"output={tmp_path / 'lib'}", "runtime.progress=false"], cwd=tmp_path, env=env)
    state, code = slurm.wait(job, JOB_TIMEOUT)
    log = slurm.output(job)
    assert (state, code) == ("FAILED", 2), log
    assert "input file not found" in log and "biogen exited with status 2" in log and "exit status 2" in log, log
    assert "Ray cluster stopped, temp dir removed" in log, log
    assert leftovers(job) == ([], []), leftovers(job)
    # on failure Ray's logs are copied beside the job's output
    assert list((tmp_path / f"ray-logs-{job}").glob("*/logs/raylet.out")), log


@pytest.mark.parametrize("env, expected", [
    ({"SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_ON_NODE": "4"}, "16 CPUs, 4 GPUs"),
    ({"SLURM_CPUS_PER_TASK": "8", "SLURM_JOB_GPUS": "0,1"}, "8 CPUs, 2 GPUs"),
    ({"SLURM_CPUS_ON_NODE": "8", "SLURM_STEP_GPUS": "2,3,5", "SLURM_JOB_GPUS": "0,1,2,3,4,5"}, "8 CPUs, 3 GPUs"),
    ({"SLURM_CPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2"}, "4 CPUs, 3 GPUs"),
    ({"SLURM_CPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "NoDevFiles"}, "4 CPUs, 0 GPUs"),
    ({"SLURM_CPUS_ON_NODE": "4"}, "4 CPUs, 0 GPUs"),
    ({"SLURM_CPUS_ON_NODE": "4", "SLURM_GPUS_ON_NODE": "4", "BIOGEN_RAY_GPUS": "1", "BIOGEN_RAY_CPUS": "2"},
     "2 CPUs, 1 GPUs"),
])
def test_ray_node_resources_come_from_slurm(env, expected):
    """No GPU here: what the script gives `ray start --num-gpus` is checked from SLURM's variables."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "BIOGEN_RAY_")) and k != "CUDA_VISIBLE_DEVICES"}
    p = subprocess.run(["bash", str(SCRIPT), "--print-resources"], env={**clean, **env}, capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == expected
