"""Score fusion and hit selection (top N, per-scaffold cap, MaxMin diversity)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from rdkit import DataStructs
from rdkit.SimDivFilters import rdSimDivPickers

from biogen.chem.fingerprints import unpack_bits
from biogen.chem.scaffolds import murcko_scaffolds
from biogen.errors import ConfigError
from biogen.screen.metrics import average_ranks

FUSION_METHODS = ("rank", "zscore")


def _ranks(x: np.ndarray) -> np.ndarray:
    """Fractional ranks in (0, 1], higher score -> higher rank; ties share their mean rank.
    A NaN score has no rank: the fused score of that molecule is NaN."""
    return average_ranks(x) / max(len(x), 1)


def fuse_scores(scores: Mapping[str, np.ndarray], weights: Mapping[str, float] | None = None,
                method: str = "rank") -> np.ndarray:
    """One fused score per molecule from several scorers (all higher-is-better).

    rank: weighted mean of fractional ranks (robust to scale; Riniker & Landrum's rank
    fusion); zscore: weighted mean of z-scores. Weights default to 1; a weight of 0 drops
    a scorer. With one scorer the fused score is that scorer's own score (ranks unchanged).
    """
    if method not in FUSION_METHODS:
        raise ConfigError(f"scoring.fusion.method={method!r} is not valid; choose one of {', '.join(FUSION_METHODS)}")
    weights = dict(weights or {})
    unknown = sorted(set(weights) - set(scores))
    if unknown:
        raise ConfigError(f"scoring.fusion.weights names {unknown}, which are not scorers of this screen; "
                          f"scorers: {', '.join(scores) or '(none)'}")
    used = {k: float(weights.get(k, 1.0)) for k in scores if float(weights.get(k, 1.0)) != 0.0}
    if not used:
        raise ConfigError("no scorer with a non-zero fusion weight: add a scorer to scoring.scorers "
                          "or set scoring.fusion.weights")
    if len(used) == 1:
        return np.asarray(scores[next(iter(used))], dtype=np.float64)
    total = sum(abs(w) for w in used.values())
    fused = np.zeros(len(next(iter(scores.values()))), dtype=np.float64)
    for k, w in used.items():
        x = np.asarray(scores[k], dtype=np.float64)
        if method == "rank":
            part = _ranks(x)
        else:
            sd = x.std()
            part = (x - x.mean()) / sd if sd > 0 else np.zeros_like(x)
        fused += w * part
    return fused / total


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


def select_hits(order: np.ndarray, smiles_of, fps_of, spec: SelectionSpec,
                block: int = 512) -> tuple[np.ndarray, list[str]]:
    """Pick hits from candidates ranked best first.

    order: candidate indices, best first; smiles_of(indices) -> their SMILES (a list);
    fps_of(indices) -> packed fingerprints of those candidates. Returns (chosen indices in
    rank order, the scaffold of every chosen index). Walks down the ranking keeping at most
    ``scaffold_cap`` per scaffold until ``top_m`` candidates, then (diversity=maxmin)
    picks ``n`` of them with MaxMin seeded by the best one; the result is re-ordered by
    score. SMILES are fetched and scaffolds computed ``block`` candidates at a time.
    """
    want = spec.top_m if spec.diversity == "maxmin" else spec.n
    pool: list[int] = []
    scaffolds: dict[int, str] = {}
    per_scaffold: dict[str, int] = {}
    start = 0
    while len(pool) < want and start < len(order):
        # the next block: at least what is still missing (most candidates pass the cap)
        idx = np.asarray(order[start:start + max(block, want - len(pool))], dtype=np.int64)
        start += len(idx)
        if spec.scaffold_cap is None:
            pool.extend(int(i) for i in idx[: want - len(pool)])
            continue
        for i, sc in zip(idx.tolist(), murcko_scaffolds(smiles_of(idx))):
            scaffolds[i] = sc
            if per_scaffold.get(sc, 0) >= spec.scaffold_cap:
                continue
            per_scaffold[sc] = per_scaffold.get(sc, 0) + 1
            pool.append(i)
            if len(pool) >= want:
                break
    if spec.diversity == "maxmin" and len(pool) > spec.n:
        bvs = _bitvects(fps_of(np.asarray(pool)))
        picker = rdSimDivPickers.MaxMinPicker()
        picked = picker.LazyBitVectorPick(bvs, len(bvs), spec.n, firstPicks=[0], seed=spec.seed)
        chosen = sorted(int(p) for p in picked)  # pool positions; pool is in rank order
        pool = [pool[p] for p in chosen]
    pool = pool[: spec.n]
    missing = [i for i in pool if i not in scaffolds]
    if missing:
        scaffolds.update(zip(missing, murcko_scaffolds(smiles_of(np.asarray(missing, dtype=np.int64)))))
    return np.asarray(pool, dtype=np.int64), [scaffolds[i] for i in pool]
