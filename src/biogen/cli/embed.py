"""Hydra tasks of ``biogen embed`` and ``biogen embed-search``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biogen.cli.config import from_config, inputs
from biogen.device import resolve_device
from biogen.errors import ConfigError

log = logging.getLogger("biogen")


def embed(cfg: DictConfig) -> None:
    from biogen.protein.embed import EmbedSpec
    from biogen.protein.job import embed_proteins

    try:
        spec = EmbedSpec(layers=tuple(int(x) for x in cfg.layers), pooling=str(cfg.pooling),
                         per_residue=bool(cfg.per_residue), long_policy=str(cfg.long_policy),
                         chunk_overlap=int(cfg.chunk_overlap), token_budget=int(cfg.token_budget), dtype=str(cfg.dtype))
    except TypeError as exc:
        raise ConfigError(f"invalid embedding settings ({exc})") from None
    runtime = from_config(cfg.runtime, "runtime")
    report = embed_proteins(inputs(cfg.input), cfg.output, model=str(cfg.model), spec=spec, device=str(cfg.device),
                            shard_size=int(cfg.shard_size), cache_dir=cfg.model_cache_dir, download=bool(cfg.download),
                            overwrite=bool(cfg.overwrite), runtime=runtime)
    log.info("%s", report.summary())
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    (run_dir / "report.json").write_text(json.dumps(report.__dict__, indent=2, default=str) + "\n")
    print(report.summary())


def embed_search(cfg: DictConfig) -> None:
    from biogen.cli.search import write_table
    from biogen.protein.search import search_store

    query = inputs(cfg.query)
    table = search_store(str(cfg.store), query, k=int(cfg.k), vector=cfg.vector, device=resolve_device(cfg.device))
    keep_lists = cfg.output is not None and str(cfg.output).endswith(".parquet")  # CSV/TSV hold no lists
    where = write_table(table if keep_lists else table.drop(["hit_ids"]), cfg.output)
    log.info("%d hits -> %s", table.num_rows, where)


def merge(cfg: DictConfig) -> None:
    from biogen.protein.merge import merge_stores

    report = merge_stores(inputs(cfg.parts), cfg.output, overwrite=bool(cfg.overwrite), progress=bool(cfg.progress))
    log.info("%s", report.summary())
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    data = {k: v for k, v in report.__dict__.items() if k != "manifest"}
    (run_dir / "report.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(report.summary())
