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
    "EnrichmentMetrics", "NullModel", "TieCounts", "actives_in_top", "auroc", "bedroc", "distinct_values",
    "enrichment_curve", "enrichment_factor", "fractional_ranks", "null_model", "pick_null_model",
    "property_ranking", "roc_curve", "summary", "tie_counts", "weighted_fusion", "zscores",
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

    @classmethod
    def from_counts(cls, counts: "TieCounts") -> "EnrichmentMetrics":
        """The same metrics from ``TieCounts`` alone (a streaming screen sums them over its
        shards). AUROC, EF1/5 % and the recovered count equal ``of``'s bit for bit (the EF
        sums replay numpy's pairwise summation: ``_block_sum``); BEDROC within ~1e-12 (a
        geometric series per tie block where ``of`` takes a dot product)."""
        g, e, a, n = counts.greater, counts.equal, counts.actives, counts.n
        p = int(a.sum())
        if p == 0:
            raise ValueError(f"no actives among the {n} labels: a screening metric needs at least one")
        if p == n:
            raise ValueError(f"no inactives among the {n} labels: a screening metric needs at least one")
        mid = (2 * n - 2 * g - e + 1) / 2.0  # ascending mid-rank of each block (as _auroc)
        auc = float((float(np.dot(a, mid)) - p * (p + 1) / 2.0) / (p * (n - p)))

        w = a.astype(np.float64) / e  # the expected actives at each position of a block (as _ranked)

        def found(top: int) -> float:  # expected actives in the first ``top`` positions: w[:top].sum()
            return _block_sum(g, e, w, top)

        ef1, ef5 = ((found(_n_top(n, f)) / _n_top(n, f)) / (p / n) for f in (0.01, 0.05))
        alpha = 20.0
        # sum over a block's positions r = g+1 .. g+e of exp(-alpha r / n): a geometric series
        series = np.exp(-alpha * (g + 1) / n) * np.expm1(-alpha * e / n) / math.expm1(-alpha / n)
        s = math.fsum((a / e * series).tolist())
        ra = p / n
        rie = (s / p) / ((1.0 / n) * (1.0 - math.exp(-alpha)) / math.expm1(alpha / n))
        factor = ra * math.sinh(alpha / 2) / (math.cosh(alpha / 2) - math.cosh(alpha / 2 - alpha * ra))
        bed = float(rie * factor + 1.0 / (1.0 - math.exp(alpha * (1.0 - ra))))
        return cls(auc, ef1, ef5, bed, p, n, int(found(max(1, int(round(0.01 * n))))))

    def as_dict(self) -> dict:
        return {"auroc": self.auroc, "ef1": self.ef1, "ef5": self.ef5, "bedroc20": self.bedroc20,
                "n_actives": self.n_actives, "n": self.n, "recovered_top_1%": self.recovered_top_1pct}


@dataclass(frozen=True)
class TieCounts:
    """A ranking as far as the enrichment metrics see it: one entry per distinct score ``v``
    that an active holds (NaN counted as ``-inf``, as ``_check`` does), best first.
    greater: molecules scored above ``v``; equal: molecules scored ``v``; actives: actives
    scored ``v`` (int64 arrays); n: all molecules. Every metric of ``EnrichmentMetrics``
    (AUROC, EF, BEDROC, actives in the top) depends on the ranking only through these,
    under the tie rule of this module; a streaming screen sums ``greater``/``equal`` over
    its shards (``tie_counts``) for the actives' values, which the driver collects."""

    greater: np.ndarray
    equal: np.ndarray
    actives: np.ndarray
    n: int

    @classmethod
    def of(cls, values: np.ndarray, greater: np.ndarray, equal: np.ndarray, active_values: np.ndarray,
           n: int) -> "TieCounts":
        """From the distinct active ``values`` (ascending, as ``distinct_values`` gives them),
        their summed counts and every active's value (NaN: ``-inf``)."""
        av = np.asarray(active_values, dtype=np.float64)
        av = np.sort(np.where(np.isnan(av), -np.inf, av))
        act = np.searchsorted(av, values, "right") - np.searchsorted(av, values, "left")
        order = np.argsort(np.asarray(greater))  # best first
        return cls(np.asarray(greater, dtype=np.int64)[order], np.asarray(equal, dtype=np.int64)[order],
                   act.astype(np.int64)[order], int(n))


_PW_BLOCK = 128  # numpy's pairwise summation: leaves of at most 128 values, 8 accumulators


def _pairwise_leaf(x: list[float]) -> float:
    """numpy's ``pairwise_sum`` of at most 128 float64 values, step by step."""
    if len(x) < 8:
        res = 0.0
        for v in x:
            res += v
        return res
    r = x[:8]
    n, i = len(x), 8
    while i < n - n % 8:
        for j in range(8):
            r[j] += x[i + j]
        i += 8
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    for v in x[i:]:
        res += v
    return res


def _block_sum(starts: np.ndarray, sizes: np.ndarray, values: np.ndarray, top: int) -> float:
    """``w[:top].sum()`` bit for bit (numpy's pairwise summation) for the array ``w`` that is
    ``values[b]`` on positions ``starts[b] .. starts[b] + sizes[b] - 1`` (blocks disjoint,
    ascending) and 0 elsewhere, without building ``w``: a range without blocks sums to 0, a
    range inside one block depends only on its value and length (memoized); only ranges
    that cut a block boundary are split further (O(blocks x log(top)) calls). So the
    counts-based EF and recovered count equal the in-memory ones exactly (``int()`` of
    0.9999999999999999 included). Mirrors numpy's float64 ``add.reduce`` of a contiguous
    array (numpy 1.x-2.x); ``tests/unit/test_streaming_metrics.py`` checks it against numpy."""
    starts = np.asarray(starts, dtype=np.int64)
    ends = starts + np.asarray(sizes, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    keep = (values != 0) & (starts < top)
    starts, ends, values = starts[keep], ends[keep], values[keep]
    memo: dict[tuple[float, int], float] = {}

    def const(v: float, n: int) -> float:
        if (v, n) not in memo:
            memo[(v, n)] = _pairwise_leaf([v] * n) if n <= _PW_BLOCK else const(v, _half(n)) + const(v, n - _half(n))
        return memo[(v, n)]

    def rec(lo: int, hi: int) -> float:
        first = int(np.searchsorted(ends, lo, "right"))  # the first block ending after lo
        if first == len(starts) or starts[first] >= hi:
            return 0.0
        if starts[first] <= lo and ends[first] >= hi:
            return const(float(values[first]), hi - lo)
        if hi - lo <= _PW_BLOCK:
            x = [0.0] * (hi - lo)
            b = first
            while b < len(starts) and starts[b] < hi:
                for i in range(max(int(starts[b]), lo), min(int(ends[b]), hi)):
                    x[i - lo] = float(values[b])
                b += 1
            return _pairwise_leaf(x)
        mid = lo + _half(hi - lo)
        return rec(lo, mid) + rec(mid, hi)

    return rec(0, top) if top > 0 else 0.0


def _half(n: int) -> int:
    """Where numpy's pairwise summation splits ``n`` (> 128) values."""
    n2 = n // 2
    return n2 - n2 % 8


def distinct_values(active_values: np.ndarray) -> np.ndarray:
    """The distinct scores of the actives, ascending (NaN as ``-inf``): what ``tie_counts`` counts at."""
    v = np.asarray(active_values, dtype=np.float64)
    return np.unique(np.where(np.isnan(v), -np.inf, v))


def tie_counts(scores: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(molecules of ``scores`` above each of ``values``, molecules equal to it), NaN as
    ``-inf``: one shard's part of ``TieCounts`` (int64 arrays)."""
    s = np.sort(np.where(np.isnan(scores), -np.inf, np.asarray(scores, dtype=np.float64)))
    lo = np.searchsorted(s, values, "left")
    hi = np.searchsorted(s, values, "right")
    return (len(s) - hi).astype(np.int64), (hi - lo).astype(np.int64)


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
    return pick_null_model((name, high_first, EnrichmentMetrics.of(property_ranking(values, high_first, keep), y))
                           for name, values in props.items() for high_first in (True, False))


def pick_null_model(options: Iterable[tuple[str, bool, EnrichmentMetrics]]) -> NullModel | None:
    """The best of (property, high_first, metrics) options by AUROC, EF1 % breaking ties (the
    first wins a full tie): ``null_model``'s choice, also over metrics made from counts."""
    best = None
    for name, high_first, m in options:
        if best is None or (m.auroc, m.ef1) > (best.metrics.auroc, best.metrics.ef1):
            best = NullModel(name, high_first, m)
    return best
