"""``biogen train model=dti``: drug-target pairs -> protein vectors -> fit_dti -> run directory."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.records import Reject
from biogen.chem.standardize import StandardizeSpec
from biogen.cli.config import from_config
from biogen.errors import ConfigError, InputError

log = logging.getLogger("biogen")

def load_pairs(source, featurizer: FingerprintSpec, standardize: StandardizeSpec):
    """The ``DTIData`` of a built ``train_data`` source (``train_data=kiba | pairs``)."""
    from biogen.dti.data import KibaSource, PairsSource

    if not isinstance(source, (KibaSource, PairsSource)):
        raise ConfigError(f"model=dti trains on drug-target pairs, not train_data={getattr(source, 'source', source)}: "
                          "use train_data=kiba train_data.path=<DeepDTA's data/kiba folder> or train_data=pairs "
                          "train_data.path=pairs.csv")
    return source.load(featurizer, standardize)


def _drop_proteins(data, missing: dict[int, str]):
    """Pairs of proteins without a vector become rejects (one per protein, with the count)."""
    if not missing:
        return data
    lose = np.isin(data.pairs[:, 1], np.array(sorted(missing)))
    if lose.all():
        raise InputError(f"none of the {len(data.protein_ids)} proteins has an embedding in the protein store; embed "
                         "them first (biogen embed input=<their FASTA> output=<store> model=<plm>)")
    rejects = [Reject(data.source, i + 1, "protein_not_embedded",
                      f"protein {data.protein_ids[i]}: {why}; its {int((data.pairs[:, 1] == i).sum())} pair(s) are "
                      "left out", data.sequences[i][:200]) for i, why in sorted(missing.items())]
    return data.keep_pairs(np.flatnonzero(~lose), rejects)


def embed_compounds(data, model_name: str, dtype: str, accelerator: str):
    """The data with its compounds' ``model_name`` vectors in place of their fingerprints;
    the pairs of a compound the model cannot handle become rejects (one per compound)."""
    from dataclasses import replace

    from biogen.embeddings.base import EmbeddingSpec, load_model

    model = load_model(model_name, device=accelerator, dtype=dtype)
    t = time.perf_counter()
    out = model.embed(data.smiles)
    log.info("%s embeddings of %d compounds in %.1f s", model_name, len(data.smiles), time.perf_counter() - t)
    failed = np.flatnonzero(~out.ok)
    data = replace(data, fps=out.vectors, featurizer=EmbeddingSpec.of(model.identity()))
    if not len(failed):
        return data
    rejects = [Reject(data.source, int(i) + 1, f"{model_name}_failed",
                      f"compound {data.compound_ids[i]}: {model_name} cannot embed it ({out.reasons.get(int(i))}); its "
                      f"{int((data.pairs[:, 0] == i).sum())} pair(s) are left out", data.smiles[i] or "")
               for i in failed]
    return data.keep_pairs(np.flatnonzero(~np.isin(data.pairs[:, 0], failed)), rejects)


def train_dti(cfg: DictConfig) -> None:
    from biogen.cli.train import _finite, _write_rejects, featurizer_of, job_settings
    from biogen.dti.predictor import DTISpec, protein_vectors

    t0 = time.perf_counter()
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    featurizer, model = featurizer_of(cfg)  # featurizer=minimol: the compound side reads MiniMol vectors
    standardize, spec, accelerator = job_settings(
        cfg, DTISpec, "biogen train model=dti train_data=kiba train_data.path=data/kiba")
    data = load_pairs(from_config(cfg.train_data, "train_data"), featurizer, standardize)
    from biogen.dti.model import fit_dti  # Lightning (~3 s to import): after the config and data are checked
    if model:
        data = embed_compounds(data, model.type, model.dtype, accelerator)
    log.info("training data: %s", data.summary())
    vectors, protein, lacking = protein_vectors(data.sequences, spec, device=accelerator)
    data = _drop_proteins(data, lacking)
    _write_rejects(data.rejects, run_dir)
    predictor, parts = fit_dti(data, np.nan_to_num(vectors), protein, spec, accelerator=accelerator,
                               progress=bool(cfg.progress) and sys.stderr.isatty())
    checkpoint = predictor.save(run_dir / "model.ckpt")
    if cfg.output is not None:
        out = Path(str(cfg.output))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint, out)
        log.info("checkpoint copied to %s", out)
    report = {"metrics": _finite(predictor.metrics), **_finite(predictor.info), "model": "dti",
              "protein_model": protein, "featurizer": data.featurizer.to_dict(), "accelerator": accelerator,
              "pairs": len(data), "compounds": len(data.compound_ids), "proteins": len(data.protein_ids),
              "rejects": len(data.rejects), "checkpoint": str(checkpoint),
              "output": None if cfg.output is None else str(cfg.output),
              "total_seconds": round(time.perf_counter() - t0, 3)}
    (run_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    shown = ", ".join(f"{k}={v:.3f}" for k, v in predictor.metrics.items()
                      if isinstance(v, float) and k.startswith("test_"))
    log.info("best epoch %d of %d (%s split): %s -> %s", predictor.info["best_epoch"], predictor.info["epochs"],
             spec.split, shown, checkpoint)
