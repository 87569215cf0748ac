"""The compound tower of a protein-aware (DTI) checkpoint as a library embedding model.

    biogen library embed library=mylib model=runs/dti/model.ckpt

A DTI model (``biogen train model=dti``) scores a compound–protein pair by the cosine of
two projections; the compound's projection does not depend on the target. Stored once per
library row (like MiniMol vectors, ``embeddings/dti-<sha12>/``, named by the checkpoint's
sha256), a screen for any target is then one matrix product of the target's projection
with the stored vectors plus a top-k. The tower reads what the library stores (never the
SMILES): its fingerprints, which must be the model's, or for a model trained on compound
embeddings (``featurizer=minimol``) the library's stored vectors of that model version.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from biogen.embeddings.base import CompoundModel, EmbedResult
from biogen.errors import LibraryError

PREFIX = "dti-"


def store_name(checkpoint_sha256: str) -> str:
    """The library embedding name of a DTI checkpoint (its file's sha256, 12 hex digits)."""
    return PREFIX + checkpoint_sha256[:12]


def is_checkpoint(model: str) -> bool:
    """``model`` names a checkpoint file (not a registered model name)."""
    s = str(model)
    return s.endswith(".ckpt") or (("/" in s or "\\" in s) and Path(s).is_file())


class DTICompounds(CompoundModel):
    """Fingerprint (or stored compound embedding) in, the DTI model's L2-normalized compound
    projection out (float32)."""

    def __init__(self, checkpoint: str | Path, device: str = "cpu", dtype: str = "auto", batch_size: int = 65536):
        from biogen.dti.predictor import CHECKPOINT_VERSION, DTIPredictor

        self.predictor = DTIPredictor.load(checkpoint)
        self.featurizer = self.predictor.featurizer
        self.inputs = f"embedding:{self.featurizer.model}" if self.predictor.dense else "fingerprints"
        self.name = store_name(self.predictor.sha256)
        self.version = f"biogen-dti-v{CHECKPOINT_VERSION}"
        self.dim = self.predictor.latent
        self.weights_sha256 = self.predictor.sha256
        self.weights_path = self.predictor.path
        self.batch_size = max(1, int(batch_size))
        if str(device) not in ("auto", "cpu"):
            self.predictor.net.to(device)
        self.gate = self._gated(str(dtype).lower())
        self.predictor = self.gate.model
        self.dtype = self.gate.precision

    def _gated(self, dtype: str):
        """The predictor whose compound tower runs in the first dtype of ``biogen.precision``'s
        plan that passes the parity gate (its projections of ``CALIBRATION_SMILES`` against
        float32's, cosine per molecule). auto: bf16 on GPUs; on CPUs the reduced dtype the
        instructions favour, timed on the tower's first layer (nbits -> hidden); int8 (CPU)
        quantizes both layers, activations per row (a stored vector does not depend on its
        batch mates)."""
        import copy
        import dataclasses

        from biogen import precision
        from biogen.embeddings.base import CalibrationInputs

        base, dev = self.predictor, self.predictor.device
        plan = precision.plan_precision(dtype, dev, precision.largest_linear(base.net.compound),
                                        what="DTI compound dtype", valid=precision.model_words(dev))

        def build(prec: str):
            if prec == "float32":
                return base
            net = copy.deepcopy(base.net)
            if prec == "int8":
                precision.quantize_linears(net.compound)
            return dataclasses.replace(base, net=net, precision=prec)

        inputs = CalibrationInputs(self.featurizer)

        def calibrate(pred) -> np.ndarray:
            return pred.project_compounds(inputs(), self.batch_size)

        return precision.build_gated(plan, build, calibrate, f"DTI compound tower ({self.weights_path})")

    def identity(self) -> dict:
        return {**super().identity(), "dtype": self.dtype,
                "precision": {k: v for k, v in self.gate.record().items() if k != "dtype"}}

    def check_library(self, library) -> None:
        """The library stores what the model reads: its fingerprints, or complete vectors of
        its compound embedding model (LibraryError naming the fix otherwise)."""
        if self.predictor.dense:
            from biogen.embeddings.base import EmbeddingSpec

            entry = library.embedding_entry(self.featurizer.model)  # names `library embed` when absent
            self.predictor.check_featurizer(EmbeddingSpec.of(entry), f"library {library.path}")
            return
        if library.featurizer != self.featurizer:
            raise LibraryError(f"the DTI model {self.weights_path} reads fingerprints {self.featurizer.to_dict()}; "
                               f"library {library.path} stores {library.featurizer.to_dict()}: build the library with "
                               "the model's featurizer, or train the model on the library's")

    def embed_stored(self, x: np.ndarray) -> EmbedResult:
        """Projections of stored inputs: packed fingerprints, or the input model's vectors (a
        row without one has no projection: ok False, NaN)."""
        t0 = time.perf_counter()
        v = self.predictor.project_compounds(x, self.batch_size).astype(np.float32, copy=False)
        ok = np.isfinite(v).all(axis=1)
        reasons = {int(i): f"no {self.featurizer.model} vector in the library" for i in np.flatnonzero(~ok)}
        return EmbedResult(v, ok, reasons, {"forward": time.perf_counter() - t0})

    def embed(self, smiles: Sequence[str]) -> EmbedResult:
        """SMILES (standardized as the library was) -> projections; unparsable ones get a NaN row."""
        from rdkit import Chem, rdBase

        from biogen.chem.fingerprints import Fingerprinter

        if self.predictor.dense:
            from biogen.embeddings.base import load_model

            t0 = time.perf_counter()
            base = load_model(self.featurizer.model).embed(smiles)
            out = self.embed_stored(base.vectors)
            out.reasons = {**base.reasons, **{i: r for i, r in out.reasons.items() if i not in base.reasons}}
            out.seconds = {"featurize": time.perf_counter() - t0 - out.seconds["forward"], **out.seconds}
            return out
        t0 = time.perf_counter()
        with rdBase.BlockLogs():
            mols = [Chem.MolFromSmiles(s) if s else None for s in smiles]
        ok = np.array([m is not None for m in mols], dtype=bool)
        fps = Fingerprinter(self.featurizer).compute([m for m in mols if m is not None])
        t1 = time.perf_counter()
        out = np.full((len(mols), self.dim), np.nan, dtype=np.float32)
        if ok.any():
            out[ok] = self.predictor.project_compounds(fps, self.batch_size)
        reasons = {int(i): "RDKit cannot parse the SMILES" for i in np.flatnonzero(~ok)}
        return EmbedResult(out, ok, reasons, {"featurize": t1 - t0, "forward": time.perf_counter() - t1})
