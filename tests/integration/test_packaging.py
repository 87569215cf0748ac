"""An installed (non-editable) wheel carries its configs and CUDA kernels, and Ray
workers of a job find them too."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow

PROBE = r"""
import json, os, ray
import biogen
from biogen.resources import config_dir, kernel_dir

def where():
    import biogen
    from biogen.resources import config_dir, kernel_dir
    from biogen.kernels.cuda import kernel_source
    return [biogen.__file__, str(config_dir()), str(kernel_dir()), kernel_source("popcount").read_text()[:40]]

ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
remote = ray.get(ray.remote(where).remote())
ray.shutdown()
print(json.dumps({"local": where(), "worker": remote}))
"""


def test_wheel_ships_configs_and_kernels_and_workers_find_them(tmp_path):
    wheels = tmp_path / "wheels"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    wheel = next(wheels.glob("biogen-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "biogen/configs/library_build.yaml" in names
    assert "biogen/configs/featurizer/ecfp4.yaml" in names
    assert "biogen/kernels/cuda_src/popcount.cu" in names
    site = tmp_path / "site"
    p = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "RAY_USAGE_STATS_ENABLED": "0", "HOME": str(tmp_path)}
    p = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    import json

    out = json.loads(p.stdout.strip().splitlines()[-1])
    for side in ("local", "worker"):
        module, configs, kernels, src = out[side]
        assert module.startswith(str(site)), (side, module)
        assert configs == str(site / "biogen" / "configs")
        assert kernels == str(site / "biogen" / "kernels" / "cuda_src")
        assert src.startswith("// popcount.cu")
