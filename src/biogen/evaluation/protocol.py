"""The benchmark protocol of Riniker & Landrum (J. Cheminform. 5, 26 (2013)) for one target.

For each ``n`` in ``n_queries`` and each repeat ``r``: draw ``n`` query actives and a
random ``decoy_fraction`` of the decoys (the training negatives of trained scorers), rank
the remaining actives plus the remaining decoys with every scorer, and compute AUROC,
EF1%, EF5% and BEDROC(20) (``biogen.screen.metrics.summary``). As in the platform's own
scripts (``scoring/calculate_scored_lists.py`` drops the whole training list, queries and
decoys, from the test list; ``percent_dcy`` = 0.2 for data sets I), similarity scorers
rank the same reduced list as trained ones: every scorer of a repeat is scored on
exactly the same molecules, and EF's ceiling (N / actives) is the same for all.

The draws depend only on ``(seed, dataset, target, n, r)`` (a ``numpy`` ``SeedSequence``),
never on the scorers, the worker or the order targets run in, so every scorer of a repeat
sees the same queries, and a rerun or a subset of targets reproduces the same numbers.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import numpy as np

from biogen.errors import ConfigError
from biogen.evaluation.scorers import NamedScorer, Split, TargetContext
from biogen.screen.metrics import summary

METRICS = ("auroc", "ef1", "ef5", "bedroc20")


@dataclass(frozen=True)
class ProtocolSpec:
    """n_queries: query-set sizes; repeats: draws per size; decoy_fraction: training decoys
    of trained scorers (removed from their ranked list); ml_repeats: repeats for trained
    scorers (``None``: all), the first ``ml_repeats`` draws, shared with the similarity ones."""

    n_queries: tuple[int, ...] = (5, 10, 20)
    repeats: int = 50
    seed: int = 42
    decoy_fraction: float = 0.2
    ml_repeats: int | None = None

    def __post_init__(self) -> None:
        if not self.n_queries or min(self.n_queries) < 1:
            raise ConfigError(f"n_queries={list(self.n_queries)} must be a non-empty list of sizes >= 1")
        if self.repeats < 1:
            raise ConfigError(f"repeats={self.repeats} must be >= 1")
        if not 0.0 < self.decoy_fraction < 1.0:
            raise ConfigError(f"decoy_fraction={self.decoy_fraction} must be in (0, 1)")
        if self.ml_repeats is not None and self.ml_repeats < 1:
            raise ConfigError(f"ml_repeats={self.ml_repeats} must be >= 1 (or null for all repeats)")


def draw_split(seed: int, dataset: str, target: str, n: int, repeat: int, n_actives: int, n_decoys: int,
               decoy_fraction: float) -> Split:
    """Query actives (indices 0..A-1) and training decoys (indices A..A+D-1) of one repeat."""
    if n >= n_actives:
        raise ConfigError(f"{dataset} {target}: {n} queries leave no active to find ({n_actives} actives)")
    ss = np.random.SeedSequence([seed, zlib.crc32(dataset.encode()), zlib.crc32(target.encode()), n, repeat])
    rq, rd = (np.random.default_rng(s) for s in ss.spawn(2))
    queries = np.sort(rq.choice(n_actives, size=n, replace=False))
    k = max(1, int(round(decoy_fraction * n_decoys)))
    decoys = n_actives + np.sort(rd.choice(n_decoys, size=k, replace=False))
    return Split(queries, decoys)


def evaluate_target(ctx: TargetContext, scorers: list[NamedScorer], spec: ProtocolSpec, dataset: str,
                    target: str) -> list[dict]:
    """One row per (scorer, n, repeat): the metrics, list sizes and the scorer's seconds."""
    a = ctx.n_actives
    d = ctx.labels.size - a
    rows = []
    for n in spec.n_queries:
        for r in range(spec.repeats):
            split = draw_split(spec.seed, dataset, target, n, r, a, d, spec.decoy_fraction)
            keep = np.ones(ctx.labels.size, dtype=bool)
            keep[split.queries] = False
            keep[split.train_decoys] = False
            ranked = np.flatnonzero(keep)  # the same list for every scorer: a paired comparison
            ctx.memo.clear()
            for s in scorers:
                if s.uses_decoys and spec.ml_repeats is not None and r >= spec.ml_repeats:
                    continue
                t0 = time.perf_counter()
                key = (s.scorer, ranked.size)  # a fusion's members reuse these scores
                if key not in ctx.memo:
                    ctx.memo[key] = s.scorer.score(ctx, split, ranked)
                scores = ctx.memo[key]
                seconds = time.perf_counter() - t0
                row = {"dataset": dataset, "target": target, "scorer": s.name, "n_queries": n, "repeat": r}
                row.update(summary(scores, ctx.labels[ranked]))
                row["seconds"] = seconds
                rows.append(row)
    return rows
