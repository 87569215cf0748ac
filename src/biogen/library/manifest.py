"""``manifest.json``: what a library holds and how it was made.

Written atomically (temp file, fsync, rename). A shard appears in the manifest only
after all its files are complete, so a reader never sees a half-written shard.
"""

from __future__ import annotations

import json
import platform
from datetime import datetime, timezone
from pathlib import Path

from biogen.errors import LibraryError
from biogen.files import atomic_path

FORMAT = "biogen-library"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SHARD_FILES = ("meta.parquet", "fp.npy", "popcnt.npy")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def tool_versions() -> dict[str, str]:
    import numpy
    import pyarrow
    from rdkit import rdBase

    import biogen

    return {"biogen": biogen.__version__, "rdkit": rdBase.rdkitVersion, "numpy": numpy.__version__,
            "pyarrow": pyarrow.__version__, "python": platform.python_version()}


def write_manifest(lib_dir: Path, manifest: dict) -> None:
    manifest["updated"] = now_iso()
    with atomic_path(Path(lib_dir) / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(lib_dir: Path) -> dict:
    path = Path(lib_dir) / MANIFEST
    if not path.is_file():
        raise LibraryError(
            f"{lib_dir} is not a biogen library (no {MANIFEST}); build one with "
            "`biogen library build input=... output=...`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise LibraryError(f"{path} is not valid JSON ({exc}); restore it from a backup") from exc
    if manifest.get("format") != FORMAT:
        raise LibraryError(f"{path} is not a biogen library manifest (format={manifest.get('format')!r})")
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise LibraryError(
            f"{lib_dir} has library schema version {version}; this biogen reads version "
            f"{SCHEMA_VERSION}: upgrade biogen or rebuild the library"
        )
    return manifest


def committed_job_keys(manifest: dict) -> set[str]:
    """The job keys of every job the manifest records as done (builds, appends, merges and
    embedding runs): their work directories are leftovers, not unfinished jobs."""
    keys = {h.get("job_key") for h in manifest.get("history", [])}
    for entry in (manifest.get("embeddings") or {}).values():
        keys |= {r.get("job_key") for r in entry.get("runs", [])}
    return keys


def new_manifest(featurizer: dict, standardize: dict, descriptors: list[str], dedupe: str,
                 id_prefix: str, dedupe_key: str = "inchikey") -> dict:
    from rdkit import rdBase

    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "created": now_iso(),
        "updated": now_iso(),
        "featurizer": {**featurizer, "rdkit_version": rdBase.rdkitVersion},
        "standardize": standardize,
        "descriptors": descriptors,
        "dedupe": {"key": dedupe_key, "mode": dedupe},
        "id_prefix": id_prefix,
        "layout": {
            "shard_files": list(SHARD_FILES),
            "fingerprints": "fp.npy: N x n_words little-endian uint64, bit i = word i//64 bit i%64",
            "popcounts": "popcnt.npy: N int32",
            "order": "rows of a shard are sorted by (popcount, ordinal); meta.parquet rows align with fp.npy",
        },
        "n_rows": 0,
        "shards": [],
        "history": [],
    }
