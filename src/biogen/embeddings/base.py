"""The compound embedding model interface and its registry.

A model turns SMILES into fixed-length float32 vectors:

    model = load_model("minimol", device="auto")
    out = model.embed(["CCO", "c1ccccc1O"])      # EmbedResult
    out.vectors          # float32 [n, model.dim]; rows of failed molecules are NaN
    out.ok               # bool [n]
    out.reasons          # {row: "why this molecule has no vector"}

A model carries what a stored embedding must record so that two vectors are only ever
compared when the same model made them: ``name``, ``version``, ``dim`` and the sha256 of
its weights (``identity()``). A second model joins by subclassing ``CompoundModel`` and
adding a loader to ``MODELS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from biogen.errors import ConfigError


@dataclass
class EmbedResult:
    """Vectors for a batch; a molecule the model cannot handle has ``ok`` False, a NaN row
    (never a silent zero vector) and its reason in ``reasons`` (keyed by row)."""

    vectors: np.ndarray
    ok: np.ndarray
    reasons: dict[int, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # featurize / forward


@dataclass(frozen=True)
class EmbeddingSpec:
    """What a model trained on compound embeddings expects as input: vectors of this model
    (name, version, dim, weights sha256). The counterpart of ``FingerprintSpec`` in a QSAR
    checkpoint (``featurizer`` with ``type: embedding``)."""

    model: str
    version: str
    dim: int
    weights_sha256: str

    def to_dict(self) -> dict:
        return {"type": "embedding", "model": self.model, "version": self.version, "dim": int(self.dim),
                "weights_sha256": self.weights_sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "EmbeddingSpec":
        return cls(str(d["model"]), str(d["version"]), int(d["dim"]), str(d["weights_sha256"]))

    @classmethod
    def of(cls, identity: dict) -> "EmbeddingSpec":
        """From a model's (or a store's) ``identity()``."""
        return cls(identity["model"], identity["version"], int(identity["dim"]), identity["weights_sha256"])

    def differences(self, other: "EmbeddingSpec") -> list[str]:
        return [f"{k}: {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in ("model", "version", "dim",
                                                                              "weights_sha256")
                if getattr(self, k) != getattr(other, k)]


# molecules every compound model's parity gate (``biogen.precision.build_gated``) embeds in
# float32 and in the reduced dtype: drugs with charges, fused rings, a quaternary ammonium
CALIBRATION_SMILES = ("CC(=O)Oc1ccccc1C(=O)O", "Cn1cnc2c1c(=O)n(C)c(=O)n2C", "CC(C)Cc1ccc(cc1)C(C)C(=O)O",
                      "O=C(O)c1ccccc1O", "c1ccc2c(c1)ccc1ccccc12", "C[N+](C)(C)CCO",
                      "CC1=C(C(=O)OC)C(c2ccccc2[N+](=O)[O-])C(C(=O)OC)=C1C", "Clc1ccc(cc1)C(c1ccccc1)N1CCNCC1")


class CalibrationInputs:
    """``calibration_inputs(featurizer)``, made on the first call only: a parity gate asks
    for them only when it tries a reduced dtype (float32 runs never featurize them)."""

    def __init__(self, featurizer) -> None:
        self.featurizer = featurizer
        self._inputs: np.ndarray | None = None

    def __call__(self) -> np.ndarray:
        if self._inputs is None:
            self._inputs = calibration_inputs(self.featurizer)
        return self._inputs


def calibration_inputs(featurizer) -> np.ndarray:
    """What a model reading ``featurizer`` gets for ``CALIBRATION_SMILES``: their fingerprints
    (a ``FingerprintSpec``), or their float32 vectors of that compound model (an
    ``EmbeddingSpec``): the inputs of the QSAR and DTI models' parity gates."""
    from rdkit import Chem

    from biogen.chem.fingerprints import Fingerprinter

    if isinstance(featurizer, EmbeddingSpec):
        return load_model(featurizer.model, dtype="float32").embed(list(CALIBRATION_SMILES)).vectors
    return Fingerprinter(featurizer).compute([Chem.MolFromSmiles(s) for s in CALIBRATION_SMILES])


@dataclass(frozen=True)
class ModelFeaturizer:
    """``featurizer=minimol``: a compound embedding model's vectors as a trained model's input
    (``biogen train``), computed in the forward precision ``dtype``. A library stores such
    vectors with ``embeddings=[minimol]`` instead."""

    type: str = "minimol"
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.type not in MODELS:
            raise ConfigError(f"featurizer.type={self.type!r} is not a compound embedding model; valid: "
                              f"{', '.join(model_names())}")


class CompoundModel:
    """Base of compound embedding models: SMILES in, float32 [n, dim] out."""

    name: str = ""
    version: str = ""
    dim: int = 0
    weights_sha256: str = ""
    weights_path: str = ""
    inputs: str = "smiles"  # or "fingerprints": ``embed_fingerprints`` reads the library's stored ones

    def check_library(self, library) -> None:
        """Refuse a library this model cannot embed (LibraryError); default: any."""

    def identity(self) -> dict:
        """What a store records beside the vectors; two identities must be equal for two
        vectors to be compared."""
        return {"model": self.name, "version": self.version, "dim": self.dim,
                "weights_sha256": self.weights_sha256}

    def embed(self, smiles: Sequence[str]) -> EmbedResult:  # pragma: no cover - interface
        raise NotImplementedError


def _load_minimol(**kwargs) -> CompoundModel:
    from biogen.embeddings.minimol import MiniMol

    return MiniMol(**kwargs)


MODELS: dict[str, Callable[..., CompoundModel]] = {"minimol": _load_minimol}


def model_names() -> list[str]:
    return sorted(MODELS)


def check_model_name(name: str) -> str:
    """``name`` lower-cased if it is a known model, or a DTI checkpoint path (its compound
    tower, ``biogen.embeddings.dti``) as given; ConfigError listing the choices."""
    from biogen.embeddings.dti import PREFIX, is_checkpoint

    if is_checkpoint(name):
        if not Path(str(name)).is_file():
            raise ConfigError(f"model={name}: no such checkpoint file (a DTI model from biogen train model=dti)")
        return str(name)
    key = str(name).strip().lower()
    if key not in MODELS:
        hint = (" (a DTI model's stored vectors: embed with model=<its checkpoint file>)"
                if key.startswith(PREFIX) else " or a DTI checkpoint file (model=path/to/model.ckpt)")
        raise ConfigError(f"unknown compound embedding model {name!r}; valid choices: {', '.join(model_names())}"
                          + hint)
    return key


def load_model(name: str, **kwargs) -> CompoundModel:
    """The model ``name`` (see ``MODELS``; a checkpoint path: a DTI model's compound tower),
    built with ``kwargs`` (device, dtype, ...)."""
    key = check_model_name(name)
    if key not in MODELS:
        from biogen.embeddings.dti import DTICompounds

        return DTICompounds(key, **kwargs)
    return MODELS[key](**kwargs)
