"""Shared fixtures: tiny owned data, real shared data (skipped with a reason when absent),
one local Ray instance for the whole session."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from biogen.runtime import RuntimeSpec
from tests_support import apt_install, unavailable

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
SHARED = Path(os.environ.get("BIOGEN_SHARED_DATA", ROOT.parent / "shared" / "data"))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# dtype=auto's measured choice (biogen.precision) is cached per machine in ~/.cache/biogen: the
# tests, and the CLI and workers they start, keep theirs in a directory of this session
os.environ.setdefault("BIOGEN_DTYPE_CACHE", str(Path(tempfile.mkdtemp(prefix="biogen-test-")) / "cpu_dtype.json"))


MMSEQS_DB = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")


@pytest.fixture(scope="session")
def mmseqs_db() -> Path:
    """Debian's mmseqs2-examples: 20,000 real UniProt proteins (installed by the test setup)."""
    if not MMSEQS_DB.is_file():
        outcome = apt_install("mmseqs2-examples")
        if not MMSEQS_DB.is_file():
            unavailable(f"{MMSEQS_DB} not found ({outcome}); install it with "
                        "`apt-get install mmseqs2-examples` (as root)")
    return MMSEQS_DB


@pytest.fixture(scope="session")
def kiba():
    """KIBA as prepared by DeepDTA (../shared/data/dti/kiba): 118,254 pairs, 2,111 x 229."""
    from biogen.dti.data import read_kiba

    path = SHARED / "dti" / "kiba"
    if not path.is_dir():
        pytest.skip(f"KIBA not found at {path} (../shared/data beside the checkout; set BIOGEN_SHARED_DATA)")
    return read_kiba(path)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA


@pytest.fixture(scope="session")
def vs_benchmark() -> Path:
    path = SHARED / "vs-benchmark"
    if not path.is_dir():
        pytest.skip(f"real benchmark data not found at {path} (../shared/data beside the checkout; "
                    "set BIOGEN_SHARED_DATA to its location)")
    return path


@pytest.fixture(scope="session")
def moleculeace() -> None:
    """MoleculeACE's data (pip install --no-deps MoleculeACE==3.0.0; README command 2 installs it)."""
    from biogen.datasets import moleculeace_targets
    from biogen.errors import InputError

    try:
        moleculeace_targets()
    except InputError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance with 2 CPUs shared by all tests that use Ray."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def ray_rt(ray_local) -> RuntimeSpec:
    return RuntimeSpec(mode="local", workers=2, progress=False)


@pytest.fixture
def inline_rt() -> RuntimeSpec:
    return RuntimeSpec(mode="inline", progress=False)


@pytest.fixture
def copy_data(tmp_path):
    def _copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copy(DATA / name, dst)
        return dst
    return _copy
