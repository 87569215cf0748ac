"""The QSAR fingerprint MLP for inference, without PyTorch Lightning.

A screen's workers (one Ray actor per CPU or GPU, on every node) only load a checkpoint
and predict; importing Lightning cost each of them ~4 s before the first shard. This module
needs torch and numpy only: ``QSARNet`` is the same network as the Lightning
``biogen.models.qsar.QSARModule`` (the same layers under the same parameter names, so one
checkpoint loads into either), and ``QSARPredictor`` loads, checks and runs it. Training
stays in ``biogen.models.qsar`` (``fit_qsar``).
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict, dataclass, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import ConfigError, InputError, LibraryError
from biogen.models.data import bit_indices

log = logging.getLogger(__name__)

TASKS = ("regression", "classification")
CHECKPOINT_FORMAT = "biogen.qsar_mlp"
CHECKPOINT_VERSION = 1


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


# --- the network ------------------------------------------------------------------------------


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def versions() -> dict[str, str]:
    """Versions recorded in a checkpoint (plain str: loadable with weights_only)."""
    import rdkit

    import biogen

    return {"biogen": str(biogen.__version__), "rdkit": str(rdkit.__version__), "torch": str(torch.__version__),
            "pytorch_lightning": package_version("pytorch-lightning"), "numpy": str(np.__version__)}


class HParams(dict):
    """Hyperparameters: a dict whose keys also read as attributes (as Lightning's do)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class MLPMixin:
    """The QSAR MLP: B x nbytes packed bits (or, with hyperparameter ``input="dense"``, B x
    dim compound embeddings) -> B outputs (standardized pActivity or a logit). Shared by ``QSARNet`` (inference) and the Lightning ``QSARModule`` (training),
    so both have the layers ``input`` and ``head`` under the same names."""

    hparams: dict

    def _build(self, nbits: int, hidden, dropout: float) -> None:
        hidden = [int(h) for h in hidden]
        self.input = nn.Linear(nbits, hidden[0])  # weight: H0 x nbits
        layers: list[nn.Module] = []
        for a, b in zip(hidden, hidden[1:]):
            layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(a, b)]
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden[-1], 1)]
        self.head = nn.Sequential(*layers)
        self.register_buffer("bit_mask", (2 ** torch.arange(8)).to(torch.uint8), persistent=False)

    # shapes: packed B x nbytes uint8 (byte i//8 holds bit i at position i%8: the library layout)
    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        bits = (packed.unsqueeze(-1) & self.bit_mask) != 0  # B x nbytes x 8
        return bits.reshape(packed.shape[0], -1)[:, : self.hparams["nbits"]].float()  # B x nbits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x nbytes packed bits, or B x dim float vectors for a model on embeddings."""
        if self.hparams.get("input") == "dense":
            return self.head(self.input(x)).squeeze(-1)  # B
        return self.head(self.input(self.unpack(x))).squeeze(-1)  # B

    def forward_sparse(self, weight_t: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Same output as ``forward`` from set-bit lists; weight_t: nbits x H0 (input.weight.T)."""
        h = F.embedding_bag(indices, weight_t, offsets, mode="sum")  # B x H0
        h = h + self.input.bias if torch.is_grad_enabled() else h.add_(self.input.bias)
        return self.head(h).squeeze(-1)  # B

    def to_output(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw network output -> pActivity (regression) or P(active) (classification)."""
        if self.hparams["task"] == "classification":
            return torch.sigmoid(raw)
        return raw * self.hparams["y_std"] + self.hparams["y_mean"]


class QSARNet(MLPMixin, nn.Module):
    """The inference network, built from a checkpoint's ``hyper_parameters``."""

    def __init__(self, nbits: int, hidden, dropout: float = 0.2, task: str = "regression",
                 y_mean: float = 0.0, y_std: float = 1.0, **more):
        super().__init__()
        self.hparams = HParams(nbits=nbits, hidden=list(hidden), dropout=dropout, task=task, y_mean=y_mean,
                               y_std=y_std, **more)
        self._build(nbits, hidden, dropout)

    @classmethod
    def from_module(cls, module: nn.Module) -> QSARNet:
        """The same weights in a plain ``nn.Module`` (e.g. from a trained Lightning module)."""
        net = cls(**dict(module.hparams))
        net.load_state_dict(module.state_dict())
        return net.to(module.input.weight.device).eval()


def override(name: str, value) -> str:
    """A Hydra override for a featurizer field (``featurizer.use_chirality=true``)."""
    return f"featurizer.{name}={str(value).lower() if isinstance(value, bool) else value}"


def as_words(fps: np.ndarray, featurizer: FingerprintSpec, what: str = "fingerprints") -> np.ndarray:
    fps = np.asarray(fps)
    if fps.ndim != 2 or fps.shape[1] != featurizer.n_words or fps.dtype.itemsize != 8 or fps.dtype.kind not in "ui":
        raise InputError(f"{what}: expected packed uint64 fingerprints of shape N x {featurizer.n_words} "
                         f"({featurizer.stored_bits} bits, featurizer {featurizer.to_dict()}), got "
                         f"{fps.dtype} {fps.shape}; featurize with biogen.chem.fingerprints.Fingerprinter")
    return np.ascontiguousarray(fps).view(np.uint64)


def input_spec(d: dict):
    """A checkpoint's ``featurizer``: a ``FingerprintSpec``, or an ``EmbeddingSpec`` (``type: embedding``)."""
    if d.get("type") == "embedding":
        from biogen.embeddings.base import EmbeddingSpec

        return EmbeddingSpec.from_dict(d)
    return FingerprintSpec.from_dict(d)


def _input_words(spec) -> str:
    from biogen.embeddings.base import EmbeddingSpec

    if isinstance(spec, EmbeddingSpec):
        return f"{spec.model} {spec.version} embeddings ({spec.dim}-d)"
    return f"fingerprints {spec.to_dict()}"


def as_vectors(x: np.ndarray, spec, what: str = "embeddings") -> np.ndarray:
    """N x dim finite float vectors of ``spec``'s model, as float32."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != spec.dim or x.dtype.kind != "f":
        raise InputError(f"{what}: expected float vectors of shape N x {spec.dim} ({spec.model} {spec.version}), "
                         f"got {x.dtype} {x.shape}; embed with biogen.embeddings.load_model({spec.model!r})")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise InputError(f"{what}: {int((~np.isfinite(x).all(axis=1)).sum())} row(s) are not finite (molecules the "
                         f"model could not embed); drop them first")
    return x


def bytes_tensor(words: np.ndarray) -> torch.Tensor:
    """N x nbytes uint8 tensor sharing the words' memory. Read-only words (a memory-mapped
    library shard) are fine: every caller only reads the tensor (copies it to the device,
    unpacks it), so torch's warning about non-writable arrays is silenced for them."""
    arr = np.ascontiguousarray(words).view(np.uint8)
    if arr.flags.writeable:
        return torch.from_numpy(arr)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(arr)


class QSARPredictor:
    """A trained QSAR model with the parameters of the fingerprints it expects.

    task: regression | classification; featurizer: the fingerprint parameters it was
    trained on; metrics: validation (``val_*``) and test (``test_*``) metrics;
    checkpoint: the file it was saved to or loaded from; spec: its ``QSARSpec``;
    module: the network (a ``QSARNet``; the Lightning module right after training).
    """

    def __init__(self, module: nn.Module, metrics: dict[str, float] | None = None,
                 checkpoint: Path | None = None, info: dict | None = None):
        self.module = module.eval()
        hp = module.hparams
        self.task: str = hp["task"]
        self.featurizer = input_spec(hp["featurizer"])
        self.dense = hp.get("input") == "dense"
        self.spec: QSARSpec | None = QSARSpec(**hp["spec"]) if hp.get("spec") else None
        self.standardize: dict | None = hp.get("standardize")
        self.versions: dict = dict(hp.get("versions") or {})
        self.metrics: dict[str, float] = dict(metrics or {})
        self.checkpoint: Path | None = checkpoint
        self.info: dict = dict(info or {})
        self.precision = "float32"          # the dense layers' (``with_precision``)
        self.precision_record: dict | None = None

    def __repr__(self) -> str:
        return (f"QSARPredictor(task={self.task!r}, featurizer={self.featurizer}, "
                f"device={self.device}, checkpoint={self.checkpoint})")

    @property
    def device(self) -> torch.device:
        return self.module.bit_mask.device  # a buffer: reduced layers have no float parameters

    def with_precision(self, dtype: str) -> QSARPredictor:
        """This model with its dense layers in the first dtype of ``biogen.precision``'s plan
        that passes the parity gate: the hidden layers of the head (and the input layer where
        it is a GEMM: a model on embeddings, or on a GPU; on the CPU a fingerprint model's
        input layer is a sparse sum of weight rows, left in float32). The output layer, whose
        value is the score, stays float32. The gate compares the activations entering it
        (cosine per molecule) on ``CALIBRATION_SMILES``. dtype: auto | float32 | bfloat16 |
        int8 (CPU; activations quantized per row, so a score does not depend on the
        molecules scored with it) | float16 (GPU)."""
        import copy

        from biogen import precision

        dev = self.device
        reduced_input = self.dense or dev.type != "cpu"
        heads = [i for i, m in enumerate(self.module.head) if isinstance(m, nn.Linear)][:-1]
        shapes = [(self.module.head[i].in_features, self.module.head[i].out_features) for i in heads]
        if reduced_input:
            shapes.append((self.module.input.in_features, self.module.input.out_features))
        plan = precision.plan_precision(str(dtype).lower(), dev, max(shapes, key=lambda s: s[0] * s[1], default=(0, 0)),
                                        what="QSAR dtype", valid=precision.model_words(dev))

        def build(prec: str) -> QSARPredictor:
            if prec == "float32":
                return self
            p = copy.copy(self)
            p.module = copy.deepcopy(self.module)
            for i in heads:
                p.module.head[i] = precision.reduce_linears(nn.Sequential(p.module.head[i]), prec)[0]
            if reduced_input:
                p.module.input = precision.reduce_linears(nn.Sequential(p.module.input), prec)[0]
            p.precision = prec
            return p

        from biogen.embeddings.base import CalibrationInputs

        inputs = CalibrationInputs(self.featurizer)

        def calibrate(p: QSARPredictor) -> np.ndarray:
            seen: list[np.ndarray] = []
            hook = p.module.head[-1].register_forward_hook(
                lambda mod, args, out: seen.append(args[0].float().cpu().numpy()))
            try:
                x = inputs()
                p.predict(x, batch_size=len(x))
            finally:
                hook.remove()
            return np.concatenate(seen)

        gate = precision.build_gated(plan, build, calibrate, f"QSAR model {self.checkpoint or ''}".strip())
        gate.model.precision_record = gate.record()
        return gate.model

    def to(self, device) -> QSARPredictor:
        self.module.to(device)
        return self

    def check_featurizer(self, spec, what: str = "library") -> None:
        """Refuse inputs made otherwise than the model's: fingerprints with other parameters,
        embeddings of another model or version, one kind for the other (``LibraryError``)."""
        from biogen.embeddings.base import EmbeddingSpec

        if isinstance(spec, EmbeddingSpec) or isinstance(self.featurizer, EmbeddingSpec):
            if type(spec) is not type(self.featurizer):
                raise LibraryError(
                    f"the QSAR model{f' {self.checkpoint}' if self.checkpoint else ''} was trained on "
                    f"{_input_words(self.featurizer)} but the {what} gives {_input_words(spec)}; train a model on "
                    f"the {what}'s inputs (biogen train featurizer=...)")
            diff = self.featurizer.differences(spec)
            if diff:
                raise LibraryError(
                    f"the QSAR model{f' {self.checkpoint}' if self.checkpoint else ''} was trained on "
                    f"{self.featurizer.model} embeddings that differ from the {what}'s ({'; '.join(diff)}): "
                    "vectors of two model versions are not comparable; retrain the model or re-embed the "
                    f"{what}")
            return
        diff = [f.name for f in fields(FingerprintSpec) if getattr(spec, f.name) != getattr(self.featurizer, f.name)]
        if not diff:
            return
        detail = "; ".join(f"{n}: model={getattr(self.featurizer, n)!r}, {what}={getattr(spec, n)!r}" for n in diff)
        retrain = " ".join(override(n, getattr(spec, n)) for n in diff)
        rebuild = " ".join(override(n, getattr(self.featurizer, n)) for n in diff)
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
        if self.dense:
            return self._predict_dense(fps, batch_size)
        words = as_words(fps, self.featurizer)
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
                raw = m(bytes_tensor(chunk).to(dev, non_blocking=True))
            out[start: start + len(chunk)] = m.to_output(raw).float().cpu().numpy()
        return out

    def _predict_dense(self, x: np.ndarray, batch_size: int) -> np.ndarray:
        x = as_vectors(x, self.featurizer)
        out = np.empty(len(x), dtype=np.float32)
        m = self.module.eval()
        for start in range(0, len(x), batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(x[start: start + batch_size], dtype=np.float32))
            out[start: start + len(chunk)] = m.to_output(m(chunk.to(self.device))).float().cpu().numpy()
        return out

    # --- checkpoint ------------------------------------------------------------------------

    def checkpoint_dict(self) -> dict:
        """A Lightning checkpoint (``QSARModule.load_from_checkpoint`` reads it): plain
        tensors (on CPU) and containers only."""
        return {
            "epoch": int(self.info.get("best_epoch", -1)),
            "global_step": int(self.info.get("global_step", 0)),
            "pytorch-lightning_version": package_version("pytorch-lightning"),
            "state_dict": {k: v.detach().cpu() for k, v in self.module.state_dict().items()},
            "hyper_parameters": dict(self.module.hparams),
            "biogen": {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                       "metrics": {k: float(v) for k, v in self.metrics.items()},
                       "info": self.info, "saved_versions": versions()},
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
    def load(cls, path, map_location="cpu") -> QSARPredictor:
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
        module = QSARNet(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
        module.to(map_location)
        pred = cls(module, meta.get("metrics"), path, meta.get("info"))
        import rdkit

        trained = pred.versions.get("rdkit")
        if trained and trained != rdkit.__version__:
            log.warning("QSAR model %s was trained with RDKit %s, this is RDKit %s: fingerprints may "
                        "differ slightly; retrain if scores look off", path, trained, rdkit.__version__)
        return pred
