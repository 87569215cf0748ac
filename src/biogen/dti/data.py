"""Drug–target interaction (DTI) data: measured (compound, protein, value) pairs.

Two readers, one result (``DTIData``):

- ``read_kiba(path)``: KIBA (Tang et al. 2014) as prepared by DeepDTA (``ligands_can.txt``,
  ``proteins.txt``: JSON objects in row/column order; ``kiba_binding_affinity_v2.txt``: a
  compounds x proteins matrix, ``nan`` where nothing was measured; ``folds/``: DeepDTA's
  random-pair folds as indices into the measured pairs taken row by row). Files may be
  gzipped. Higher KIBA scores bind more tightly in this transformed form; the active
  threshold is DeepDTA's 12.1.
- ``read_pairs(path)``: a CSV/TSV with one pair per line: SMILES, protein sequence (and
  optional compound and protein ids), value. Column names are found by common spellings
  (``smiles``; ``sequence``/``aa_sequence``; ``protein_id``/``prot_id``/``uniprot``;
  ``compound_id``/``ligand_id``; ``value``/``affinity``/``affinity_score``) or given.

Compounds are standardized and fingerprinted exactly as a library's molecules
(``MoleculeProcessor``), so a model trained on them scores a library built with the same
featurizer. Proteins are validated like FASTA records (biogen's protein alphabet). Nothing
is dropped silently: a record with a bad value, an unparsable SMILES or an invalid
sequence becomes a reject with its reason (line number for CSVs; for KIBA the compound's
or protein's position and how many measured pairs went with it), and every other pair is
kept.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.records import RawRecord, Reject
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import InputError

KIBA_ACTIVE_THRESHOLD = 12.1  # DeepDTA's convention for the transformed KIBA score
SMILES_COLUMNS = ("smiles", "compound_smiles", "canonical_smiles", "ligand_smiles", "drug")
SEQUENCE_COLUMNS = ("sequence", "aa_sequence", "protein_sequence", "target_sequence", "target")
PROTEIN_ID_COLUMNS = ("protein_id", "prot_id", "target_id", "uniprot", "uniprot_id", "accession")
COMPOUND_ID_COLUMNS = ("compound_id", "ligand_id", "drug_id", "chembl_id", "id")
VALUE_COLUMNS = ("value", "affinity", "affinity_score", "kiba", "kiba_score", "pkd", "pki", "pactivity", "label", "y")


@dataclass
class DTIData:
    """P measured pairs over C compounds and R proteins.

    compound_ids / smiles (standardized) / fps (C x W packed ``<u8``, the library layout);
    protein_ids / sequences (upper case); pairs: P x 2 int64 (compound row, protein row);
    y: P float32; pair_index: P int64, each pair's position in the source (KIBA: in the
    measured-pair order DeepDTA's folds index; CSV: the data line); folds: the source's own
    splits as positions into ``pairs`` (KIBA: ``{"test": ..., "train": [5 folds]}``), or None.
    """

    source: str
    compound_ids: list[str]
    smiles: list[str]
    fps: np.ndarray
    protein_ids: list[str]
    sequences: list[str]
    pairs: np.ndarray
    y: np.ndarray
    pair_index: np.ndarray
    featurizer: FingerprintSpec
    rejects: list[Reject] = field(default_factory=list)
    active_threshold: float | None = None
    folds: dict | None = None

    def __len__(self) -> int:
        return len(self.y)

    def keep_pairs(self, keep: np.ndarray, rejects: list[Reject] | None = None) -> "DTIData":
        """The data with only the pairs at positions ``keep`` (sorted); folds follow, rejects
        are extended with ``rejects``."""
        from dataclasses import replace

        keep = np.asarray(keep, dtype=np.int64)
        folds = None
        if self.folds:
            where = np.full(len(self.pairs), -1, np.int64)
            where[keep] = np.arange(len(keep))

            def remap(idx):
                p = where[np.asarray(idx, dtype=np.int64)]
                return p[p >= 0]

            folds = {**self.folds, "test": remap(self.folds["test"]), "train": [remap(f) for f in self.folds["train"]]}
        return replace(self, pairs=self.pairs[keep], y=self.y[keep], pair_index=self.pair_index[keep],
                       rejects=list(self.rejects) + list(rejects or []), folds=folds)

    def summary(self) -> str:
        return (f"{len(self):,} pairs, {len(self.compound_ids):,} compounds x {len(self.protein_ids):,} proteins "
                f"from {self.source} ({len(self.rejects)} rejected)")


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return open(path, encoding="utf-8")


def _find(d: Path, name: str) -> Path:
    for p in (d / name, d / f"{name}.gz"):
        if p.is_file():
            return p
    raise InputError(f"{d} has no {name} (or {name}.gz); a KIBA folder as prepared by DeepDTA holds ligands_can.txt, "
                     "proteins.txt and kiba_binding_affinity_v2.txt")


def _sequence_problem(seq: str) -> str | None:
    from biogen.protein.fasta import ALPHABET

    if not seq:
        return "empty sequence"
    bad = sorted(set(seq) - set(ALPHABET))
    return f"character(s) {''.join(bad)!r} outside the protein alphabet {ALPHABET}" if bad else None


def _featurize(source: str, smiles: list[str], featurizer: FingerprintSpec, standardize: StandardizeSpec):
    """(kept compound positions, standardized SMILES, packed fps, {position: (reason, detail)})."""
    from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec

    records = [RawRecord(source, i + 1, "smiles", s.strip(), s) for i, s in enumerate(smiles)]
    chunk = MoleculeProcessor(ProcessorSpec(featurizer, standardize, ()), identity=False).process(records)
    kept = np.asarray(chunk.record, dtype=np.int64) - 1
    failed = {r.record - 1: (r.reason, r.detail) for r in chunk.rejects}
    return kept, list(chunk.smiles), np.asarray(chunk.fps), failed


def read_kiba(path: str | Path, featurizer: FingerprintSpec = FingerprintSpec(),
              standardize: StandardizeSpec = StandardizeSpec()) -> DTIData:
    """KIBA from a DeepDTA-style folder (see the module docstring)."""
    d = Path(path)
    if not d.is_dir():
        raise InputError(f"train_data.path={d} is not a folder; point it at DeepDTA's data/kiba (ligands_can.txt, "
                         "proteins.txt, kiba_binding_affinity_v2.txt, folds/)")
    with _open_text(_find(d, "ligands_can.txt")) as fh:
        ligands = json.load(fh)
    with _open_text(_find(d, "proteins.txt")) as fh:
        proteins = json.load(fh)
    with _open_text(_find(d, "kiba_binding_affinity_v2.txt")) as fh:
        Y = np.loadtxt(fh, dtype=np.float64)
    if Y.shape != (len(ligands), len(proteins)):
        raise InputError(f"{d}: the affinity matrix is {Y.shape[0]} x {Y.shape[1]} but there are {len(ligands)} "
                         f"ligands and {len(proteins)} proteins; the files do not belong together")
    rows, cols = np.where(~np.isnan(Y))  # DeepDTA's measured-pair order (row by row)
    source = str(d)
    cids, smiles = list(ligands), list(ligands.values())
    kept, std, fps, failed = _featurize(f"{source}/ligands_can.txt", smiles, featurizer, standardize)
    rejects = []
    for i, (reason, detail) in sorted(failed.items()):
        n = int((rows == i).sum())
        rejects.append(Reject(f"{source}/ligands_can.txt", i + 1, reason,
                              f"compound {cids[i]}: {detail}; its {n} measured pair(s) are left out", smiles[i]))
    pids, seqs = list(proteins), [s.strip().upper() for s in proteins.values()]
    bad_p = {j: why for j, s in enumerate(seqs) if (why := _sequence_problem(s))}
    for j, why in sorted(bad_p.items()):
        n = int((cols == j).sum())
        rejects.append(Reject(f"{source}/proteins.txt", j + 1, "invalid_sequence",
                              f"protein {pids[j]}: {why}; its {n} measured pair(s) are left out", seqs[j][:200]))
    crow = np.full(len(cids), -1, np.int64)
    crow[kept] = np.arange(len(kept))
    keep_p = np.array([j not in bad_p for j in range(len(pids))])
    prow = np.cumsum(keep_p) - 1
    ok = (crow[rows] >= 0) & keep_p[cols]
    pos = np.flatnonzero(ok)
    pairs = np.stack([crow[rows[pos]], prow[cols[pos]]], axis=1)
    folds = _kiba_folds(d, len(rows), pos)
    return DTIData(source, [cids[i] for i in kept], std, fps, [p for p, k in zip(pids, keep_p) if k],
                   [s for s, k in zip(seqs, keep_p) if k], pairs, Y[rows[pos], cols[pos]].astype(np.float32),
                   pos.astype(np.int64), featurizer, rejects, KIBA_ACTIVE_THRESHOLD, folds)


def _kiba_folds(d: Path, n_measured: int, kept: np.ndarray) -> dict | None:
    """DeepDTA's folds as positions into the kept pairs (pairs left out drop from their fold)."""
    folds = d / "folds"
    if not folds.is_dir():
        return None
    where = np.full(n_measured, -1, np.int64)
    where[kept] = np.arange(len(kept))

    def positions(idx) -> np.ndarray:
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and (idx.min() < 0 or idx.max() >= n_measured):
            raise InputError(f"{folds}: a fold index is outside the {n_measured} measured pairs; the folds do not "
                             "belong to this affinity matrix")
        p = where[idx]
        return p[p >= 0]

    with _open_text(_find(folds, "test_fold_setting1.txt")) as fh:
        test = positions(json.load(fh))
    with _open_text(_find(folds, "train_fold_setting1.txt")) as fh:
        train = [positions(f) for f in json.load(fh)]
    return {"test": test, "train": train, "kind": "DeepDTA setting 1 (random pairs)"}


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path,
          required: bool = True) -> str | None:
    if wanted:
        if wanted not in columns:
            raise InputError(f"{path}: no column {wanted!r} for the {what}; columns are {', '.join(columns)}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    if required:
        raise InputError(f"{path}: no {what} column found (looked for {', '.join(candidates)}); name it with "
                         f"train_data.{what.replace(' ', '_')}_column=<column>")
    return None


@dataclass(frozen=True)
class KibaSource:
    """``train_data=kiba``: KIBA in DeepDTA's folder layout (``read_kiba``)."""

    source: str = "kiba"
    path: str = ""

    def load(self, featurizer: FingerprintSpec, standardize: StandardizeSpec) -> DTIData:
        return read_kiba(self.path, featurizer, standardize)


@dataclass(frozen=True)
class PairsSource:
    """``train_data=pairs``: drug-target pairs from a CSV/TSV (``read_pairs``; null columns
    are found by their usual names)."""

    source: str = "pairs"
    path: str = ""
    smiles_column: str | None = None
    sequence_column: str | None = None
    protein_id_column: str | None = None
    compound_id_column: str | None = None
    value_column: str | None = None
    active_threshold: float | None = None

    def load(self, featurizer: FingerprintSpec, standardize: StandardizeSpec) -> DTIData:
        return read_pairs(self.path, featurizer, standardize, smiles_column=self.smiles_column,
                          sequence_column=self.sequence_column, protein_id_column=self.protein_id_column,
                          compound_id_column=self.compound_id_column, value_column=self.value_column,
                          active_threshold=self.active_threshold)


def read_pairs(path: str | Path, featurizer: FingerprintSpec = FingerprintSpec(),
               standardize: StandardizeSpec = StandardizeSpec(), *, smiles_column: str | None = None,
               sequence_column: str | None = None, protein_id_column: str | None = None,
               compound_id_column: str | None = None, value_column: str | None = None,
               active_threshold: float | None = None) -> DTIData:
    """Pairs from a CSV/TSV (gz ok): one line per measured (compound, protein, value)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"train_data.path={p} does not exist")
    with _open_text(p) as fh:
        head = fh.readline()
        delim = "\t" if head.count("\t") > head.count(",") else ","
        fh.seek(0)
        reader = csv.reader(fh, delimiter=delim)
        columns = next(reader, None)
        if not columns:
            raise InputError(f"{p} is empty; expected a header line and one pair per line")
        c_smi = _pick(columns, smiles_column, SMILES_COLUMNS, "smiles", p)
        c_seq = _pick(columns, sequence_column, SEQUENCE_COLUMNS, "sequence", p)
        c_val = _pick(columns, value_column, VALUE_COLUMNS, "value", p)
        c_pid = _pick(columns, protein_id_column, PROTEIN_ID_COLUMNS, "protein id", p, required=False)
        c_cid = _pick(columns, compound_id_column, COMPOUND_ID_COLUMNS, "compound id", p, required=False)
        at = {c: columns.index(c) for c in (c_smi, c_seq, c_val, c_pid, c_cid) if c}
        lines = []
        rejects: list[Reject] = []
        for line_no, row in enumerate(reader, start=2):
            if not row or not any(x.strip() for x in row):
                continue
            raw = delim.join(row)
            if len(row) != len(columns):
                rejects.append(Reject(str(p), line_no, "bad_columns",
                                      f"{len(row)} fields, the header has {len(columns)}; fix the line", raw))
                continue
            try:
                v = float(row[at[c_val]])
                if not math.isfinite(v):
                    raise ValueError("not finite")
            except ValueError as exc:
                rejects.append(Reject(str(p), line_no, "bad_value",
                                      f"{c_val}={row[at[c_val]]!r} is not a finite number ({exc})", raw))
                continue
            seq = row[at[c_seq]].strip().upper()
            if why := _sequence_problem(seq):
                rejects.append(Reject(str(p), line_no, "invalid_sequence", f"{c_seq}: {why}", raw))
                continue
            smi = row[at[c_smi]].strip()
            lines.append((line_no, smi, seq, row[at[c_pid]].strip() if c_pid else None,
                          row[at[c_cid]].strip() if c_cid else None, v, raw))
    # unique compounds (by input SMILES) and proteins (by sequence), in first-seen order
    comp: dict[str, int] = {}
    prot: dict[str, int] = {}
    cid_of, pid_of = [], []
    for line_no, smi, seq, pid, cid, _, _ in lines:
        if smi not in comp:
            comp[smi] = len(comp)
            cid_of.append(cid or f"C{len(comp)}")
        if seq not in prot:
            prot[seq] = len(prot)
            pid_of.append(pid or f"P{len(prot)}")
    smiles = list(comp)
    kept, std, fps, failed = _featurize(str(p), smiles, featurizer, standardize)
    crow = np.full(len(smiles), -1, np.int64)
    crow[kept] = np.arange(len(kept))
    pairs, y, where = [], [], []
    for line_no, smi, seq, _, _, v, raw in lines:
        ci = comp[smi]
        if crow[ci] < 0:
            reason, detail = failed[ci]
            rejects.append(Reject(str(p), line_no, reason, detail, raw))
            continue
        pairs.append((crow[ci], prot[seq]))
        y.append(v)
        where.append(line_no)
    rejects.sort(key=lambda r: r.record)
    if not pairs:
        raise InputError(f"no usable pair in {p} ({len(rejects)} rejected: "
                         f"{', '.join(sorted({r.reason for r in rejects})) or 'no data lines'})")
    return DTIData(str(p), [cid_of[i] for i in kept], std, fps, pid_of, list(prot),
                   np.asarray(pairs, dtype=np.int64).reshape(-1, 2), np.asarray(y, dtype=np.float32),
                   np.asarray(where, dtype=np.int64), featurizer, rejects, active_threshold, None)
