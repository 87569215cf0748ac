"""Similarity search on a GPU node: biogen's CUDA engine vs FPSim2's CUDA engine and
biogen's CPU engine on all the node's cores, same run, same data. No Ray.

Workload (PERFORMANCE.md section 1): MOSES train (1,584,663 molecules; data set
``moses_train``, or ``$BIOGEN_DATA_DIR/moses_train.csv.gz``), ECFP4 2048 bits (RDKit Morgan
radius 2, standardization off), fingerprints computed by a pool of processes over the
node's cores with the library featurizer (not by a single-process library build);
queries drawn with a fixed seed from MOSES test (the draw of ``benchmarks/similarity.py``).

  anchor  FPSim2's CUDA engine (threshold search only; its database file, ids = row numbers,
          written in FPSim2's own format from the fingerprints computed once: FPSim2's
          builder needs minutes for 1.58M rows; the file is checked equal to the builder's
          on the first 2,000 molecules)
  anchor  biogen's CPU engine with one worker thread per core
  biogen  ``SimilarityIndex(engine="cuda")``

Correctness first: for every single query and mode (threshold 0.7 and 0.4, top-10,
top-100) and for the whole 1,000-query top-100 batch, the CUDA engine's results (rows,
float64 scores, order) must equal the CPU engine's exactly; FPSim2's threshold hit sets
are compared with ours and the agreement reported. Then timings: single queries
interleaved over ``--repeats`` rounds (median, spread); the batch; and the *full scan*:
one query against every row with no bound and no hit (the kernel alone, timed with CUDA
events, and the engine call end to end), against the device-to-device copy bandwidth
measured in the same run. pairs/s counts library rows x queries, whatever the bounds pruned.

    python benchmarks/gpu_similarity.py --out gpu-results/similarity.json
    python benchmarks/gpu_similarity.py --limit 20000 --queries 4 --batch 50   # CPU dry run
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, versions  # noqa: E402

from biogen.chem.fingerprints import FingerprintSpec  # noqa: E402
from biogen.chem.standardize import StandardizeSpec  # noqa: E402
from biogen.datasets import dataset_path  # noqa: E402
from biogen.search import SimilarityIndex  # noqa: E402
from biogen.search.queries import Queries  # noqa: E402

SPEC = FingerprintSpec()  # morgan r2, 2048 bits: ECFP4
MODES = [("threshold_0.7", "threshold", 0.7), ("threshold_0.4", "threshold", 0.4),
         ("top_10", "topk", 10), ("top_100", "topk", 100)]


def read_smiles(name: str, limit: int | None) -> list[str]:
    with gzip.open(dataset_path(name), "rt") as f:
        next(f)  # header: SMILES,SPLIT
        out = []
        for line in f:
            out.append(line.split(",", 1)[0].strip())
            if limit and len(out) >= limit:
                break
    return out


def _featurize(args: tuple[int, list[str]]) -> tuple[np.ndarray, np.ndarray]:
    start, smiles = args
    from rdkit import rdBase

    rdBase.DisableLog("rdApp.*")
    q = Queries.from_smiles(smiles, SPEC, StandardizeSpec(enabled=False), ids=[str(start + i) for i in range(len(smiles))])
    return q.fps, np.array([int(i) for i in q.ids], dtype=np.int64)


def fingerprints(smiles: list[str], processes: int, chunk: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """(N x 32 uint64, N int64 row numbers of the molecules that featurized) over a process pool."""
    jobs = [(i, smiles[i:i + chunk]) for i in range(0, len(smiles), chunk)]
    with mp.get_context("spawn").Pool(processes) as pool:
        parts = pool.map(_featurize, jobs, chunksize=1)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def draw_queries(n: int, seed: int) -> list[str]:
    smiles = read_smiles("moses_test", None)
    rng = np.random.default_rng(seed)
    return [smiles[i] for i in rng.choice(len(smiles), n, replace=False)]


def stats(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n": len(times)}


def same_table(a, b) -> bool:
    return all(np.array_equal(a.column(c).to_numpy(), b.column(c).to_numpy())
               for c in ("query_index", "library_row", "score"))


def copy_bandwidth(cp, nbytes: int = 4 << 30) -> float:
    """Device-to-device copy, bytes read + written per second (best of 10 after a warm-up)."""
    a = cp.empty(nbytes // 8, dtype=cp.uint64)
    a[:] = 1
    b = cp.empty_like(a)
    best = 0.0
    for i in range(11):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        b[:] = a
        stop.record()
        stop.synchronize()
        if i:
            best = max(best, 2 * nbytes / (cp.cuda.get_elapsed_time(start, stop) / 1e3))
    del a, b
    cp.get_default_memory_pool().free_all_blocks()
    return best


def full_scan(index: SimilarityIndex, q: np.ndarray, repeats: int = 50) -> dict:
    """One query, every row, no bound, no hit: kernel time (CUDA events) and engine call time."""
    from biogen.search.cuda import grid_shape, shared_bytes
    from biogen.search.metrics import NEVER

    part, engine = index._resident[0]
    cp = engine._cp
    n = engine.n_rows
    mc = np.full((1, SPEC.nbits + 1), NEVER, np.int32)
    lo, hi = np.zeros(1, np.int64), np.full(1, n, np.int64)
    assert len(engine.candidates(q[None], mc, lo, hi)[0]) == 0
    gx, gy, group = grid_shape(lo, hi, n, engine._tpb, engine._group, engine._n_sm)
    d_q, d_mc, d_lo, d_hi = (cp.asarray(x) for x in (q[None], mc, lo, hi))
    counter = cp.zeros(1, cp.uint64)
    out = (cp.empty(1, cp.int32), cp.empty(1, cp.int64), cp.empty(1, cp.int32))
    args = (d_q, d_mc, d_lo, d_hi, np.int64(1), np.int32(mc.shape[1]), engine._fps, engine._pcs, np.int64(n),
            np.int32(engine.n_words), np.int32(group), *out, np.uint64(1), counter)
    shared = shared_bytes(engine.n_words, engine._tpb, group)
    kernel_ms = []
    for i in range(repeats + 5):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        engine._kernel((gx, gy), (engine._tpb,), args, shared_mem=shared)
        stop.record()
        stop.synchronize()
        if i >= 5:
            kernel_ms.append(cp.cuda.get_elapsed_time(start, stop))
    assert int(counter.get()[0]) == 0
    call = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.candidates(q[None], mc, lo, hi)
        call.append(time.perf_counter() - t)
    k = statistics.median(kernel_ms) / 1e3
    return {"rows": n, "bytes": int(part.fps.nbytes), "grid": [gx, gy], "threads": engine._tpb,
            "kernel_median_s": k, "kernel_min_s": min(kernel_ms) / 1e3, "kernel_pairs_per_s": n / k,
            "kernel_bytes_per_s": part.fps.nbytes / k, "call": stats(call),
            "call_pairs_per_s": n / statistics.median(call)}


def fpsim2_layout(fps: np.ndarray) -> np.ndarray:
    """biogen's words (bit i = bit i % 64 of word i // 64) in FPSim2's layout (its
    ``BitStrToIntList(efp.ToBitString())``: bit i is the (i % 64)-th most significant bit)."""
    bits = np.unpackbits(np.ascontiguousarray(fps).view(np.uint8), axis=1, bitorder="little")
    return np.packbits(bits, axis=1, bitorder="big").view(">u8").astype(np.uint64)


def fpsim2_database(fps: np.ndarray, rows: np.ndarray, path: Path) -> Path:
    """FPSim2's database file (``create_db_file``'s format: a PyTables table fp_id, f1..fW,
    popcnt sorted by popcount, blosc2-compressed; config = fp type, parameters, RDKit and
    FPSim2 versions, popcount bins) written from fingerprints computed once. FPSim2's own
    builder computes the same Morgan bits but its popcount-bin pass runs one PyTables query
    per popcount (minutes for 1.58M rows); ``fpsim2_file_matches_its_own`` checks that both
    files hold the same rows and bins."""
    import rdkit
    import tables as tb
    from FPSim2.io.backends.pytables import create_schema
    from importlib.metadata import version

    words = fpsim2_layout(fps)
    pc = np.bitwise_count(fps).sum(axis=1).astype(np.int64)
    order = np.argsort(pc, kind="stable")
    table = np.empty(len(rows), dtype=[("fp_id", "<i8")] + [(f"f{i + 1}", "<u8") for i in range(words.shape[1])]
                     + [("popcnt", "<i8")])
    table["fp_id"] = rows[order]
    for i in range(words.shape[1]):
        table[f"f{i + 1}"] = words[order, i]
    table["popcnt"] = pc[order]
    counts, starts = np.unique(table["popcnt"], return_index=True)
    ends = np.append(starts[1:], len(table))
    bins = [(int(c), (int(a), int(b))) for c, a, b in zip(counts, starts, ends)]
    with tb.open_file(str(path), mode="w") as f:
        t = f.create_table(f.root, "fps", create_schema(SPEC.nbits), "Table storing fps",
                           filters=tb.Filters(complib="blosc2", complevel=9, fletcher32=False))
        t.append(table)
        t.cols.popcnt.create_index(kind="full")
        config = f.create_vlarray(f.root, "config", atom=tb.ObjectAtom())
        for item in ("Morgan", {"radius": SPEC.radius, "fpSize": SPEC.nbits}, rdkit.__version__, version("FPSim2"),
                     bins):
            config.append(item)
    return path


def fpsim2_file_matches_its_own(smiles: list[str], fps: np.ndarray, rows: np.ndarray, workdir: Path) -> dict:
    """FPSim2's own ``create_db_file`` on the first molecules vs ``fpsim2_database``: same rows, bins, config."""
    import tables as tb
    from FPSim2.io.backends.pytables import create_db_file

    n = min(2000, len(rows))
    own, ours = workdir / "fpsim2_own.h5", workdir / "fpsim2_ours.h5"
    create_db_file([[smiles[r], int(r)] for r in rows[:n]], str(own), "smiles", "Morgan",
                   {"radius": SPEC.radius, "fpSize": SPEC.nbits})
    fpsim2_database(fps[:n], rows[:n], ours)
    with tb.open_file(str(own)) as a, tb.open_file(str(ours)) as b:
        ta, tb_ = a.root.fps[:], b.root.fps[:]
        same_rows = np.array_equal(np.sort(ta, order="fp_id"), np.sort(tb_, order="fp_id"))
        same_bins = list(a.root.config[4]) == list(b.root.config[4])
        same_config = [a.root.config[i] for i in (0, 1)] == [b.root.config[i] for i in (0, 1)]
    own.unlink()
    ours.unlink()
    return {"molecules": n, "same_rows": bool(same_rows), "same_popcount_bins": bool(same_bins),
            "same_fp_type_and_params": bool(same_config)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N molecules of MOSES train (dry runs)")
    ap.add_argument("--queries", type=int, default=20, help="single queries per mode")
    ap.add_argument("--batch", type=int, default=1000, help="queries of the batch top-100")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=20261121)
    ap.add_argument("--processes", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--engines", default="auto", help="auto (cuda when CuPy sees a GPU) | cpu | cpu,cuda")
    ap.add_argument("--skip-fpsim2", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu-similarity.json"))
    args = ap.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    from biogen.search.cuda import cuda_available

    has_gpu, why = cuda_available()
    engines = (["cpu", "cuda"] if has_gpu else ["cpu"]) if args.engines == "auto" else args.engines.split(",")
    if "cuda" not in engines:
        print(f"no CUDA engine in this run ({why if not has_gpu else 'not asked for'}): CPU engine only", flush=True)
    res: dict = {"benchmark": "gpu_similarity", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join(["python", "benchmarks/gpu_similarity.py", *(argv or sys.argv[1:])]),
                 "machine": machine(), "versions": versions("fpsim2"), "engines": engines, "cuda": why,
                 "results": {}, "timing_s": {}}
    t_all = time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every stage: a run stopped at its time limit keeps what it measured
        res["timing_s"]["total"] = time.perf_counter() - t_all
        args.out.write_text(json.dumps(res, indent=1, default=float) + "\n")

    t = time.perf_counter()
    smiles = read_smiles("moses_train", args.limit)
    fps, rows = fingerprints(smiles, args.processes)
    res["timing_s"]["fingerprints"] = time.perf_counter() - t
    res["library"] = {"source": "MOSES train", "records": len(smiles), "featurized": len(rows),
                      "featurizer": SPEC.to_dict(), "processes": args.processes}
    print(f"fingerprints: {len(rows):,} of {len(smiles):,} molecules in {res['timing_s']['fingerprints']:.1f} s "
          f"on {args.processes} processes", flush=True)
    ids = [str(r) for r in rows]

    qsmiles = draw_queries(max(args.queries, args.batch), args.seed)
    q_all = Queries.from_smiles(qsmiles, SPEC, StandardizeSpec(enabled=False))
    if len(q_all) < len(qsmiles):
        raise SystemExit(f"{len(qsmiles) - len(q_all)} query SMILES failed to featurize")

    def qset(a: int, b: int) -> Queries:
        return Queries(q_all.fps[a:b], q_all.ids[a:b], q_all.smiles[a:b], SPEC)

    t = time.perf_counter()
    indexes = {}
    for engine in engines:
        label = f"biogen_{engine}" + (f"_w{args.processes}" if engine == "cpu" else "")
        indexes[label] = SimilarityIndex.from_fingerprints(fps, SPEC, ids=ids, engine=engine,
                                                           workers=args.processes if engine == "cpu" else None)
    res["timing_s"]["indexes"] = time.perf_counter() - t
    cpu_label = next(k for k in indexes if k.startswith("biogen_cpu"))
    gpu_label = "biogen_cuda" if "biogen_cuda" in indexes else None

    # --- correctness: CUDA == CPU exactly, every single query of every mode, and the batch
    # (a mismatch is recorded and the timings still run, so that one run on a GPU tells all;
    # the program then exits with status 1 and the JSON says the results are not exact)
    t = time.perf_counter()
    checked, mismatches = 0, []
    if gpu_label:
        for name, mode, p in MODES:
            kw = {"mode": mode, "k": int(p) if mode == "topk" else 10, "threshold": p if mode == "threshold" else 0.7}
            for i in range(args.queries):
                a, b = indexes[cpu_label].search(qset(i, i + 1), **kw), indexes[gpu_label].search(qset(i, i + 1), **kw)
                if not same_table(a, b):
                    mismatches.append(f"mode {name}, query {i} ({qsmiles[i]}): cpu {a.num_rows} rows, cuda {b.num_rows}")
                checked += 1
        a, b = indexes[cpu_label].top_k(qset(0, args.batch), 100), indexes[gpu_label].top_k(qset(0, args.batch), 100)
        if not same_table(a, b):
            mismatches.append(f"batch of {args.batch} queries, top-100")
        checked += args.batch
    res["correctness"] = {"queries_checked": checked, "cuda_equal_to_cpu": (not mismatches) if gpu_label else None,
                          "mismatches": mismatches[:20], "n_mismatches": len(mismatches)}
    res["timing_s"]["correctness"] = time.perf_counter() - t
    save()
    if mismatches:
        print(f"!!! CUDA results differ from the CPU engine's in {len(mismatches)} of {checked} checks:\n  "
              + "\n  ".join(mismatches[:20]), flush=True)
    else:
        print(f"correctness: {checked} queries, CUDA results equal to the CPU engine's" if gpu_label else
              "correctness: skipped (no CUDA engine to compare with the CPU engine)", flush=True)

    # --- FPSim2's CUDA engine (threshold only) on its own database of the same molecules
    fce = None
    if gpu_label and not args.skip_fpsim2:
        t = time.perf_counter()
        from FPSim2 import FPSim2CudaEngine
        from rdkit import DataStructs

        res["fpsim2_file_check"] = check = fpsim2_file_matches_its_own(smiles, fps, rows, args.workdir)
        if not all(v for k, v in check.items() if k != "molecules"):
            print(f"!!! our FPSim2 file differs from FPSim2's own on {check['molecules']} molecules: {check}")
            mismatches.append(f"FPSim2 database file: {check}")
        h5 = fpsim2_database(fps, rows, args.workdir / f"fpsim2_moses_{len(rows)}.h5")
        fce = FPSim2CudaEngine(str(h5))
        res["timing_s"]["fpsim2_database"] = time.perf_counter() - t

        def ebv(row: np.ndarray):
            v = DataStructs.ExplicitBitVect(SPEC.nbits)
            v.SetBitsFromList(np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little")).tolist())
            return v

        q_ebvs = [ebv(q_all.fps[i]) for i in range(args.queries)]

    # --- single queries, interleaved
    t = time.perf_counter()
    r = res["results"]
    agree: dict = {}
    for name, mode, p in MODES:
        kw = {"mode": mode, "k": int(p) if mode == "topk" else 10, "threshold": p if mode == "threshold" else 0.7}
        runs = {label: (lambda i, idx=idx: idx.search(qset(i, i + 1), **kw)) for label, idx in indexes.items()}
        if fce is not None and mode == "threshold":
            runs["fpsim2_cuda"] = lambda i: fce.similarity(q_ebvs[i], p)
            ours = [set(rows[indexes[cpu_label].search(qset(i, i + 1), **kw).column("library_row").to_numpy()].tolist())
                    for i in range(args.queries)]
            agree[name] = sum(set(runs["fpsim2_cuda"](i)["mol_id"].tolist()) == ours[i] for i in range(args.queries))
        for fn in runs.values():  # warm-up: JIT, kernel compilation, caches
            fn(0)
        times: dict[str, list[float]] = {label: [] for label in runs}
        for _ in range(args.repeats):
            for i in range(args.queries):
                for label, fn in runs.items():
                    t0 = time.perf_counter()
                    fn(i)
                    times[label].append(time.perf_counter() - t0)
        for label, ts in times.items():
            r.setdefault(name, {})[label] = {**stats(ts), "pairs_per_s": len(rows) / statistics.median(ts)}
            print(f"{label:18s} {name:14s} {statistics.median(ts) * 1e3:9.3f} ms/query "
                  f"({len(rows) / statistics.median(ts) / 1e9:.2f} G pairs/s)", flush=True)
    if fce is not None:
        res["fpsim2_threshold_sets_equal_biogen"] = {k: f"{v}/{args.queries}" for k, v in agree.items()}
    res["timing_s"]["single_queries"] = time.perf_counter() - t
    save()

    # --- batch top-100
    t = time.perf_counter()
    batch = qset(0, args.batch)
    for label, idx in indexes.items():
        idx.top_k(qset(0, 8), 100)
        ts = []
        for _ in range(max(1, args.repeats - 1)):
            t0 = time.perf_counter()
            out = idx.top_k(batch, 100)
            ts.append(time.perf_counter() - t0)
        assert out.num_rows == 100 * args.batch
        r.setdefault("batch_top_100", {})[label] = {**stats(ts), "queries": args.batch,
                                                    "pairs_per_s": len(rows) * args.batch / statistics.median(ts)}
        print(f"{label:18s} batch of {args.batch} top-100: {statistics.median(ts):.3f} s "
              f"({len(rows) * args.batch / statistics.median(ts) / 1e9:.1f} G pairs/s)", flush=True)
    res["timing_s"]["batch"] = time.perf_counter() - t
    save()

    # --- full scan and the copy bandwidth of this GPU
    if gpu_label:
        cp = indexes[gpu_label]._resident[0][1]._cp
        scan = full_scan(indexes[gpu_label], q_all.fps[0])
        bw = copy_bandwidth(cp)
        scan["copy_bandwidth_bytes_per_s"] = bw
        scan["fraction_of_copy_bandwidth"] = scan["kernel_bytes_per_s"] / bw
        scan["streaming_limit_pairs_per_s"] = bw / (SPEC.n_words * 8)
        res["full_scan"] = scan
        dev = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
        res["gpu"] = {"name": dev["name"].decode(), "multiprocessors": dev["multiProcessorCount"],
                      "memory_gib": dev["totalGlobalMem"] / 2**30}
        print(f"full scan, one query: kernel {scan['kernel_median_s'] * 1e6:.0f} us = "
              f"{scan['kernel_pairs_per_s'] / 1e9:.1f} G pairs/s ({scan['fraction_of_copy_bandwidth']:.0%} of the "
              f"{bw / 1e12:.2f} TB/s copy bandwidth); engine call {scan['call']['median_s'] * 1e6:.0f} us", flush=True)

    # --- ratios against the anchors of this run
    ratios: dict = {}
    if gpu_label:
        for name, _, _ in MODES:
            row = r[name]
            ratios[name] = {f"vs_{k}": row[k]["median_s"] / row[gpu_label]["median_s"] for k in row if k != gpu_label}
        b = r["batch_top_100"]
        ratios["batch_top_100"] = {f"vs_{cpu_label}": b[cpu_label]["median_s"] / b[gpu_label]["median_s"]}
    res["ratios"] = ratios
    save()
    print(json.dumps(ratios, indent=1))
    print(f"wrote {args.out} ({res['timing_s']['total']:.0f} s)")
    for x in indexes.values():
        x.close()
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
