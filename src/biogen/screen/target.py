"""The screen's target: known actives, activity data for QSAR training, and labels.

Sources (config group ``target``):
- ``moleculeace``: a MoleculeACE data set (installed package, e.g. ``CHEMBL204_Ki``):
  its train split gives the known actives (pActivity >= active_threshold) and the QSAR
  training data; its test split's actives are the held-out labels used to measure how
  well the screen recovers them.
- files: ``actives`` (SMILES/CSV/SDF of known actives), ``activities`` (CSV with SMILES
  and a measured value, for QSAR training) and ``labels`` (molecules known to be active,
  matched to the library by InChIKey, for enrichment metrics).

Every molecule is featurized with the library's own parameters; unparsable records go
to rejects with their reason, never silently dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rdkit import Chem, rdBase

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.readers import ReaderOptions
from biogen.chem.records import Reject
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError
from biogen.search.queries import Queries

log = logging.getLogger(__name__)
UNITS = ("nM", "uM", "pActivity")


@dataclass(frozen=True)
class TargetSpec:
    """Config group ``target``.

    name: label used in reports; moleculeace: a MoleculeACE data set name; actives,
    activities, labels: files (see module docstring); smiles_column / value_column: the
    activities CSV's columns (found by name when null); value_unit: nM | uM | pActivity;
    active_threshold: pActivity at or above which a compound counts as active (7 = 100 nM);
    sequence: the target protein's sequence; fasta: a FASTA file of one or more proteins
    (protein-aware scoring: the first protein is the target, the others a panel scored
    beside it); description: free text.
    """

    name: str = "target"
    moleculeace: str | None = None
    actives: str | None = None
    activities: str | None = None
    labels: str | None = None
    smiles_column: str | None = None
    value_column: str | None = None
    value_unit: str = "nM"
    active_threshold: float = 7.0
    sequence: str | None = None
    fasta: str | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.value_unit not in UNITS:
            raise ConfigError(f"target.value_unit={self.value_unit!r} is not valid; choose one of {', '.join(UNITS)}")
        if not (self.moleculeace or self.actives or self.activities or self.sequence or self.fasta):
            raise ConfigError("the target has no compounds and no protein: set target.moleculeace=<data set> (e.g. "
                              "CHEMBL204_Ki), target.actives=<file of known actives>, target.activities=<csv>, or "
                              "for protein-aware scoring target.sequence=<amino acids> / target.fasta=<file>")
        if self.fasta and not Path(self.fasta).is_file():
            raise ConfigError(f"target.fasta={self.fasta!r} not found; give a FASTA file of one or more proteins")


@dataclass
class TrainingSet:
    """Activity data for QSAR training: N SMILES, fingerprints (N x W), pActivity values."""

    name: str
    smiles: list[str]
    fps: np.ndarray
    y: np.ndarray


@dataclass
class TargetData:
    spec: TargetSpec
    actives: Queries | None                 # known actives, library featurizer
    training: TrainingSet | None
    label_keys: set[str] = field(default_factory=set)  # InChIKeys of molecules known to be active
    label_name: str = ""
    held_out_smiles: list[str] = field(default_factory=list)  # MoleculeACE test actives (spiked into presets)
    rejects: list[Reject] = field(default_factory=list)
    # canonical SMILES of the same molecules, standardized like the library: the labels of a
    # library deduplicated by SMILES (dedupe_key=smiles), which stores no InChIKeys
    label_smiles: set[str] = field(default_factory=set)


def inchikeys(smiles: list[str]) -> list[str | None]:
    out = []
    with rdBase.BlockLogs():  # not RDLogger.Disable/EnableLog: that re-enabled every level afterwards
        for s in smiles:
            m = Chem.MolFromSmiles(s)
            out.append(Chem.MolToInchiKey(m) if m is not None else None)
    return out


def _read_activities(path: str, spec: TargetSpec) -> tuple[list[str], list[float], list[Reject]]:
    """SMILES and pActivity of an activity file (the one reader: ``ActivityFileSource``)."""
    from biogen.models.data import ActivityFileSource

    if not Path(path).is_file():
        raise InputError(f"target.activities={path!r} not found; give a CSV with SMILES and activity columns")
    records, values, rejects, _ = ActivityFileSource(path=path, smiles_column=spec.smiles_column,
                                                     value_column=spec.value_column,
                                                     value_unit=spec.value_unit).read("target")
    return [r.text for r in records], [values[r.record][0] for r in records], rejects


def held_out_actives(spec: TargetSpec) -> list[str]:
    """SMILES of the MoleculeACE test-split actives (the held-out labels); [] for file targets.

    Cheap (no featurization): a preset library needs them before it is built."""
    if not spec.moleculeace:
        return []
    from biogen.datasets import load_moleculeace

    test = load_moleculeace(spec.moleculeace).subset("test")
    return [s for s, p in zip(test.smiles, test.pactivity) if p >= spec.active_threshold]


def load_target(spec: TargetSpec, featurizer: FingerprintSpec, standardize: StandardizeSpec,
                reader: ReaderOptions = ReaderOptions()) -> TargetData:
    """Known actives, training data and labels of ``spec``, featurized like the library."""
    rejects: list[Reject] = []
    actives = training = None
    label_keys: set[str] = set()
    label_smiles: set[str] = set()
    label_name = ""
    held_out: list[str] = []
    train_smiles: list[str] = []
    train_y: list[float] = []
    if spec.moleculeace:
        from biogen.datasets import load_moleculeace

        train = load_moleculeace(spec.moleculeace).subset("train")
        train_smiles, train_y = list(train.smiles), list(train.pactivity)
        held_out = held_out_actives(spec)
        label_keys = {k for k in inchikeys(held_out) if k}
        label_smiles = {s for s in Queries.from_smiles(held_out, featurizer, standardize).smiles if s} if held_out else set()
        label_name = (f"held-out {spec.moleculeace} test actives (pActivity >= {spec.active_threshold:g}), "
                      "not used for training")
    if spec.activities:
        smi, vals, bad = _read_activities(spec.activities, spec)
        train_smiles += smi
        train_y += vals
        rejects += bad
    if train_smiles:
        q = Queries.from_smiles(train_smiles, featurizer, standardize,
                                ids=[f"train{i + 1}" for i in range(len(train_smiles))])
        rejects += q.rejects
        keep = [int(i[5:]) - 1 for i in q.ids]
        y = np.asarray([train_y[i] for i in keep], dtype=np.float64)
        training = TrainingSet(spec.moleculeace or Path(spec.activities).name, [train_smiles[i] for i in keep], q.fps, y)
        if not spec.actives:
            act = y >= spec.active_threshold
            idx = np.flatnonzero(act)
            actives = Queries(q.fps[idx], [f"{spec.name}:active{i + 1}" for i in idx],
                              [train_smiles[keep[i]] for i in idx], featurizer)
    if spec.actives:
        actives = Queries.from_files(spec.actives, featurizer, standardize, reader)
        rejects += actives.rejects
    if spec.labels:
        lab = Queries.from_files(spec.labels, featurizer, standardize, reader)
        rejects += lab.rejects
        label_keys |= {k for k in inchikeys([s for s in lab.smiles if s]) if k}
        label_smiles |= {s for s in lab.smiles if s}
        label_name = label_name or f"known actives from {Path(spec.labels).name}"
    if actives is not None and len(actives) == 0:
        raise InputError(
            f"target {spec.name!r} has no usable known actives (0 of the given compounds"
            + (f" reach pActivity >= {spec.active_threshold:g}" if not spec.actives else " could be parsed")
            + "); lower target.active_threshold or give target.actives=<file>. "
            + (f"{len(rejects)} record(s) were rejected (see target_rejects.csv)" if rejects else ""))
    return TargetData(spec, actives, training, label_keys, label_name, held_out, rejects, label_smiles)
