"""Build and append: deposit files -> new shards of a library, resumable and deduplicated.

Three phases, each over the same deterministic list of parts (chunk ``i`` = input
records ``[i*chunk_size, (i+1)*chunk_size)`` in input order):

1. map (Ray tasks, ledgered): parse, standardize, identify, featurize one chunk and
   write it as a *part* (Parquet + ``.npy``) under ``_work/<action>/``.
2. dedupe (driver, in input order, cheap): decide for every row whether it is kept
   (first occurrence of its InChIKey, or of its canonical SMILES with ``dedupe_key=smiles``;
   unused id), and give it its library ordinal and id.
3. finalize (Ray tasks, ledgered): write each part's kept rows as a shard sorted by
   popcount (``shards/.tmp-*`` renamed into place), and the dropped rows as rejects.

Then one commit: the rejects file, the manifest with the new shards and a history
entry (atomic rename), and the work directory is removed. A kill at any point leaves a
rerun of the same command to finish the job with the same shards, byte for byte.
"""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

from biogen.chem.descriptors import DEFAULT_DESCRIPTORS, validate_descriptor_names
from biogen.chem.fingerprints import FingerprintSpec, popcounts
from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec, descriptor_arrow_types
from biogen.chem.readers import InputInfo, ReaderOptions, inspect_input, iter_records, resolve_inputs
from biogen.chem.records import RawRecord, RecordBatch, Reject
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.library.manifest import (
    MANIFEST, SHARD_FILES, atomic_path, new_manifest, now_iso, read_manifest, tool_versions, write_manifest,
)
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards
from biogen.files import json_digest, sha256_file

log = logging.getLogger(__name__)
DEDUPE_MODES = ("keep_first", "keep_all")
# what identifies a compound: InChIKey (standard, ~230 us per molecule to compute, more than
# parsing and fingerprinting together) or the canonical SMILES (no InChIKey column)
DEDUPE_KEYS = ("inchikey", "smiles")
KEY_NAMES = {"inchikey": "InChIKey", "smiles": "canonical SMILES"}
DUPLICATE_REASONS = tuple(f"duplicate_{k}" for k in DEDUPE_KEYS)
WORK = "_work"


@dataclass
class IngestReport:
    """What one build or append did (also stored as the manifest's history entry)."""

    library: str
    action: str
    records_read: int = 0
    rows_added: int = 0
    rejected: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    shards_added: list[str] = field(default_factory=list)
    rejects_file: str | None = None
    seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)
    resumed_shards: int = 0
    already_done: bool = False

    def summary(self) -> str:
        if self.already_done:
            return f"{self.library}: already holds this deposit (same files, same parameters); nothing to do"
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items())) or "none"
        return (f"{self.action} {self.library}: read {self.records_read} records, added "
                f"{self.rows_added} molecules in {len(self.shards_added)} shards, rejected "
                f"{self.rejected} ({reasons}) in {self.seconds:.1f}s"
                + (f"; rejects: {self.rejects_file}" if self.rejects_file else ""))


# ----------------------------------------------------------------------------- phase 1: map
_PROCESSORS: dict[tuple[ProcessorSpec, bool], MoleculeProcessor] = {}


def _processor(spec: ProcessorSpec, inchikey: bool) -> MoleculeProcessor:
    proc = _PROCESSORS.get((spec, inchikey))
    if proc is None:
        proc = _PROCESSORS[spec, inchikey] = MoleculeProcessor(spec, identity=inchikey)
    return proc


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")


def map_part(work: str, part: int, records: Sequence[RawRecord], spec: ProcessorSpec, inchikey: bool = True):
    """Phase-1 task: one chunk of raw records -> part files. Returns (outputs, result).
    inchikey=False (``dedupe_key=smiles``): the InChIKey column is left empty."""
    work = Path(work)
    t0 = time.perf_counter()
    chunk = _processor(spec, inchikey).process(records)
    t1 = time.perf_counter()
    cols = {
        "source": pa.array(chunk.source, pa.string()),
        "record": pa.array(chunk.record, pa.int64()),
        "id": pa.array(chunk.id, pa.string()),
        "smiles": pa.array(chunk.smiles, pa.string()),
        "inchikey": pa.array(chunk.inchikey, pa.string()),
        "raw": pa.array(chunk.raw, pa.string()),
        "props": pa.array(chunk.props, pa.string()),
    }
    for name, typ in descriptor_arrow_types(spec.descriptors).items():
        cols[name] = pa.array(chunk.descriptors[name], typ)
    stem = f"parts/{part:06d}"
    (work / "parts").mkdir(exist_ok=True)
    with atomic_path(work / f"{stem}.parquet") as tmp:
        pq.write_table(pa.table(cols), tmp, compression="zstd")
    with atomic_path(work / f"{stem}.fp.npy") as tmp:
        np.save(tmp, chunk.fps)
    _write_jsonl(work / f"{stem}.rejects.jsonl", [asdict(r) for r in chunk.rejects])
    timings = dict(chunk.timings)
    timings["write"] = time.perf_counter() - t1
    timings["task"] = time.perf_counter() - t0
    result = {"n_in": chunk.n_in, "rows": len(chunk), "rejected": len(chunk.rejects),
              "reasons": dict(Counter(r.reason for r in chunk.rejects)), "timings": timings}
    return [f"{stem}.parquet", f"{stem}.fp.npy", f"{stem}.rejects.jsonl"], result


# ------------------------------------------------------------------------ phase 3: finalize
def finalize_part(work: str, lib_dir: str, part: int, shard_name: str, keep: np.ndarray,
                  ids: list[str], dup_of: list[str | None], ordinals: np.ndarray,  # ids, dup_of: all rows; ordinals: kept rows
                  drops: list[tuple[int, str, str]]):
    """Phase-3 task: kept rows of a part -> one popcount-sorted shard; dropped -> rejects."""
    t0 = time.perf_counter()
    work, lib_dir = Path(work), Path(lib_dir)
    stem = f"parts/{part:06d}"
    table = pq.read_table(work / f"{stem}.parquet")
    fps = np.load(work / f"{stem}.fp.npy")
    rejects = []
    if drops:
        src, rec, raw = (table.column(c).to_pylist() for c in ("source", "record", "raw"))
        rid = table.column("id").to_pylist()
        rejects = [asdict(Reject(src[i], rec[i], code, detail, raw[i], rid[i])) for i, code, detail in drops]
    _write_jsonl(work / f"{stem}.dropped.jsonl", rejects)
    outputs = [f"{stem}.dropped.jsonl"]
    result = {"shard": None, "rows": 0}
    idx = np.flatnonzero(keep)
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
        shards = lib_dir / "shards"
        final = shards / shard_name
        if final.exists():  # left by a kill between rename and ledger record: redo it
            shutil.rmtree(final)
        tmp = shards / f".tmp-{shard_name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        pq.write_table(meta, tmp / "meta.parquet", compression="zstd")
        np.save(tmp / "fp.npy", np.ascontiguousarray(fps[order]))
        np.save(tmp / "popcnt.npy", pc[order])
        for f in SHARD_FILES:
            with open(tmp / f, "rb") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, final)
        files = {f: {"sha256": sha256_file(final / f), "bytes": (final / f).stat().st_size}
                 for f in SHARD_FILES}
        rel = os.path.relpath(final, work)
        outputs += [f"{rel}/{f}" for f in SHARD_FILES]
        result = {"shard": {"name": shard_name, "rows": int(len(idx)),
                            "popcount_min": int(pc.min()), "popcount_max": int(pc.max()),
                            "files": files}, "rows": int(len(idx))}
    result["seconds"] = time.perf_counter() - t0
    return outputs, result


# ---------------------------------------------------------------------------- the job itself
@contextmanager
def _locked(lib_dir: Path) -> Iterator[None]:
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


def _chunks(infos: list[InputInfo], opts: ReaderOptions, size: int) -> Iterator[tuple[int, RecordBatch]]:
    """The records of all inputs in chunks of ``size``, as batches that cross to the Ray
    tasks column-wise (a list would be pickled record by record in the driver)."""
    part, buf = 0, []
    for info in infos:
        for rec in iter_records(info, opts):
            buf.append(rec)
            if len(buf) == size:
                yield part, RecordBatch(buf)
                part, buf = part + 1, []
    if buf:
        yield part, RecordBatch(buf)


def _preflight(inputs: str | Sequence[str], opts: ReaderOptions) -> list[InputInfo]:
    infos = [inspect_input(p, opts) for p in resolve_inputs(inputs)]
    for info in infos:
        if info.records_estimate == 0:
            log.warning("input %s holds no records", info.path)
        if info.truncated:
            log.warning("input %s: %s; the records before the cut are used and the cut is "
                        "reported in the rejects file", info.path, info.truncated)
    if all(i.bytes == 0 for i in infos):
        raise InputError("no records in " + ", ".join(i.path for i in infos) + " (empty files)")
    return infos


def _job_key(action: str, spec: ProcessorSpec, infos: list[InputInfo], opts: ReaderOptions,
             chunk_size: int, dedupe: str, id_prefix: str, base: dict | None, dedupe_key: str = "inchikey") -> str:
    state = {"action": action, "spec": spec.to_dict(), "reader": asdict(opts), "chunk_size": chunk_size,
             "dedupe": dedupe, "id_prefix": id_prefix,
             **({} if dedupe_key == "inchikey" else {"dedupe_key": dedupe_key}),  # keys of older builds stay
             "inputs": [(i.path, i.sha256) for i in infos],
             "base": None if base is None else [base["n_rows"], [s["name"] for s in base["shards"]]],
             "versions": tool_versions()}  # never resume with parts made by another RDKit
    return json_digest(state)


def _deposit_key(infos: list[InputInfo], opts: ReaderOptions) -> str:
    """Identity of a deposit: the input files' content and how they are read."""
    state = {"inputs": sorted(i.sha256 for i in infos), "reader": asdict(opts)}
    return json_digest(state)


def _existing_keys(lib_dir: Path, manifest: dict) -> tuple[dict[str, str], set[str]]:
    """Dedupe key (InChIKey or canonical SMILES) -> id of its first occurrence, and all
    ids, over the library's shards."""
    first: dict[str, str] = {}
    ids: set[str] = set()
    column = manifest["dedupe"]["key"]
    for s in manifest["shards"]:
        t = pq.read_table(lib_dir / "shards" / s["name"] / "meta.parquet",
                          columns=["id", column, "duplicate_of"])
        for key, rid, dup in zip(t.column(column).to_pylist(), t.column("id").to_pylist(),
                                 t.column("duplicate_of").to_pylist()):
            ids.add(rid)
            if dup is None:
                first.setdefault(key, rid)
    return first, ids


def duplicate_detail(key: str, kept_id: str, key_kind: str = "inchikey") -> str:
    """The rejects-file detail of a ``duplicate_<key_kind>`` reject (``library merge`` parses it back)."""
    return f"same compound ({KEY_NAMES[key_kind]} {key}) as library id {kept_id}"


@dataclass
class _Dedupe:
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


def _plan_dedupe(work: Path, parts: list[int], st: _Dedupe) -> Iterator[tuple]:
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
                    drops.append((i, f"duplicate_{st.key}", duplicate_detail(key, seen, st.key)))
                    continue
            if rid is None:  # a registry id from the ordinal; skip numbers taken by given ids
                serial = st.ordinal + 1
                while f"{st.id_prefix}{serial:09d}" in st.ids:
                    serial += 1
                rid = f"{st.id_prefix}{serial:09d}"
            elif rid in st.ids:
                drops.append((i, "duplicate_id",
                              f"id {rid!r} is already used in this library by another record; "
                              "give the record a unique id"))
                continue
            keep[i], out_ids[i], ordinals[i] = True, rid, st.ordinal
            st.ordinal += 1
            st.ids.add(rid)
            if seen is None:
                st.first[key] = rid
            else:
                dup_of[i] = seen
        st.reasons.update(code for _, code, _ in drops)
        st.seconds += time.perf_counter() - t0
        yield part, keep, out_ids, dup_of, ordinals[keep], drops


def _write_rejects(lib_dir: Path, work: Path, parts: list[int], infos: list[InputInfo], name: str) -> str:
    order = {i.path: k for k, i in enumerate(infos)}
    rel = f"rejects/{name}.csv"
    path = lib_dir / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(Reject.COLUMNS)
        for part in parts:
            rows = []
            for suffix in ("rejects", "dropped"):
                with open(work / f"parts/{part:06d}.{suffix}.jsonl") as rf:
                    rows += [json.loads(line) for line in rf]
            rows.sort(key=lambda r: (order.get(r["source"], 0), r["record"]))
            for r in rows:
                w.writerow([r[c] if r[c] is not None else "" for c in Reject.COLUMNS])
    os.replace(tmp, path)
    return rel


def _clean_committed_work(lib_dir: Path, manifest: dict) -> None:
    """Remove work directories of jobs already in the history (a kill right after commit)."""
    work_root = lib_dir / WORK
    if not work_root.is_dir():
        return
    done = {h.get("job_key") for h in manifest["history"]}
    for d in work_root.iterdir():
        try:
            key = json.loads((d / "ledger.jsonl").read_text().splitlines()[0])["job_key"]
        except (OSError, IndexError, ValueError, KeyError):
            continue
        if key in done:
            shutil.rmtree(d, ignore_errors=True)
    if not any(work_root.iterdir()):
        work_root.rmdir()


def _run(lib_dir: Path, manifest: dict, infos: list[InputInfo], opts: ReaderOptions, *,
         action: str, spec: ProcessorSpec, chunk_size: int, runtime: RuntimeSpec, job_key: str) -> IngestReport:
    t_start = time.perf_counter()
    _clean_committed_work(lib_dir, manifest)
    hist = len(manifest["history"])
    work = lib_dir / WORK / f"{hist:03d}-{action}"
    ledger = Ledger(work / "ledger.jsonl", job_key)
    resumed = len(ledger.entries)
    if resumed:
        log.info("resuming %s: %d shard steps already done", work, resumed)
    est = sum(i.records_estimate for i in infos)
    n_parts_est = max(1, -(-est // chunk_size))
    report = IngestReport(library=str(lib_dir), action=action, resumed_shards=resumed)
    with ray_session(runtime) as slots:
        key = manifest["dedupe"]["key"]
        shards = ((f"map-{p:06d}", (str(work), p, recs, spec, key == "inchikey"))
                  for p, recs in _chunks(infos, opts, chunk_size))
        mapped = run_shards(map_part, shards, ledger=ledger, spec=runtime, slots=slots,
                            desc=f"{action}: featurize", total=n_parts_est)
        parts = sorted(int(k.split("-")[1]) for k in mapped)
        report.records_read = sum(r["n_in"] for r in mapped.values())
        if report.records_read == 0:
            raise InputError("no records found in " + ", ".join(i.path for i in infos)
                             + " (only empty lines or comments)")
        t0 = time.perf_counter()
        dd = _Dedupe(*_existing_keys(lib_dir, manifest), ordinal=manifest["n_rows"],
                     mode=manifest["dedupe"]["mode"], id_prefix=manifest["id_prefix"], key=key)
        dd.seconds = time.perf_counter() - t0
        fin_shards = ((f"final-{p:06d}", (str(work), str(lib_dir), p, f"{hist:03d}-{p:06d}", keep, rid, dup, ords, drops))
                      for p, keep, rid, dup, ords, drops in _plan_dedupe(work, parts, dd))
        finals = run_shards(finalize_part, fin_shards, ledger=ledger, spec=runtime, slots=slots,
                            desc=f"{action}: write shards", total=len(parts))
        report.duplicates = dd.duplicates
        dd.first, dd.ids = {}, set()  # free the index before the commit
    new_shards = [finals[f"final-{p:06d}"]["shard"] for p in parts if finals[f"final-{p:06d}"]["shard"]]
    reasons: Counter = Counter()
    for r in mapped.values():
        reasons.update(r["reasons"])
    reasons.update(dd.reasons)
    stage = Counter()
    for r in mapped.values():
        stage.update(r["timings"])
    stage["dedupe"] = dd.seconds  # driver, serial (overlaps with finalize tasks)
    stage["finalize"] = sum(r.get("seconds", 0.0) for r in finals.values())  # sort + write shards
    report.by_reason = dict(reasons)
    report.rejected = sum(reasons.values())
    report.rows_added = sum(s["rows"] for s in new_shards)
    report.shards_added = [s["name"] for s in new_shards]
    report.stage_seconds = {k: round(v, 3) for k, v in stage.items()}
    report.rejects_file = _write_rejects(lib_dir, work, parts, infos, f"{hist:03d}-{action}")
    report.seconds = round(time.perf_counter() - t_start, 3)
    assert report.rows_added + report.rejected == report.records_read, "row accounting broken"

    manifest["shards"].extend(new_shards)
    manifest["n_rows"] += report.rows_added
    manifest["history"].append({
        "action": action, "time": now_iso(), "job_key": job_key,
        "deposit_key": _deposit_key(infos, opts), "versions": tool_versions(),
        "inputs": [i.to_manifest() for i in infos], "chunk_size": chunk_size,
        "records_read": report.records_read, "rows_added": report.rows_added,
        "duplicates": report.duplicates, "rejected": report.rejected, "rejected_by_reason": report.by_reason,
        "rejects_file": report.rejects_file, "shards": report.shards_added, "seconds": report.seconds,
        "stage_seconds": report.stage_seconds, "resumed_shard_steps": resumed,
        "run": ledger.run_summary(),  # driver sessions, workers or nodes lost (the ledger goes with _work)
    })
    manifest["rejected_total"] = sum(h["rejected"] for h in manifest["history"])
    write_manifest(lib_dir, manifest)
    _clean_committed_work(lib_dir, manifest)
    return report


def clear_for_overwrite(out: Path) -> None:
    """overwrite=true: empty a library directory (or an unfinished job's) under its lock."""
    if (out / MANIFEST).exists() or (out / WORK).exists():
        log.warning("overwrite=true: removing the library at %s", out)
        for child in out.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def build_library(
    inputs: str | Sequence[str],
    output: str | Path,
    *,
    featurizer: FingerprintSpec = FingerprintSpec(),
    standardize: StandardizeSpec = StandardizeSpec(),
    descriptors: Sequence[str] = DEFAULT_DESCRIPTORS,
    reader: ReaderOptions = ReaderOptions(),
    dedupe: str = "keep_first",
    dedupe_key: str = "inchikey",
    id_prefix: str = "BG",
    chunk_size: int = 10_000,
    overwrite: bool = False,
    runtime: RuntimeSpec = RuntimeSpec(),
) -> IngestReport:
    """Build a new library at ``output`` from deposit files (see module docstring)."""
    if dedupe not in DEDUPE_MODES:
        raise ConfigError(f"dedupe={dedupe!r} is not valid; choose one of {', '.join(DEDUPE_MODES)}")
    if dedupe_key not in DEDUPE_KEYS:
        raise ConfigError(f"dedupe_key={dedupe_key!r} is not valid; choose one of {', '.join(DEDUPE_KEYS)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    spec = ProcessorSpec(featurizer, standardize, validate_descriptor_names(descriptors))
    infos = _preflight(inputs, reader)
    out = Path(output).absolute()  # tasks may run on other nodes with another cwd
    created = not out.exists()
    key = _job_key("build", spec, infos, reader, chunk_size, dedupe, id_prefix, None, dedupe_key)
    if out.exists():
        if not out.is_dir():
            raise LibraryError(f"output={out} exists and is a file; choose a directory path")
        has_lib = (out / MANIFEST).exists()
        has_work = (out / WORK).exists()
        if overwrite and (has_lib or has_work):
            pass  # replaced below, under the library's lock
        elif has_lib:
            existing = read_manifest(out)
            builds = [h for h in existing["history"] if h["action"] == "build"]
            if builds and builds[0].get("job_key") == key and len(existing["history"]) == 1:
                _clean_committed_work(out, existing)
                return IngestReport(library=str(out), action="build", already_done=True)
            raise LibraryError(
                f"output={out} already holds a different library ({existing['n_rows']} molecules, "
                f"{len(existing['history'])} history entries); add to it with `biogen library append "
                f"library={out} input=...`, choose another output, or pass overwrite=true to replace it"
            )
        elif not has_work and any(p.name != ".lock" for p in out.iterdir()):
            raise LibraryError(
                f"output={out} is a non-empty directory that is not a biogen library; "
                "choose a new or empty directory (overwrite=true only replaces libraries)"
            )
    manifest = new_manifest(featurizer.to_dict(), standardize.to_dict(), list(descriptors), dedupe, id_prefix,
                            dedupe_key)
    with _locked(out):
        if overwrite:
            clear_for_overwrite(out)
        try:
            return _run(out, manifest, infos, reader, action="build", spec=spec, chunk_size=chunk_size,
                        runtime=runtime, job_key=key)
        except InputError:
            shutil.rmtree(out if created else out / WORK, ignore_errors=True)
            raise


def append_library(
    library: str | Path,
    inputs: str | Sequence[str],
    *,
    reader: ReaderOptions = ReaderOptions(),
    chunk_size: int = 10_000,
    runtime: RuntimeSpec = RuntimeSpec(),
) -> IngestReport:
    """Add a new deposit to an existing library: new shards, dedupe against what exists.

    Featurizer, standardization, descriptors and dedupe mode come from the manifest, so
    the new rows are made exactly like the old ones.
    """
    lib = Path(library).absolute()
    manifest = read_manifest(lib)
    spec = ProcessorSpec(FingerprintSpec.from_dict(manifest["featurizer"]),
                         StandardizeSpec(**manifest["standardize"]), tuple(manifest["descriptors"]))
    from rdkit import rdBase

    built_with = manifest["featurizer"].get("rdkit_version")
    if built_with and built_with != rdBase.rdkitVersion:
        log.warning("library %s was built with RDKit %s, this is RDKit %s: fingerprints and "
                    "InChIKeys of new rows may differ slightly from the old ones",
                    lib, built_with, rdBase.rdkitVersion)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    infos = _preflight(inputs, reader)
    with _locked(lib):
        manifest = read_manifest(lib)  # re-read under the lock
        deposit = _deposit_key(infos, reader)
        for n, h in enumerate(manifest["history"]):
            if h.get("deposit_key") == deposit:
                _clean_committed_work(lib, manifest)
                log.warning("these input files (same sha256) were already added as history entry %d "
                            "(%s, %s); nothing to do", n, h["action"], h["time"])
                return IngestReport(library=str(lib), action="append", already_done=True)
        key = _job_key("append", spec, infos, reader, chunk_size, manifest["dedupe"]["mode"],
                       manifest["id_prefix"], manifest, manifest["dedupe"]["key"])
        try:
            return _run(lib, manifest, infos, reader, action="append", spec=spec,
                        chunk_size=chunk_size, runtime=runtime, job_key=key)
        except InputError:
            shutil.rmtree(lib / WORK / f"{len(manifest['history']):03d}-append", ignore_errors=True)
            raise
