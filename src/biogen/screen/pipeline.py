"""The screen: library -> filters -> scorers -> fusion -> selection -> hits + report.

Per library shard (Ray actors that hold the stages and their models; GPU when the run
has one) the stages run in config order on the molecules still alive: a filter removes
molecules, a scorer adds a score. Every shard writes ``shards/<name>.arrow`` (Arrow IPC:
written and read back without encoding, ~7x faster than Parquet for this intermediate) with
each molecule's pass/fail and score per stage, and is recorded in the ledger, so a rerun
with the same ``output`` resumes. The driver then fuses the scores of the molecules that
passed every filter, ranks them, picks the hits (scaffold cap, MaxMin diversity) and
writes the outputs and the report.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.feather as feather
import pyarrow.parquet as pq

from biogen.chem.records import write_rejects
from biogen.chem.scaffolds import murcko_scaffolds
from biogen.errors import ConfigError, CorruptLibraryError
from biogen.library.store import Library
from biogen.runtime import Ledger, RuntimeSpec, ray_session, run_shards_on_actors
from biogen.runtime.ray_runtime import start_actors, wait_for_ray_shutdown
from biogen.screen.presets import LibrarySpec, cached_preset, preset_library
from biogen.screen.selection import SelectionSpec, best_first, fuse_scores, fusion_weights, select_hits
from biogen.screen.stages import MoleculeBatch, QSARScorer, ScreenContext, SimilarityScorer, Stage
from biogen.screen.target import TargetData, TargetSpec, held_out_actives, load_target

log = logging.getLogger(__name__)
PROPERTY_COLUMNS = ("mw", "clogp", "tpsa")


@dataclass(frozen=True)
class FusionSpec:
    """Config ``scoring.fusion``: method rank | zscore; weights: scorer name -> weight."""

    method: str = "rank"
    weights: dict = field(default_factory=dict)


@dataclass
class ScreenResult:
    run_dir: Path
    hits: pa.Table
    funnel: list[tuple[str, int]]
    metrics: dict | None
    seconds: dict[str, float]
    report: Path | None
    summary: dict


class ScreenWorker:
    """One shard at a time: read it, run the stages, write the per-molecule results."""

    def __init__(self, library: str, stages: list[Stage], out_dir: str):
        self.library = Library.open(library)
        self.stages = stages
        self.out_dir = Path(out_dir)
        for st in stages:
            st.load()
        stored = set(self.library.manifest.get("descriptors", []))
        needed = {c for st in stages for c in getattr(st, "columns", ())}
        self.columns = sorted(needed & stored)
        # SMILES are read only when a stage parses molecules (alerts, SMARTS, descriptors
        # the library does not store): most of a large screen's time would go to strings
        self.read_smiles = bool(needed - stored) or any(getattr(st, "needs_mols", False) for st in stages)

    def run(self, index: int) -> tuple[list[str], dict]:
        t_run = time.perf_counter()
        shard = self.library.shards[index]
        # the metadata only when a stage needs some (ids: the driver reads them, in a thread)
        wanted = [*(["smiles"] if self.read_smiles else []), *self.columns]
        meta = shard.metadata(wanted) if wanted else None
        n = shard.rows
        smiles = meta.column("smiles").to_pylist() if self.read_smiles else [None] * n
        batch = MoleculeBatch(np.arange(n, dtype=np.int64), smiles, np.asarray(shard.fingerprints),
                              np.asarray(shard.popcounts, dtype=np.int32),
                              {c: meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in self.columns})
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
    from biogen.runtime.ledger import sha256_file

    models = [sha256_file(Path(st.checkpoint)) for st in stages if getattr(st, "checkpoint", None)]
    desc = {"library": [(s.name, s.rows) for s in library.shards], "n_rows": library.n_rows,
            "stages": [st.describe() for st in stages], "models": models, "shard_format": "arrow"}
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()


def _metric_summary(scores: np.ndarray, labels: np.ndarray) -> dict:
    from biogen.screen import metrics

    out = metrics.summary(scores, labels)
    top = max(1, int(round(0.01 * len(scores))))
    out["recovered_top_1%"] = int(metrics.actives_in_top(scores, labels, top))
    return out


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
) -> ScreenResult:
    """Run a screen and write its outputs to ``run_dir`` (see module docstring)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = [*filters, *scorers]
    names = [st.name for st in stages]
    if len(set(names)) != len(names):
        raise ConfigError(f"stage names must be unique; got {names}")
    if not scorers:
        raise ConfigError("the screen has no scorer: set scoring=similarity, scoring=qsar or scoring=similarity_qsar")
    fusion_weights([st.name for st in scorers], fusion.weights, fusion.method)  # a typo fails before any shard
    seconds: dict[str, float] = {}
    t_start = time.perf_counter()

    def setup(lib: Library) -> tuple[TargetData, ScreenContext]:
        """Target compounds, stage preparation (QSAR training): no Ray needed."""
        t0 = time.perf_counter()
        tdata = load_target(target, lib.featurizer, lib.standardize)
        write_rejects(tdata.rejects, run_dir / "target_rejects.csv")
        if tdata.rejects:
            log.warning("%d target compound(s) could not be used; see %s", len(tdata.rejects),
                        run_dir / "target_rejects.csv")
        ctx = ScreenContext(lib.featurizer, None if tdata.actives is None else tdata.actives.fps,
                            None if tdata.actives is None else tdata.actives.popcount, run_dir,
                            tdata.training, accelerator, runtime.progress)
        seconds["target"] = time.perf_counter() - t0
        for st in stages:
            t0 = time.perf_counter()
            st.prepare(ctx)
            if time.perf_counter() - t0 > 0.5:
                seconds[f"prepare {st.name}"] = time.perf_counter() - t0
        return tdata, ctx

    # A local Ray instance takes ~4 s to start: when the library is known without Ray (a path
    # or a cached preset), the set-up runs in a thread meanwhile. A preset that must be built
    # first needs Ray, so then the set-up follows the build.
    t0 = time.perf_counter()
    lib_path = (Path(library.path) if library.path
                else cached_preset(library, target.name, held_out_actives(target)))
    lib = Library.open(lib_path) if lib_path is not None else None
    seconds["library"] = time.perf_counter() - t0
    early = None
    if lib is not None and runtime.mode == "local":
        pool = ThreadPoolExecutor(1, thread_name_prefix="screen-setup")
        early = pool.submit(setup, lib)
        pool.shutdown(wait=False)
    with ray_session(runtime, shutdown_in_background=True) as slots:
        if lib is None:  # target first: a preset library mixes in the target's held-out actives
            t0 = time.perf_counter()
            lib = Library.open(preset_library(library, target.name, held_out_actives(target), runtime))
            seconds["library"] += time.perf_counter() - t0
        # the worker actors start and import torch & co. while the driver prepares the
        # library, target and model (after a preset build: they would hold its CPUs)
        modules = ["biogen.screen.pipeline"]
        if any(isinstance(st, SimilarityScorer) for st in scorers):
            modules += ["biogen.search.fused:warm_up"]  # its Numba kernel loads in ~0.4 s
        if any(isinstance(st, QSARScorer) for st in scorers):
            modules += ["torch", "biogen.models.predictor"]
        actors = start_actors(runtime, min(slots, max(1, len(lib.shards))), modules=modules,
                              num_gpus=1.0 if accelerator != "cpu" else 0.0)  # no more actors than shards
        tdata, ctx = early.result() if early is not None else setup(lib)
        for st in stages:
            log.info("stage %s", st.describe())

        # what the outputs need of the library's metadata (ids, label keys, scaffolds, the
        # report's properties) is read at idle priority while the shards run
        key = lib.manifest["dedupe"]["key"]
        label_set = tdata.label_keys if key == "inchikey" else tdata.label_smiles
        stored = lib.manifest.get("descriptors", [])
        props = [c for c in PROPERTY_COLUMNS if c in stored] if report else []
        wanted = list(dict.fromkeys(["id"] + ([key] if label_set else [])
                                    + (["scaffold"] if "scaffold" in stored else []) + props))
        prefetch, library_columns = _prefetch_library_columns(lib, wanted)
        prefetch.shutdown(wait=False)

        t0 = time.perf_counter()
        ledger = Ledger(run_dir / "ledger.jsonl", _job_key(lib, stages))
        shard_keys = [(f"shard-{s.name}", (i,)) for i, s in enumerate(lib.shards)]
        results = run_shards_on_actors(
            ScreenWorker, (str(lib.path), stages, str(run_dir)), shard_keys, ledger=ledger, spec=runtime,
            slots=slots, desc="screen", total=len(shard_keys), actors=actors)
        seconds["shards (wall)"] = time.perf_counter() - t0
    # Ray stops in a background thread from here on (~2 s, most of it waiting on its
    # processes to exit): fusion, selection and the outputs need none
    stage_cpu = {n: sum(r["seconds"].get(n, 0.0) for r in results.values()) for n in names}

    t0 = time.perf_counter()
    table = pa.concat_tables([feather.read_table(run_dir / f"shards/{s.name}.arrow", memory_map=True)
                              for s in lib.shards])
    n_total = table.num_rows
    alive = np.ones(n_total, dtype=bool)
    funnel = [("library", n_total)]
    for st in filters:
        alive &= table.column(f"{st.name}_pass").to_numpy(zero_copy_only=False).astype(bool) if n_total else alive
        funnel.append((st.name, int(alive.sum())))
    score_cols = {st.name: table.column(st.name).to_numpy(zero_copy_only=False) for st in scorers}
    fused = np.full(n_total, np.nan)
    notes: list[str] = []
    if alive.any():
        fused[alive] = fuse_scores({k: v[alive] for k, v in score_cols.items()}, fusion.weights, fusion.method)
    else:
        notes.append("the filters removed every molecule of the library: no hits. Loosen or remove "
                     "filters (filters=none, or filters.<name>=null).")
        log.warning("%s", notes[-1])
    cand = np.flatnonzero(alive)
    # best first; ties in library order (deterministic, and numeric: no sort of 1M strings)
    order = cand[best_first(fused[cand])] if len(cand) else cand
    rank_of = np.full(n_total, -1, dtype=np.int64)
    rank_of[order] = np.arange(1, len(order) + 1)
    table = table.append_column("passed_filters", pa.array(alive)).append_column(
        "score", pa.array(fused, mask=~alive)).append_column("rank", pa.array(rank_of, mask=rank_of < 0))
    seconds["fusion + ranking"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    shard_of = table.column("shard").to_numpy()
    row_of = table.column("row").to_numpy()

    def fps_of(idx: np.ndarray) -> np.ndarray:
        return np.stack([lib.shards[int(shard_of[i])].fingerprints[int(row_of[i])] for i in idx])

    meta = library_columns.result()
    if meta.num_rows != n_total:
        raise CorruptLibraryError(f"the library at {lib.path} has {meta.num_rows} rows of metadata but its "
                                  f"shards {n_total} fingerprints; run `biogen library verify` on it")
    text = _RowText(lib, shard_of, row_of, scaffold_column=(meta.column("scaffold").combine_chunks()
                                                            if "scaffold" in meta.column_names else None))
    chosen, scaffolds = (select_hits(order, text.scaffolds, fps_of, selection) if len(order)
                         else (np.zeros(0, dtype=np.int64), []))
    hit_smiles = text.smiles(chosen)
    seconds["selection"] = time.perf_counter() - t0
    ids = meta.column("id").combine_chunks()
    table = table.add_column(2, "id", ids)

    # labels (held-out or given actives), matched by the library's dedupe key: InChIKey, or
    # canonical SMILES for a library built with dedupe_key=smiles
    metrics = None
    labels = None
    if label_set:
        labels = pc.is_in(meta.column(key), value_set=pa.array(sorted(label_set))).to_numpy(zero_copy_only=False)
        labels = labels.astype(bool)
        table = table.append_column("label", pa.array(labels))
        if labels.any() and (~labels).any():
            ranked = np.where(alive, fused, -np.inf)  # filtered-out molecules rank last
            metrics = _metric_summary(ranked, labels)
            metrics["actives_in_library"] = int(labels.sum())
            metrics["actives_passing_filters"] = int((labels & alive).sum())
            keep = np.ones(n_total, dtype=bool)
            metrics["actives_after_filter"] = {}
            for st in filters:
                keep &= table.column(f"{st.name}_pass").to_numpy(zero_copy_only=False).astype(bool)
                metrics["actives_after_filter"][st.name] = int((labels & keep).sum())
            metrics["actives_in_hits"] = int(labels[chosen].sum()) if len(chosen) else 0
        else:
            notes.append(f"no labelled actives found in the library ({tdata.label_name}); enrichment not computed")

    t0 = time.perf_counter()
    hit_cols = {"rank": pa.array(np.arange(1, len(chosen) + 1)), "id": ids.take(pa.array(chosen))
                if len(chosen) else pa.array([], pa.string()),
                "smiles": pa.array(hit_smiles, pa.string()), "score": pa.array(fused[chosen]),
                "score_rank": pa.array(rank_of[chosen])}
    for k, v in score_cols.items():
        hit_cols[k] = pa.array(v[chosen])
    hit_cols["scaffold"] = pa.array(scaffolds, pa.string())
    if labels is not None:
        hit_cols["label"] = pa.array(labels[chosen])
    hits = pa.table(hit_cols)
    pq.write_table(hits, run_dir / "hits.parquet")
    import pyarrow.csv as pacsv

    pacsv.write_csv(hits, run_dir / "hits.csv")
    _write_sdf(hits, run_dir / "hits.sdf")
    # the per-molecule table (every library row) is written while the report renders
    bg = ThreadPoolExecutor(1, thread_name_prefix="screen-bg")
    scores_written = bg.submit(pq.write_table, table, run_dir / "scores.parquet")
    shutil.copy(lib.path / "manifest.json", run_dir / "library_manifest.json")
    if config_yaml:
        (run_dir / "config.yaml").write_text(config_yaml)  # also when output= is not the Hydra run dir
    funnel.append(("scored", int(alive.sum())))
    funnel.append(("selected", len(chosen)))
    seconds["outputs"] = time.perf_counter() - t0
    seconds.update({f"stage {k} (cpu)": v for k, v in stage_cpu.items()})

    from biogen.library.manifest import tool_versions

    summary = {
        "library": str(lib.path), "library_name": library.preset if not library.path else Path(lib.path).name,
        "molecules": n_total, "shards": len(lib.shards),
        "featurizer": lib.featurizer.to_dict(), "target": target.name, "target_description": target.description,
        "known_actives": 0 if tdata.actives is None else len(tdata.actives),
        "target_rejects": len(tdata.rejects), "training_compounds": 0 if tdata.training is None else len(tdata.training.y),
        "stages": [st.describe() for st in stages], "fusion": {"method": fusion.method, "weights": dict(fusion.weights)},
        "selection": vars(selection), "accelerator": accelerator, "workers": slots,
        "funnel": funnel, "metrics": metrics, "label_name": tdata.label_name, "notes": notes,
        "qsar_train_metrics": {st.name: getattr(st, "train_metrics", None) for st in scorers if hasattr(st, "train_metrics")},
        "seconds": {k: round(v, 3) for k, v in seconds.items()}, "versions": tool_versions(),
    }
    report_path = None
    if report:
        t0 = time.perf_counter()
        report_path = _write_report(run_dir, target, meta, summary, funnel, seconds, score_cols, alive, fused,
                                    hits, labels, metrics, tdata.label_name, config_yaml, notes, chosen,
                                    time.perf_counter() - t_start)
        seconds["report"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores_written.result()
    bg.shutdown()
    seconds["outputs"] += time.perf_counter() - t0
    seconds["total"] = time.perf_counter() - t_start
    summary["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (run_dir / "funnel.json").write_text(json.dumps(dict(funnel), indent=2) + "\n")
    ledger.complete(hits=len(hits))
    return ScreenResult(run_dir, hits, funnel, metrics, seconds, report_path, summary)


@functools.wraps(_run_screen)
def run_screen(*args, **kwargs) -> ScreenResult:
    try:
        return _run_screen(*args, **kwargs)
    finally:
        wait_for_ray_shutdown()  # the local Ray instance stopped while the outputs were written


def _write_report(run_dir, target, meta, summary, funnel, seconds, score_cols, alive, fused, hits, labels,
                  metrics, label_name, config_yaml, notes, chosen, wall) -> Path:
    """meta: library metadata columns (rows in table order), with the stored PROPERTY_COLUMNS."""
    from biogen.screen.report import ReportData, write_report

    props = None
    have = [c for c in PROPERTY_COLUMNS if c in meta.column_names]
    if have:
        rng = np.random.default_rng(0)
        sample = rng.choice(meta.num_rows, size=min(20000, meta.num_rows), replace=False)
        cols = {c: meta.column(c).to_numpy(zero_copy_only=False).astype(np.float64) for c in have}
        props = {"library": {c: v[sample] for c, v in cols.items()}, "hits": {c: v[chosen] for c, v in cols.items()}}
    enrichment = None
    if metrics is not None:
        enrichment = {"scores": np.where(alive, fused, -np.inf), "labels": labels, "metrics": metrics,
                      "label_name": label_name}
    data = ReportData(
        title=f"biogen screen: {target.name} vs {summary['library_name']} ({summary['molecules']:,} molecules)",
        summary={"target": f"{target.name} {target.description}".strip(), "library": summary["library"],
                 "molecules": f"{summary['molecules']:,}", "known actives": summary["known_actives"],
                 "hits": hits.num_rows, "workers": summary["workers"], "accelerator": summary["accelerator"],
                 "run directory": str(run_dir), "wall time (s)": f"{wall:.1f}"},
        funnel=funnel, stage_seconds=list(seconds.items()),
        scores={k: v[alive] for k, v in score_cols.items()} | {"fused": fused[alive]},
        hits=hits, property_space=props, enrichment=enrichment, config_yaml=config_yaml, notes=notes,
        versions=summary["versions"])
    return write_report(data, run_dir / "report.html")
