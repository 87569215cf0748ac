"""``biogen evaluate dti``: config -> pairs -> ``biogen.evaluation.dti.run_dti_evaluation``."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biogen.cli.config import from_config
from biogen.chem.standardize import StandardizeSpec

log = logging.getLogger("biogen")


def evaluate_dti(cfg: DictConfig) -> None:
    from biogen.cli.train import _write_rejects
    from biogen.cli.train_dti import load_pairs
    from biogen.device import resolve_device
    from biogen.evaluation.dti import DTIEvalSpec, run_dti_evaluation

    t0 = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    out = Path(str(cfg.output)) if cfg.output is not None else run_dir
    spec = DTIEvalSpec(splits=tuple(str(s) for s in cfg.splits),
                       representations=tuple(str(r) for r in cfg.representations),
                       baselines=tuple(str(b) for b in cfg.baselines), ef_fraction=float(cfg.ef_fraction),
                       ef_min_pairs=int(cfg.ef_min_pairs), model=OmegaConf.to_container(cfg.model, resolve=True))
    featurizer = from_config(cfg.featurizer, "featurizer")
    data = load_pairs(from_config(cfg.data, "data"), featurizer, StandardizeSpec())
    out.mkdir(parents=True, exist_ok=True)
    _write_rejects(data.rejects, out)
    log.info("evaluate dti: %s; splits %s; representations %s; baselines %s -> %s", data.summary(),
             list(spec.splits), list(spec.representations), list(spec.baselines), out)
    rows = run_dti_evaluation(data, spec, out, accelerator=resolve_device(str(cfg.device)),
                              progress=bool(cfg.progress) and sys.stderr.isatty())
    print((out / "dti-results.md").read_text())
    log.info("%d runs in %.0f s -> %s", len(rows), time.perf_counter() - t0, out)
