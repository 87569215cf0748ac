"""runtime=ray_cluster against a real two-node Ray cluster on this machine
(`ray start --head` + `ray start --address`, token authentication on)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_bin() -> str:
    return str(Path(sys.executable).with_name("ray"))


@pytest.fixture
def two_node_cluster(tmp_path):
    port = free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    procs = []
    head = subprocess.Popen([ray_bin(), "start", "--head", f"--port={port}", "--num-cpus=1", "--block",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(head)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        worker = subprocess.Popen([ray_bin(), "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", "--block"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        time.sleep(5)
        yield f"127.0.0.1:{port}", env
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        current = Path("/tmp/ray/ray_current_cluster")  # Ray's pointer to "the" cluster: ours is gone
        if current.exists() and current.read_text().strip().endswith(f":{port}"):
            current.unlink()


def test_build_on_a_two_node_cluster(tmp_path, data_dir, two_node_cluster):
    address, env = two_node_cluster
    cmd = [sys.executable, "-m", "biogen.cli.main", "library", "build", f"input={data_dir / 'mixed.smi'}",
           "output=lib", "chunk_size=2", "runtime=ray_cluster", f"runtime.address={address}",
           "runtime.progress=false"]
    p = subprocess.run(cmd, cwd=tmp_path, env={**env, "BIOGEN_RUNS_DIR": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    m = json.loads((tmp_path / "lib" / "manifest.json").read_text())
    assert m["n_rows"] == 6 and len(m["shards"]) == 6
    # without the token mode the same cluster refuses the driver, with a message that says why
    env2 = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"}
    p = subprocess.run(cmd[:-3] + ["output=lib2", "runtime=ray_cluster", f"runtime.address={address}"],
                       cwd=tmp_path, env={**env2, "RAY_AUTH_MODE": "disabled"}, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2 and "RAY_AUTH_MODE=token" in p.stderr
