"""Hydra tasks of ``biogen library ...``: config -> typed arguments -> library API."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biogen.chem.fingerprints import FingerprintSpec
from biogen.cli.config import from_config, inputs
from biogen.errors import ConfigError, CorruptLibraryError

log = logging.getLogger("biogen")


def _save_report(report) -> None:
    out = Path(HydraConfig.get().runtime.output_dir) / "report.json"
    out.write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    log.info("run directory: %s", out.parent)


def _names(value) -> list[str]:
    """A list option given as a list or as one name (``embeddings=minimol``)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _fingerprint(cfg: DictConfig) -> FingerprintSpec:
    from biogen.cli.train import featurizer_of

    fp, model = featurizer_of(cfg)
    if model is not None:
        raise ConfigError(f"featurizer={model.type} is a QSAR input for biogen train, not a library fingerprint; a "
                          f"library stores {model.type} vectors with embeddings=[{model.type}] or biogen library embed")
    return fp


def build(cfg: DictConfig) -> None:
    from biogen.library.ingest import build_library

    report = build_library(
        inputs(cfg.input), cfg.output,
        featurizer=_fingerprint(cfg),
        standardize=from_config(cfg.standardize, "standardize"),
        descriptors=list(cfg.descriptors),
        reader=from_config(cfg.reader, "reader"),
        dedupe=cfg.dedupe, dedupe_key=cfg.dedupe_key, id_prefix=str(cfg.id_prefix), chunk_size=int(cfg.chunk_size),
        overwrite=bool(cfg.overwrite), runtime=from_config(cfg.runtime, "runtime"),
        embeddings=_names(cfg.embeddings), dedupe_partitions=cfg.dedupe_partitions,
    )
    log.info("%s", report.summary())
    _save_report(report)


def append(cfg: DictConfig) -> None:
    from biogen.library.ingest import append_library

    report = append_library(
        cfg.library, inputs(cfg.input), reader=from_config(cfg.reader, "reader"),
        chunk_size=int(cfg.chunk_size), runtime=from_config(cfg.runtime, "runtime"),
        dedupe_partitions=cfg.dedupe_partitions,
    )
    log.info("%s", report.summary())
    _save_report(report)


def info(cfg: DictConfig) -> None:
    from biogen.library.verify import format_info, library_info

    data = library_info(cfg.library)
    if cfg.format == "json":
        print(json.dumps(data, indent=2))
    elif cfg.format == "text":
        print(format_info(data))
    else:
        raise ConfigError(f"format={cfg.format!r} is not valid; choose text or json")


def verify(cfg: DictConfig) -> None:
    from biogen.library.verify import verify_library

    report = verify_library(cfg.library, deep=bool(cfg.deep))
    for w in report.warnings:
        print(f"warning: {w}")
    for p in report.problems:
        print(f"CORRUPT {p}")
    if report.ok:
        print(f"OK {report.path}: {report.shards_checked} shards verified")
        return
    raise CorruptLibraryError(
        f"{report.path}: {len(report.problems)} problem(s) in {report.shards_checked} shards "
        "(listed above); restore the named shards from a backup or rebuild the library")


def merge(cfg: DictConfig) -> None:
    from biogen.library.merge import merge_libraries

    report = merge_libraries(
        inputs(cfg.parts), cfg.output, overwrite=bool(cfg.overwrite), exact=bool(cfg.exact),
        runtime=from_config(cfg.runtime, "runtime"), dedupe_partitions=cfg.dedupe_partitions,
    )
    log.info("%s", report.summary())
    _save_report(report)


def embed(cfg: DictConfig) -> None:
    from biogen.library.embeddings import embed_library

    report = embed_library(
        cfg.library, str(cfg.model), device=str(cfg.device), dtype=str(cfg.dtype),
        compute_dtype=str(cfg.compute_dtype), batch_size=int(cfg.batch_size), overwrite=bool(cfg.overwrite),
        runtime=from_config(cfg.runtime, "runtime"),
    )
    rate = report["rows"] / report["seconds"] if report["seconds"] else 0.0
    log.info("%s: %s rows embedded in %d shard(s) (%d of %d were done), %s without a vector %s, %.1f s (%.0f "
             "molecules/s)", report["model"], f"{report['rows']:,}", report["shards_embedded"],
             report["shards_total"] - report["shards_embedded"], report["shards_total"], f"{report['failed']:,}",
             report["reasons"] or "", report["seconds"], rate)
    _save_report(SimpleNamespace(**report))
