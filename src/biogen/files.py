"""File helpers every job shares: atomic writes, content hashes, job keys."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds, fsync it and rename
    it into place. Readers see the old file or the complete new one, never a partial one.
    The temporary name keeps the suffix (``np.save`` would otherwise append ``.npy``)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def hash_files(root: Path, relpaths: list[str]) -> str:
    """One sha256 over several files (name and content of each, in the given order)."""
    h = hashlib.sha256()
    for rel in relpaths:
        h.update(rel.encode() + b"\0" + sha256_file(root / rel).encode() + b"\n")
    return h.hexdigest()


def json_digest(obj: object) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys; objects JSON cannot write as their
    ``str``): the key of a job's resume ledger, of a cached preset, of a merge."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
