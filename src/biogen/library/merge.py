"""``library merge``: libraries built from pieces of one input -> one library, as if built at once.

An array job (``slurm/array_build.sbatch``) builds each chunk of a large deposit as its own
library (a *piece*); ``merge_libraries`` joins the pieces, in the order given, into a new
library that holds exactly the rows one ``biogen library build`` of the concatenated
inputs would hold: the same ids, SMILES, InChIKeys, ordinals, fingerprints and descriptors.

It reuses the build's own machinery (``biogen.library.ingest``), in three steps:

1. read (per piece, ledgered, a progress bar over the pieces): each shard of a piece becomes
   a *part* of the work directory in the layout the build's map phase writes, rows back in
   input (ordinal) order; ids the piece generated for records without one are cleared (the
   shard's ``id_generated`` column says which), so they are numbered again from the merged
   ordinal. The piece's rejects are carried into the part their records fall in.
2. dedupe + write (the build's ``plan_dedupe`` or, with ``dedupe_partitions``, its
   hash-partitioned dedupe plus ``MergeDedupe``'s rounds; then ``finalize_part``): across pieces, by
   InChIKey, or canonical SMILES for ``dedupe_key=smiles`` libraries (``keep_first`` drops
   later duplicates as ``duplicate_inchikey`` / ``duplicate_smiles`` naming the kept
   id; ``keep_all`` keeps them with ``duplicate_of``), ids used twice -> ``duplicate_id``,
   contiguous ordinals, one popcount-sorted shard per piece shard.
3. commit: one rejects file (the pieces' rejects and the merge's own, in input order; the
   carried ``duplicate_inchikey`` details name the merged library's kept id), the manifest
   with one history entry ``action: merge`` listing the pieces, and the work directory goes.

A kill at any point leaves a rerun of the same merge to finish it; a rerun of a finished
merge does nothing.

Exactness. A piece drops its duplicates before the merge sees them. Rarely, one build of all
inputs would have kept such a record: its piece rejected it as a duplicate of a row that the
merge drops as ``duplicate_id`` (the same id in an earlier piece) or renumbers (a given id
equal to an id the piece generated), or drops as a duplicate of an earlier piece's molecule
(its id, which the record repeated, is then free). The merge detects these records; with ``exact=True``
(default) it stops naming them, with ``exact=False`` it goes on (they stay rejected) and
records them in the history entry (``not_exact``).
"""

from __future__ import annotations

import bisect
import csv
import glob
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.pipeline import descriptor_arrow_types
from biogen.chem.records import Reject
from biogen.errors import ConfigError, LibraryError
from biogen.library.dedupe import (
    IDS, KEYS, GroupedFile, PartitionedDedupe, concat_column, group_offsets, choose_partitions, key_hashes, work_tag,
    write_grouped,
)
from biogen.library.ingest import IngestReport, partitioned_plans, dedupe_round
from biogen.library.parts import (
    DUPLICATE_REASONS, WORK, Dedupe, DedupePlan, FinalizeTask, clean_committed_work, clear_for_overwrite,
    duplicate_detail, empty_part_columns, generated_id, generated_id_pattern, finalize_part, legacy_duplicate_key, locked,
    part_stem, plan_dedupe, write_jsonl, write_part, write_rejects,
)
from biogen.library.manifest import (
    MANIFEST, atomic_path, new_manifest, read_manifest, tool_versions, write_manifest,
)
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards
from biogen.files import json_digest, sha256_file

log = logging.getLogger(__name__)
ACTION = "merge"
WORK_DIR = f"000-{ACTION}"  # a merge makes a new library: its only history entry
# settings every piece must share (manifest key, its name in messages)
SETTINGS = (("featurizer", "featurizer"), ("standardize", "standardize"), ("descriptors", "descriptors"),
            ("dedupe", "dedupe"), ("id_prefix", "id_prefix"))
SHOWN = 5  # inexact records named in a message
KEPT = 100  # ... and in the history entry


# ------------------------------------------------------------------------------ the pieces
def natural_key(text: str) -> list:
    """Sort key: digit runs compare as numbers (``part-2`` < ``part-10``)."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def resolve_pieces(parts: str | os.PathLike | Sequence[str | os.PathLike], what: str = "library") -> list[Path]:
    """``parts=``: a directory, a glob (matches in natural order) or a list of them (in the order
    given) -> existing directories, absolute, each once."""
    items = [parts] if isinstance(parts, (str, os.PathLike)) else list(parts)
    if not items:
        raise ConfigError(f"parts= is empty; give the {what} pieces as a list [a,b] or a glob 'out.parts/part-*'")
    out: list[Path] = []
    for item in items:
        item = os.path.expanduser(str(item))
        if glob.has_magic(item):
            found = sorted((m for m in glob.glob(item) if Path(m).is_dir()), key=natural_key)
            if not found:
                raise ConfigError(f"parts glob {item!r} matches no directory; check the path and pattern")
            out.extend(Path(m) for m in found)
        elif Path(item).is_dir():
            out.append(Path(item))
        else:
            raise ConfigError(f"part {item!r} is not a directory ({what} piece expected; cwd {os.getcwd()})")
    out = [p.absolute() for p in out]
    seen: set[Path] = set()
    dup = [p for p in out if p.resolve() in seen or seen.add(p.resolve())]
    if dup:
        raise ConfigError(f"parts lists the {what} {dup[0]} twice; give each piece once")
    return out


def _read_piece(path: Path) -> dict:
    if not (path / MANIFEST).is_file() and (path / WORK).is_dir():
        raise LibraryError(f"piece {path} is an unfinished build (it has {WORK}/ but no {MANIFEST}); rerun its "
                           "build (for an array job: resubmit that task, sbatch --array=<id>) before merging")
    manifest = read_manifest(path)
    if (path / WORK).is_dir() and any((path / WORK).iterdir()):
        log.warning("piece %s has an unfinished job in %s/ (an append?); merging what its manifest holds",
                    path, WORK)
    return manifest


def check_compatible(pieces: list[Path], manifests: list[dict]) -> None:
    """Refuse pieces built with different settings, naming the piece and the setting."""
    first = manifests[0]
    for path, m in zip(pieces[1:], manifests[1:]):
        for key, name in SETTINGS:
            if m[key] != first[key]:
                a, b = first[key], m[key]
                if isinstance(a, dict) and isinstance(b, dict):  # name the sub-settings that differ
                    diff = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
                    theirs = ", ".join(f"{name}.{k}={b.get(k)!r}" for k in diff)
                    ours = ", ".join(f"{name}.{k}={a.get(k)!r}" for k in diff)
                else:
                    theirs, ours = f"{name}={b!r}", f"{name}={a!r}"
                raise LibraryError(
                    f"cannot merge: piece {path} was built with {theirs} but piece {pieces[0]} with {ours}; the "
                    "pieces of a merge must share featurizer, standardization, descriptors, dedupe mode and "
                    "id_prefix (rebuild that piece with the others' settings)")


# ------------------------------------------------------------------- step 1: pieces -> parts
def _input_index(entry: dict) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, inp in enumerate(entry.get("inputs", [])):
        index.setdefault(inp["path"], i)
    return index


def _read_rejects(piece: Path, manifest: dict) -> Iterator[tuple[tuple, dict]]:
    """The piece's rejects (every history entry's file), each with its input-order key."""
    for e, h in enumerate(manifest["history"]):
        if not h.get("rejects_file"):
            continue
        path = piece / h["rejects_file"]
        if not path.is_file():
            raise LibraryError(f"piece {piece}: its rejects file {h['rejects_file']} is missing; restore it (a "
                               "merge carries every piece's rejects over) or rebuild the piece")
        index = _input_index(h)
        with open(path, newline="") as fh:
            for r in csv.DictReader(fh):
                row = {c: (r.get(c) or None) for c in Reject.COLUMNS}
                row["record"] = int(r.get("record") or 0)
                row["raw"] = r.get("raw", "")
                if "key" not in r and row["reason"] in DUPLICATE_REASONS:  # a file from before the key column
                    row["key"] = legacy_duplicate_key(row["detail"])
                yield (e, index.get(row["source"], 0), row["record"]), row


def _generated(meta: pa.Table, prefix: str) -> tuple[np.ndarray, bool]:
    """Which rows' ids the build generated; (flags, legacy) where legacy = guessed from the id
    form (a shard written before the ``id_generated`` column existed)."""
    if "id_generated" in meta.column_names:
        return meta.column("id_generated").to_numpy(zero_copy_only=False).astype(bool), False
    pat = generated_id_pattern(prefix)
    flags = [bool(m) and int(m.group(1)) >= o + 1
             for m, o in zip(map(pat.fullmatch, meta.column("id").to_pylist()), meta.column("ordinal").to_pylist())]
    return np.array(flags, dtype=bool), True


def piece_to_parts(work: str, piece: str, manifest: dict, first_part: int) -> tuple[list[str], dict]:
    """Step-1 task: one piece -> parts ``first_part ...`` (one per shard; one empty part when the
    piece has no rows), in the build's part layout, plus each part's carried rejects."""
    t0 = time.perf_counter()
    work, piece = Path(work), Path(piece)
    (work / "parts").mkdir(parents=True, exist_ok=True)
    types = descriptor_arrow_types(manifest["descriptors"])
    n_words = FingerprintSpec.from_dict(manifest["featurizer"]).n_words
    shard_entry = {s: e for e, h in enumerate(manifest["history"]) for s in h.get("shards", [])}
    index = [_input_index(h) for h in manifest["history"]]
    names = [s["name"] for s in manifest["shards"]] or [None]
    starts: list[tuple] = []
    outputs: list[str] = []
    rows = generated = 0
    legacy = False
    last_ordinal = -1
    for k, name in enumerate(names):
        stem = part_stem(first_part + k)
        if name is None:
            cols = empty_part_columns(types)
            fps = np.zeros((0, n_words), dtype="<u8")
            starts.append((-1,))
            was_generated: list[str] = []
        else:
            meta, fps = _read_piece_shard(piece, name, last_ordinal)
            last_ordinal = int(meta.column("ordinal")[-1].as_py()) if meta.num_rows else last_ordinal
            gen, was_legacy = _generated(meta, manifest["id_prefix"])
            legacy |= was_legacy
            generated += int(gen.sum())
            was_generated = [i for i, g in zip(meta.column("id").to_pylist(), gen) if g]
            rows += meta.num_rows
            cols = {"source": meta.column("source"), "record": meta.column("record"),
                    "id": pac.if_else(pa.array(gen), pa.scalar(None, pa.string()), meta.column("id")),
                    "smiles": meta.column("smiles"), "inchikey": meta.column("inchikey"),
                    "raw": pa.nulls(meta.num_rows, pa.string()), "props": meta.column("props"),
                    **{c: meta.column(c) for c in types}}
            e = shard_entry.get(name, 0)
            src = meta.column("source")[0].as_py() if meta.num_rows else None
            starts.append((e, index[e].get(src, 0), meta.column("record")[0].as_py()) if meta.num_rows else (-1,))
        outputs += write_part(work, first_part + k, cols, fps)
        with atomic_path(work / f"{stem}.generated.json") as tmp:  # the piece's ids of the id-less rows
            tmp.write_text(json.dumps(was_generated))
        outputs.append(f"{stem}.generated.json")
    reasons = _carry_rejects(work, piece, manifest, starts, first_part, outputs)
    records = sum(h.get("records_read", 0) for h in manifest["history"])
    return outputs, {"rows": rows, "parts": len(names), "records_read": records, "carried": sum(reasons.values()),
                     "reasons": dict(reasons), "generated_ids": generated, "legacy_ids": legacy,
                     "seconds": time.perf_counter() - t0}


def _read_piece_shard(piece: Path, name: str, last_ordinal: int) -> tuple[pa.Table, np.ndarray]:
    """A piece's shard (meta and fingerprints) in ordinal order, checked to come after the
    piece's earlier shards."""
    meta = pq.read_table(piece / "shards" / name / "meta.parquet")
    order = np.argsort(meta.column("ordinal").to_numpy(), kind="stable")
    meta = meta.take(pa.array(order))
    fps = np.load(piece / "shards" / name / "fp.npy")[order]
    ords = meta.column("ordinal").to_numpy()
    if len(ords) and ords[0] <= last_ordinal:
        raise LibraryError(f"piece {piece}: shard {name} holds ordinals below those of an earlier shard; "
                           "its shards are not in input order (not a library biogen wrote?)")
    return meta, fps


def _carry_rejects(work: Path, piece: Path, manifest: dict, starts: list[tuple], first_part: int,
                   outputs: list[str]) -> Counter:
    """The piece's rejects go with the part their records fall in (input order), so that the
    merged rejects file is in input order like a build's; returns them counted by reason."""
    carried: list[list[dict]] = [[] for _ in starts]
    reasons: Counter = Counter()
    for key, row in _read_rejects(piece, manifest):
        carried[max(0, bisect.bisect_right(starts, key) - 1)].append(row)
        reasons[row["reason"]] += 1
    for k, rej in enumerate(carried):
        stem = part_stem(first_part + k)
        write_jsonl(work / f"{stem}.carried.jsonl", rej)
        outputs.append(f"{stem}.carried.jsonl")
    return reasons


# ------------------------------------------------------------------ step 2: exactness check
def _carried(work: Path, parts: Sequence[int]) -> Iterator[tuple[int, dict]]:
    for p in parts:
        with open(work / f"parts/{p:06d}.carried.jsonl") as fh:
            for line in fh:
                yield p, json.loads(line)


class _Exactness:
    """After each piece is planned: would one build of all inputs also have rejected the
    piece's own duplicate rejects? (see the module docstring)"""

    def __init__(self, work: Path, dd: Dedupe, pieces: list[Path], part_piece: dict[int, int]):
        self.work, self.dd, self.pieces, self.part_piece = work, dd, pieces, part_piece
        self.generated: set[str] = set()  # ids the merge generated for the current piece
        self.unchanged: set[str] = set()  # ... that equal the id the piece had generated for the row
        self.inexact: list[dict] = []

    def planned(self, part: int, keep: np.ndarray, ids: list[str]) -> None:
        stem = self.work / f"parts/{part:06d}"
        none = pq.read_table(f"{stem}.parquet", columns=["id"]).column("id").is_null().to_pylist()
        before = iter(json.loads(Path(f"{stem}.generated.json").read_text()))
        for new, kept, gen in zip(ids, keep, none):
            if gen:
                old = next(before)
                if kept:
                    self.generated.add(new)
                    if new == old:
                        self.unchanged.add(new)

    def piece_done(self, parts: Sequence[int]) -> None:
        st = self.dd
        for p, r in _carried(self.work, parts):
            if r["reason"] in DUPLICATE_REASONS:
                ok = r["key"] is not None and r["key"] in st.first
            elif r["reason"] == "duplicate_id":  # the id is taken before the record in one build too
                ok = r["id"] in st.ids and (r["id"] not in self.generated or r["id"] in self.unchanged)
            else:
                continue
            if not ok:
                self.inexact.append({"piece": str(self.pieces[self.part_piece[p]]), "source": r["source"],
                                     "record": r["record"], "id": r["id"], "reason": r["reason"]})
        self.generated, self.unchanged = set(), set()


def _inexact_message(count: int, records: list[dict]) -> str:
    shown = "; ".join(f"{r['source']} record {r['record']} (id {r['id']}, {r['reason']} in piece {r['piece']})"
                      for r in records[:SHOWN])
    more = f" and {count - SHOWN} more" if count > SHOWN else ""
    return (f"{count} record(s) rejected by their piece as duplicates would be kept by one build of "
            f"all inputs: {shown}{more}. Their piece rejected them against a row that the merge drops (its id is "
            "used by an earlier piece, or it is a duplicate of an earlier piece's molecule) or renumbers (a given id "
            "equal to an id the piece generated)")


def _plans(work: Path, pieces_parts: list[list[int]], dd: Dedupe, check: _Exactness) -> Iterator[DedupePlan]:
    """``plan_dedupe`` over all parts, checking each piece once it is planned (the generator
    is advanced only after the previous part's plan was handed on)."""
    last = {parts[-1]: parts for parts in pieces_parts}
    for plan in plan_dedupe(work, [p for parts in pieces_parts for p in parts], dd):
        check.planned(plan.part, plan.keep, plan.ids)
        yield plan
        if plan.part in last:
            check.piece_done(last[plan.part])


# -------------------------------------------------- step 2, partitioned: the carried rejects
QUERY_SCHEMA = pa.schema([("value", pa.string()), ("part", pa.int32()), ("row", pa.int32()), ("hash", pa.uint64())])
RESOLVED_SCHEMA = pa.schema([("part", pa.int32()), ("row", pa.int32()), ("ok", pa.bool_()), ("ref_id", pa.string())])


@dataclass(frozen=True)
class MergeDedupe(PartitionedDedupe):
    """A merge's partitioned dedupe: the build's rounds over the pieces' rows (a new library,
    so no segments), and three rounds of its own for the pieces' carried duplicate rejects
    (the exactness check and the kept id they name), with no driver-side index:

    - ``split_carried`` (round 1, a task per piece): the keys of its ``duplicate_<key>``
      rejects by key partition, the ids of its ``duplicate_id`` rejects by id partition;
    - ``resolve_carried`` (a task per partition, after rank): each such key's first
      occurrence among the merged rows (the decide round's), each such id's row; exact when
      that row lies in the reject's piece or before it and is kept;
    - ``rewrite_carried`` (a task per piece): its parts' rejects, each duplicate naming the
      merged library's kept id.

    That is ``_Exactness``'s serial check wherever the partitioned dedupe runs at all: no
    given id repeats or looks generated, and no carried ``duplicate_id`` names an id of the
    generated form (``split_carried`` counts those as ``generated_like``: the serial planner
    then decides). Every given id is then on one row and no merged id is renumbered."""

    STEPS: ClassVar[tuple[str, ...]] = PartitionedDedupe.STEPS + (
        "split_carried", "resolve_carried", "rewrite_carried")

    def _query_section(self, values: list, parts: list[int], rows: list[int]) -> tuple[pa.RecordBatch, np.ndarray]:
        arr = pa.array(values, pa.string())
        h = key_hashes(arr)
        b = (h % np.uint64(self.partitions)).astype(np.int64)
        batch = pa.record_batch([arr, pa.array(parts, pa.int32()), pa.array(rows, pa.int32()), pa.array(h, pa.uint64())],
                                schema=QUERY_SCHEMA)
        return batch.take(pa.array(np.argsort(b, kind="stable"))), group_offsets(b, self.partitions)

    def split_carried(self, piece: int, parts: list[int]) -> tuple[list[str], dict]:
        """Round 1 for a piece's carried rejects: duplicate keys by key partition, duplicate
        ids by id partition (with their part and line)."""
        keys: tuple[list, list, list] = ([], [], [])
        ids: tuple[list, list, list] = ([], [], [])
        for p in parts:
            for i, (_, r) in enumerate(_carried(Path(self.work), [p])):
                to = keys if r["reason"] in DUPLICATE_REASONS else ids if r["reason"] == "duplicate_id" else None
                if to is not None:
                    for col, v in zip(to, (r["key"] if to is keys else r["id"], p, i)):
                        col.append(v)
        out = self.root / "carried" / f"c{piece:05d}.arrow"
        write_grouped(out, [self._query_section(*keys), self._query_section(*ids)],
                      {"piece": np.array([piece]), "horizon": np.array([parts[-1]])})
        named = pa.array(ids[0], pa.string())
        return [self.rel(out)], {"generated_like": self._generated_like(named.filter(pac.is_valid(named))),
                                 "queries": len(keys[0]) + len(ids[0])}

    def resolve_carried(self, bucket: int, offsets_file: str) -> tuple[list[str], dict]:
        """For each piece's carried duplicates of this partition: exact (ok) and the kept id."""
        files = self._split_files("n")
        parts = np.array([int(f.stem[1:]) for f in files], dtype=np.int64)
        new = [GroupedFile(f).group(KEYS, bucket) for f in files]
        rows = concat_column(new, 1, pa.int32()).to_numpy(zero_copy_only=False)
        decided = GroupedFile(self.root / "decide" / f"b{bucket:05d}.arrow").reader.get_batch(0)
        if not np.array_equal(decided.column(0).to_numpy(zero_copy_only=False), rows):
            raise RuntimeError(f"dedupe: the decisions of partition {bucket} do not match its split rows")
        first = pa.array(~decided.column(2).to_numpy(zero_copy_only=False))
        f_keys, f_ids = concat_column(new, 0, pa.string()).filter(first), concat_column(new, 2, pa.string()).filter(first)
        f_part = np.repeat(parts, [len(b) for b in new])[first.to_numpy(zero_copy_only=False)]
        f_row = rows[first.to_numpy(zero_copy_only=False)]
        id_side = [GroupedFile(f).group(IDS, bucket) for f in files]
        all_ids = concat_column(id_side, 2, pa.string())
        id_part = np.repeat(parts, [len(b) for b in id_side])
        id_row = concat_column(id_side, 1, pa.int32()).to_numpy(zero_copy_only=False)
        offsets = np.load(offsets_file, mmap_mode="r")
        ranks: dict[int, np.ndarray] = {}

        def rank(p: int, r: int) -> int:
            if p not in ranks:
                ranks[p] = np.load(self.root / "rank" / f"n{p:06d}.npy", mmap_mode="r")
            return int(ranks[p][r])

        def kept_id(j: int) -> str:
            given = f_ids[j].as_py()
            p = int(f_part[j])
            return given if given is not None else generated_id(
                self.id_prefix, self.base_ordinal + int(offsets[p]) + rank(p, int(f_row[j])) + 1)

        batches, counts, pieces, bad = [], [], [], []
        for cf in sorted((self.root / "carried").glob("c*.arrow")):
            g = GroupedFile(cf)
            horizon = int(g.array("horizon")[0])
            kq, iq = g.group(KEYS, bucket), g.group(IDS, bucket)
            at = _positions(kq.column(0), f_keys)
            named = pac.is_valid(kq.column(0)).to_numpy(zero_copy_only=False)  # a null key: never exact (serially too)
            k_ok = np.array([j >= 0 and f_part[j] <= horizon for j in at], dtype=bool) & named
            k_ref = [kept_id(int(j)) if j >= 0 else None for j in at]
            ai = _positions(iq.column(0), all_ids)
            i_ok = np.array([j >= 0 and id_part[j] <= horizon and rank(int(id_part[j]), int(id_row[j])) >= 0
                             for j in ai], dtype=bool)
            ok = np.concatenate([k_ok, i_ok])
            batch = pa.record_batch([pa.concat_arrays([kq.column(1), iq.column(1)]),
                                     pa.concat_arrays([kq.column(2), iq.column(2)]), pa.array(ok),
                                     pa.array(k_ref + [None] * len(ai), pa.string())], schema=RESOLVED_SCHEMA)
            bad += zip(batch.column(0).filter(pa.array(~ok)).to_pylist(), batch.column(1).filter(pa.array(~ok)).to_pylist())
            batches.append(batch)
            counts.append(len(batch))
            pieces.append(int(g.array("piece")[0]))
        out = self.root / "resolved" / f"b{bucket:05d}.arrow"
        table = pa.Table.from_batches(batches, RESOLVED_SCHEMA).combine_chunks()
        write_grouped(out, [(_one_batch(table), np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))],
                      {"pieces": np.array(pieces, dtype=np.int64)})
        return [self.rel(out)], {"inexact": len(bad), "inexact_at": sorted(bad)[:KEPT]}

    def rewrite_carried(self, piece: int, parts: list[int], resolved: bool) -> tuple[list[str], dict]:
        """A piece's parts' rejects file for ``write_rejects``: the carried rejects, each
        duplicate naming the merged library's kept id (as one build would)."""
        refs: dict[tuple[int, int], str] = {}
        if resolved:
            files = sorted((self.root / "resolved").glob("b*.arrow"))
            if len(files) != self.partitions:
                raise RuntimeError(f"dedupe: {len(files)} of {self.partitions} resolved files in {self.root}")
            for f in files:
                g = GroupedFile(f)
                at = np.flatnonzero(g.array("pieces") == piece)
                if len(at):
                    b = g.group(0, int(at[0]))
                    for p, r, ref in zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(3).to_pylist()):
                        if ref is not None:
                            refs[(p, r)] = ref
        return _rewrite_rejects(Path(self.work), parts, lambda p, i, key: refs.get((p, i))), {}


def _positions(values: pa.Array, value_set: pa.Array) -> np.ndarray:
    """int64: each value's position in ``value_set`` (its values distinct), -1 where absent."""
    return pac.fill_null(pac.index_in(values, value_set=value_set), -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _one_batch(table: pa.Table) -> pa.RecordBatch:
    """A table as one record batch (an empty one has no batches)."""
    batches = table.combine_chunks().to_batches()
    return batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)


def _partitioned_merge(work: Path, out: Path, m0: dict, pieces: list[Path], pieces_parts: list[list[int]],
                       part_rows: dict[int, int], partitions: int, dd: Dedupe, ledger: Ledger,
                       runtime: RuntimeSpec, slots: int) -> tuple[list, int, list[dict]] | None:
    """Step 2 in key partitions (``MergeDedupe``): the plans, and the inexact records (their
    number, the first ``KEPT`` of them). None: the pieces need the serial planner (logged)."""
    pd = MergeDedupe(str(work), str(out), partitions, dd.key, dd.mode, dd.id_prefix, 0)
    empty = {"shards": [], "n_rows": 0, "dedupe": m0["dedupe"], "id_prefix": m0["id_prefix"]}
    carried = [(f"split-c{j:05d}", ("split_carried", j, pp)) for j, pp in enumerate(pieces_parts)]
    parts_all = [p for pp in pieces_parts for p in pp]
    plans = partitioned_plans(out, empty, work, parts_all, part_rows, partitions, dd, ledger, runtime, slots,
                               ACTION, pd=pd, extra_split=carried)
    if plans is None:
        return None

    def rounds(desc: str, tasks: list[tuple[str, tuple]]) -> dict[str, dict]:
        return dedupe_round(pd, desc, tasks, ledger, runtime, slots, ACTION)

    tag = work_tag(partitions)
    queries = [r["queries"] for r in (rounds("split", carried)[f"{tag}-{k}"] for k, _ in carried)]  # from the ledger
    bad: list[tuple[int, int]] = []
    count = 0
    if sum(queries):
        resolved = rounds("resolve", [(f"resolve-b{b:05d}", ("resolve_carried", b, plans[0].offsets_file))
                                      for b in range(partitions)])
        count = sum(r["inexact"] for r in resolved.values())
        bad = sorted(tuple(x) for r in resolved.values() for x in r["inexact_at"])[:KEPT]
    rounds("rejects", [(f"rewrite-c{j:05d}", ("rewrite_carried", j, pp, q > 0))
                       for j, (pp, q) in enumerate(zip(pieces_parts, queries))])
    part_piece = {p: j for j, pp in enumerate(pieces_parts) for p in pp}
    records = []
    for part, row in bad:
        r = next(r for i, (_, r) in enumerate(_carried(work, [part])) if i == row)
        records.append({"piece": str(pieces[part_piece[part]]), "source": r["source"], "record": r["record"],
                        "id": r["id"], "reason": r["reason"]})
    return plans, count, records


# ------------------------------------------------------------------------- step 3: commit
def _rewrite_rejects(work: Path, parts: Sequence[int], kept_id) -> list[str]:
    """Carried rejects -> the part's ``rejects.jsonl`` that ``write_rejects`` reads; a carried
    duplicate names the merged library's kept id (as one build would): ``kept_id(part,
    line, key)`` -> that id or None (the serial planner's index, or ``MergeDedupe``'s
    resolved ids). Returns the files written (relative to ``work``)."""
    outputs = []
    for p in parts:
        rows = [r for _, r in _carried(work, [p])]
        for i, r in enumerate(rows):
            ref = kept_id(p, i, r["key"]) if r["reason"] in DUPLICATE_REASONS else None
            if ref is not None:
                r["duplicate_of"] = ref
                r["detail"] = duplicate_detail(r["key"], ref, r["reason"].removeprefix("duplicate_"))
        write_jsonl(work / f"parts/{p:06d}.rejects.jsonl", rows)
        outputs.append(f"parts/{p:06d}.rejects.jsonl")
    return outputs


def _job_key(pieces: list[Path], hashes: list[str]) -> str:
    state = {"action": ACTION, "pieces": [[str(p), h] for p, h in zip(pieces, hashes)], "versions": tool_versions()}
    return json_digest(state)


def _guard_output(out: Path, key: str, pieces: list[Path], overwrite: bool) -> bool:
    """True when ``out`` already holds this very merge; refuse anything else but a new,
    empty or interrupted-merge directory (``overwrite`` replaces a library)."""
    if any(out == p or out.resolve() == p.resolve() for p in pieces):
        raise ConfigError(f"output={out} is one of the pieces; merge into a new directory")
    if not out.exists():
        return False
    if not out.is_dir():
        raise LibraryError(f"output={out} exists and is a file; choose a directory path")
    if (out / MANIFEST).exists():
        existing = read_manifest(out)
        if overwrite:
            return False  # replaced under the lock
        if [h.get("job_key") for h in existing["history"]] == [key]:
            return True
        raise LibraryError(f"output={out} already holds a different library ({existing['n_rows']} molecules); "
                           "choose another output or pass overwrite=true to replace it")
    if overwrite:
        return False
    elif not (out / WORK).exists() and any(p.name != ".lock" for p in out.iterdir()):
        raise LibraryError(f"output={out} is a non-empty directory that is not a biogen library; choose a new "
                           "or empty directory")
    return False


def merge_libraries(
    parts: str | os.PathLike | Sequence[str | os.PathLike],
    output: str | Path,
    *,
    overwrite: bool = False,
    exact: bool = True,
    runtime: RuntimeSpec = RuntimeSpec(mode="inline"),
    dedupe_partitions: int | str = "auto",
) -> IngestReport:
    """Merge library pieces (a list in the order given, or a glob in natural order) into a new
    library at ``output`` equal to one build of their concatenated inputs (module docstring).
    ``dedupe_partitions``: as the build's (auto: the serial planner below 2M rows, else key
    partitions in Ray tasks; the same library either way)."""
    t_start = time.perf_counter()
    choose_partitions(dedupe_partitions, 0, 1)  # a bad setting fails before any work
    pieces = resolve_pieces(parts)
    manifests = [_read_piece(p) for p in pieces]
    check_compatible(pieces, manifests)
    hashes = [sha256_file(p / MANIFEST) for p in pieces]
    out = Path(output).absolute()
    key = _job_key(pieces, hashes)
    if _guard_output(out, key, pieces, overwrite):
        clean_committed_work(out, read_manifest(out))
        return IngestReport(library=str(out), action=ACTION, already_done=True)
    with locked(out):
        if overwrite:
            clear_for_overwrite(out)
        work = out / WORK / WORK_DIR
        ledger = Ledger(work / "ledger.jsonl", key)
        resumed = len(ledger.entries)
        if resumed:
            log.info("resuming %s: %d steps already done", work, resumed)
        pieces_parts = _part_numbers(manifests)
        run = _merge_pieces(work, out, pieces, manifests, pieces_parts, ledger, runtime, dedupe_partitions)
        if run.not_exact:
            message = _inexact_message(run.not_exact, run.inexact)
            if exact:
                raise LibraryError(message + ". Give the pieces' records unique ids (or none), or pass "
                                   "exact=false to merge anyway: these records stay rejected and the merged library "
                                   "differs from one build in them (the finished work is kept for that rerun)")
            log.warning("%s; merged anyway (exact=false), they stay rejected", message)
        report, new_shards, inputs = _merge_report(out, work, manifests, pieces_parts, run, resumed, t_start)
        manifest = _merged_manifest(manifests, pieces, hashes, report, new_shards, inputs, key, run, ledger)
        embeddings = _carry_embeddings(out, pieces, manifests, pieces_parts, run)
        if embeddings:
            manifest["embeddings"] = embeddings
        write_manifest(out, manifest)
        clean_committed_work(out, manifest)
    return report


def _carry_embeddings(out: Path, pieces: list[Path], manifests: list[dict], pieces_parts: list[list[int]],
                      run: _MergeRun) -> dict:
    """The pieces' stored embeddings, carried into the merged shards (part p of piece j is
    piece shard i; its merged shard keeps a subset of that shard's rows)."""
    from biogen.library.embeddings import carry_embeddings

    moves = []
    for j, (m, parts) in enumerate(zip(manifests, pieces_parts)):
        for shard, p in zip(m["shards"], parts):
            final = run.finals[f"final-{p:06d}"]["shard"]
            if final:
                moves.append((j, shard["name"], final["name"]))
    return carry_embeddings(out, list(zip(pieces, manifests)), moves)


def _part_numbers(manifests: list[dict]) -> list[list[int]]:
    """The parts of each piece: one per shard (one empty part for a piece without rows), numbered on."""
    pieces_parts, first = [], 0
    for m in manifests:
        n = max(1, len(m["shards"]))
        pieces_parts.append(list(range(first, first + n)))
        first += n
    return pieces_parts


@dataclass
class _MergeRun:
    """What steps 1 and 2 leave: each piece's read result, each part's shard result, the
    dedupe state, the inexact records (their number, the first ``KEPT``) and whether the
    dedupe ran in key partitions (the carried rejects are then rewritten already)."""

    results: list[dict]
    finals: dict[str, dict]
    dedupe: Dedupe
    not_exact: int
    inexact: list[dict]
    partitioned: bool


def _merge_pieces(work: Path, out: Path, pieces: list[Path], manifests: list[dict], pieces_parts: list[list[int]],
                  ledger: Ledger, runtime: RuntimeSpec, dedupe_partitions: int | str) -> _MergeRun:
    """Step 1 (pieces -> parts) and step 2 (dedupe in input order, serially or in key
    partitions, then the shards), ledgered."""
    m0 = manifests[0]
    parts_all = [p for pp in pieces_parts for p in pp]
    part_piece = {p: j for j, pp in enumerate(pieces_parts) for p in pp}
    with ray_session(runtime) as slots:
        read = run_shards(piece_to_parts,
                          ((f"piece-{j:05d}", (str(work), str(p), m, pp[0]))
                           for j, (p, m, pp) in enumerate(zip(pieces, manifests, pieces_parts))),
                          ledger=ledger, spec=runtime, slots=slots, desc="merge: read pieces", total=len(pieces))
        results = [read[f"piece-{j:05d}"] for j in range(len(pieces))]
        for p, r in zip(pieces, results):
            if r["legacy_ids"]:
                log.warning("piece %s was built before shards recorded which ids were generated: ids of the "
                            "form %s000000123 at or above their row's ordinal+1 are taken as generated",
                            p, m0["id_prefix"])
        dd = Dedupe({}, set(), ordinal=0, mode=m0["dedupe"]["mode"], id_prefix=m0["id_prefix"],
                    key=m0["dedupe"]["key"])
        t0 = time.perf_counter()
        partitions = choose_partitions(dedupe_partitions, sum(r["rows"] for r in results), slots)
        done = None
        if partitions:
            part_rows = {p: rows for m, pp in zip(manifests, pieces_parts)
                         for p, rows in zip(pp, [s["rows"] for s in m["shards"]] or [0])}
            done = _partitioned_merge(work, out, m0, pieces, pieces_parts, part_rows, partitions, dd, ledger,
                                      runtime, slots)
        check = None
        if done is None:
            check = _Exactness(work, dd, pieces, part_piece)
            plans = _plans(work, pieces_parts, dd, check)
        else:
            plans, not_exact, inexact = done
        dd.seconds += time.perf_counter() - t0
        fin = ((f"final-{plan.part:06d}", (FinalizeTask(str(work), str(out), f"000-{plan.part:06d}", plan),))
               for plan in plans)
        finals = run_shards(finalize_part, fin, ledger=ledger, spec=runtime, slots=slots,
                            desc="merge: write shards", total=len(parts_all))
    if check is not None:
        not_exact, inexact = len(check.inexact), check.inexact[:KEPT]
    return _MergeRun(results, finals, dd, not_exact, inexact, partitioned=check is None)


def _merge_report(out: Path, work: Path, manifests: list[dict], pieces_parts: list[list[int]], run: _MergeRun,
                  resumed: int, t_start: float) -> tuple[IngestReport, list[dict], list[dict]]:
    """Step 3 before the commit: the rejects file (the pieces' rejects, then the merge's own);
    the report, the new shards' manifest entries and the pieces' inputs."""
    t1 = time.perf_counter()
    parts_all = [p for pp in pieces_parts for p in pp]
    results, finals, dd = run.results, run.finals, run.dedupe
    if not run.partitioned:
        _rewrite_rejects(work, parts_all, lambda p, i, key: dd.first.get(key))
    new_shards = [finals[f"final-{p:06d}"]["shard"] for p in parts_all if finals[f"final-{p:06d}"]["shard"]]
    reasons: Counter = Counter()
    for r in results:
        reasons.update(r["reasons"])
    reasons.update(dd.reasons)
    inputs = [i for m in manifests for h in m["history"] for i in h.get("inputs", [])]
    report = IngestReport(library=str(out), action=ACTION, resumed_shards=resumed)
    report.records_read = sum(r["records_read"] for r in results)
    report.by_reason = dict(reasons)
    report.rejected = sum(reasons.values())
    report.rows_added = sum(s["rows"] for s in new_shards)
    report.shards_added = [s["name"] for s in new_shards]
    # keep_first: the pieces' duplicates are their duplicate_<key> rejects; keep_all: rows the merge flags
    report.duplicates = dd.duplicates + sum(r["reasons"].get(c, 0) for r in results for c in DUPLICATE_REASONS)
    report.rejects_file = write_rejects(out, work, parts_all, [SimpleNamespace(path=i["path"]) for i in inputs],
                                        WORK_DIR)
    report.stage_seconds = {"read_pieces": round(sum(r["seconds"] for r in results), 3),
                            "dedupe": round(dd.seconds, 3),
                            "finalize": round(sum(r.get("seconds", 0.0) for r in finals.values()), 3),
                            "rejects": round(time.perf_counter() - t1, 3)}
    report.seconds = round(time.perf_counter() - t_start, 3)
    assert report.rows_added + report.rejected == report.records_read, "row accounting broken"
    return report, new_shards, inputs


def _merged_manifest(manifests: list[dict], pieces: list[Path], hashes: list[str], report: IngestReport,
                     new_shards: list[dict], inputs: list[dict], key: str, run: _MergeRun,
                     ledger: Ledger) -> dict:
    """The new library's manifest: the pieces' settings, the merged shards, one history entry."""
    m0 = manifests[0]
    manifest = new_manifest(m0["featurizer"], m0["standardize"], list(m0["descriptors"]), m0["dedupe"]["mode"],
                            m0["id_prefix"], m0["dedupe"]["key"])
    manifest["featurizer"] = m0["featurizer"]  # the pieces' RDKit made these fingerprints, not this one
    manifest["shards"] = new_shards
    manifest["n_rows"] = report.rows_added
    manifest["history"].append(report.history_entry(
        key, inputs, ledger.run_summary(),
        exact=not run.not_exact, not_exact=run.not_exact, not_exact_records=run.inexact,
        pieces=[{"path": str(p), "manifest_sha256": h, "rows": m["n_rows"], "shards": len(m["shards"]),
                 "records_read": r["records_read"], "rejected": r["carried"],
                 "generated_ids": r["generated_ids"], "history": m["history"]}
                for p, h, m, r in zip(pieces, hashes, manifests, run.results)]))
    manifest["rejected_total"] = report.rejected
    return manifest
