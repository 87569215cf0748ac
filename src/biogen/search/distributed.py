"""Search sharded across Ray actors: several GPUs, several nodes, or many CPU cores.

Each actor holds a ``SimilarityIndex`` over a contiguous slice of the library's shards
(uploaded once, when the actor starts). Queries are featurized once by the driver and
sent to every actor; per-actor hits are merged here: threshold hits are concatenated,
top-k lists are merged by (score descending, hit id) and cut to k, so the result equals
a single index over the whole library.

    with ray_session(RuntimeSpec()):
        with ShardedSearch("mylib", actors=2, engine="cpu") as s:
            hits = s.top_k(["CCO"], k=10)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from biogen.errors import ConfigError
from biogen.library.store import Library
from biogen.device import resolve_engine
from biogen.search.index import RESULT_SCHEMA, SimilarityIndex
from biogen.search.metrics import Metric
from biogen.search.queries import Queries, as_queries, check_compatible

log = logging.getLogger(__name__)


def split_shards(rows: Sequence[int], n: int) -> list[tuple[int, int]]:
    """Cut shards (row counts, in order) into at most ``n`` contiguous slices of similar size."""
    total = sum(rows)
    bounds, acc, start = [], 0, 0
    for i, r in enumerate(rows):
        acc += r
        if len(bounds) < n - 1 and acc >= total * (len(bounds) + 1) / n and i + 1 < len(rows):
            bounds.append((start, i + 1))
            start = i + 1
    bounds.append((start, len(rows)))
    return [b for b in bounds if b[1] > b[0]]


def merge_results(tables: list[pa.Table], k: int | None) -> pa.Table:
    """Merge per-actor result tables: order by query, score desc, hit id; top-k cut; ranks."""
    t = pa.concat_tables([x.select(RESULT_SCHEMA.names) for x in tables]) if tables else RESULT_SCHEMA.empty_table()
    if not t.num_rows:
        return t
    t = t.take(pc.sort_indices(t, [("query_index", "ascending"), ("score", "descending"), ("hit_id", "ascending")]))
    qi = t.column("query_index").to_numpy()
    first = np.searchsorted(qi, qi, side="left")
    rank = np.arange(len(qi)) - first + 1
    if k is not None:
        keep = rank <= k
        t, rank = t.filter(pa.array(keep)), rank[keep]
    return t.set_column(t.schema.get_field_index("rank"), "rank", pa.array(rank, pa.int32()))


def node_share(actors: int, cpus_per_actor: float, node_cpus: float) -> float:
    """The share of a node's memory one CPU search actor may take: 1 / the number of this
    search's actors that fit on the node (by CPUs), so that actors placed together do not
    each plan with half the node's memory."""
    fit = max(1, int(node_cpus // max(cpus_per_actor, 1e-9)))
    return 1.0 / max(1, min(actors, fit))


class _IndexActor:
    def __init__(self, path: str, shards: list[str], engine: str, workers: int | None,
                 part_bytes: int | None = None, actors: int = 1):
        share = 1.0
        if engine == "cpu" and part_bytes is None:
            import ray

            node = ray.get_runtime_context().get_node_id()
            cpus = next((n["Resources"].get("CPU", 1) for n in ray.nodes() if n["NodeID"] == node), 1)
            share = node_share(actors, workers or 1, cpus)
        self.index = SimilarityIndex.open(path, engine=engine, workers=workers, shards=shards, part_bytes=part_bytes,
                                          memory_share=share)

    def describe(self) -> tuple[int, bool]:
        """(rows, whether the index streams its slice in parts)."""
        return self.index.n_rows, self.index.streamed

    def search(self, queries: Queries, mode: str, k: int, threshold: float, metric: Metric) -> pa.Table:
        return self.index.search(queries, mode=mode, k=k, threshold=threshold, metric=metric)


class ShardedSearch:
    """Ray actors each searching a slice of a library's shards (needs a Ray session)."""

    def __init__(self, path: str | Path, actors: int, engine: str = "auto", workers: int | None = None,
                 part_bytes: int | None = None):
        """``part_bytes``: the memory each actor's index holds at once (it streams the rest);
        None: the engine's default, on the CPU divided among the actors a node holds."""
        import ray

        if actors < 1:
            raise ConfigError(f"actors={actors} must be >= 1")
        self.library = Library.open(path)
        self.engine = resolve_engine(engine)
        slices = split_shards([s.rows for s in self.library.shards], actors)
        per_actor = {"num_gpus": 1, "num_cpus": 1} if self.engine == "cuda" else {"num_cpus": workers or 1}
        have = ray.cluster_resources()
        for res, each in per_actor.items():  # more than the cluster has would wait forever: refuse
            key = "GPU" if res == "num_gpus" else "CPU"
            if actors * each > have.get(key, 0):
                raise ConfigError(
                    f"actors={actors} with engine={self.engine} needs {actors * each:g} {key}s but the Ray "
                    f"cluster has {have.get(key, 0):g}; use fewer actors"
                    + (", engine=cpu, or Ray nodes started with GPUs" if key == "GPU" else
                       " or fewer workers per actor, or add nodes"))
        cls = ray.remote(**per_actor)(_IndexActor)
        path = str(Path(path).absolute())
        self.actors = [cls.remote(path, [s.name for s in self.library.shards[a:b]], self.engine, workers, part_bytes,
                                  len(slices)) for a, b in slices]
        rows, self.streamed = (list(x) for x in zip(*ray.get([a.describe.remote() for a in self.actors])))
        log.info("%d search actors (%s) over %s: %s rows%s", len(self.actors), self.engine, path, rows,
                 f", streamed in parts: {self.streamed}" if any(self.streamed) else "")

    def queries(self, query, reader=None) -> Queries:
        q = as_queries(query, self.library.featurizer, self.library.standardize, reader)
        check_compatible(q, self.library.featurizer, f"library {self.library.path}")
        return q

    def search(self, query, mode: str = "topk", k: int = 10, threshold: float = 0.7,
               metric: Metric | None = None) -> pa.Table:
        import ray

        q = self.queries(query)
        metric = metric or Metric()
        q_ref = ray.put(q)
        parts = ray.get([a.search.remote(q_ref, mode, k, threshold, metric) for a in self.actors])
        return merge_results(parts, k if mode == "topk" else None)

    def top_k(self, query, k: int = 10, metric: Metric | None = None) -> pa.Table:
        return self.search(query, "topk", k=k, metric=metric)

    def threshold(self, query, threshold: float, metric: Metric | None = None) -> pa.Table:
        return self.search(query, "threshold", threshold=threshold, metric=metric)

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
