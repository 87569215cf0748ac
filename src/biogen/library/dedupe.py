"""Hash-partitioned dedupe: the serial planner's decisions (``parts.plan_dedupe``) without
a driver-side index, so that driver memory and serial time stay flat as a library grows.

The identity key (InChIKey or canonical SMILES) is hash-partitioned into ``P`` partitions
(``kernels.keyhash``: FNV-1a 64 + splitmix64's finalizer over the key's UTF-8 bytes, a Numba
kernel over the Arrow column's buffers; stable across processes and machines). Four rounds
of Ray tasks, each ledgered like every other step of a build, with the driver seeing counts,
never keys:

1. split (one task per new part and per segment of existing shards, below): ONE file per
   part or segment (Arrow IPC, ``write_grouped``): its (key, row, given id, hash) rows by
   key partition (a part's stably, a segment's by hash within it), and its given ids by id
   partition, with each partition's row offsets; a later task memory-maps it and reads one
   partition's slice.
2. decide (one task per key partition): in input order (shards in order, then parts in
   order, rows in order), each row is the first occurrence of its key, or a duplicate of a
   library row (its id) or of an earlier new row (its position); ONE decision file per
   partition, grouped by part. The library's side is probed, not read: its split files keep
   each row's 64-bit hash and are sorted by it within a partition, so each new key is a
   binary search in each library segment (``decide_probed``: O(new rows x log) per
   partition; the exact ``decide_batches`` over all keys where a key is null or a hash
   collides).
   check (one task per id partition): does a given id repeat, or collide with a library id
   (probed the same way)?
3. rank (one task per part): the part's keep flags from its slice of the P decision files;
   the driver turns the kept counts into ordinal offsets (one number per part).
4. finalize (``parts.finalize_part``, one task per part): the part's ``DedupePlan`` built
   from its decisions, its offset and, for a duplicate of a row in another part, that
   part's rank file (memory-mapped): the same ids, ordinals, ``duplicate_of`` and rejects
   as the serial planner.

Files: parts + library segments (split) + P (decide) + parts (rank), not (parts + shards) x P x 2 + parts x P.

The library's key index, stored per partition: the library's shards are cut, in manifest
order, into *segments* of at most ``SEGMENT_SHARDS`` shards and ``SEGMENT_ROWS`` rows (the
cuts depend only on the shards before them, so they never move as the library grows). A
segment's split file (its shards' first occurrences by key partition, their ids by id
partition) depends only on those shards and P, so it is kept in the library
(``keyindex/<work_tag(P)>/seg-<digest>.arrow``, the digest over the key setting, the id
prefix and each shard's name and ``meta.parquet`` sha256 as the manifest lists them) and
linked into the next job's work directory: an append splits only the segments it has not
indexed yet (the last, partial one and the shards added since), never the whole library,
and a decide task opens one file per segment, not one per shard. ``dedupe_partitions=auto``
reuses the index's P while it is at least half the P it would choose
(``sticky_partitions``); ``prune_index`` drops files of other P and of other segments after
a commit. A stale or damaged index file (another digest, scheme or P) is rebuilt, not trusted.
The hash scheme (``SCHEME``) names the work directory and the ledger keys (``work_tag``) and
is written into every file (checked on read): a work directory left by another scheme is
never mixed with this one's partitions (its steps are simply redone under the new name).

Exactness: the serial planner assigns a generated id (``{id_prefix}{serial:09d}``) from the
ordinal, skipping numbers taken by given ids, and drops a row whose given id is already used.
When the input holds such a case (a given id that repeats, that a library row already has,
or that looks like a generated id past the library's rows: found in rounds 1-2), the build
falls back to the serial planner (logged): rare, and exact either way. ``library merge``
runs the same rounds on its pieces' rows (a new library: no segments) plus its own, which
resolve the pieces' carried duplicate rejects by partition (``merge.MergeDedupe``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.errors import ConfigError, LibraryError
from biogen.files import atomic_path
from biogen.library.parts import DedupePlan, Drop, duplicate_detail, generated_id, generated_id_pattern

log = logging.getLogger(__name__)
AUTO_RECORDS = 2_000_000        # partitions=auto: the serial planner below this many records
RECORDS_PER_PARTITION = 1_000_000
SCHEME = 3  # 1: blake2b per key in Python, a file per part x partition; 2: keyhash, a file per part;
# 3: each row's 64-bit hash in the split files, the library's sorted by it within a partition (probed)
KEYS, IDS = 0, 1  # the two sections of a split file
# rows and parts as int32 (a part or shard of 2^31 rows is refused): 12 bytes/record less scratch
SPLIT_SCHEMA = pa.schema([("key", pa.string()), ("row", pa.int32()), ("id", pa.string()), ("hash", pa.uint64())])
HASH = 3  # the column of the partitioning value's hash (the key's in KEYS, the id's in IDS)
ROW_SCHEMA = pa.schema(list(SPLIT_SCHEMA)[:HASH])  # the columns a split task gives ``_by_partition``
DECISION_SCHEMA = pa.schema([("row", pa.int32()), ("key", pa.string()), ("dup", pa.bool_()),
                             ("ref_id", pa.string()), ("ref_part", pa.int32()), ("ref_row", pa.int32())])


def work_tag(partitions: int) -> str:
    """The dedupe's work directory and ledger-key prefix: with the hash scheme in it, a work
    directory resumed by code of another scheme never mixes old and new partitions."""
    return f"dedupe-s{SCHEME}-p{partitions}"


def choose_partitions(setting: int | str, records: int, slots: int) -> int:
    """The number of key partitions: ``auto`` -> 0 (the serial planner, fastest for inputs
    that fit a driver) below ``AUTO_RECORDS`` records (new records plus the library's rows:
    the serial planner holds both), else about one per million records and at least two
    per Ray slot; a number is used as given (0: the serial planner)."""
    if str(setting) == "auto":
        if records < AUTO_RECORDS:
            return 0
        return max(2 * slots, -(-records // RECORDS_PER_PARTITION))
    try:
        n = int(setting)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or isinstance(setting, float):
        raise ConfigError(f"dedupe_partitions={setting!r} is not valid; give auto, 0 (the serial planner in the "
                          "driver) or a number of key partitions (e.g. 64)")
    return n


INDEX = "keyindex"  # the library's key index: INDEX/work_tag(P)/seg-<digest>.arrow
SEGMENT_SHARDS = 64       # a segment of the key index: at most this many shards
SEGMENT_ROWS = 2_000_000  # and this many rows (a shard larger than that is a segment alone)


def index_dir(lib_dir: str | Path, partitions: int) -> Path:
    return Path(lib_dir) / INDEX / work_tag(partitions)


def indexed_partitions(lib_dir: str | Path) -> list[int]:
    """The partition counts the library's key index has (this hash scheme's), largest first."""
    root, prefix = Path(lib_dir) / INDEX, f"dedupe-s{SCHEME}-p"
    if not root.is_dir():
        return []
    return sorted((int(d.name[len(prefix):]) for d in root.iterdir()
                   if d.is_dir() and d.name.startswith(prefix) and d.name[len(prefix):].isdigit()), reverse=True)


def sticky_partitions(setting: int | str, wanted: int, lib_dir: str | Path) -> int:
    """``auto``: the key index's P when it is at least half ``wanted`` (its partitions then
    hold at most ~2 M records each), so that growing a library does not re-split it at
    every million rows; otherwise ``wanted`` (an explicit number is always used as given)."""
    if str(setting) != "auto" or not wanted:
        return wanted
    for p in indexed_partitions(lib_dir):
        if 2 * p >= wanted:
            if p != wanted:
                log.info("dedupe_partitions=auto: %d key partitions, as the library's key index (%d wanted)", p, wanted)
            return p
    return wanted


@dataclass(frozen=True)
class Segment:
    """Consecutive library shards whose keys the key index keeps in one file: ``members``
    = (name, meta.parquet sha256) per shard; ``digest`` names the file (None: a shard
    without a recorded sha256, never reused)."""

    index: int
    members: tuple[tuple[str, str | None], ...]
    digest: str | None

    @property
    def file(self) -> str:
        return f"seg-{self.digest[:32]}.arrow" if self.digest else f"seg-unhashed-{self.index:06d}.arrow"


def index_segments(manifest: dict) -> list[Segment]:
    """The library's shards cut into segments (see the module docstring): O(shards) driver
    work over the manifest it holds anyway, the same cuts at every append."""
    groups: list[list[dict]] = []
    rows = 0
    for sh in manifest["shards"]:
        if not groups or len(groups[-1]) >= SEGMENT_SHARDS or (rows + sh["rows"] > SEGMENT_ROWS and groups[-1]):
            groups.append([])
            rows = 0
        groups[-1].append(sh)
        rows += sh["rows"]
    out = []
    for i, g in enumerate(groups):
        members = tuple((sh["name"], sh.get("files", {}).get("meta.parquet", {}).get("sha256")) for sh in g)
        digest = None
        if all(sha for _, sha in members):
            head = [SCHEME, manifest["dedupe"]["key"], manifest["id_prefix"], members]
            digest = hashlib.sha256(json.dumps(head).encode()).hexdigest()
        out.append(Segment(i, members, digest))
    return out


def prune_index(lib_dir: str | Path, manifest: dict, keep: int) -> None:
    """After a commit: the key index of P = ``keep`` only, and only the files of the
    manifest's segments (the last one, grown by the commit, is made again when needed)."""
    root = Path(lib_dir) / INDEX
    if not keep or not root.is_dir():
        return
    mine, files = work_tag(keep), {seg.file for seg in index_segments(manifest)}
    for d in root.iterdir():
        if d.name != mine:
            shutil.rmtree(d, ignore_errors=True)
            log.info("dedupe: removed the key index %s (the library is indexed with %d partitions now)", d, keep)
        elif d.is_dir():
            for f in d.iterdir():
                if f.name not in files:
                    f.unlink(missing_ok=True)


def _link(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src``'s content: a hard link (no copy), a copy where links fail."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def _string_array(keys: pa.Array | pa.ChunkedArray | list[str | None]) -> pa.Array:
    """One string array without nulls (a null key hashes as ``""``, as before)."""
    if not isinstance(keys, (pa.Array, pa.ChunkedArray)):
        keys = pa.array(keys, pa.string())
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    if not (pa.types.is_string(keys.type) or pa.types.is_large_string(keys.type)):
        keys = keys.cast(pa.string())
    return pac.fill_null(keys, "") if keys.null_count else keys


def key_hashes(keys: pa.Array | pa.ChunkedArray | list[str | None]) -> np.ndarray:
    """uint64[N]: ``kernels.keyhash.fnv1a_mix64`` of each key's UTF-8 bytes, read in place
    from the Arrow array's offsets and data buffers (no Python string per key)."""
    from biogen.kernels.keyhash import fnv1a_mix64  # here: the driver never loads Numba (~60 MiB RSS)

    arr = _string_array(keys)
    out = np.empty(len(arr), dtype=np.uint64)
    if not len(arr):
        return out
    _, off, data = arr.buffers()
    dtype = np.int64 if pa.types.is_large_string(arr.type) else np.int32
    offsets = np.frombuffer(off, dtype=dtype)[arr.offset: arr.offset + len(arr) + 1]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    return fnv1a_mix64(raw, offsets, out)


def key_partition(keys: pa.Array | pa.ChunkedArray | list[str | None], partitions: int) -> np.ndarray:
    """int64[N]: the partition of each key, ``key_hashes(keys) % partitions``; stable everywhere."""
    return (key_hashes(keys) % np.uint64(partitions)).astype(np.int64)


# ---------------------------------------------------------------- grouped files
def group_offsets(groups: np.ndarray, n_groups: int) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=n_groups))]).astype(np.int64)


def write_grouped(path: Path, sections: list[tuple[pa.RecordBatch, np.ndarray]],
                  meta: dict[str, np.ndarray | bytes]) -> None:
    """One Arrow IPC file, uncompressed (a memory-mapped reader slices it without copying):
    record batch ``s`` is section ``s``, its rows sorted by group, group ``g`` at rows
    ``offsets[g]:offsets[g + 1]``. The offsets and ``meta`` (int64 arrays, little-endian,
    or bytes as given) and the hash scheme go in the schema's metadata. A failed write names the file."""
    md = {b"scheme": str(SCHEME).encode()}
    md.update({k.encode(): v if isinstance(v, bytes) else np.asarray(v).astype("<i8").tobytes() for k, v in meta.items()})
    md.update({f"offsets{s}".encode(): off.astype("<i8").tobytes() for s, (_, off) in enumerate(sections)})
    schema = sections[0][0].schema.with_metadata(md)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_path(path) as tmp, pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
            for batch, _ in sections:
                w.write_batch(batch)
    except OSError as exc:  # Arrow's errors carry an errno but no file name
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise


class GroupedFile:
    """A file ``write_grouped`` wrote, memory-mapped: one group of one section is read
    without reading the rest; a file of another hash scheme is refused."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = pa.ipc.open_file(pa.memory_map(str(path)))
        self.meta = self.reader.schema.metadata or {}
        if self.meta.get(b"scheme") != str(SCHEME).encode():
            raise LibraryError(f"{path} was written by dedupe scheme {self.meta.get(b'scheme')!r}, not {SCHEME}; "
                               f"delete {path.parent.parent} and rerun the same command")

    def array(self, name: str) -> np.ndarray:
        return np.frombuffer(self.meta[name.encode()], dtype="<i8")

    def group(self, section: int, g: int) -> pa.RecordBatch:
        off = self.array(f"offsets{section}")
        return self.reader.get_batch(section).slice(int(off[g]), int(off[g + 1] - off[g]))


def _row_numbers(n: int) -> pa.Array:
    if n >= 2**31:
        raise ValueError(f"a part or shard of {n} rows: the partitioned dedupe takes < 2^31 (use a smaller chunk_size)")
    return pa.array(np.arange(n, dtype=np.int32))


def concat_column(batches: list[pa.RecordBatch], i: int, type_: pa.DataType) -> pa.Array:
    """Column ``i`` of ``batches``, concatenated into one array."""
    return pa.concat_arrays([b.column(i) for b in batches]) if batches else pa.array([], type_)


def probe(sorted_hashes: np.ndarray, sorted_values: pa.Array, hashes: np.ndarray, values: pa.Array
          ) -> np.ndarray | None:
    """For each of ``values`` (with ``hashes``), the position in ``sorted_values`` (sorted by
    ``sorted_hashes``) of the same string, or -1: a binary search per value, touching only
    the pages it lands on of a memory-mapped side. None when a hash matched a different
    string (a 64-bit collision): the caller then decides exactly."""
    out = np.full(len(hashes), -1, dtype=np.int64)
    if not len(sorted_hashes) or not len(hashes):
        return out
    pos = np.minimum(np.searchsorted(sorted_hashes, hashes), len(sorted_hashes) - 1)
    hit = np.flatnonzero(sorted_hashes[pos] == hashes)
    if len(hit):
        same = pac.equal(sorted_values.take(pa.array(pos[hit])), values.take(pa.array(hit)))
        if not pac.all(same).as_py():
            return None
        out[hit] = pos[hit]
    return out


def decide_probed(library: list[pa.RecordBatch], new: list[pa.RecordBatch], parts: list[int]
                  ) -> tuple[pa.RecordBatch, int] | None:
    """``decide_batches``'s result without reading the library's keys: each new key's hash is
    searched in each library segment's group (sorted by hash, memory-mapped), then the new
    rows not in the library are decided among themselves. O(new rows x log) per partition,
    not O(library). None (the caller runs ``decide_batches``) where a key is null or a hash
    collides."""
    keys = concat_column(new, 0, pa.string())
    if keys.null_count or any(b.column(0).null_count for b in library):
        return None
    n = len(keys)
    h = concat_column(new, HASH, pa.uint64()).to_numpy(zero_copy_only=False)
    seg, pos = np.full(n, -1, np.int64), np.full(n, -1, np.int64)
    for s, lb in enumerate(library):
        todo = np.flatnonzero(seg < 0)
        if not len(todo):
            break
        found = probe(lb.column(HASH).to_numpy(zero_copy_only=False), lb.column(0), h[todo], keys.take(pa.array(todo)))
        if found is None:
            return None
        hit = found >= 0
        seg[todo[hit]], pos[todo[hit]] = s, found[hit]
    first, _ = first_positions(keys, h)
    in_lib = seg >= 0
    dup_new = ~in_lib & (first < np.arange(n))
    dup = in_lib | dup_new
    # each duplicate's reference id, by Arrow takes (no Python per row): the library row's id
    # (per segment) or the first new row's id, gathered into one array and put in row order
    ids = concat_column(new, 2, pa.string())
    targets, values = [], []
    for s in np.unique(seg[in_lib]):
        sel = np.flatnonzero(seg == s)
        targets.append(sel)
        values.append(library[int(s)].column(2).take(pa.array(pos[sel])))
    targets.append(np.flatnonzero(dup_new))
    values.append(ids.take(pa.array(first[dup_new])))
    src = np.full(n, -1, np.int64)
    src[np.concatenate(targets)] = np.arange(sum(len(t) for t in targets))
    ref_id = pa.concat_arrays([v.cast(pa.string()) for v in values]).take(pa.array(src, mask=src < 0))
    rows = concat_column(new, 1, pa.int32()).to_numpy(zero_copy_only=False).astype(np.int32)
    part_at = np.repeat(np.asarray(parts, np.int32), [len(b) for b in new])
    distinct = sum(len(b) for b in library) + int((~in_lib & (first == np.arange(n))).sum())
    return pa.record_batch([
        pa.array(rows),
        keys.take(pa.array(np.arange(n), mask=~dup)),  # the key of duplicates only
        pa.array(dup),
        ref_id,
        pa.array(np.where(dup_new, part_at[first], -1).astype(np.int32)),
        pa.array(np.where(dup_new, rows[first], -1).astype(np.int32))], schema=DECISION_SCHEMA), distinct


def decide_batches(library: list[pa.RecordBatch], new: list[pa.RecordBatch], parts: list[int]
                   ) -> tuple[pa.RecordBatch, int]:
    """One key partition's decisions (``DECISION_SCHEMA``, the rows of ``new`` in order): for
    each new row (batch ``j`` is part ``parts[j]``, rows in input order), the first occurrence
    of its key, or a duplicate of a library row (``library``: first occurrences, shard order;
    ``ref_id`` its id) or of an earlier new row (``ref_part``, ``ref_row``, ``ref_id``); and
    the number of distinct keys.

    Vectorized (no Python per row): ``first_positions`` over the library's keys then the
    new rows' keys."""
    keys, ids = concat_column(library + new, 0, pa.string()), concat_column(library + new, 2, pa.string())
    n_lib, n = sum(len(b) for b in library), len(keys)
    rows = concat_column(new, 1, pa.int32()).to_numpy(zero_copy_only=False).astype(np.int32)
    first, distinct = first_positions(keys)
    ref = first[n_lib:]                          # each new row's key: its first position
    dup = ref < np.arange(n_lib, n)
    part_at = np.concatenate([np.full(n_lib, -1, np.int32),
                              np.repeat(np.asarray(parts, np.int32), [len(b) for b in new])])
    row_at = np.concatenate([np.full(n_lib, -1, np.int32), rows])
    return pa.record_batch([
        pa.array(rows),
        keys.slice(n_lib).take(pa.array(np.arange(n - n_lib), mask=~dup)),  # the key of duplicates only
        pa.array(dup),
        ids.take(pa.array(ref, mask=~dup)),
        pa.array(np.where(dup, part_at[ref], -1).astype(np.int32)),
        pa.array(np.where(dup, row_at[ref], -1).astype(np.int32))], schema=DECISION_SCHEMA), distinct


def first_positions(keys: pa.Array, hashes: np.ndarray | None = None) -> tuple[np.ndarray, int]:
    """For each position of ``keys``, the first position holding the same key (int64), and
    the number of distinct keys. Fast path: the 64-bit key hashes (``key_hashes``) sorted
    stably, so each run of equal hashes starts at its first position; then every row
    matched to an earlier one is checked by comparing the strings, and if any pair differs
    (a hash collision: ~n^2 / 2^65 per partition) or a key is null, Arrow's exact
    ``dictionary_encode`` decides instead (keys numbered in order of first appearance: a
    row is the first of its key where the running maximum of the numbers rises)."""
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64), 0
    if not keys.null_count:
        h = key_hashes(keys) if hashes is None else hashes
        order = np.argsort(h, kind="stable")
        hs = h[order]
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        starts[1:] = hs[1:] != hs[:-1]
        first = np.empty(n, dtype=np.int64)
        first[order] = order[starts][np.cumsum(starts) - 1]
        later = np.flatnonzero(first != np.arange(n))
        if not len(later) or pac.all(pac.equal(keys.take(pa.array(later)), keys.take(pa.array(first[later])))).as_py():
            return first, int(starts.sum())
        log.info("dedupe: a 64-bit key hash collision in one partition; deciding it with exact key matching")
    g = keys.dictionary_encode(null_encoding="encode").indices.to_numpy(zero_copy_only=False).astype(np.int64)
    top = np.maximum.accumulate(g)
    rises = np.empty(n, dtype=bool)
    rises[0] = True
    rises[1:] = top[1:] > top[:-1]
    return np.flatnonzero(rises)[g], int(rises.sum())


@dataclass(frozen=True)
class PartitionedDedupe:
    """One partitioned dedupe: where its files go and what the serial planner would know
    (the library's ordinal, the mode, the id prefix, the key column)."""

    work: str          # the job's work directory (parts/ is in it)
    lib_dir: str
    partitions: int
    key: str
    mode: str
    id_prefix: str
    base_ordinal: int  # rows in the library before this job
    STEPS: ClassVar[tuple[str, ...]] = ("split_part", "split_segment", "decide", "check_ids", "rank_part")

    @property
    def root(self) -> Path:
        return Path(self.work) / work_tag(self.partitions)

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.work))

    def _pattern(self) -> re.Pattern:
        return generated_id_pattern(self.id_prefix)

    def _generated_like(self, ids: pa.Array) -> int:
        """How many ids look like a generated id past the library's rows (the serial planner
        would skip their numbers when generating ids: that case goes to the serial planner)."""
        return len(self._generated_numbers(ids))

    # ---------------------------------------------------------------- round 1: split
    def _by_partition(self, batch: pa.RecordBatch, by: pa.Array, by_hash: bool
                      ) -> tuple[pa.RecordBatch, np.ndarray]:
        """The rows with ``by``'s hash (column ``HASH``) sorted by the partition of ``by``:
        stably (input order within a partition: new parts), or by the hash within it
        (``by_hash``: the library's, which decide and check probe)."""
        h = key_hashes(by)
        b = (h % np.uint64(self.partitions)).astype(np.int64)
        order = np.lexsort((h, b)) if by_hash else np.argsort(b, kind="stable")
        batch = pa.record_batch([*batch.columns[:HASH], pa.array(h, pa.uint64())], schema=SPLIT_SCHEMA)
        return batch.take(pa.array(order)), group_offsets(b, self.partitions)

    def _write_split(self, path: Path, keys: pa.RecordBatch, ids: pa.RecordBatch, by_hash: bool = False,
                     meta: dict | None = None) -> None:
        write_grouped(path, [self._by_partition(keys, keys.column(0), by_hash),
                             self._by_partition(ids, ids.column(2), by_hash)],
                      {"partitions": np.array([self.partitions]), **(meta or {})})

    def split_part(self, part: int) -> tuple[list[str], dict]:
        """Round 1 for a new part: (key, row, given id) by key; given ids by id."""
        t = pq.read_table(Path(self.work) / f"parts/{part:06d}.parquet", columns=[self.key, "id"])
        keys, ids = t.column(self.key).combine_chunks().cast(pa.string()), t.column("id").combine_chunks()
        n = len(ids)
        given = pac.is_valid(ids)
        gids = ids.filter(given)
        rows = _row_numbers(n)
        out = self.root / "split" / f"n{part:06d}.arrow"
        self._write_split(out, pa.record_batch([keys, rows, ids], schema=ROW_SCHEMA),
                          pa.record_batch([pa.nulls(len(gids), pa.string()), rows.filter(given), gids],
                                          schema=ROW_SCHEMA))
        return [self.rel(out)], {"rows": n, "generated_like": self._generated_like(gids)}

    def split_segment(self, seg: Segment) -> tuple[list[str], dict]:
        """Round 1 for a segment of the library: its shards' first occurrences' (key, row, id)
        by key partition and all their ids by id partition. The split file is the key
        index's file of the segment when that one is valid; else it is made from the shards
        (and kept in the index). Either way it is linked into the work directory."""
        cached = index_dir(self.lib_dir, self.partitions) / seg.file
        tag = seg.digest.encode() if seg.digest else None
        g = self._indexed(cached, tag) if tag is not None else None
        reused = g is not None
        if not reused:
            tables = [pq.read_table(Path(self.lib_dir) / "shards" / name / "meta.parquet",
                                    columns=["id", self.key, "duplicate_of"]) for name, _ in seg.members]
            t = pa.concat_tables(tables)
            ids, keys = t.column("id").combine_chunks(), t.column(self.key).combine_chunks().cast(pa.string())
            is_first = pac.is_null(t.column("duplicate_of").combine_chunks())
            rows = _row_numbers(len(ids))
            self._write_split(cached, pa.record_batch([keys.filter(is_first), rows.filter(is_first),
                                                       ids.filter(is_first)], schema=ROW_SCHEMA),
                              pa.record_batch([pa.nulls(len(ids), pa.string()), rows, ids], schema=ROW_SCHEMA),
                              by_hash=True, meta={"segment": tag or b"",
                                                  "generated_numbers": self._generated_numbers(ids)})
            g = GroupedFile(cached)
        numbers, n = g.array("generated_numbers"), g.array("offsets1")[-1]
        out = self.root / "split" / f"l{seg.index:06d}.arrow"
        _link(cached, out)
        return [self.rel(out)], {"rows": int(n), "generated_like": int((numbers > self.base_ordinal).sum()),
                                 "index_reused": reused, "shards": len(seg.members)}

    def _generated_numbers(self, ids: pa.Array) -> np.ndarray:
        """The numbers of the ids that look like generated ids past the library's rows now
        (a later append only has more rows: the index keeps just these)."""
        pat, width = self._pattern(), len(self.id_prefix) + 9
        ids = ids.filter(pac.and_(pac.starts_with(ids, self.id_prefix), pac.equal(pac.utf8_length(ids), width)))
        nums = [int(m.group(1)) for i in ids.to_pylist() if (m := pat.fullmatch(i))]
        return np.array([x for x in nums if x > self.base_ordinal], dtype=np.int64)

    def _indexed(self, path: Path, tag: bytes) -> GroupedFile | None:
        """``path`` opened when it is this segment's index file for this P; None: rebuild it."""
        try:
            g = GroupedFile(path)
            return g if g.meta.get(b"segment") == tag and int(g.array("partitions")[0]) == self.partitions else None
        except (OSError, LibraryError, pa.ArrowInvalid, KeyError, IndexError):
            return None

    # ---------------------------------------------------------------- round 2: decide, check
    def _split_files(self, prefix: str) -> list[Path]:
        """The split files (``l``: library shards, ``n``: new parts), names sorting in input order."""
        d = self.root / "split"
        return sorted(d.glob(f"[{prefix}]*.arrow")) if d.is_dir() else []

    def decide(self, bucket: int) -> tuple[list[str], dict]:
        """Round 2 for a key partition: each new row's first occurrence, in input order."""
        library = [GroupedFile(f).group(KEYS, bucket) for f in self._split_files("l")]
        files = self._split_files("n")
        parts = [int(f.stem[1:]) for f in files]
        new = [GroupedFile(f).group(KEYS, bucket) for f in files]
        decided = decide_probed(library, new, parts)
        if decided is None:
            log.info("dedupe: partition %d decided by exact key matching (a null key or a hash collision)", bucket)
            decided = decide_batches(library, new, parts)
        decided, distinct = decided
        out = self.root / "decide" / f"b{bucket:05d}.arrow"
        counts = np.array([len(b) for b in new], dtype=np.int64)
        write_grouped(out, [(decided, np.concatenate([[0], np.cumsum(counts)]))],
                      {"parts": np.array(parts, dtype=np.int64)})
        return [self.rel(out)], {"duplicates": int(pac.sum(decided.column(2)).as_py() or 0), "keys": distinct}

    def check_ids(self, bucket: int) -> tuple[list[str], dict]:
        """Round 2 for an id partition: given ids that repeat, or that a library row has (each
        new id's hash searched in each library segment's group, as ``decide_probed``; a
        library's own ids are unique)."""
        new = [GroupedFile(f).group(IDS, bucket) for f in self._split_files("n")]
        ids = concat_column(new, 2, pa.string())
        counts = pac.value_counts(ids).field("counts")
        repeated = int(pac.sum(pac.greater(counts, 1)).as_py() or 0)
        h = concat_column(new, HASH, pa.uint64()).to_numpy(zero_copy_only=False)
        for f in self._split_files("l") if len(ids) else []:
            lb = GroupedFile(f).group(IDS, bucket)
            found = probe(lb.column(HASH).to_numpy(zero_copy_only=False), lb.column(2), h, ids)
            if found is None:  # a hash collision: count exactly
                found = np.where(pac.is_in(ids, value_set=lb.column(2)).to_numpy(zero_copy_only=False), 0, -1)
            repeated += int((found >= 0).sum())
        return [], {"repeated_ids": repeated}

    # ---------------------------------------------------------------- round 3: rank
    def _decisions(self, part: int) -> pa.Table:
        """The part's decisions, in row order: its group of each partition's decision file."""
        files = sorted((self.root / "decide").glob("b*.arrow"))
        if len(files) != self.partitions:
            raise RuntimeError(f"dedupe: {len(files)} of {self.partitions} decision files in {self.root / 'decide'}")
        batches = []
        for f in files:
            g = GroupedFile(f)
            parts = g.array("parts")
            i = int(np.searchsorted(parts, part))
            if i == len(parts) or parts[i] != part:
                raise RuntimeError(f"dedupe: {f} holds no decisions for part {part}")
            batches.append(g.group(0, i))
        return pa.Table.from_batches(batches, DECISION_SCHEMA).sort_by("row")

    def rank_part(self, part: int, rows: int) -> tuple[list[str], dict]:
        """Round 3: the part's kept rank (its ordinal minus the part's offset; -1: dropped)."""
        d = self._decisions(part)
        if d.num_rows != rows:
            raise RuntimeError(f"dedupe decisions for part {part} cover {d.num_rows} of {rows} rows")
        keep = np.ones(rows, dtype=bool) if self.mode == "keep_all" else ~d.column("dup").to_numpy(zero_copy_only=False)
        rank = np.where(keep, np.cumsum(keep) - 1, -1).astype(np.int64)
        out = self.root / "rank" / f"n{part:06d}.npy"
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(out) as tmp, open(tmp, "wb") as fh:
            np.save(fh, rank)
        return [self.rel(out)], {"kept": int(keep.sum())}

    # ---------------------------------------------------------------- round 4: the plan
    def plan(self, part: int, offsets: np.ndarray) -> DedupePlan:
        """The part's plan, as ``plan_dedupe`` makes it (``offsets[p]``: kept rows before part ``p``)."""
        offset = int(offsets[part])
        d = self._decisions(part)
        given = pq.read_table(Path(self.work) / f"parts/{part:06d}.parquet", columns=["id"]).column("id").to_pylist()
        rank = np.load(self.root / "rank" / f"n{part:06d}.npy")
        keep = rank >= 0
        n = len(rank)
        ordinal = self.base_ordinal + offset + rank
        ids = [("" if not keep[i] else given[i] if given[i] is not None else generated_id(self.id_prefix, int(ordinal[i]) + 1))
               for i in range(n)]
        keys, dup = d.column("key").to_pylist(), d.column("dup").to_numpy(zero_copy_only=False)
        ref_id, ref_part = d.column("ref_id").to_pylist(), d.column("ref_part").to_numpy()
        ref_row = d.column("ref_row").to_numpy()
        dup_of: list[str | None] = [None] * n
        drops = []
        ranks: dict[int, np.ndarray] = {part: rank}
        for i in np.flatnonzero(dup):
            seen = ref_id[i]
            if seen is None:  # an earlier new row without a given id: its generated id
                p = int(ref_part[i])
                if p not in ranks:
                    ranks[p] = np.load(self.root / "rank" / f"n{p:06d}.npy", mmap_mode="r")
                seen = generated_id(self.id_prefix, self.base_ordinal + int(offsets[p]) + int(ranks[p][ref_row[i]]) + 1)
            if self.mode == "keep_first":
                drops.append(Drop(int(i), f"duplicate_{self.key}", duplicate_detail(keys[i], seen, self.key), keys[i],
                                  seen))
            else:
                dup_of[i] = seen
        return DedupePlan(part, keep, ids, dup_of, ordinal[keep], drops)

    def clean(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def run_step(dd: PartitionedDedupe, step: str, *args) -> tuple[list[str], dict]:
    """One task of a partitioned dedupe (a Ray task): one of ``dd.STEPS`` (``split_part``,
    ``split_segment``, ``decide``, ``check_ids``, ``rank_part``, and a subclass's own) with its arguments."""
    if step not in type(dd).STEPS:
        raise ValueError(f"unknown dedupe step {step!r}")
    return getattr(dd, step)(*args)


@dataclass(frozen=True)
class PlannedPart:
    """What a finalize task needs to make its own plan: the dedupe, the part and the offsets
    file (kept rows before each part: one int64 per part, the only per-part state the driver keeps)."""

    dedupe: PartitionedDedupe
    part: int
    offsets_file: str

    def load(self) -> DedupePlan:
        return self.dedupe.plan(self.part, np.load(self.offsets_file, mmap_mode="r"))
