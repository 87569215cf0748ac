"""Shared helpers of the benchmark programs: machine and version facts for the JSON."""

from __future__ import annotations

import os
import platform

import numpy as np
import psutil
from rdkit import rdBase


def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": len(os.sched_getaffinity(0)), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "host": platform.node(), "os": platform.platform()}


def versions(*extra: str) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import pyarrow

    import biogen

    v = {"python": platform.python_version(), "rdkit": rdBase.rdkitVersion, "numpy": np.__version__,
         "pyarrow": pyarrow.__version__, "biogen": biogen.__version__}
    for name in ("ray", "fpsim2", "numba", "cupy-cuda12x", "cupy-cuda13x", *extra):
        try:
            v[name] = version(name)
        except PackageNotFoundError:
            v[name] = None
    return v
