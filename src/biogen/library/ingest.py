"""Build and append: deposit files -> new shards of a library, resumable and deduplicated.

Three phases, each over the same deterministic list of parts (chunk ``i`` = input
records ``[i*chunk_size, (i+1)*chunk_size)`` in input order, across input files):

1. map (Ray tasks, ledgered): read, parse, standardize, identify, featurize one chunk
   and write it as a *part* (Parquet + ``.npy``) under ``_work/<action>/``. Who reads the
   records (``biogen.library.reading``, ``reader.parallel``): the tasks themselves, from
   byte ranges of the inputs counted by a first round of tasks (the driver sees only
   plans and counts; gzip files are read whole by one task each), or, for small
   inputs, the driver, which ships each chunk's records to its task. Same parts.
2. dedupe, in input order: decide for every row whether it is kept (first occurrence of
   its InChIKey, or of its canonical SMILES with ``dedupe_key=smiles``; unused id), and give
   it its library ordinal and id. Below ``dedupe_partitions=auto``'s threshold the driver's
   planner (``parts.plan_dedupe``, one index); above it, or with ``dedupe_partitions=P``,
   Ray tasks over P key partitions (``biogen.library.dedupe``): the same decisions.
3. finalize (Ray tasks, ledgered): write each part's kept rows as a shard sorted by
   popcount (``shards/.tmp-*`` renamed into place), and the dropped rows as rejects.

Then one commit: the rejects file, the manifest with the new shards and a history
entry (atomic rename), and the work directory is removed. A kill at any point leaves a
rerun of the same command to finish the job with the same shards, byte for byte.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.descriptors import DEFAULT_DESCRIPTORS, validate_descriptor_names
from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.pipeline import MoleculeProcessor, ProcessorSpec, descriptor_arrow_types
from biogen.chem.ranges import ChunkPlan
from biogen.chem.readers import InputInfo, ReaderOptions, inspect_input, resolve_inputs
from biogen.chem.records import RecordBatch
from biogen.chem.standardize import StandardizeSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.files import json_digest
from biogen.library.dedupe import (
    PartitionedDedupe, PlannedPart, choose_partitions, index_segments, prune_index, run_step, sticky_partitions,
    work_tag,
)
from biogen.library.manifest import MANIFEST, new_manifest, now_iso, read_manifest, tool_versions, write_manifest
from biogen.library.parts import (
    DEDUPE_KEYS, PART_COLUMNS, WORK, Dedupe, FinalizeTask, clean_committed_work, clear_for_overwrite, finalize_part, locked,
    part_stem, plan_dedupe, write_jsonl, write_part, write_rejects,
)
from biogen.library.reading import open_chunks
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards

log = logging.getLogger(__name__)
DEDUPE_MODES = ("keep_first", "keep_all")


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
    embeddings: list[dict] = field(default_factory=list)  # embedding runs that completed the new rows

    def history_entry(self, job_key: str, inputs: list[dict], run: dict, **extra) -> dict:
        """The manifest's history entry of this job (build, append, merge): what was read,
        added and rejected, where the rejects are, the time per stage; ``extra``: the
        action's own facts (a deposit's key, a merge's pieces); ``run``: the ledger's summary
        of driver sessions and lost workers."""
        return {"action": self.action, "time": now_iso(), "job_key": job_key, "versions": tool_versions(),
                "inputs": inputs, "records_read": self.records_read, "rows_added": self.rows_added,
                "duplicates": self.duplicates, "rejected": self.rejected, "rejected_by_reason": self.by_reason,
                "rejects_file": self.rejects_file, "shards": self.shards_added, "seconds": self.seconds,
                "stage_seconds": self.stage_seconds, "resumed_shard_steps": self.resumed_shards, **extra,
                "run": run}

    def summary(self) -> str:
        if self.already_done:
            return (f"{self.library}: already holds this deposit (same files, same parameters); nothing to do"
                    + "".join(f"; {e['model']} embeddings completed: {e['rows']:,} rows" for e in self.embeddings
                              if e["rows"]))
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.by_reason.items())) or "none"
        return (f"{self.action} {self.library}: read {self.records_read} records, added "
                f"{self.rows_added} molecules in {len(self.shards_added)} shards, rejected "
                f"{self.rejected} ({reasons}) in {self.seconds:.1f}s"
                + (f"; rejects: {self.rejects_file}" if self.rejects_file else "")
                + "".join(f"; {e['model']} embeddings: {e['rows']:,} new rows ({e['failed']:,} without a vector)"
                          for e in self.embeddings))


# ----------------------------------------------------------------------------- phase 1: map
_PROCESSORS: dict[tuple[ProcessorSpec, bool], MoleculeProcessor] = {}


def _processor(spec: ProcessorSpec, inchikey: bool) -> MoleculeProcessor:
    proc = _PROCESSORS.get((spec, inchikey))
    if proc is None:
        proc = _PROCESSORS[spec, inchikey] = MoleculeProcessor(spec, identity=inchikey)
    return proc




def map_part(work: str, part: int, source: RecordBatch | ChunkPlan, spec: ProcessorSpec, inchikey: bool = True):
    """Phase-1 task: one chunk -> part files. ``source``: the chunk's records (read by the
    driver) or where the task reads them. Returns (outputs, result). inchikey=False
    (``dedupe_key=smiles``): the InChIKey column is left empty."""
    work = Path(work)
    t0 = time.perf_counter()
    records = source.read()
    t_read = time.perf_counter() - t0
    chunk = _processor(spec, inchikey).process(records)
    t1 = time.perf_counter()
    cols = {c: pa.array(getattr(chunk, c), t) for c, t in PART_COLUMNS}
    for name, typ in descriptor_arrow_types(spec.descriptors).items():
        cols[name] = pa.array(chunk.descriptors[name], typ)
    outputs = write_part(work, part, cols, chunk.fps)
    stem = part_stem(part)
    write_jsonl(work / f"{stem}.rejects.jsonl", [asdict(r) for r in chunk.rejects])
    timings = {"read": t_read, **chunk.timings}
    timings["write"] = time.perf_counter() - t1
    timings["task"] = time.perf_counter() - t0
    result = {"n_in": chunk.n_in, "rows": len(chunk), "rejected": len(chunk.rejects),
              "reasons": dict(Counter(r.reason for r in chunk.rejects)), "timings": timings}
    return [*outputs, f"{stem}.rejects.jsonl"], result


# ------------------------------------------------------------------------ phase 3: finalize


# ---------------------------------------------------------------------------- the job itself


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
    state = {"action": action, "spec": spec.to_dict(), "reader": opts.identity(), "chunk_size": chunk_size,
             "dedupe": dedupe, "id_prefix": id_prefix,
             **({} if dedupe_key == "inchikey" else {"dedupe_key": dedupe_key}),  # keys of older builds stay
             "inputs": [(i.path, i.sha256) for i in infos],
             "base": None if base is None else [base["n_rows"], [s["name"] for s in base["shards"]]],
             "versions": tool_versions()}  # never resume with parts made by another RDKit
    return json_digest(state)


def _deposit_key(infos: list[InputInfo], opts: ReaderOptions) -> str:
    """Identity of a deposit: the input files' content and how they are read."""
    state = {"inputs": sorted(i.sha256 for i in infos), "reader": opts.identity()}
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


def _run(lib_dir: Path, manifest: dict, infos: list[InputInfo], opts: ReaderOptions, *,
         action: str, spec: ProcessorSpec, chunk_size: int, runtime: RuntimeSpec, job_key: str,
         dedupe_partitions: int | str = "auto") -> IngestReport:
    """Featurize the inputs (map), dedupe and write the new shards (finalize), record them."""
    t_start = time.perf_counter()
    clean_committed_work(lib_dir, manifest)
    hist = len(manifest["history"])
    work = lib_dir / WORK / f"{hist:03d}-{action}"
    ledger = Ledger(work / "ledger.jsonl", job_key)
    resumed = len(ledger.entries)
    if resumed:
        log.info("resuming %s: %d shard steps already done", work, resumed)
    report = IngestReport(library=str(lib_dir), action=action, resumed_shards=resumed)
    with ray_session(runtime) as slots:
        mapped = _map_phase(work, infos, opts, spec, chunk_size, manifest["dedupe"]["key"],
                            ledger, runtime, slots, action)
        parts = sorted(int(k.split("-")[1]) for k in mapped)
        report.records_read = sum(r["n_in"] for r in mapped.values())
        if report.records_read == 0:
            raise InputError("no records found in " + ", ".join(i.path for i in infos)
                             + " (only empty lines or comments)")
        part_rows = {int(k.split("-")[1]): r["rows"] for k, r in mapped.items()}
        partitions = sticky_partitions(dedupe_partitions, choose_partitions(
            dedupe_partitions, report.records_read + manifest["n_rows"], slots), lib_dir)
        dd, finals = _finalize_phase(lib_dir, manifest, work, parts, hist, ledger, runtime, slots, action,
                                     partitions, part_rows)
    new_shards = [finals[f"final-{p:06d}"]["shard"] for p in parts if finals[f"final-{p:06d}"]["shard"]]
    _tally(report, mapped, finals, dd, new_shards)
    report.rejects_file = write_rejects(lib_dir, work, parts, infos, f"{hist:03d}-{action}")
    report.seconds = round(time.perf_counter() - t_start, 3)
    assert report.rows_added + report.rejected == report.records_read, "row accounting broken"
    _commit(lib_dir, manifest, new_shards, report, report.history_entry(
        job_key, [i.to_manifest() for i in infos], ledger.run_summary(),  # the ledger goes with _work
        deposit_key=_deposit_key(infos, opts), chunk_size=chunk_size))
    prune_index(lib_dir, manifest, partitions)
    return report


def _map_phase(work: Path, infos: list[InputInfo], opts: ReaderOptions, spec: ProcessorSpec, chunk_size: int,
               key: str, ledger: Ledger, runtime: RuntimeSpec, slots: int, action: str) -> dict[str, dict]:
    """Featurize the inputs chunk by chunk into parts (Ray tasks); the chunks are read by
    the tasks or by the driver (``open_chunks``: after a counting round for the tasks)."""
    chunks = open_chunks(infos, opts, chunk_size, work, ledger=ledger, runtime=runtime, slots=slots, action=action)
    shards = ((f"map-{p:06d}", (str(work), p, chunk, spec, key == "inchikey")) for p, chunk in chunks)
    return run_shards(map_part, shards, ledger=ledger, spec=runtime, slots=slots,
                      desc=f"{action}: featurize", total=chunks.total)


def _finalize_phase(lib_dir: Path, manifest: dict, work: Path, parts: list[int], hist: int, ledger: Ledger,
                    runtime: RuntimeSpec, slots: int, action: str, partitions: int,
                    part_rows: dict[int, int]) -> tuple[Dedupe, dict[str, dict]]:
    """Dedupe the parts against the library and each other (the serial planner in the
    driver, or ``partitions`` key partitions in Ray tasks), then sort and write each part
    as a shard (Ray tasks)."""
    t0 = time.perf_counter()
    plans = None
    if partitions:
        dd = Dedupe({}, set(), ordinal=manifest["n_rows"], mode=manifest["dedupe"]["mode"],
                    id_prefix=manifest["id_prefix"], key=manifest["dedupe"]["key"])
        plans = partitioned_plans(lib_dir, manifest, work, parts, part_rows, partitions, dd, ledger, runtime,
                                   slots, action)
    if plans is None:
        dd = Dedupe(*_existing_keys(lib_dir, manifest), ordinal=manifest["n_rows"],
                    mode=manifest["dedupe"]["mode"], id_prefix=manifest["id_prefix"], key=manifest["dedupe"]["key"])
        plans = plan_dedupe(work, parts, dd)
    dd.seconds += time.perf_counter() - t0
    fin_shards = ((f"final-{plan.part:06d}", (FinalizeTask(str(work), str(lib_dir), f"{hist:03d}-{plan.part:06d}", plan),))
                  for plan in plans)
    finals = run_shards(finalize_part, fin_shards, ledger=ledger, spec=runtime, slots=slots,
                        desc=f"{action}: write shards", total=len(parts))
    dd.first, dd.ids = {}, set()  # free the index before the commit
    return dd, finals


def dedupe_round(pd: PartitionedDedupe, desc: str, tasks: list[tuple[str, tuple]], ledger: Ledger,
                 runtime: RuntimeSpec, slots: int, action: str) -> dict[str, dict]:
    """One round of a partitioned dedupe: ``(name, (step, *args))`` tasks of ``run_step``,
    ledgered under the hash scheme's tag (no mixing with another scheme's steps)."""
    tag = work_tag(pd.partitions)
    return run_shards(run_step, ((f"{tag}-{k}", (pd, *a)) for k, a in tasks), ledger=ledger, spec=runtime,
                      slots=slots, desc=f"{action}: dedupe {desc}", total=len(tasks))


def partitioned_plans(lib_dir: Path, manifest: dict, work: Path, parts: list[int], part_rows: dict[int, int],
                       partitions: int, dd: Dedupe, ledger: Ledger, runtime: RuntimeSpec, slots: int,
                       action: str, pd: PartitionedDedupe | None = None,
                       extra_split: Sequence[tuple[str, tuple]] = ()) -> list[PlannedPart] | None:
    """The hash-partitioned dedupe (``biogen.library.dedupe``): Ray tasks decide, the driver
    keeps one offset per part. None: the input needs the serial planner (logged).
    ``pd``/``extra_split``: a caller's own dedupe (``library merge``'s) and its round-1 tasks
    (their ``generated_like`` counts send the input to the serial planner too)."""
    if pd is None:
        pd = PartitionedDedupe(str(work), str(lib_dir), partitions, dd.key, dd.mode, dd.id_prefix, manifest["n_rows"])
    tag = work_tag(partitions)

    def rounds(desc: str, tasks: list[tuple[str, tuple]]) -> dict[str, dict]:
        return dedupe_round(pd, desc, tasks, ledger, runtime, slots, action)

    split = rounds("split", [(f"split-n{p:06d}", ("split_part", p)) for p in parts]
                   + [(f"split-l{seg.index:06d}", ("split_segment", seg)) for seg in index_segments(manifest)]
                   + list(extra_split))
    if manifest["shards"]:
        segs = [r for k, r in split.items() if "-split-l" in k]
        reused = [r for r in segs if r.get("index_reused")]
        log.info("dedupe: the library's key index held %d of its %d segments (%d of %d shards split now)",
                 len(reused), len(segs), len(manifest["shards"]) - sum(r["shards"] for r in reused),
                 len(manifest["shards"]))
    decided = rounds("decide", [(f"check-b{b:05d}", ("check_ids", b)) for b in range(partitions)]
                     + [(f"decide-b{b:05d}", ("decide", b)) for b in range(partitions)])
    generated_like = sum(r["generated_like"] for r in split.values())
    repeated = sum(r.get("repeated_ids", 0) for r in decided.values())
    if generated_like or repeated:
        log.warning("dedupe: %d given id(s) repeat or are already in the library, %d look like ids this "
                    "library generates (%s + 9 digits): the serial planner decides this input (same result; "
                    "its index is held in the driver)", repeated, generated_like, dd.id_prefix)
        return None
    ranked = rounds("rank", [(f"rank-n{p:06d}", ("rank_part", p, part_rows[p])) for p in parts])
    offsets = np.zeros(max(parts) + 1, dtype=np.int64)
    total = 0
    for p in parts:
        offsets[p] = total
        total += ranked[f"{tag}-rank-n{p:06d}"]["kept"]
    offsets_file = pd.root / "offsets.npy"
    np.save(offsets_file, offsets)
    dd.duplicates = sum(r.get("duplicates", 0) for r in decided.values())
    if dd.mode == "keep_first" and dd.duplicates:
        dd.reasons[f"duplicate_{dd.key}"] = dd.duplicates
    dd.ordinal += total
    log.info("dedupe: %d key partitions, %d duplicates, %d rows kept", partitions, dd.duplicates, total)
    return [PlannedPart(pd, p, str(offsets_file)) for p in parts]


def _tally(report: IngestReport, mapped: dict[str, dict], finals: dict[str, dict], dd: Dedupe,
           new_shards: list[dict]) -> None:
    """Duplicates, rejects by reason, rows and shards added, seconds per stage."""
    reasons: Counter = Counter()
    stage: Counter = Counter()
    for r in mapped.values():
        reasons.update(r["reasons"])
        stage.update(r["timings"])
    reasons.update(dd.reasons)
    stage["dedupe"] = dd.seconds  # driver, serial (overlaps with finalize tasks)
    stage["finalize"] = sum(r.get("seconds", 0.0) for r in finals.values())  # sort + write shards
    report.duplicates = dd.duplicates
    report.by_reason = dict(reasons)
    report.rejected = sum(reasons.values())
    report.rows_added = sum(s["rows"] for s in new_shards)
    report.shards_added = [s["name"] for s in new_shards]
    report.stage_seconds = {k: round(v, 3) for k, v in stage.items()}


def _commit(lib_dir: Path, manifest: dict, new_shards: list[dict], report: IngestReport, entry: dict) -> None:
    """The new shards and the history entry into the manifest (the commit point)."""
    manifest["shards"].extend(new_shards)
    manifest["n_rows"] += report.rows_added
    manifest["history"].append(entry)
    manifest["rejected_total"] = sum(h["rejected"] for h in manifest["history"])
    write_manifest(lib_dir, manifest)
    clean_committed_work(lib_dir, manifest)


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
    embeddings: Sequence[str] = (),
    dedupe_partitions: int | str = "auto",
) -> IngestReport:
    """Build a new library at ``output`` from deposit files (see module docstring).
    ``embeddings``: compound models (e.g. ``["minimol"]``) whose vectors are stored too."""
    from biogen.embeddings.base import check_model_name

    embeddings = [check_model_name(m) for m in embeddings]  # a typo fails before any work
    if dedupe not in DEDUPE_MODES:
        raise ConfigError(f"dedupe={dedupe!r} is not valid; choose one of {', '.join(DEDUPE_MODES)}")
    if dedupe_key not in DEDUPE_KEYS:
        raise ConfigError(f"dedupe_key={dedupe_key!r} is not valid; choose one of {', '.join(DEDUPE_KEYS)}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size={chunk_size} must be >= 1")
    choose_partitions(dedupe_partitions, 0, 1)  # a bad setting fails before any work
    spec = ProcessorSpec(featurizer, standardize, validate_descriptor_names(descriptors))
    infos = _preflight(inputs, reader)
    out = Path(output).absolute()  # tasks may run on other nodes with another cwd
    created = not out.exists()
    key = _job_key("build", spec, infos, reader, chunk_size, dedupe, id_prefix, None, dedupe_key)
    if _check_output(out, key, overwrite):
        return _embed_built(IngestReport(library=str(out), action="build", already_done=True), embeddings, runtime)
    manifest = new_manifest(featurizer.to_dict(), standardize.to_dict(), list(descriptors), dedupe, id_prefix,
                            dedupe_key)
    with locked(out):
        if overwrite:
            clear_for_overwrite(out)
        try:
            report = _run(out, manifest, infos, reader, action="build", spec=spec, chunk_size=chunk_size,
                          runtime=runtime, job_key=key, dedupe_partitions=dedupe_partitions)
        except InputError:
            shutil.rmtree(out if created else out / WORK, ignore_errors=True)
            raise
    return _embed_built(report, embeddings, runtime)


def _check_output(out: Path, key: str, overwrite: bool) -> bool:
    """True when ``out`` already holds this very build (same job key, nothing since); an
    error for anything there that the build would wrongly replace."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise LibraryError(f"output={out} exists and is a file; choose a directory path")
    has_lib = (out / MANIFEST).exists()
    has_work = (out / WORK).exists()
    if overwrite and (has_lib or has_work):
        return False  # replaced by the caller, under the library's lock
    if has_lib:
        existing = read_manifest(out)
        builds = [h for h in existing["history"] if h["action"] == "build"]
        if builds and builds[0].get("job_key") == key and len(existing["history"]) == 1:
            clean_committed_work(out, existing)
            return True
        raise LibraryError(
            f"output={out} already holds a different library ({existing['n_rows']} molecules, "
            f"{len(existing['history'])} history entries); add to it with `biogen library append "
            f"library={out} input=...`, choose another output, or pass overwrite=true to replace it"
        )
    if not has_work and any(p.name != ".lock" for p in out.iterdir()):
        raise LibraryError(
            f"output={out} is a non-empty directory that is not a biogen library; "
            "choose a new or empty directory (overwrite=true only replaces libraries)"
        )
    return False


def _embed_built(report: IngestReport, models: Sequence[str], runtime: RuntimeSpec) -> IngestReport:
    """build ... embeddings=[model]: embed the new library (a rerun finishes a killed step)."""
    from biogen.library.embeddings import embed_library

    report.embeddings = [embed_library(report.library, m, runtime=runtime) for m in models]
    return report


def append_library(
    library: str | Path,
    inputs: str | Sequence[str],
    *,
    reader: ReaderOptions = ReaderOptions(),
    chunk_size: int = 10_000,
    runtime: RuntimeSpec = RuntimeSpec(),
    dedupe_partitions: int | str = "auto",
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
    choose_partitions(dedupe_partitions, 0, 1)
    infos = _preflight(inputs, reader)
    with locked(lib):
        manifest = read_manifest(lib)  # re-read under the lock
        deposit = _deposit_key(infos, reader)
        done = [(n, h) for n, h in enumerate(manifest["history"]) if h.get("deposit_key") == deposit]
        if done:
            n, h = done[0]
            clean_committed_work(lib, manifest)
            log.warning("these input files (same sha256) were already added as history entry %d "
                        "(%s, %s); nothing to do", n, h["action"], h["time"])
            report = IngestReport(library=str(lib), action="append", already_done=True)
        else:
            key = _job_key("append", spec, infos, reader, chunk_size, manifest["dedupe"]["mode"],
                           manifest["id_prefix"], manifest, manifest["dedupe"]["key"])
            try:
                report = _run(lib, manifest, infos, reader, action="append", spec=spec, chunk_size=chunk_size,
                              runtime=runtime, job_key=key, dedupe_partitions=dedupe_partitions)
            except InputError:
                shutil.rmtree(lib / WORK / f"{len(manifest['history']):03d}-append", ignore_errors=True)
                raise
    return _complete_embeddings(report, runtime)


def _complete_embeddings(report: IngestReport, runtime: RuntimeSpec) -> IngestReport:
    """The library's stored embeddings cover the new rows too (only those are embedded);
    a kill during this step is finished by rerunning the same append (or library embed)."""
    from biogen.library.embeddings import complete_embeddings

    report.embeddings = complete_embeddings(report.library, runtime)
    return report
