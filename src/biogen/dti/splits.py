"""Splits of DTI pairs into train / validation / test, and the metrics of the DTI protocol.

Splits (``kind``):

- ``random``: pairs at random (what DeepDTA's "setting 1" folds are);
- ``unseen_compound``: whole compounds held out (every pair of a test compound is in test);
- ``unseen_protein``: whole protein *clusters* held out. Proteins are clustered so that
  near-duplicates do not leak across the split: two proteins join when their 3-mer sets
  overlap with Jaccard >= ``protein_similarity`` (0.5 by default; single linkage, union-
  find). 3-mer Jaccard is an alignment-free proxy for sequence identity: above 0.5 the
  proteins are near-identical (isoforms, mutants, orthologue-level identity); it does
  not group remote homologues that share a fold at 30-40% identity — which is the point:
  those are the "new targets" a screen meets;
- ``unseen_both``: test pairs have a held-out compound *and* a held-out protein cluster;
  training pairs have neither (pairs mixing the two are left out of both, and counted);
- ``folds``: the data set's own folds (KIBA: DeepDTA's test fold; validation = its first
  training fold).

Metrics (``dti_metrics``): concordance index (DeepDTA's CI: over pairs with y_i > y_j, 1
when the predictions order them the same way, 0.5 on a prediction tie; O(n log n)), MSE,
RMSE, Spearman per protein (median over proteins with at least 10 pairs), AUROC and AUPR of
"active" (y >= the data set's threshold).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from biogen.errors import ConfigError, InputError

SPLITS = ("random", "unseen_compound", "unseen_protein", "unseen_both", "folds")
MIN_PAIRS_PER_PROTEIN = 10


def protein_clusters(sequences: list[str], similarity: float = 0.5, k: int = 3) -> np.ndarray:
    """Cluster id per protein: single linkage over 3-mer Jaccard >= ``similarity``."""
    sets = [frozenset(s[i:i + k] for i in range(len(s) - k + 1)) or frozenset([s]) for s in sequences]
    parent = list(range(len(sets)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            a, b = sets[i], sets[j]
            if min(len(a), len(b)) < similarity * max(len(a), len(b)):
                continue  # the Jaccard index cannot reach the threshold
            if len(a & b) >= similarity * len(a | b):
                parent[root(j)] = root(i)
    roots = [root(i) for i in range(len(sets))]
    _, ids = np.unique(roots, return_inverse=True)
    return ids.astype(np.int64)


def _take(groups: np.ndarray, fraction: float, rng: np.random.Generator, exclude=None) -> np.ndarray:
    """A random set of group ids holding about ``fraction`` of the items (not in ``exclude``)."""
    ids, counts = np.unique(groups, return_counts=True)
    if exclude is not None:
        keep = ~np.isin(ids, exclude)
        ids, counts = ids[keep], counts[keep]
    order = rng.permutation(len(ids))
    target = fraction * len(groups)
    chosen, total = [], 0
    for o in order:
        if total >= target:
            break
        chosen.append(ids[o])
        total += counts[o]
    return np.array(chosen, dtype=groups.dtype)


def split_pairs(pairs: np.ndarray, kind: str, *, val_fraction: float = 0.1, test_fraction: float = 0.2,
                seed: int = 0, sequences: list[str] | None = None, protein_similarity: float = 0.5,
                folds: dict | None = None) -> dict:
    """``{"train", "val", "test"}`` arrays of pair positions (and ``"dropped"`` for
    unseen_both, ``"protein_clusters"`` where proteins were clustered)."""
    if kind not in SPLITS:
        raise ConfigError(f"model.split={kind!r} is not a DTI split; choose one of {', '.join(SPLITS)}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"model.val_fraction={val_fraction}, model.test_fraction={test_fraction}: need fractions "
                          "in (0, 1) that sum to less than 1")
    rng = np.random.default_rng(seed)
    n = len(pairs)
    out: dict = {}
    if kind == "folds":
        if not folds:
            raise ConfigError("model.split=folds needs a data set with its own folds (train_data=kiba); use "
                              "random, unseen_compound, unseen_protein or unseen_both")
        test, val = np.asarray(folds["test"]), np.asarray(folds["train"][0])
        train = np.setdiff1d(np.arange(n), np.concatenate([test, val]))
        return {"train": train, "val": val, "test": test}
    if kind == "random":
        perm = rng.permutation(n)
        n_test, n_val = int(round(test_fraction * n)), int(round(val_fraction * n))
        return {"test": np.sort(perm[:n_test]), "val": np.sort(perm[n_test:n_test + n_val]),
                "train": np.sort(perm[n_test + n_val:])}
    comp = pairs[:, 0]
    if kind in ("unseen_protein", "unseen_both"):
        if sequences is None:
            raise ConfigError(f"model.split={kind} needs the protein sequences (to cluster them)")
        clusters = protein_clusters(sequences, protein_similarity)
        out["protein_clusters"] = int(clusters.max()) + 1 if len(clusters) else 0
        prot = clusters[pairs[:, 1]]
    if kind == "unseen_compound":
        groups = comp
    elif kind == "unseen_protein":
        groups = prot
    else:  # unseen_both: compounds and protein clusters each held out at sqrt of the fraction
        f = float(np.sqrt(test_fraction))
        tc, tp = _take(comp, f, rng), _take(prot, f, rng)
        vc, vp = _take(comp, float(np.sqrt(val_fraction)) if val_fraction else 0.0, rng, tc), \
            _take(prot, float(np.sqrt(val_fraction)) if val_fraction else 0.0, rng, tp)
        in_tc, in_tp = np.isin(comp, tc), np.isin(prot, tp)
        in_vc, in_vp = np.isin(comp, vc), np.isin(prot, vp)
        test = np.flatnonzero(in_tc & in_tp)
        val = np.flatnonzero(in_vc & in_vp)
        train = np.flatnonzero(~in_tc & ~in_tp & ~in_vc & ~in_vp)
        out.update(train=train, val=val, test=test, dropped=int(n - len(train) - len(val) - len(test)))
        _check(out, kind)
        return out
    test_g = _take(groups, test_fraction, rng)
    val_g = _take(groups, val_fraction, rng, test_g) if val_fraction else np.zeros(0, groups.dtype)
    in_test, in_val = np.isin(groups, test_g), np.isin(groups, val_g)
    out.update(test=np.flatnonzero(in_test), val=np.flatnonzero(in_val), train=np.flatnonzero(~in_test & ~in_val))
    _check(out, kind)
    return out


def _check(out: dict, kind: str) -> None:
    if not len(out["train"]) or not len(out["test"]):
        raise InputError(f"model.split={kind}: the split left {len(out['train'])} training and {len(out['test'])} "
                         "test pairs; the data set has too few compounds or protein clusters for it")


@njit(cache=True)
def _concordant(y_sorted_pred_ranks: np.ndarray, groups_end: np.ndarray, n_ranks: int) -> float:
    """Sum over pairs (i, j) with y_i > y_j of h(p_i - p_j); items sorted by y ascending,
    ``groups_end`` the end of each run of equal y; predictions as dense ranks 1..n_ranks."""
    tree = np.zeros(n_ranks + 1, np.int64)
    total = 0.0
    start = 0
    for g in range(len(groups_end)):
        end = groups_end[g]
        for i in range(start, end):  # compare with every earlier (smaller y) item
            r = y_sorted_pred_ranks[i]
            below = 0
            k = r - 1
            while k > 0:
                below += tree[k]
                k -= k & (-k)
            upto = 0
            k = r
            while k > 0:
                upto += tree[k]
                k -= k & (-k)
            total += below + 0.5 * (upto - below)
        for i in range(start, end):  # then add this run (equal y are not compared)
            k = y_sorted_pred_ranks[i]
            while k <= n_ranks:
                tree[k] += 1
                k += k & (-k)
        start = end
    return total


def concordance_index(y: np.ndarray, pred: np.ndarray) -> float:
    """DeepDTA's CI in O(n log n) (NaN when all y are equal)."""
    y = np.asarray(y, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    order = np.argsort(y, kind="stable")
    ys = y[order]
    _, ranks = np.unique(pred, return_inverse=True)
    ranks = (ranks[order] + 1).astype(np.int64)
    ends = np.flatnonzero(np.diff(ys) != 0) + 1
    ends = np.append(ends, len(ys)).astype(np.int64)
    counts = np.diff(np.concatenate([[0], ends]))
    n_pairs = (len(ys) ** 2 - (counts.astype(np.float64) ** 2).sum()) / 2
    if n_pairs == 0:
        return float("nan")
    return float(_concordant(ranks, ends, int(ranks.max()) if len(ranks) else 0) / n_pairs)


def dti_metrics(pred: np.ndarray, y: np.ndarray, proteins: np.ndarray, active_threshold: float | None) -> dict:
    from scipy.stats import spearmanr

    from biogen.models.predictor import auroc

    pred = np.asarray(pred, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    out = {"pairs": int(len(y)), "ci": concordance_index(y, pred), "mse": float(((pred - y) ** 2).mean()),
           "rmse": float(np.sqrt(((pred - y) ** 2).mean()))}
    rhos = []
    for p in np.unique(proteins):
        sel = proteins == p
        if sel.sum() >= MIN_PAIRS_PER_PROTEIN and np.ptp(y[sel]) > 0 and np.ptp(pred[sel]) > 0:
            rhos.append(spearmanr(pred[sel], y[sel]).statistic)
    out["spearman_per_protein_median"] = float(np.median(rhos)) if rhos else float("nan")
    out["proteins_with_spearman"] = len(rhos)
    if active_threshold is not None:
        labels = (y >= active_threshold).astype(np.float64)
        out["active_threshold"] = float(active_threshold)
        out["actives"] = int(labels.sum())
        out["auroc"] = auroc(labels, pred)
        out["aupr"] = average_precision(labels, pred)
    return out


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (average precision; NaN without actives)."""
    labels = np.asarray(labels, dtype=bool)
    if not labels.any():
        return float("nan")
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = labels[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / hits.sum())
