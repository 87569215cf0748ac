"""Similarity search: biogen's engines vs RDKit BulkTanimoto and FPSim2, same run, same data.

Workload (PERFORMANCE.md section 1): database = MOSES train as a biogen library (ECFP4,
2048 bits; built here with standardization off if --library does not exist); queries =
molecules drawn with a fixed seed from MOSES test. Modes: threshold 0.7, threshold 0.4,
top-10 and top-100 for single queries, and one batch of 1,000 queries top-100.

  anchor  RDKit BulkTanimotoSimilarity (+ numpy argpartition/argsort for top-k), 1 core
  anchor  FPSim2 CPU engine (database built from the library's SMILES, same parameters)
  anchor  on a GPU: FPSim2's CUDA engine (threshold only)
  biogen  SimilarityIndex engine=cpu with 1 and 2 workers; engine=cuda on a GPU

Correctness first: for every query of every mode, biogen's hits (ids and float64 scores)
must equal RDKit's exactly (threshold: the same set; top-k: the same ordered list with
ties by id); FPSim2's agreement is reported. Then, for every single query, all contenders run back
to back (interleaved, so machine noise hits them alike), the whole set is repeated, and
the median is reported with the spread. pairs/s counts library size x queries (a full scan's
pairs), whatever the bounds pruned. The brute-force scan rate (no pruning, one query)
is compared with this machine's memory read bandwidth measured in the same run.

    python benchmarks/similarity.py --library benchmarks/work/moses_train_lib
    python benchmarks/similarity.py --limit 200000          # quick look on a subset
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rdkit import DataStructs, rdBase

from biogen.chem.fingerprints import FingerprintSpec
from biogen.chem.standardize import StandardizeSpec
from biogen.datasets import dataset_path
from biogen.library import Library
from biogen.library.ingest import build_library
from biogen.runtime import RuntimeSpec
from biogen.search import SimilarityIndex
from biogen.kernels.cpu import common_counts

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, versions  # noqa: E402

rdBase.DisableLog("rdApp.*")


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def ensure_library(path: Path, limit: int | None, work: Path) -> Library:
    if not (path / "manifest.json").exists():
        src = dataset_path("moses_train")
        inp = src
        if limit:
            import gzip

            inp = work / f"moses_train_{limit}.csv"
            with gzip.open(src, "rt") as f, open(inp, "w") as o:
                for i, line in enumerate(f):
                    if i > limit:
                        break
                    o.write(line)
        print(f"building {path} from {inp} (standardization off, no descriptors)", flush=True)
        build_library(str(inp), path, featurizer=FingerprintSpec(), standardize=StandardizeSpec(enabled=False),
                      descriptors=(), chunk_size=10_000, runtime=RuntimeSpec(progress=True))
    return Library.open(path)


def draw_queries(n: int, seed: int) -> list[str]:
    import gzip

    with gzip.open(dataset_path("moses_test"), "rt") as f:
        smiles = [ln.split(",")[0] for i, ln in enumerate(f) if i > 0]
    rng = np.random.default_rng(seed)
    return [smiles[i] for i in rng.choice(len(smiles), n, replace=False)]


def to_ebvs(fps: np.ndarray, nbits: int) -> list:
    out = []
    for row in fps:
        v = DataStructs.ExplicitBitVect(nbits)
        v.SetBitsFromList(np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist())
        out.append(v)
    return out


def rdkit_threshold(q, ebvs, t):
    s = np.asarray(DataStructs.BulkTanimotoSimilarity(q, ebvs))
    return np.flatnonzero(s >= t), s


def rdkit_top_k(q, ebvs, k, id_rank):
    s = np.asarray(DataStructs.BulkTanimotoSimilarity(q, ebvs))
    part = np.argpartition(-s, k - 1)[:k] if k < len(s) else np.arange(len(s))
    kth = s[part].min()
    cand = np.flatnonzero(s >= kth)  # every tie at the k-th score, then order by (score, id)
    order = np.lexsort((id_rank[cand], -s[cand]))[:k]
    return cand[order], s


def memory_bandwidth(fps: np.ndarray, repeats: int) -> float:
    """Read bandwidth (bytes/s): numpy sum over the fingerprint array, one core, best of n."""
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fps.sum()
        best = max(best, fps.nbytes / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", type=Path, default=Path("benchmarks/work/moses_train_lib"))
    ap.add_argument("--limit", type=int, default=None, help="build the library from the first N records only")
    ap.add_argument("--queries", type=int, default=20, help="single queries per mode")
    ap.add_argument("--batch", type=int, default=1000, help="queries in the batch top-100 run")
    ap.add_argument("--seed", type=int, default=20261121)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--engines", nargs="+", default=["cpu"], help="cpu and/or cuda")
    ap.add_argument("--skip-fpsim2", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    lib = ensure_library(args.library, args.limit, args.workdir)
    n_lib = lib.n_rows
    nbits = lib.featurizer.stored_bits
    print(f"library {lib.path}: {n_lib} rows", flush=True)
    qsmiles = draw_queries(max(args.queries, args.batch), args.seed)

    res: dict = {"benchmark": "similarity", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                 "versions": versions(), "library": {"path": str(lib.path), "rows": n_lib,
                                                     "featurizer": lib.manifest["featurizer"]},
                 "queries": {"source": "MOSES test", "seed": args.seed, "single": args.queries, "batch": args.batch},
                 "results": {}}

    # --- our index (cpu, workers=1) provides the featurized queries and the id ranks
    t = time.perf_counter()
    idx1 = SimilarityIndex.open(lib.path, engine="cpu", workers=1)
    res["index_open_s"] = time.perf_counter() - t
    q_all = idx1.queries(qsmiles)
    if len(q_all) < len(qsmiles):
        raise SystemExit(f"{len(qsmiles) - len(q_all)} query SMILES failed to featurize")
    single = q_all.fps[: args.queries]
    id_rank = idx1._id_rank  # position -> rank of the id (tie order)
    lib_fps = lib.fingerprints()  # positions in library order == index positions here
    print("building RDKit bit vectors of the library ...", flush=True)
    ebvs = to_ebvs(lib_fps, nbits)
    q_ebvs = to_ebvs(q_all.fps, nbits)

    from biogen.search.queries import Queries

    def qset(fps, ids_):
        return Queries(fps, list(ids_), [None] * len(ids_), lib.featurizer)

    modes = [("threshold_0.7", "threshold", 0.7), ("threshold_0.4", "threshold", 0.4),
             ("top_10", "topk", 10), ("top_100", "topk", 100)]

    # --- correctness: ours == RDKit exactly, every single query, every mode
    print("checking correctness against RDKit ...", flush=True)
    checked = 0
    for name, mode, p in modes:
        for i in range(args.queries):
            tab = idx1.search(qset(single[i:i + 1], [f"q{i}"]), mode=mode, k=int(p) if mode == "topk" else 10,
                              threshold=p if mode == "threshold" else 0.7)
            got_rows = tab.column("library_row").to_numpy()
            got_scores = tab.column("score").to_numpy()
            if mode == "threshold":
                exp, s = rdkit_threshold(q_ebvs[i], ebvs, p)
                ok = set(got_rows.tolist()) == set(exp.tolist()) and np.array_equal(np.sort(got_scores), np.sort(s[exp]))
            else:
                exp, s = rdkit_top_k(q_ebvs[i], ebvs, int(p), id_rank)
                ok = np.array_equal(got_rows, exp) and np.array_equal(got_scores, s[exp])
            if not ok:
                raise SystemExit(f"MISMATCH vs RDKit: mode {name}, query {i} ({qsmiles[i]})")
            checked += 1
    res["correctness"] = {"queries_checked": checked, "equal_to_rdkit": True}

    # --- single queries: every contender times the same query back to back (interleaved,
    # so machine noise hits all alike), over several repeats; medians per mode
    r = res["results"]
    fe = None
    if not args.skip_fpsim2:
        from FPSim2 import FPSim2Engine
        from FPSim2.io import create_db_file

        h5 = args.workdir / f"fpsim2_{n_lib}.h5"
        if not h5.exists():
            print(f"building FPSim2 database {h5} ...", flush=True)
            smi = lib.read_metadata(["smiles"]).column("smiles").to_pylist()
            create_db_file([[s, i] for i, s in enumerate(smi)], str(h5), "smiles", "Morgan",
                           {"radius": 2, "fpSize": nbits})
        fe = FPSim2Engine(str(h5))
    fce = None
    if fe is not None and "cuda" in args.engines:  # FPSim2's CUDA engine: threshold search only
        from FPSim2 import FPSim2CudaEngine

        fce = FPSim2CudaEngine(str(h5))
    indexes = {}
    for engine in args.engines:
        for w in args.workers if engine == "cpu" else [1]:
            label = f"biogen_{engine}" + (f"_w{w}" if engine == "cpu" else "")
            indexes[label] = idx1 if (engine == "cpu" and w == 1) else \
                SimilarityIndex.open(lib.path, engine=engine, workers=w)
    qs = [qset(single[i:i + 1], [f"q{i}"]) for i in range(args.queries)]
    agree = {}
    for name, mode, p in modes:
        kw = {"mode": mode, "k": int(p) if mode == "topk" else 10, "threshold": p if mode == "threshold" else 0.7}
        runs = {"rdkit": (lambda i, e=ebvs: rdkit_threshold(q_ebvs[i], e, p)) if mode == "threshold" else
                (lambda i, e=ebvs: rdkit_top_k(q_ebvs[i], e, int(p), id_rank))}
        if fe is not None:
            runs["fpsim2_cpu"] = (lambda i: fe.similarity(q_ebvs[i], p, n_workers=1)) if mode == "threshold" else \
                (lambda i: fe.top_k(q_ebvs[i], int(p), 0.0, n_workers=1))
        if fce is not None and mode == "threshold":
            runs["fpsim2_cuda"] = lambda i: fce.similarity(q_ebvs[i], p)
        for label, idx in indexes.items():
            runs[label] = lambda i, idx=idx: idx.search(qs[i], **kw)
            idx.speculation = {"complete": 0, "failed": 0}
            for q in qs[:2]:  # warm up (JIT, caches)
                idx.search(q, **kw)
        if mode == "threshold":  # FPSim2's agreement with RDKit (reported)
            for anchor in ("fpsim2_cpu", "fpsim2_cuda"):
                if anchor in runs:
                    agree.setdefault(anchor, {})[name] = sum(
                        set(runs[anchor](i)["mol_id"].tolist()) == set(runs["rdkit"](i)[0].tolist())
                        for i in range(args.queries))
        times = {label: [] for label in runs}
        for _ in range(args.repeats):
            for i in range(args.queries):
                for label, fn in runs.items():
                    t = time.perf_counter()
                    fn(i)
                    times[label].append(time.perf_counter() - t)
        for label, ts in times.items():
            r.setdefault(name, {})[label] = stats(ts)
            print(f"{label} {name}: {statistics.median(ts) * 1e3:.2f} ms/query", flush=True)
        for label, idx in indexes.items():
            if mode == "topk":
                r[name][label]["speculative_scans"] = dict(idx.speculation)
    if fe is not None:
        res["fpsim2_threshold_sets_equal_rdkit"] = agree
    del ebvs

    # --- batch and brute-force scan
    for label, idx in indexes.items():
        # batch top-100
        batch = qset(q_all.fps[: args.batch], [f"b{i}"] * args.batch)
        idx.top_k(qset(q_all.fps[:8], ["w"] * 8), 100)
        times = []
        for _ in range(max(1, args.repeats - 1)):
            t = time.perf_counter()
            out = idx.top_k(batch, 100)
            times.append(time.perf_counter() - t)
        assert out.num_rows == 100 * args.batch
        r.setdefault("batch_top_100", {})[label] = {**stats(times), "pairs_per_s": n_lib * args.batch / statistics.median(times)}
        print(f"{label} batch of {args.batch} top-100: {statistics.median(times):.2f} s "
              f"({n_lib * args.batch / statistics.median(times) / 1e6:.0f} M pairs/s)", flush=True)
        if label == "biogen_cpu_w1":
            # brute-force scan: popcount(q AND row) of every row, no bound, no selection
            part, _ = idx._resident[0]
            out = np.empty(len(part.fps), np.int32)
            common_counts(single[0], part.fps, 0, len(part.fps), out)
            assert np.array_equal(out, np.bitwise_count(part.fps & single[0]).sum(axis=1))
            scan = []
            for _ in range(5):
                t = time.perf_counter()
                common_counts(single[0], part.fps, 0, len(part.fps), out)
                scan.append(time.perf_counter() - t)
            bw = memory_bandwidth(part.fps, 5)
            rate = part.fps.nbytes / min(scan)
            res["brute_force_scan"] = {"seconds": min(scan), "bytes_per_s": rate, "pairs_per_s": n_lib / min(scan),
                                       "numpy_read_bandwidth_bytes_per_s": bw, "fraction_of_bandwidth": rate / bw}
            print(f"brute-force scan: {rate / 1e9:.1f} GB/s = {rate / bw:.0%} of numpy's read bandwidth "
                  f"({bw / 1e9:.1f} GB/s)", flush=True)

    # --- ratios against the anchors of this run
    ratios = {}
    for name, _, _ in modes:
        row = r[name]
        for label in [k for k in row if k.startswith("biogen")]:
            ours = row[label]["median_s"]
            ratios.setdefault(name, {})[label] = {
                "vs_rdkit": row["rdkit"]["median_s"] / ours,
                **({"vs_fpsim2_cpu": row["fpsim2_cpu"]["median_s"] / ours} if "fpsim2_cpu" in row else {}),
                **({"vs_fpsim2_cuda": row["fpsim2_cuda"]["median_s"] / ours} if "fpsim2_cuda" in row else {}),
            }
    if "biogen_cpu_w2" in r.get("batch_top_100", {}) and "biogen_cpu_w1" in r["batch_top_100"]:
        ratios["batch_top_100"] = {"w2_vs_w1": r["batch_top_100"]["biogen_cpu_w1"]["median_s"]
                                   / r["batch_top_100"]["biogen_cpu_w2"]["median_s"]}
    res["ratios"] = ratios
    print(json.dumps(ratios, indent=1))
    out = args.out or Path("benchmarks/results") / f"similarity-{n_lib}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
