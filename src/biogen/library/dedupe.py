"""Hash-partitioned dedupe: the serial planner's decisions (``parts.plan_dedupe``) without
a driver-side index, so that driver memory and serial time stay flat as a library grows.

The identity key (InChIKey or canonical SMILES) is hash-partitioned into ``P`` partitions
(blake2b of the key, stable across processes and machines). Four rounds of Ray tasks, each
ledgered like every other step of a build, with the driver seeing counts, never keys:

1. split (one task per new part and per existing shard): each row's key, position
   (part, row) and given id go to the files of its key partition; given ids also go to
   their id partition.
2. decide (one task per key partition): in input order, each row is the first
   occurrence of its key, or a duplicate of a library row (its id) or of an earlier new
   row (its position); per part, one small decision file.
   check (one task per id partition): does a given id repeat, or collide with a library id?
3. rank (one task per part): the part's keep flags from its P decision files; the driver
   turns the kept counts into ordinal offsets (one number per part).
4. finalize (``parts.finalize_part``, one task per part): the part's ``DedupePlan`` built
   from its decisions, its offset and, for a duplicate of a row in another part, that
   part's rank file (memory-mapped): the same ids, ordinals, ``duplicate_of`` and rejects
   as the serial planner.

Exactness: the serial planner assigns a generated id (``{id_prefix}{serial:09d}``) from the
ordinal, skipping numbers taken by given ids, and drops a row whose given id is already used.
When the input holds such a case (a given id that repeats, that a library row already has,
or that looks like a generated id past the library's rows: found in rounds 1-2), the build
falls back to the serial planner (logged): rare, and exact either way. ``library merge``
uses the serial planner.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.errors import ConfigError
from biogen.files import atomic_path
from biogen.library.parts import DedupePlan, Drop, duplicate_detail, generated_id, generated_id_pattern

log = logging.getLogger(__name__)
AUTO_RECORDS = 2_000_000        # partitions=auto: the serial planner below this many records
RECORDS_PER_PARTITION = 1_000_000


def choose_partitions(setting: int | str, records: int, slots: int) -> int:
    """The number of key partitions: ``auto`` -> 0 (the serial planner, fastest for inputs
    that fit a driver) below ``AUTO_RECORDS`` records, else about one per million records
    and at least two per Ray slot; a number is used as given (0: the serial planner)."""
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


def key_partition(keys: list[str | None], partitions: int) -> np.ndarray:
    """The partition of each key: blake2b (8 bytes) mod ``partitions``; stable everywhere."""
    h = np.fromiter((int.from_bytes(hashlib.blake2b((k or "").encode(), digest_size=8).digest(), "little")
                     for k in keys), dtype=np.uint64, count=len(keys))
    return (h % np.uint64(partitions)).astype(np.int64)


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

    @property
    def root(self) -> Path:
        return Path(self.work) / f"dedupe-p{self.partitions}"

    def rel(self, path: Path) -> str:
        return str(path.relative_to(self.work))

    def _pattern(self) -> re.Pattern:
        return generated_id_pattern(self.id_prefix)

    def _generated_like(self, ids: list[str | None]) -> int:
        """How many ids look like a generated id past the library's rows (the serial planner
        would skip their numbers when generating ids: that case goes to the serial planner)."""
        pat = self._pattern()
        return sum(1 for i in ids if i is not None and (m := pat.fullmatch(i)) and int(m.group(1)) > self.base_ordinal)

    # ---------------------------------------------------------------- round 1: split
    def _write_split(self, stem: str, table: pa.Table, buckets: np.ndarray, kind: str) -> list[str]:
        outputs = []
        order = np.argsort(buckets, kind="stable")
        sorted_b = buckets[order]
        edges = np.flatnonzero(np.diff(sorted_b)) + 1
        for chunk in np.split(order, edges):
            if not len(chunk):
                continue
            b = int(buckets[chunk[0]])
            path = self.root / kind / f"b{b:05d}" / f"{stem}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                pq.write_table(table.take(pa.array(chunk)), tmp, compression="zstd")
            outputs.append(self.rel(path))
        return outputs

    def split_part(self, part: int) -> tuple[list[str], dict]:
        """Round 1 for a new part: (key, part, row, given id) by key; given ids by id."""
        t = pq.read_table(Path(self.work) / f"parts/{part:06d}.parquet", columns=[self.key, "id"])
        keys, ids = t.column(self.key).to_pylist(), t.column("id").to_pylist()
        n = len(keys)
        rows = pa.table({"key": pa.array(keys, pa.string()), "part": pa.array(np.full(n, part, np.int64)),
                         "row": pa.array(np.arange(n, dtype=np.int64)), "id": pa.array(ids, pa.string())})
        stem = f"n{part:06d}"
        outputs = self._write_split(stem, rows, key_partition(keys, self.partitions), "keys")
        given = [i for i in ids if i is not None]
        if given:
            outputs += self._write_split(stem, pa.table({"id": pa.array(given, pa.string())}),
                                         key_partition(given, self.partitions), "ids")
        return outputs, {"rows": n, "generated_like": self._generated_like(given)}

    def split_shard(self, index: int, name: str) -> tuple[list[str], dict]:
        """Round 1 for a shard of the library: first occurrences' (key, id) by key; ids by id."""
        t = pq.read_table(Path(self.lib_dir) / "shards" / name / "meta.parquet", columns=["id", self.key, "duplicate_of"])
        first = t.filter(pac.is_null(t.column("duplicate_of")))
        keys = first.column(self.key).to_pylist()
        stem = f"l{index:06d}"
        outputs = self._write_split(stem, pa.table({"key": pa.array(keys, pa.string()), "id": first.column("id")}),
                                    key_partition(keys, self.partitions), "keys")
        ids = t.column("id").to_pylist()
        outputs += self._write_split(stem, pa.table({"id": pa.array(ids, pa.string())}),
                                     key_partition(ids, self.partitions), "ids")
        return outputs, {"rows": len(ids), "generated_like": self._generated_like(ids)}

    # ---------------------------------------------------------------- round 2: decide, check
    def _bucket_files(self, kind: str, bucket: int, prefix: str) -> list[Path]:
        d = self.root / kind / f"b{bucket:05d}"
        return sorted(d.glob(f"{prefix}*.parquet")) if d.is_dir() else []  # names sort in input order

    def decide(self, bucket: int) -> tuple[list[str], dict]:
        """Round 2 for a key partition: each new row's first occurrence, in input order."""
        first: dict[str, str] = {}  # key -> library id (shard order, then row order: as setdefault)
        for f in self._bucket_files("keys", bucket, "l"):
            t = pq.read_table(f)
            for k, i in zip(t.column("key").to_pylist(), t.column("id").to_pylist()):
                first.setdefault(k, i)
        files = self._bucket_files("keys", bucket, "n")
        outputs, duplicates = [], 0
        new_first: dict[str, tuple[int, int, str | None]] = {}  # key -> (part, row, given id)
        for f in files:
            t = pq.read_table(f)
            keys, part = t.column("key").to_pylist(), int(t.column("part")[0].as_py())
            rows, ids = t.column("row").to_numpy(), t.column("id").to_pylist()
            n = len(keys)
            dup = np.zeros(n, dtype=bool)
            ref_id: list[str | None] = [None] * n
            ref_part = np.full(n, -1, dtype=np.int64)
            ref_row = np.full(n, -1, dtype=np.int64)
            for j, k in enumerate(keys):
                lib_id = first.get(k)
                if lib_id is not None:
                    dup[j], ref_id[j] = True, lib_id
                    continue
                seen = new_first.get(k)
                if seen is None:
                    new_first[k] = (part, int(rows[j]), ids[j])
                    continue
                dup[j], ref_part[j], ref_row[j], ref_id[j] = True, seen[0], seen[1], seen[2]
            duplicates += int(dup.sum())
            out = self.root / "decide" / f"n{part:06d}" / f"b{bucket:05d}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(out) as tmp:
                pq.write_table(pa.table({"row": pa.array(rows), "key": pa.array(keys, pa.string()),
                                         "dup": pa.array(dup), "ref_id": pa.array(ref_id, pa.string()),
                                         "ref_part": pa.array(ref_part), "ref_row": pa.array(ref_row)}),
                               tmp, compression="zstd")
            outputs.append(self.rel(out))
        return outputs, {"duplicates": duplicates, "keys": len(first) + len(new_first)}

    def check_ids(self, bucket: int) -> tuple[list[str], dict]:
        """Round 2 for an id partition: given ids that repeat or that a library row has."""
        ids: Counter = Counter()
        for f in self._bucket_files("ids", bucket, ""):
            ids.update(pq.read_table(f).column("id").to_pylist())
        return [], {"repeated_ids": sum(1 for c in ids.values() if c > 1)}

    # ---------------------------------------------------------------- round 3: rank
    def _decisions(self, part: int) -> pa.Table:
        files = sorted((self.root / "decide" / f"n{part:06d}").glob("b*.parquet"))
        if not files:  # a part whose every record was rejected
            return pa.table({"row": pa.array([], pa.int64()), "key": pa.array([], pa.string()),
                             "dup": pa.array([], pa.bool_()), "ref_id": pa.array([], pa.string()),
                             "ref_part": pa.array([], pa.int64()), "ref_row": pa.array([], pa.int64())})
        return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("row")

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
    """One task of a partitioned dedupe (a Ray task): ``split_part``, ``split_shard``,
    ``decide``, ``check_ids`` or ``rank_part`` with its arguments."""
    if step not in STEPS:
        raise ValueError(f"unknown dedupe step {step!r}")
    return getattr(dd, step)(*args)


STEPS = ("split_part", "split_shard", "decide", "check_ids", "rank_part")


@dataclass(frozen=True)
class PlannedPart:
    """What a finalize task needs to make its own plan: the dedupe, the part and the offsets
    file (kept rows before each part: one int64 per part, the only per-part state the driver keeps)."""

    dedupe: PartitionedDedupe
    part: int
    offsets_file: str

    def load(self) -> DedupePlan:
        return self.dedupe.plan(self.part, np.load(self.offsets_file, mmap_mode="r"))
