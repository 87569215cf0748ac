"""The screen: library -> filters -> scorers -> fusion -> selection -> hits + report.

Per library shard (Ray actors that hold the stages and their models; GPU when the run
has one) the stages run in config order on the molecules still alive: a filter removes
molecules, a scorer adds a score. Every shard writes ``shards/<name>.arrow`` (Arrow IPC:
written and read back without encoding, ~7x faster than Parquet for this intermediate) with
each molecule's pass/fail and score per stage, and is recorded in the ledger, so a rerun
with the same ``output`` resumes. The driver then fuses the scores of the molecules that
passed every filter, ranks them, picks the hits (scaffold cap, MaxMin diversity) and
writes the outputs and the report. A streaming screen (``streaming``: true, or auto for
libraries above 2,000,000 rows) does the steps after the shards in rounds of tasks instead
(``biogen.screen.streaming``), with the same results and no whole-library column in the
driver; its per-molecule scores go to ``scores/<shard>.parquet``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.parquet as pq

from biogen.chem.records import write_rejects
from biogen.chem.scaffolds import murcko_scaffolds
from biogen.errors import ConfigError, CorruptLibraryError, LibraryError
from biogen.library.store import Library
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards_on_actors
from biogen.runtime.ray_runtime import start_actors, wait_for_ray_shutdown
from biogen.screen.metrics import NULL_PROPERTIES, EnrichmentMetrics, NullModel, null_model, property_ranking
from biogen.screen.presets import LibrarySpec, cached_preset, preset_library
from biogen.screen.selection import SelectionSpec, best_first, fuse_scores, fusion_weights, select_hits
from biogen.screen.stages import MoleculeBatch, ScreenContext, Stage
from biogen.screen.streaming import StreamingSpec, Streamed, group_tasks, hit_values, make_job, run_streaming
from biogen.screen.target import TargetData, TargetSpec, held_out_actives, load_target

log = logging.getLogger(__name__)
PROPERTY_COLUMNS = ("mw", "clogp", "tpsa")
ALL_FILTERED = ("the filters removed every molecule of the library: no hits. Loosen or remove "
                "filters (filters=none, or filters.<name>=null).")


@dataclass(frozen=True)
class FusionSpec:
    """Config ``scoring.fusion``: method rank | zscore; weights: scorer name -> weight."""

    method: str = "rank"
    weights: dict = field(default_factory=dict)


@dataclass
class ScreenSummary:
    """summary.json (``as_dict``, keys in this order) and the report's facts: what ran on
    what, the funnel, the metrics, the time per step, the versions."""

    library: str
    library_name: str
    molecules: int
    shards: int
    featurizer: dict
    target: str
    target_description: str
    known_actives: int
    target_rejects: int
    training_compounds: int
    stages: list[dict]
    fusion: dict
    selection: dict
    accelerator: str
    workers: int
    funnel: list[tuple[str, int]]
    metrics: dict | None
    label_name: str | None
    notes: list[str]
    qsar_train_metrics: dict
    seconds: dict[str, float]
    versions: dict
    stage_outputs: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class ScreenResult:
    run_dir: Path
    hits: pa.Table
    funnel: list[tuple[str, int]]
    metrics: dict | None
    seconds: dict[str, float]
    report: Path | None
    summary: ScreenSummary


class ScreenWorker:
    """One shard at a time: read it, run the stages, write the per-molecule results."""

    def __init__(self, library: str, stages: list[Stage], out_dir: str):
        self.library = Library.open(library)
        self.stages = stages
        self.out_dir = Path(out_dir)
        for st in stages:
            st.load()
        stored = set(self.library.manifest.get("descriptors", []))
        needed = {c for st in stages for c in st.columns}
        self.columns = sorted(needed & stored)
        # SMILES are read only when a stage parses molecules (alerts, SMARTS, descriptors
        # the library does not store): most of a large screen's time would go to strings
        self.read_smiles = bool(needed - stored) or any(st.needs_mols for st in stages)
        self.embedding_models = sorted({st.embeddings for st in stages if st.embeddings})

    def _vectors(self, model: str, shard, n: int) -> np.ndarray:
        """The shard's stored ``model`` vectors as float32 (NaN rows: no vector)."""
        from biogen.library.embeddings import shard_dir

        v = np.load(shard_dir(self.library.path, model, shard.name) / "vectors.npy", mmap_mode="r")
        if v.shape[0] != n:
            raise LibraryError(f"{model} embeddings of shard {shard.name} have {v.shape[0]} rows, the shard {n}; "
                               f"run biogen library verify library={self.library.path}")
        return np.asarray(v, dtype=np.float32)

    def run(self, index: int, *more: int) -> tuple[list[str], dict]:
        """The shard ``index`` (and ``more`` after it, one task for several shards on a large
        library: ``streaming.group_tasks``): its outputs and its result; for several, their
        outputs together and their rows, passed counts and seconds summed."""
        if not more:
            return self._run(index)
        outputs: list[str] = []
        total: dict = {"rows": 0, "passed": {}, "seconds": {}, "wall": 0.0}
        for i in (index, *more):
            out, r = self._run(i)
            outputs += out
            total["rows"] += r["rows"]
            total["wall"] += r["wall"]
            for k in ("passed", "seconds"):
                for name, v in r[k].items():
                    total[k][name] = total[k].get(name, 0) + v
        return outputs, total

    def _run(self, index: int) -> tuple[list[str], dict]:
        t_run = time.perf_counter()
        shard = self.library.shards[index]
        # the metadata only when a stage needs some (ids: the driver reads them, in a thread)
        wanted = [*(["smiles"] if self.read_smiles else []), *self.columns]
        meta = shard.metadata(wanted) if wanted else None
        n = shard.rows
        smiles = meta.column("smiles").to_pylist() if self.read_smiles else [None] * n
        batch = MoleculeBatch(np.arange(n, dtype=np.int64), smiles, np.asarray(shard.fingerprints),
                              np.asarray(shard.popcounts, dtype=np.int32),
                              {c: meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in self.columns},
                              {m: self._vectors(m, shard, n) for m in self.embedding_models})
        alive = np.ones(n, dtype=bool)
        columns: dict[str, pa.Array] = {
            "shard": pa.array(np.full(n, index, dtype=np.int32)), "row": pa.array(batch.rows)}
        seconds: dict[str, float] = {}
        passed: dict[str, int] = {}
        cur = batch  # the molecules still alive (parsed molecules carry over from stage to stage)
        for st in self.stages:
            t0 = time.perf_counter()
            out = np.asarray(st(cur)) if len(cur) else np.zeros(0)
            seconds[st.name] = time.perf_counter() - t0
            reached = np.flatnonzero(alive)
            if st.kind == "filter":
                ok = out.astype(bool)
                full = np.zeros(n, dtype=bool)
                full[reached] = ok
                columns[f"{st.name}_pass"] = pa.array(full, mask=~alive)
                alive = full
                if not ok.all():
                    cur = cur.take(ok)
                passed[st.name] = int(alive.sum())
            else:
                full = np.full(n, np.nan)
                full[reached] = out
                columns[st.name] = pa.array(full, mask=~alive)
        table = pa.table(columns)
        name = f"shards/{shard.name}.arrow"
        path = self.out_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        feather.write_feather(table, tmp, compression="uncompressed")
        tmp.replace(path)
        return [name], {"rows": n, "passed": passed, "seconds": seconds, "wall": time.perf_counter() - t_run}


class _RowText:
    """SMILES and Bemis-Murcko scaffolds of library rows (by index into the screen's table),
    each looked up once. SMILES: a request reads the SMILES column of each shard it touches
    (in threads: pyarrow releases the GIL; the last ``keep`` shards' columns are kept for
    the next request). Scaffolds: taken from ``scaffold_column`` (the library's stored
    ones, in table order) when given, else computed from the SMILES."""

    def __init__(self, library: Library, shard_of: np.ndarray, row_of: np.ndarray, keep: int = 256,
                 scaffold_column: pa.Array | None = None):
        self.library, self.shard_of, self.row_of, self.keep = library, shard_of, row_of, keep
        self.scaffold_column = scaffold_column
        self._smiles: dict[int, str] = {}
        self._scaffolds: dict[int, str] = {}
        self.columns: OrderedDict[int, pa.ChunkedArray] = OrderedDict()

    def scaffolds(self, idx: np.ndarray) -> list[str]:
        idx = [int(i) for i in np.asarray(idx).tolist()]
        if self.scaffold_column is not None:
            return self.scaffold_column.take(pa.array(idx, pa.int64())).to_pylist()
        missing = [i for i in dict.fromkeys(idx) if i not in self._scaffolds]
        if missing:  # library SMILES are RDKit's canonical ones: the fast scaffold path applies
            self._scaffolds.update(zip(missing, murcko_scaffolds(self.smiles(missing), canonical=True)))
        return [self._scaffolds[i] for i in idx]

    def smiles(self, idx) -> list[str]:
        idx = [int(i) for i in np.asarray(idx).tolist()]
        groups: dict[int, list[int]] = {}
        for i in dict.fromkeys(i for i in idx if i not in self._smiles):
            groups.setdefault(int(self.shard_of[i]), []).append(i)

        def read(shard: int) -> pa.ChunkedArray:
            col = self.columns.get(shard)
            return col if col is not None else self.library.shards[shard].metadata(["smiles"]).column("smiles")

        with ThreadPoolExecutor(min(8, max(1, len(groups)))) as pool:
            for shard, col in zip(groups, pool.map(read, groups)):
                self.columns[shard] = col
                self.columns.move_to_end(shard)
                if len(self.columns) > self.keep:
                    self.columns.popitem(last=False)
                self._smiles.update(zip(groups[shard], col.take(pa.array(self.row_of[groups[shard]])).to_pylist()))
        return [self._smiles[i] for i in idx]


def _library_columns(library: Library, columns: list[str], use_threads: bool = True) -> pa.Table:
    """Metadata columns of the whole library in shard order: one dataset scan, which hardly
    holds the GIL (a Python loop over the shards in threads held it enough to slow the
    driver's own work); on Arrow's threads, or only the calling one (``use_threads=False``)."""
    paths = [str(s.path / "meta.parquet") for s in library.shards]
    if not paths:
        return pa.table({c: pa.array([], pa.string()) for c in columns})
    return pads.dataset(paths, format="parquet").to_table(columns=list(columns), use_threads=use_threads)


def _idle_priority() -> None:
    """Let the calling thread run only on CPU time that nothing else wants (Linux
    SCHED_IDLE; elsewhere it keeps its priority). The screen's prefetch of library columns
    runs so while the workers hold the cores, and does not slow them or the fusion."""
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
    except (AttributeError, OSError):  # not Linux, or not permitted
        pass


def _prefetch_library_columns(library: Library, columns: list[str]) -> tuple[ThreadPoolExecutor, Future]:
    """Read ``columns`` of the whole library in one idle-priority thread (started before the
    shards run, so that the reads use what CPU the workers leave)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="screen-prefetch", initializer=_idle_priority)
    return pool, pool.submit(_library_columns, library, columns, False)


def _write_sdf(hits: pa.Table, path: Path) -> None:
    from rdkit import Chem

    with Chem.SDWriter(str(path)) as writer:
        for row in hits.to_pylist():
            mol = Chem.MolFromSmiles(row["smiles"] or "")
            if mol is None:
                continue
            mol.SetProp("_Name", str(row["id"]))
            for k, v in row.items():
                if k not in ("smiles",) and v is not None:
                    mol.SetProp(k, f"{v:.6g}" if isinstance(v, float) else str(v))
            writer.write(mol)


def _job_key(library: Library, stages: list[Stage]) -> str:
    # the ledger records per-shard stage outputs: they depend on the library, the stages and
    # the content of any model file (a model retrained in a rerun must not mix with old shards)
    from biogen.files import json_digest, sha256_file

    models = [sha256_file(Path(st.checkpoint)) for st in stages if st.checkpoint]
    desc = {"library": [(s.name, s.rows) for s in library.shards], "n_rows": library.n_rows,
            "stages": [st.describe() for st in stages], "models": models, "shard_format": "arrow"}
    return json_digest(desc)


# ----------------------------------------------------------------------------- the steps' values

@dataclass
class Ranking:
    """The screen's order over the library table: ``alive`` (bool N: passed every filter),
    ``fused`` (float N, NaN where not alive), ``order`` (alive rows, best first; ties in
    library order), ``rank_of`` (int N, 1-based, -1 where not alive), the funnel so far and
    the notes the ranking raised."""

    alive: np.ndarray
    fused: np.ndarray
    order: np.ndarray
    rank_of: np.ndarray
    funnel: list[tuple[str, int]]
    notes: list[str]


@dataclass
class Selection:
    """The hits: table rows in hit order, their scaffolds and SMILES."""

    chosen: np.ndarray
    scaffolds: list[str]
    smiles: list[str]


@dataclass
class ScreenEnrichment:
    """How the ranking recovers the labelled actives: the screen's ``EnrichmentMetrics`` over
    every library row (filtered-out molecules rank last), the same for the property null model,
    and the actives counted through the funnel. ``as_dict`` is summary.json's ``metrics``."""

    labels: np.ndarray
    metrics: EnrichmentMetrics
    null: NullModel | None
    actives_in_library: int
    actives_passing_filters: int
    actives_after_filter: dict[str, int]
    actives_in_hits: int

    def as_dict(self) -> dict:
        return {**self.metrics.as_dict(), "actives_in_library": self.actives_in_library,
                "actives_passing_filters": self.actives_passing_filters,
                "actives_after_filter": dict(self.actives_after_filter), "actives_in_hits": self.actives_in_hits,
                "null_model": None if self.null is None else self.null.as_dict()}


@dataclass
class _Prepared:
    """The driver-side set-up: the target's compounds and the stages' context."""

    target: TargetData
    context: ScreenContext


# ----------------------------------------------------------------------------- the runtime session

class _ScreenSession:
    """Where a screen's shards run, and the concurrency that hides set-up time (each measured
    in ``benchmarks/screen.py``): Ray's start (~4 s locally) overlaps the target's preparation
    (QSAR training) when the library is known without Ray; the worker actors start, and import
    torch, before the set-up ends; the library columns the outputs need are read at idle
    priority while the shards run; Ray stops in the background while the outputs are written
    (``run_screen`` waits for it before returning)."""

    def __init__(self, runtime: RuntimeSpec, library: LibrarySpec, target: TargetSpec):
        self.runtime, self.library_spec, self.target_spec = runtime, library, target
        self._ray = ray_session(runtime, shutdown_in_background=True)
        self.slots = 1
        self._early: Future | None = None
        self._actors = None
        self.ledger: Ledger | None = None
        t0 = time.perf_counter()  # a library path or a cached preset opens without the runtime
        path = (Path(library.path) if library.path
                else cached_preset(library, target.name, held_out_actives(target)))
        self.library: Library | None = Library.open(path) if path is not None else None
        self.library_seconds = time.perf_counter() - t0

    def __enter__(self) -> "_ScreenSession":
        self.slots = self._ray.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._ray.__exit__(*exc)

    def prepare_early(self, prepare: Callable[[Library], _Prepared]) -> None:
        """Start ``prepare`` in a thread when the library is known and Ray will start locally
        (Ray's start then hides behind the set-up). Call before entering the session."""
        if self.library is not None and self.runtime.mode == "local":
            pool = ThreadPoolExecutor(1, thread_name_prefix="screen-setup")
            self._early = pool.submit(prepare, self.library)
            pool.shutdown(wait=False)

    def open_library(self) -> Library:
        """The library; a preset not yet cached is built now (it needs the runtime)."""
        if self.library is None:
            t0 = time.perf_counter()
            self.library = Library.open(preset_library(self.library_spec, self.target_spec.name,
                                                       held_out_actives(self.target_spec), self.runtime))
            self.library_seconds += time.perf_counter() - t0
        return self.library

    def start_workers(self, scorers: list[Stage], accelerator: str) -> None:
        """Start the worker actors (no more than there are shards) and their imports now."""
        modules = ["biogen.screen.pipeline"]
        for st in scorers:
            modules += [m for m in st.worker_modules if m not in modules]
        self._actors = start_actors(self.runtime, min(self.slots, max(1, len(self.open_library().shards))),
                                    modules=modules, num_gpus=1.0 if accelerator != "cpu" else 0.0)

    def prepared(self, prepare: Callable[[Library], _Prepared]) -> _Prepared:
        return self._early.result() if self._early is not None else prepare(self.open_library())

    def run(self, stages: list[Stage], run_dir: Path, tasks_per_round: int) -> dict[str, float]:
        """Every shard through the stages (resumed from the ledger), consecutive shards in one
        task beyond ``tasks_per_round`` shards (``streaming.group_tasks``: the driver's cost is
        per task); each stage's CPU seconds summed over the shards (folded as the results
        arrive: no per-shard list is kept)."""
        lib = self.open_library()
        self.ledger = Ledger(run_dir / "ledger.jsonl", _job_key(lib, stages))
        shard_keys = [(key, tuple(i for (i,) in grp)) for key, grp in
                      group_tasks([(f"shard-{s.name}", (i,)) for i, s in enumerate(lib.shards)], tasks_per_round)]
        cpu = dict.fromkeys((st.name for st in stages), 0.0)

        def fold(key: str, result: dict) -> None:
            for name, t in result["seconds"].items():
                cpu[name] = cpu.get(name, 0.0) + t

        run_shards_on_actors(ScreenWorker, (str(lib.path), stages, str(run_dir)), shard_keys, ledger=self.ledger,
                             spec=self.runtime, slots=self.slots, desc="screen", total=len(shard_keys),
                             actors=self._actors, reduce=fold)
        return cpu


# ----------------------------------------------------------------------------- the steps

def _check_stages(filters: list[Stage], scorers: list[Stage], fusion: FusionSpec) -> list[Stage]:
    stages = [*filters, *scorers]
    names = [st.name for st in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique; got {names}")
    if not scorers:
        raise ConfigError("the screen has no scorer: set scoring=similarity, scoring=qsar or scoring=similarity_qsar")
    fusion_weights([st.name for st in scorers], fusion.weights, fusion.method)  # a typo fails before any shard
    return stages


def _prepare(lib: Library, target: TargetSpec, stages: list[Stage], run_dir: Path, accelerator: str,
             progress: bool, seconds: dict[str, float]) -> _Prepared:
    """Target compounds (rejects written), then each stage's driver-side set-up (QSAR training)."""
    t0 = time.perf_counter()
    tdata = load_target(target, lib.featurizer, lib.standardize)
    write_rejects(tdata.rejects, run_dir / "target_rejects.csv")
    if tdata.rejects:
        log.warning("%d target compound(s) could not be used; see %s", len(tdata.rejects),
                    run_dir / "target_rejects.csv")
    ctx = ScreenContext(lib.featurizer, None if tdata.actives is None else tdata.actives.fps,
                        None if tdata.actives is None else tdata.actives.popcount, run_dir,
                        tdata.training, accelerator, progress, lib, target)
    seconds["target"] = time.perf_counter() - t0
    for st in stages:
        t0 = time.perf_counter()
        st.prepare(ctx)
        if time.perf_counter() - t0 > 0.5:
            seconds[f"prepare {st.name}"] = time.perf_counter() - t0
    return _Prepared(tdata, ctx)


def _outputs_columns(lib: Library, tdata: TargetData, report: bool) -> tuple[str, list[str], set | None]:
    """The library's dedupe key, the metadata columns the outputs need (ids, label keys,
    scaffolds, the report's properties, the null model's properties) and the label set."""
    key = lib.manifest["dedupe"]["key"]
    label_set = tdata.label_keys if key == "inchikey" else tdata.label_smiles
    stored = lib.manifest.get("descriptors", [])
    props = [c for c in PROPERTY_COLUMNS if c in stored] if report else []
    null_props = [c for c in NULL_PROPERTIES if c in stored] if label_set else []
    wanted = list(dict.fromkeys(["id"] + ([key] if label_set else []) + (["scaffold"] if "scaffold" in stored else [])
                                + props + null_props))
    return key, wanted, label_set


def _read_scores(lib: Library, run_dir: Path) -> pa.Table:
    return pa.concat_tables([feather.read_table(run_dir / f"shards/{s.name}.arrow", memory_map=True)
                             for s in lib.shards])


def _rank(table: pa.Table, filters: list[Stage], scorers: list[Stage], fusion: FusionSpec) -> Ranking:
    """Fuse the scores of the molecules that passed every filter and order them."""
    n_total = table.num_rows
    alive = np.ones(n_total, dtype=bool)
    funnel = [("library", n_total)]
    for st in filters:
        alive &= table.column(f"{st.name}_pass").to_numpy(zero_copy_only=False).astype(bool) if n_total else alive
        funnel.append((st.name, int(alive.sum())))
    score_cols = _score_columns(table, scorers)
    fused = np.full(n_total, np.nan)
    notes: list[str] = []
    if alive.any():
        fused[alive] = fuse_scores({k: v[alive] for k, v in score_cols.items()}, fusion.weights, fusion.method)
    else:
        notes.append(ALL_FILTERED)
        log.warning("%s", notes[-1])
    cand = np.flatnonzero(alive)
    # best first; ties in library order (deterministic, and numeric: no sort of 1M strings)
    order = cand[best_first(fused[cand])] if len(cand) else cand
    rank_of = np.full(n_total, -1, dtype=np.int64)
    rank_of[order] = np.arange(1, len(order) + 1)
    return Ranking(alive, fused, order, rank_of, funnel, notes)


def _score_columns(table: pa.Table, scorers: list[Stage]) -> dict[str, np.ndarray]:
    return {st.name: table.column(st.name).to_numpy(zero_copy_only=False) for st in scorers}


def _select(lib: Library, table: pa.Table, meta: pa.Table, ranking: Ranking, spec: SelectionSpec) -> Selection:
    """Walk down the ranking with the scaffold cap, MaxMin-pick the hits (selection.py)."""
    shard_of = table.column("shard").to_numpy()
    row_of = table.column("row").to_numpy()

    def fps_of(idx: np.ndarray) -> np.ndarray:
        return np.stack([lib.shards[int(shard_of[i])].fingerprints[int(row_of[i])] for i in idx])

    text = _RowText(lib, shard_of, row_of, scaffold_column=(meta.column("scaffold").combine_chunks()
                                                            if "scaffold" in meta.column_names else None))
    chosen, scaffolds = (select_hits(ranking.order, text.scaffolds, fps_of, spec) if len(ranking.order)
                         else (np.zeros(0, dtype=np.int64), []))
    return Selection(chosen, scaffolds, text.smiles(chosen))


def _enrichment(table: pa.Table, meta: pa.Table, key: str, label_set: set, ranking: Ranking,
                filters: list[Stage], chosen: np.ndarray) -> tuple[np.ndarray, ScreenEnrichment | None]:
    """Labels of the library rows (matched by the library's dedupe key: InChIKey, or canonical
    SMILES for a library built with dedupe_key=smiles) and, when both classes are present, the
    screen's enrichment next to the property null model's."""
    labels = pc.is_in(meta.column(key), value_set=pa.array(sorted(label_set))).to_numpy(zero_copy_only=False)
    labels = labels.astype(bool)
    if not (labels.any() and (~labels).any()):
        return labels, None
    ranked = np.where(ranking.alive, ranking.fused, -np.inf)  # filtered-out molecules rank last
    keep = np.ones(len(labels), dtype=bool)
    after = {}
    for st in filters:
        keep &= table.column(f"{st.name}_pass").to_numpy(zero_copy_only=False).astype(bool)
        after[st.name] = int((labels & keep).sum())
    props = {c: meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
             for c in NULL_PROPERTIES if c in meta.column_names}
    return labels, ScreenEnrichment(
        labels, EnrichmentMetrics.of(ranked, labels), null_model(props, labels, keep=ranking.alive),
        actives_in_library=int(labels.sum()), actives_passing_filters=int((labels & ranking.alive).sum()),
        actives_after_filter=after, actives_in_hits=int(labels[chosen].sum()) if len(chosen) else 0)


def _write_outputs(run_dir: Path, lib: Library, table: pa.Table, ids: pa.Array, ranking: Ranking,
                   selection: Selection, score_cols: dict[str, np.ndarray], labels: np.ndarray | None,
                   config_yaml: str) -> tuple[pa.Table, Future, ThreadPoolExecutor]:
    """hits.parquet/csv/sdf, library_manifest.json, config.yaml now; scores.parquet (every
    library row) in a background thread (the caller joins it after the report)."""
    chosen = selection.chosen
    hits = _hits_table(ids.take(pa.array(chosen)) if len(chosen) else pa.array([], pa.string()), selection.smiles,
                       ranking.fused[chosen], ranking.rank_of[chosen], {k: v[chosen] for k, v in score_cols.items()},
                       selection.scaffolds, None if labels is None else labels[chosen])
    _write_hits(run_dir, lib, hits, config_yaml)
    bg = ThreadPoolExecutor(1, thread_name_prefix="screen-bg")
    scores_written = bg.submit(pq.write_table, table, run_dir / "scores.parquet")
    return hits, scores_written, bg


def _hits_table(ids: pa.Array, smiles: list[str], fused: np.ndarray, rank: np.ndarray,
                score_cols: dict[str, np.ndarray], scaffolds: list[str], labels: np.ndarray | None) -> pa.Table:
    """hits.parquet's table from the hits' values (each in hit order)."""
    hit_cols = {"rank": pa.array(np.arange(1, len(fused) + 1)), "id": ids, "smiles": pa.array(smiles, pa.string()),
                "score": pa.array(fused), "score_rank": pa.array(rank)}
    for k, v in score_cols.items():
        hit_cols[k] = pa.array(v)
    hit_cols["scaffold"] = pa.array(scaffolds, pa.string())
    if labels is not None:
        hit_cols["label"] = pa.array(labels)
    return pa.table(hit_cols)


def _write_hits(run_dir: Path, lib: Library, hits: pa.Table, config_yaml: str) -> None:
    """hits.parquet/csv/sdf, library_manifest.json, config.yaml."""
    import pyarrow.csv as pacsv

    pq.write_table(hits, run_dir / "hits.parquet")
    pacsv.write_csv(hits, run_dir / "hits.csv")
    _write_sdf(hits, run_dir / "hits.sdf")
    shutil.copy(lib.path / "manifest.json", run_dir / "library_manifest.json")
    if config_yaml:
        (run_dir / "config.yaml").write_text(config_yaml)  # also when output= is not the Hydra run dir


def _score_table(table: pa.Table, ranking: Ranking, ids: pa.Array, labels: np.ndarray | None) -> pa.Table:
    """scores.parquet: every library row with its filters' pass/fail, scores, fused score, rank, id, label."""
    table = table.append_column("passed_filters", pa.array(ranking.alive)).append_column(
        "score", pa.array(ranking.fused, mask=~ranking.alive)).append_column(
        "rank", pa.array(ranking.rank_of, mask=ranking.rank_of < 0))
    table = table.add_column(2, "id", ids)
    return table.append_column("label", pa.array(labels)) if labels is not None else table


@dataclass
class _Scored:
    """What the shards phase leaves: the library, the set-up, the outputs' metadata columns
    (being read at idle priority; None when streaming), the stages' CPU seconds, the workers,
    the ledger and, for a streaming screen, what its rounds left."""

    library: Library
    prepared: _Prepared
    key: str
    label_set: set | None
    columns: Future | None
    stage_cpu: dict[str, float]
    workers: int
    ledger: Ledger
    streamed: Streamed | None = None


# the streaming rounds, run inside the session: (library, dedupe key, label set, ledger, slots) -> Streamed
StreamRounds = Callable[[Library, str, "set | None", Ledger, int], Streamed]


def _own_outputs(stages: list[Stage]) -> list[str]:
    """The stages with driver-side outputs of their own (``Stage.finish``: the protein-aware panel)."""
    return [st.name for st in stages if st.whole_library_outputs]


def _streams(spec: StreamingSpec, lib: Library, stages: list[Stage]) -> bool:
    """Whether this screen streams: ``streaming`` and the library's size; a stage with its own
    driver-side outputs (``Stage.finish`` over the whole library's mask) keeps it in memory."""
    if not spec.applies(lib.n_rows):
        return False
    own = _own_outputs(stages)
    if own:
        log.warning("stage(s) %s need the whole library in the driver: this screen of %d molecules is not "
                    "streamed (streaming=auto)", own, lib.n_rows)
    return not own


def _score_shards(library: LibrarySpec, target: TargetSpec, stages: list[Stage], scorers: list[Stage],
                  runtime: RuntimeSpec, run_dir: Path, accelerator: str, report: bool,
                  seconds: dict[str, float], streaming: StreamingSpec = StreamingSpec("false"),
                  stream: StreamRounds | None = None) -> _Scored:
    """Open the library, prepare the target and stages, run every shard (in a runtime session);
    a streaming screen runs its rounds (``stream``) in the same session."""

    def prepare(lib: Library) -> _Prepared:
        return _prepare(lib, target, stages, run_dir, accelerator, runtime.progress, seconds)

    session = _ScreenSession(runtime, library, target)
    session.prepare_early(prepare)
    with session:
        lib = session.open_library()
        seconds["library"] = session.library_seconds
        session.start_workers(scorers, accelerator)  # after a preset build: it would hold its CPUs
        prep = session.prepared(prepare)
        for st in stages:
            log.info("stage %s", st.describe())
        key, wanted, label_set = _outputs_columns(lib, prep.target, report)
        streams = stream is not None and _streams(streaming, lib, stages)
        columns = None
        if not streams:
            prefetch, columns = _prefetch_library_columns(lib, wanted)
            prefetch.shutdown(wait=False)
        t0 = time.perf_counter()
        stage_cpu = session.run(stages, run_dir, streaming.tasks_per_round)
        seconds["shards (wall)"] = time.perf_counter() - t0
        streamed = None
        if streams:
            t0 = time.perf_counter()
            streamed = stream(lib, key, label_set, session.ledger, session.slots)
            seconds["streaming rounds (wall)"] = time.perf_counter() - t0
    return _Scored(lib, prep, key, label_set, columns, stage_cpu, session.slots, session.ledger, streamed)


@dataclass
class _Ranked:
    """The ranking step's result: the scores table and the library's metadata columns (rows
    in table order), the ranking, the selection, the ids, and the labels with the enrichment
    (None without known actives)."""

    table: pa.Table
    meta: pa.Table
    ranking: Ranking
    selection: Selection
    ids: pa.Array
    labels: np.ndarray | None
    enrichment: ScreenEnrichment | None


def _rank_and_select(scored: _Scored, run_dir: Path, filters: list[Stage], scorers: list[Stage],
                     fusion: FusionSpec, selection: SelectionSpec, seconds: dict[str, float]) -> _Ranked:
    """Fuse and rank the shards' scores, select the hits, match the labels."""
    lib = scored.library
    t0 = time.perf_counter()
    table = _read_scores(lib, run_dir)
    ranking = _rank(table, filters, scorers, fusion)
    seconds["fusion + ranking"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    meta = scored.columns.result()
    if meta.num_rows != table.num_rows:
        raise CorruptLibraryError(f"the library at {lib.path} has {meta.num_rows} rows of metadata but its "
                                  f"shards {table.num_rows} fingerprints; run `biogen library verify` on it")
    chosen = _select(lib, table, meta, ranking, selection)
    seconds["selection"] = time.perf_counter() - t0
    labels, enrichment = (_enrichment(table, meta, scored.key, scored.label_set, ranking, filters, chosen.chosen)
                          if scored.label_set else (None, None))
    return _Ranked(table, meta, ranking, chosen, meta.column("id").combine_chunks(), labels, enrichment)


def _notes(ranking_notes: list[str], enrichment: ScreenEnrichment | None, label_name: str | None) -> list[str]:
    """Warnings for the report and summary: the ranking's, missing labels, a null model that
    does as well as the screen."""
    notes = list(ranking_notes)
    if label_name is not None and enrichment is None:
        notes.append(f"no labelled actives found in the library ({label_name}); enrichment not computed")
    if enrichment is not None and enrichment.null is not None:
        m, nm = enrichment.metrics, enrichment.null.metrics
        if nm.ef1 >= m.ef1 or nm.auroc >= m.auroc:
            notes.append(f"ranking by {enrichment.null.label} alone recovers the labelled actives as well as this "
                         f"screen or better (EF1% {nm.ef1:.1f} vs {m.ef1:.1f}, AUROC {nm.auroc:.3f} vs {m.auroc:.3f}): "
                         "the actives differ from the library in size, and the enrichment says little about the "
                         "scoring. Compare with decoys matched in properties (e.g. the DUD sets of biogen evaluate).")
    return notes


@dataclass(frozen=True)
class _ScreenJob:
    """One screen's settings as ``run_screen`` received them (stages: filters then scorers)."""

    library: LibrarySpec
    target: TargetSpec
    filters: list[Stage]
    scorers: list[Stage]
    stages: list[Stage]
    fusion: FusionSpec
    selection: SelectionSpec
    runtime: RuntimeSpec
    run_dir: Path
    accelerator: str
    report: bool
    config_yaml: str


def _run_screen(
    library: LibrarySpec,
    target: TargetSpec,
    filters: list[Stage],
    scorers: list[Stage],
    *,
    fusion: FusionSpec = FusionSpec(),
    selection: SelectionSpec = SelectionSpec(),
    runtime: RuntimeSpec = RuntimeSpec(),
    run_dir: str | Path,
    accelerator: str = "cpu",
    report: bool = True,
    config_yaml: str = "",
    streaming: StreamingSpec | bool | str = "auto",
) -> ScreenResult:
    """Run a screen and write its outputs to ``run_dir`` (see module docstring). streaming:
    auto | true | false (``biogen.screen.streaming``: the driver holds no whole-library column;
    auto streams libraries above 2,000,000 rows)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = _check_stages(filters, scorers, fusion)
    spec = StreamingSpec.of(streaming)
    if spec.mode == "true" and _own_outputs(stages):
        raise ConfigError(f"streaming=true cannot run stage(s) {_own_outputs(stages)}: their outputs need the whole "
                          "library's pass/fail mask in the driver; set streaming=false (or auto)")
    job = _ScreenJob(library, target, filters, scorers, stages, fusion, selection, runtime, run_dir, accelerator,
                     report, config_yaml)
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()
    scored = _score_shards(library, target, stages, scorers, runtime, run_dir, accelerator, report, seconds,
                           spec, functools.partial(_stream_rounds, job, spec))
    if scored.streamed is not None:
        return _finish_streaming(job, scored, seconds, t_start)
    return _finish_in_memory(job, scored, seconds, t_start)


def _finish_in_memory(job: _ScreenJob, scored: _Scored, seconds: dict[str, float], t_start: float) -> ScreenResult:
    """Rank, select and write the outputs with whole-library columns in the driver."""
    run_dir, scorers, config_yaml = job.run_dir, job.scorers, job.config_yaml
    lib, prep = scored.library, scored.prepared
    r = _rank_and_select(scored, run_dir, job.filters, scorers, job.fusion, job.selection, seconds)
    t0 = time.perf_counter()
    sections = [sec for st in job.stages if (sec := st.finish(lib, r.ranking.alive, run_dir))]
    if sections:
        seconds["stage outputs"] = time.perf_counter() - t0
    notes = _notes(r.ranking.notes, r.enrichment, prep.target.label_name if scored.label_set else None)
    t0 = time.perf_counter()
    table = _score_table(r.table, r.ranking, r.ids, r.labels)
    score_cols = _score_columns(table, scorers)
    hits, scores_written, bg = _write_outputs(run_dir, lib, table, r.ids, r.ranking, r.selection, score_cols,
                                              r.labels, config_yaml)
    funnel = [*r.ranking.funnel, ("scored", int(r.ranking.alive.sum())), ("selected", len(r.selection.chosen))]
    seconds["outputs"] = time.perf_counter() - t0
    seconds.update({f"stage {k} (cpu)": v for k, v in scored.stage_cpu.items()})

    summary = _summary(job.library, job.target, lib, prep.target, job.stages, scorers, job.fusion, job.selection,
                       job.accelerator, scored.workers, funnel, r.enrichment, notes, seconds)
    summary.stage_outputs = [{k: sec.get(k) for k in ("title", "facts", "files")} for sec in sections]
    report_path = None
    if job.report:
        t0 = time.perf_counter()
        report_path = _write_report(run_dir, job.target, summary, seconds, hits, config_yaml, notes,
                                    time.perf_counter() - t_start, sections, *_report_inputs(r, score_cols))
        seconds["report"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores_written.result()
    bg.shutdown()
    seconds["outputs"] += time.perf_counter() - t0
    return _close(job, scored, summary, funnel, hits, r.enrichment, seconds, t_start, report_path)


def _close(job: _ScreenJob, scored: _Scored, summary: ScreenSummary, funnel: list[tuple[str, int]], hits: pa.Table,
           enrichment: ScreenEnrichment | None, seconds: dict[str, float], t_start: float,
           report_path: Path | None) -> ScreenResult:
    """summary.json, funnel.json, the ledger's ``complete``; the result."""
    seconds["total"] = time.perf_counter() - t_start
    summary.seconds = {k: round(v, 3) for k, v in seconds.items()}
    (job.run_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2, default=str) + "\n")
    (job.run_dir / "funnel.json").write_text(json.dumps(dict(funnel), indent=2) + "\n")
    scored.ledger.complete(hits=len(hits))
    metrics = None if enrichment is None else enrichment.as_dict()
    return ScreenResult(job.run_dir, hits, funnel, metrics, seconds, report_path, summary)


def _stream_rounds(job: _ScreenJob, spec: StreamingSpec, lib: Library, key: str, label_set: set | None,
                   ledger: Ledger, slots: int) -> Streamed:
    """The streaming rounds of this screen (inside its runtime session)."""
    stored = lib.manifest.get("descriptors", [])
    names = [st.name for st in job.scorers]
    task = make_job(job.run_dir, lib, [st.name for st in job.filters], names,
                    fusion_weights(names, job.fusion.weights, job.fusion.method), job.fusion.method, key, label_set,
                    [c for c in NULL_PROPERTIES if c in stored],
                    [c for c in PROPERTY_COLUMNS if c in stored] if job.report else [], spec)
    return run_streaming(task, lib, job.selection, spec, ledger, job.runtime, slots, job.report)


def _finish_streaming(job: _ScreenJob, scored: _Scored, seconds: dict[str, float], t_start: float) -> ScreenResult:
    """The outputs of a streaming screen: hits from the candidates, metrics from the counts."""
    st, lib, prep = scored.streamed, scored.library, scored.prepared
    t0 = time.perf_counter()
    if not st.alive:
        log.warning("%s", ALL_FILTERED)
    chosen = st.chosen
    labels = None if st.active_keys is None else np.asarray(
        [(int(st.cands.shard[i]), int(st.cands.row[i])) in st.active_keys for i in chosen], dtype=bool)
    enrichment = None if st.enrichment is None else ScreenEnrichment(
        np.zeros(0, dtype=bool), st.enrichment.metrics, st.enrichment.null,
        actives_in_library=st.enrichment.actives_in_library,
        actives_passing_filters=st.enrichment.actives_passing_filters,
        actives_after_filter=st.enrichment.actives_after_filter, actives_in_hits=int(labels.sum()))
    notes = _notes([] if st.alive else [ALL_FILTERED], enrichment,
                   prep.target.label_name if scored.label_set else None)
    fused, score_cols = hit_values(st, [s.name for s in job.scorers])
    id_type = pq.read_schema(lib.shards[0].path / "meta.parquet").field("id").type if lib.shards else pa.string()
    hits = _hits_table(pa.array(st.rows.column("id", chosen), id_type) if len(chosen) else pa.array([], pa.string()),
                       st.rows.column("smiles", chosen), fused, st.cands.rank[chosen], score_cols, st.scaffolds,
                       labels)
    _write_hits(job.run_dir, lib, hits, job.config_yaml)
    funnel = [*st.funnel, ("scored", st.alive), ("selected", len(chosen))]
    seconds["outputs"] = time.perf_counter() - t0
    seconds.update({f"stage {k} (cpu)": v for k, v in scored.stage_cpu.items()})
    summary = _summary(job.library, job.target, lib, prep.target, job.stages, job.scorers, job.fusion,
                       job.selection, job.accelerator, scored.workers, funnel, enrichment, notes, seconds)
    report_path = None
    if job.report:
        t0 = time.perf_counter()
        inputs = _streamed_report_inputs(st, chosen, enrichment)
        report_path = _write_report(job.run_dir, job.target, summary, seconds, hits, job.config_yaml, notes,
                                    time.perf_counter() - t_start, [], *inputs)
        seconds["report"] = time.perf_counter() - t0
    return _close(job, scored, summary, funnel, hits, enrichment, seconds, t_start, report_path)


def _summary(library: LibrarySpec, target: TargetSpec, lib: Library, tdata: TargetData, stages: list[Stage],
             scorers: list[Stage], fusion: FusionSpec, selection: SelectionSpec, accelerator: str, workers: int,
             funnel: list, enrichment: ScreenEnrichment | None, notes: list[str], seconds: dict) -> ScreenSummary:
    from biogen.library.manifest import tool_versions

    return ScreenSummary(
        library=str(lib.path), library_name=library.preset if not library.path else Path(lib.path).name,
        molecules=funnel[0][1], shards=len(lib.shards), featurizer=lib.featurizer.to_dict(), target=target.name,
        target_description=target.description, known_actives=0 if tdata.actives is None else len(tdata.actives),
        target_rejects=len(tdata.rejects), training_compounds=0 if tdata.training is None else len(tdata.training.y),
        stages=[st.describe() for st in stages], fusion={"method": fusion.method, "weights": dict(fusion.weights)},
        selection=vars(selection), accelerator=accelerator, workers=workers, funnel=funnel,
        metrics=None if enrichment is None else enrichment.as_dict(), label_name=tdata.label_name, notes=notes,
        qsar_train_metrics={st.name: st.train_metrics for st in scorers if st.train_metrics is not None},
        seconds={k: round(v, 3) for k, v in seconds.items()}, versions=tool_versions())


@functools.wraps(_run_screen)
def run_screen(*args, **kwargs) -> ScreenResult:
    try:
        return _run_screen(*args, **kwargs)
    finally:
        wait_for_ray_shutdown()  # the local Ray instance stopped while the outputs were written


def _report_inputs(ranked: _Ranked, score_cols: dict[str, np.ndarray]) -> tuple[dict, dict | None, object]:
    """The report's scores (molecules that passed), property space and enrichment, from the
    in-memory ranking; ranked.meta: library metadata columns (rows in table order), with the
    stored PROPERTY_COLUMNS."""
    from biogen.screen.report import ReportEnrichment

    meta, ranking, enrichment, chosen = ranked.meta, ranked.ranking, ranked.enrichment, ranked.selection.chosen
    props = None
    have = [c for c in PROPERTY_COLUMNS if c in meta.column_names]
    if have:
        rng = np.random.default_rng(0)
        sample = rng.choice(meta.num_rows, size=min(20000, meta.num_rows), replace=False)
        cols = {c: meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in have}
        props = {"library": {c: v[sample] for c, v in cols.items()}, "hits": {c: v[chosen] for c, v in cols.items()}}
    alive, fused = ranking.alive, ranking.fused
    enr = None
    if enrichment is not None:
        null = enrichment.null
        enr = ReportEnrichment(np.where(alive, fused, -np.inf), enrichment.labels, enrichment.metrics,
                               None, null, _report_details(enrichment),
                               None if null is None else property_ranking(
                                   meta.column(null.prop).to_numpy(zero_copy_only=False), null.high_first, alive))
    return {k: v[alive] for k, v in score_cols.items()} | {"fused": fused[alive]}, props, enr


def _report_details(enrichment: ScreenEnrichment) -> dict:
    return {k: v for k, v in enrichment.as_dict().items()
            if k.startswith("actives_")}  # the funnel's actives beside the metrics


def _streamed_report_inputs(st: Streamed, chosen: np.ndarray, enrichment: ScreenEnrichment | None
                            ) -> tuple[dict, dict | None, object]:
    """The same from a streaming screen: histograms and the library's property cloud from the
    shards' seeded sample, the enrichment curves from the tie counts."""
    from biogen.screen.report import ReportEnrichment

    sample, scores, props = st.sample, {}, None
    if sample is not None:
        col = {c: sample.column(c).to_numpy(zero_copy_only=False) for c in sample.column_names}
        alive = col["alive"].astype(bool)
        scores = {c.removeprefix("score:"): v[alive] for c, v in col.items() if c.startswith("score:")}
        scores["fused"] = col["fused"][alive]
        have = [c for c in PROPERTY_COLUMNS if f"prop:{c}" in col]
        if have:
            props = {"library": {c: col[f"prop:{c}"] for c in have},
                     "hits": {c: np.asarray(st.rows.column(c, chosen), dtype=np.float64) for c in have}}
    enr = None
    e = st.enrichment
    if e is not None and enrichment is not None:
        enr = ReportEnrichment(np.zeros(0), np.zeros(0, dtype=bool), e.metrics, None, e.null,
                               _report_details(enrichment), counts=e.counts, null_counts=e.null_counts)
    return scores, props, enr


def _write_report(run_dir: Path, target: TargetSpec, summary: ScreenSummary, seconds: dict, hits: pa.Table,
                  config_yaml: str, notes: list[str], wall: float, sections: list[dict], scores: dict,
                  props: dict | None, enr) -> Path:
    """report.html; scores, props, enr: from ``_report_inputs`` or ``_streamed_report_inputs``;
    sections: the stages' own (``Stage.finish``)."""
    from biogen.screen.report import ReportData, ReportSection, write_report

    if enr is not None:
        enr.label_name = summary.label_name
    data = ReportData(
        title=f"biogen screen: {target.name} vs {summary.library_name} ({summary.molecules:,} molecules)",
        summary={"target": f"{target.name} {target.description}".strip(), "library": summary.library,
                 "molecules": f"{summary.molecules:,}", "known actives": summary.known_actives,
                 "hits": hits.num_rows, "workers": summary.workers, "accelerator": summary.accelerator,
                 "run directory": str(run_dir), "wall time (s)": f"{wall:.1f}"},
        funnel=summary.funnel, stage_seconds=list(seconds.items()),
        scores=scores, hits=hits, property_space=props, enrichment=enr, config_yaml=config_yaml, notes=notes,
        versions=summary.versions,
        sections=[ReportSection(sec["title"], sec.get("facts", {}), sec.get("tables", []), sec.get("intro", ""))
                  for sec in sections])
    return write_report(data, run_dir / "report.html")
