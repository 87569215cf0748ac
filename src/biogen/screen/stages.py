"""Screening stages: small objects with one method over a batch of molecules.

A stage is a filter (``kind = "filter"``: returns which molecules pass) or a scorer
(``kind = "score"``: returns a float score per molecule, higher is better). The pipeline
(``pipeline.py``) builds them from config (``_target_``), calls ``prepare`` once in the
driver with the screen's context (featurizer, known actives, run directory), then ships
them to the shard workers (Ray actors), which call them on one ``MoleculeBatch`` at a
time. Heavy state (a model) is loaded once per worker in ``load``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Protocol

import numpy as np
from rdkit import Chem, RDLogger

from biogen.chem.descriptors import TEXT_DESCRIPTORS, DescriptorCalculator, validate_descriptor_names
from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class MoleculeBatch:
    """N molecules of one library shard.

    rows: N int64 row numbers in the shard; smiles: N strings (None when no stage parses
    molecules: the screen does not read them then); fps: N x W ``<u8`` packed
    fingerprints; popcounts: N int32; descriptors: name -> N float64 (the library's
    stored columns; a filter computes missing ones from ``mols``); embeddings: model ->
    N x dim float32 stored library vectors (NaN rows: no vector), for the stages that
    declare ``embeddings``.
    """

    rows: np.ndarray
    smiles: list[str | None]
    fps: np.ndarray
    popcounts: np.ndarray
    descriptors: dict[str, np.ndarray] = field(default_factory=dict)
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.rows)

    @cached_property
    def mols(self) -> list[Chem.Mol | None]:
        """RDKit molecules parsed from the stored canonical SMILES (once per batch)."""
        RDLogger.DisableLog("rdApp.*")
        try:
            return [Chem.MolFromSmiles(s) for s in self.smiles]
        finally:
            RDLogger.EnableLog("rdApp.*")

    def take(self, keep: np.ndarray) -> "MoleculeBatch":
        """The molecules where ``keep`` (bool N) is true (parsed molecules carried over)."""
        idx = np.flatnonzero(keep)
        sub = MoleculeBatch(self.rows[idx], [self.smiles[i] for i in idx],
                            self.fps[idx], self.popcounts[idx], {k: v[idx] for k, v in self.descriptors.items()},
                            {k: v[idx] for k, v in self.embeddings.items()})
        if "mols" in self.__dict__:
            sub.__dict__["mols"] = [self.mols[i] for i in idx]
        return sub

    def descriptor(self, name: str) -> np.ndarray:
        """A descriptor column, computed with RDKit when the library does not store it."""
        if name not in self.descriptors:
            calc = DescriptorCalculator([name])
            self.descriptors[name] = np.array(
                [calc(m)[0] if m is not None else np.nan for m in self.mols], dtype=np.float64)
        return self.descriptors[name]


@dataclass
class ScreenContext:
    """What stages may need when they are prepared in the driver (plain objects only)."""

    featurizer: FingerprintSpec
    actives_fps: np.ndarray | None          # Q x W known actives, featurized like the library
    actives_popcounts: np.ndarray | None    # Q int32
    run_dir: Path
    training: object | None = None          # target activity data (biogen.screen.target.TrainingSet)
    accelerator: str = "cpu"
    progress: bool = True
    library: object | None = None           # the biogen.library.Library screened (its stored embeddings)
    target: object | None = None            # the TargetSpec (its protein sequence(s), for protein-aware scoring)


class Stage(Protocol):
    """What the pipeline reads of a stage (``_Base`` gives every default)."""

    name: str
    kind: str  # "filter" | "score"
    columns: tuple[str, ...]  # library descriptor columns it reads (the worker fetches those stored)
    needs_mols: bool  # it parses the SMILES (the worker then reads them)
    checkpoint: str | None  # a model file its scores depend on (its sha256 keys the resume ledger)
    train_metrics: dict | None  # metrics of a model trained by ``prepare`` (summary.json)
    worker_modules: tuple[str, ...]  # imported by worker processes at their start ("module:warm_up" calls it)
    embeddings: str | None  # a compound model whose stored library vectors it reads (batch.embeddings)
    whole_library_outputs: bool  # its ``finish`` needs the whole library's mask: no streaming screen

    def prepare(self, ctx: ScreenContext) -> None: ...
    def load(self) -> None: ...
    def __call__(self, batch: MoleculeBatch) -> np.ndarray: ...
    def describe(self) -> str: ...
    def finish(self, library, alive: np.ndarray, run_dir: Path) -> dict | None: ...


class _Base:
    name = "stage"
    kind = "filter"
    columns: tuple[str, ...] = ()
    needs_mols = False
    checkpoint: str | None = None
    train_metrics: dict | None = None
    worker_modules: tuple[str, ...] = ()
    embeddings: str | None = None
    whole_library_outputs = False

    def prepare(self, ctx: ScreenContext) -> None:
        """Driver-side set-up (featurize actives, train or check a model)."""

    def load(self) -> None:
        """Worker-side set-up, once per worker (load a model)."""

    def describe(self) -> str:
        return self.name

    def finish(self, library, alive: np.ndarray, run_dir: Path) -> dict | None:
        """Driver-side, after the ranking: a stage's own extra outputs (files in ``run_dir``
        over the molecules that passed the filters, ``alive`` in library order). Returns a
        report section (``title``, ``facts``: dict, ``tables``: [(caption, pa.Table)],
        ``files``) or None."""
        return None


# ---------------------------------------------------------------- property filters

# name -> ({descriptor: (min, max)}, allowed violations). Lipinski 1997 (Ro5, one violation
# allowed as in the original rule), Veber 2002, lead-like after Teague/Oprea 1999 as ZINC uses it.
PROPERTY_PRESETS: dict[str, tuple[dict[str, tuple[float | None, float | None]], int]] = {
    "lipinski": ({"mw": (None, 500.0), "clogp": (None, 5.0), "hbd": (None, 5), "hba": (None, 10)}, 1),
    "veber": ({"rotatable_bonds": (None, 10), "tpsa": (None, 140.0)}, 0),
    "leadlike": ({"mw": (250.0, 350.0), "clogp": (None, 3.5), "rotatable_bonds": (None, 7)}, 0),
}


class PropertyFilter(_Base):
    """Keep molecules whose descriptors lie in ranges (inclusive).

    preset: lipinski | veber | leadlike, or null with ``ranges``; ranges: descriptor ->
    [min, max] (null = open); max_violations: how many ranges a molecule may miss.
    Descriptors come from the library (computed on the fly when it does not store them).
    """

    def __init__(self, preset: str | None = None, ranges: Mapping[str, Sequence] | None = None,
                 max_violations: int | None = None, name: str | None = None):
        if preset is not None and preset not in PROPERTY_PRESETS:
            raise ConfigError(f"property filter preset={preset!r} is unknown; choose one of "
                              f"{', '.join(PROPERTY_PRESETS)} or give ranges")
        base, base_viol = PROPERTY_PRESETS[preset] if preset else ({}, 0)
        merged = dict(base)
        for key, value in (ranges or {}).items():
            if value is None:
                merged.pop(key, None)
                continue
            if len(value) != 2:
                raise ConfigError(f"property range {key}={list(value)} must be [min, max] (null for open)")
            merged[key] = (value[0], value[1])
        if not merged:
            raise ConfigError("a property filter needs a preset or at least one range, e.g. ranges: {mw: [null, 500]}")
        validate_descriptor_names(list(merged))
        text = sorted(set(merged) & TEXT_DESCRIPTORS)
        if text:
            raise ConfigError(f"property ranges need numeric descriptors; {text} hold text (the scaffold is "
                              "used by selection.scaffold_cap, not by filters)")
        self.ranges = merged
        self.max_violations = base_viol if max_violations is None else int(max_violations)
        self.name = name or preset or "properties"

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.ranges)

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        violations = np.zeros(len(batch), dtype=np.int32)
        for key, (lo, hi) in self.ranges.items():
            v = batch.descriptor(key)
            bad = np.isnan(v)
            if lo is not None:
                bad |= v < lo
            if hi is not None:
                bad |= v > hi
            violations += bad
        return violations <= self.max_violations

    def describe(self) -> str:
        parts = [f"{k} in [{'' if lo is None else lo}, {'' if hi is None else hi}]" for k, (lo, hi) in self.ranges.items()]
        return f"{self.name}: {', '.join(parts)} (violations allowed: {self.max_violations})"


# ---------------------------------------------------------------- structural alerts

def _alert_catalogs() -> dict[str, object]:
    from rdkit.Chem.FilterCatalog import FilterCatalogParams

    C = FilterCatalogParams.FilterCatalogs
    return {name: getattr(C, name) for name in (
        "PAINS", "PAINS_A", "PAINS_B", "PAINS_C", "BRENK", "NIH", "ZINC", "CHEMBL",
        "CHEMBL_Glaxo", "CHEMBL_Dundee", "CHEMBL_BMS", "CHEMBL_MLSMR", "CHEMBL_Inpharmatica",
        "CHEMBL_LINT", "CHEMBL_SureChEMBL") if hasattr(C, name)}


class AlertFilter(_Base):
    """Reject molecules matching structural alerts of RDKit FilterCatalog sets.

    catalogs: e.g. [PAINS_A, PAINS_B, PAINS_C] or [PAINS, BRENK, NIH, CHEMBL]. Molecules
    whose SMILES cannot be parsed fail.
    """

    needs_mols = True

    def __init__(self, catalogs: Sequence[str] = ("PAINS",), name: str | None = None):
        valid = _alert_catalogs()
        unknown = [c for c in catalogs if c not in valid]
        if unknown or not catalogs:
            raise ConfigError(f"alert catalogs {unknown or list(catalogs)} are not valid; choose from "
                              f"{', '.join(valid)}")
        self.catalogs = tuple(catalogs)
        self.name = name or "alerts"
        self._catalog = None

    def __getstate__(self):
        return {**self.__dict__, "_catalog": None}  # FilterCatalog is rebuilt in each worker

    def load(self) -> None:
        from rdkit.Chem.FilterCatalog import FilterCatalog, FilterCatalogParams

        params = FilterCatalogParams()
        valid = _alert_catalogs()
        for c in self.catalogs:
            params.AddCatalog(valid[c])
        self._catalog = FilterCatalog(params)

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        if self._catalog is None:
            self.load()
        has = self._catalog.HasMatch
        return np.array([m is not None and not has(m) for m in batch.mols], dtype=bool)

    def describe(self) -> str:
        return f"{self.name}: no match in {', '.join(self.catalogs)}"


class SmartsFilter(_Base):
    """Keep molecules matching all ``include`` SMARTS and none of ``exclude``."""

    needs_mols = True

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = (), name: str | None = None):
        if not include and not exclude:
            raise ConfigError("a SMARTS filter needs include and/or exclude patterns")
        for s in (*include, *exclude):
            if Chem.MolFromSmarts(s) is None:
                raise ConfigError(f"invalid SMARTS {s!r} in the SMARTS filter; check the pattern "
                                  "(RDKit could not parse it)")
        self.include, self.exclude = tuple(include), tuple(exclude)
        self.name = name or "smarts"

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        inc = [Chem.MolFromSmarts(s) for s in self.include]
        exc = [Chem.MolFromSmarts(s) for s in self.exclude]
        return np.array([m is not None and all(m.HasSubstructMatch(p) for p in inc)
                         and not any(m.HasSubstructMatch(p) for p in exc) for m in batch.mols], dtype=bool)

    def describe(self) -> str:
        return f"{self.name}: include {list(self.include)}, exclude {list(self.exclude)}"


# ---------------------------------------------------------------- scorers

class SimilarityScorer(_Base):
    """Fused similarity to the known actives (library fingerprints, exact RDKit scores).

    fusion: max | mean | top_n (mean of the ``top_n`` best); metric: tanimoto | dice |
    tversky (alpha, beta).
    """

    kind = "score"
    worker_modules = ("biogen.search.fused:warm_up",)  # its Numba kernel loads in ~0.4 s

    def __init__(self, fusion: str = "max", top_n: int = 5, metric: str = "tanimoto",
                 alpha: float = 0.5, beta: float = 0.5, name: str | None = None):
        from biogen.search.fused import check_fusion
        from biogen.search.metrics import Metric

        check_fusion(fusion, int(top_n))
        self.fusion, self.top_n = fusion, int(top_n)
        self.metric = Metric(metric, float(alpha), float(beta))
        self.name = name or "similarity"
        self.actives: np.ndarray | None = None
        self.actives_pc: np.ndarray | None = None

    def prepare(self, ctx: ScreenContext) -> None:
        if ctx.actives_fps is None or len(ctx.actives_fps) == 0:
            raise ConfigError("similarity scoring needs known actives: set target.actives (a molecule file) "
                              "or a target with activity data (e.g. target=chembl204_thrombin)")
        self.actives = ctx.actives_fps
        self.actives_pc = ctx.actives_popcounts

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        from biogen.search.fused import fused_similarity

        return fused_similarity(self.actives, self.actives_pc, batch.fps, batch.popcounts,
                                self.metric, self.fusion, self.top_n)

    def describe(self) -> str:
        fuse = f"mean of top {self.top_n}" if self.fusion == "top_n" else self.fusion
        n = 0 if self.actives is None else len(self.actives)
        return f"{self.name}: {self.metric.label}, {fuse} over {n} known actives"


class QSARScorer(_Base):
    """Score with a trained Lightning QSAR model (``biogen train``).

    checkpoint: a ``.ckpt`` from ``biogen train``; null trains one in this run on the
    target's activity data (``model`` holds the QSARSpec settings). The model's
    featurizer must equal the library's (refused otherwise). A model trained on compound
    embeddings (``biogen train featurizer=minimol``) scores the library's stored vectors
    of the same model version (refused when the library has none or others); a molecule
    without a vector gets no score (NaN: ranked last by this scorer). Workers load the
    checkpoint once and keep the model (on the GPU when the run has one).

    dtype: the dense layers' precision (``QSARPredictor.with_precision``: float32 | auto |
    bfloat16 | int8 on CPUs | float16 on GPUs, behind the shared parity gate). float32 by
    default: the scores are then exactly the checkpoint's, and on the CPU a fingerprint
    model's largest cost is its sparse input layer, which stays float32 in every dtype.
    """

    kind = "score"
    worker_modules = ("torch", "biogen.models.predictor")

    def __init__(self, checkpoint: str | None = None, model: Mapping | None = None,
                 batch_size: int = 65536, name: str | None = None, dtype: str = "float32"):
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.model_settings = dict(model or {})
        self.batch_size = int(batch_size)
        self.dtype = str(dtype)
        self.precision: dict | None = None
        self.name = name or "qsar"
        self.task = None
        self.accelerator = "cpu"
        self._predictor = None

    def __getstate__(self):
        return {**self.__dict__, "_predictor": None}  # workers load the checkpoint themselves

    def prepare(self, ctx: ScreenContext) -> None:
        from biogen.models.predictor import QSARPredictor, QSARSpec

        self.accelerator = ctx.accelerator
        if self.checkpoint is None:
            if ctx.training is None or len(ctx.training.y) == 0:
                raise ConfigError(
                    "QSAR scoring has no checkpoint and the target has no activity data to train one: "
                    "set scoring.scorers.qsar.checkpoint=<model.ckpt from biogen train>, or use a target "
                    "with activities (target.moleculeace=... or target.activities=<csv>)")
            try:
                spec = QSARSpec(**self.model_settings)
            except TypeError as exc:
                raise ConfigError(f"invalid scoring.scorers.{self.name}.model settings ({exc})") from None
            out = ctx.run_dir / "model"
            earlier = out / "model.ckpt"
            if earlier.is_file():  # a resumed screen keeps the model its finished shards were scored with
                log.info("reusing the QSAR model trained by an earlier run of this screen: %s", earlier)
                self.checkpoint = str(earlier)
                self._predictor = QSARPredictor.load(earlier)
                self.train_metrics = dict(self._predictor.metrics)
                self._check_inputs(self._predictor, ctx)
                return
            log.info("training the QSAR model on %d %s compounds (%s)", len(ctx.training.y),
                     ctx.training.name, spec.task)
            from biogen.models.qsar import fit_qsar  # Lightning: only here, in the driver

            predictor = fit_qsar(ctx.training.fps, np.asarray(ctx.training.y), spec, ctx.featurizer,
                                 smiles=ctx.training.smiles, accelerator=ctx.accelerator, out_dir=out,
                                 progress=False)
            path = predictor.checkpoint or predictor.save(out / "qsar.ckpt")
            self.checkpoint = str(path)
            self.train_metrics = dict(predictor.metrics)
            predictor = QSARPredictor.load(path)  # what the workers will load: fail here, not in them
            self._predictor = predictor
        else:
            predictor = QSARPredictor.load(self.checkpoint)
            self._predictor = predictor
        self._check_inputs(predictor, ctx)

    def _check_inputs(self, predictor, ctx: ScreenContext) -> None:
        """The library holds what the model reads: the same fingerprints, or complete stored
        embeddings of the same model version (LibraryError naming the fix otherwise)."""
        from biogen.embeddings.base import EmbeddingSpec

        self.task = predictor.task
        # the precision the workers will run in (they gate again on their own CPU): fail here
        self.precision = predictor.with_precision(self.dtype).precision_record
        if not predictor.dense:
            predictor.check_featurizer(ctx.featurizer, "library")
            return
        model = predictor.featurizer.model
        if ctx.library is None:
            raise ConfigError(f"the QSAR model {self.checkpoint} reads {model} embeddings; this screen has no library")
        entry = ctx.library.embedding_entry(model)  # LibraryError naming `biogen library embed` when absent
        predictor.check_featurizer(EmbeddingSpec.of(entry), "library")
        self.embeddings = model

    def load(self) -> None:
        if self._predictor is None:
            from biogen.models.predictor import QSARPredictor  # torch only: workers never import Lightning

            predictor = QSARPredictor.load(self.checkpoint)
            if self.accelerator != "cpu":
                predictor = predictor.to(self.accelerator)
            self._predictor = predictor.with_precision(self.dtype)

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        if self._predictor is None:
            self.load()
        if self.embeddings is None:
            return np.asarray(self._predictor.predict(batch.fps, batch_size=self.batch_size), dtype=np.float64)
        x = batch.embeddings[self.embeddings]
        ok = np.isfinite(x).all(axis=1)
        out = np.full(len(x), np.nan)
        if ok.any():
            out[ok] = self._predictor.predict(x[ok], batch_size=self.batch_size)
        return out

    def describe(self) -> str:
        what = "P(active)" if self.task == "classification" else "predicted pActivity"
        inputs = f"{self.embeddings} embeddings" if self.embeddings else "fingerprint"
        dtype = (self.precision or {}).get("dtype", "float32")
        return f"{self.name}: {inputs} MLP ({what}) from {self.checkpoint}" + ("" if dtype == "float32" else f", {dtype}")


class ADMETScorer(_Base):
    """Optional: one ADMET-AI endpoint (pretrained Chemprop-2 models, ``pip install biogen[admet]``).

    endpoint: a column of ADMET-AI's predictions (e.g. ``hERG``, ``AMES``, ``DILI``);
    higher_is_better: false turns a liability probability into a score (1 - p).
    """

    kind = "score"
    needs_mols = True

    def __init__(self, endpoint: str = "hERG", higher_is_better: bool = False, name: str | None = None):
        self.endpoint = endpoint
        self.higher_is_better = bool(higher_is_better)
        self.name = name or f"admet_{endpoint}"
        self._model = None

    def __getstate__(self):
        return {**self.__dict__, "_model": None}

    def prepare(self, ctx: ScreenContext) -> None:
        try:
            import admet_ai  # noqa: F401
        except ImportError:
            raise ConfigError("the ADMET stage needs the admet-ai package: pip install 'biogen[admet]' "
                              "(or remove scoring.scorers." + self.name + ")") from None

    def load(self) -> None:
        from admet_ai import ADMETModel

        self._model = ADMETModel()

    def __call__(self, batch: MoleculeBatch) -> np.ndarray:
        if self._model is None:
            self.load()
        preds = self._model.predict(smiles=list(batch.smiles))
        if self.endpoint not in preds:
            raise ConfigError(f"ADMET-AI has no endpoint {self.endpoint!r}; available: {', '.join(preds.columns)}")
        p = np.asarray(preds[self.endpoint], dtype=np.float64)
        return p if self.higher_is_better else 1.0 - p
