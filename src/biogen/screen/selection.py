"""Score fusion and hit selection (top N, per-scaffold cap, MaxMin diversity)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from rdkit import DataStructs
from rdkit.SimDivFilters import rdSimDivPickers

from biogen.chem.fingerprints import unpack_bits
from biogen.errors import ConfigError
from biogen.screen.metrics import FUSIONS, weighted_fusion

FUSION_METHODS = tuple(FUSIONS)  # ("rank", "zscore")


def best_first(scores: np.ndarray) -> np.ndarray:
    """Indices of ``scores`` from the highest to the lowest, ties in index order, NaN last:
    ``np.argsort(-scores, kind="stable")``, about twice as fast on a large screen (numpy's
    SIMD quicksort, then only the runs of tied scores put in index order)."""
    x = np.asarray(scores, dtype=np.float64)
    n = len(x)
    order = np.argsort(-x)
    if n < 2:
        return order
    xs = x[order]
    same = (xs[1:] == xs[:-1]) | (np.isnan(xs[1:]) & np.isnan(xs[:-1]))  # sorted neighbours tied
    if not same.any():
        return order
    tied = np.zeros(n, dtype=bool)
    tied[1:] |= same
    tied[:-1] |= same
    run = np.cumsum(np.concatenate(([True], ~same)))  # run number of each sorted position
    pos = np.flatnonzero(tied)
    key = run[pos].astype(np.int64) * n + order[pos]  # (run, index): unique, so any sort is exact
    order[pos] = order[pos][np.argsort(key)]
    return order


def fusion_weights(scorers: list[str], weights: Mapping[str, float] | None, method: str) -> dict[str, float]:
    """The non-zero weight of each scorer that takes part in the fusion (default 1), after
    checking the fusion config against the screen's scorers: a screen calls this before
    it runs any shard, so that a typo fails at once."""
    if method not in FUSION_METHODS:
        raise ConfigError(f"scoring.fusion.method={method!r} is not valid; choose one of {', '.join(FUSION_METHODS)}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(scorers))
    if unknown:
        raise ConfigError(f"scoring.fusion.weights names {unknown}, which are not scorers of this screen; "
                          f"scorers: {', '.join(scorers) or '(none)'}")
    used = {k: float(weights.get(k, 1.0)) for k in scorers if float(weights.get(k, 1.0)) != 0.0}
    if not used:
        raise ConfigError("no scorer with a non-zero fusion weight: add a scorer to scoring.scorers "
                          "or set scoring.fusion.weights")
    return used


def fuse_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                method: str = "rank") -> np.ndarray:
    """One fused score per molecule from several scorers (all higher-is-better).

    rank: weighted mean of fractional ranks (robust to scale; Riniker & Landrum's rank
    fusion); zscore: weighted mean of z-scores (``biogen.screen.metrics.weighted_fusion``,
    shared with ``biogen evaluate``). Weights default to 1; a weight of 0 drops a scorer. A
    NaN score (no score) makes the fused score NaN, ranked last. With one scorer the fused
    score is that scorer's own score (ranks unchanged).
    """
    used = fusion_weights(list(scores), weights, method)
    if len(used) == 1:
        return np.asarray(scores[next(iter(used))], dtype=np.float64)
    n = len(next(iter(scores.values())))
    # one scorer per thread on large screens: numpy sorts without the GIL
    with ThreadPoolExecutor(min(len(used), os.cpu_count() or 1) if n >= 100_000 else 1) as pool:
        return weighted_fusion([scores[k] for k in used], list(used.values()), method, pool.map)


@dataclass(frozen=True)
class SelectionSpec:
    """Config group ``selection``.

    n: hits to return; top_m: candidates (best fused scores, after the scaffold cap) the
    diversity pick chooses from; diversity: maxmin (RDKit MaxMinPicker, Tanimoto on the
    library fingerprints, seeded with the best-scored candidate) | none; scaffold_cap:
    at most this many hits per Bemis-Murcko scaffold (null: no cap).
    """

    n: int = 100
    top_m: int = 2000
    diversity: str = "maxmin"
    scaffold_cap: int | None = 3
    seed: int = 42

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"selection.n={self.n} must be >= 1")
        if self.top_m < self.n:
            raise ConfigError(f"selection.top_m={self.top_m} must be >= selection.n={self.n}")
        if self.diversity not in ("maxmin", "none"):
            raise ConfigError(f"selection.diversity={self.diversity!r} is not valid; choose maxmin or none")
        if self.scaffold_cap is not None and self.scaffold_cap < 1:
            raise ConfigError(f"selection.scaffold_cap={self.scaffold_cap} must be >= 1 or null")


def _bitvects(fps: np.ndarray) -> list:
    bits = unpack_bits(fps)
    out = []
    for row in bits:
        bv = DataStructs.ExplicitBitVect(bits.shape[1])
        bv.SetBitsFromList(np.flatnonzero(row).tolist())
        out.append(bv)
    return out


def select_hits(order: np.ndarray, scaffolds_of, fps_of, spec: SelectionSpec,
                block: int = 512) -> tuple[np.ndarray, list[str]]:
    """Pick hits from candidates ranked best first.

    order: candidate indices, best first; scaffolds_of(indices) -> their Bemis-Murcko
    scaffold SMILES (a list: ``murcko_scaffolds`` of their SMILES; the screen reads the
    library's canonical SMILES and takes the fast path); fps_of(indices) -> packed
    fingerprints of those candidates. Returns (chosen indices in rank order, the scaffold
    of every chosen index). Walks down the ranking keeping at most ``scaffold_cap`` per
    scaffold until ``top_m`` candidates (``walk_pool``), then (diversity=maxmin) picks
    ``n`` of them with MaxMin seeded by the best one; the result is re-ordered by score.
    """
    return pick_from_pool(*walk_pool(order, scaffolds_of, spec, block), scaffolds_of, fps_of, spec)


MAX_BLOCK = 1 << 18  # candidates per scaffold request at most (their strings are held while walked)


def walk_pool(order: np.ndarray, scaffolds_of, spec: SelectionSpec, block: int = 512
              ) -> tuple[list[int], dict[int, str]]:
    """The walk of ``select_hits``: down the ranking, at most ``scaffold_cap`` per scaffold,
    until ``top_m`` candidates (``n`` without diversity). Returns the pool (in rank order)
    and the scaffolds of its members only: memory O(pool + distinct scaffolds), not
    O(candidates examined). Scaffolds are asked for in blocks: first ``top_m``, then what
    is still missing scaled by the share that passed the cap so far (``block`` at least,
    ``MAX_BLOCK`` at most); the result does not depend on the blocks."""
    want = spec.top_m if spec.diversity == "maxmin" else spec.n
    pool: list[int] = []
    scaffolds: dict[int, str] = {}
    per_scaffold: dict[str, int] = {}
    start = examined = 0
    size = max(block, want)
    while len(pool) < want and start < len(order):
        idx = np.asarray(order[start:start + size], dtype=np.int64)
        start += len(idx)
        if spec.scaffold_cap is None:
            pool.extend(int(i) for i in idx[: want - len(pool)])
            continue
        for i, sc in zip(idx.tolist(), scaffolds_of(idx)):
            examined += 1
            if per_scaffold.get(sc, 0) >= spec.scaffold_cap:
                continue
            per_scaffold[sc] = per_scaffold.get(sc, 0) + 1
            pool.append(i)
            scaffolds[i] = sc
            if len(pool) >= want:
                break
        # the next block: what is still missing over the share of candidates the cap let
        # through so far, plus a margin (each call may cost a pass over many shards)
        rate = max(len(pool) / examined, 0.05)
        size = min(max(block, int(1.2 * (want - len(pool)) / rate) + 1), MAX_BLOCK)
    return pool, scaffolds


def scaffold_keys(scaffolds: list[str]) -> np.ndarray:
    """A 128-bit key per scaffold SMILES (BLAKE2b, as two uint64 columns): what a streaming
    screen's top-K tasks send instead of the strings. Two distinct scaffolds share a key with
    probability ~m^2 / 2^129 among m scaffolds (1e-26 at 1M): the cap sees the scaffolds."""
    digests = b"".join(hashlib.blake2b(s.encode(), digest_size=16).digest() for s in scaffolds)
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64).reshape(-1, 2)


class CapWalk:
    """``walk_pool`` over candidates whose scaffolds are all known, as keys (any array whose
    equal rows mean equal scaffolds, e.g. ``scaffold_keys``), vectorized and fed in pieces
    (rank order): a candidate joins the pool when fewer than ``scaffold_cap`` better-ranked
    candidates share its scaffold, until it holds ``top_m`` (``n`` without diversity). The
    walk keeps a count per distinct scaffold seen, never the candidates it passed over, so
    a streaming screen fetches the ranking in bounded pieces and keeps the pool only. The
    pool does not depend on how the candidates are cut into pieces."""

    def __init__(self, spec: SelectionSpec):
        self.spec = spec
        self.want = spec.top_m if spec.diversity == "maxmin" else spec.n
        self.taken = 0
        self.known: np.ndarray | None = None    # the distinct keys seen (sorted, as np.void)
        self.counts = np.zeros(0, dtype=np.int64)  # candidates seen with each

    @property
    def full(self) -> bool:
        return self.taken >= self.want

    def feed(self, keys: np.ndarray) -> np.ndarray:
        """The positions in ``keys`` (the next candidates, rank order) that join the pool."""
        n = len(keys)
        room = self.want - self.taken
        if self.spec.scaffold_cap is None or n == 0 or room <= 0:
            out = np.arange(min(max(room, 0), n), dtype=np.int64)
            self.taken += len(out)
            return out
        k = np.ascontiguousarray(keys).reshape(n, -1)
        void = k.view(np.dtype((np.void, k.dtype.itemsize * k.shape[1]))).ravel()
        uniq, group, per = np.unique(void, return_inverse=True, return_counts=True)
        group = group.ravel()
        order = np.argsort(group, kind="stable")  # each scaffold's candidates, in rank order
        g = group[order]
        first = np.ones(n, dtype=bool)
        first[1:] = g[1:] != g[:-1]
        start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
        seen = np.empty(n, dtype=np.int64)
        seen[order] = np.arange(n) - start  # better-ranked candidates of this piece with the same scaffold
        before = np.zeros(len(uniq), dtype=np.int64)  # ... and of the pieces before it
        if self.known is None:
            self.known, self.counts = uniq, per.astype(np.int64)
        else:
            at = np.searchsorted(self.known, uniq)
            hit = at < len(self.known)
            hit[hit] = self.known[at[hit]] == uniq[hit]
            before[hit] = self.counts[at[hit]]
            self.counts[at[hit]] += per[hit]
            new = np.flatnonzero(~hit)
            if len(new):
                merged = np.concatenate([self.known, uniq[new]])
                keep = np.argsort(merged, kind="stable")
                self.known = merged[keep]
                self.counts = np.concatenate([self.counts, per[new].astype(np.int64)])[keep]
        out = np.flatnonzero(before[group] + seen < self.spec.scaffold_cap)[:room]
        self.taken += len(out)
        return out


def pick_from_pool(pool: list[int], scaffolds: dict[int, str], scaffolds_of, fps_of, spec: SelectionSpec
                   ) -> tuple[np.ndarray, list[str]]:
    """The end of ``select_hits``: MaxMin over the pool (diversity=maxmin) or its first
    ``n``, with each chosen index's scaffold."""
    if spec.diversity == "maxmin" and len(pool) > spec.n:
        bvs = _bitvects(fps_of(np.asarray(pool)))
        picker = rdSimDivPickers.MaxMinPicker()
        picked = picker.LazyBitVectorPick(bvs, len(bvs), spec.n, firstPicks=[0], seed=spec.seed)
        chosen = sorted(int(p) for p in picked)  # pool positions; pool is in rank order
        pool = [pool[p] for p in chosen]
    pool = pool[: spec.n]
    missing = [i for i in pool if i not in scaffolds]
    if missing:
        scaffolds = {**scaffolds, **dict(zip(missing, scaffolds_of(np.asarray(missing, dtype=np.int64))))}
    return np.asarray(pool, dtype=np.int64), [scaffolds[i] for i in pool]
