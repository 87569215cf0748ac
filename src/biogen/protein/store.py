"""The embedding store: pooled (and optionally per-residue) protein embeddings in shards.

Layout of a store directory::

    manifest.json              format, schema version, model (name, architecture, checkpoint
                               path + sha256, source format), layers, pooling, dtype, long-sequence
                               policy, input sha256s, counts, per-shard sha256 + rows, versions
    shards/<name>/meta.parquet key (sha256 of the sequence), length, truncated, chunks, ids
                               (every input id carrying that sequence), residue offsets
    shards/<name>/<vector>.npy rows x E float32 per pooled vector, e.g. mean_L33.npy, bos_L33.npy
    shards/<name>/res_L33.npy  (per_residue) all residues of the shard x E, rows sliced by offsets
    rejects.csv                FASTA records that could not be used, with reasons

One row per unique sequence; ``ids`` maps back to every input id. Shards are written to
a temporary name and renamed when complete; the manifest is written last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.errors import InputError, LibraryError

FORMAT = "biogen-embeddings"
SCHEMA_VERSION = 1


def pooled_vectors(result: dict, pooling: str) -> dict[str, np.ndarray]:
    """An ``Embedder`` result's pooled vectors by store name: ``<pooling>_L<layer>`` (with
    pooling=both the result holds {"mean": v, "bos": v} per layer)."""
    out = {}
    for layer, value in result["pooled"].items():
        for kind, v in (value.items() if isinstance(value, dict) else [(pooling, value)]):
            out[f"{kind}_L{layer}"] = v
    return out


@dataclass(frozen=True)
class EmbeddingShard:
    path: Path
    name: str
    rows: int

    def vectors(self, name: str) -> np.ndarray:
        """rows x E float32 (memory map) of one pooled vector, e.g. ``mean_L33``."""
        return np.load(self.path / f"{name}.npy", mmap_mode="r")

    def meta(self, columns=None) -> pa.Table:
        return pq.read_table(self.path / "meta.parquet", columns=columns)

    def residues(self, layer: int, row: int) -> np.ndarray:
        """length x E per-residue embeddings of one row (store built with per_residue)."""
        meta = self.meta(["res_offset", "res_length"])
        off = meta.column("res_offset")[row].as_py()
        n = meta.column("res_length")[row].as_py()
        return np.load(self.path / f"res_L{layer}.npy", mmap_mode="r")[off: off + n]


class EmbeddingStore:
    """An opened embedding store (read-only)."""

    def __init__(self, path: Path, manifest: dict):
        self.path = path
        self.manifest = manifest
        self.shards = [EmbeddingShard(path / "shards" / s["name"], s["name"], s["rows"]) for s in manifest["shards"]]

    @classmethod
    def open(cls, path: str | Path) -> "EmbeddingStore":
        path = Path(path)
        mf = path / "manifest.json"
        if not mf.is_file():
            raise InputError(f"{path} is not an embedding store (no manifest.json); build one with `biogen embed`")
        manifest = json.loads(mf.read_text())
        if manifest.get("format") != FORMAT:
            raise InputError(f"{path}/manifest.json is not a biogen embedding store (format "
                             f"{manifest.get('format')!r}); build one with `biogen embed`")
        if manifest.get("schema_version", 0) > SCHEMA_VERSION:
            raise LibraryError(f"{path} was written by a newer biogen (schema {manifest['schema_version']}); upgrade")
        return cls(path, manifest)

    def __len__(self) -> int:
        return int(self.manifest["n_sequences"])

    @property
    def vector_names(self) -> list[str]:
        return list(self.manifest["vectors"])

    def default_vector(self) -> str:
        return self.vector_names[0]

    def vectors(self, name: str | None = None) -> np.ndarray:
        """All rows of one pooled vector (N x E float32), in shard order."""
        name = name or self.default_vector()
        if name not in self.vector_names:
            raise InputError(f"{self.path} has no vector {name!r}; it has {', '.join(self.vector_names)}")
        parts = [np.asarray(s.vectors(name)) for s in self.shards]
        return np.concatenate(parts) if parts else np.zeros((0, self.manifest["dim"]), np.float32)

    @cached_property
    def keys(self) -> list[str]:
        return [k for s in self.shards for k in s.meta(["key"]).column("key").to_pylist()]

    @cached_property
    def ids(self) -> list[list[str]]:
        """Per row, every input id that carries the row's sequence."""
        return [ids for s in self.shards for ids in s.meta(["ids"]).column("ids").to_pylist()]

    def by_id(self) -> dict[str, int]:
        """input id -> row."""
        return {i: r for r, ids in enumerate(self.ids) for i in ids}
