"""A multi-node Ray cluster on one machine, for failure drills, tests and overhead benchmarks
(test infrastructure: not part of the installed package).

``ray start --head`` plus one ``ray start --address`` per worker node, on loopback, each its
own process group (so one node can be killed, raylet, object store and workers together,
as when a machine is lost), with token authentication on and a per-cluster token file.

    with LocalCluster(head_cpus=0, worker_cpus=[1, 1]) as c:
        subprocess.run(["biogen", "library", "build", ..., "runtime=ray_cluster",
                        f"runtime.address={c.address}"], env=c.env)
        c.kill_worker(0)

This is how an operator can rehearse a node loss before a long job on real nodes; on an
HPC system the cluster comes from ``slurm/ray_cluster.sbatch`` instead.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from biogen.errors import BiogenError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (from /proc; Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _ray() -> str:
    return str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    """Start with ``start()`` or as a context manager; ``address`` and ``env`` are what a
    driver needs (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``)."""

    def __init__(self, head_cpus: int = 0, worker_cpus: list[int] | tuple[int, ...] = (1, 1),
                 temp_dir: str | Path | None = None, startup_timeout: float = 180.0):
        self.head_cpus = head_cpus
        self.worker_cpus = list(worker_cpus)
        self.startup_timeout = startup_timeout
        self._own_tmp = temp_dir is None
        # short: Ray's socket paths under the temp dir must stay below 107 bytes
        self.tmp = Path(temp_dir) if temp_dir else Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = self.tmp / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                    "RAY_USAGE_STATS_ENABLED": "0"}
        self.env.pop("RAY_AUTH_TOKEN", None)
        self.env.pop("RAY_ADDRESS", None)
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen | None] = []

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        with open(self.tmp / log, "ab") as fh:
            return subprocess.Popen([_ray(), "start", "--block", *args], env=self.env, stdout=fh,
                                    stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> LocalCluster:
        self.head = self._spawn(["--head", f"--port={self.port}", "--node-ip-address=127.0.0.1",
                                 f"--num-cpus={self.head_cpus}", "--num-gpus=0", "--include-dashboard=false",
                                 "--disable-usage-stats", f"--temp-dir={self.tmp}"], "head.log")
        try:
            self._wait(1)
            for cpus in self.worker_cpus:  # one at a time: raylets starting together on one
                self.add_worker(cpus)      # host can time out registering with the GCS
        except BaseException:
            self.stop()
            raise
        return self

    def add_worker(self, cpus: int = 1) -> int:
        """Start one more worker node (e.g. to replace a killed one); returns its index."""
        i = len(self.workers)
        self.workers.append(self._spawn([f"--address={self.address}", "--node-ip-address=127.0.0.1",
                                         f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={self.tmp}"],
                                        f"worker{i}.log"))
        self._wait(1 + sum(w is not None for w in self.workers))
        return i

    def alive_nodes(self) -> int:
        """Nodes the cluster counts as alive (asked of the head's GCS, without joining). In a
        subprocess: Ray reads its token settings once, at import, so the caller never imports
        ray with this cluster's environment (or any other) fixed in."""
        code = ("import ray, sys\n"
                "from ray._raylet import GcsClient\n"
                f"c = GcsClient(address={self.address!r})\n"
                "print(sum(1 for n in c.get_all_node_info(timeout=10).values() if n.state == 0))")
        p = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            return 0
        return int(p.stdout.strip().splitlines()[-1])

    def _wait(self, nodes: int) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.head is not None and self.head.poll() is not None:
                raise BiogenError(f"the Ray head exited ({self.head.returncode}); see {self.tmp / 'head.log'}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                if self.alive_nodes() >= nodes:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        tails = []
        for log in sorted(self.tmp.glob("*.log")):
            lines = log.read_text(errors="replace").strip().splitlines()[-5:]
            tails.append(f"--- {log.name}: " + " | ".join(lines))
        raise BiogenError(f"the local Ray cluster did not reach {nodes} node(s) in {self.startup_timeout:.0f} s "
                          f"({self.alive_nodes()} alive)\n" + "\n".join(tails))

    def worker_pid(self, i: int) -> int:
        proc = self.workers[i]
        if proc is None:
            raise ValueError(f"worker node {i} was already killed")
        return proc.pid

    def kill_worker(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Lose worker node ``i`` at once, as when its machine goes down: every process of
        that node (``ray start``, raylet, object store, agents, and the worker processes,
        which Ray puts in process groups of their own) gets ``sig``."""
        proc = self.workers[i]
        if proc is None:
            return
        for pid in [proc.pid, *_descendants(proc.pid)]:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)
        self.workers[i] = None

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.head] if p is not None]
        for p in procs:  # a throw-away cluster: no graceful shutdown needed (it takes ~30 s)
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in procs:
            p.wait(timeout=30)
        # raylets started by `ray start --block` can outlive their group leader: kill by temp dir
        subprocess.run(["pkill", "-9", "-f", str(self.tmp)], check=False)
        self.workers, self.head = [], None
        if self._own_tmp:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
