"""The library write path's public parts, shared by build, append and merge (and the stores
that come next): the work directory (lock, JSON-lines files, cleanup), the part layout
(``parts/NNNNNN.parquet`` + ``.fp.npy`` + rejects), the driver's dedupe planner, the shard
writer (``finalize_part``: kept rows -> one popcount-sorted shard) and the rejects file.

A job's parts live in ``<library>/_work/<job>/parts/`` until the job commits; each part is
one chunk of input records (build, append) or one shard of a piece (merge), in input order.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.chem.fingerprints import popcounts
from biogen.chem.readers import InputInfo
from biogen.chem.records import Reject
from biogen.errors import LibraryError
from biogen.files import atomic_path, sha256_file
from biogen.library.manifest import MANIFEST, SHARD_FILES, committed_job_keys

log = logging.getLogger(__name__)
# what identifies a compound: InChIKey (standard, ~230 us per molecule to compute, more than
# parsing and fingerprinting together) or the canonical SMILES (no InChIKey column)
DEDUPE_KEYS = ("inchikey", "smiles")
KEY_NAMES = {"inchikey": "InChIKey", "smiles": "canonical SMILES"}
DUPLICATE_REASONS = tuple(f"duplicate_{k}" for k in DEDUPE_KEYS)
WORK = "_work"


def part_stem(part: int) -> str:
    return f"parts/{part:06d}"


def write_part(work: Path, part: int, columns: dict[str, pa.Array], fps: np.ndarray) -> list[str]:
    """One part's table and fingerprints (atomically); returns their paths relative to ``work``.
    ``columns``: ``PART_COLUMNS`` then the library's descriptor columns."""
    stem = part_stem(part)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    with atomic_path(work / f"{stem}.parquet") as tmp:
        pq.write_table(pa.table(columns), tmp, compression="zstd")
    with atomic_path(work / f"{stem}.fp.npy") as tmp:
        np.save(tmp, np.ascontiguousarray(fps))
    return [f"{stem}.parquet", f"{stem}.fp.npy"]


PART_COLUMNS = (("source", pa.string()), ("record", pa.int64()), ("id", pa.string()), ("smiles", pa.string()),
                ("inchikey", pa.string()), ("raw", pa.string()), ("props", pa.string()))


def empty_part_columns(descriptor_types: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    return {**{c: pa.array([], t) for c, t in PART_COLUMNS}, **{c: pa.array([], t) for c, t in descriptor_types.items()}}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def generated_id(prefix: str, serial: int) -> str:
    """The id a record without one gets: ``{prefix}{serial:09d}`` (serial = ordinal + 1)."""
    return f"{prefix}{serial:09d}"


def generated_id_pattern(prefix: str) -> re.Pattern:
    """Ids of the generated form; group 1 is the serial."""
    return re.compile(re.escape(prefix) + r"(\d{9})")


@dataclass(frozen=True)
class Drop:
    """A row of a part that the dedupe planner drops: why, and for a duplicate its identity
    key and the id of the row kept instead (the reject's machine-readable fields)."""

    row: int
    reason: str
    detail: str
    key: str | None = None
    duplicate_of: str | None = None


@dataclass
class DedupePlan:
    """The planner's decision for one part: which rows are kept, with which ids and
    ordinals, and which are dropped."""

    part: int
    keep: np.ndarray            # bool, one per row of the part
    ids: list[str]              # one per row ("" for a dropped row)
    dup_of: list[str | None]    # one per row: the id of the kept first occurrence (keep_all)
    ordinals: np.ndarray        # one per kept row
    drops: list[Drop]


@dataclass
class FinalizeTask:
    """A shard-writing task: the work and library directories, the new shard's name, the plan
    (or what loads it: ``dedupe.PlannedPart``)."""

    work: str
    lib_dir: str
    shard_name: str
    plan: DedupePlan | object


def finalize_part(task: FinalizeTask):
    """Phase-3 task: kept rows of a part -> one popcount-sorted shard; dropped -> rejects."""
    t0 = time.perf_counter()
    # the serial planner's plan, or a partitioned dedupe's (``dedupe.PlannedPart``) made here
    plan = task.plan if isinstance(task.plan, DedupePlan) else task.plan.load()
    work, lib_dir = Path(task.work), Path(task.lib_dir)
    shard_name, ids, dup_of, ordinals = task.shard_name, plan.ids, plan.dup_of, plan.ordinals
    stem = f"parts/{plan.part:06d}"
    table = pq.read_table(work / f"{stem}.parquet")
    fps = np.load(work / f"{stem}.fp.npy")
    rejects = []
    if plan.drops:
        src, rec, raw = (table.column(c).to_pylist() for c in ("source", "record", "raw"))
        rid = table.column("id").to_pylist()
        rejects = [asdict(Reject(src[d.row], rec[d.row], d.reason, d.detail, raw[d.row], rid[d.row], d.key,
                                 d.duplicate_of)) for d in plan.drops]
    write_jsonl(work / f"{stem}.dropped.jsonl", rejects)
    outputs = [f"{stem}.dropped.jsonl"]
    result = {"shard": None, "rows": 0}
    idx = np.flatnonzero(plan.keep)
    if len(idx):
        fps = fps[idx]
        pc = popcounts(fps)
        order = np.lexsort((ordinals, pc))  # by popcount, then by ordinal
        kept = table.take(pa.array(idx)).drop_columns(["raw"])
        meta = pa.table({
            "id": pa.array([ids[idx[i]] for i in order], pa.string()),
            "smiles": kept.column("smiles").take(order),
            "inchikey": kept.column("inchikey").take(order),
            "ordinal": pa.array(ordinals[order], pa.int64()),
            "source": kept.column("source").take(order),
            "record": kept.column("record").take(order),
            "duplicate_of": pa.array([dup_of[idx[i]] for i in order], pa.string()),
            # the record came without an id and got {id_prefix}{serial:09d} (library merge renumbers those)
            "id_generated": pac.is_null(kept.column("id")).take(order),
            **{c: kept.column(c).take(order) for c in kept.column_names
               if c not in ("id", "smiles", "inchikey", "source", "record", "props")},
            "props": kept.column("props").take(order),
        })
        final, files = _publish_shard(lib_dir / "shards", shard_name, meta, fps[order], pc[order])
        rel = os.path.relpath(final, work)
        outputs += [f"{rel}/{f}" for f in SHARD_FILES]
        result = {"shard": {"name": shard_name, "rows": int(len(idx)),
                            "popcount_min": int(pc.min()), "popcount_max": int(pc.max()),
                            "files": files}, "rows": int(len(idx))}
    result["seconds"] = time.perf_counter() - t0
    return outputs, result


def _publish_shard(shards: Path, name: str, meta: pa.Table, fps: np.ndarray, pc: np.ndarray) -> tuple[Path, dict]:
    """Write a shard's files to ``.tmp-<name>``, fsync them, rename it into place; their
    sha256 and sizes (the manifest's ``files``)."""
    final = shards / name
    if final.exists():  # left by a kill between rename and ledger record: redo it
        shutil.rmtree(final)
    tmp = shards / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(meta, tmp / "meta.parquet", compression="zstd")
    np.save(tmp / "fp.npy", np.ascontiguousarray(fps))
    np.save(tmp / "popcnt.npy", pc)
    for f in SHARD_FILES:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    os.rename(tmp, final)
    return final, {f: {"sha256": sha256_file(final / f), "bytes": (final / f).stat().st_size} for f in SHARD_FILES}


@contextmanager
def locked(lib_dir: Path) -> Iterator[None]:
    lib_dir.mkdir(parents=True, exist_ok=True)
    with open(lib_dir / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise LibraryError(f"{lib_dir} is being written by another biogen job; wait for it") from None
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def duplicate_detail(key: str, kept_id: str, key_kind: str = "inchikey") -> str:
    """The rejects-file detail of a ``duplicate_<key_kind>`` reject (``library merge`` parses it back)."""
    return f"same compound ({KEY_NAMES[key_kind]} {key}) as library id {kept_id}"


@dataclass
class Dedupe:
    """Driver-side dedupe state, carried across parts in input order."""

    first: dict[str, str]  # dedupe key -> id of its first occurrence
    ids: set[str]
    ordinal: int
    mode: str
    id_prefix: str
    key: str = "inchikey"  # the parts' column that identifies a compound (DEDUPE_KEYS)
    duplicates: int = 0
    reasons: Counter = field(default_factory=Counter)
    seconds: float = 0.0


def plan_dedupe(work: Path, parts: list[int], st: Dedupe) -> Iterator[DedupePlan]:
    """Phase 2: decide, in input order, which rows are kept; assign ordinals and ids.

    A generator: part ``i + 1`` is planned while part ``i`` is being finalized, and only
    the dedupe index (not the plans) is held for the whole input.
    """
    for part in parts:
        t0 = time.perf_counter()
        t = pq.read_table(work / f"parts/{part:06d}.parquet", columns=[st.key, "id"])
        keys, given = t.column(st.key).to_pylist(), t.column("id").to_pylist()
        n = len(keys)
        keep = np.zeros(n, dtype=bool)
        out_ids: list[str] = [""] * n
        dup_of: list[str | None] = [None] * n
        ordinals = np.zeros(n, dtype=np.int64)
        drops = []
        for i, (key, rid) in enumerate(zip(keys, given)):
            seen = st.first.get(key)
            if seen is not None:
                st.duplicates += 1
                if st.mode == "keep_first":
                    drops.append(Drop(i, f"duplicate_{st.key}", duplicate_detail(key, seen, st.key), key, seen))
                    continue
            if rid is None:  # a registry id from the ordinal; skip numbers taken by given ids
                serial = st.ordinal + 1
                while generated_id(st.id_prefix, serial) in st.ids:
                    serial += 1
                rid = generated_id(st.id_prefix, serial)
            elif rid in st.ids:
                drops.append(Drop(i, "duplicate_id",
                                  f"id {rid!r} is already used in this library by another record; "
                                  "give the record a unique id", key))
                continue
            keep[i], out_ids[i], ordinals[i] = True, rid, st.ordinal
            st.ordinal += 1
            st.ids.add(rid)
            if seen is None:
                st.first[key] = rid
            else:
                dup_of[i] = seen
        st.reasons.update(d.reason for d in drops)
        st.seconds += time.perf_counter() - t0
        yield DedupePlan(part, keep, out_ids, dup_of, ordinals[keep], drops)


def write_rejects(lib_dir: Path, work: Path, parts: list[int], infos: list[InputInfo], name: str) -> str:
    order = {i.path: k for k, i in enumerate(infos)}
    rel = f"rejects/{name}.csv"
    path = lib_dir / rel
    path.parent.mkdir(exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(Reject.COLUMNS)
        for part in parts:
            rows = []
            for suffix in ("rejects", "dropped"):
                with open(work / f"parts/{part:06d}.{suffix}.jsonl") as rf:
                    rows += [json.loads(line) for line in rf]
            rows.sort(key=lambda r: (order.get(r["source"], 0), r["record"]))
            for r in rows:
                w.writerow([r.get(c) if r.get(c) is not None else "" for c in Reject.COLUMNS])
    return rel


def clean_committed_work(lib_dir: Path, manifest: dict) -> None:
    """Remove work directories of jobs already in the history (a kill right after commit)."""
    work_root = lib_dir / WORK
    if not work_root.is_dir():
        return
    done = committed_job_keys(manifest)
    for d in work_root.iterdir():
        try:
            key = json.loads((d / "ledger.jsonl").read_text().splitlines()[0])["job_key"]
        except (OSError, IndexError, ValueError, KeyError):
            continue
        if key in done:
            shutil.rmtree(d, ignore_errors=True)
    if not any(work_root.iterdir()):
        work_root.rmdir()


def clear_for_overwrite(out: Path) -> None:
    """overwrite=true: empty a library directory (or an unfinished job's) under its lock."""
    if (out / MANIFEST).exists() or (out / WORK).exists():
        log.warning("overwrite=true: removing the library at %s", out)
        for child in out.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


_DUPLICATE_DETAIL = re.compile("|".join(
    re.escape(duplicate_detail("KEYqzx", "IDqzx", k)).replace("KEYqzx", r"(?P<key_%s>\S+)" % k).replace("IDqzx", ".*")
    for k in KEY_NAMES))


def legacy_duplicate_key(detail: str | None) -> str | None:
    """The compound key of a ``duplicate_detail`` text: for rejects files written before they
    had the ``key`` column (new ones carry the key itself)."""
    m = _DUPLICATE_DETAIL.fullmatch(detail or "")
    return next((v for v in m.groupdict().values() if v is not None), None) if m else None

