"""Read access to a library: manifest, per-shard metadata (Parquet) and fingerprints (mmap).

    lib = Library.open("mylib")
    for shard in lib.shards:
        fps = shard.fingerprints      # N x n_words uint64, memory-mapped, sorted by popcount
        pc = shard.popcounts          # N int32, non-decreasing
        meta = shard.metadata(["id", "smiles"])   # pyarrow.Table, same row order
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import CorruptLibraryError, LibraryError
from biogen.library.manifest import read_manifest


@dataclass(frozen=True)
class Shard:
    """One immutable shard: ``rows`` molecules sorted by popcount."""

    path: Path
    name: str
    rows: int
    n_words: int

    @cached_property
    def fingerprints(self) -> np.ndarray:
        """N x n_words ``<u8`` memory map (read-only)."""
        fp = np.load(self.path / "fp.npy", mmap_mode="r")
        if fp.ndim != 2 or fp.shape[1] != self.n_words:
            raise ValueError(f"{self.path}/fp.npy has shape {fp.shape}, expected (*, {self.n_words})")
        return fp

    @cached_property
    def popcounts(self) -> np.ndarray:
        """N ``int32`` popcounts, non-decreasing (memory map)."""
        return np.load(self.path / "popcnt.npy", mmap_mode="r")

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.path / "meta.parquet", columns=list(columns) if columns else None)

    def popcount_range(self, lo: int, hi: int) -> tuple[int, int]:
        """Row range [start, end) of the molecules whose popcount lies in [lo, hi]."""
        pc = self.popcounts
        return int(np.searchsorted(pc, lo, "left")), int(np.searchsorted(pc, hi, "right"))


class Library:
    """An opened library directory (read-only view of the manifest's shards)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self.featurizer = FingerprintSpec.from_dict(manifest["featurizer"])
        self.standardize = StandardizeSpec(**manifest["standardize"])
        self.shards = [
            Shard(self.path / "shards" / s["name"], s["name"], s["rows"], self.featurizer.n_words)
            for s in manifest["shards"]
        ]

    @classmethod
    def open(cls, path: str | Path) -> "Library":
        return cls(Path(path), read_manifest(Path(path)))

    @property
    def n_rows(self) -> int:
        return int(self.manifest["n_rows"])

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"Library({str(self.path)!r}, rows={self.n_rows}, shards={len(self.shards)})"

    def read_metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """All shards' metadata concatenated in shard order (row i = fingerprint row i)."""
        tables = [s.metadata(columns) for s in self.shards]
        if not tables:
            return pa.table({c: pa.array([], pa.string()) for c in (columns or ["id"])})
        return pa.concat_tables(tables)

    def iter_fingerprints(self) -> Iterator[tuple[Shard, np.ndarray, np.ndarray]]:
        """``(shard, fingerprints, popcounts)`` for each shard, memory-mapped."""
        for s in self.shards:
            yield s, s.fingerprints, s.popcounts

    @property
    def embedding_models(self) -> list[str]:
        """Models whose embeddings the library stores (complete or not)."""
        return sorted(self.manifest.get("embeddings") or {})

    def embedding_entry(self, model: str) -> dict:
        """The manifest entry of ``model``'s embeddings, checked complete; LibraryError naming
        the command that adds (or completes) them."""
        from biogen.library.embeddings import embedding_entry, missing_shards

        entry = embedding_entry(self.manifest, model)
        if entry is None:
            have = f" (it has: {', '.join(self.embedding_models)})" if self.embedding_models else ""
            raise LibraryError(f"library {self.path} has no {model} embeddings{have}; add them with: "
                               f"biogen library embed library={self.path} model={model}")
        missing = missing_shards(self.manifest, model)
        if missing:
            raise LibraryError(f"library {self.path}: {len(missing)} of {len(self.shards)} shards have no {model} "
                               f"embeddings yet (an append after the last embed?); complete them with: "
                               f"biogen library embed library={self.path} model={entry.get('source') or model}")
        return entry

    def iter_embeddings(self, model: str) -> Iterator[tuple[Shard, np.ndarray, np.ndarray]]:
        """``(shard, vectors, ok)`` for each shard: vectors N x dim memory-mapped (float16 or
        float32, NaN rows where ``ok`` is False), ok N bool."""
        from biogen.library.embeddings import shard_dir

        entry = self.embedding_entry(model)
        for s in self.shards:
            d = shard_dir(self.path, model, s.name)
            v = np.load(d / "vectors.npy", mmap_mode="r")
            if v.shape != (s.rows, entry["dim"]):
                raise CorruptLibraryError(f"{d}/vectors.npy has shape {v.shape}, expected ({s.rows}, {entry['dim']}); "
                                          f"run biogen library verify library={self.path}")
            yield s, v, np.load(d / "ok.npy")

    def fingerprints(self) -> np.ndarray:
        """All fingerprints in one in-memory array (copies; prefer ``iter_fingerprints``)."""
        if not self.shards:
            return np.zeros((0, self.featurizer.n_words), dtype="<u8")
        return np.concatenate([s.fingerprints for s in self.shards])
