"""Virtual-screening enrichment metrics: pure numpy on ``(scores, labels)``.

Conventions shared by every function:

- ``scores``: float array, higher is better. NaN ranks last (tied with ``-inf``).
- ``labels``: bool array of the same length (True = active).
- Ranks are 1-based: the best molecule has rank 1, ``N`` molecules in all, ``P`` actives.
- **Ties.** Every metric is its *expected value over all orderings of tied molecules*
  (uniformly random tie-breaking), computed exactly, so the result is deterministic and
  does not depend on the input order. For AUROC this is the usual rule (a tied
  active/inactive pair counts one half, as in scikit-learn's ``roc_auc_score``). For EF
  and BEDROC, a block of ``m`` tied molecules holding ``k`` actives spreads ``k/m`` of an
  active over each of its positions. Why not pessimistic or optimistic ordering: those
  reward or punish coarse scores (MACCS keys, 0/1 scores, many molecules with similarity 0)
  for their ties rather than their ranking, and disagree with AUROC's half-count; the
  mean rule keeps all metrics consistent and equals the plain definition when there are
  no ties. RDKit's ``CalcEnrichment``/``CalcBEDROC`` take a pre-sorted list and so use
  whatever order ties arrive in; without ties the values here equal RDKit's.
- **EF at fraction f**: ``n_top = ceil(f * N)`` (at least 1), as RDKit's ``CalcEnrichment``;
  ``EF = (actives in top n_top / n_top) / (P / N)``.
- **BEDROC** (Truchon & Bayly, J. Chem. Inf. Model. 47, 488 (2007), eq. 36):
  ``RIE = (sum_i exp(-alpha r_i / N) / P) / ((1/N) (1 - e^-alpha) / (e^(alpha/N) - 1))``,
  ``BEDROC = RIE * Ra sinh(alpha/2) / (cosh(alpha/2) - cosh(alpha/2 - alpha Ra))
  + 1 / (1 - e^(alpha (1 - Ra)))`` with ``Ra = P / N``; equal to RDKit's
  ``(RIE - RIEmin) / (RIEmax - RIEmin)``.

A metric needs at least one active and one inactive; otherwise ``ValueError`` says which
is missing.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "EnrichmentMetrics", "NullModel", "actives_in_top", "auroc", "bedroc", "enrichment_curve",
    "enrichment_factor", "fractional_ranks", "null_model", "property_ranking", "roc_curve", "summary",
    "weighted_fusion", "zscores",
]


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of ``x`` (ascending); ties share their mean rank; NaN gets NaN.

    The same as ``scipy.stats.rankdata(x, method="average")`` for finite scores, in one
    sort and without importing ``scipy.stats`` (~1 s)."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.float64)
    order = np.argsort(x)  # the order inside a run of ties does not change its mean rank
    xs = x[order]
    first = np.empty(n, dtype=bool)  # first of a run of equal scores
    first[0] = True
    np.not_equal(xs[1:], xs[:-1], out=first[1:])
    starts = np.flatnonzero(first)
    ends = np.append(starts[1:], n)
    mean_rank = (starts + ends + 1) / 2.0  # ranks start+1 .. end
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = mean_rank[np.cumsum(first) - 1]
    ranks[np.isnan(x)] = np.nan
    return ranks


def fractional_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks in (0, 1], the highest score ranked 1; ties share their mean rank; NaN stays NaN.
    The rank fusion of ``weighted_fusion``."""
    return average_ranks(x) / max(len(x), 1)


def zscores(x: np.ndarray) -> np.ndarray:
    """``(x - mean) / sd`` over the finite scores; NaN stays NaN; all 0 when ``sd`` is 0."""
    x = np.asarray(x, dtype=np.float64)
    sd = np.nanstd(x) if np.isfinite(x).any() else 0.0
    return (x - np.nanmean(x)) / sd if sd > 0 else np.where(np.isnan(x), np.nan, 0.0)


FUSIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"rank": fractional_ranks, "zscore": zscores}


def weighted_fusion(scores: Sequence[np.ndarray], weights: Sequence[float], method: str = "rank",
                    mapper: Callable[..., Iterable[np.ndarray]] = map) -> np.ndarray:
    """float64[N]: ``sum_k w_k f(scores_k) / sum_k |w_k|`` over K scorers of the same N molecules.

    The one score fusion of the screen (``biogen.screen.selection.fuse_scores``) and of
    ``biogen evaluate`` (``RankFusionScorer``). f: ``fractional_ranks`` (method rank:
    Riniker & Landrum's rank fusion, robust to scale) or ``zscores`` (method zscore).
    scores: K arrays of N higher-is-better scores; NaN stays NaN (no rank), so a molecule
    with a NaN from any scorer has a NaN fused score: a caller that means "no score ranks
    last by this scorer" passes ``-inf`` instead. weights: K floats, not all 0 (a negative
    weight reverses a scorer; a scorer of weight 0 is left out). mapper: applies f to each
    scorer (``map``, or a thread pool's ``map``: numpy sorts without the GIL).
    """
    if method not in FUSIONS:
        raise ValueError(f"fusion method {method!r} is not valid; choose one of {', '.join(FUSIONS)}")
    if len(weights) != len(scores):
        raise ValueError(f"{len(weights)} fusion weights for {len(scores)} scorers: give one weight per scorer")
    used = [(float(w), s) for w, s in zip(weights, scores) if float(w) != 0.0]
    if not used:
        raise ValueError("every fusion weight is 0: give at least one scorer a non-zero weight")
    total = sum(abs(w) for w, _ in used)
    fused = np.zeros(len(used[0][1]), dtype=np.float64)
    for (w, _), part in zip(used, mapper(FUSIONS[method], [s for _, s in used])):
        fused += w * part  # N
    return fused / total


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels)
    if y.dtype != np.bool_:
        if not np.isin(y, (0, 1)).all():
            raise ValueError(f"labels must be booleans (or 0/1); got values {np.unique(y)[:5]}")
        y = y.astype(bool)
    y = y.ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores ({s.shape[0]}) and labels ({y.shape[0]}) differ in length")
    n_act = int(y.sum())
    if n_act == 0:
        raise ValueError(f"no actives among the {y.size} labels: a screening metric needs at least one")
    if n_act == y.size:
        raise ValueError(f"no inactives among the {y.size} labels: a screening metric needs at least one")
    return np.where(np.isnan(s), -np.inf, s), y


def _ranked(scores, labels):
    """Best-first order with ties spread: (sorted scores, sorted labels, w, group index).

    ``w[j]`` is the expected number of actives at position ``j`` (0-based) under random
    tie-breaking: ``k/m`` for each position of a tie block of ``m`` molecules with ``k`` actives.
    """
    s, y = _check(scores, labels)
    order = np.argsort(-s, kind="stable")
    ss, ys = s[order], y[order]
    new = np.empty(ss.size, dtype=bool)
    new[0] = True
    new[1:] = ss[1:] != ss[:-1]
    starts = np.flatnonzero(new)
    group = np.cumsum(new) - 1  # block of each position
    sizes = np.diff(np.append(starts, ss.size))
    act = np.add.reduceat(ys.astype(np.float64), starts)
    w = (act / sizes)[group]
    return ss, ys, w, starts, sizes


def _auroc(ys, starts, sizes) -> float:
    # ascending mid-ranks: the best-first block at 0-based position s of size m covers
    # ascending ranks N - s - m + 1 .. N - s
    n = ys.size
    p = int(ys.sum())
    mid = (2 * n - 2 * starts - sizes + 1) / 2.0
    u = np.repeat(mid, sizes)[ys].sum() - p * (p + 1) / 2.0
    return float(u / (p * (n - p)))


def _ef(ys, w, fraction: float) -> float:
    n = ys.size
    top = _n_top(n, fraction)
    return float((w[:top].sum() / top) / (ys.sum() / n))


def _bedroc(ys, w, alpha: float) -> float:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    n = ys.size
    p = float(ys.sum())
    ra = p / n
    r = np.arange(1, n + 1, dtype=np.float64)
    s = float(np.dot(w, np.exp(-alpha * r / n)))
    rie = (s / p) / ((1.0 / n) * (1.0 - math.exp(-alpha)) / math.expm1(alpha / n))
    factor = ra * math.sinh(alpha / 2) / (math.cosh(alpha / 2) - math.cosh(alpha / 2 - alpha * ra))
    return float(rie * factor + 1.0 / (1.0 - math.exp(alpha * (1.0 - ra))))


def _n_top(n: int, fraction: float) -> int:
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    # the epsilon keeps e.g. 0.07 * 100 = 7.000000000000001 at 7 molecules
    return max(1, math.ceil(n * fraction - 1e-9))


def auroc(scores, labels) -> float:
    """Area under the ROC curve (Mann-Whitney U with mid-ranks: ties count one half)."""
    _, ys, _, starts, sizes = _ranked(scores, labels)
    return _auroc(ys, starts, sizes)


def enrichment_factor(scores, labels, fraction: float) -> float:
    """EF at ``fraction`` of the ranked list: hit rate in the top ``ceil(fraction*N)`` / overall rate."""
    _, ys, w, _, _ = _ranked(scores, labels)
    return _ef(ys, w, fraction)


def bedroc(scores, labels, alpha: float = 20.0) -> float:
    """BEDROC (Truchon & Bayly 2007) with early-recognition parameter ``alpha`` (> 0)."""
    _, ys, w, _, _ = _ranked(scores, labels)
    return _bedroc(ys, w, alpha)


def actives_in_top(scores, labels, n: int) -> float:
    """Expected number of actives among the ``n`` best-scored molecules (ties spread)."""
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    _, _, w, _, _ = _ranked(scores, labels)
    return float(w[:n].sum())


def roc_curve(scores, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate, thresholds), one point per distinct score.

    Starts at (0, 0) with threshold ``+inf``, as scikit-learn's ``roc_curve``
    (``drop_intermediate=False``); tied molecules move the curve diagonally.
    """
    ss, ys, _, starts, sizes = _ranked(scores, labels)
    ends = starts + sizes - 1
    tp = np.cumsum(ys)[ends]
    fp = (ends + 1) - tp
    p = ys.sum()
    fpr = np.concatenate([[0.0], fp / (ys.size - p)])
    tpr = np.concatenate([[0.0], tp / p])
    return fpr, tpr, np.concatenate([[np.inf], ss[starts]])


def enrichment_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    """(fraction of the list screened, expected fraction of actives found), from (0, 0) to (1, 1)."""
    _, ys, w, _, _ = _ranked(scores, labels)
    x = np.arange(0, ys.size + 1, dtype=np.float64) / ys.size
    y = np.concatenate([[0.0], np.cumsum(w) / ys.sum()])
    return x, y


def summary(scores, labels, alpha: float = 20.0) -> dict:
    """AUROC, EF1%, EF5%, BEDROC(alpha) (key ``bedroc20`` for alpha 20), n_actives, n; one sort."""
    _, ys, w, starts, sizes = _ranked(scores, labels)
    return {"auroc": _auroc(ys, starts, sizes), "ef1": _ef(ys, w, 0.01), "ef5": _ef(ys, w, 0.05),
            f"bedroc{alpha:g}": _bedroc(ys, w, alpha), "n_actives": int(ys.sum()), "n": int(ys.size)}


@dataclass(frozen=True)
class EnrichmentMetrics:
    """The enrichment of one ranking: what ``summary`` computes plus the actives recovered in
    the top 1 %. One value shared by the screen's metrics, its summary.json and its report.
    ``as_dict`` gives the keys of summary.json: auroc, ef1, ef5, bedroc20, n_actives, n,
    recovered_top_1%."""

    auroc: float
    ef1: float
    ef5: float
    bedroc20: float
    n_actives: int
    n: int
    recovered_top_1pct: int

    @classmethod
    def of(cls, scores, labels) -> "EnrichmentMetrics":
        s = summary(scores, labels)
        top = max(1, int(round(0.01 * s["n"])))
        return cls(s["auroc"], s["ef1"], s["ef5"], s["bedroc20"], s["n_actives"], s["n"],
                   int(actives_in_top(scores, labels, top)))

    def as_dict(self) -> dict:
        return {"auroc": self.auroc, "ef1": self.ef1, "ef5": self.ef5, "bedroc20": self.bedroc20,
                "n_actives": self.n_actives, "n": self.n, "recovered_top_1%": self.recovered_top_1pct}


NULL_PROPERTIES = ("heavy_atoms", "mw")  # simple properties a null model may rank by


@dataclass(frozen=True)
class NullModel:
    """The enrichment of ranking by one simple property alone (heavy-atom count or MW), in the
    direction that enriches more: how much of a screen's enrichment the actives' property
    differences already give (a screen whose actives are larger than the library's molecules
    can look good for that alone). ``label``: e.g. "heavy_atoms (high first)"."""

    prop: str
    high_first: bool
    metrics: EnrichmentMetrics

    @property
    def label(self) -> str:
        return f"{self.prop} ({'high' if self.high_first else 'low'} first)"

    def as_dict(self) -> dict:
        return {"property": self.prop, "high_first": self.high_first, **self.metrics.as_dict()}


def property_ranking(values, high_first: bool, keep: np.ndarray | None = None) -> np.ndarray:
    """Scores that rank molecules by a property (NaN last; outside ``keep`` last)."""
    v = np.asarray(values, dtype=np.float64)
    s = np.where(np.isnan(v), -np.inf, v if high_first else -v)
    return s if keep is None else np.where(keep, s, -np.inf)


def null_model(props: dict[str, np.ndarray], labels, keep: np.ndarray | None = None) -> NullModel | None:
    """The best ranking by one of ``props`` (name -> N floats), each way round, by AUROC (EF1 %
    breaks ties). ``keep``: molecules outside it rank last, as a screen's filtered-out molecules
    do. NaN values rank last. None when no property is given or labels lack a class."""
    y = np.asarray(labels, dtype=bool)
    if not props or not y.any() or y.all():
        return None
    best = None
    for name, values in props.items():
        for high_first in (True, False):
            m = EnrichmentMetrics.of(property_ranking(values, high_first, keep), y)
            if best is None or (m.auroc, m.ef1) > (best.metrics.auroc, best.metrics.ef1):
                best = NullModel(name, high_first, m)
    return best
