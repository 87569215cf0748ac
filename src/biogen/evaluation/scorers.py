"""Scorers of the benchmark: one method, ``score(ctx, split, ranked) -> float64[M]``.

A scorer sees one target (``TargetContext``: the fingerprints of all its molecules,
actives first) and one split (query actives and, for trained models, training decoys),
and scores the molecules ``ranked`` (indices into the target), higher = more likely active.

- ``QuerySimilarityScorer``: Tanimoto (or Dice/Tversky, ``biogen.search.metrics.Metric``,
  scores equal to RDKit's) of each ranked molecule to each query, fused over the queries
  by ``max``, ``mean`` or ``topk`` (mean of the k best). Uses no decoys.
- ``LogisticScorer``: L2 logistic regression on fingerprint bits (scikit-learn, liblinear,
  balanced class weights), trained on the query actives vs the training decoys.
- ``NaiveBayesScorer``: Bernoulli naive Bayes log-odds on fingerprint bits (Laplace
  smoothing), same training set.
- ``MLPScorer``: the project's Lightning QSAR MLP (``biogen.models.qsar.fit_qsar``), trained
  as a classifier on the same set.
- ``RankFusionScorer``: weighted mean of the members' fractional ranks on the same list (the
  screen's rank fusion, ``biogen.screen.metrics.weighted_fusion``).
- ``PropertyScorer``: the null model: one simple property (heavy-atom count, MW), ranked in
  the direction the query actives point to (higher first when the queries' median lies
  above the ranked list's, else lower first). No fingerprint, no decoys: how much of a
  data set's enrichment the actives' size alone gives (DUD's decoys are matched in these
  properties, ChEMBL's ZINC decoys are not).

Why not the screen's stages (``biogen.screen.stages.SimilarityScorer``, ``QSARScorer``):
those score library shards streamed through a pipeline, against every known active (a
Numba kernel that never holds a Q x N matrix) or with one model loaded from a checkpoint
or trained once on activity data. A benchmark scorer instead sees one in-memory target
many times, with a new query set and a new model per split: similarity comes from a
per-target matrix of every active to every molecule, computed once and sliced per split.
The scoring math is shared where it is the same: ``Metric`` scores the pairs of both, and
``biogen.models.qsar`` trains and runs the MLP of both.

Training decoys (Riniker, Fechner & Landrum, JCIM 53, 2829 (2013)): trained scorers
(``uses_decoys = True``) learn from the queries plus a random ``decoy_fraction`` of the
decoys; the protocol removes those decoys from the ranked list of every scorer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from biogen.chem.fingerprints import FingerprintSpec, popcounts, unpack_bits
from biogen.errors import ConfigError
from biogen.kernels.cpu import common_counts
from biogen.screen.metrics import property_ranking, weighted_fusion
from biogen.search.metrics import Metric

FUSIONS = ("max", "mean", "topk")


@dataclass
class Split:
    """One repeat: ``queries`` (indices of query actives), ``train_decoys`` (indices of decoys)."""

    queries: np.ndarray
    train_decoys: np.ndarray


class TargetContext:
    """The molecules of one target and per-target caches shared by all scorers and repeats.

    fps: fingerprint name -> N x W packed uint64 (actives first, then decoys);
    labels: bool[N] (True = active).
    """

    def __init__(self, fps: dict[str, np.ndarray], labels: np.ndarray,
                 specs: dict[str, FingerprintSpec] | None = None, props: dict[str, np.ndarray] | None = None):
        self.fps = fps
        self.props = props or {}  # simple properties for the null model (PropertyScorer)
        self.specs = specs or {}  # fingerprint parameters, for models that record them
        self.labels = np.asarray(labels, dtype=bool)
        self.n_actives = int(self.labels.sum())
        if not self.labels[: self.n_actives].all():
            raise ValueError("TargetContext expects the actives first")
        self._sim: dict[tuple[str, Metric], np.ndarray] = {}
        self._bits: dict[str, np.ndarray] = {}
        self.memo: dict = {}  # per-split cache (cleared by the protocol for each split)

    def fingerprint(self, name: str) -> np.ndarray:
        if name not in self.fps:
            raise ConfigError(f"fingerprint {name!r} is not computed; available: {', '.join(self.fps)}")
        return self.fps[name]

    def similarity(self, name: str, metric: Metric) -> np.ndarray:
        """A x N float64 similarities of every active (possible query) to every molecule."""
        key = (name, metric)
        if key not in self._sim:
            fps = np.ascontiguousarray(self.fingerprint(name))
            pc = popcounts(fps)
            a = self.n_actives
            common = np.empty((a, fps.shape[0]), dtype=np.int32)
            for i in range(a):
                common_counts(fps[i], fps, 0, fps.shape[0], common[i])
            self._sim[key] = metric.score(common, pc[:a, None], pc[None, :])
        return self._sim[key]

    def bits(self, name: str) -> np.ndarray:
        """N x nbits float32 0/1 features of a fingerprint (for the trained models)."""
        if name not in self._bits:
            self._bits[name] = unpack_bits(self.fingerprint(name)).astype(np.float32)
        return self._bits[name]


def _training_set(ctx: TargetContext, fp: str, split: Split) -> tuple[np.ndarray, np.ndarray]:
    x = ctx.bits(fp)
    idx = np.concatenate([split.queries, split.train_decoys])
    y = np.zeros(idx.size, dtype=np.int64)
    y[: split.queries.size] = 1
    return x[idx], y


@dataclass(frozen=True)
class QuerySimilarityScorer:
    """Similarity to the split's query actives, fused over the queries."""

    fingerprint: str = "ecfp4_1024"
    fusion: str = "max"
    k: int = 3
    metric: str = "tanimoto"
    uses_decoys = False

    def __post_init__(self) -> None:
        if self.fusion not in FUSIONS:
            raise ConfigError(f"fusion={self.fusion!r} is not valid; choose one of {', '.join(FUSIONS)}")
        if self.k < 1:
            raise ConfigError(f"k={self.k} must be >= 1 (fusion=topk: mean of the k most similar queries)")

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        s = ctx.similarity(self.fingerprint, Metric(self.metric))[split.queries][:, ranked]  # Q x M
        if self.fusion == "max":
            return s.max(axis=0)
        if self.fusion == "mean":
            return s.mean(axis=0)
        k = min(self.k, s.shape[0])
        return np.partition(s, s.shape[0] - k, axis=0)[-k:].mean(axis=0)


@dataclass(frozen=True)
class LogisticScorer:
    fingerprint: str = "ecfp4_1024"
    C: float = 0.1
    uses_decoys = True

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        from sklearn.linear_model import LogisticRegression

        x, y = _training_set(ctx, self.fingerprint, split)
        model = LogisticRegression(C=self.C, class_weight="balanced", solver="liblinear", max_iter=1000)
        model.fit(x, y)
        w = model.coef_[0].astype(np.float32)
        return ctx.bits(self.fingerprint)[ranked] @ w + float(model.intercept_[0])


@dataclass(frozen=True)
class NaiveBayesScorer:
    fingerprint: str = "ecfp4_1024"
    smoothing: float = 1.0
    uses_decoys = True

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        x, y = _training_set(ctx, self.fingerprint, split)
        a = self.smoothing
        p1 = (x[y == 1].sum(axis=0) + a) / ((y == 1).sum() + 2 * a)
        p0 = (x[y == 0].sum(axis=0) + a) / ((y == 0).sum() + 2 * a)
        on = np.log(p1 / p0).astype(np.float32)
        off = np.log((1 - p1) / (1 - p0)).astype(np.float32)
        return ctx.bits(self.fingerprint)[ranked] @ (on - off) + float(off.sum())


@dataclass(frozen=True)
class MLPScorer:
    """The project's Lightning QSAR MLP (``biogen.models.qsar``), trained per split as a classifier
    on the query actives vs the training decoys."""

    fingerprint: str = "ecfp4_2048"
    hidden: tuple[int, ...] = (512, 128)
    dropout: float = 0.2
    max_epochs: int = 60
    patience: int = 8
    uses_decoys = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))  # from config: a list

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        try:
            from biogen.models.qsar import QSARSpec, fit_qsar
        except ImportError as exc:
            raise ConfigError(f"scorer qsar needs biogen.models.qsar ({exc})") from exc
        fps = ctx.fingerprint(self.fingerprint)
        idx = np.concatenate([split.queries, split.train_decoys])
        y = np.zeros(idx.size, dtype=np.float32)
        y[: split.queries.size] = 1
        if self.fingerprint not in ctx.specs:
            raise ConfigError(f"scorer qsar: the parameters of fingerprint {self.fingerprint!r} are unknown")
        spec = QSARSpec(task="classification", hidden=tuple(self.hidden), dropout=self.dropout,
                        max_epochs=self.max_epochs, patience=self.patience, split="random",
                        seed=int(split.queries.sum()))
        model = fit_qsar(fps[idx], y, spec, ctx.specs[self.fingerprint])
        return np.asarray(model.predict(fps[ranked]), dtype=np.float64)


@dataclass(frozen=True)
class PropertyScorer:
    """The null model: rank by one property, in the direction the queries point to."""

    property: str = "heavy_atoms"
    uses_decoys = False

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        if self.property not in ctx.props:
            raise ConfigError(f"scorer property: {self.property!r} is not computed; available: "
                              f"{', '.join(ctx.props) or '(none)'}")
        v = ctx.props[self.property]
        high_first = np.nanmedian(v[split.queries]) >= np.nanmedian(v[ranked])
        return property_ranking(v[ranked], bool(high_first))


@dataclass(frozen=True)
class RankFusionScorer:
    """Weighted mean of the members' fractional ranks (members score the same list), divided by
    the sum of |weights| (``weighted_fusion``); a member's NaN ranks last by that member."""

    members: tuple = ()
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))  # from config: a list
        if self.weights is not None:
            object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if len(self.members) < 2:
            raise ConfigError("a fusion scorer needs at least two members")
        if self.weights is not None and len(self.weights) != len(self.members):
            raise ConfigError(f"fusion weights {self.weights} do not match {len(self.members)} members")
        if self.weights is not None and not any(self.weights):
            raise ConfigError(f"fusion weights {self.weights} are all 0: give a member a non-zero weight")

    @property
    def uses_decoys(self) -> bool:
        return any(m.uses_decoys for m in self.members)

    def score(self, ctx: TargetContext, split: Split, ranked: np.ndarray) -> np.ndarray:
        parts = []
        for m in self.members:
            key = (m, ranked.size)  # one list per split and ranked-set size: memo is per split
            if key not in ctx.memo:
                ctx.memo[key] = m.score(ctx, split, ranked)
            scores = ctx.memo[key]
            parts.append(np.where(np.isnan(scores), -np.inf, scores))  # NaN ranks last by its member
        return weighted_fusion(parts, self.weights if self.weights is not None else [1.0] * len(parts))


@dataclass(frozen=True)
class NamedScorer:
    """A scorer with its report name."""

    name: str
    scorer: object = field(compare=False)

    @property
    def uses_decoys(self) -> bool:
        return bool(self.scorer.uses_decoys)
