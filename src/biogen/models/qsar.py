"""Fingerprint MLP QSAR models (Lightning): fit, checkpoint, load, predict.

Inference (``QSARPredictor``, ``QSARNet``) lives in ``biogen.models.predictor``, which does
not import Lightning (screen workers only predict); it is re-exported here.

One model: packed fingerprint bits -> MLP -> pActivity (regression, trained on
standardized values) or the logit of "active" (classification, BCE with ``pos_weight``).
The checkpoint is a Lightning checkpoint (``state_dict`` + ``hyper_parameters``) whose
hyperparameters hold the featurizer's parameters, the task, the y normalization and the
``QSARSpec``; ``QSARPredictor.load`` reads it with ``weights_only=True`` (plain
tensors and containers only, nothing else is unpickled) and ``check_featurizer`` refuses
a library made with other fingerprint parameters.

Bits are unpacked per batch, never for a whole library: training and GPU inference
unpack a batch's bytes to float (B x nbits); CPU inference never builds the dense matrix
at all: the first layer is a sum of the weight columns of the set bits
(``embedding_bag``), about 45 of 2048 for ECFP4, so it costs ~2% of the dense product.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from biogen.chem.fingerprints import FingerprintSpec
from biogen.device import lightning_accelerator
from biogen.errors import ConfigError, InputError
from biogen.models.data import split_indices
from biogen.models.predictor import (
    CHECKPOINT_FORMAT, CHECKPOINT_VERSION, TASKS, MLPMixin, QSARNet, QSARPredictor, QSARSpec, auroc, qsar_metrics,
)
from biogen.models.predictor import as_vectors
from biogen.models.predictor import as_words as _as_words
from biogen.models.predictor import bytes_tensor as _bytes_tensor
from biogen.models.predictor import versions as _versions

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "TASKS", "QSARModule", "QSARNet", "QSARPredictor", "QSARSpec",
           "auroc", "fit_qsar", "qsar_metrics", "resolve_accelerator"]  # inference names re-exported from predictor
log = logging.getLogger(__name__)

VAL_BATCH = 4096  # rows per validation/test batch
SMALL_FIT_ROWS = 5000  # below this many training rows, fit_qsar trains on one CPU thread


# --- the Lightning module ---------------------------------------------------------------


class QSARModule(MLPMixin, pl.LightningModule):
    """The fingerprint MLP (``MLPMixin``: the same layers and names as the inference
    ``QSARNet``) with its Lightning training loop.

    Every argument is a plain value and is saved as a hyperparameter, so
    ``QSARModule.load_from_checkpoint`` rebuilds the model from a biogen checkpoint too.
    """

    def __init__(self, nbits: int, hidden: list[int], dropout: float = 0.2, task: str = "regression",
                 lr: float = 1e-3, weight_decay: float = 1e-5, pos_weight: float = 1.0,
                 y_mean: float = 0.0, y_std: float = 1.0, active_threshold: float = 7.0,
                 featurizer: dict | None = None, spec: dict | None = None,
                 standardize: dict | None = None, versions: dict | None = None, input: str = "bits"):
        super().__init__()
        self.save_hyperparameters()
        self._build(nbits, hidden, dropout)
        self._val_out: list[tuple[torch.Tensor, torch.Tensor]] = []

    def loss(self, raw: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.hparams.task == "classification":
            pw = torch.tensor(self.hparams.pos_weight, device=raw.device, dtype=raw.dtype)
            return F.binary_cross_entropy_with_logits(raw, y, pos_weight=pw)
        return F.mse_loss(raw, (y - self.hparams.y_mean) / self.hparams.y_std)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.loss(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def _eval_step(self, batch, prefix: str):
        x, y = batch
        raw = self(x)
        self.log(f"{prefix}_loss", self.loss(raw, y), on_step=False, on_epoch=True, batch_size=len(y))
        self._val_out.append((self.to_output(raw).detach(), y.detach()))

    def _eval_epoch_end(self, prefix: str):
        if not self._val_out:
            return
        pred = torch.cat([p for p, _ in self._val_out]).float().cpu().numpy()
        y = torch.cat([t for _, t in self._val_out]).cpu().numpy()
        self._val_out.clear()
        for name, value in qsar_metrics(pred, y, self.hparams.task, self.hparams.active_threshold).items():
            if not math.isnan(value):
                self.log(f"{prefix}_{name}", value, on_epoch=True)

    def validation_step(self, batch, batch_idx):
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self):
        self._eval_epoch_end("val")

    def test_step(self, batch, batch_idx):
        self._eval_step(batch, "test")

    def on_test_epoch_end(self):
        self._eval_epoch_end("test")

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)


class _BestWeights(Callback):
    """Keeps the weights of the epoch with the lowest validation loss in memory (no disk)."""

    def __init__(self) -> None:
        self.best = math.inf
        self.epoch = -1
        self.state: dict[str, torch.Tensor] | None = None

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and float(loss) < self.best:
            self.best, self.epoch = float(loss), trainer.current_epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


# --- predictor ----------------------------------------------------------------------------


# --- training -------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_lightning():
    """Silence Lightning's per-Trainer info lines and the few-workers hint (data sit in memory)."""
    names = ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda",
             "lightning.pytorch.utilities.rank_zero", "lightning_fabric.utilities.seed")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*number of training batches.*")
            warnings.filterwarnings("ignore", message=".*log_every_n_steps.*")
            warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # Lightning 2.6 on torch 2.13
            warnings.filterwarnings("ignore", message=".*have no `val_dataloader`.*")  # val_fraction=0
            # on a SLURM node: biogen trains in one process by design (Ray places the work), not under srun
            warnings.filterwarnings("ignore", message=".*The `srun` command is available.*")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextlib.contextmanager
def _torch_threads(n: int):
    before = torch.get_num_threads()
    if n != before:
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Whole batches indexed straight out of in-memory tensors (no per-row collation)."""
    ds = TensorDataset(x, y)
    sampler = RandomSampler(ds, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(ds)
    return DataLoader(ds, sampler=BatchSampler(sampler, batch_size, drop_last=False), batch_size=None, num_workers=0)


def _labels(y: np.ndarray, spec: QSARSpec) -> np.ndarray:
    """Classification targets: 0/1 labels as given, or pActivity >= active_threshold."""
    if np.isin(y, (0.0, 1.0)).all():
        return y.astype(np.float32)
    return (y >= spec.active_threshold).astype(np.float32)


def resolve_accelerator(accelerator: str) -> str:
    """``cpu`` | ``cuda`` (``cuda:N``) to train on, from ``auto|cpu|cuda`` (``gpu`` accepted);
    decided in ``biogen.device``."""
    from biogen.device import resolve_device

    return resolve_device(accelerator, "trainer.accelerator")


def fit_qsar(fps: np.ndarray, y: np.ndarray, spec: QSARSpec, featurizer: FingerprintSpec, *,
             smiles: list[str] | None = None, accelerator: str = "cpu", out_dir: str | Path | None = None,
             progress: bool = False, logger: bool = False,
             test: tuple[np.ndarray, np.ndarray] | None = None, standardize: dict | None = None,
             info: dict | None = None, trainer_kwargs: dict | None = None,
             threads: int | None = None) -> QSARPredictor:
    """Train a fingerprint MLP on N molecules and return the best epoch's model.

    fps: N x W packed ``<u8``; y: N pActivity values (classification: pActivity,
    thresholded at ``spec.active_threshold``, or 0/1 labels); smiles: N SMILES, needed for
    ``split=scaffold``. A validation set (``spec.val_fraction``) drives early stopping and
    the choice of the best epoch; ``test=(fps, y)`` is scored once at the end. out_dir:
    writes ``model.ckpt`` there (and Lightning's CSV log with ``logger=True``); None keeps
    everything in memory. standardize/info: recorded in the checkpoint. trainer_kwargs:
    extra ``pl.Trainer`` arguments (tests: ``fast_dev_run``, ``overfit_batches``).
    The predictor comes back on the CPU (Lightning's teardown moves the model there);
    ``.to("cuda")`` predicts on a GPU.
    threads: PyTorch CPU threads while training (restored afterwards); None: 1 below
    ``SMALL_FIT_ROWS`` training rows, else PyTorch's setting. A 128-row batch is too
    small to split across threads: on a busy machine OpenMP's barrier waits made a
    420-molecule fit 8x slower with 2 threads than with 1 (measured: 8 s vs 1 s).
    """
    from biogen.embeddings.base import EmbeddingSpec

    t0 = time.perf_counter()
    acc = resolve_accelerator(accelerator)
    dense = isinstance(featurizer, EmbeddingSpec)
    words = as_vectors(fps, featurizer, "training embeddings") if dense else _as_words(
        fps, featurizer, "training fingerprints")
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if len(y) != len(words):
        raise InputError(f"{len(words)} {'vectors' if dense else 'fingerprints'} but {len(y)} activity values; "
                         "give one value per molecule")
    if not np.isfinite(y).all():
        raise InputError(f"{int((~np.isfinite(y)).sum())} activity value(s) are NaN or infinite; drop them first")
    if len(y) < 2:
        raise InputError(f"{len(y)} training molecule(s): a QSAR model needs at least 2 (and a few hundred to be useful)")
    target = _labels(y, spec) if spec.task == "classification" else y
    tr, va = split_indices(len(y), spec.split, spec.val_fraction, spec.seed, smiles,
                           labels=target if spec.task == "classification" else None)
    pos_weight, y_mean, y_std = 1.0, 0.0, 1.0
    if spec.task == "classification":
        n_pos = int(target[tr].sum())
        if n_pos == 0 or n_pos == len(tr):
            raise InputError(f"the training split holds {'no' if n_pos == 0 else 'only'} actives "
                             f"(pActivity >= model.active_threshold={spec.active_threshold}); a classifier needs "
                             "both classes: change model.active_threshold or use model=qsar_mlp (regression)")
        pos_weight = (len(tr) - n_pos) / n_pos
    else:
        y_mean = float(target[tr].mean())
        y_std = float(target[tr].std()) or 1.0
    x = torch.from_numpy(words) if dense else _bytes_tensor(words)  # N x dim float / N x nbytes uint8
    yt = torch.from_numpy(target)
    devices = [torch.device(acc).index or 0] if acc != "cpu" else []
    n_threads = threads if threads is not None else (1 if len(tr) < SMALL_FIT_ROWS else torch.get_num_threads())
    with torch.random.fork_rng(devices=devices), _quiet_lightning(), _torch_threads(n_threads):
        torch.manual_seed(spec.seed)
        module = QSARModule(featurizer.dim if dense else featurizer.stored_bits, list(spec.hidden), spec.dropout,
                            spec.task, spec.lr, spec.weight_decay, pos_weight, y_mean, y_std, spec.active_threshold,
                            featurizer.to_dict(), spec.to_dict(), standardize, _versions(),
                            "dense" if dense else "bits")
        best = _BestWeights()
        callbacks: list[Callback] = [best]
        if len(va):
            callbacks.append(EarlyStopping(monitor="val_loss", patience=spec.patience, mode="min"))
        lg = False
        if logger:
            from pytorch_lightning.loggers import CSVLogger

            if out_dir is None:
                raise ConfigError("logger=True needs out_dir= (Lightning's CSV log is written there)")
            lg = CSVLogger(save_dir=str(out_dir), name="lightning_logs", version="")
        kwargs = dict(accelerator=lightning_accelerator(acc), devices=devices or 1, max_epochs=spec.max_epochs, callbacks=callbacks, logger=lg,
                      enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
                      num_sanity_val_steps=0, log_every_n_steps=1,
                      default_root_dir=str(out_dir) if out_dir is not None else None,
                      limit_val_batches=1.0 if len(va) else 0)
        kwargs.update(trainer_kwargs or {})
        trainer = pl.Trainer(**kwargs)
        train_dl = _loader(x[tr], yt[tr], spec.batch_size, True, spec.seed)
        val_dl = _loader(x[va], yt[va], VAL_BATCH, False, 0) if len(va) else None
        trainer.fit(module, train_dl, val_dl)
        epochs = trainer.current_epoch
        if best.state is not None:
            module.load_state_dict(best.state)
        module.eval()
        metrics: dict[str, float] = {}
        if len(va):
            pred = QSARPredictor(module).predict(words[va])
            scored = qsar_metrics(pred, target[va], spec.task, spec.active_threshold)
            metrics.update({f"val_{k}": v for k, v in scored.items()})
        if test is not None:
            test_words = as_vectors(test[0], featurizer, "test embeddings") if dense else _as_words(
                test[0], featurizer, "test fingerprints")
            ty = np.asarray(test[1], dtype=np.float32).reshape(-1)
            ty = _labels(ty, spec) if spec.task == "classification" else ty
            if len(ty):
                tx = torch.from_numpy(test_words) if dense else _bytes_tensor(test_words)
                trainer.test(module, _loader(tx, torch.from_numpy(ty), VAL_BATCH, False, 0), verbose=False)
                pred = QSARPredictor(module).predict(test_words)
                metrics.update({f"test_{k}": v for k, v in
                                qsar_metrics(pred, ty, spec.task, spec.active_threshold).items()})
    run = {"n_train": int(len(tr)), "n_val": int(len(va)), "n_test": 0 if test is None else int(len(test[1])),
           "best_epoch": int(best.epoch), "epochs": int(epochs),
           "best_val_loss": best.best if math.isfinite(best.best) else None,
           "seconds": round(time.perf_counter() - t0, 3), **(info or {})}
    predictor = QSARPredictor(QSARNet.from_module(module), metrics, None, run)  # no Lightning past training
    if out_dir is not None:
        predictor.save(Path(out_dir) / "model.ckpt")
    return predictor
