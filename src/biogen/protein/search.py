"""Cosine top-k of query proteins against an embedding store.

Rows are L2-normalized once; the store is scanned in blocks (a batched matmul and a
top-k per block, merged), on the GPU when ``device=cuda`` (torch), else on the CPU.
Ties are ordered by row (deterministic). Queries are another store, or FASTA files
embedded with the store's own model and settings (read from its manifest).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from biogen.errors import ConfigError, InputError
from biogen.protein.store import EmbeddingStore, pooled_vectors

BLOCK_ROWS = 65536


def _normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def cosine_topk(queries: np.ndarray, database: np.ndarray, k: int, device: str = "cpu",
                block_rows: int = BLOCK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """(scores Q x k float32, rows Q x k int64), best first; k is capped at the database size.

    queries: Q x E; database: N x E (any float dtype; a memory map is read block by block).
    """
    if k < 1:
        raise ConfigError(f"k={k} must be >= 1")
    if queries.ndim != 2 or database.ndim != 2 or queries.shape[1] != database.shape[1]:
        raise InputError(f"embedding sizes differ: queries {queries.shape}, store {database.shape}; "
                         "embed the queries with the store's model and layer")
    k = min(k, database.shape[0])
    dev = torch.device(device)
    q = _normalized(torch.as_tensor(np.asarray(queries, dtype=np.float32), device=dev))  # Q x E
    best_s = torch.full((q.shape[0], k), -float("inf"), device=dev)
    best_i = torch.full((q.shape[0], k), -1, dtype=torch.int64, device=dev)
    for start in range(0, database.shape[0], block_rows):
        block = torch.as_tensor(np.asarray(database[start: start + block_rows], dtype=np.float32), device=dev)
        scores = q @ _normalized(block).T  # Q x B
        kk = min(k, scores.shape[1])
        s, i = torch.topk(scores, kk, dim=1)  # within-block best
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, i + start], dim=1)
        # order by score desc, then row asc: sort by row first, then a stable sort by score
        by_row = torch.argsort(cand_i, dim=1, stable=True)
        cand_s, cand_i = cand_s.gather(1, by_row), cand_i.gather(1, by_row)
        order = torch.argsort(-cand_s, dim=1, stable=True)[:, :k]
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return best_s.cpu().numpy(), best_i.cpu().numpy()


def search_store(store: str | EmbeddingStore, queries, *, k: int = 10, vector: str | None = None,
                 device: str = "cpu") -> pa.Table:
    """Top-k rows of ``store`` for each query; a table query_id, rank, hit_id, score, hit_ids.

    queries: another store (path or object) or FASTA file(s), embedded here with the
    store's model and settings. hit_id is the first id of the hit's sequence; hit_ids all.
    """
    db = store if isinstance(store, EmbeddingStore) else EmbeddingStore.open(store)
    vector = vector or db.default_vector()
    if isinstance(queries, EmbeddingStore) or (isinstance(queries, str) and _is_store(queries)):
        qs = queries if isinstance(queries, EmbeddingStore) else EmbeddingStore.open(queries)
        if qs.manifest["model"].get("sha256") != db.manifest["model"].get("sha256"):
            raise InputError("the query store was embedded with another model checkpoint than the searched store; "
                             "embed both with the same model")
        qvec = qs.vectors(vector)
        qids = [ids[0] for ids in qs.ids]
    else:
        qvec, qids = _embed_queries(db, queries, vector)
    scores, rows = cosine_topk(qvec, db.vectors(vector), k, device)
    ids = db.ids
    out = {"query_id": [], "rank": [], "hit_id": [], "score": [], "hit_ids": []}
    for qi, qid in enumerate(qids):
        for rank, (s, r) in enumerate(zip(scores[qi], rows[qi]), start=1):
            out["query_id"].append(qid)
            out["rank"].append(rank)
            out["hit_id"].append(ids[r][0])
            out["score"].append(float(s))
            out["hit_ids"].append(ids[r])
    return pa.table(out)


def _is_store(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "manifest.json").is_file()


def _embed_queries(db: EmbeddingStore, paths, vector: str):
    from biogen.protein.embed import EmbedSpec, load_embedder
    from biogen.protein.fasta import read_proteins

    pset = read_proteins(paths)
    if not len(pset):
        raise InputError(f"no usable query sequence in {paths}")
    info = db.manifest["model"]
    spec = EmbedSpec(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in db.manifest["spec"].items()})
    model = info["model"] if info.get("family") == "unirep" else (info.get("checkpoint") or info.get("name"))
    emb = load_embedder(model, spec, device="cpu")
    if emb.info.get("sha256") != info.get("sha256"):
        raise InputError(f"the model found for {model!r} is not the checkpoint the store was embedded with "
                         f"(sha256 {emb.info.get('sha256')} vs {info.get('sha256')})")
    vecs = [pooled_vectors(r, spec.pooling)[vector] for r in emb.embed(pset.sequences)]
    qids = [pset.ids[k][0] for k in pset.keys]
    return np.stack(vecs), qids
