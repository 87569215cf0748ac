"""Load the CUDA C kernels of ``kernels/*.cu`` with CuPy, compiled once per device.

CuPy is optional (``pip install 'biogen[cuda]'``); importing this module without it
works, calling it raises an error with the install command.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np

from biogen.errors import BiogenError
from biogen.resources import kernel_dir


def kernel_source(name: str) -> Path:
    """Path of ``kernels/<name>.cu`` (installed wheel or checkout)."""
    path = kernel_dir() / f"{name}.cu"
    if not path.is_file():
        known = sorted(p.stem for p in kernel_dir().glob("*.cu"))
        raise BiogenError(f"no CUDA kernel source {name}.cu; known: {', '.join(known)}")
    return path


def _cupy():
    try:
        import cupy
    except ImportError as exc:
        raise BiogenError(
            "the GPU path needs CuPy: pip install 'biogen[cuda]' (cupy-cuda12x) on a machine "
            f"with an NVIDIA driver ({exc})"
        ) from None
    return cupy


@cache
def _module(name: str, device_id: int):
    cp = _cupy()
    with cp.cuda.Device(device_id):
        return cp.RawModule(code=kernel_source(name).read_text(), options=("-std=c++17",))


def get_kernel(name: str, function: str):
    """The compiled ``function`` of ``kernels/<name>.cu`` on the current device (cached)."""
    cp = _cupy()
    return _module(name, cp.cuda.Device().id).get_function(function)


def gpu_popcounts(fps):
    """Row popcounts of an N x n_words uint64 array on the GPU (a CuPy or NumPy array)."""
    cp = _cupy()
    d = cp.ascontiguousarray(cp.asarray(fps, dtype=cp.uint64))
    n, n_words = d.shape
    out = cp.empty(n, dtype=cp.int32)
    if n:
        threads = 256
        blocks = min((n + threads - 1) // threads, 65535)
        get_kernel("popcount", "popcount_rows")((blocks,), (threads,), (d, np.int64(n), np.int32(n_words), out))
    return out
