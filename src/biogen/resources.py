"""Locate the files biogen ships beside its code: Hydra configs and CUDA kernel sources.

In an installed wheel they sit inside the package (``biogen/configs``,
``biogen/kernels/cuda_src``); in an editable checkout they sit at the repository root
(``configs/``, ``kernels/``). Both layouts are supported and tested.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _first_existing(*candidates: Path) -> Path:
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        "biogen's packaged resources are missing; looked in: "
        + ", ".join(str(c) for c in candidates)
        + ". Reinstall biogen (pip install .) from a complete checkout."
    )


@cache
def config_dir() -> Path:
    """Directory holding the Hydra configs (``library_build.yaml`` ...)."""
    return _first_existing(_PKG / "configs", _PKG.parents[1] / "configs")


@cache
def kernel_dir() -> Path:
    """Directory holding the CUDA C sources (``*.cu``) compiled by the CuPy backend."""
    return _first_existing(_PKG / "kernels" / "cuda_src", _PKG.parents[1] / "kernels")
