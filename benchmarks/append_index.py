"""An append against a large library with and without the library's key index (issue 21).

The partitioned dedupe splits every existing shard's keys into P partitions; the library's
key index (``keyindex/``, ``biogen.library.dedupe``) keeps those split files, so the next
append splits only its own records and the shards added since. This measures the dedupe
stage of appends of ``--append`` real MOSES molecules to a synthetic library of ``--rows``
rows (``scale_driver.py``'s generator: real fingerprints and metadata resampled from a
small real library built here first):

  first    the first append (no index yet: it splits the whole library and keeps the index)
  indexed  a second append with the index (splits the first append's new shards only)
  fresh    the same second append on a twin library whose index was deleted (the anchor:
           what every append cost before the index)

Correctness before timing: the two second appends give the same library (shard signature:
rows, ids, ordinals, duplicate_of, shard bytes) and the same history counts.

    python benchmarks/append_index.py --rows 2M --append 20000 --partitions 8
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402
from scale_driver import extend_library_pool, library_view, parse_size  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def moses_smi(start: int, n: int, path: Path) -> Path:
    """MOSES train molecules ``start..start+n`` as a .smi file (ids given: ``A<i>``)."""
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_train"), "rt") as fh, open(path, "w") as out:
        next(fh)
        for i, line in enumerate(fh):
            if i >= start + n:
                break
            if i >= start:
                out.write(f"{line.strip().split(',')[0]} A{i}\n")
    return path


def synthetic_pool(workdir: Path, rows: int, source_rows: int, workers: int) -> tuple[list[dict], dict]:
    """The generator's pool of ``rows`` rows (10,000-row shards, seed 7) under ``workdir``,
    resampled from a real library of the first ``source_rows`` MOSES train molecules (built
    there once): its shard entries and the generator's record."""
    from biogen.library.ingest import build_library
    from biogen.runtime import RuntimeSpec

    source = workdir / "source"
    if not (source / "manifest.json").exists():
        build_library(str(moses_smi(0, source_rows, workdir / "source.smi")), source,
                      runtime=RuntimeSpec(mode="local", workers=workers, progress=False), overwrite=True)
    return extend_library_pool(workdir / "pool", source, rows, 10_000, 7, workers)


def signature(lib: Path) -> tuple:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from tests_support import shard_signature

    m = json.loads((lib / "manifest.json").read_text())
    return shard_signature(lib), [(h["records_read"], h["rows_added"], h["duplicates"]) for h in m["history"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="2M", help="synthetic library rows (10,000-row shards)")
    ap.add_argument("--append", type=int, default=20_000, help="molecules per append")
    ap.add_argument("--source-rows", type=int, default=20_000, help="the real library resampled")
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/append_index"))
    ap.add_argument("--out", type=Path, help="default: results/append_index-<rows>.json")
    args = ap.parse_args()

    from biogen.library.ingest import append_library
    from biogen.runtime import RuntimeSpec

    rows = parse_size(args.rows)
    args.out = args.out or RESULTS / f"append_index-{args.rows}.json"
    w = args.workdir
    w.mkdir(parents=True, exist_ok=True)
    rt = RuntimeSpec(mode="local", workers=args.workers, progress=False)
    pool = w / "pool"
    entries, gen = synthetic_pool(w, rows, args.source_rows, args.workers)
    deposits = [moses_smi(args.source_rows // 2 + k * args.append, args.append, w / f"append{k}.smi") for k in (0, 1)]

    def dedupe_seconds(lib: Path, dep: Path) -> dict:
        t0 = time.perf_counter()
        rep = append_library(lib, str(dep), runtime=rt, dedupe_partitions=args.partitions)
        return {"dedupe_s": rep.stage_seconds["dedupe"], "append_s": round(time.perf_counter() - t0, 1),
                "duplicates": rep.duplicates, "rows_added": rep.rows_added}

    lib = library_view(pool, entries, gen["source_manifest"], gen["source_rows"], w / "lib", 7)
    first = dedupe_seconds(lib, deposits[0])
    twin = w / "twin"
    shutil.rmtree(twin, ignore_errors=True)
    shutil.copytree(lib, twin, symlinks=True)
    shutil.rmtree(twin / "keyindex")
    indexed = dedupe_seconds(lib, deposits[1])
    fresh = dedupe_seconds(twin, deposits[1])
    same = signature(lib) == signature(twin)
    if not same:
        raise SystemExit("the indexed and the fresh append gave different libraries")
    index_bytes = sum(f.stat().st_size for f in (lib / "keyindex").rglob("*.arrow"))
    result = {
        "benchmark": "benchmarks/append_index.py", "command": " ".join(sys.argv), "machine": machine(),
        "versions": versions(), "library_rows": rows, "append_molecules": args.append,
        "partitions": args.partitions, "workers": args.workers, "same_library": same,
        "first_append": first, "second_append_indexed": indexed, "second_append_without_index": fresh,
        "dedupe_speedup_indexed": round(fresh["dedupe_s"] / indexed["dedupe_s"], 2),
        "index_bytes_per_library_row": round(index_bytes / (rows + first["rows_added"]), 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine", "versions")}, indent=1))


if __name__ == "__main__":
    main()
