"""Inference side of the protein-aware model (torch only: screen workers never import
Lightning): the spec, the two-tower network, and ``DTIPredictor`` (projections, pair
predictions, the checks a screen makes, save/load). Training is ``biogen.dti.model``.

    compound: packed fingerprint bits -> Linear -> ReLU -> Dropout -> Linear -> z_c (latent)
    protein:  stored PLM vector (frozen; standardized with the training proteins' mean and
              std) -> Linear -> ReLU -> Dropout -> Linear -> z_p (latent)
    score:    cos(z_c, z_p) in [-1, 1]; affinity = y_mean + y_std * (softplus(a) * cos + b)

The affinity head is monotone in the cosine (softplus(a) > 0), so ranking a library for a
target by the predicted affinity is ranking it by cosine: a screen projects the library
once (``project_compounds``, L2-normalized), the target once (``project_proteins``), and
scores all pairs with one matrix product.

The checkpoint (``weights_only`` loadable, nothing else is unpickled) stores the weights,
the fingerprint parameters, the protein model's name and weights sha256 and the protein
standardization; ``check_featurizer`` / ``check_protein_model`` refuse a library or a
protein embedding made otherwise.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biogen.errors import ConfigError, InputError, LibraryError

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "biogen-dti"
CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class DTISpec:
    """Config group ``model`` for ``model=dti``."""

    type: str = "dti"
    hidden: int = 1024            # the hidden layer of each tower
    latent: int = 512             # the shared space
    dropout: float = 0.1
    lr: float = 1e-3              # AdamW
    weight_decay: float = 1e-5
    batch_size: int = 512
    max_epochs: int = 30
    patience: int = 4             # early stopping on validation MSE
    split: str = "unseen_protein"
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    protein_similarity: float = 0.5
    seed: int = 0
    protein_model: str = "unirep1900"
    protein_store: str | None = None
    protein_dtype: str = "auto"

    def __post_init__(self) -> None:
        from biogen.dti.splits import SPLITS

        if self.type != "dti":
            raise ConfigError(f"model.type={self.type!r}: DTISpec is the model=dti group")
        if self.hidden < 1 or self.latent < 1:
            raise ConfigError(f"model.hidden={self.hidden}, model.latent={self.latent}: both must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.lr <= 0 or self.batch_size < 1 or self.max_epochs < 1 or self.patience < 1:
            raise ConfigError("model.lr, batch_size, max_epochs and patience must be positive")
        if self.split not in SPLITS:
            raise ConfigError(f"model.split={self.split!r} is not a DTI split; choose one of {', '.join(SPLITS)}")


class DTINet(nn.Module):
    """The two towers and the affinity head (shared by training and inference)."""

    def __init__(self, nbits: int, protein_dim: int, hidden: int, latent: int, dropout: float, dense: bool = False):
        """nbits: the compound input's width (fingerprint bits, or a compound embedding's
        dimension with ``dense``: float vectors instead of packed bits)."""
        super().__init__()
        self.nbits = nbits
        self.dense = bool(dense)
        self.compound = nn.Sequential(nn.Linear(nbits, hidden), nn.ReLU(), nn.Dropout(dropout),
                                      nn.Linear(hidden, latent))
        self.protein = nn.Sequential(nn.Linear(protein_dim, hidden), nn.ReLU(), nn.Dropout(dropout),
                                     nn.Linear(hidden, latent))
        self.scale = nn.Parameter(torch.tensor(1.0))
        self.shift = nn.Parameter(torch.tensor(0.0))
        self.register_buffer("p_mean", torch.zeros(protein_dim))
        self.register_buffer("p_std", torch.ones(protein_dim))
        self.register_buffer("bit_mask", (2 ** torch.arange(8)).to(torch.uint8), persistent=False)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        bits = (packed.unsqueeze(-1) & self.bit_mask) != 0
        return bits.reshape(packed.shape[0], -1)[:, :self.nbits].float()

    def compounds(self, x: torch.Tensor) -> torch.Tensor:
        """B x nbytes packed bits (or B x dim compound embeddings) -> B x latent, L2-normalized."""
        return F.normalize(self.compound(x.float() if self.dense else self.unpack(x)).float(), dim=-1)

    def proteins(self, vectors: torch.Tensor) -> torch.Tensor:
        """B x E PLM vectors -> B x latent, L2-normalized."""
        return F.normalize(self.protein((vectors - self.p_mean) / self.p_std), dim=-1)

    def head(self, cosine: torch.Tensor) -> torch.Tensor:
        """Cosine -> standardized affinity (monotone increasing)."""
        return F.softplus(self.scale) * cosine + self.shift

    def forward(self, packed: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        return self.head((self.compounds(packed) * self.proteins(vectors)).sum(-1))


@dataclass
class DTIPredictor:
    """A trained DTI model for inference (no Lightning): projections, pair predictions,
    the checks a screen makes, save/load."""

    net: DTINet
    featurizer: object             # FingerprintSpec, or EmbeddingSpec (a compound embedding model's vectors)
    protein: dict                  # the protein model's manifest info: model, sha256, dim...
    y_mean: float
    y_std: float
    spec: DTISpec
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    path: str | None = None        # the checkpoint file it was loaded from
    sha256: str | None = None      # that file's sha256 (names the library vectors it projects)
    precision: str = "float32"     # the compound tower's (``biogen.embeddings.dti``: bfloat16/float16
                                   # under autocast; int8: its linear layers are ``precision.Int8Linear``)

    @property
    def latent(self) -> int:
        return int(self.spec.latent)

    @property
    def dense(self) -> bool:
        """The compound side reads a compound embedding model's vectors (not fingerprints)."""
        return self.net.dense

    @torch.inference_mode()
    def project_compounds(self, x: np.ndarray, batch_size: int = 65536) -> np.ndarray:
        """Unit compound projections (N x latent float32) of packed fingerprints, or of a
        compound model's vectors for a dense model (a NaN row, no vector, stays NaN), in the
        tower's ``precision``."""
        from biogen.precision import autocast

        dev = self.device
        with autocast(dev, self.precision):
            return self._project_compounds(x, batch_size, dev)

    @property
    def device(self) -> torch.device:
        return self.net.p_mean.device  # a buffer: an int8 tower has no float parameters

    def _project_compounds(self, x: np.ndarray, batch_size: int, dev: torch.device) -> np.ndarray:
        from biogen.models.predictor import as_words, bytes_tensor

        if self.dense:
            v = np.asarray(x, dtype=np.float32)
            if v.ndim != 2 or v.shape[1] != self.net.nbits:
                raise InputError(f"compound vectors: expected N x {self.net.nbits} ({self.featurizer.model}), got "
                                 f"{v.shape}")
            ok = np.isfinite(v).all(axis=1)
            out = np.full((len(v), self.latent), np.nan, np.float32)
            good = np.flatnonzero(ok)
            for i in range(0, len(good), batch_size):
                rows = good[i:i + batch_size]
                out[rows] = self.net.compounds(torch.from_numpy(v[rows]).to(dev)).cpu().numpy()
            return out
        words = as_words(x, self.featurizer, "compound fingerprints")
        out = [self.net.compounds(bytes_tensor(words[i:i + batch_size]).to(dev)).cpu().numpy()
               for i in range(0, len(words), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, self.spec.latent), np.float32)

    @torch.inference_mode()
    def project_proteins(self, vectors: np.ndarray) -> np.ndarray:
        v = np.asarray(vectors, dtype=np.float32)
        if v.ndim != 2 or v.shape[1] != self.protein["dim"]:
            raise InputError(f"protein vectors: expected N x {self.protein['dim']} ({self.protein['model']}), got "
                             f"{v.shape}")
        dev = self.device
        return self.net.proteins(torch.from_numpy(v).to(dev)).cpu().numpy()

    def affinity(self, cosine: np.ndarray) -> np.ndarray:
        """Cosine -> predicted affinity in the training data's units."""
        with torch.inference_mode():
            z = self.net.head(torch.as_tensor(np.asarray(cosine, dtype=np.float32))).numpy()
        return z * self.y_std + self.y_mean

    def predict_pairs(self, zc: np.ndarray, zp: np.ndarray, pairs: np.ndarray) -> np.ndarray:
        """Predicted affinity of (compound row, protein row) pairs from the projections."""
        return self.affinity((zc[pairs[:, 0]] * zp[pairs[:, 1]]).sum(1))

    def check_featurizer(self, spec, what: str = "library") -> None:
        """``spec`` (the library's FingerprintSpec, or the EmbeddingSpec of its stored
        vectors) is what the compound side was trained on; LibraryError otherwise."""
        if spec == self.featurizer:
            return
        if self.dense:
            raise LibraryError(f"this DTI model was trained on {self.featurizer.model} embeddings "
                               f"{self.featurizer.to_dict()}; the {what} has {spec.to_dict()}; embed the library "
                               f"with that model (biogen library embed model={self.featurizer.model})")
        raise LibraryError(f"this DTI model was trained on fingerprints {self.featurizer.to_dict()}; the {what} "
                           f"has {spec.to_dict()}; build the library with the model's featurizer")

    def check_protein_model(self, info: dict, what: str = "protein embeddings") -> None:
        if info.get("sha256") != self.protein.get("sha256"):
            raise LibraryError(f"this DTI model was trained on {self.protein.get('model')} embeddings (weights sha256 "
                               f"{self.protein.get('sha256')}); the {what} come from {info.get('model')} "
                               f"(sha256 {info.get('sha256')}); embed the proteins with {self.protein.get('model')}")

    def checkpoint_dict(self) -> dict:
        return {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "state_dict": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "featurizer": self.featurizer.to_dict(), "protein": self.protein, "y_mean": self.y_mean,
                "y_std": self.y_std, "spec": asdict(self.spec), "metrics": self.metrics, "info": self.info,
                "nbits": self.net.nbits, "dense": self.net.dense}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint_dict(), tmp)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, map_location="cpu") -> "DTIPredictor":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"DTI checkpoint {path} does not exist; train one with biogen train model=dti")
        try:
            ck = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as exc:
            raise InputError(f"{path} is not a readable checkpoint ({exc.__class__.__name__}: {exc})") from None
        if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not a biogen DTI checkpoint (format {ck.get('format') if isinstance(ck, dict) else None!r}); "
                             "train one with biogen train model=dti")
        spec = DTISpec(**ck["spec"])
        net = DTINet(int(ck["nbits"]), int(ck["protein"]["dim"]), spec.hidden, spec.latent, spec.dropout,
                     dense=bool(ck.get("dense", False)))
        net.load_state_dict(ck["state_dict"])
        from biogen.files import sha256_file
        from biogen.models.predictor import input_spec

        return cls(net.eval(), input_spec(ck["featurizer"]), ck["protein"], float(ck["y_mean"]),
                   float(ck["y_std"]), spec, ck.get("metrics", {}), ck.get("info", {}), str(path.absolute()),
                   sha256_file(path))


def protein_vectors(sequences: list[str], spec: DTISpec, device: str = "cpu") -> tuple[np.ndarray, dict, dict]:
    """Protein vectors for ``sequences``: from ``spec.protein_store`` (rows matched by
    sequence) or embedded now with ``spec.protein_model``. Returns (R x E float32 with NaN
    rows for sequences the store lacks, the model's info, {row: reason} of those)."""
    from biogen.protein.fasta import sequence_key

    if spec.protein_store:
        from biogen.protein.store import EmbeddingStore

        store = EmbeddingStore.open(spec.protein_store)
        info = dict(store.manifest["model"])
        rows = {k: i for i, k in enumerate(store.keys)}
        allv = store.vectors()
        out = np.full((len(sequences), allv.shape[1]), np.nan, np.float32)
        missing = {}
        for i, s in enumerate(sequences):
            r = rows.get(sequence_key(s))
            if r is None:
                missing[i] = f"the protein store {spec.protein_store} has no embedding of this sequence"
            else:
                out[i] = allv[r]
        return out, {**_model_identity(info), "dim": int(allv.shape[1]), "store": str(spec.protein_store),
                     "vector": store.default_vector()}, missing
    from biogen.protein.embed import EmbedSpec, load_embedder

    emb = load_embedder(spec.protein_model, EmbedSpec(dtype=spec.protein_dtype), device=device)
    t = time.perf_counter()
    res = emb.embed(sequences)
    vec = np.stack([next(iter(r["pooled"].values())) for r in res]).astype(np.float32)
    log.info("%s embeddings of %d proteins in %.1f s", spec.protein_model, len(sequences), time.perf_counter() - t)
    return vec, {**_model_identity(emb.info), "dim": int(vec.shape[1])}, {}


def _model_identity(info: dict) -> dict:
    return {k: info.get(k) for k in ("model", "family", "sha256", "layers", "dtype", "pooling")}


