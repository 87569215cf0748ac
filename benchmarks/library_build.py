"""Library precompute throughput: biogen vs a plain RDKit loop and FPSim2's create_db_file.

Workload (PERFORMANCE.md section 3): MOSES train (1,584,663 ZINC SMILES from the
molsets package) -> ECFP4 2048-bit library. In one run, on the same input:

  anchor   plain RDKit loop, one core: read the gzipped CSV, MolFromSmiles, Morgan r2 2048
  anchor   FPSim2 create_db_file (same molecules, .smi with integer ids, Morgan r2 2048)
  biogen   like-for-like (standardize=none, no descriptors; parse, canonical SMILES,
           InChIKey, dedupe, fingerprint, write) with 1 and 2 Ray workers
  biogen   default config (standardization + 12 descriptors) on a subset, 1 and 2 workers
  biogen   append of 10% new molecules vs the full build
  biogen   peak memory (RSS of the whole process tree) at two input sizes

Correctness is checked before any number is reported: every biogen fingerprint of a
random sample equals the plain loop's fingerprint of the same input record, and every
input record is either a library row or a reject.

    python benchmarks/library_build.py                      # full MOSES train (about 40 min on 2 cores)
    python benchmarks/library_build.py --limit 100000       # quick look
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
from rdkit import Chem, DataStructs, rdBase
from rdkit.Chem import rdFingerprintGenerator

from biogen.chem.standardize import StandardizeSpec
from biogen.datasets import dataset_path
from biogen.library import Library
from biogen.library.ingest import append_library, build_library
from biogen.runtime import RuntimeSpec

sys.path.insert(0, str(Path(__file__).parent))
from _common import machine, versions  # noqa: E402

rdBase.DisableLog("rdApp.*")


class PeakRSS:
    """Peak resident memory of a build: this process's growth over its RSS at the start
    (the benchmark itself holds the anchor's fingerprints) plus all children (Ray)."""

    def __init__(self, interval: float = 0.2):
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._base = psutil.Process().memory_info().rss

    def _sample(self) -> int:
        me = psutil.Process()
        total = max(me.memory_info().rss - self._base, 0)
        for p in me.children(recursive=True):
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()


def write_subset(src: str, dst: Path, start: int, stop: int | None) -> int:
    """Lines [start, stop) of MOSES (header kept) -> gzipped CSV; returns the record count."""
    n = 0
    with gzip.open(src, "rt") as fh, gzip.open(dst, "wt", compresslevel=1) as out:
        out.write(fh.readline())
        for i, line in enumerate(fh):
            if stop is not None and i >= stop:
                break
            if i >= start:
                out.write(line)
                n += 1
    return n


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")


def plain_loop(path: Path):
    """The anchor: parse + Morgan fingerprint, one core, nothing else."""
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = []
    t0 = time.perf_counter()
    with gzip.open(path, "rt") as fh:
        next(fh)
        for line in fh:
            mol = Chem.MolFromSmiles(line.split(",", 1)[0].strip())
            fps.append(gen.GetFingerprint(mol) if mol is not None else None)
    return time.perf_counter() - t0, fps


def fpsim2_build(path: Path, work: Path) -> tuple[float, int]:
    from FPSim2.io import create_db_file
    import tables

    smi = work / "fpsim2_input.smi"
    with gzip.open(path, "rt") as fh, open(smi, "w") as out:
        next(fh)
        for i, line in enumerate(fh):
            out.write(f"{line.split(',', 1)[0].strip()} {i + 1}\n")
    h5 = work / "fpsim2.h5"
    t0 = time.perf_counter()
    create_db_file(str(smi), str(h5), "smi", "Morgan", {"radius": 2, "fpSize": 2048})
    dt = time.perf_counter() - t0
    with tables.open_file(str(h5)) as f:
        rows = f.root.fps.nrows
    return dt, rows


def ours(path: Path, out: Path, workers: int, *, std: bool, descriptors: list[str], dedupe_key: str = "inchikey") -> dict:
    shutil.rmtree(out, ignore_errors=True)
    rt = RuntimeSpec(mode="local", workers=workers, progress=False)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        rep = build_library(str(path), out, runtime=rt, chunk_size=10_000,
                            standardize=StandardizeSpec(enabled=std), descriptors=descriptors, dedupe_key=dedupe_key)
        wall = time.perf_counter() - t0
    assert rep.rows_added + rep.rejected == rep.records_read
    n = rep.records_read
    st = rep.stage_seconds
    cpu = st["task"] + st["finalize"] + st["dedupe"]  # all work: map tasks, shard writing, driver dedupe
    return {
        "workers": workers, "records": n, "rows": rep.rows_added, "rejected": rep.rejected,
        "wall_s": round(wall, 2), "mol_per_s": round(n / wall, 1),
        "cpu_s": round(cpu, 2),
        "per_core_mol_per_s": round(n / cpu, 1),
        "stage_mol_per_s": {k: round(n / v, 1) for k, v in st.items() if v > 0},
        "stage_us_per_mol": {k: round(1e6 * v / n, 1) for k, v in st.items()},
        "peak_rss_mib": round(mem.peak / 2**20, 1),
    }


def check_fingerprints(lib_dir: Path, ref_fps: list, sample: int, seed: int = 0) -> dict:
    """Every sampled library row's fingerprint equals the plain loop's for its input record."""
    lib = Library.open(lib_dir)
    rng = np.random.default_rng(seed)
    checked = 0
    for shard in lib.shards:
        k = max(1, sample * shard.rows // max(lib.n_rows, 1))
        rows = rng.choice(shard.rows, size=min(k, shard.rows), replace=False)
        records = shard.metadata(["record"]).column("record").to_numpy()
        fps = shard.fingerprints
        for r in rows:
            ref = ref_fps[int(records[r]) - 2]  # record = line number; line 1 is the header
            bits = np.zeros(2048, dtype=np.uint8)
            DataStructs.ConvertToNumpyArray(ref, bits)
            mine = np.unpackbits(np.asarray(fps[r]).view(np.uint8), bitorder="little")
            if not np.array_equal(bits, mine):
                raise AssertionError(f"fingerprint mismatch in shard {shard.name} row {r}")
            checked += 1
    return {"rows_checked": checked, "all_equal": True}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=None, help="first N MOSES train records (default: all)")
    ap.add_argument("--default-subset", type=int, default=100_000,
                    help="records for the default-config (standardization + descriptors) runs")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sample", type=int, default=50_000, help="rows whose fingerprints are checked")
    ap.add_argument("--skip-fpsim2", action="store_true")
    ap.add_argument("--workdir", type=Path, default=Path("benchmarks/work"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--only-dedupe-keys", action="store_true",
                    help="only the plain loop and like-for-like builds deduplicated by InChIKey and by "
                         "canonical SMILES (dedupe_key=smiles), 1 and max workers")
    ap.add_argument("--only-scaling", action="store_true",
                    help="only the plain loop and the like-for-like builds at each --workers count "
                         "(per-core ratio and scaling, with the correctness check)")
    ap.add_argument("--only-memory", action="store_true",
                    help="only the peak-memory runs (1/8 and 1/2 of the input, max workers)")
    args = ap.parse_args()
    if args.only_memory:
        return memory_only(args)
    if args.only_dedupe_keys:
        return dedupe_keys_only(args)

    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = dataset_path("moses_train")
    full = work / "input.csv.gz"
    n = write_subset(src, full, 0, args.limit)
    head = work / "head90.csv.gz"
    tail = work / "tail10.csv.gz"
    small = work / "eighth.csv.gz"
    sub = work / "default_subset.csv.gz"
    if not args.only_scaling:
        n90 = n * 9 // 10
        write_subset(src, head, 0, n90)
        write_subset(src, tail, n90, n)
        write_subset(src, small, 0, n // 8)
        n_sub = write_subset(src, sub, 0, min(args.default_subset, n))
    print(f"input: {n} records of MOSES train ({src})", flush=True)

    res: dict = {"benchmark": "library_build", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                 "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                 "versions": versions(), "records": n, "note": "one run per configuration (each is minutes long)"}

    t_plain, ref = plain_loop(full)
    res["plain_rdkit_loop"] = {"wall_s": round(t_plain, 2), "mol_per_s": round(n / t_plain, 1)}
    print("plain RDKit loop:", res["plain_rdkit_loop"], flush=True)

    runs = {}
    for w in args.workers:
        runs[w] = ours(full, work / f"lib_w{w}", w, std=False, descriptors=[])
        print(f"biogen like-for-like, {w} worker(s):", runs[w], flush=True)
    w_max = max(args.workers)
    res["correctness"] = check_fingerprints(work / f"lib_w{w_max}", ref, args.sample)
    lib_rows = {w: Library.open(work / f"lib_w{w}").n_rows for w in args.workers}
    assert len(set(lib_rows.values())) == 1, f"worker counts disagree on the row count: {lib_rows}"
    res["correctness"]["same_rows_all_worker_counts"] = True
    del ref
    res["biogen_like_for_like"] = runs
    if args.only_scaling:
        one = runs[min(args.workers)]
        res["benchmark"] = "library_build_scaling"
        res["ratios"] = {
            "per_core_vs_plain_loop": round(one["per_core_mol_per_s"] / res["plain_rdkit_loop"]["mol_per_s"], 3),
            "scaling_max_vs_1_workers": round(runs[w_max]["mol_per_s"] / one["mol_per_s"], 3) if w_max > 1 else None}
        print(json.dumps(res["ratios"], indent=2))
        out = args.out or Path("benchmarks/results") / "library_build_scaling-moses_train.json"
        _write_json(out, res)
        print(f"wrote {out}")
        return

    if not args.skip_fpsim2:
        t_fp, fp_rows = fpsim2_build(full, work)
        res["fpsim2_create_db_file"] = {"wall_s": round(t_fp, 2), "mol_per_s": round(n / t_fp, 1), "rows": int(fp_rows)}
        print("FPSim2 create_db_file:", res["fpsim2_create_db_file"], flush=True)

    res["biogen_default_config"] = {}
    for w in args.workers:
        r = ours(sub, work / f"libstd_w{w}", w, std=True,
                 descriptors=["mw", "clogp", "tpsa", "hbd", "hba", "rotatable_bonds", "rings",
                              "aromatic_rings", "heavy_atoms", "formal_charge", "qed", "fsp3"])
        res["biogen_default_config"][w] = r
        print(f"biogen default config ({n_sub} records), {w} worker(s):", r, flush=True)

    # append 10% new molecules to a library of the other 90%
    shutil.rmtree(work / "lib_append", ignore_errors=True)
    rt = RuntimeSpec(mode="local", workers=w_max, progress=False)
    build_library(str(head), work / "lib_append", runtime=rt, chunk_size=10_000,
                  standardize=StandardizeSpec(enabled=False), descriptors=[])
    t0 = time.perf_counter()
    rep = append_library(work / "lib_append", str(tail), runtime=rt, chunk_size=10_000)
    t_app = time.perf_counter() - t0
    assert Library.open(work / "lib_append").n_rows == lib_rows[w_max], "append != full build row count"
    res["append_10_percent"] = {"wall_s": round(t_app, 2), "records": rep.records_read,
                                "full_build_wall_s": runs[w_max]["wall_s"],
                                "fraction_of_full_build": round(t_app / runs[w_max]["wall_s"], 3)}
    print("append 10%:", res["append_10_percent"], flush=True)

    eighth = ours(small, work / "lib_eighth", w_max, std=False, descriptors=[])
    res["memory"] = {"records_small": eighth["records"], "peak_rss_mib_small": eighth["peak_rss_mib"],
                     "records_full": n, "peak_rss_mib_full": runs[w_max]["peak_rss_mib"]}

    plain = res["plain_rdkit_loop"]["mol_per_s"]
    one = runs[min(args.workers)]
    ident = one["stage_us_per_mol"].get("identify", 0.0)
    res["ratios"] = {
        "per_core_vs_plain_loop": round(one["per_core_mol_per_s"] / plain, 3),
        "per_core_vs_plain_loop_without_identity": round(
            1 / (one["cpu_s"] / one["records"] - ident / 1e6) / plain, 3),
        "wall_1_worker_vs_plain_loop": round(one["mol_per_s"] / plain, 3),
        "scaling_2_vs_1_workers": round(runs[w_max]["mol_per_s"] / one["mol_per_s"], 3) if w_max > 1 else None,
        "default_config_scaling_2_vs_1": round(res["biogen_default_config"][w_max]["mol_per_s"]
                                               / res["biogen_default_config"][min(args.workers)]["mol_per_s"], 3)
        if w_max > 1 else None,
        "vs_fpsim2_create_db_file_wall_max_workers": round(runs[w_max]["mol_per_s"] / res["fpsim2_create_db_file"]["mol_per_s"], 3)
        if "fpsim2_create_db_file" in res else None,
        "append_10pct_fraction_of_full_build": res["append_10_percent"]["fraction_of_full_build"],
        "peak_rss_full_over_eighth": round(runs[w_max]["peak_rss_mib"] / eighth["peak_rss_mib"], 3),
    }
    print(json.dumps(res["ratios"], indent=2))
    out = args.out or Path("benchmarks/results") / f"library_build-{datetime.now():%Y%m%d}-n{n}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    _write_json(out, res)
    print(f"wrote {out}")


def dedupe_keys_only(args) -> None:
    """What the InChIKey costs: like-for-like builds keyed by InChIKey and by canonical SMILES,
    against the plain loop on the same input, same run (correctness: fingerprints checked)."""
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = dataset_path("moses_train")
    path = work / "keys_input.csv.gz"
    n = write_subset(src, path, 0, args.limit)
    out = {"benchmark": "library_build_dedupe_keys", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
           "versions": versions(), "records": n}
    t_plain, ref = plain_loop(path)
    plain = n / t_plain
    out["plain_rdkit_loop"] = {"wall_s": round(t_plain, 2), "mol_per_s": round(plain, 1)}
    print("plain RDKit loop:", out["plain_rdkit_loop"], flush=True)
    w_lo, w_hi = min(args.workers), max(args.workers)
    runs: dict = {}
    for key, workers in (("smiles", w_lo), ("inchikey", w_lo), ("smiles", w_hi)):
        r = ours(path, work / f"lib_keys_{key}_w{workers}", workers, std=False, descriptors=[], dedupe_key=key)
        r["per_core_vs_plain_loop"] = round(r["per_core_mol_per_s"] / plain, 3)
        runs.setdefault(key, {})[workers] = r
        print(f"biogen like-for-like, dedupe_key={key}, {workers} worker(s):", r, flush=True)
    out["correctness"] = check_fingerprints(work / f"lib_keys_smiles_w{w_hi}", ref, args.sample)
    rows = {k: {w: Library.open(work / f"lib_keys_{k}_w{w}").n_rows for w in v} for k, v in runs.items()}
    out["correctness"]["rows"] = rows
    out["biogen_like_for_like"] = runs
    out["ratios"] = {
        "per_core_vs_plain_loop_inchikey": runs["inchikey"][w_lo]["per_core_vs_plain_loop"],
        "per_core_vs_plain_loop_smiles": runs["smiles"][w_lo]["per_core_vs_plain_loop"],
        "smiles_over_inchikey_wall": round(runs["smiles"][w_lo]["mol_per_s"] / runs["inchikey"][w_lo]["mol_per_s"], 3),
        "scaling_smiles_max_vs_1": round(runs["smiles"][w_hi]["mol_per_s"] / runs["smiles"][w_lo]["mol_per_s"], 3)
        if w_hi > w_lo else None,
    }
    print(json.dumps(out["ratios"], indent=2))
    dst = args.out or Path("benchmarks/results") / "library_build_dedupe_keys.json"
    _write_json(dst, out)
    print(f"wrote {dst}")


def memory_only(args) -> None:
    """Peak RSS at two input sizes (builds like-for-like, max workers), in a clean process."""
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    src = dataset_path("moses_train")
    n = sum(1 for _ in gzip.open(src, "rt")) - 1 if args.limit is None else args.limit
    w = max(args.workers)
    out = {"benchmark": "library_build_memory", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
           "versions": versions(), "runs": []}
    for frac in (8, 2):
        path = work / f"mem_{frac}.csv.gz"
        k = write_subset(src, path, 0, n // frac)
        r = ours(path, work / f"lib_mem_{frac}", w, std=False, descriptors=[])
        out["runs"].append({"records": k, "peak_rss_mib": r["peak_rss_mib"], "wall_s": r["wall_s"]})
        print(out["runs"][-1], flush=True)
    out["peak_rss_ratio_4x_input"] = round(out["runs"][1]["peak_rss_mib"] / out["runs"][0]["peak_rss_mib"], 3)
    dst = args.out or Path("benchmarks/results") / "library_build_memory.json"
    _write_json(dst, out)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()
