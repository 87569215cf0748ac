"""Library build and search on 1, 2 and 3 Ray nodes of this machine, and the per-shard costs
that feed the scaling model in docs/hpc.md (PERFORMANCE.md sections 3 and 5).

The layouts share the same two cores (so this measures the overhead of going multi-node,
not a speedup):

    1 node : head with 2 CPUs
    2 nodes: head with 1 CPU + 1 worker node with 1 CPU
    3 nodes: head with no CPUs (driver and GCS only, as on many HPC set-ups) + 2 worker nodes of 1 CPU

Correctness first: every layout must build the same shards (sha256 per file) as the
in-process build, and its distributed search must return the same hits as the in-process
engine; only then are times reported. Each layout is a fresh `ray start` cluster on
loopback with token authentication (tests/local_cluster.py).

    python benchmarks/scaling.py --molecules 40000 --out benchmarks/results/scaling.json
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, versions  # noqa: E402

LAYOUTS = {1: (2, []), 2: (1, [1]), 3: (0, [1, 1])}


def write_input(n: int, path: Path) -> Path:
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_train"), "rt") as fh, open(path, "w") as out:
        next(fh)
        for i, line in zip(range(n), fh):
            out.write(f"{line.strip().split(',')[0]} T{i}\n")
    return path


def signature(lib: Path) -> tuple:
    m = json.loads((lib / "manifest.json").read_text())
    return m["n_rows"], [(s["name"], {f: v["sha256"] for f, v in s["files"].items()}) for s in m["shards"]]


def task_overhead(n: int = 400) -> float:
    """Round trip of an empty Ray task through the cluster (µs per task, 2 in flight per CPU)."""
    import ray

    f = ray.remote(num_cpus=1)(lambda i: i)  # by value: this script is not importable on the workers
    ray.get([f.remote(i) for i in range(20)])  # workers started
    t0 = time.perf_counter()
    ray.get([f.remote(i) for i in range(n)])
    return (time.perf_counter() - t0) / n * 1e6


def run_layout(nodes: int, smi: Path, work: Path, chunk: int, queries, reference_hits, repeats: int) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from local_cluster import LocalCluster

    head, workers = LAYOUTS[nodes]
    out: dict = {"nodes": nodes, "head_cpus": head, "worker_cpus": workers, "builds": []}
    t0 = time.perf_counter()
    with LocalCluster(head_cpus=head, worker_cpus=workers) as cluster:
        out["cluster_start_s"] = round(time.perf_counter() - t0, 2)
        saved = dict(os.environ)
        # before Ray is imported: it reads RAY_AUTH_MODE / the token path once, at import
        os.environ.update({k: v for k, v in cluster.env.items() if k.startswith("RAY_")})
        import ray

        from biogen.library.ingest import build_library
        from biogen.runtime import RuntimeSpec
        from biogen.search.distributed import ShardedSearch

        try:
            spec = RuntimeSpec(mode="ray_cluster", address=cluster.address, progress=False)
            for r in range(repeats):
                lib = work / f"lib-{nodes}n-{r}"
                shutil.rmtree(lib, ignore_errors=True)
                t0 = time.perf_counter()
                rep = build_library(str(smi), lib, chunk_size=chunk, runtime=spec)
                wall = time.perf_counter() - t0
                out["builds"].append({"wall_s": round(wall, 3), "rows": rep.rows_added,
                                      "stage_seconds": rep.stage_seconds, "signature": signature(lib)})
            ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
            try:
                out["empty_task_us"] = round(task_overhead(), 1)
                with ShardedSearch(work / f"lib-{nodes}n-0", actors=2, engine="cpu", workers=1) as index:
                    hits = index.search(queries, "topk", k=10)
                    same = _hit_set(hits) == reference_hits
                    times = []
                    for _ in range(5):
                        t0 = time.perf_counter()
                        index.search(queries, "topk", k=10)
                        times.append(time.perf_counter() - t0)
                out["search"] = {"same_hits_as_in_process": same, "median_s": statistics.median(times),
                                 "min_s": min(times), "max_s": max(times), "queries": len(queries)}
            finally:
                ray.shutdown()
        finally:
            os.environ.clear()
            os.environ.update(saved)
    return out


def _hit_set(table) -> set:
    d = table.to_pydict()
    return {(q, h, round(s, 6)) for q, h, s in zip(d["query_id"], d["hit_id"], d["score"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", type=int, default=40000)
    ap.add_argument("--chunk-size", type=int, default=2000)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workdir", default="benchmarks/work/scaling")
    ap.add_argument("--out", default="benchmarks/results/scaling.json")
    args = ap.parse_args()

    from biogen.library.ingest import build_library
    from biogen.runtime import RuntimeSpec
    from biogen.search import SimilarityIndex

    work = Path(args.workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    smi = write_input(args.molecules, work / "input.smi")

    # reference: in-process build and search (correctness anchor), and the per-molecule costs
    ref_lib = work / "lib-inline"
    shutil.rmtree(ref_lib, ignore_errors=True)
    t0 = time.perf_counter()
    rep = build_library(str(smi), ref_lib, chunk_size=args.chunk_size, runtime=RuntimeSpec(mode="inline", progress=False))
    inline_wall = time.perf_counter() - t0
    ref_sig = signature(ref_lib)
    with SimilarityIndex.open(ref_lib, engine="cpu", workers=1) as index:
        rng = np.random.default_rng(20261122)
        all_smiles = index.smiles.to_pylist()
        queries = index.queries([all_smiles[i] for i in rng.choice(len(all_smiles), args.queries, replace=False)])
        ref_hits = _hit_set(index.search(queries, "topk", k=10))
        t0 = time.perf_counter()
        index.search(queries, "topk", k=10)
        inline_search_s = time.perf_counter() - t0
    n_shards = len(ref_sig[1])
    manifest = json.loads((ref_lib / "manifest.json").read_text())
    lib_bytes = sum(p.stat().st_size for p in (ref_lib / "shards").rglob("*") if p.is_file())

    layouts = {}
    for nodes in (1, 2, 3):
        # each layout in a fresh process: its own Ray driver state and environment (token)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            res = pool.apply(run_layout, (nodes, smi, work, args.chunk_size, queries, ref_hits, args.repeats))
        for b in res["builds"]:
            if b["signature"] != ref_sig:
                raise SystemExit(f"{nodes}-node build differs from the in-process build: not timing it")
            b.pop("signature")
        if not res["search"]["same_hits_as_in_process"]:
            raise SystemExit(f"{nodes}-node search hits differ from the in-process engine")
        res["build_median_s"] = statistics.median(b["wall_s"] for b in res["builds"])
        layouts[str(nodes)] = res
        print(f"{nodes} node(s): build {res['build_median_s']:.1f} s, search {res['search']['median_s'] * 1e3:.1f} ms,"
              f" empty task {res['empty_task_us']:.0f} us", flush=True)

    base = layouts["1"]
    st = rep.stage_seconds
    featurize_s = sum(v for k, v in st.items() if k in ("parse", "standardize", "identify", "fingerprint",
                                                        "descriptors", "write"))
    result = {
        "benchmark": "scaling", "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python " + " ".join(sys.argv), "machine": machine(), "versions": versions(),
        "molecules": args.molecules, "rows": rep.rows_added, "chunk_size": args.chunk_size, "shards": n_shards,
        "correctness": {"builds_identical_to_in_process": True, "search_hits_identical": True},
        "inline": {"build_wall_s": round(inline_wall, 3), "search_s": inline_search_s,
                   "stage_seconds": st},
        "layouts": layouts,
        "overhead_vs_1_node": {n: {"build": round(layouts[n]["build_median_s"] / base["build_median_s"], 3),
                                   "search": round(layouts[n]["search"]["median_s"] / base["search"]["median_s"], 3)}
                               for n in layouts},
        "per_unit_costs": {
            "featurize_us_per_mol_per_core": round(featurize_s / rep.rows_added * 1e6, 1),
            "dedupe_us_per_mol_driver_serial": round(st.get("dedupe", 0) / rep.rows_added * 1e6, 2),
            "finalize_us_per_mol_per_core": round(st.get("finalize", 0) / rep.rows_added * 1e6, 2),
            "shard_bytes_per_mol": round(lib_bytes / rep.rows_added, 1),
            "fingerprint_bytes_per_mol": manifest["featurizer"]["nbits"] // 8,
            "empty_task_us": {n: layouts[n]["empty_task_us"] for n in layouts},
            "search_pairs_per_s_per_actor": round(args.queries * rep.rows_added / base["search"]["median_s"] / 2),
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("overhead_vs_1_node", "per_unit_costs")}, indent=1))


if __name__ == "__main__":
    main()
