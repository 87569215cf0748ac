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
2. dedupe + write (the build's ``plan_dedupe`` and ``finalize_part``): across pieces, by
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
equal to an id the piece generated). The merge detects these records; with ``exact=True``
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.pipeline import descriptor_arrow_types
from biogen.chem.records import Reject
from biogen.errors import ConfigError, LibraryError
from biogen.library.ingest import IngestReport
from biogen.library.parts import (
    DUPLICATE_REASONS, WORK, Dedupe, DedupePlan, FinalizeTask, clean_committed_work, clear_for_overwrite,
    duplicate_detail, empty_part_columns, generated_id_pattern, finalize_part, legacy_duplicate_key, locked, part_stem, plan_dedupe,
    write_jsonl, write_part, write_rejects,
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

    def message(self) -> str:
        shown = "; ".join(f"{r['source']} record {r['record']} (id {r['id']}, {r['reason']} in piece {r['piece']})"
                          for r in self.inexact[:SHOWN])
        more = f" and {len(self.inexact) - SHOWN} more" if len(self.inexact) > SHOWN else ""
        return (f"{len(self.inexact)} record(s) rejected by their piece as duplicates would be kept by one build of "
                f"all inputs: {shown}{more}. Their piece rejected them against a row that the merge drops (its id is "
                "used by an earlier piece) or renumbers (a given id equal to an id the piece generated)")


def _plans(work: Path, pieces_parts: list[list[int]], dd: Dedupe, check: _Exactness) -> Iterator[DedupePlan]:
    """``plan_dedupe`` over all parts, checking each piece once it is planned (the generator
    is advanced only after the previous part's plan was handed on)."""
    last = {parts[-1]: parts for parts in pieces_parts}
    for plan in plan_dedupe(work, [p for parts in pieces_parts for p in parts], dd):
        check.planned(plan.part, plan.keep, plan.ids)
        yield plan
        if plan.part in last:
            check.piece_done(last[plan.part])


# ------------------------------------------------------------------------- step 3: commit
def _rewrite_rejects(work: Path, parts: Sequence[int], first: dict[str, str]) -> None:
    """Carried rejects -> the part's ``rejects.jsonl`` that ``write_rejects`` reads; a carried
    duplicate names the merged library's kept id (as one build would)."""
    for p in parts:
        rows = [r for _, r in _carried(work, [p])]
        for r in rows:
            key = r["key"] if r["reason"] in DUPLICATE_REASONS else None
            if key in first:
                r["duplicate_of"] = first[key]
                r["detail"] = duplicate_detail(key, first[key], r["reason"].removeprefix("duplicate_"))
        write_jsonl(work / f"parts/{p:06d}.rejects.jsonl", rows)


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
) -> IngestReport:
    """Merge library pieces (a list in the order given, or a glob in natural order) into a new
    library at ``output`` equal to one build of their concatenated inputs (module docstring)."""
    t_start = time.perf_counter()
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
        run = _merge_pieces(work, out, pieces, manifests, pieces_parts, ledger, runtime)
        if run.check.inexact:
            if exact:
                raise LibraryError(run.check.message() + ". Give the pieces' records unique ids (or none), or pass "
                                   "exact=false to merge anyway: these records stay rejected and the merged library "
                                   "differs from one build in them (the finished work is kept for that rerun)")
            log.warning("%s; merged anyway (exact=false), they stay rejected", run.check.message())
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
    dedupe state and the exactness check."""

    results: list[dict]
    finals: dict[str, dict]
    dedupe: Dedupe
    check: _Exactness


def _merge_pieces(work: Path, out: Path, pieces: list[Path], manifests: list[dict], pieces_parts: list[list[int]],
                  ledger: Ledger, runtime: RuntimeSpec) -> _MergeRun:
    """Step 1 (pieces -> parts) and step 2 (dedupe in input order, then the shards), ledgered."""
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
        check = _Exactness(work, dd, pieces, part_piece)
        fin = ((f"final-{plan.part:06d}", (FinalizeTask(str(work), str(out), f"000-{plan.part:06d}", plan),))
               for plan in _plans(work, pieces_parts, dd, check))
        finals = run_shards(finalize_part, fin, ledger=ledger, spec=runtime, slots=slots,
                            desc="merge: write shards", total=len(parts_all))
    return _MergeRun(results, finals, dd, check)


def _merge_report(out: Path, work: Path, manifests: list[dict], pieces_parts: list[list[int]], run: _MergeRun,
                  resumed: int, t_start: float) -> tuple[IngestReport, list[dict], list[dict]]:
    """Step 3 before the commit: the rejects file (the pieces' rejects, then the merge's own);
    the report, the new shards' manifest entries and the pieces' inputs."""
    t1 = time.perf_counter()
    parts_all = [p for pp in pieces_parts for p in pp]
    results, finals, dd = run.results, run.finals, run.dedupe
    _rewrite_rejects(work, parts_all, dd.first)
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
    inexact = run.check.inexact
    manifest["history"].append(report.history_entry(
        key, inputs, ledger.run_summary(),
        exact=not inexact, not_exact=len(inexact), not_exact_records=inexact[:100],
        pieces=[{"path": str(p), "manifest_sha256": h, "rows": m["n_rows"], "shards": len(m["shards"]),
                 "records_read": r["records_read"], "rejected": r["carried"],
                 "generated_ids": r["generated_ids"], "history": m["history"]}
                for p, h, m, r in zip(pieces, hashes, manifests, run.results)]))
    manifest["rejected_total"] = report.rejected
    return manifest
