"""Hydra task of ``biogen train``: config -> typed arguments -> fit_qsar -> run directory."""

from __future__ import annotations


import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.records import Reject, write_rejects
from biogen.chem.standardize import StandardizeSpec
from biogen.cli.config import typed
from biogen.errors import ConfigError

log = logging.getLogger("biogen")


@dataclass(frozen=True)
class TrainerSpec:
    """Config group ``trainer``: where Lightning trains (cpu | cuda; gpu is the old word)."""

    accelerator: str = "cpu"


def _write_rejects(rejects: list[Reject], run_dir: Path) -> None:
    path = write_rejects(rejects, run_dir / "train_rejects.csv")
    if path:
        log.warning("%d training record(s) could not be used; see %s", len(rejects), path)


def _finite(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def train(cfg: DictConfig) -> None:
    from biogen.models.data import training_source
    from biogen.models.qsar import QSARSpec, fit_qsar, resolve_accelerator

    t0 = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    featurizer = FingerprintSpec.from_dict(OmegaConf.to_container(cfg.featurizer, resolve=True))
    standardize = typed(StandardizeSpec, cfg.standardize, "standardize")
    spec = typed(QSARSpec, cfg.model, "model")
    accelerator = resolve_accelerator(typed(TrainerSpec, cfg.trainer, "trainer").accelerator)
    missing = [k for k in cfg.train_data if OmegaConf.is_missing(cfg.train_data, k)]
    if missing:
        raise ConfigError(f"train_data.{missing[0]} is required for train_data={cfg.train_data.source}, "
                          "e.g. biogen train train_data=file train_data.path=activities.csv "
                          "train_data.value_column=pki (see biogen train --help)")
    source = training_source(OmegaConf.to_container(cfg.train_data, resolve=True))

    data = source.load(featurizer, standardize)
    _write_rejects(data.rejects, run_dir)
    train_set, test_set = data.subset("train"), data.subset("test")
    log.info("training data %s: %d molecules (%d train, %d test), %d rejected", data.source, len(data),
             len(train_set), len(test_set), len(data.rejects))
    predictor = fit_qsar(
        train_set.fps, train_set.y, spec, featurizer, smiles=train_set.smiles, accelerator=accelerator,
        out_dir=run_dir, progress=bool(cfg.progress) and sys.stderr.isatty(), logger=True,
        test=(test_set.fps, test_set.y) if len(test_set) else None, standardize=standardize.to_dict(),
        info={"source": data.source, "unit": data.unit, "records": data.n_in, "rejects": len(data.rejects)},
    )
    checkpoint = predictor.checkpoint
    if cfg.output is not None:
        out = Path(str(cfg.output))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, out)
        log.info("checkpoint copied to %s", out)
    report = {"metrics": _finite(predictor.metrics), **_finite(predictor.info),
              "task": spec.task, "accelerator": accelerator, "featurizer": featurizer.to_dict(),
              "checkpoint": str(checkpoint), "output": None if cfg.output is None else str(cfg.output),
              "total_seconds": round(time.perf_counter() - t0, 3)}
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    shown = ", ".join(f"{k}={v:.3f}" for k, v in predictor.metrics.items() if math.isfinite(v))
    log.info("best epoch %d of %d: %s -> %s", predictor.info["best_epoch"], predictor.info["epochs"],
             shown, checkpoint)
