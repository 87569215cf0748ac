"""Raw records -> standardized, identified, featurized rows (one chunk at a time).

This is the work of one Ray task. It never raises for a bad record: each failure
becomes a ``Reject`` with a reason code and RDKit's own message.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from rdkit import Chem, RDLogger, rdBase

from biogen.chem.descriptors import DESCRIPTORS, DescriptorCalculator
from biogen.chem.fingerprints import Fingerprinter, FingerprintSpec, pack_bits, popcounts
from biogen.chem.records import RawRecord, Reject
from biogen.chem.standardize import StandardizeSpec, Standardizer

STAGES = ("parse", "standardize", "identify", "fingerprint", "descriptors")


class _RDKitMessages(logging.Handler):
    """Collects RDKit error messages so a reject can quote them."""

    def __init__(self) -> None:
        super().__init__(level=logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage().strip()
        # RDKit prefixes "[hh:mm:ss] "; keep the message itself
        if msg.startswith("[") and "] " in msg[:12]:
            msg = msg.split("] ", 1)[1]
        self.messages.append(msg.strip())

    def take(self) -> str:
        text = "; ".join(m for m in self.messages if m)
        self.messages.clear()
        return text


_CAPTURE: _RDKitMessages | None = None


def capture_rdkit_errors() -> _RDKitMessages:
    """Route RDKit errors into a collector (once per process); silence its warnings."""
    global _CAPTURE
    if _CAPTURE is None:
        rdBase.LogToPythonLogger()
        RDLogger.DisableLog("rdApp.warning")
        RDLogger.DisableLog("rdApp.info")
        RDLogger.DisableLog("rdApp.debug")
        logger = logging.getLogger("rdkit")
        logger.propagate = False
        logger.setLevel(logging.ERROR)
        for h in list(logger.handlers):  # RDKit's own stderr handler: rejects carry the text
            logger.removeHandler(h)
        _CAPTURE = _RDKitMessages()
        logger.addHandler(_CAPTURE)
    return _CAPTURE


@dataclass(frozen=True)
class ProcessorSpec:
    """Everything that decides a row's content; hashed into the job key."""

    featurizer: FingerprintSpec
    standardize: StandardizeSpec
    descriptors: tuple[str, ...]

    def to_dict(self) -> dict:
        return {"featurizer": self.featurizer.to_dict(),
                "standardize": self.standardize.to_dict(),
                "descriptors": list(self.descriptors)}


@dataclass
class ProcessedChunk:
    """Rows that passed, column-wise (length N each), plus rejects and stage timings.

    fps: N x n_words ``<u8``; popcount: N ``int32``; descriptors: name -> N values.
    """

    source: list[str] = field(default_factory=list)
    record: list[int] = field(default_factory=list)
    id: list[str | None] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)
    inchikey: list[str] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    props: list[str | None] = field(default_factory=list)
    descriptors: dict[str, list] = field(default_factory=dict)
    fps: np.ndarray | None = None
    popcount: np.ndarray | None = None
    rejects: list[Reject] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    n_in: int = 0

    def __len__(self) -> int:
        return len(self.smiles)


class MoleculeProcessor:
    """identity=False skips the InChIKey (about 40% of a molecule's cost): for query and
    training molecules, which are featurized but never deduplicated."""

    def __init__(self, spec: ProcessorSpec, identity: bool = True):
        self.spec = spec
        self.identity = identity
        self.standardizer = Standardizer(spec.standardize)
        self.fingerprinter = Fingerprinter(spec.featurizer)
        self.descriptors = DescriptorCalculator(spec.descriptors)
        self._log = capture_rdkit_errors()

    def _parse(self, rec: RawRecord) -> tuple[Chem.Mol | None, str]:
        self._log.take()
        if rec.kind == "molblock":
            mol = Chem.MolFromMolBlock(rec.text, sanitize=True, removeHs=True)
        else:
            mol = Chem.MolFromSmiles(rec.text)
        if mol is None:
            return None, self._log.take() or "RDKit could not parse the record"
        return mol, ""

    def process(self, records: Sequence[RawRecord]) -> ProcessedChunk:
        out = ProcessedChunk(n_in=len(records))
        t = dict.fromkeys(STAGES, 0.0)
        names = self.spec.descriptors
        desc: list[list] = []
        bits = self.fingerprinter.new_bits(len(records))
        n = 0
        clock = time.perf_counter

        def reject(rec: RawRecord, code: str, detail: str) -> None:
            out.rejects.append(Reject(rec.source, rec.record, code, detail, rec.raw, rec.id))

        for rec in records:
            if rec.error is not None:
                reject(rec, *rec.error)
                continue
            if "\ufffd" in rec.raw:  # readers decode with errors="replace"
                reject(rec, "encoding_error", "the record is not valid UTF-8 (its id or text would be "
                       "changed); re-save the file as UTF-8 and append this record")
                continue
            t0 = clock()
            mol, msg = self._parse(rec)
            t1 = clock()
            t["parse"] += t1 - t0
            if mol is None:
                what = "SMILES" if rec.kind == "smiles" else "SDF molblock"
                reject(rec, "parse_error", f"invalid {what}: {msg}")
                continue
            if mol.GetNumAtoms() == 0:
                reject(rec, "empty_molecule", "the record holds no atoms")
                continue
            try:
                mol = self.standardizer(mol)
            except Exception as exc:  # RDKit raises many types; the record is rejected, not the job
                reject(rec, "standardize_error",
                       f"standardization failed ({type(exc).__name__}: {exc}); "
                       "try standardize.enabled=false for this deposit")
                continue
            t2 = clock()
            t["standardize"] += t2 - t1
            try:
                smiles = Chem.MolToSmiles(mol)
                self._log.take()
                inchikey = Chem.MolToInchiKey(mol) if self.identity else None
            except Exception as exc:
                reject(rec, "inchi_error", f"canonical SMILES / InChIKey failed ({type(exc).__name__}: {exc})")
                continue
            t3 = clock()
            t["identify"] += t3 - t2
            if self.identity and not inchikey:
                reject(rec, "inchi_error",
                       f"InChI could not be generated for {smiles}: {self._log.take() or 'no message'}")
                continue
            try:
                self.fingerprinter.fill(mol, bits[n])
                t4 = clock()
                values = self.descriptors(mol, smiles)
            except Exception as exc:
                bits[n] = 0
                reject(rec, "featurize_error", f"{type(exc).__name__}: {exc}")
                continue
            t5 = clock()
            t["fingerprint"] += t4 - t3
            t["descriptors"] += t5 - t4
            out.source.append(rec.source)
            out.record.append(rec.record)
            out.id.append(rec.id)
            out.smiles.append(smiles)
            out.inchikey.append(inchikey)
            out.raw.append(rec.raw)
            out.props.append(json.dumps(rec.props, sort_keys=True) if rec.props else None)
            desc.append(values)
            n += 1
        t0 = clock()
        out.fps = pack_bits(bits[:n])
        out.popcount = popcounts(out.fps)
        t["fingerprint"] += clock() - t0
        out.descriptors = {name: [row[j] for row in desc] for j, name in enumerate(names)}
        out.timings = t
        return out


def descriptor_arrow_types(names) -> dict[str, str]:
    return {n: DESCRIPTORS[n][0] for n in names}
