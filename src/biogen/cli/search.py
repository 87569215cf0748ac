"""Hydra task of ``biogen search``: config -> typed arguments -> search API -> hits table."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biogen.chem.records import Reject, write_rejects
from biogen.cli.config import from_config
from biogen.errors import ConfigError, InputError

log = logging.getLogger("biogen")
MODES = ("topk", "threshold", "substructure")


def write_table(table: pa.Table, output: str | None) -> str:
    """Write hits to ``output`` (.csv, .tsv, .parquet) or stdout (TSV); returns where."""
    if output is None:
        pacsv.write_csv(table, sys.stdout.buffer, pacsv.WriteOptions(delimiter="\t", quoting_style="none", quoting_header="none"))
        sys.stdout.flush()
        return "stdout"
    path = Path(output)
    suffix = "".join(path.suffixes[-1:]).lower()
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        pq.write_table(table, path)
    elif suffix in (".csv", ".tsv"):
        pacsv.write_csv(table, path, pacsv.WriteOptions(delimiter="," if suffix == ".csv" else "\t"))
    else:
        raise ConfigError(f"output={output!r}: use a .csv, .tsv or .parquet file name, or leave it null for stdout")
    return str(path)


def _write_rejects(rejects: list[Reject], run_dir: Path) -> None:
    path = write_rejects(rejects, run_dir / "query_rejects.csv")
    if path:
        log.warning("%d query record(s) could not be used; see %s", len(rejects), path)


def _part_bytes(gib) -> int:
    """``part_gib`` in bytes (a positive number of GiB, e.g. 0.5 or 16)."""
    try:
        value = float(gib)
    except (TypeError, ValueError):
        value = -1.0
    if not value > 0:
        raise ConfigError(f"part_gib={gib!r} must be a positive number of GiB (e.g. 4), or null for the automatic "
                          "budget")
    return max(1, int(value * 2**30))


def search(cfg: DictConfig) -> None:
    from biogen.search import Metric, SimilarityIndex

    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not valid; choose one of {', '.join(MODES)}")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    runtime = from_config(cfg.runtime, "runtime")
    t0 = time.perf_counter()
    report: dict = {"library": str(cfg.library), "mode": cfg.mode, "space": str(cfg.space)}
    if str(cfg.space) != "fingerprint":
        table = _embedding_search(cfg, run_dir, report)
    elif cfg.mode == "substructure":
        from biogen.search.substructure import substructure_search

        result = substructure_search(str(cfg.library), str(cfg.query), max_hits=cfg.max_hits,
                                     use_chirality=bool(cfg.use_chirality), runtime=runtime,
                                     progress=runtime.progress)
        table = result.table
        report.update({k: v for k, v in vars(result).items() if k != "table"})
    else:
        metric = Metric("tanimoto" if cfg.metric == "auto" else str(cfg.metric), float(cfg.alpha), float(cfg.beta))
        kwargs = dict(mode=cfg.mode, k=int(cfg.k), threshold=float(cfg.threshold), metric=metric)
        reader = from_config(cfg.reader, "reader")
        part_bytes = None if cfg.get("part_gib") is None else _part_bytes(cfg.part_gib)
        if int(cfg.actors) > 0:
            from biogen.runtime import NO_RAY, ray_session

            if runtime.mode in NO_RAY:
                raise ConfigError(f"actors={int(cfg.actors)} runs search actors on Ray, but runtime.mode="
                                  f"{runtime.mode} uses no Ray; use actors=0 (one index in this process, "
                                  "workers=N threads) or runtime=local|ray_cluster")
            from biogen.search.distributed import ShardedSearch

            with ray_session(runtime), ShardedSearch(cfg.library, int(cfg.actors), cfg.engine, cfg.workers,
                                                                  part_bytes) as index:
                queries = index.queries(cfg.query, reader)
                table = index.search(queries, **kwargs)
                engine = index.engine
        else:
            with SimilarityIndex.open(cfg.library, engine=cfg.engine, workers=cfg.workers, part_bytes=part_bytes) as index:
                queries = index.queries(cfg.query, reader)
                table = index.search(queries, **kwargs)
                engine = index.engine_name
        _write_rejects(queries.rejects, run_dir)
        report.update({"engine": engine, "metric": metric.label, "queries": len(queries),
                       "query_rejects": len(queries.rejects), "k": int(cfg.k) if cfg.mode == "topk" else None,
                       "threshold": float(cfg.threshold) if cfg.mode == "threshold" else None})
    report["hits"] = table.num_rows
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["output"] = write_table(table, None if cfg.output is None else str(cfg.output))
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    log.info("%d hits (%s) in %.2f s -> %s", table.num_rows, cfg.mode, report["seconds"], report["output"])


def _embedding_search(cfg: DictConfig, run_dir: Path, report: dict):
    """space=<model>: exact search of the library's stored embeddings of that model."""
    from biogen.embeddings.base import check_model_name, model_names
    from biogen.search.embedding import METRICS, EmbeddingIndex

    space = str(cfg.space)
    try:
        model = check_model_name(space)
    except ConfigError:
        raise ConfigError(f"space={space!r} is not valid; choose fingerprint or one of {', '.join(model_names())}") from None
    if cfg.mode == "substructure":
        raise ConfigError("mode=substructure searches structures, not embeddings; use space=fingerprint")
    metric = "cosine" if cfg.metric == "auto" else str(cfg.metric)
    if metric not in METRICS:
        raise ConfigError(f"metric={metric!r} is for fingerprints; embeddings are compared by {' or '.join(METRICS)}")
    if int(cfg.actors) > 0:
        raise ConfigError("actors>0 shards fingerprint search; embedding search runs in this process (actors=0)")
    engine = str(cfg.engine)
    device = {"auto": "auto", "cpu": "cpu", "cuda": "cuda"}.get(engine)
    if device is None:
        raise ConfigError(f"engine={engine!r} is not valid; choose auto, cpu or cuda")
    index = EmbeddingIndex.open(cfg.library, model, metric=metric, device=device)
    queries = index.queries(cfg.query, from_config(cfg.reader, "reader"))
    _write_rejects(queries.rejects, run_dir)
    if not len(queries):
        raise InputError(f"no query could be embedded by {model} ({len(queries.rejects)} rejected; see "
                         f"{run_dir / 'query_rejects.csv'})")
    table = index.search(queries, mode=str(cfg.mode), k=int(cfg.k), threshold=float(cfg.threshold))
    report.update({"engine": f"torch-{index.device.type}", "metric": metric, "model": index.entry["version"],
                   "queries": len(queries), "query_rejects": len(queries.rejects), "library_vectors": len(index),
                   "k": int(cfg.k) if cfg.mode == "topk" else None,
                   "threshold": float(cfg.threshold) if cfg.mode == "threshold" else None})
    return table
