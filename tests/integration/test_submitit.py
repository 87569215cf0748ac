"""Hydra sweeps on SLURM through the submitit launcher, with the site's settings in a
`local/default.yaml` found through $BIOGEN_CONFIG_DIR (as configs/local/ would be in a
checkout), against the real single-node SLURM of the `slurm` fixture."""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import pytest

from tests_support import run_biogen

pytestmark = pytest.mark.slow


def test_sweep_runs_as_slurm_jobs_with_site_settings(slurm, data_dir, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'biogen[slurm]'")
    site = tmp_path / "site"
    (site / "local").mkdir(parents=True)
    (site / "local" / "default.yaml").write_text(f"""# @package _global_
defaults:
  - override /hydra/launcher: submitit_slurm
hydra:
  launcher:
    partition: {slurm.partition}
    timeout_min: 10
    cpus_per_task: 1
    name: biogen-sweep-test
""")
    env = {**slurm.env, "BIOGEN_CONFIG_DIR": str(site), "BIOGEN_RUNS_DIR": str(tmp_path / "runs"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{slurm.env.get('PATH', os.environ['PATH'])}"}
    # the site file is composed into every job: a plain run shows it (and still runs here)
    cfg = run_biogen("library", "build", "input=x.smi", "output=o", "--cfg", "hydra", cwd=tmp_path, env=env,
                     timeout=120)
    assert cfg.returncode == 0, cfg.stderr
    assert f"partition: {slurm.partition}" in cfg.stdout and "SlurmLauncher" in cfg.stdout

    p = run_biogen("library", "build", "-m", f"input={data_dir / 'mixed.smi'}", "featurizer=ecfp4,maccs",
                   f"output={tmp_path}/lib_${{featurizer.type}}", "runtime=inline", "runtime.progress=false",
                   cwd=tmp_path, env=env, timeout=420)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    libs = sorted(tmp_path.glob("lib_*"))
    assert [x.name for x in libs] == ["lib_maccs", "lib_morgan"]
    for lib in libs:
        m = json.loads((lib / "manifest.json").read_text())
        assert m["n_rows"] == 6
    # each sweep job ran as a SLURM job of its own, which SLURM saw complete
    sweep = next((tmp_path / "runs").glob("library_build-multirun/*"))
    tasks = sorted(p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert len(tasks) == 2  # one SLURM array job, a task per sweep point
    for task in tasks:
        # submitit has the result once the task's Python is done; SLURM may still be ending the job
        assert slurm.wait(task, timeout=120) == ("COMPLETED", 0)
        assert slurm.job(task)["JobName"] == "biogen-sweep-test"
