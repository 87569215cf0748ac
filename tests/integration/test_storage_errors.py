"""A full disk under the output directory: the job stops with a clear message, keeps what it
finished, `biogen status` says so, and the same command finishes the job once there is
space, with exactly the rows and bytes of an undisturbed build.

Two ways: a real full filesystem (a small tmpfs, mounted by the test when it runs as root;
later grown with `mount -o remount,size=`, which keeps its files) and a write error
injected at the storage layer (any user)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

from biogen.errors import BiogenError
from biogen.library.ingest import build_library
from biogen.runtime import RuntimeSpec
from tests_support import moses_subset, shard_signature, unavailable
from tests_support import run_biogen as biogen

MOLECULES = 1000
CHUNK = 50  # 20 parts


@pytest.fixture(scope="module")
def deposit(tmp_path_factory) -> Path:
    return moses_subset(MOLECULES, tmp_path_factory.mktemp("dep") / "deposit.smi", id_prefix="D")


@pytest.fixture(scope="module")
def reference(deposit, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "lib"
    build_library(str(deposit), out, chunk_size=CHUNK, runtime=RuntimeSpec(mode="inline", progress=False))
    return shard_signature(out)


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0:
        unavailable("mounting a small tmpfs needs root (the injected-error test below covers other users)")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=450k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if p.returncode != 0:
        unavailable(f"could not mount a tmpfs: {p.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.slow  # a drill (~30 s): the injected-error test below keeps the fast tier's coverage
def test_full_disk_stops_keeps_and_resumes(small_tmpfs, deposit, reference, tmp_path):
    args = ["library", "build", f"input={deposit}", f"output={small_tmpfs / 'lib'}", f"chunk_size={CHUNK}",
            "runtime=local", "runtime.workers=2", "runtime.progress=false"]
    p = biogen(*args, cwd=tmp_path)
    assert p.returncode == 2, p.stderr
    assert "no space left on the device" in p.stderr and "rerun the same command to resume" in p.stderr
    assert "Traceback" not in p.stderr
    ledger = next((small_tmpfs / "lib" / "_work").glob("*/ledger.jsonl"))
    kept = sum('"outputs"' in line for line in ledger.read_text().splitlines())
    assert kept > 0  # shards finished before the disk filled up are on record

    st = biogen("status", str(small_tmpfs / "lib"), cwd=tmp_path)
    assert st.returncode in (1, 4), st.stdout  # failed (the failure recorded) or stopped (no room to record it)
    assert "rerun the same command" in st.stdout and "build: featurize" in st.stdout

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_tmpfs)], check=True)  # files kept
    p = biogen(*args, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert shard_signature(small_tmpfs / "lib") == reference
    hist = json.loads((small_tmpfs / "lib" / "manifest.json").read_text())["history"][-1]
    assert hist["resumed_shard_steps"] >= kept and hist["run"]["driver_sessions"] == 2


def test_injected_write_error_at_the_storage_layer(deposit, reference, tmp_path, monkeypatch):
    import numpy as np

    real_save = np.save
    calls = {"n": 0}

    def failing_save(path, *a, **k):  # the 13th array written (part or shard files) hits a full disk
        calls["n"] += 1
        if calls["n"] == 13:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(path, *a, **k)

    monkeypatch.setattr(np, "save", failing_save)
    inline = RuntimeSpec(mode="inline", progress=False)
    with pytest.raises(BiogenError, match=r"could not write .*: no space left on the device.*rerun the same command"):
        build_library(str(deposit), tmp_path / "lib", chunk_size=CHUNK, runtime=inline)
    monkeypatch.setattr(np, "save", real_save)
    ledger = next((tmp_path / "lib" / "_work").glob("*/ledger.jsonl"))
    events = [json.loads(x) for x in ledger.read_text().splitlines()[1:]]
    assert [e["key"] for e in events if e.get("event") == "failed"] == ["map-000012"]
    assert sum("outputs" in e for e in events) == 12

    report = build_library(str(deposit), tmp_path / "lib", chunk_size=CHUNK, runtime=inline)
    assert report.resumed_shards == 12
    assert shard_signature(tmp_path / "lib") == reference
