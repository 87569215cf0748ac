"""CUDA kernels: compiled by nvcc in every test run; run on a GPU when one is present."""

import shutil
import subprocess

import numpy as np
import pytest

from biogen.chem.fingerprints import popcounts
from biogen.resources import kernel_dir

KERNELS = sorted(kernel_dir().glob("*.cu"))


def test_kernel_sources_exist_and_state_their_contract():
    assert KERNELS, f"no kernels in {kernel_dir()}"
    for path in KERNELS:
        head = path.read_text()[:2000]
        assert "Contract" in head and "inputs" in head and "output" in head, path


@pytest.mark.parametrize("path", KERNELS, ids=lambda p: p.name)
def test_nvcc_compiles(path, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not on PATH: install the CUDA toolkit to compile-check kernels/*.cu")
    for arch in ("sm_80", "sm_90"):
        out = tmp_path / f"{path.stem}.{arch}.cubin"
        p = subprocess.run([nvcc, f"-arch={arch}", "-std=c++17", "--cubin", "-Werror", "all-warnings",
                            "-o", str(out), str(path)], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert out.stat().st_size > 0


def _cupy_or_skip():
    cp = pytest.importorskip("cupy", reason="cupy not installed (pip install 'biogen[cuda]')")
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except cp.cuda.runtime.CUDARuntimeError as exc:
        pytest.skip(f"no usable CUDA device: {exc}")
    return cp


@pytest.mark.gpu
def test_gpu_popcounts_match_cpu():
    cp = _cupy_or_skip()
    from biogen.kernels.cuda import gpu_popcounts

    rng = np.random.default_rng(7)
    fps = rng.integers(0, 2**63, size=(100_003, 32), dtype=np.uint64) & rng.integers(0, 2**63, size=(100_003, 32), dtype=np.uint64)
    got = cp.asnumpy(gpu_popcounts(fps))
    np.testing.assert_array_equal(got, popcounts(fps))
    assert gpu_popcounts(np.zeros((0, 32), np.uint64)).shape == (0,)


def test_missing_cupy_or_kernel_gives_clear_errors(monkeypatch):
    from biogen.errors import BiogenError
    from biogen.kernels import cuda

    with pytest.raises(BiogenError, match="no CUDA kernel source nope.cu; known: popcount"):
        cuda.kernel_source("nope")
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **kw):
        if name == "cupy":
            raise ImportError("No module named 'cupy'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(BiogenError, match=r"pip install 'biogen\[cuda\]'"):
        cuda.gpu_popcounts(np.zeros((1, 32), np.uint64))
