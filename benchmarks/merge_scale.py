"""``library merge`` of large pieces: the serial planner vs key partitions (issue 21).

The pieces are consecutive slices of a synthetic library of ``--rows`` rows
(``scale_driver.py``'s generator: real fingerprints and metadata of a small real library
built here first, resampled with new ids; keep_all, so every row is kept and repeats are
flagged ``duplicate_of``), as an array job's tasks would leave them. Each merge runs in a
fresh process (``child``): its peak RSS (VmHWM) and CPU are the driver's; Ray's workers
are other processes.

  serial       dedupe_partitions=0: one index of keys and ids in the driver
  partitioned  dedupe_partitions=P: key partitions in Ray tasks, one offset per part in the driver

Correctness before timing: both merged libraries are the same (shard signature: rows, ids,
ordinals, duplicate_of, shard bytes) and hold every row of the pieces.

    python benchmarks/merge_scale.py --rows 2M --pieces 8 --partitions 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402
from append_index import signature, synthetic_pool  # noqa: E402
from scale_driver import Meter, library_view, parse_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def child(arg: dict) -> dict:
    """One merge in this process: the report's counts and stages, and this process's meter."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from biogen.library.merge import merge_libraries
    from biogen.runtime import RuntimeSpec, ray_session

    rt = RuntimeSpec(mode="local", workers=arg["workers"], progress=False)
    with ray_session(rt):  # Ray's start is not the merge's cost
        meter = Meter()
        rep = merge_libraries(arg["pieces"], arg["out"], runtime=rt, dedupe_partitions=arg["partitions"],
                              overwrite=True)
        measured = meter.read()
    return {**measured, "rows_added": rep.rows_added, "duplicates": rep.duplicates,
            "stage_seconds": rep.stage_seconds, "driver_cpu_us_per_row": round(
                1e6 * measured["driver_cpu_s"] / max(rep.rows_added, 1), 3)}


def run_child(arg: dict, log: Path, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", json.dumps(arg)]
    with open(log, "w") as fh:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout)
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"merge child failed (exit {p.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return json.loads(line[7:])


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        print("RESULT " + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="2M", help="rows over all pieces (10,000-row shards)")
    ap.add_argument("--pieces", type=int, default=8)
    ap.add_argument("--partitions", type=int, default=16)
    ap.add_argument("--source-rows", type=int, default=20_000, help="the real library resampled")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/merge_scale"))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per merge")
    ap.add_argument("--out", type=Path, help="default: results/merge_scale-<rows>.json")
    args = ap.parse_args()

    rows = parse_size(args.rows)
    args.out = args.out or RESULTS / f"merge_scale-{args.rows}.json"
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    entries, gen = synthetic_pool(w, rows, args.source_rows, args.workers)
    per = -(-len(entries) // args.pieces)
    pieces = [str(library_view(w / "pool", entries[k:k + per], gen["source_manifest"], gen["source_rows"],
                               w / "pieces" / f"part-{j}", 7))
              for j, k in enumerate(range(0, len(entries), per))]
    runs = {}
    for name, p in (("serial", 0), ("partitioned", args.partitions)):
        out = w / f"merged-{name}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        runs[name] = run_child({"pieces": pieces, "out": str(out), "partitions": p, "workers": args.workers},
                               w / f"{name}.log", args.timeout)
        runs[name]["process_wall_s"] = round(time.perf_counter() - t0, 1)
        print(name, json.dumps(runs[name]), flush=True)
    same = signature(w / "merged-serial") == signature(w / "merged-partitioned")
    if not same or runs["serial"]["rows_added"] != rows:
        raise SystemExit(f"the merges differ (same={same}) or lost rows ({runs['serial']['rows_added']} of {rows})")
    result = {
        "benchmark": "benchmarks/merge_scale.py", "command": " ".join(sys.argv), "machine": machine(),
        "versions": versions(), "rows": rows, "pieces": len(pieces), "partitions": args.partitions,
        "workers": args.workers, "same_library": same,
        "measured_as": "each merge in a fresh process after Ray's start; peak RSS = VmHWM of that process (the "
                       "driver), CPU = its user + sys seconds; Ray's workers are other processes",
        **runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions")}, indent=1))


if __name__ == "__main__":
    main()
