"""Hydra task of ``biogen screen``: config -> stage objects and typed specs -> run_screen."""

from __future__ import annotations

import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biogen.cli.config import from_config
from biogen.errors import ConfigError

log = logging.getLogger("biogen")


def build_stages(group: DictConfig | None, key: str) -> list:
    """Instantiate the stages of a config group in order; a stage set to null is skipped."""
    stages = []
    for name, node in (group or {}).items():
        if node is None:
            continue
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ConfigError(f"{key}.{name} must be a stage config with _target_ (e.g. "
                              "biogen.screen.stages.PropertyFilter), or null to drop it")
        stages.append(from_config(node, f"{key}.{name}", name=str(name)))
    return stages


def screen(cfg: DictConfig) -> None:
    from biogen.device import resolve_device
    from biogen.screen.pipeline import run_screen

    run_dir = Path(cfg.output) if cfg.output else Path(HydraConfig.get().runtime.output_dir)
    filters = build_stages(cfg.filters, "filters")
    scorers = build_stages(cfg.scoring.scorers, "scoring.scorers")
    for st in filters:
        if st.kind != "filter":
            raise ConfigError(f"filters.{st.name} is a scorer; put it under scoring.scorers")
    for st in scorers:
        if st.kind != "score":
            raise ConfigError(f"scoring.scorers.{st.name} is a filter; put it under filters")
    result = run_screen(
        from_config(cfg.library, "library"), from_config(cfg.target, "target"), filters, scorers,
        fusion=from_config(cfg.scoring.fusion, "scoring.fusion"), selection=from_config(cfg.selection, "selection"),
        runtime=from_config(cfg.runtime, "runtime"), run_dir=run_dir,
        accelerator=resolve_device(cfg.device), report=bool(cfg.report),
        config_yaml=OmegaConf.to_yaml(cfg), streaming=cfg.streaming)
    funnel = " -> ".join(f"{name} {n:,}" for name, n in result.funnel)
    print(f"funnel: {funnel}")
    if result.metrics:
        m = result.metrics
        print(f"labelled actives: {m['actives_in_library']} in the library, {m['actives_passing_filters']} pass "
              f"the filters, {m['recovered_top_1%']} in the top 1%, {m['actives_in_hits']} among the "
              f"{result.hits.num_rows} hits; EF1% {m['ef1']:.1f}, BEDROC(20) {m['bedroc20']:.3f}, AUROC {m['auroc']:.3f}")
        nm = m.get("null_model")
        if nm:
            print(f"null model, ranking by {nm['property']} ({'high' if nm['high_first'] else 'low'} first) alone: "
                  f"EF1% {nm['ef1']:.1f}, AUROC {nm['auroc']:.3f}"
                  + ("  <- as good as the screen: the actives differ from the library in size"
                     if nm["ef1"] >= m["ef1"] or nm["auroc"] >= m["auroc"] else ""))
    for row in result.hits.slice(0, 5).to_pylist():
        print(f"  #{row['rank']:<3} {row['id']:<24} score {row['score']:.3f}  {row['smiles']}")
    print(f"outputs: {result.run_dir} (hits.parquet/csv/sdf, scores.parquet, report.html, summary.json); "
          f"{result.seconds['total']:.1f} s")
