"""Real data sets that pip packages ship, found on disk without importing the packages.

Used by the default main job (``input: ${dataset:moses_test}``) and by tests and
benchmarks. Nothing is downloaded; a missing package gets its install command.

``BIOGEN_DATA_DIR`` (or ``BIOGEN_DEVDATA``, the name the offline-bundle script of the
development machines uses) names a folder searched first for ``<name><suffix>`` (e.g.
``moses_train.csv.gz``, ``uniprot_20k.fasta.gz``): how a node without the packages (an
air-gapped GPU node given a small bundle, see ``benchmarks/gpu_bundle.sh``) finds the data.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from biogen.errors import InputError

DATA_DIR_VARS = ("BIOGEN_DATA_DIR", "BIOGEN_DEVDATA")
# name -> (distribution, path inside it, install command, description); distribution
# "debian:<package>" means a Debian package's file at that absolute path
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
    "uniprot_20k": ("debian:mmseqs2-examples", "/usr/share/doc/mmseqs2/example-data/DB.fasta.gz",
                    "apt-get install mmseqs2-examples", "20,000 UniProt proteins (FASTA, mmseqs2 examples)"),
}


def _from_data_dir(name: str, rel: str) -> Path | None:
    """``<name><suffixes of rel>`` in the folder named by BIOGEN_DATA_DIR (or BIOGEN_DEVDATA)."""
    suffix = "".join(Path(rel).suffixes)
    for var in DATA_DIR_VARS:
        folder = os.environ.get(var)
        if folder and (Path(folder) / f"{name}{suffix}").is_file():
            return Path(folder) / f"{name}{suffix}"
    return None


MOLECULEACE = ("MoleculeACE", "MoleculeACE/Data/benchmark_data", "pip install --no-deps MoleculeACE==3.0.0")


def _locate(dist: str, rel: str, install: str, what: str) -> Path:
    """A file or folder inside an installed distribution; InputError with the install command."""
    try:
        path = Path(metadata.distribution(dist).locate_file(rel))
    except metadata.PackageNotFoundError:
        raise InputError(f"{what} comes with the {dist} package; install it: {install}") from None
    if not path.exists():
        raise InputError(f"{what} not found at {path}; reinstall: {install}")
    return path


def _moleculeace_dir() -> Path:
    return _locate(*MOLECULEACE, "the MoleculeACE data")


def moleculeace_targets() -> list[str]:
    """The 30 MoleculeACE data sets, e.g. ``CHEMBL204_Ki`` (thrombin Ki)."""
    return sorted(p.stem for p in _moleculeace_dir().glob("CHEMBL*.csv"))


@dataclass(frozen=True)
class ActivitySet:
    """Measured activities of one target: SMILES, potency in nM, pActivity (-log10 molar)
    and MoleculeACE's train/test split (and activity-cliff flag)."""

    target: str
    smiles: list[str]
    nm: list[float]
    pactivity: list[float]
    split: list[str]
    cliff: list[bool]

    def subset(self, split: str) -> "ActivitySet":
        keep = [i for i, s in enumerate(self.split) if s == split]
        return ActivitySet(self.target, *([getattr(self, f)[i] for i in keep]
                                          for f in ("smiles", "nm", "pactivity", "split", "cliff")))

    def __len__(self) -> int:
        return len(self.smiles)


def load_moleculeace(target: str) -> ActivitySet:
    """One MoleculeACE data set (Ki or EC50 in nM, train/test split) as an ``ActivitySet``."""
    path = _moleculeace_dir() / f"{target}.csv"
    if not path.is_file():
        raise InputError(f"unknown MoleculeACE data set {target!r}; known: {', '.join(moleculeace_targets())}")
    cols: dict[str, list] = {k: [] for k in ("smiles", "nm", "pactivity", "split", "cliff")}
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            nm = float(row["exp_mean [nM]"])
            cols["smiles"].append(row["smiles"])
            cols["nm"].append(nm)
            cols["pactivity"].append(9.0 - math.log10(nm))
            cols["split"].append(row["split"])
            cols["cliff"].append(row["cliff_mol"] == "1")
    return ActivitySet(target, **cols)


def dataset_path(name: str) -> str:
    """Path of a packaged data set; ``InputError`` with the install command if missing.

    ``moleculeace:<target>`` names a MoleculeACE CSV (e.g. ``moleculeace:CHEMBL204_Ki``).
    """
    if name.startswith("moleculeace:"):
        target = name.split(":", 1)[1]
        path = _moleculeace_dir() / f"{target}.csv"
        if not path.is_file():
            raise InputError(f"unknown MoleculeACE data set {target!r}; known: {', '.join(moleculeace_targets())}")
        return str(path)
    if name not in DATASETS:
        raise InputError(f"unknown data set {name!r}; known: {', '.join(DATASETS)}")
    dist, rel, install, _ = DATASETS[name]
    found = _from_data_dir(name, rel)
    if found is not None:
        return str(found)
    if dist.startswith("debian:"):
        if not Path(rel).is_file():
            raise InputError(f"data set {name!r} ({rel}) not found; install it ({install}) or put it in the "
                             f"folder named by BIOGEN_DATA_DIR as {name}{''.join(Path(rel).suffixes)}")
        return rel
    return str(_locate(dist, rel, install, f"data set {name!r}"))
