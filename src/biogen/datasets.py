"""Real data sets that pip packages ship, found on disk without importing the packages.

Used by the default main job (``input: ${dataset:moses_test}``) and by tests and
benchmarks. Nothing is downloaded; a missing package gets its install command.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from biogen.errors import InputError

# name -> (distribution, path inside it, install command, description)
DATASETS: dict[str, tuple[str, str, str, str]] = {
    "moses_train": ("molsets", "moses/dataset/data/train.csv.gz", "pip install --no-deps molsets==0.3.1",
                    "MOSES train: 1,584,663 ZINC drug-like molecules (MIT)"),
    "moses_test": ("molsets", "moses/dataset/data/test.csv.gz", "pip install --no-deps molsets==0.3.1",
                   "MOSES test: 176,074 ZINC drug-like molecules (MIT)"),
    "moses_test_scaffolds": ("molsets", "moses/dataset/data/test_scaffolds.csv.gz",
                             "pip install --no-deps molsets==0.3.1", "MOSES scaffold test split"),
    "rdkit_egfr": ("rdkit", "rdkit/Contrib/PBF/testData/egfr.sdf", "pip install rdkit",
                   "365 DUD EGFR actives (SDF, BSD)"),
    "rdkit_cdk2": ("rdkit", "rdkit/Contrib/Fastcluster/testdata/cdk2.sdf", "pip install rdkit",
                   "47 CDK2 ligands with 3D coordinates (SDF, BSD)"),
}


def dataset_path(name: str) -> str:
    """Path of a packaged data set; ``InputError`` with the install command if missing."""
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    dist, rel, install, _ = DATASETS[name]
    try:
        path = Path(metadata.distribution(dist).locate_file(rel))
    except metadata.PackageNotFoundError:
        raise InputError(f"data set {name!r} comes with the {dist} package; install it: {install}") from None
    if not path.is_file():
        raise InputError(f"data set {name!r} not found at {path}; reinstall: {install}")
    return str(path)
