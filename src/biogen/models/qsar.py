"""Fingerprint MLP QSAR models (Lightning): fit, checkpoint, load, predict.

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
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback, EarlyStopping
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.models.data import bit_indices, split_indices

log = logging.getLogger(__name__)

TASKS = ("regression", "classification")
ACCELERATORS = ("cpu", "gpu")
CHECKPOINT_FORMAT = "biogen.qsar_mlp"
CHECKPOINT_VERSION = 1
VAL_BATCH = 4096  # rows per validation/test batch
SMALL_FIT_ROWS = 5000  # below this many training rows, fit_qsar trains on one CPU thread


@dataclass(frozen=True)
class QSARSpec:
    """QSAR model and training settings (config group ``model``).

    task: regression (pActivity) | classification (active: pActivity >= active_threshold,
    or 0/1 labels). hidden: MLP widths after the fingerprint input. patience: epochs
    without a lower validation loss before stopping. split: how the validation set is
    drawn from the training data: scaffold (Bemis-Murcko groups) | random.
    """

    task: str = "regression"
    hidden: tuple[int, ...] = (512, 128)
    dropout: float = 0.2
    lr: float = 1e-3
    weight_decay: float = 1e-5
    batch_size: int = 128
    max_epochs: int = 60
    patience: int = 8
    split: str = "scaffold"
    val_fraction: float = 0.1
    seed: int = 0
    active_threshold: float = 7.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if self.task not in TASKS:
            raise ConfigError(f"model.task={self.task!r} is not valid; choose one of {', '.join(TASKS)} "
                              "(model=qsar_mlp | qsar_mlp_classifier)")
        if not self.hidden or min(self.hidden) < 1:
            raise ConfigError(f"model.hidden={list(self.hidden)} needs at least one positive width, e.g. [512,128]")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        for key in ("batch_size", "max_epochs"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.patience < 1:
            raise ConfigError(f"model.patience={self.patience} must be >= 1")
        if self.lr <= 0:
            raise ConfigError(f"model.lr={self.lr} must be > 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        return d


# --- metrics (numpy, exact; the same numbers are logged and returned) ---------------------


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties count half); NaN with one class only."""
    labels = np.asarray(labels).astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    scores = np.asarray(scores, dtype=np.float64)
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0  # 1-based average rank of each tie block
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def qsar_metrics(pred: np.ndarray, y: np.ndarray, task: str, active_threshold: float) -> dict[str, float]:
    """regression: rmse, r2, auroc (predictions vs y >= active_threshold); classification: auroc."""
    pred = np.asarray(pred, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if task == "classification":
        return {"auroc": auroc(y > 0.5, pred)}
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    return {"rmse": float(np.sqrt((err ** 2).mean())) if len(y) else float("nan"),
            "r2": 1.0 - float((err ** 2).sum()) / ss_tot if ss_tot > 0 else float("nan"),
            "auroc": auroc(y >= active_threshold, pred)}


# --- the Lightning module ---------------------------------------------------------------


class QSARModule(pl.LightningModule):
    """Fingerprint MLP: B x nbytes packed bits -> B outputs (standardized pActivity or logit).

    Every argument is a plain value and is saved as a hyperparameter, so
    ``QSARModule.load_from_checkpoint`` rebuilds the model from a biogen checkpoint too.
    """

    def __init__(self, nbits: int, hidden: list[int], dropout: float = 0.2, task: str = "regression",
                 lr: float = 1e-3, weight_decay: float = 1e-5, pos_weight: float = 1.0,
                 y_mean: float = 0.0, y_std: float = 1.0, active_threshold: float = 7.0,
                 featurizer: dict | None = None, spec: dict | None = None,
                 standardize: dict | None = None, versions: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        hidden = [int(h) for h in hidden]
        self.input = nn.Linear(nbits, hidden[0])  # weight: H0 x nbits
        layers: list[nn.Module] = []
        for a, b in zip(hidden, hidden[1:]):
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(a, b)]
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden[-1], 1)]
        self.head = nn.Sequential(*layers)
        self.register_buffer("bit_mask", (2 ** torch.arange(8)).to(torch.uint8), persistent=False)
        self._val_out: list[tuple[torch.Tensor, torch.Tensor]] = []

    # shapes: packed B x nbytes uint8 (byte i//8 holds bit i at position i%8: the library layout)
    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        bits = (packed.unsqueeze(-1) & self.bit_mask) != 0  # B x nbytes x 8
        return bits.reshape(packed.shape[0], -1)[:, : self.hparams.nbits].float()  # B x nbits

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        return self.head(self.input(self.unpack(packed))).squeeze(-1)  # B

    def forward_sparse(self, weight_t: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Same output as ``forward`` from set-bit lists; weight_t: nbits x H0 (input.weight.T)."""
        h = F.embedding_bag(indices, weight_t, offsets, mode="sum")  # B x H0
        h = h + self.input.bias if torch.is_grad_enabled() else h.add_(self.input.bias)
        return self.head(h).squeeze(-1)  # B

    def to_output(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw network output -> pActivity (regression) or P(active) (classification)."""
        if self.hparams.task == "classification":
            return torch.sigmoid(raw)
        return raw * self.hparams.y_std + self.hparams.y_mean

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


def _versions() -> dict[str, str]:
    import rdkit

    import biogen

    return {"biogen": str(biogen.__version__), "rdkit": str(rdkit.__version__), "torch": str(torch.__version__),
            "pytorch_lightning": str(pl.__version__), "numpy": str(np.__version__)}  # plain str: weights_only


def _override(name: str, value) -> str:
    """A Hydra override for a featurizer field (``featurizer.use_chirality=true``)."""
    return f"featurizer.{name}={str(value).lower() if isinstance(value, bool) else value}"


def _as_words(fps: np.ndarray, featurizer: FingerprintSpec, what: str = "fingerprints") -> np.ndarray:
    fps = np.asarray(fps)
    if fps.ndim != 2 or fps.shape[1] != featurizer.n_words or fps.dtype.itemsize != 8 or fps.dtype.kind not in "ui":
        raise InputError(f"{what}: expected packed uint64 fingerprints of shape N x {featurizer.n_words} "
                         f"({featurizer.stored_bits} bits, featurizer {featurizer.to_dict()}), got "
                         f"{fps.dtype} {fps.shape}; featurize with biogen.chem.fingerprints.Fingerprinter")
    return np.ascontiguousarray(fps).view(np.uint64)


def _bytes_tensor(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(words).view(np.uint8))  # N x nbytes


class QSARPredictor:
    """A trained QSAR model with the parameters of the fingerprints it expects.

    task: regression | classification; featurizer: the fingerprint parameters it was
    trained on; metrics: validation (``val_*``) and test (``test_*``) metrics;
    checkpoint: the file it was saved to or loaded from; spec: its ``QSARSpec``.
    """

    def __init__(self, module: QSARModule, metrics: dict[str, float] | None = None,
                 checkpoint: Path | None = None, info: dict | None = None):
        self.module = module.eval()
        hp = module.hparams
        self.task: str = hp.task
        self.featurizer = FingerprintSpec.from_dict(hp.featurizer)
        self.spec = QSARSpec(**hp.spec) if hp.spec else None
        self.standardize: dict | None = hp.standardize
        self.versions: dict = dict(hp.versions or {})
        self.metrics: dict[str, float] = dict(metrics or {})
        self.checkpoint: Path | None = checkpoint
        self.info: dict = dict(info or {})

    def __repr__(self) -> str:
        return (f"QSARPredictor(task={self.task!r}, featurizer={self.featurizer}, "
                f"device={self.device}, checkpoint={self.checkpoint})")

    @property
    def device(self) -> torch.device:
        return self.module.input.weight.device

    def to(self, device) -> "QSARPredictor":
        self.module.to(device)
        return self

    def check_featurizer(self, spec: FingerprintSpec, what: str = "library") -> None:
        """Refuse fingerprints made with other parameters than the model's (``LibraryError``)."""
        diff = [f.name for f in fields(FingerprintSpec) if getattr(spec, f.name) != getattr(self.featurizer, f.name)]
        if not diff:
            return
        detail = "; ".join(f"{n}: model={getattr(self.featurizer, n)!r}, {what}={getattr(spec, n)!r}" for n in diff)
        retrain = " ".join(_override(n, getattr(spec, n)) for n in diff)
        rebuild = " ".join(_override(n, getattr(self.featurizer, n)) for n in diff)
        raise LibraryError(
            f"the QSAR model{f' {self.checkpoint}' if self.checkpoint else ''} was trained on fingerprints "
            f"{self.featurizer.to_dict()} but the {what} holds {spec.to_dict()} ({detail}); its scores "
            f"would be meaningless. Retrain the model with the {what}'s parameters "
            f"(biogen train {retrain}) or use a {what} built with the model's parameters "
            f"(biogen library build {rebuild})")

    @torch.inference_mode()
    def predict(self, fps: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """fps: N x W packed ``<u8`` -> N float32: pActivity (regression) or P(active).

        CPU: set-bit lists through ``embedding_bag`` (no dense N x nbits matrix); GPU:
        each batch's bytes are copied over and unpacked there.
        """
        words = _as_words(fps, self.featurizer)
        out = np.empty(len(words), dtype=np.float32)
        m = self.module.eval()
        dev = self.device
        weight_t = m.input.weight.t().contiguous() if dev.type == "cpu" else None  # nbits x H0
        for start in range(0, len(words), batch_size):
            chunk = words[start: start + batch_size]  # B x W
            if weight_t is not None:
                idx, offsets = bit_indices(chunk)
                raw = m.forward_sparse(weight_t, torch.from_numpy(idx), torch.from_numpy(offsets))
            else:
                raw = m(_bytes_tensor(chunk).to(dev, non_blocking=True))
            out[start: start + len(chunk)] = m.to_output(raw).float().cpu().numpy()
        return out

    # --- checkpoint ------------------------------------------------------------------------

    def checkpoint_dict(self) -> dict:
        """The Lightning checkpoint: plain tensors (on CPU) and containers only."""
        return {
            "epoch": int(self.info.get("best_epoch", -1)),
            "global_step": int(self.info.get("global_step", 0)),
            "pytorch-lightning_version": pl.__version__,
            "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "hyper_parameters": dict(self.module.hparams),
            "biogen": {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                       "metrics": {k: float(v) for k, v in self.metrics.items()},
                       "info": self.info, "saved_versions": _versions()},
        }

    def save(self, path) -> Path:
        """Write the checkpoint atomically (temp file + rename); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(self.checkpoint_dict(), tmp)
        os.replace(tmp, path)
        self.checkpoint = path
        return path

    @classmethod
    def load(cls, path, map_location="cpu") -> "QSARPredictor":
        """Read a checkpoint written by ``save``/``biogen train`` (a file, or a run directory
        holding ``model.ckpt``) onto ``map_location``."""
        path = Path(path)
        if path.is_dir() and (path / "model.ckpt").is_file():
            path = path / "model.ckpt"
        if not path.is_file():
            raise InputError(f"QSAR model checkpoint not found: {path}; train one with "
                             f"`biogen train output={path}` (see `biogen train --help`), or give the "
                             "model.ckpt of a biogen train run directory")
        try:
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:  # not a torch file, or one holding arbitrary objects
            lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
            why = next((ln for ln in lines if "Unpickler error" in ln), lines[0] if lines else "")
            raise InputError(f"{path} is not a biogen QSAR checkpoint (torch.load with weights_only=True, "
                             f"which unpickles only tensors and plain containers, failed: "
                             f"{type(exc).__name__}: {why[:300]}); give a model.ckpt written by `biogen train`") from None
        meta = ckpt.get("biogen") if isinstance(ckpt, dict) else None
        if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is a PyTorch file but not a biogen QSAR checkpoint (no "
                             f"{CHECKPOINT_FORMAT!r} metadata); give a model.ckpt written by `biogen train`")
        if int(meta.get("format_version", 0)) > CHECKPOINT_VERSION:
            raise InputError(f"{path} was written by a newer biogen (checkpoint format "
                             f"{meta['format_version']}, this one reads <= {CHECKPOINT_VERSION}); upgrade biogen")
        hp = ckpt["hyper_parameters"]
        module = QSARModule(**hp)
        module.load_state_dict(ckpt["state_dict"])
        module.to(map_location)
        pred = cls(module, meta.get("metrics"), path, meta.get("info"))
        import rdkit

        trained = pred.versions.get("rdkit")
        if trained and trained != rdkit.__version__:
            log.warning("QSAR model %s was trained with RDKit %s, this is RDKit %s: fingerprints may "
                        "differ slightly; retrain if scores look off", path, trained, rdkit.__version__)
        return pred


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
    acc = {"cuda": "gpu"}.get(accelerator, accelerator)
    if acc not in ACCELERATORS:
        raise ConfigError(f"trainer accelerator {accelerator!r} is not valid; choose cpu or gpu (trainer=cpu|gpu)")
    if acc == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer=gpu but PyTorch sees no CUDA GPU "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}); "
                          "use trainer=cpu, or install a CUDA build of PyTorch on a machine with a GPU")
    return acc


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
    t0 = time.perf_counter()
    acc = resolve_accelerator(accelerator)
    words = _as_words(fps, featurizer, "training fingerprints")
    y = np.asarray(y, dtype=np.float32).reshape(-1)
    if len(y) != len(words):
        raise InputError(f"{len(words)} fingerprints but {len(y)} activity values; give one value per molecule")
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
    x = _bytes_tensor(words)  # N x nbytes uint8, shared with the numpy array
    yt = torch.from_numpy(target)
    devices = [0] if acc == "gpu" else []
    n_threads = threads if threads is not None else (1 if len(tr) < SMALL_FIT_ROWS else torch.get_num_threads())
    with torch.random.fork_rng(devices=devices), _quiet_lightning(), _torch_threads(n_threads):
        torch.manual_seed(spec.seed)
        module = QSARModule(featurizer.stored_bits, list(spec.hidden), spec.dropout, spec.task, spec.lr,
                            spec.weight_decay, pos_weight, y_mean, y_std, spec.active_threshold,
                            featurizer.to_dict(), spec.to_dict(), standardize, _versions())
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
        kwargs = dict(accelerator=acc, devices=1, max_epochs=spec.max_epochs, callbacks=callbacks, logger=lg,
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
            test_words = _as_words(test[0], featurizer, "test fingerprints")
            ty = np.asarray(test[1], dtype=np.float32).reshape(-1)
            ty = _labels(ty, spec) if spec.task == "classification" else ty
            if len(ty):
                trainer.test(module, _loader(_bytes_tensor(test_words), torch.from_numpy(ty), VAL_BATCH, False, 0),
                             verbose=False)
                pred = QSARPredictor(module).predict(test_words)
                metrics.update({f"test_{k}": v for k, v in
                                qsar_metrics(pred, ty, spec.task, spec.active_threshold).items()})
    run = {"n_train": int(len(tr)), "n_val": int(len(va)), "n_test": 0 if test is None else int(len(test[1])),
           "best_epoch": int(best.epoch), "epochs": int(epochs),
           "best_val_loss": best.best if math.isfinite(best.best) else None,
           "seconds": round(time.perf_counter() - t0, 3), **(info or {})}
    predictor = QSARPredictor(module, metrics, None, run)
    if out_dir is not None:
        predictor.save(Path(out_dir) / "model.ckpt")
    return predictor
