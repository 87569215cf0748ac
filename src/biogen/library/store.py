"""Read access to a library: manifest, per-shard metadata (Parquet) and fingerprints (mmap).

    lib = Library.open("mylib")
    for shard in lib.shards:
        fps = shard.fingerprints      # N x n_words uint64, memory-mapped, sorted by popcount
        pc = shard.popcounts          # N int32, non-decreasing
        meta = shard.metadata(["id", "smiles"])   # pyarrow.Table, same row order
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import CorruptLibraryError, LibraryError
from biogen.library.manifest import read_manifest


MAPPED = 1024  # shard files a Library keeps memory-mapped at once (each map holds a file descriptor)


class MapCache:
    """The memory maps of one opened library's shard files, the ``MAPPED`` most recently used
    kept open: a map holds a file descriptor (CPython's mmap keeps a duplicate), so caching
    every shard's maps made a process that reads all shards of a 10,000-shard library hold
    20,000 descriptors and fail ("Too many open files"); a map dropped here closes once no
    caller holds its array. Thread-safe (searches read shards from several threads)."""

    def __init__(self, size: int | None = None):
        self.size = size or MAPPED
        self._maps: OrderedDict[Path, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # pickled (sent to a worker) empty: maps are per process
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])

    def get(self, path: Path, load: Callable[[], np.ndarray]) -> np.ndarray:
        with self._lock:
            a = self._maps.get(path)
            if a is not None:
                self._maps.move_to_end(path)
                return a
        a = load()
        with self._lock:
            self._maps[path] = a
            while len(self._maps) > self.size:
                self._maps.popitem(last=False)
        return a


@dataclass(frozen=True)
class Shard:
    """One immutable shard: ``rows`` molecules sorted by popcount. Its arrays are memory
    maps held by ``maps`` (its library's bounded cache)."""

    path: Path
    name: str
    rows: int
    n_words: int
    maps: MapCache = field(default_factory=MapCache, compare=False, repr=False)

    @property
    def fingerprints(self) -> np.ndarray:
        """N x n_words ``<u8`` memory map (read-only)."""
        return self.maps.get(self.path / "fp.npy", self._load_fingerprints)

    def _load_fingerprints(self) -> np.ndarray:
        fp = np.load(self.path / "fp.npy", mmap_mode="r")
        if fp.ndim != 2 or fp.shape[1] != self.n_words:
            raise ValueError(f"{self.path}/fp.npy has shape {fp.shape}, expected (*, {self.n_words})")
        return fp

    @property
    def popcounts(self) -> np.ndarray:
        """N ``int32`` popcounts, non-decreasing (memory map)."""
        return self.maps.get(self.path / "popcnt.npy", lambda: np.load(self.path / "popcnt.npy", mmap_mode="r"))

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
        maps = MapCache()
        self.shards = [
            Shard(self.path / "shards" / s["name"], s["name"], s["rows"], self.featurizer.n_words, maps)
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
