"""Query sets: SMILES strings, files of molecules, or another library, featurized with
exactly the parameters stored in the searched library's manifest."""

from __future__ import annotations

import glob
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from biogen.chem.fingerprints import FingerprintSpec, popcounts
from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec
from biogen.chem.readers import ReaderOptions, inspect_input, iter_records, resolve_inputs
from biogen.chem.records import RawRecord, Reject
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import InputError, LibraryError

log = logging.getLogger(__name__)


@dataclass
class Queries:
    """Q query fingerprints with ids and SMILES.

    fps: Q x W ``<u8`` (library layout); popcount: Q int32; spec: the featurizer that
    made them (compared with the library's before any search); rejects: query records
    that could not be featurized (reported, never silently dropped).
    """

    fps: np.ndarray
    ids: list[str]
    smiles: list[str | None]
    spec: FingerprintSpec
    rejects: list[Reject] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fps = np.ascontiguousarray(self.fps, dtype=np.uint64).reshape(-1, self.spec.n_words)
        self.popcount = popcounts(self.fps)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def from_records(cls, records: list[RawRecord], spec: FingerprintSpec,
                     standardize: StandardizeSpec) -> "Queries":
        chunk = MoleculeProcessor(ProcessorSpec(spec, standardize, ()), identity=False).process(records)
        ids = [i if i is not None else f"q{r}" for i, r in zip(chunk.id, chunk.record)]
        return cls(chunk.fps, ids, list(chunk.smiles), spec, list(chunk.rejects))

    @classmethod
    def from_smiles(cls, smiles: list[str] | str, spec: FingerprintSpec,
                    standardize: StandardizeSpec, ids: list[str] | None = None) -> "Queries":
        """Queries from SMILES strings (ids ``q1, q2, ...`` unless given)."""
        smiles = [smiles] if isinstance(smiles, str) else list(smiles)
        ids = ids or [f"q{i + 1}" for i in range(len(smiles))]
        recs = [RawRecord("<query>", i + 1, "smiles", s.strip(), s, ids[i]) for i, s in enumerate(smiles)]
        return cls.from_records(recs, spec, standardize)

    @classmethod
    def from_files(cls, paths, spec: FingerprintSpec, standardize: StandardizeSpec,
                   reader: ReaderOptions | None = None) -> "Queries":
        """Queries from .smi/.csv/.tsv/.sdf files (gz ok); bad records become rejects."""
        reader = reader or ReaderOptions()
        records: list[RawRecord] = []
        for path in resolve_inputs(paths):
            records.extend(iter_records(inspect_input(path, reader), reader))
        if not records:
            raise InputError(f"query file(s) {paths} hold no records")
        return cls.from_records(records, spec, standardize)

    @classmethod
    def from_library(cls, library) -> "Queries":
        """Every molecule of another library (its stored fingerprints, ids and SMILES)."""
        meta = library.read_metadata(["id", "smiles"])
        return cls(library.fingerprints(), meta.column("id").to_pylist(),
                   meta.column("smiles").to_pylist(), library.featurizer)


def spec_mismatch(query: FingerprintSpec, library: FingerprintSpec) -> list[str]:
    """Differing featurizer fields as ``name: query=..., library=...`` (empty if equal)."""
    return [f"{f.name}: query={getattr(query, f.name)!r}, library={getattr(library, f.name)!r}"
            for f in fields(FingerprintSpec) if getattr(query, f.name) != getattr(library, f.name)]


def check_compatible(queries: Queries, spec: FingerprintSpec, what: str) -> None:
    diff = spec_mismatch(queries.spec, spec)
    if diff:
        raise LibraryError(
            f"the queries were featurized with other parameters than {what} ({'; '.join(diff)}); "
            "comparing them would give meaningless scores. Featurize the queries with the "
            "library's parameters (pass SMILES and biogen reads them from the manifest), or "
            "rebuild one of the libraries with the other's featurizer."
        )


def as_queries(query, spec: FingerprintSpec, standardize: StandardizeSpec,
               reader: ReaderOptions | None = None) -> Queries:
    """Turn ``query`` into Queries: a Queries object, a Library, a path (a library
    directory or a molecule file), a SMILES string, or a list of SMILES."""
    from biogen.library.store import Library

    if isinstance(query, Queries):
        return query
    if isinstance(query, Library):
        return Queries.from_library(query)
    if isinstance(query, (list, tuple)):
        return Queries.from_smiles(list(query), spec, standardize)
    if isinstance(query, (str, Path)):
        p = Path(str(query)).expanduser()
        if (p / "manifest.json").is_file():
            return Queries.from_library(Library.open(p))
        if p.is_file() or (glob.has_magic(str(query)) and glob.glob(str(p))):
            return Queries.from_files(str(query), spec, standardize, reader)
        if p.is_dir():
            raise InputError(f"query={query!r} is a directory without a manifest.json: not a library")
        q = Queries.from_smiles(str(query), spec, standardize)
        if q.rejects:
            raise InputError(
                f"query={query!r} is neither an existing file or library nor a valid SMILES "
                f"({q.rejects[0].detail}); check the path or the SMILES"
            )
        return q
    raise InputError(f"query of type {type(query).__name__} is not supported; give SMILES, a file or a library")
