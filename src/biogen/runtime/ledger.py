"""The resume ledger: one JSON line per finished shard, with the hash of its outputs.

A job is a list of shards with stable keys. When a shard's outputs are complete (written
to a temporary name and renamed), the runner appends ``{"key", "outputs", "sha256",
"result"}`` to ``ledger.jsonl`` and fsyncs it. A rerun re-hashes the outputs of each
recorded shard and skips it only when they still match; so a kill at any point neither
repeats a finished shard nor keeps a half-written one. The first line holds the job key
(a hash of the parameters and inputs); a ledger of another job is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from biogen.errors import LibraryError


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


class Ledger:
    def __init__(self, path: Path, job_key: str, root: Path | None = None):
        """``root``: the directory shard outputs are relative to (default: the ledger's own)."""
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.job_key = job_key
        self.entries: dict[str, dict] = {}
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"job_key": job_key})

    def _load(self) -> None:
        with open(self.path) as fh:
            text = fh.read()
        lines = text.splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if not header:  # killed before the header was written: nothing was done yet
            self.path.write_text(json.dumps({"job_key": self.job_key}) + "\n")
            return
        if header.get("job_key") != self.job_key:
            raise LibraryError(
                f"{self.root} holds an interrupted job with other parameters, inputs or tool "
                "versions; rerun that job's command to finish it, or delete "
                f"{self.root} to abandon it (for a build, overwrite=true starts over)"
            )
        if not text.endswith("\n"):  # a line cut by a kill: end it so the next entry stands alone
            with open(self.path, "a") as fh:
                fh.write("\n")
        for line in lines[1:]:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: that shard is simply redone
            self.entries[entry["key"]] = entry

    def _append(self, obj: dict) -> None:
        with open(self.path, "a") as fh:
            fh.write(json.dumps(obj, sort_keys=True) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def done(self, key: str) -> dict | None:
        """The recorded result of ``key`` if its outputs are still intact, else ``None``."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        outputs = entry["outputs"]
        if not all((self.root / rel).is_file() for rel in outputs):
            return None
        if hash_files(self.root, outputs) != entry["sha256"]:
            return None
        return entry["result"]

    def record(self, key: str, outputs: list[str], result: dict) -> None:
        entry = {"key": key, "outputs": outputs, "sha256": hash_files(self.root, outputs),
                 "result": result}
        self._append(entry)
        self.entries[key] = entry
