"""Helpers for tests that need real system components (Debian packages): install them
when the test run is root, otherwise fail under CI or skip elsewhere, saying why."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest


def apt_install(package: str, timeout: int = 600) -> str:
    """Install a Debian package with apt-get (root only) for tests that need a real system
    component; returns what happened, in words (printed loudly: it takes a while)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return f"not root, so the test setup cannot install {package}"
    if shutil.which("apt-get") is None:
        return "apt-get not found, so the test setup cannot install " + package
    command = f"apt-get update -qq && apt-get install -y -qq -o DPkg::Lock::Timeout=300 {package}"
    print(f"\n[biogen tests] {package} not found: running `{command}` (up to {timeout // 60} min) ...",
          file=sys.stderr, flush=True)
    t0 = time.monotonic()
    try:
        done = subprocess.run(["bash", "-c", command], env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"),
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"`{command}` did not finish within {timeout} s"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
        return f"`{command}` failed (exit {done.returncode}): " + " | ".join(tail)
    print(f"[biogen tests] {package} installed in {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return f"installed in {time.monotonic() - t0:.0f} s"


def unavailable(message: str) -> None:
    """A real component a test needs is missing: fail under CI (env CI set), else skip, saying why."""
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def moses_subset(n: int, path, id_prefix: str = "M"):
    """The first ``n`` molecules of MOSES test as a .smi file with ids ``<prefix><i>``
    (skips the test, saying why, when the molsets package is not installed)."""
    import gzip

    from biogen.datasets import dataset_path

    try:
        src = dataset_path("moses_test")
    except Exception as exc:  # molsets is installed by the README's test command
        pytest.skip(f"MOSES test set not installed: {exc}")
    with gzip.open(src, "rt") as fh, open(path, "w") as out:
        next(fh)  # header
        for i, line in zip(range(n), fh):
            out.write(f"{line.strip().split(',')[0]} {id_prefix}{i}\n")
    return path


def run_biogen(*args: str, cwd, env: dict | None = None, extra_env: dict | None = None, timeout: float = 600,
               wait: bool = True, check: bool = False):
    """``biogen ARGS`` in a subprocess, the one way the tests run the CLI: run directories
    under ``cwd/runs`` (``env`` replaces the whole environment, ``extra_env`` adds to this
    one; the test session's sys.path travels as PYTHONPATH). Returns the finished
    ``CompletedProcess`` (``check``: a non-zero exit fails with both outputs), or with
    ``wait=False`` the running ``Popen``."""
    import subprocess
    from pathlib import Path

    if env is None:
        env = {**os.environ, "BIOGEN_RUNS_DIR": str(Path(cwd) / "runs"), "RAY_USAGE_STATS_ENABLED": "0",
               "PYTHONPATH": os.pathsep.join(sys.path), **(extra_env or {})}
    cmd = [sys.executable, "-m", "biogen.cli.main", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"biogen {list(args)} exited {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def compose_config(config_name: str, *overrides: str, job: bool = True, hydra: bool = False):
    """A packaged job config composed as the CLI composes it (``job``: with the job's own
    groups on the search path; ``hydra``: with the hydra node), the one way the tests do."""
    from hydra import compose, initialize_config_dir

    from biogen.cli.main import _register_resolvers, job_overrides
    from biogen.resources import config_dir

    _register_resolvers()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=config_name, overrides=[*(job_overrides(config_name) if job else []), *overrides],
                       return_hydra_config=hydra)


def shard_signature(lib) -> tuple[int, list]:
    """A library's rows and every shard file's sha256 (equal only for byte-identical shards)."""
    import json
    from pathlib import Path

    m = json.loads((Path(lib) / "manifest.json").read_text())
    return m["n_rows"], [(s["name"], s["rows"], {f: v["sha256"] for f, v in s["files"].items()}) for s in m["shards"]]
