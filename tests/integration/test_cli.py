"""The `biogen` command as users run it: help, --cfg job, run directories, errors, exit
codes, and a build killed mid-way that a rerun finishes identically."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests_support import run_biogen

pytestmark = pytest.mark.ray

BIOGEN = [sys.executable, "-m", "biogen.cli.main"]


def run(args, cwd, check=True, timeout=300):
    return run_biogen(*args, cwd=cwd, timeout=timeout, check=check)


def test_help_lists_jobs_and_job_help_shows_config(tmp_path):
    out = run(["--help"], tmp_path).stdout
    for job in ("library build", "library append", "library info", "library verify", "search", "screen",
                "train", "evaluate", "embed", "embed-search"):
        assert f"biogen {job} " in out
    out = run(["library", "build", "--help"], tmp_path).stdout
    assert "featurizer=ecfp4|ecfp6|fcfp4|morgan|rdkit|atompair|torsion|maccs" in out  # the job's own groups
    assert "chunk_size: 10000" in out
    assert "screen/" not in out and "train/" not in out  # other jobs' groups are not listed
    bad = run(["librari", "build"], tmp_path, check=False)
    assert bad.returncode == 2 and "unknown job 'librari'" in bad.stderr


def test_cfg_job_prints_composed_config(tmp_path):
    out = run(["library", "build", "input=x.smi", "output=lib", "featurizer=fcfp4", "--cfg", "job"], tmp_path).stdout
    assert "use_features: true" in out and "input: x.smi" in out
    assert not (tmp_path / "lib").exists()


def test_featurizer_typos_get_clear_errors(tmp_path, data_dir):
    p = run(["library", "build", f"input={data_dir / 'mixed.smi'}", "output=lib", "featurizer=ecfp44"], tmp_path, check=False)
    assert p.returncode != 0 and "ecfp4" in p.stderr and "fcfp4" in p.stderr  # Hydra lists the options
    p = run(["library", "build", f"input={data_dir / 'mixed.smi'}", "output=lib", "featurizer.type=morgn"], tmp_path, check=False)
    assert p.returncode == 2
    assert "featurizer.type='morgn' is not a fingerprint type; valid: morgan, rdkit, atompair, torsion, maccs" in p.stderr
    p = run(["library", "build", f"input={data_dir / 'mixed.smi'}", "output=lib", "featurizer.radious=3"], tmp_path, check=False)
    assert p.returncode != 0 and "radious" in p.stderr
    p = run(["library", "build", f"input={data_dir / 'mixed.smi'}", "output=lib", "+featurizer.radious=3"], tmp_path, check=False)
    assert p.returncode == 2 and "unknown featurizer key(s) ['radious']; valid keys:" in p.stderr
    p = run(["library", "build", "input=nope.smi", "output=lib"], tmp_path, check=False)
    assert p.returncode == 2 and "input file not found: nope.smi" in p.stderr


def test_build_info_verify_append_through_the_cli(tmp_path, data_dir):
    p = run(["library", "build", f"input=[{data_dir / 'mixed.smi'},{data_dir / 'small.sdf'}]", "output=lib",
             "chunk_size=3", "runtime=processes", "runtime.workers=2", "runtime.progress=false"], tmp_path)
    assert "read 15 records, added 8 molecules" in p.stdout + p.stderr
    run_dir = next((tmp_path / "runs" / "library_build").iterdir())
    cfg = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "chunk_size: 3" in cfg
    assert json.loads((run_dir / "report.json").read_text())["rows_added"] == 8
    info = json.loads(run(["library", "info", "library=lib", "format=json"], tmp_path).stdout)
    assert info["rows"] == 8 and info["history"][0]["action"] == "build"
    assert "molecules    8 in" in run(["library", "info", "library=lib"], tmp_path).stdout
    assert run(["library", "verify", "library=lib"], tmp_path).stdout.startswith("OK")
    run(["library", "append", "library=lib", f"input={data_dir / 'compounds.csv'}", "runtime=inline"], tmp_path)
    assert json.loads(run(["library", "info", "library=lib", "format=json"], tmp_path).stdout)["rows"] == 13
    # corrupt one shard: verify fails, names it, exits 1
    shard = sorted((tmp_path / "lib" / "shards").iterdir())[0]
    with open(shard / "popcnt.npy", "r+b") as fh:
        fh.seek(-1, 2)
        fh.write(b"\x7f")
    p = run(["library", "verify", "library=lib"], tmp_path, check=False)
    assert p.returncode == 1 and f"CORRUPT shard {shard.name}: popcnt.npy sha256 differs" in p.stdout
    p = run(["library", "info", "library=nolib"], tmp_path, check=False)
    assert p.returncode == 2 and "is not a biogen library" in p.stderr


def _moses_head(tmp_path, n):
    from biogen.datasets import dataset_path

    try:
        src = dataset_path("moses_test")
    except Exception as exc:
        pytest.skip(str(exc))
    path = tmp_path / "deposit.csv.gz"
    with gzip.open(src, "rt") as fh, gzip.open(path, "wt") as out:
        for _, line in zip(range(n + 1), fh):
            out.write(line)
    return path


def _shard_state(lib: Path):
    m = json.loads((lib / "manifest.json").read_text())
    return m["n_rows"], [(s["name"], s["rows"], s["files"]) for s in m["shards"]], (lib / "rejects" / "000-build.csv").read_bytes()


@pytest.mark.slow
def test_killed_build_resumes_to_identical_library(tmp_path):
    deposit = _moses_head(tmp_path, 3000)
    args = ["library", "build", f"input={deposit}", "chunk_size=150", "runtime.workers=2", "runtime.progress=false"]
    run(args + ["output=ref"], tmp_path)

    env = {**os.environ, "BIOGEN_RUNS_DIR": str(tmp_path / "runs"), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(BIOGEN + args + ["output=killed"], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ledger = tmp_path / "killed" / "_work" / "000-build" / "ledger.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if ledger.exists() and ledger.read_text().count('"outputs"') >= 4:  # 4 shards recorded
            break
        time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("the build never got going")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "manifest.json").exists()
    done_before = ledger.read_text().count('"outputs"')  # shard entries (events aside)
    assert 4 <= done_before < 40

    run(args + ["output=killed"], tmp_path)
    assert _shard_state(tmp_path / "killed") == _shard_state(tmp_path / "ref")
    m = json.loads((tmp_path / "killed" / "manifest.json").read_text())
    assert m["history"][0]["resumed_shard_steps"] >= done_before
    assert not (tmp_path / "killed" / "_work").exists()
    assert run(["library", "verify", "library=killed"], tmp_path).returncode == 0


def test_multirun_runs_every_job_and_fails_at_the_end(tmp_path, data_dir):
    run(["library", "build", f"input={data_dir / 'small.sdf'}", "output=good", "runtime=inline",
         "runtime.progress=false"], tmp_path)
    p = run(["library", "info", "-m", "library=missing,good", "format=json"], tmp_path, check=False)
    assert p.returncode != 0
    assert '"rows": 3' in p.stdout  # the second job ran although the first failed
    assert "missing is not a biogen library" in p.stderr
