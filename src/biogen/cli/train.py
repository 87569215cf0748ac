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
from biogen.cli.config import from_config
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


def featurizer_of(cfg: DictConfig):
    """(fingerprint spec, compound model or None) of the ``featurizer`` group: a fingerprint,
    or ``featurizer=minimol`` (a compound model's vectors; fingerprints are made first all the
    same, for the standardization and rejects of a library build)."""
    from biogen.embeddings.base import ModelFeaturizer

    feat = from_config(cfg.featurizer, "featurizer")
    return (FingerprintSpec(), feat) if isinstance(feat, ModelFeaturizer) else (feat, None)


def _embed(data, model_name: str, dtype: str, accelerator: str):
    """The training molecules' embeddings in place of their fingerprints; molecules the
    model cannot handle become rejects (reason ``<model>_failed``)."""
    from dataclasses import replace

    import numpy as np

    from biogen.embeddings.base import EmbeddingSpec, load_model

    model = load_model(model_name, device=accelerator, dtype=dtype)
    t = time.perf_counter()
    out = model.embed(data.smiles)
    log.info("%s embeddings of %d training molecules in %.1f s", model_name, len(data.smiles), time.perf_counter() - t)
    keep = np.flatnonzero(out.ok)
    rejects = list(data.rejects) + [
        Reject(data.source, i + 1, f"{model_name}_failed", f"{model_name} cannot embed {data.smiles[i]!r}: {why}",
               data.smiles[i] or "") for i, why in sorted(out.reasons.items())]
    data = replace(data, fps=out.vectors[keep], y=data.y[keep], smiles=[data.smiles[i] for i in keep],
                   split=[data.split[i] for i in keep], rejects=rejects)
    return EmbeddingSpec.of(model.identity()), data


def job_settings(cfg: DictConfig, spec_cls, example: str):
    """(standardize, model spec, accelerator) of a train job, after checking that every
    required ``train_data`` key is set (``example``: a command that sets them)."""
    from biogen.device import resolve_device

    standardize = from_config(cfg.standardize, "standardize")
    spec = from_config(cfg.model, "model")
    if not isinstance(spec, spec_cls):
        raise ConfigError(f"model={type(spec).__name__} is not a {spec_cls.__name__} model")
    accelerator = resolve_device(from_config(cfg.trainer, "trainer").accelerator, "trainer.accelerator")
    missing = [k for k in cfg.train_data if OmegaConf.is_missing(cfg.train_data, k)]
    if missing:
        raise ConfigError(f"train_data.{missing[0]} is required for train_data={cfg.train_data.source}, e.g. "
                          f"{example} (see biogen train --help)")
    return standardize, spec, accelerator


def train(cfg: DictConfig) -> None:
    if str(cfg.model.get("type", "")) == "dti":  # the protein-aware model trains on drug-target pairs
        from biogen.cli.train_dti import train_dti

        return train_dti(cfg)
    from biogen.models.data import training_source
    from biogen.models.predictor import QSARSpec

    t0 = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    featurizer, model = featurizer_of(cfg)
    standardize, spec, accelerator = job_settings(
        cfg, QSARSpec, "biogen train train_data=file train_data.path=activities.csv train_data.value_column=pki")
    source = training_source(from_config(cfg.train_data, "train_data"))
    from biogen.models.qsar import fit_qsar  # Lightning (~3 s to import): after the config is checked

    data = source.load(featurizer, standardize)
    if model:  # the fingerprints just made are replaced by the model's vectors
        featurizer, data = _embed(data, model.type, model.dtype, accelerator)
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
