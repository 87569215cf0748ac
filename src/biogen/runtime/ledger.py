"""The resume ledger: one JSON line per finished shard, with the hash of its outputs.

A job is a list of shards with stable keys. When a shard's outputs are complete (written
to a temporary name and renamed), the runner appends ``{"key", "outputs", "sha256",
"stat", "result"}`` to ``ledger.jsonl`` and fsyncs it. The sha256 (of the outputs' names
and contents) and the stat (each output's size and modification time in ns) are taken by
the worker that wrote the files (``OutputRecord``, ``hashed_outputs``), so the driver never
reads a shard's data; in runtime=inline the ledger takes them itself. A rerun skips a
recorded shard only when each output still has its recorded size and modification time (a
stat per file, not a re-read: the resume of a billion-row build does not re-hash it;
``biogen library verify`` re-hashes); entries without a stat (older ledgers) are re-hashed.
So a kill at any point neither repeats a finished shard nor keeps a half-written or
rewritten one. The first line holds the job key (a hash of the parameters and inputs); a
ledger of another job is refused.

Besides shard entries the ledger holds *events* (``{"event": ...}``) that ``biogen status``
reads: ``start`` (a driver began or resumed the job: host, pid, command), ``plan`` (a phase
and its number of shards), ``retry`` (a shard's worker or node was lost; it runs again),
``failed`` (a shard's own error stopped the job) and ``complete``. Shard entries carry the
phase, the time they were recorded and their row count.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from biogen.errors import BiogenError, LibraryError
from biogen.files import hash_files

log = logging.getLogger(__name__)
COMMAND: str | None = None  # the command line of this job, set by the CLI (shown by `biogen status`)


@dataclass(frozen=True)
class OutputRecord:
    """A shard's outputs as its worker saw them just after writing: relative paths, one
    sha256 over names and contents (``files.hash_files``) and each file's [size, mtime_ns]."""

    paths: list[str]
    sha256: str
    stat: list[list[int]]


def output_stat(root: Path, relpaths: list[str]) -> list[list[int]]:
    out = []
    for rel in relpaths:
        st = os.stat(Path(root) / rel)
        out.append([st.st_size, st.st_mtime_ns])
    return out


def hashed_outputs(root: Path, relpaths: list[str]) -> OutputRecord:
    """The ``OutputRecord`` of files just written under ``root`` (run where they were written)."""
    return OutputRecord(list(relpaths), hash_files(Path(root), relpaths), output_stat(root, relpaths))


class HashingCall:
    """``fn(*args) -> (output relpaths, result)`` run in a worker, returning
    ``(OutputRecord, result)``: the outputs are hashed where they were written, in parallel
    across workers, not by the driver. Picklable when ``fn`` is."""

    def __init__(self, fn, root: Path):
        self.fn, self.root = fn, str(root)

    def __call__(self, *args):
        outputs, result = self.fn(*args)
        return hashed_outputs(Path(self.root), outputs), result


def shard_rows(result: dict) -> int | None:
    """The rows a shard's result reports in its ``rows`` key (every job's shards do), if any."""
    rows = result.get("rows")
    return rows if isinstance(rows, int) else None


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (boot id + clock ticks since boot; Linux): with the pid it
    names one process, so a reused pid is not taken for the driver."""
    try:
        ticks = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, IndexError):
        return None
    return f"{boot}:{ticks}"


def retries(events: list[dict]) -> list[dict]:
    """The ``retry`` events (a shard lost with its worker or node, run again), as reported."""
    return [{k: e.get(k) for k in ("key", "phase", "error", "attempt", "t")} for e in events if e["event"] == "retry"]


class StorageError(BiogenError):
    """Writing to the output directory failed (full disk, quota, read-only mount)."""


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
# numpy's ndarray.tofile (np.save) reports a short write without an errno: a full device
_SHORT_WRITE = re.compile(r"^\d+ requested and \d+ written$")


def is_storage_error(exc: BaseException) -> bool:
    """A write that failed for want of space or permission to write (full disk, quota,
    read-only filesystem), including numpy's errno-less short write."""
    return isinstance(exc, OSError) and (exc.errno in STORAGE_ERRNOS or (
        exc.errno is None and bool(_SHORT_WRITE.match(str(exc)))))


def storage_error(path: Path, exc: OSError) -> StorageError:
    why = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EROFS: "read-only filesystem"}.get(exc.errno, exc.strerror or str(exc))
    if exc.errno is None and _SHORT_WRITE.match(str(exc)):
        why = f"no space left on the device (a short write: {exc})"
    return StorageError(f"could not write {path}: {why}. Everything finished before this is kept; "
                        "free space (or raise the quota) and rerun the same command to resume")


class Entries(Mapping):
    """The ledger's shard entries by key, read from its file when asked for: in memory only
    each key's (offset, length) in the file (~0.2 KB), not the entry itself (its outputs'
    paths, hashes and stats and its result), so that a driver running 10^5 shards of
    several rounds keeps a few MB, not the ledger's GB."""

    def __init__(self, path: Path):
        self.path = path
        self._at: dict[str, tuple[int, int]] = {}

    def index(self, key: str, offset: int, length: int) -> None:
        self._at[key] = (offset, length)

    def __getitem__(self, key: str) -> dict:
        offset, length = self._at[key]
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return json.loads(fh.read(length))

    def __contains__(self, key: object) -> bool:
        return key in self._at

    def __iter__(self):
        return iter(self._at)

    def __len__(self) -> int:
        return len(self._at)


class Ledger:
    def __init__(self, path: Path, job_key: str, root: Path | None = None):
        """``root``: the directory shard outputs are relative to (default: the ledger's own)."""
        self.path = Path(path)
        self.root = Path(root) if root is not None else self.path.parent
        self.job_key = job_key
        self.entries = Entries(self.path)
        self.events: list[dict] = []
        if self.path.exists():
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"job_key": job_key})
        self.event("start", host=socket.gethostname(), pid=os.getpid(), pid_start=process_start(os.getpid()),
                   command=COMMAND, cwd=os.getcwd(), resumed=len(self.entries))

    def _load(self) -> None:
        with open(self.path, "rb") as fh:
            first = fh.readline()
            try:
                header = json.loads(first) if first.strip() else {}
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
            offset, cut = len(first), not first.endswith(b"\n")
            for line in fh:
                cut = not line.endswith(b"\n")
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    entry = {}  # a line cut by a kill: that shard is simply redone
                if "event" in entry:
                    self.events.append(entry)
                elif "key" in entry:
                    self.entries.index(entry["key"], offset, len(line))
                offset += len(line)
        if cut:  # a line cut by a kill: end it so the next entry stands alone
            with open(self.path, "a") as fh:
                fh.write("\n")

    def _append(self, obj: dict) -> tuple[int, int]:
        """Append one JSON line (fsynced); returns its (offset, length) in the file."""
        data = (json.dumps(obj, sort_keys=True, default=str) + "\n").encode()
        try:
            with open(self.path, "ab") as fh:
                offset = fh.seek(0, os.SEEK_END)
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        except OSError as exc:
            raise storage_error(self.path, exc) from exc
        return offset, len(data)

    def event(self, kind: str, **fields) -> None:
        """Append an event for ``biogen status``. Best effort: an event that cannot be written
        (the disk that just failed a shard is full) is logged, never raised."""
        obj = {"event": kind, "t": round(time.time(), 3), **{k: v for k, v in fields.items() if v is not None}}
        try:
            self._append(obj)
        except StorageError as exc:
            log.warning("ledger event %s not recorded: %s", kind, exc)
            return
        self.events.append(obj)

    def run_summary(self) -> dict:
        """What happened while the job ran (kept in the manifest of jobs whose ledger is removed
        when they commit): driver sessions, shards resumed, workers or nodes lost."""
        starts = [e for e in self.events if e["event"] == "start"]
        return {"driver_sessions": len(starts), "resumed_shards": starts[-1].get("resumed", 0) if starts else 0,
                "retries": retries(self.events)}

    def complete(self, **fields) -> None:
        """Mark the job complete (for jobs whose ledger stays in the output directory)."""
        self.event("complete", **fields)

    def done(self, key: str) -> dict | None:
        """The recorded result of ``key`` if its outputs are still intact, else ``None``."""
        entry = self.entries.get(key)
        if entry is None:
            return None
        outputs = entry["outputs"]
        if not all((self.root / rel).is_file() for rel in outputs):
            return None
        if "stat" in entry:  # size and mtime as written: a stat per file, no re-read
            return entry["result"] if output_stat(self.root, outputs) == entry["stat"] else None
        if hash_files(self.root, outputs) != entry["sha256"]:
            return None
        return entry["result"]

    def record(self, key: str, outputs: list[str] | OutputRecord, result: dict, phase: str | None = None) -> None:
        """Record a finished shard: ``outputs`` as its worker hashed them (``OutputRecord``),
        or relative paths that are hashed here (runtime=inline)."""
        rec = outputs if isinstance(outputs, OutputRecord) else hashed_outputs(self.root, outputs)
        entry = {"key": key, "outputs": rec.paths, "sha256": rec.sha256, "stat": rec.stat,
                 "result": result, "t": round(time.time(), 3)}
        if phase:
            entry["phase"] = phase
        rows = shard_rows(result)
        if rows is not None:
            entry["rows"] = rows
        self.entries.index(key, *self._append(entry))
