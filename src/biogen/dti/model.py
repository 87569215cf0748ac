"""Training of the protein-aware model (``biogen train model=dti``) with Lightning; the
network, spec and inference side live in ``biogen.dti.predictor`` (re-exported here).

Loss: mean squared error on standardized affinities (KIBA's transformed scores are
continuous and most pairs are measured inactives: a regression keeps the ordering among
the many weak binders that a contrastive loss over actives vs inactives would discard).
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from biogen.chem.fingerprints import FingerprintSpec
from biogen.dti.predictor import DTINet, DTIPredictor, DTISpec, protein_vectors

log = logging.getLogger(__name__)

__all__ = ["DTIModule", "DTINet", "DTIPredictor", "DTISpec", "fit_dti", "protein_vectors", "split_data"]


class _EpochLog(pl.Callback):
    """One log line per epoch (standardized MSE), so a long run shows progress in any log."""

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        m = trainer.callback_metrics
        val = m.get("val_loss")
        log.info("epoch %d/%d: train mse %.4f%s", trainer.current_epoch + 1, trainer.max_epochs,
                 float(m.get("train_loss", float("nan"))), "" if val is None else f", val mse {float(val):.4f}")


class DTIModule(pl.LightningModule):
    """Training wrapper: batches are pair indices; the feature tables live on the module's
    device (set by ``fit_dti``), gathered per batch."""

    def __init__(self, net: DTINet, spec: DTISpec, fps: torch.Tensor, vectors: torch.Tensor):
        super().__init__()
        self.net = net
        self.spec = spec
        self.register_buffer("fps", fps, persistent=False)
        self.register_buffer("vectors", vectors, persistent=False)

    def _loss(self, batch) -> torch.Tensor:
        c, p, y = batch
        return F.mse_loss(self.net(self.fps[c], self.vectors[p]), y)

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train_loss", loss, on_epoch=True, on_step=False, batch_size=len(batch[2]))
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), on_epoch=True, batch_size=len(batch[2]))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.net.parameters(), lr=self.spec.lr, weight_decay=self.spec.weight_decay)


def split_data(data, spec: DTISpec) -> dict:
    """The pairs' split (positions per part) that ``fit_dti`` trains and tests on."""
    from biogen.dti.splits import split_pairs

    return split_pairs(data.pairs, spec.split, val_fraction=spec.val_fraction, test_fraction=spec.test_fraction,
                       seed=spec.seed, sequences=data.sequences, protein_similarity=spec.protein_similarity,
                       folds=data.folds)


def _loader(c, p, y, batch_size: int, shuffle: bool, seed: int):
    from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

    ds = TensorDataset(torch.from_numpy(c), torch.from_numpy(p), torch.from_numpy(y))
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, num_workers=0)


def fit_dti(data, vectors: np.ndarray, protein: dict, spec: DTISpec, *, accelerator: str = "cpu",
            progress: bool = False, trainer_kwargs: dict | None = None) -> tuple[DTIPredictor, dict]:
    """Train on ``data`` (a ``DTIData``) with protein ``vectors`` (one row per
    ``data.protein_ids``), split by ``spec.split``; returns the best epoch's model and the
    split (pair positions per part). Metrics on validation and test go into
    ``predictor.metrics``."""
    from pytorch_lightning.callbacks import EarlyStopping

    from biogen.dti.splits import dti_metrics
    from biogen.models.predictor import bytes_tensor
    from biogen.models.qsar import _BestWeights, _quiet_lightning
    from biogen.device import lightning_accelerator

    t0 = time.perf_counter()
    parts = split_data(data, spec)
    tr, va, te = parts["train"], parts["val"], parts["test"]
    y = data.y.astype(np.float32)
    y_mean, y_std = float(y[tr].mean()), float(y[tr].std()) or 1.0
    train_prot = np.unique(data.pairs[tr, 1])
    p_mean = vectors[train_prot].mean(0)
    p_std = vectors[train_prot].std(0) + 1e-6
    dense = not isinstance(data.featurizer, FingerprintSpec)  # compound embeddings in place of fingerprints
    net = DTINet(data.fps.shape[1] if dense else data.featurizer.stored_bits, vectors.shape[1], spec.hidden,
                 spec.latent, spec.dropout, dense=dense)
    net.p_mean.copy_(torch.from_numpy(p_mean))
    net.p_std.copy_(torch.from_numpy(p_std))
    ys = (y - y_mean) / y_std
    fps = (torch.from_numpy(np.nan_to_num(np.asarray(data.fps, dtype=np.float32))) if dense  # rows w/o pairs
           else bytes_tensor(data.fps))
    devices = [torch.device(accelerator).index or 0] if accelerator != "cpu" else []
    with torch.random.fork_rng(devices=devices), _quiet_lightning():
        torch.manual_seed(spec.seed)
        module = DTIModule(net, spec, fps, torch.from_numpy(vectors.astype(np.float32)))
        best = _BestWeights()
        callbacks = [best, _EpochLog()] + ([EarlyStopping(monitor="val_loss", patience=spec.patience, mode="min")] if len(va) else [])
        kwargs = dict(accelerator=lightning_accelerator(accelerator), devices=devices or 1,
                      max_epochs=spec.max_epochs, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=progress, num_sanity_val_steps=0,
                      limit_val_batches=1.0 if len(va) else 0)
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        c, p = data.pairs[:, 0], data.pairs[:, 1]
        trainer.fit(module, _loader(c[tr], p[tr], ys[tr], spec.batch_size, True, spec.seed),
                    _loader(c[va], p[va], ys[va], 8192, False, 0) if len(va) else None)
        if best.state is not None:
            module.load_state_dict(best.state)
    net = module.net.cpu().eval()
    predictor = DTIPredictor(net, data.featurizer, protein, y_mean, y_std, spec)
    zc, zp = predictor.project_compounds(data.fps), predictor.project_proteins(vectors)
    metrics = {}
    for name, idx in (("val", va), ("test", te)):
        if len(idx):
            pred = predictor.predict_pairs(zc, zp, data.pairs[idx])
            metrics.update({f"{name}_{k}": v for k, v in
                            dti_metrics(pred, y[idx], data.pairs[idx, 1], data.active_threshold).items()})
    predictor.metrics = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
    predictor.info = {"source": data.source, "split": spec.split, "n_train": int(len(tr)), "n_val": int(len(va)),
                      "n_test": int(len(te)), "dropped_by_split": int(parts.get("dropped", 0)),
                      "protein_clusters": parts.get("protein_clusters"), "best_epoch": int(best.epoch),
                      "epochs": int(trainer.current_epoch), "seconds": round(time.perf_counter() - t0, 3)}
    return predictor, parts
