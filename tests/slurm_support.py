"""A real SLURM on this machine for the tests: Debian's ``slurm-wlm`` and ``munge``.

``start_slurm()`` (a context manager) installs the packages when they are missing (root
only, with apt-get), starts a private ``munged`` (its own key and socket, so a munged the
host may run is not touched), writes a slurm.conf for this host, starts ``slurmctld`` and
``slurmd`` in the foreground (``-D``) as processes it owns, waits until ``sinfo`` shows the
node(s) idle and afterwards cancels what is left, stops the daemons and removes all state.
Everything lives in one short temp dir (/tmp/bslurm*). When it cannot (not root, apt-get
fails, a daemon does not start) it calls ``unavailable(reason)``: the test fails under CI,
is skipped elsewhere.

slurm.conf choices (Debian's SLURM 22.05 in a container or VM without systemd):

- ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none``: no cgroups needed,
  so no cgroup.conf either (slurmd starts in this firecracker VM with its cgroup v1
  hierarchy untouched); job processes are tracked through their parent process ids.
- ``JobAcctGatherType=jobacct_gather/none``, ``AccountingStorageType=accounting_storage/none``:
  no slurmdbd; finished jobs are read with ``scontrol show job`` and ``MinJobAge=3600``
  keeps them there for the session.
- ``SelectType=select/cons_tres`` + ``CR_CPU``: jobs share the node by CPUs (memory is not
  a consumable resource, so no ``--mem`` is needed).
- ``SlurmUser=root``, ``AuthInfo=socket=<our munged socket>``, free ports for slurmctld and
  each slurmd, and ``FirstJobId`` drawn at random, so two test sessions on one machine
  neither share daemons nor hand out the same job ids (ports derived from job ids, Ray temp
  dirs named after them: see slurm/ray_cluster.sbatch).
- ``nodes=2`` gives two SLURM nodes on this one host (two slurmd started with ``-N``;
  Debian builds SLURM with multiple-slurmd support): the same hostname, their own ports and
  spool dirs. Useful to exercise multi-node job scripts; each node claims all CPUs.

The mpi/pmix errors in the daemon logs are harmless: Debian ships the plugins without
libpmix, and ``MpiDefault=none``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests_support import apt_install, unavailable

PACKAGES = "slurm-wlm munge"
EXECUTABLES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun")
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING",
                 "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}


@dataclass
class Slurm:
    """A running SLURM: ``env`` (SLURM_CONF set) for every SLURM command and job."""

    root: Path
    conf: Path
    env: dict[str, str]
    partition: str
    nodes: list[str]
    cpus_per_node: int
    logs: Path
    _procs: list[subprocess.Popen] = field(default_factory=list, repr=False)

    def run(self, args: Sequence[str], *, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """A SLURM command (sinfo, scontrol, ...) against this cluster."""
        p = subprocess.run(list(args), env=kw.pop("env", self.env), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
        return p

    def sbatch(self, args: Sequence[str], cwd: str | os.PathLike, env: Mapping[str, str] | None = None) -> str:
        """Submit ``sbatch --parsable ARGS`` from ``cwd`` (the job's SLURM_SUBMIT_DIR and working
        directory); ``env`` is the submitting environment (default: ``self.env``; make sure it
        has SLURM_CONF). Returns the job id."""
        p = self.run(["sbatch", "--parsable", *map(str, args)], cwd=str(cwd), env=dict(env or self.env))
        return p.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, ExitCode, StdOut, Reason, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 300) -> tuple[str, int]:
        """Wait until the job has ended; returns ``(state, exit_code)``, e.g. ``("COMPLETED", 0)``
        or ``("FAILED", 2)`` (the exit code of the batch script; ``ExitCode=2:0``)."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if state and state not in ACTIVE_STATES:
                code, _, _sig = info.get("ExitCode", "0:0").partition(":")
                return state, int(code or 0)
            if time.monotonic() > deadline:
                raise TimeoutError(f"SLURM job {job_id} still {state} (Reason={info.get('Reason')}) "
                                   f"after {timeout:.0f} s")
            time.sleep(0.5)

    def output(self, job_id: str) -> str:
        """The job's standard output file (``slurm-<jobid>.out`` unless ``--output`` said otherwise)."""
        path = Path(self.job(job_id)["StdOut"])
        return path.read_text(errors="replace") if path.is_file() else ""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mem_mb() -> int:
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return max(256, total_kb // 1024 - 1024)  # leave 1 GiB for the system


def _stop(p: subprocess.Popen, timeout: float = 10) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(timeout=10)


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if "pmix" not in ln]
    except OSError:
        return "(no log)"
    return " | ".join(lines[-n:])


def _write_conf(root: Path, host: str, nodes: list[str], cpus: int, mem_mb: int, partition: str,
                ctld_port: int, node_ports: list[int], munge_socket: Path) -> Path:
    multi = len(nodes) > 1
    node_lines = []
    for name, port in zip(nodes, node_ports):
        addr = f" NodeHostname={host}" if multi else ""
        node_lines.append(f"NodeName={name}{addr} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN")
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        f"# single-host test SLURM written by tests/slurm_support.py ({len(nodes)} node(s))",
        f"ClusterName=biogentest{random.randrange(10**6)}",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket}",
        "SlurmUser=root",
        "SlurmdUser=root",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "SwitchType=switch/none",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_CPU",
        "SchedulerType=sched/backfill",
        "ReturnToService=2",
        "MinJobAge=3600",
        "KillWait=10",
        f"FirstJobId={random.randrange(1000, 5_000_000)}",
        *node_lines,
        f"PartitionName={partition} Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    return conf


def _missing() -> list[str]:
    return [exe for exe in EXECUTABLES if shutil.which(exe) is None and not Path("/usr/sbin", exe).exists()]


def _which(exe: str) -> str:
    return shutil.which(exe) or str(Path("/usr/sbin", exe))


@contextmanager
def start_slurm(nodes: int = 1, partition: str = "debug", timeout: float = 60) -> Iterator[Slurm]:
    """A running SLURM on this host with ``nodes`` SLURM nodes (see the module docstring)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        unavailable("the SLURM tests start slurmctld/slurmd/munged and need root "
                    f"(and Debian's {PACKAGES}: `apt-get install {PACKAGES}`)")
    if _missing():
        outcome = apt_install(PACKAGES)
        if _missing():
            unavailable(f"SLURM is not installed ({', '.join(_missing())} missing; {outcome}); "
                        f"install it with `apt-get install {PACKAGES}` (as root)")
    t0 = time.monotonic()
    host = socket.gethostname().split(".")[0]
    names = [host] if nodes == 1 else [f"{host}n{i}" for i in range(1, nodes + 1)]
    root = Path(tempfile.mkdtemp(prefix="bslurm", dir="/tmp"))
    root.chmod(0o755)  # munged insists that every directory above its socket is world-executable
    for sub in ("state", "log", "munge", *(f"spool/{n}" for n in names)):
        (root / sub).mkdir(parents=True)
    procs: list[subprocess.Popen] = []
    cluster = None

    def spawn(name: str, argv: list[str]) -> subprocess.Popen:
        out = open(root / "log" / f"{name}.out", "w")
        p = subprocess.Popen(argv, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, start_new_session=True)
        out.close()
        procs.append(p)
        return p

    try:
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = root / "munge" / "munge.socket.2"
        env = {**os.environ}
        munged = spawn("munged", [_which("munged"), "-F", f"--key-file={key}", f"--socket={munge_socket}",
                                  f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                                  f"--log-file={root}/log/munged.log"])
        deadline = time.monotonic() + 20
        while not munge_socket.exists():
            if munged.poll() is not None or time.monotonic() > deadline:
                unavailable(f"munged did not start: {_tail(root / 'log' / 'munged.out')}")
            time.sleep(0.1)

        cpus = len(os.sched_getaffinity(0))
        conf = _write_conf(root, host, names, cpus, _mem_mb(), partition, _free_port(),
                           [_free_port() for _ in names], munge_socket)
        env = {**os.environ, "SLURM_CONF": str(conf)}
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and v != "SLURM_CONF"]:
            del env[var]  # not inherited from an outer SLURM job
        spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)])
        for name in names:
            spawn(f"slurmd-{name}", [_which("slurmd"), "-D", "-f", str(conf), *(["-N", name] if nodes > 1 else [])])
        cluster = Slurm(root=root, conf=conf, env=env, partition=partition, nodes=names, cpus_per_node=cpus,
                        logs=root / "log", _procs=procs)
        deadline = time.monotonic() + timeout
        while True:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                unavailable(f"a SLURM daemon exited ({' '.join(dead[0].args[:2])}): "
                            f"{_tail(root / 'log' / (Path(dead[0].args[0]).name + '.out'))} "
                            f"{_tail(root / 'log' / 'slurmctld.log')}")
            p = cluster.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=20)
            states = dict(line.split() for line in p.stdout.splitlines() if line.strip())
            if p.returncode == 0 and all(states.get(n) == "idle" for n in names):
                break
            if time.monotonic() > deadline:
                unavailable(f"SLURM node(s) not idle after {timeout:.0f} s (sinfo: {states or p.stderr.strip()}); "
                            f"slurmd: {_tail(root / 'log' / f'slurmd-{names[0]}.log')}")
            time.sleep(0.3)
        print(f"\n[biogen tests] SLURM with {nodes} node(s) up in {time.monotonic() - t0:.1f} s ({conf})",
              flush=True)
        yield cluster
    finally:
        if cluster is not None:
            try:
                _cancel_all(cluster)
            except (subprocess.SubprocessError, OSError) as exc:  # the daemons are stopped regardless
                print(f"[biogen tests] could not cancel the remaining SLURM jobs: {exc}", flush=True)
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(root, ignore_errors=True)


def _cancel_all(cluster: Slurm, timeout: float = 60) -> None:
    """Cancel the jobs still queued or running and wait until slurmd has ended them."""
    p = cluster.run(["squeue", "-h", "-o", "%i"], check=False)
    jobs = p.stdout.split()
    if not jobs:
        return
    cluster.run(["scancel", *jobs], check=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not cluster.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split():
            return
        time.sleep(0.5)
