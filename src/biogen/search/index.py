"""``SimilarityIndex``: top-k and threshold search of a library, on the CPU or a GPU.

    index = SimilarityIndex.open("mylib", engine="auto")
    hits = index.top_k(["CCOc1ccccc1"], k=10)                     # pyarrow.Table
    hits = index.threshold("queries.smi", 0.7, metric=Metric("dice"))

The index reads the library's shards once, groups them into *parts* (each part's rows
re-sorted by popcount, so a popcount interval is one row interval) and builds one
engine per part. A library larger than the memory budget of the engine is streamed:
parts are loaded (uploaded to the GPU) one after another for each search. Results of
parts are merged here, so the engines only implement ``candidates``.

Result table (one row per hit): ``query_index`` (int32), ``query_id``, ``rank``
(1-based within the query), ``hit_id``, ``score`` (float64, RDKit's value),
``smiles`` (the hit's canonical SMILES), ``library_row`` (int64, row in library order).
Rows are ordered by query, then score descending, then hit id: ties are deterministic.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.readers import ReaderOptions
from biogen.chem.standardize import StandardizeSpec
from biogen.device import resolve_engine
from biogen.errors import ConfigError
from biogen.kernels.cpu import select_top_k
from biogen.search.cpu import default_workers
from biogen.search.metrics import Metric
from biogen.search.plan import popcount_starts, rows_of, threshold_plan
from biogen.search.queries import Queries, as_queries, check_compatible

log = logging.getLogger(__name__)

RESULT_SCHEMA = pa.schema([
    ("query_index", pa.int32()), ("query_id", pa.string()), ("rank", pa.int32()),
    ("hit_id", pa.string()), ("score", pa.float64()), ("smiles", pa.string()),
    ("library_row", pa.int64()),
])
FIRST_ROUND_ROWS = 4096  # rows scanned by the first top-k round (at least 4k)
SPECULATE_ROWS = 32768  # rows scanned exactly around a query before its speculative scan
SPECULATE_MARGIN = 4  # speculative threshold: the score ranked 4x the expected share of k


@dataclass
class _Part:
    """A group of rows searched by one engine: fps N x W, pcs N (sorted), rows N (library rows)."""

    fps: np.ndarray
    pcs: np.ndarray
    rows: np.ndarray
    starts: np.ndarray


def _make_part(blocks: list[tuple[np.ndarray, np.ndarray, int]], nbits: int) -> _Part:
    """Merge blocks ``(fps, pcs, first position)`` into one part sorted by popcount.

    Blocks from a library are already sorted (shards are), which the stable sort merges
    in about linear time; in-memory fingerprints may come in any order. Each block's rows
    are scattered straight into the part (one copy of the fingerprints, not a concatenation
    and then a sorted copy of it: the part's peak is its own size).
    """
    pcs = np.concatenate([np.asarray(b[1]) for b in blocks])
    order = np.argsort(pcs, kind="stable")  # sorted runs: timsort merges them in ~linear time
    dest = np.empty(len(order), dtype=np.int64)  # the sorted position of each block row
    dest[order] = np.arange(len(order))
    rows = np.concatenate([np.arange(b[2], b[2] + len(b[1]), dtype=np.int64) for b in blocks])[order]
    words = blocks[0][0].shape[1] if blocks and np.ndim(blocks[0][0]) == 2 else 0
    fps = np.empty((len(order), words), dtype=np.uint64)
    at = 0
    for b in blocks:
        n = len(b[1])
        fps[dest[at:at + n]] = b[0]
        at += n
    return _Part(fps, np.ascontiguousarray(pcs[order], dtype=np.int32), rows, popcount_starts(pcs[order], nbits))


class SimilarityIndex:
    """Similarity search over fingerprints sorted by popcount (see module docstring)."""

    def __init__(self, blocks, spec: FingerprintSpec, ids: pa.Array, smiles: pa.Array | None,
                 *, standardize: StandardizeSpec | None = None, engine: str = "auto",
                 workers: int | None = None, part_bytes: int | None = None, name: str = "fingerprints",
                 device: int | None = None, memory_share: float = 1.0):
        """``blocks``: list of ``(fps N_i x W uint64, pcs N_i int32 sorted, first library row)``.
        ``part_bytes``: the memory one part of the index may hold (the rest is streamed);
        None: half the host's available memory (CPU engine) or 70% of the GPU's free memory,
        times ``memory_share`` (the share of it this index may take: 1/n for n indexes, e.g.
        search actors, on one host)."""
        self.spec = spec
        self.standardize = standardize or StandardizeSpec()
        self.name = name
        self.engine_name = resolve_engine(engine)
        self.workers = workers
        self._host_workers = max(1, int(workers or default_workers()))  # threads for host-side selection
        self.device = device
        self.ids = ids
        self.smiles = smiles
        self.n_rows = len(ids)
        self._id_rank = np.empty(self.n_rows, np.int64)
        self._id_rank[np.asarray(pc.sort_indices(ids))] = np.arange(self.n_rows)
        budget = part_bytes or int(self._default_part_bytes() * memory_share)
        if part_bytes is None and self.engine_name == "cpu":  # host memory: the per-row state above stays
            budget = max(budget - self.resident_bytes(), budget // 4)
        row_bytes = self.part_row_bytes(spec, self.engine_name)
        groups: list[list] = [[]]
        size = 0
        for blk in blocks:
            if groups[-1] and size + len(blk[1]) * row_bytes > budget:
                groups.append([])
                size = 0
            groups[-1].append(blk)
            size += len(blk[1]) * row_bytes
        self._groups = [g for g in groups if g and sum(len(b[1]) for b in g)]
        self.streamed = len(self._groups) > 1
        if self.streamed:
            log.warning("%s: %d rows exceed the %s engine's memory budget of %.1f GiB: searches "
                        "stream %d parts (set part_bytes to change the budget)", name, self.n_rows,
                        self.engine_name, budget / 2**30, len(self._groups))
        self.speculation = {"complete": 0, "failed": 0}  # top-k speculative scans, by outcome
        self._resident: list[tuple[_Part, object]] | None = None
        if not self.streamed:
            self._resident = [self._load(g) for g in self._groups]

    # ------------------------------------------------------------------ construction
    @classmethod
    def open(cls, path: str | Path, engine: str = "auto", workers: int | None = None,
             shards: Sequence[str] | None = None, part_bytes: int | None = None,
             device: int | None = None, memory_share: float = 1.0) -> "SimilarityIndex":
        """Index a library directory (all shards, or the named ones)."""
        from biogen.library.store import Library

        lib = Library.open(path)
        return cls.from_library(lib, engine=engine, workers=workers, shards=shards,
                                part_bytes=part_bytes, device=device, memory_share=memory_share)

    @classmethod
    def from_library(cls, lib, engine: str = "auto", workers: int | None = None,
                     shards: Sequence[str] | None = None, part_bytes: int | None = None,
                     device: int | None = None, memory_share: float = 1.0) -> "SimilarityIndex":
        chosen = lib.shards
        if shards is not None:
            known = {s.name for s in lib.shards}
            missing = sorted(set(shards) - known)
            if missing:
                raise ConfigError(f"shards {missing} are not in library {lib.path}")
            chosen = [s for s in lib.shards if s.name in set(shards)]
        offsets = dict(zip([s.name for s in lib.shards], np.cumsum([0] + [s.rows for s in lib.shards])))
        blocks, ids, smiles, pos = [], [], [], 0
        for s in chosen:  # block rows are positions 0..n-1 in ids/smiles
            blocks.append((s.fingerprints, s.popcounts, pos))
            pos += s.rows
            meta = s.metadata(["id", "smiles"])
            ids.append(meta.column("id"))
            smiles.append(meta.column("smiles"))
        row_ids = pa.chunked_array(ids, pa.string()).combine_chunks() if ids else pa.array([], pa.string())
        row_smiles = pa.chunked_array(smiles, pa.string()).combine_chunks() if smiles else pa.array([], pa.string())
        index = cls(blocks, lib.featurizer, row_ids, row_smiles, standardize=lib.standardize,
                    engine=engine, workers=workers, part_bytes=part_bytes, name=str(lib.path),
                    device=device, memory_share=memory_share)
        index.library_rows = np.concatenate(
            [np.arange(offsets[s.name], offsets[s.name] + s.rows, dtype=np.int64) for s in chosen]
        ) if chosen else np.zeros(0, np.int64)
        index.library_version = lib.manifest.get("featurizer", {}).get("rdkit_version")
        _warn_rdkit_version(index.library_version, lib.path)
        return index

    @classmethod
    def from_fingerprints(cls, fps: np.ndarray, spec: FingerprintSpec, ids: Sequence[str] | None = None,
                          smiles: Sequence[str] | None = None, engine: str = "auto",
                          workers: int | None = None, part_bytes: int | None = None) -> "SimilarityIndex":
        """Index in-memory fingerprints (N x W uint64, any order) with optional ids/SMILES."""
        from biogen.chem.fingerprints import popcounts

        fps = np.ascontiguousarray(fps, dtype=np.uint64).reshape(-1, spec.n_words)
        pcs = popcounts(fps)
        ids = pa.array([str(i) for i in ids] if ids is not None else [str(i) for i in range(len(fps))], pa.string())
        smi = pa.array(list(smiles), pa.string()) if smiles is not None else None
        return cls([(fps, pcs, 0)], spec, ids, smi, engine=engine, workers=workers, part_bytes=part_bytes)

    library_rows: np.ndarray | None = None  # position -> row in library order (set by from_library)
    library_version: str | None = None

    def resident_bytes(self) -> int:
        """Bytes this index holds per row outside its parts: ids, SMILES, the id ranks and the
        library rows (~0.3 KB/row for MOSES-like molecules)."""
        text = self.ids.nbytes + (self.smiles.nbytes if self.smiles is not None else 0)
        return int(text + 16 * self.n_rows)

    @staticmethod
    def part_row_bytes(spec: FingerprintSpec, engine: str) -> int:
        """A part's peak bytes per row. CPU (host memory): the fingerprint words, the shard
        pages the build reads (memory-mapped: resident while it reads them), the engine's
        block sketch (1/8 of the words), popcounts, library rows and the sort's permutations
        (~40 B). CUDA (device memory): the words and the popcount."""
        words = spec.n_words * 8
        return words + 8 if engine == "cuda" else 2 * words + words // 8 + 40

    def _default_part_bytes(self) -> int:
        if self.engine_name == "cuda":
            from biogen.search.cuda import free_device_bytes

            return int(free_device_bytes(self.device) * 0.7)
        import psutil

        return int(psutil.virtual_memory().available * 0.5)

    def _load(self, group) -> tuple[_Part, object]:
        part = _make_part(group, self.spec.stored_bits)
        if self.engine_name == "cuda":
            from biogen.search.cuda import CudaEngine

            engine = CudaEngine(part.fps, part.pcs, device=self.device)
        else:
            from biogen.search.cpu import CpuEngine

            engine = CpuEngine(part.fps, part.pcs, workers=self.workers)
        return part, engine

    def _parts(self):
        if self._resident is not None:
            yield from self._resident
            return
        for g in self._groups:
            part, engine = self._load(g)
            try:
                yield part, engine
            finally:  # before the next part is built: the caller's loop variable still refers to this one
                engine.close()
                part.fps = part.pcs = part.rows = None
                del part, engine

    def close(self) -> None:
        for _, engine in self._resident or []:
            engine.close()
        self._resident = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return self.n_rows

    def __repr__(self) -> str:
        return f"SimilarityIndex({self.name!r}, rows={self.n_rows}, engine={self.engine_name})"

    # ------------------------------------------------------------------ queries
    def queries(self, query, reader: ReaderOptions | None = None) -> Queries:
        """Featurize ``query`` with this index's parameters (see ``as_queries``)."""
        q = as_queries(query, self.spec, self.standardize, reader)
        check_compatible(q, self.spec, f"library {self.name}")
        return q

    # ------------------------------------------------------------------ search
    def threshold(self, query, threshold: float, metric: Metric | None = None) -> pa.Table:
        """Every library molecule whose score is >= ``threshold``, for each query."""
        metric = metric or Metric()
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold={threshold} must lie in [0, 1]")
        q = self.queries(query)
        min_common = metric.min_common(q.popcount, threshold, self.spec.stored_bits)  # same for every part
        found = []
        for part, engine in self._parts():
            row_lo, row_hi = rows_of(min_common, part.starts)
            qi, r, c = engine.candidates(q.fps, min_common, row_lo, row_hi)
            found.append(self._scored(part, q, metric, qi, r, c))
        return self._table(q, _sort(_concat(found)))

    def top_k(self, query, k: int = 10, metric: Metric | None = None) -> pa.Table:
        """The ``k`` best library molecules for each query (ties broken by hit id)."""
        metric = metric or Metric()
        if k < 1:
            raise ConfigError(f"k={k} must be >= 1")
        q = self.queries(query)
        floor = np.zeros(len(q))  # k-th best score found so far, per query (over parts)
        found = []
        for part, engine in self._parts():
            if not len(q):
                break
            best = self._top_k_part(part, engine, q, k, metric, floor)
            merged = _select_top_k(_concat(found + [best]), k, self._host_workers)
            found = [merged]
            floor = _kth_best(merged[0], merged[2], len(q), k)
        return self._table(q, _concat(found))

    def _top_k_part(self, part: _Part, engine, q: Queries, k: int, metric: Metric, floor: np.ndarray):
        """Top-k of one part by threshold scans whose threshold tightens as hits are found.

        Rows are scanned outward from each query's own popcount (the highest bounds) in
        windows growing 2x per round; after each round the threshold becomes the k-th
        best score so far, which narrows both the popcount range still worth scanning and
        the block bound inside the kernel. Exact: a row skipped in a later round
        scores below a threshold that k rows already reach (ties kept by ``>=``).

        Once ``SPECULATE_ROWS`` rows around a query are scanned, the rest of its range is
        scanned once at a *speculative* threshold: the score that ranks
        ``SPECULATE_MARGIN`` times the expected share of the k hits among the rows seen
        (well below the final k-th score for most queries, and far above the k-th score so
        far). If k rows reach it, the answer is complete (every row not found scores below
        it). Otherwise the speculative hits are dropped and the exact rounds go on from
        where they were, with the k-th best of everything seen as the threshold.
        """
        nbits, nq = self.spec.stored_bits, len(q)
        centre = part.starts[np.minimum(q.popcount, nbits)]
        left, right = centre.copy(), centre.copy()  # scanned rows: [left, right)
        t = floor.copy()
        size = max(4 * k, FIRST_ROUND_ROWS)
        best = _concat([])
        done = np.zeros(nq, bool)  # finished by a speculative scan
        tried = np.zeros(nq, bool)  # speculation tried (once per query)
        while True:
            plan = threshold_plan(metric, q.popcount, t, nbits, part.starts)
            lo, hi = _clip_to_centre(plan, centre)
            todo = ~done & ((left > lo) | (right < hi))
            if not todo.any():
                return best
            spec = todo & ~tried & (right - left >= SPECULATE_ROWS)
            if spec.any():
                tried |= spec
                rank = np.ceil(SPECULATE_MARGIN * k * (right - left) / np.maximum(hi - lo, 1)).astype(np.int64)
                t_spec = np.maximum(_kth_best(best[0], best[2], nq, np.minimum(rank, k), per_query=True), t)
                spec &= (rank < k) & (t_spec > t)
            if spec.any():
                s_plan = threshold_plan(metric, q.popcount, np.where(spec, t_spec, 1.0), nbits, part.starts)
                s_lo, s_hi = _clip_to_centre(s_plan, centre)
                idx = np.flatnonzero(spec)
                found = self._scan_outside(part, engine, q, metric, idx, s_plan.min_common[idx],
                                           s_lo[idx], left[idx], right[idx], s_hi[idx])
                union = _select_top_k(_concat([best, found]), k, self._host_workers)
                kth = _kth_best(union[0], union[2], nq, k)
                ok = spec & (kth >= t_spec)
                failed = spec & ~ok
                kept = tuple(x[~failed[found[0]]] for x in found)  # failed: re-found by rounds
                best = _select_top_k(_concat([best, kept]), k, self._host_workers)
                done |= ok
                self.speculation["complete"] += int(ok.sum())
                self.speculation["failed"] += int(failed.sum())
                t = np.maximum(t, np.where(failed, kth, t))  # k rows seen reach it: still exact
                continue
            new_left = np.where(todo, np.maximum(lo, left - size // 2), left)
            new_right = np.where(todo, np.minimum(hi, right + size // 2), right)
            idx = np.flatnonzero(todo)
            found = self._scan_outside(part, engine, q, metric, idx, plan.min_common[idx],
                                       new_left[idx], left[idx], right[idx], new_right[idx])
            best = _select_top_k(_concat([best, found]), k, self._host_workers)
            t = np.maximum(t, _kth_best(best[0], best[2], nq, k))
            left, right = new_left, new_right
            size *= 2

    def _scan_outside(self, part: _Part, engine, q: Queries, metric: Metric, idx, min_common,
                      lo, left, right, hi):
        """Hits of queries ``idx`` in rows [lo, left) and [right, hi): two windows per query."""
        n = len(idx)
        qi, r, c = engine.candidates(np.concatenate([q.fps[idx], q.fps[idx]]),
                                     np.concatenate([min_common, min_common]),
                                     np.concatenate([lo, right]), np.concatenate([left, hi]))
        qi = idx[np.where(qi >= n, qi - n, qi)].astype(np.int32)
        return self._scored(part, q, metric, qi, r, c)

    def search(self, query, mode: str = "topk", k: int = 10, threshold: float = 0.7,
               metric: Metric | None = None) -> pa.Table:
        if mode == "topk":
            return self.top_k(query, k, metric)
        if mode == "threshold":
            return self.threshold(query, threshold, metric)
        raise ConfigError(f"mode={mode!r} is not valid for similarity search; choose topk or threshold")

    # ------------------------------------------------------------------ helpers
    def _scored(self, part: _Part, q: Queries, metric: Metric, qi, r, c):
        """(query index, position in ids, score, id rank) of candidate pairs."""
        score = metric.score(c, q.popcount[qi], part.pcs[r])
        pos = part.rows[r]
        return qi.astype(np.int32), pos, score, self._id_rank[pos]

    def _table(self, q: Queries, found) -> pa.Table:
        """Result table of hits already in (query, score desc, id) order."""
        qi, pos, score, _ = found
        lib_rows = self.library_rows[pos] if self.library_rows is not None else pos
        return result_table(q.ids, qi, pos, score, self.ids, self.smiles, lib_rows)


def result_table(query_ids: Sequence[str], qi: np.ndarray, pos: np.ndarray, score: np.ndarray, ids: pa.Array,
                 smiles: pa.Array | None, library_rows: np.ndarray) -> pa.Table:
    """The hits table (``RESULT_SCHEMA``) of hits already in (query, score desc, tie) order:
    ``pos`` indexes ``ids``/``smiles``; ranks are numbered within each query."""
    starts = np.searchsorted(qi, np.arange(len(query_ids)))
    rank = np.arange(len(qi)) - starts[qi] + 1 if len(qi) else np.zeros(0, np.int64)
    take = pa.array(pos, pa.int64())
    return pa.table({
        "query_index": pa.array(qi, pa.int32()),
        "query_id": pa.array(np.asarray(query_ids, dtype=object)[qi] if len(qi) else [], pa.string()),
        "rank": pa.array(rank, pa.int32()),
        "hit_id": ids.take(take),
        "score": pa.array(score, pa.float64()),
        "smiles": smiles.take(take) if smiles is not None else pa.nulls(len(qi), pa.string()),
        "library_row": pa.array(library_rows, pa.int64()),
    }, schema=RESULT_SCHEMA)


def _warn_rdkit_version(version: str | None, path) -> None:
    from rdkit import rdBase

    if version and version != rdBase.rdkitVersion:
        log.warning("library %s was featurized with RDKit %s, queries use RDKit %s: fingerprints of "
                    "the same molecule may differ between versions", path, version, rdBase.rdkitVersion)


def _concat(parts):
    if not parts:
        return (np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    return tuple(np.concatenate(x) for x in zip(*parts))


def _sort(found):
    qi, pos, score, key = found
    order = np.lexsort((key, -score, qi))  # query, score descending, then hit id
    return qi[order], pos[order], score[order], key[order]


SELECT_PARALLEL_PAIRS = 1 << 18  # candidate sets this large are selected by query ranges in threads


def _select_top_k(found, k: int, workers: int = 1):
    """The first ``k`` rows per query in (query, score desc, id) order, from a candidate set."""
    qi, pos, score, key = found
    if not len(qi):
        return found
    args = (np.ascontiguousarray(qi, dtype=np.int32), np.ascontiguousarray(score, dtype=np.float64),
            np.ascontiguousarray(key, dtype=np.int64))
    nq = int(qi.max()) + 1
    if workers > 1 and len(qi) >= SELECT_PARALLEL_PAIRS and nq > 1:
        edges = np.linspace(0, nq, min(workers, nq) + 1).astype(np.int64)
        parts = _selection_pool(workers).map(
            lambda r: select_top_k(*args, int(r[0]), int(r[1]), int(k)), zip(edges[:-1], edges[1:]))
        take = np.concatenate(list(parts))
    else:
        take = select_top_k(*args, 0, nq, int(k))
    return qi[take], pos[take], score[take], key[take]


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _selection_pool(workers: int) -> ThreadPoolExecutor:
    """A shared thread pool for the selection kernel (it releases the GIL)."""
    if workers not in _POOLS:
        _POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="biogen-select")
    return _POOLS[workers]


def _kth_best(qi: np.ndarray, score: np.ndarray, nq: int, k, per_query: bool = False) -> np.ndarray:
    """Per query, the k-th best score among (qi, score) pairs; 0.0 where fewer than k.

    The pairs come in ``_select_top_k`` order (query, then score descending). ``k`` is
    one rank for all queries, or one per query with ``per_query=True``.
    """
    out = np.zeros(nq)
    if not len(qi):
        return out
    kk = np.asarray(k, dtype=np.int64) if per_query else np.full(nq, k, dtype=np.int64)
    starts = np.searchsorted(qi, np.arange(nq), side="left")
    ends = np.searchsorted(qi, np.arange(nq), side="right")
    has = (kk >= 1) & (ends - starts >= kk)
    out[has] = score[starts[has] + kk[has] - 1]
    return out


def _clip_to_centre(plan, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each query's rows worth scanning [lo, hi), widened to contain its centre row
    (a query whose popcount range is empty gets the empty range at its centre)."""
    none = plan.row_hi <= plan.row_lo
    lo = np.where(none, centre, np.minimum(plan.row_lo, centre))
    hi = np.where(none, centre, np.maximum(plan.row_hi, centre))
    return lo, hi
