"""The Riniker & Landrum virtual-screening benchmark (``vs-benchmark``): targets and molecules.

Layout (rdkit/benchmarking_platform ``compounds/``)::

    <root>/DUD/cmp_list_DUD_<target>_actives.dat.gz      one file per target
    <root>/DUD/cmp_list_DUD_<target>_decoys.dat.gz       decoys of that target
    <root>/ChEMBL/cmp_list_ChEMBL_<tid>_actives.dat.gz   100 actives per target
    <root>/ChEMBL/cmp_list_ChEMBL_zinc_decoys.dat.gz     10,000 decoys shared by all targets

Each file: gzipped, tab-separated, one ``#`` header line, columns external id, internal
id, SMILES.

**Valence policy.** 68 DUD SMILES (mostly fxa amidines written ``N=[CH+](N)...``, a
five-valent carbon) fail RDKit's valence check. ``invalid="partial"`` (default) keeps such
a molecule as written with partial sanitization (every step except the valence/property
check, so rings, aromaticity and the fingerprint invariants are defined) and records it
as a ``Note(status="partial")``; ``invalid="reject"`` drops it and records
``status="rejected"``. A SMILES that does not parse at all, or fails even partial
sanitization, is always rejected with its reason. Nothing is dropped silently: every note
is counted per target and written to the run's ``notes.csv``.
"""

from __future__ import annotations

import gzip
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rdkit import Chem, RDLogger

from biogen.chem.descriptors import DescriptorCalculator
from biogen.chem.fingerprints import Fingerprinter, FingerprintSpec
from biogen.errors import ConfigError, InputError
from biogen.screen.metrics import NULL_PROPERTIES

DATASETS = ("DUD", "ChEMBL")
INVALID_POLICIES = ("partial", "reject")
_ACTIVES = re.compile(r"^cmp_list_(?P<ds>DUD|ChEMBL)_(?P<target>.+)_actives\.dat\.gz$")
CHEMBL_DECOYS = "cmp_list_ChEMBL_zinc_decoys.dat.gz"
# The 50 ChEMBL targets of the platform's "data sets I" (configuration_file_I.py), the set
# of the 2013 paper and of the published similarity level; the other 30 come from "data
# sets II" (Riniker, Fechner & Landrum 2013, chosen to be harder) and are reported apart.
CHEMBL_SET_I = frozenset(str(t) for t in (
    11359, 28, 11536, 8, 10434, 12670, 20014, 234, 12261, 12209, 25, 36, 43, 219, 130, 105, 11336,
    20174, 126, 11225, 12252, 11682, 134, 116, 11265, 10475, 12679, 10579, 11575, 18061, 237, 276,
    11534, 10198, 10498, 12911, 12968, 100579, 100126, 10378, 10417, 10752, 10773, 11631, 10927,
    11085, 11442, 11279, 11488, 12840))


def target_groups(dataset: str, target: str) -> list[str]:
    """Report groups of a target: its dataset, ``ChEMBL-I`` for set I targets, and ``all``."""
    groups = [dataset]
    if dataset == "ChEMBL" and target in CHEMBL_SET_I:
        groups.append("ChEMBL-I")
    return groups + ["all"]


@dataclass(frozen=True)
class Note:
    """A record that was not used as-is: ``status`` is ``partial`` (kept) or ``rejected``."""

    file: str
    id: str
    smiles: str
    status: str
    reason: str


@dataclass
class CompoundList:
    """Molecules of one file that made it through parsing.

    ids: N internal ids; smiles: N SMILES; fps: fingerprint name -> N x W packed ``uint64``;
    props: the null model's properties (``biogen.screen.metrics.NULL_PROPERTIES``: heavy-atom
    count, MW) -> N float64; notes: partial and rejected records (rejected ones are not among the N).
    """

    ids: list[str]
    smiles: list[str]
    fps: dict[str, np.ndarray] = field(default_factory=dict)
    notes: list[Note] = field(default_factory=list)
    props: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)


def check_root(root: str | Path) -> Path:
    root = Path(root)
    if not (root / "DUD").is_dir() and not (root / "ChEMBL").is_dir():
        raise InputError(
            f"benchmark data not found at data_dir={str(root)!r} (expected DUD/ and ChEMBL/ folders of "
            "cmp_list_*.dat.gz files from rdkit/benchmarking_platform compounds/); set data_dir= or "
            "BIOGEN_SHARED_DATA to the folder holding vs-benchmark/"
        )
    return root


def list_targets(root: str | Path, dataset: str) -> list[str]:
    """Sorted target names of ``dataset`` (``DUD`` or ``ChEMBL``) found under ``root``."""
    if dataset not in DATASETS:
        raise ConfigError(f"dataset {dataset!r} is not known; valid: {', '.join(DATASETS)}")
    folder = check_root(root) / dataset
    if not folder.is_dir():
        raise InputError(f"no {dataset}/ folder under {root}")
    names = [m["target"] for p in folder.iterdir() if (m := _ACTIVES.match(p.name)) and m["ds"] == dataset]
    if not names:
        raise InputError(f"no cmp_list_{dataset}_*_actives.dat.gz files in {folder}")
    return sorted(names)


def target_files(root: str | Path, dataset: str, target: str) -> tuple[Path, Path]:
    """(actives file, decoys file) of one target."""
    folder = Path(root) / dataset
    actives = folder / f"cmp_list_{dataset}_{target}_actives.dat.gz"
    decoys = folder / (CHEMBL_DECOYS if dataset == "ChEMBL" else f"cmp_list_DUD_{target}_decoys.dat.gz")
    for p in (actives, decoys):
        if not p.is_file():
            raise InputError(f"{dataset} target {target!r}: file not found: {p}")
    return actives, decoys


def read_list(path: str | Path) -> list[tuple[str, str]]:
    """(internal id, SMILES) rows of a ``cmp_list_*.dat.gz`` file (header line skipped)."""
    rows = []
    with gzip.open(path, "rt") as fh:
        for line_no, line in enumerate(fh, 1):
            if line.startswith("#") or not line.strip():
                continue
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                raise InputError(f"{path}:{line_no}: expected 3 tab-separated columns, got {len(parts)}")
            rows.append((parts[1], parts[2]))
    return rows


def parse_smiles(smiles: str, invalid: str = "partial") -> tuple[Chem.Mol | None, str, str]:
    """(molecule or None, status ``ok|partial|rejected``, reason) under the valence policy."""
    if invalid not in INVALID_POLICIES:
        raise ConfigError(f"invalid={invalid!r} is not a policy; valid: {', '.join(INVALID_POLICIES)}")
    mol = Chem.MolFromSmiles(smiles)  # the standard path (sanitize, remove Hs, stereo), as RDKit users get
    if mol is not None:
        return mol, "ok", ""
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        return None, "rejected", "SMILES does not parse"
    try:
        Chem.SanitizeMol(mol)
        reason = "sanitization failed"
    except Exception as exc:  # AtomValenceException, KekulizeException, ...
        reason = f"{type(exc).__name__}: {exc}".split("\n")[0]
    if invalid == "reject":
        return None, "rejected", reason
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    mol.UpdatePropertyCache(strict=False)
    failed = Chem.SanitizeMol(mol, Chem.SanitizeFlags.SANITIZE_ALL ^ Chem.SanitizeFlags.SANITIZE_PROPERTIES,
                              catchErrors=True)
    if failed != Chem.SanitizeFlags.SANITIZE_NONE:
        return None, "rejected", f"{reason}; partial sanitization failed at {failed}"
    return mol, "partial", reason


def load_list(path: str | Path, specs: dict[str, FingerprintSpec], invalid: str = "partial") -> CompoundList:
    """Parse and fingerprint every record of one file (see the module's valence policy)."""
    path = Path(path)
    out = CompoundList([], [])
    mols = []
    RDLogger.DisableLog("rdApp.*")  # every problem is recorded as a Note instead
    try:
        for rid, smi in read_list(path):
            mol, status, reason = parse_smiles(smi, invalid)
            if status != "ok":
                out.notes.append(Note(path.name, rid, smi, status, reason))
            if mol is None:
                continue
            out.ids.append(rid)
            out.smiles.append(smi)
            mols.append(mol)
    finally:
        RDLogger.EnableLog("rdApp.*")
    out.fps = {name: Fingerprinter(spec).compute(mols) for name, spec in specs.items()}
    calc = DescriptorCalculator(NULL_PROPERTIES)
    values = np.array([calc(m) for m in mols], dtype=np.float64).reshape(len(mols), len(NULL_PROPERTIES))
    out.props = {name: values[:, i] for i, name in enumerate(NULL_PROPERTIES)}
    return out
