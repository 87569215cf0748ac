"""Exact search over a library's stored compound embeddings (``space=minimol``).

    index = EmbeddingIndex.open("mylib", "minimol")            # metric cosine, device auto
    hits = index.top_k(["CCOc1ccccc1"], k=10)                  # same table as fingerprint search
    hits = index.threshold("queries.smi", 0.9)

Queries are standardized with the library's own settings and embedded by the same model
(its version and weights hash must equal the stored ones: vectors of two models are never
compared), then rounded to the stored dtype, so a library molecule found by its own SMILES
scores 1.0. Scores are computed in float32 (TF32 off) block by block, one matrix product
of all queries against a block of library rows; the full queries x library matrix is never
built. Top-k on the CPU folds each block into a running heap per query (a Numba kernel,
threads over queries: one comparison rejects most scores, as faiss does); on a GPU each
block's candidates are selected on the device (``torch.topk`` + every score tied with the
k-th). Both are exact, ties broken by library row. Rows
without a vector (the model could not handle the molecule) are never hits.

metric: ``cosine`` (vectors L2-normalised) or ``dot`` (raw inner product).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from biogen.chem.readers import ReaderOptions
from biogen.chem.records import Reject
from biogen.errors import ConfigError, LibraryError
from biogen.search.index import result_table

log = logging.getLogger(__name__)

METRICS = ("cosine", "dot")
BLOCK_ROWS = 1 << 16       # library rows per matrix product
REDUCE_EVERY = 16          # blocks between reductions of the running candidates
HEAP_ROWS = 4096           # CPU top-k: library rows per product + heap pass (a 16 MB score tile for 1,000
                           # queries, not 256 MB: the same speed measured from 1,024 to 65,536 rows)


@dataclass
class EmbeddingQueries:
    """Q query vectors (float32, rounded through the library's storage dtype)."""

    vectors: np.ndarray
    ids: list[str]
    smiles: list[str | None]
    rejects: list[Reject] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class _Block:
    vectors: object          # torch tensor [b, d] on the device (normalised for cosine)
    rows: np.ndarray         # library row of each vector (rows without a vector left out)


class EmbeddingIndex:
    """A library's embeddings of one model, held as float32 blocks on ``device``."""

    def __init__(self, library, model: str, metric: str = "cosine", device: str = "auto",
                 keep: np.ndarray | None = None):
        """keep: optional bool mask over library rows (library order); only those rows are
        searched (e.g. the molecules that passed a screen's filters)."""
        import torch

        from biogen.device import resolve_device

        if metric not in METRICS:
            raise ConfigError(f"metric={metric!r} is not valid for embedding search; choose {' or '.join(METRICS)}")
        self.library = library
        self.model_name = model
        self.entry = library.embedding_entry(model)   # LibraryError naming `library embed` if absent
        self.metric = metric
        self.device = torch.device(resolve_device(device))
        self.storage_dtype = np.dtype(self.entry["dtype"])
        self._model = None
        meta = library.read_metadata(["id", "smiles"])
        self.ids = meta.column("id")
        self.smiles = meta.column("smiles")
        self.blocks: list[_Block] = []
        pending: list[tuple[np.ndarray, np.ndarray]] = []  # (vectors, library rows) not yet in a block
        offset = 0
        for shard, vectors, ok in library.iter_embeddings(model):
            # shards (often 10,000 rows) are joined into blocks of BLOCK_ROWS: one product each
            for start in range(0, shard.rows, BLOCK_ROWS):
                live = ok[start:start + BLOCK_ROWS]
                if keep is not None:
                    live = live & keep[offset + start:offset + start + len(live)]
                sel = np.flatnonzero(live)
                pending.append((np.asarray(vectors[start:start + BLOCK_ROWS][sel], dtype=np.float32),
                                offset + start + sel))
                if sum(len(r) for _, r in pending) >= BLOCK_ROWS:
                    self._add_block(pending)
                    pending = []
            offset += shard.rows
        if pending:
            self._add_block(pending)
        self.n_vectors = sum(len(b.rows) for b in self.blocks)

    def _add_block(self, pending: list[tuple[np.ndarray, np.ndarray]]) -> None:
        import torch

        v = torch.from_numpy(np.concatenate([p[0] for p in pending]))
        self.blocks.append(_Block(self._prepare(v).to(self.device), np.concatenate([p[1] for p in pending])))

    @classmethod
    def open(cls, path: str | Path, model: str, metric: str = "cosine", device: str = "auto") -> "EmbeddingIndex":
        from biogen.embeddings.base import check_model_name
        from biogen.library.store import Library

        return cls(Library.open(path), check_model_name(model), metric, device)

    def __len__(self) -> int:
        return self.n_vectors

    def _prepare(self, v):
        import torch

        return torch.nn.functional.normalize(v, dim=1) if self.metric == "cosine" else v

    # ------------------------------------------------------------------ queries
    def model(self):
        """The query model, checked to be the one that made the stored vectors."""
        if self._model is None:
            from biogen.embeddings.base import load_model

            m = load_model(self.model_name, device=str(self.device), dtype="float32")
            ident = m.identity()
            diff = [k for k in ("version", "dim", "weights_sha256") if ident[k] != self.entry[k]]
            if diff:
                raise LibraryError(
                    f"library {self.library.path} stores {self.model_name} embeddings of "
                    + ", ".join(f"{k} {self.entry[k]!r}" for k in diff) + "; the installed model has "
                    + ", ".join(f"{k} {ident[k]!r}" for k in diff) + ": vectors of two models are not comparable. "
                    f"Install the model the library was embedded with, or re-embed it (biogen library embed "
                    f"library={self.library.path} model={self.model_name} overwrite=true)")
            self._model = m
        return self._model

    def queries(self, query, reader: ReaderOptions | None = None) -> EmbeddingQueries:
        """SMILES (one or a list), a molecule file or another library -> query vectors.
        Molecules that cannot be read, standardized or embedded become rejects."""
        from biogen.library.store import Library
        from biogen.search.queries import as_queries

        if isinstance(query, EmbeddingQueries):
            return query
        lib = query if isinstance(query, Library) else None
        if lib is None and isinstance(query, (str, Path)) and (Path(str(query)) / "manifest.json").is_file():
            lib = Library.open(query)
        if lib is not None and self.model_name in lib.embedding_models:
            return self._library_queries(lib)
        q = as_queries(query, self.library.featurizer, self.library.standardize, reader)
        out = self.model().embed(q.smiles)
        rejects = list(q.rejects)
        for i, reason in sorted(out.reasons.items()):
            rejects.append(Reject("<query>", i + 1, f"{self.model_name}_failed",
                                  f"{self.model_name} cannot embed this molecule: {reason}", q.smiles[i] or "", q.ids[i]))
        keep = np.flatnonzero(out.ok)
        v = out.vectors[keep].astype(self.storage_dtype).astype(np.float32)
        return EmbeddingQueries(v, [q.ids[i] for i in keep], [q.smiles[i] for i in keep], rejects)

    def _library_queries(self, lib) -> EmbeddingQueries:
        entry = lib.embedding_entry(self.model_name)
        diff = [k for k in ("version", "dim", "weights_sha256") if entry[k] != self.entry[k]]
        if diff:
            raise LibraryError(f"query library {lib.path} and library {self.library.path} hold {self.model_name} "
                               f"embeddings of different {', '.join(diff)}: not comparable")
        meta = lib.read_metadata(["id", "smiles"])
        vec, keep = [], []
        offset = 0
        for shard, v, ok in lib.iter_embeddings(self.model_name):
            vec.append(np.asarray(v[ok], dtype=np.float32))
            keep.append(offset + np.flatnonzero(ok))
            offset += shard.rows
        keep_all = np.concatenate(keep) if keep else np.zeros(0, np.int64)
        ids, smiles = meta.column("id").to_pylist(), meta.column("smiles").to_pylist()
        return EmbeddingQueries(np.concatenate(vec) if vec else np.zeros((0, self.entry["dim"]), np.float32),
                                [ids[i] for i in keep_all], [smiles[i] for i in keep_all])

    # ------------------------------------------------------------------ search
    def search(self, query, mode: str = "topk", k: int = 10, threshold: float = 0.9,
               reader: ReaderOptions | None = None) -> pa.Table:
        """``mode``: topk (``k`` per query) or threshold (every score >= ``threshold``)."""
        run = {"topk": lambda: self.top_k(query, k, reader), "threshold": lambda: self.threshold(query, threshold, reader)}
        if mode not in run:
            raise ConfigError(f"mode={mode!r} is not valid for embedding search; choose topk or threshold")
        return run[mode]()

    def top_k(self, query, k: int = 10, reader: ReaderOptions | None = None) -> pa.Table:
        if int(k) < 1:
            raise ConfigError(f"k={k} must be >= 1")
        q = self.queries(query, reader)
        return self._table(q, self._scan(q, int(k), None))

    def threshold(self, query, threshold: float, reader: ReaderOptions | None = None) -> pa.Table:
        q = self.queries(query, reader)
        return self._table(q, self._scan(q, None, float(threshold)))

    def _scan(self, q: EmbeddingQueries, k: int | None, threshold: float | None):
        import torch

        if not len(q) or not self.blocks:
            return _empty()
        with torch.inference_mode():
            qv = self._prepare(torch.from_numpy(np.ascontiguousarray(q.vectors))).to(self.device)
        return exact_scan(qv, ((b.vectors, b.rows) for b in self.blocks), k, threshold)

    def _table(self, q: EmbeddingQueries, found) -> pa.Table:
        qi, rows, score = found
        return result_table(q.ids, qi, rows, score, self.ids, self.smiles, rows)


def exact_scan(qv, blocks, k: int | None = None, threshold: float | None = None):
    """Exact search of the query vectors ``qv`` (torch [Q, d], prepared: normalised for
    cosine) over ``blocks``, an iterable of (vectors: torch [b, d] on qv's device, library
    row of each: int array). ``k``: the k best per query (every score tied with the k-th
    kept up to the cut, ties by row); else every score >= ``threshold``. Returns (query
    index int32, library row, score float64) in (query, score desc, row) order. Scores are
    float32 products with TF32 off; the Q x library matrix is never built (one block's at
    a time, candidates reduced every REDUCE_EVERY blocks)."""
    import torch

    if k is not None and qv.device.type == "cpu":
        return _cpu_top_k(qv, blocks, k)
    found = []
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # exact float32 products
    try:
        with torch.inference_mode():
            buf = None
            for vectors, rows in blocks:
                if qv.device.type == "cpu":  # one output buffer: no fresh pages per block
                    if buf is None or buf.shape[1] < len(rows):
                        buf = np.empty((len(qv), max(len(rows), BLOCK_ROWS)), dtype=np.float32)
                s = _scores(qv, vectors, buf if qv.device.type == "cpu" else None)
                qi, c, score = _select(s, k) if k is not None else _above(s, threshold)
                found.append((qi, np.asarray(rows)[c], score))
                if k is not None and len(found) >= REDUCE_EVERY:
                    found = [_best(_concat(found), k)]
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    out = _concat(found)
    return _best(out, k) if k is not None else _order(out)


def _cpu_top_k(qv, blocks, k: int):
    """The CPU top-k: each block's float32 product by BLAS into one reused buffer, folded
    into a running heap per query (``kernels.cpu.heap_top_k``, threads over query ranges,
    the GIL released): no per-block candidate lists, no sort of them."""
    import torch

    from biogen.kernels.cpu import NO_ROW, heap_top_k
    from biogen.search.index import _selection_pool

    n_q = len(qv)
    heap_s = np.full((n_q, k), -np.inf, dtype=np.float32)
    heap_r = np.full((n_q, k), NO_ROW, dtype=np.int64)
    threads = max(1, min(torch.get_num_threads(), n_q))
    cuts = np.linspace(0, n_q, threads + 1).astype(np.int64)
    pool = _selection_pool(threads) if threads > 1 else None
    sub = HEAP_ROWS
    buf = np.empty((n_q, sub), dtype=np.float32)
    with torch.inference_mode():
        for vectors, rows in blocks:
            rows = np.ascontiguousarray(rows, dtype=np.int64)
            for j in range(0, len(rows), sub):  # a score tile the heap pass reads back from cache
                s = _scores(qv, vectors[j:j + sub], buf).numpy()
                r = rows[j:j + sub]
                if pool is None:
                    heap_top_k(s, r, heap_s, heap_r, 0, n_q)
                else:
                    list(pool.map(lambda t: heap_top_k(s, r, heap_s, heap_r, cuts[t], cuts[t + 1]), range(threads)))
    qi = np.repeat(np.arange(n_q, dtype=np.int32), k)
    rows, score = heap_r.reshape(-1), heap_s.reshape(-1).astype(np.float64)
    live = rows != NO_ROW
    return _order((qi[live], rows[live], score[live]))


def _scores(qv, vectors, buf: np.ndarray | None):
    """Q x B float32 scores. On the CPU numpy's BLAS into ``buf`` (measured faster than
    torch's here: 0.36 vs 0.50 s for 1,000 x 65,536 x 512 on 2 cores), on a GPU torch
    (TF32 off)."""
    import torch

    if buf is not None:
        out = buf[:, :len(vectors)]
        np.matmul(qv.numpy(), vectors.numpy().T, out=out)
        return torch.from_numpy(out)
    return qv @ vectors.T


def _select(s, k: int):
    """Each row's k best columns of the score block ``s`` (torch, any device) and every
    column tied with its k-th: ``topk(k+1)`` per row; a row whose (k+1)-th score equals its
    k-th (a tie across the cut, rare but exact) is rescanned for all columns >= the k-th."""
    import torch

    n_q, n_c = s.shape
    kk = min(k, n_c)
    if kk == n_c:  # the block holds fewer rows than k: all of them
        qi = np.repeat(np.arange(n_q, dtype=np.int32), n_c)
        return qi, np.tile(np.arange(n_c), n_q), s.reshape(-1).cpu().numpy().astype(np.float64)
    vals, idx = torch.topk(s, kk + 1, dim=1)
    tie = (vals[:, kk] == vals[:, kk - 1]).cpu().numpy()
    clean = np.flatnonzero(~tie)
    parts = [(np.repeat(clean.astype(np.int32), kk), idx[torch.from_numpy(clean).to(idx.device), :kk].reshape(-1),
              vals[torch.from_numpy(clean).to(vals.device), :kk].reshape(-1))]
    for r in np.flatnonzero(tie):
        c = torch.nonzero(s[r] >= vals[r, kk - 1]).reshape(-1)
        parts.append((np.full(len(c), r, dtype=np.int32), c, s[r, c]))
    return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1].cpu().numpy() for p in parts]),
            np.concatenate([p[2].cpu().numpy() for p in parts]).astype(np.float64))


def _above(s, threshold: float):
    """Every (row, column) of the score block with a score >= ``threshold``."""
    import torch

    qi, c = torch.nonzero(s >= threshold, as_tuple=True)
    return qi.cpu().numpy().astype(np.int32), c.cpu().numpy(), s[qi, c].cpu().numpy().astype(np.float64)


def _empty():
    return np.zeros(0, np.int32), np.zeros(0, np.int64), np.zeros(0)


def _concat(parts):
    if not parts:
        return _empty()
    return tuple(np.concatenate(x) for x in zip(*parts))


def _order(found):
    qi, rows, score = found
    o = np.lexsort((rows, -score, qi))  # query, score descending, then library row
    return qi[o], rows[o], score[o]


def _best(found, k: int):
    """The first ``k`` hits per query in (query, score desc, row) order."""
    qi, rows, score = _order(found)
    if not len(qi):
        return qi, rows, score
    starts = np.searchsorted(qi, qi, side="left")
    keep = (np.arange(len(qi)) - starts) < k
    return qi[keep], rows[keep], score[keep]


def brute_force(vectors: np.ndarray, queries: np.ndarray, k: int, metric: str = "cosine") -> list[list[int]]:
    """Reference: the top-k rows of each query from the full float64 score matrix (ties
    by row). For tests and benchmarks on small inputs only."""
    v = np.asarray(vectors, dtype=np.float64)
    qv = np.asarray(queries, dtype=np.float64)
    if metric == "cosine":
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        qv = qv / np.linalg.norm(qv, axis=1, keepdims=True)
    s = qv @ v.T
    return [list(np.lexsort((np.arange(len(v)), -row))[:k]) for row in s]


def neighbor_graph(index: EmbeddingIndex, k: int = 10) -> pa.Table:
    """Each library molecule's k nearest other molecules in embedding space (exact; for
    diversity picking and clustering, like ``biogen.search.neighbors`` for fingerprints).
    Columns: ``row``, ``neighbor`` (library rows), ``score``."""
    rows = np.concatenate([b.rows for b in index.blocks]) if index.blocks else np.zeros(0, np.int64)
    vecs = [b.vectors.cpu().numpy() for b in index.blocks]
    q = EmbeddingQueries(np.concatenate(vecs) if vecs else np.zeros((0, index.entry["dim"]), np.float32),
                         [str(r) for r in rows], [None] * len(rows))
    qi, hit, score = index._scan(q, k + 1, None)
    self_hit = hit == rows[qi]
    qi, hit, score = qi[~self_hit], hit[~self_hit], score[~self_hit]
    qi, hit, score = _best((qi, hit, score), k)
    return pa.table({"row": pa.array(rows[qi], pa.int64()), "neighbor": pa.array(hit, pa.int64()),
                     "score": pa.array(score, pa.float64())})


def vectors_of(library, model: str, rows: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The stored vectors (float32) and ok mask of ``rows`` (library order; all when None)."""
    vs, oks = [], []
    for _, v, ok in library.iter_embeddings(model):
        vs.append(np.asarray(v, dtype=np.float32))
        oks.append(ok)
    v = np.concatenate(vs) if vs else np.zeros((0, library.embedding_entry(model)["dim"]), np.float32)
    ok = np.concatenate(oks) if oks else np.zeros(0, bool)
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        return v[rows], ok[rows]
    return v, ok
