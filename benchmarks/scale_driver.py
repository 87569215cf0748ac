"""Driver memory at 10M / 30M / 100M rows (issue 21): a synthetic-library generator, and the
driver's peak RSS, CPU and wall time of a build's dedupe, a 1,000-query top-k search and a
full screen, each measured in a fresh process.

Generator (benchmark code, not a user command); both outputs grow by appending, so each size
is a prefix view (a directory of symlinks) of one pool and is written once:
  library  shards of ``--shard-rows`` rows (10,000: a build's default chunk) resampled from a
           real library (``--source``, MOSES train 500k): fingerprints, popcounts, SMILES,
           InChIKey, scaffold of real molecules; new ids ``BG{ordinal+1:09d}``; rows sorted by
           (popcount, ordinal) within a shard; a manifest with each file's sha256, checked by
           ``verify_library``. Sampling goes in epochs: epoch e is a seeded permutation of the
           M source rows, so a source molecule recurs once per epoch; the manifest says
           ``dedupe.mode = keep_all`` and a repeat's ``duplicate_of`` is the id of its epoch-0
           copy (a valid keep_all library; ``library append`` dedupes against it correctly).
  parts    ``<build>/_work/000-build/parts/NNNNNN.parquet`` of ``--part-rows`` rows (100,000, a
           build with chunk_size=100000; at ``--default-chunk-sizes`` also 10,000, the default)
           with the columns the dedupe reads: ``inchikey`` (synthetic 27-character keys,
           bijective from a key number) and ``id`` (given, unique: ``Z`` + 10 digits, like a
           vendor catalog). A row is a duplicate with probability ``--dup-fraction`` (5%); a
           duplicate repeats a uniformly drawn earlier key, so the number of duplicates of every
           prefix is known exactly (the oracle every planner's count is checked against). The
           parts have no fingerprints: they are for the dedupe, not for finalize.
The generated library repeats each source molecule about N / 500k times, so a top-k list
holds many exact ties (a good test of the tie order) and fills sooner than on N distinct
molecules: search times are not those of a real N-molecule library; memory is.

Measurements, each in its own ``python scale_driver.py child ...`` process (peak RSS = that
process's ``VmHWM``, i.e. the driver's own, not Ray's workers; not ``ru_maxrss``, which Linux
carries across exec from the parent; CPU = its user + sys seconds):
  anchors             sha256 GB/s (the ledger hashes every task output in the driver) and the
                      driver CPU of an idle local Ray session per wall second
  dedupe serial       ``parts.plan_dedupe`` consumed fully (no Ray), where its index fits
                      (``--serial-max-rows``; about 200 B per record in the driver)
  dedupe partitioned  ``ingest._partitioned_plans`` with a ``Ledger`` under
                      ``ray_session(RuntimeSpec(mode="local", workers=2))``, P = ``--partitions``;
                      the driver CPU of the dedupe rounds per record is the "serial part"
  search              1,000 MOSES-test queries (fixed seed), top-100: ``SimilarityIndex`` in the
                      driver (engine cpu, 2 threads), resident (``index``) and streamed in parts
                      of ``--part-gib`` (``index_streamed``), and ``ShardedSearch`` (``sharded``,
                      2 Ray actors of 1 thread)
  screen              ``run_screen`` with similarity + QSAR (CHEMBL204_Ki, trained in the run),
                      as ``benchmarks/screen.py::run_large``, ``streaming=false`` (whole-library
                      columns in the driver: the 'before')
  screen_streaming    the same screen with ``streaming=true`` (``biogen.screen.streaming``); where
                      both ran at a size, their hits tables and metrics are compared (equal)
A measure runs up to the size in ``--max-rows`` (what fits this 23 GiB, 2-core machine: the
JSON says why each skipped one was skipped).

Correctness first: an exact plan-for-plan comparison of the two planners on ``--check-rows``
rows (keep, ids, duplicate_of, ordinals, drops) for P = 1, 3, 16; at every size each planner's
duplicate count equals the generator's and the keep flags of all parts hash alike; the
library passes ``verify_library`` (deep); the two searches return identical tables and,
at the first size, the top-100 scores of three queries equal a numpy brute force; a screen's
shard-0 scores equal the kernels' (similarity exactly, QSAR within 1e-5).

Targets (issue 21): driver peak RSS grows < 10% from the smallest to the largest size; the
serial part of a build (driver CPU of the dedupe) < 0.1 us per record.

    python benchmarks/scale_driver.py                         # 10M, 30M, 100M (what fits)
    python benchmarks/scale_driver.py --sizes 1M --check-rows 100000 --out /tmp/x.json
    python benchmarks/scale_driver.py --sizes 10M,30M --skip screen --keep

Big outputs go to ``--workdir`` and are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pac
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHARD_FILES = ("meta.parquet", "fp.npy", "popcnt.npy")
QUERY_SEED = 20261121  # as benchmarks/similarity.py
LETTERS = np.frombuffer(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
DIGITS = np.frombuffer(b"0123456789", dtype=np.uint8)


def parse_size(text: str) -> int:
    text = text.strip().upper()
    mult = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1], 1)
    return int(float(text[:-1] if mult > 1 else text) * mult)


def human(n: int) -> str:
    for unit, div in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{unit}"
    return str(n)


def fixed_strings(chars: np.ndarray) -> pa.Array:
    """An n x w uint8 array of characters -> a pyarrow string array of n w-character strings."""
    n, w = chars.shape
    offsets = np.arange(0, (n + 1) * w, w, dtype=np.int32)
    return pa.Array.from_buffers(pa.string(), n, [None, pa.py_buffer(offsets),
                                                  pa.py_buffer(np.ascontiguousarray(chars, np.uint8))])


def digit_strings(values: np.ndarray, prefix: bytes, width: int) -> pa.Array:
    """``prefix`` + ``values`` zero-padded to ``width`` digits, vectorized."""
    v = np.asarray(values, dtype=np.uint64).copy()
    chars = np.empty((len(v), len(prefix) + width), np.uint8)
    chars[:, :len(prefix)] = np.frombuffer(prefix, np.uint8)
    for col in range(len(prefix) + width - 1, len(prefix) - 1, -1):
        chars[:, col] = DIGITS[(v % np.uint64(10)).astype(np.intp)]
        v //= np.uint64(10)
    return fixed_strings(chars)


# ----------------------------------------------------------------------------- generator: library
@dataclass
class Source:
    """The real library the synthetic one is resampled from: all rows in shard order."""

    path: Path
    fps: np.ndarray        # M x W uint64
    pcs: np.ndarray        # M int32
    meta: pa.Table         # M rows: the shards' metadata
    manifest: dict


def load_source(path: Path) -> Source:
    from biogen.library import Library

    lib = Library.open(path)
    fps = np.concatenate([np.asarray(s.fingerprints) for s in lib.shards])
    pcs = np.concatenate([np.asarray(s.popcounts) for s in lib.shards]).astype(np.int32)
    return Source(Path(path), fps, pcs, lib.read_metadata().combine_chunks(), lib.manifest)


_SRC: Source | None = None  # set in the generator's worker processes (forked: shared pages)


@lru_cache(maxsize=4)
def epoch_perm(seed: int, epoch: int, m: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(m)


@lru_cache(maxsize=1)
def first_position(seed: int, m: int) -> np.ndarray:
    """Source row -> its position in epoch 0 (its first occurrence, whose id repeats cite)."""
    inv = np.empty(m, np.int64)
    inv[epoch_perm(seed, 0, m)] = np.arange(m)
    return inv


def write_library_shard(args: tuple) -> dict:
    """Shard ``k`` (positions [k*S, (k+1)*S)) of the pool; its manifest entry."""
    pool, k, shard_rows, seed = args
    src = _SRC
    m = len(src.pcs)
    g = np.arange(k * shard_rows, (k + 1) * shard_rows, dtype=np.int64)  # ordinals
    epoch, pos = g // m, g % m
    rows = np.empty(len(g), np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        rows[sel] = epoch_perm(seed, int(e), m)[pos[sel]]
    pc = src.pcs[rows]
    order = np.lexsort((g, pc))  # (popcount, ordinal), as finalize_part
    rows, g, pc, epoch = rows[order], g[order], pc[order], epoch[order]
    fps = src.fps[rows]
    first = first_position(seed, m)[rows]
    dup_of = digit_strings(first + 1, b"BG", 9)
    base = src.meta.take(pa.array(rows))
    meta = pa.table({
        "id": digit_strings(g + 1, b"BG", 9),
        "smiles": base.column("smiles"), "inchikey": base.column("inchikey"),
        "ordinal": pa.array(g, pa.int64()),
        "source": base.column("source"), "record": base.column("record"),
        "duplicate_of": pac.if_else(pa.array(epoch > 0), dup_of, pa.nulls(len(g), pa.string())),
        "id_generated": pa.array(np.ones(len(g), bool)),
        **{c: base.column(c) for c in base.column_names
           if c not in ("id", "smiles", "inchikey", "ordinal", "source", "record", "duplicate_of", "id_generated",
                        "props")},
        "props": base.column("props"),
    })
    name = f"000-{k:06d}"
    final = Path(pool) / "shards" / name
    tmp = Path(pool) / "shards" / f".tmp-{name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    pq.write_table(meta, tmp / "meta.parquet", compression="zstd")
    np.save(tmp / "fp.npy", np.ascontiguousarray(fps, dtype="<u8"))
    np.save(tmp / "popcnt.npy", pc.astype(np.int32))
    files = {}
    for f in SHARD_FILES:
        data = (tmp / f).read_bytes()
        files[f] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return {"name": name, "rows": int(len(g)), "popcount_min": int(pc.min()), "popcount_max": int(pc.max()),
            "files": files}


@contextmanager
def _pool(procs: int):
    """``imap(fn, items, chunksize)``: in this process for ``procs`` <= 1 (no fork: a fork
    of a process with threads, e.g. a test session's Ray, can deadlock), else a forked
    pool (the generator's command-line runs: the source's pages shared)."""
    import multiprocessing as mp

    if procs <= 1:
        yield lambda fn, items, chunksize: map(fn, items)
        return
    with mp.get_context("fork").Pool(procs) as p:
        yield lambda fn, items, chunksize: p.imap(fn, items, chunksize=chunksize)


def _init_source(src: Source) -> None:
    global _SRC
    _SRC = src


def extend_library_pool(pool: Path, source_path: Path, n_rows: int, shard_rows: int, seed: int,
                        procs: int) -> tuple[list[dict], dict]:
    """Make the pool hold at least ``n_rows`` rows; its shard entries (cached in pool/shards.json)."""
    state_file = pool / "shards.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"shards": []}
    if state.get("key", None) not in (None, [str(source_path), shard_rows, seed]):
        raise SystemExit(f"{pool} was generated with other settings ({state['key']}); delete it or use another "
                         "--workdir")
    have = len(state["shards"])
    need = -(-n_rows // shard_rows)
    t0 = time.perf_counter()
    if need > have:
        src = load_source(source_path)
        _init_source(src)
        (pool / "shards").mkdir(parents=True, exist_ok=True)
        with _pool(procs) as imap:
            for entry in imap(write_library_shard, [(str(pool), k, shard_rows, seed) for k in range(have, need)], 4):
                state["shards"].append(entry)
        _init_source(None)
        state["key"] = [str(source_path), shard_rows, seed]
        state["source_manifest"] = {k: v for k, v in src.manifest.items() if k not in ("shards", "history")}
        state["source_rows"] = len(src.pcs)
        state_file.write_text(json.dumps(state))
    return state["shards"][:need], {"shards_written": max(0, need - have), "seconds": round(time.perf_counter() - t0, 1),
                                    "source_manifest": state["source_manifest"], "source_rows": state["source_rows"]}


def library_view(pool: Path, entries: list[dict], source_manifest: dict, source_rows: int, out: Path,
                 seed: int) -> Path:
    """A library directory holding the first shards of the pool (symlinks) and their manifest."""
    from biogen.library.manifest import now_iso, tool_versions

    if out.exists():
        shutil.rmtree(out)
    (out / "shards").mkdir(parents=True)
    for e in entries:
        (out / "shards" / e["name"]).symlink_to((pool / "shards" / e["name"]).resolve())
    n = sum(e["rows"] for e in entries)
    manifest = dict(source_manifest)
    manifest.update({
        "created": now_iso(), "updated": now_iso(), "n_rows": n, "shards": entries, "rejected_total": 0,
        "dedupe": {"key": source_manifest["dedupe"]["key"], "mode": "keep_all"},
        "history": [{"action": "build", "time": now_iso(), "job_key": f"synthetic-{n}", "versions": tool_versions(),
                     "inputs": [{"path": source_manifest.get("_source_path", "synthetic"), "format": "synthetic"}],
                     "records_read": n, "rows_added": n, "duplicates": max(0, n - source_rows), "rejected": 0,
                     "rejected_by_reason": {}, "rejects_file": None, "shards": [e["name"] for e in entries],
                     "seconds": 0.0, "stage_seconds": {}, "resumed_shard_steps": 0,
                     "run": {"driver_sessions": 1, "resumed_shards": 0, "retries": []}}],
        "synthetic": {"generator": "benchmarks/scale_driver.py", "seed": seed, "source_rows": source_rows,
                      "note": "rows resampled in epochs (a seeded permutation of the source per epoch); a repeat's "
                              "duplicate_of is its epoch-0 copy"},
    })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return out


# ------------------------------------------------------------------------------- generator: parts
@lru_cache(maxsize=1)
def _dup_counts(n_parts: int, part_rows: int, frac: float, seed: int) -> np.ndarray:
    return np.array([int(dup_mask(p, part_rows, frac, seed).sum()) for p in range(n_parts)], dtype=np.int64)


def dup_mask(part: int, part_rows: int, frac: float, seed: int) -> np.ndarray:
    mask = np.random.default_rng([seed, 1, part]).random(part_rows) < frac
    if part == 0:
        mask[0] = False  # the first row has no earlier key to repeat
    return mask


def synthetic_keys(u: np.ndarray) -> pa.Array:
    """Key number -> an InChIKey-shaped string (14 letters, 8 + 'SA', 'N'); bijective in the
    first block (an odd multiplier mod 2^64, then 14 base-26 digits: 26^14 > 2^64)."""
    x = np.asarray(u, np.uint64) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
    y = x * np.uint64(0xBF58476D1CE4E5B9)
    chars = np.empty((len(x), 27), np.uint8)
    for col in range(14):
        chars[:, col] = LETTERS[(x % np.uint64(26)).astype(np.intp)]
        x //= np.uint64(26)
    for col in range(15, 23):
        chars[:, col] = LETTERS[(y % np.uint64(26)).astype(np.intp)]
        y //= np.uint64(26)
    chars[:, 14] = chars[:, 25] = ord("-")
    chars[:, 23], chars[:, 24], chars[:, 26] = ord("S"), ord("A"), ord("N")
    return fixed_strings(chars)


def write_parts_file(args: tuple) -> int:
    """Part ``p``: its keys (duplicates repeat an earlier key) and given ids; its duplicate count."""
    pool, p, part_rows, frac, seed, uniques_before = args
    mask = dup_mask(p, part_rows, frac, seed)
    fresh = np.cumsum(~mask) - (~mask)  # new keys before each row, within the part
    u = uniques_before + fresh  # the key number a new row gets
    rng = np.random.default_rng([seed, 2, p])
    avail = uniques_before + fresh[mask]  # keys that exist before each duplicate row
    u[mask] = (rng.random(int(mask.sum())) * avail).astype(np.int64)
    g = np.arange(p * part_rows, (p + 1) * part_rows, dtype=np.int64)
    table = pa.table({"inchikey": synthetic_keys(u), "id": digit_strings(g, b"Z", 10)})
    path = Path(pool) / f"{p:06d}.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)
    return int(mask.sum())


def extend_parts_pool(pool: Path, n_rows: int, part_rows: int, frac: float, seed: int, procs: int) -> dict:
    if n_rows % part_rows:
        raise SystemExit(f"size {n_rows} is not a multiple of --part-rows {part_rows}")
    pool.mkdir(parents=True, exist_ok=True)
    state_file = pool / "parts.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"parts": 0}
    if state.get("key", None) not in (None, [part_rows, frac, seed]):
        raise SystemExit(f"{pool} was generated with other settings ({state['key']}); delete it or use another "
                         "--workdir")
    need = n_rows // part_rows
    counts = _dup_counts(max(need, state["parts"]), part_rows, frac, seed)
    uniques_before = np.concatenate([[0], np.cumsum(part_rows - counts)])
    t0 = time.perf_counter()
    if need > state["parts"]:
        tasks = [(str(pool), p, part_rows, frac, seed, int(uniques_before[p])) for p in range(state["parts"], need)]
        with _pool(procs) as imap:
            for p, dups in zip(range(state["parts"], need), imap(write_parts_file, tasks, 8)):
                assert dups == counts[p]
        state.update(parts=need, key=[part_rows, frac, seed])
        state_file.write_text(json.dumps(state))
    return {"parts": need, "duplicates": int(counts[:need].sum()), "seconds": round(time.perf_counter() - t0, 1)}


def build_view(pool: Path, n_parts: int, out: Path) -> Path:
    """A library directory (empty: no manifest) with a build's work directory of the first parts."""
    if out.exists():
        shutil.rmtree(out)
    parts = out / "_work" / "000-build" / "parts"
    parts.mkdir(parents=True)
    for p in range(n_parts):
        (parts / f"{p:06d}.parquet").symlink_to((pool / f"{p:06d}.parquet").resolve())
    return out


# ------------------------------------------------------------------------------ child processes
def _cpu_s() -> float:
    """User + sys CPU seconds of this process alone (its threads included, not its children)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _status_mib(field: str) -> float:
    for ln in open("/proc/self/status"):
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) / 1024
    return float("nan")


class Meter:
    """Wall, driver CPU and peak RSS of a child process from here on.

    Peak RSS is ``VmHWM`` (the high-water mark of this process's own address space). Not
    ``ru_maxrss``: Linux carries a process's ``ru_maxrss`` across ``exec``, so a child of a
    big parent reports at least the parent's peak at the fork (kept as ``ru_maxrss_mib``)."""

    def __init__(self):
        self.cpu0, self.rss_start = _cpu_s(), _status_mib("VmRSS")
        self.t0 = time.perf_counter()

    def read(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.t0, 2), "driver_cpu_s": round(_cpu_s() - self.cpu0, 2),
                "peak_rss_mib": round(_status_mib("VmHWM"), 1), "rss_before_mib": round(self.rss_start, 1),
                # now (not the peak): anonymous memory vs file pages mapped in (memory-mapped shards)
                "rss_anon_now_mib": round(_status_mib("RssAnon"), 1),
                "rss_file_now_mib": round(_status_mib("RssFile"), 1),
                "ru_maxrss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}  # a shared 2-core VM


def _build_args(a: dict):
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.chem.standardize import StandardizeSpec
    from biogen.library.manifest import new_manifest

    lib_dir = Path(a["lib_dir"])
    work = lib_dir / "_work" / "000-build"
    parts = list(range(a["parts"]))
    manifest = new_manifest(FingerprintSpec().to_dict(), StandardizeSpec().to_dict(), [], "keep_first", "BG")
    return lib_dir, work, parts, manifest


def child_dedupe_serial(a: dict) -> dict:
    from biogen.library.parts import Dedupe, plan_dedupe

    lib_dir, work, parts, _ = _build_args(a)
    m = Meter()
    dd = Dedupe({}, set(), ordinal=0, mode="keep_first", id_prefix="BG", key="inchikey")
    h, kept = hashlib.sha256(), 0
    for plan in plan_dedupe(work, parts, dd):
        kept += int(plan.keep.sum())
        h.update(np.packbits(plan.keep).tobytes())
    out = m.read()
    return {**out, "driver_cpu_us_per_record": round(out["driver_cpu_s"] / a["rows"] * 1e6, 3),
            "planner_seconds": round(dd.seconds, 2), "duplicates": dd.duplicates, "kept": kept,
            "keep_sha256": h.hexdigest(), "index_keys": len(dd.first)}


def child_dedupe_partitioned(a: dict) -> dict:
    from biogen.library.dedupe import work_tag
    from biogen.library.ingest import _partitioned_plans
    from biogen.library.parts import Dedupe
    from biogen.runtime import Ledger, RuntimeSpec, ray_session

    lib_dir, work, parts, manifest = _build_args(a)
    P = a["partitions"]
    runtime = RuntimeSpec(mode="local", workers=2, progress=False)
    ledger_path = work / f"ledger-p{P}.jsonl"
    ledger_path.unlink(missing_ok=True)
    m = Meter()
    ledger = Ledger(ledger_path, f"scale-driver-p{P}", root=work)
    with ray_session(runtime) as slots:
        t_ray = time.perf_counter() - m.t0
        cpu_before = _cpu_s()
        t_before = time.perf_counter()
        dd = Dedupe({}, set(), ordinal=0, mode="keep_first", id_prefix="BG", key="inchikey")
        plans = _partitioned_plans(lib_dir, manifest, work, parts, {p: a["part_rows"] for p in parts}, P, dd,
                                   ledger, runtime, slots, "build")
        cpu_after = _cpu_s()
        t_dedupe = time.perf_counter() - t_before
    out = m.read()
    if plans is None:
        raise SystemExit("the partitioned dedupe fell back to the serial planner: the generator's ids are wrong")
    root = work / work_tag(P)
    files = [f for f in root.rglob("*") if f.is_file()]
    h, kept = hashlib.sha256(), 0
    for p in parts:  # the keep flags, from the rank files (after the measurement)
        keep = np.load(root / "rank" / f"n{p:06d}.npy") >= 0
        kept += int(keep.sum())
        h.update(np.packbits(keep).tobytes())
    res = {**out, "ray_start_s": round(t_ray, 2), "dedupe_wall_s": round(t_dedupe, 2),
           "dedupe_driver_cpu_s": round(cpu_after - cpu_before, 2),
           "driver_cpu_us_per_record": round((cpu_after - cpu_before) / a["rows"] * 1e6, 3),
           "planner_seconds": round(dd.seconds, 2), "duplicates": dd.duplicates, "kept": kept,
           "keep_sha256": h.hexdigest(), "dedupe_files": len(files),
           "dedupe_bytes": sum(f.stat().st_size for f in files),
           "ledger_bytes": ledger_path.stat().st_size, "ledger_entries": len(ledger.entries),
           "ledger_output_paths": sum(len(e["outputs"]) for e in ledger.entries.values())}
    shutil.rmtree(root)
    ledger_path.unlink()
    return res


def child_dedupe_exact(a: dict) -> dict:
    """Plan for plan: the partitioned dedupe (each P) equals the serial planner."""
    from biogen.library.dedupe import work_tag
    from biogen.library.ingest import _partitioned_plans
    from biogen.library.parts import Dedupe, plan_dedupe
    from biogen.runtime import Ledger, RuntimeSpec, ray_session

    lib_dir, work, parts, manifest = _build_args(a)
    serial = list(plan_dedupe(work, parts, Dedupe({}, set(), 0, "keep_first", "BG", "inchikey")))
    runtime = RuntimeSpec(mode="local", workers=2, progress=False)
    checked = {}
    with ray_session(runtime) as slots:
        for P in a["partitions"]:
            ledger = Ledger(work / f"ledger-check-p{P}.jsonl", f"scale-driver-check-p{P}", root=work)
            dd = Dedupe({}, set(), 0, "keep_first", "BG", "inchikey")
            planned = _partitioned_plans(lib_dir, manifest, work, parts, {p: a["part_rows"] for p in parts}, P, dd,
                                         ledger, runtime, slots, "build")
            assert planned is not None, "fell back to the serial planner"
            drops = id_mismatch_dropped = 0
            for s, pp in zip(serial, planned):
                q = pp.load()
                assert s.part == q.part
                assert np.array_equal(s.keep, q.keep), f"P={P} part {s.part}: keep differs"
                kept = np.flatnonzero(s.keep)
                assert [s.ids[i] for i in kept] == [q.ids[i] for i in kept], f"P={P} part {s.part}: ids differ"
                # DedupePlan.ids says "" for a dropped row: the serial planner's; the partitioned
                # plan keeps a dropped row's given id (unused: finalize reads kept rows' ids only)
                id_mismatch_dropped += sum(1 for i in np.flatnonzero(~s.keep) if s.ids[i] != q.ids[i])
                assert s.dup_of == q.dup_of, f"P={P} part {s.part}: duplicate_of differs"
                assert np.array_equal(s.ordinals, q.ordinals), f"P={P} part {s.part}: ordinals differ"
                assert s.drops == q.drops, f"P={P} part {s.part}: drops differ"
                drops += len(q.drops)
            checked[str(P)] = {"parts": len(parts), "drops": drops, "duplicates": dd.duplicates,
                               "dropped_rows_whose_plan_id_differs": id_mismatch_dropped}
            shutil.rmtree(work / work_tag(P))
            (work / f"ledger-check-p{P}.jsonl").unlink()
    return {"rows": a["rows"], "serial_duplicates": sum(len(s.drops) for s in serial), "partitioned": checked,
            "compared": "keep, ids of kept rows, duplicate_of, ordinals and drops of every part"}


def _hits_digest(t: pa.Table, path: str | None) -> dict:
    t = t.select(["query_index", "rank", "hit_id", "score"])
    if path:
        pq.write_table(t, path)
    return {"hits": t.num_rows, "queries_with_hits": len(set(t.column("query_index").to_pylist()))}


def child_search_index(a: dict) -> dict:
    from biogen.search import SimilarityIndex

    smiles = Path(a["queries"]).read_text().split()
    m = Meter()
    index = SimilarityIndex.open(a["library"], engine="cpu", workers=2, part_bytes=a.get("part_bytes"))
    t_open = time.perf_counter() - m.t0
    t0 = time.perf_counter()
    q = index.queries(smiles)
    t_feat = time.perf_counter() - t0
    t0 = time.perf_counter()
    hits = index.top_k(q, k=a["k"])
    t_search = time.perf_counter() - t0
    out = m.read()
    return {**out, "open_s": round(t_open, 2), "featurize_s": round(t_feat, 2), "search_s": round(t_search, 2),
            "queries": len(q), "k": a["k"], "part_bytes": a.get("part_bytes") or "default (half the available memory)",
            "streamed": index.streamed, "parts": len(index._groups),
            "speculation": dict(index.speculation),
            "pairs_per_s": round(len(q) * index.n_rows / t_search), **_hits_digest(hits, a.get("save"))}


def child_search_sharded(a: dict) -> dict:
    from biogen.runtime import RuntimeSpec, ray_session
    from biogen.search.distributed import ShardedSearch

    smiles = Path(a["queries"]).read_text().split()
    m = Meter()
    with ray_session(RuntimeSpec(mode="local", workers=2, progress=False)):
        t_ray = time.perf_counter() - m.t0
        t0 = time.perf_counter()
        with ShardedSearch(a["library"], actors=2, engine="cpu", workers=1) as s:
            t_open = time.perf_counter() - t0
            t0 = time.perf_counter()
            hits = s.top_k(smiles, k=a["k"])
            t_search = time.perf_counter() - t0
        out = m.read()
    return {**out, "ray_start_s": round(t_ray, 2), "open_s (actors load their slices)": round(t_open, 2),
            "search_s (featurize + search + merge)": round(t_search, 2), "actors": 2, "k": a["k"],
            **_hits_digest(hits, a.get("save"))}


def child_screen(a: dict) -> dict:
    import pyarrow.feather as feather

    from biogen.library import Library
    from biogen.runtime import RuntimeSpec
    from biogen.screen.pipeline import run_screen
    from biogen.screen.presets import LibrarySpec
    from biogen.screen.selection import SelectionSpec
    from biogen.screen.stages import QSARScorer, SimilarityScorer
    from biogen.screen.target import TargetSpec

    target = TargetSpec(name="CHEMBL204_Ki", moleculeace="CHEMBL204_Ki")
    run_dir = Path(a["out"])
    m = Meter()
    res = run_screen(LibrarySpec(path=a["library"]), target, [],
                     [SimilarityScorer(name="similarity"),
                      QSARScorer(model={"task": "regression", "max_epochs": 40, "patience": 6}, name="qsar")],
                     selection=SelectionSpec(n=100, top_m=2000), runtime=RuntimeSpec(workers=2, progress=False),
                     run_dir=run_dir, report=True, streaming=a.get("streaming", "false"))
    out = m.read()
    # correctness (after the measurement): shard 0's scores equal the kernels'
    import torch

    from biogen.models.qsar import QSARPredictor
    from biogen.screen.target import load_target
    from biogen.search.fused import fused_similarity

    lib = Library.open(a["library"])
    tdata = load_target(target, lib.featurizer, lib.standardize)
    shard = lib.shards[0]
    fps, pcs = np.asarray(shard.fingerprints), np.asarray(shard.popcounts, dtype=np.int32)
    sim = fused_similarity(tdata.actives.fps, tdata.actives.popcount, fps, pcs)
    ckpt = next((run_dir / "model").glob("*.ckpt"))
    torch.set_num_threads(1)
    qs = QSARPredictor.load(ckpt).predict(fps)
    table = feather.read_table(run_dir / f"shards/{shard.name}.arrow")
    assert np.array_equal(table.column("similarity").to_numpy(), sim), "pipeline similarity differs from the kernel"
    assert np.allclose(table.column("qsar").to_numpy(), qs, rtol=0, atol=1e-5), "pipeline QSAR differs from predict"
    s = res.seconds
    return {**out, "molecules": lib.n_rows, "shards": len(lib.shards),
            "seconds": {k: round(v, 2) for k, v in s.items()}, "funnel": res.funnel, "hits": res.hits.num_rows,
            "correctness": "shard 0 scores equal the kernels' (similarity exactly, QSAR within 1e-5)"}


def child_ray_idle(a: dict) -> dict:
    """Anchor: the CPU a local Ray session's driver spends doing nothing (its core-worker and
    gRPC threads), per second of wall time: a floor under the partitioned dedupe's driver CPU."""
    from biogen.runtime import RuntimeSpec, ray_session

    with ray_session(RuntimeSpec(mode="local", workers=2, progress=False)):
        time.sleep(3)  # past the start
        m = Meter()
        time.sleep(a["seconds"])
        out = m.read()
    return {**out, "driver_cpu_s_per_wall_s": round(out["driver_cpu_s"] / out["wall_s"], 4)}


def sha256_rate(mib: int = 256) -> float:
    """Anchor: sha256 GB/s of this machine (the ledger hashes every output file in the driver)."""
    data = np.random.default_rng(0).bytes(mib << 20)
    best = min(_timed(lambda: hashlib.sha256(data).digest()) for _ in range(3))
    return round(len(data) / best / 1e9, 3)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


CHILDREN = {"ray_idle": child_ray_idle, "dedupe_serial": child_dedupe_serial, "dedupe_partitioned": child_dedupe_partitioned,
            "dedupe_exact": child_dedupe_exact, "search_index": child_search_index,
            "search_sharded": child_search_sharded, "screen": child_screen, "screen_streaming": child_screen}


def child_main(kind: str, arg: str) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    from rdkit import rdBase

    rdBase.DisableLog("rdApp.*")
    res = CHILDREN[kind](json.loads(arg))
    print("RESULT " + json.dumps(res, default=str), flush=True)


# ------------------------------------------------------------------------------------ the parent
def run_child(kind: str, log_dir: Path, timeout: float, **arg) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", kind, json.dumps(arg)]
    log = log_dir / f"{kind}-{int(time.time())}.log"
    t0 = time.perf_counter()
    try:
        with open(log, "w") as fh:
            p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s", "log": str(log)}
    wall = time.perf_counter() - t0
    line = next((ln for ln in reversed(p.stdout.splitlines()) if ln.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        tail = log.read_text()[-3000:]
        return {"error": f"exit {p.returncode}", "stderr_tail": tail, "log": str(log)}
    return {**json.loads(line[7:]), "process_wall_s": round(wall, 1)}


def draw_queries(n: int, seed: int, path: Path) -> Path:
    import gzip

    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as f:
        smiles = [ln.split(",")[0] for i, ln in enumerate(f) if i > 0]
    rng = np.random.default_rng(seed)
    path.write_text("\n".join(smiles[i] for i in rng.choice(len(smiles), n, replace=False)) + "\n")
    return path


def brute_force_check(library: Path, queries: Path, hits_file: Path, n_queries: int, k: int) -> dict:
    """Top-k scores of the first queries by numpy over every shard == the search's."""
    from biogen.library import Library
    from biogen.search.queries import Queries

    lib = Library.open(library)
    smiles = queries.read_text().split()[:n_queries]
    q = Queries.from_smiles(smiles, lib.featurizer, lib.standardize)
    hits = pq.read_table(hits_file)
    scores = [[] for _ in range(len(q))]
    for s in lib.shards:
        fp = np.asarray(s.fingerprints)
        pc = np.asarray(s.popcounts, np.int64)
        for i in range(len(q)):
            c = np.bitwise_count(fp & q.fps[i]).sum(axis=1, dtype=np.int64)
            t = c / (pc + int(q.popcount[i]) - c)
            scores[i].append(np.partition(t, -k)[-k:] if len(t) > k else t)
    for i in range(len(q)):
        want = np.sort(np.concatenate(scores[i]))[::-1][:k]
        got = hits.filter(pac.equal(hits.column("query_index"), i)).column("score").to_numpy()
        assert np.array_equal(np.sort(got)[::-1], want), f"query {i}: top-{k} scores differ from the brute force"
    return {"queries": len(q), "k": k, "result": "top-k scores equal a numpy brute force over every row"}


def fits_serial(rows: int, max_rows: int | None) -> bool:
    if max_rows is not None:
        return rows <= max_rows
    import psutil

    return rows * 210 < 0.7 * psutil.virtual_memory().available  # ~200 B/record measured at 10M and 30M


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")


MEASURES = ("index", "index_streamed", "sharded", "screen", "screen_streaming")
# what the in-driver SimilarityIndex and the search actors hold: about 1.1 KB per row at the
# peak (measured at 1M: ids/SMILES/id ranks ~0.3 KB, a part's fingerprints twice while it is
# sorted, the memory-mapped shard pages); more than this machine has beyond 10M rows
DEFAULT_MAX_ROWS = "index=10M,index_streamed=30M,sharded=10M,screen=30M,screen_streaming=100M"
WHY_SKIPPED = {
    "index": "the resident index peaks at ~1.1 KB/row in the driver (measured): beyond this size it does not fit "
             "this 23 GiB machine, although its own budget (300 B/row vs half the available memory) would try",
    "sharded": "each of the 2 actors holds its slice resident at ~1.1 KB/row (ShardedSearch has no part_bytes): "
               "beyond this size the actors do not fit this machine's memory",
    "screen": "memory: the screen's driver grew 3.7 -> 8.5 GiB from 10M to 30M (~0.24 KiB/row), so ~25 GiB at "
              "100M, more than this machine has (and ~12 min of shards on 2 cores)",
    "screen_streaming": "~12 min of shards on 2 cores at 100M, and the rounds after them",
    "index_streamed": "the streamed index still holds every row's id, SMILES and id rank in the driver (~0.3 KB/row "
                      "measured): beyond this size they alone do not fit this machine",
}


def measure_rows(result: dict) -> list[tuple]:
    rows = []
    for size, r in result["sizes"].items():
        for name, v in r.get("dedupe", {}).items():
            rows.append((size, f"dedupe {name}", v.get("peak_rss_mib"), v.get("driver_cpu_us_per_record"),
                         v.get("dedupe_wall_s", v.get("wall_s")), v.get("error") or v.get("skipped")))
        for name, v in r.get("search", {}).items():
            rows.append((size, f"search {name}", v.get("peak_rss_mib"), None, v.get("wall_s"),
                         v.get("error") or v.get("skipped")))
        for name in ("screen", "screen_streaming"):
            if name in r:
                v = r[name]
                rows.append((size, name, v.get("peak_rss_mib"), None, v.get("wall_s"), v.get("error") or v.get("skipped")))
    return rows


def print_table(result: dict) -> None:
    print(f"\n{'size':>6} {'measure':<30} {'driver peak RSS MiB':>20} {'driver CPU us/rec':>18} {'wall s':>9}")
    for size, name, rss, cpu, wall, note in measure_rows(result):
        f = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
        print(f"{size:>6} {name:<30} {f(rss, 0):>20} {f(cpu, 3):>18} {f(wall, 1):>9}"
              + (f"  ({str(note)[:60]})" if note else ""))
    for k, v in result.get("targets", {}).items():
        print(f"target {k}: {v}")


def summarize_targets(result: dict) -> dict:
    """RSS growth from the smallest to the largest size each measure ran at; the dedupe's serial part."""
    out = {}
    series: dict[str, list[tuple[str, float]]] = {}
    for size, r in result["sizes"].items():
        for group in ("dedupe", "search"):
            for name, v in r.get(group, {}).items():
                if v.get("peak_rss_mib"):
                    series.setdefault(f"{group} {name}", []).append((size, v["peak_rss_mib"]))
        for name in ("screen", "screen_streaming"):
            if r.get(name, {}).get("peak_rss_mib"):
                series.setdefault(name, []).append((size, r[name]["peak_rss_mib"]))
    for name, pts in series.items():
        if len(pts) >= 2:
            (s0, a), (s1, b) = pts[0], pts[-1]
            out[f"{name}: driver peak RSS {s0} -> {s1}"] = \
                f"{a:.0f} -> {b:.0f} MiB ({b / a - 1:+.1%}; target < +10%: {'met' if b / a < 1.1 else 'missed'})"
    anchors = result.get("anchors", {})
    sha, idle = anchors.get("sha256_gb_per_s"), anchors.get("ray_idle", {}).get("driver_cpu_s_per_wall_s")
    for size, r in result["sizes"].items():
        for name, v in r.get("dedupe", {}).items():
            if v.get("driver_cpu_us_per_record") is not None:
                x = v["driver_cpu_us_per_record"]
                text = f"{x:.3f} us/record (target < 0.1: {'met' if x < 0.1 else 'missed'})"
                if sha and idle and "dedupe_bytes" in v:
                    # where it goes, estimated from the anchors: the ledger's sha256 of every output
                    # file, and Ray's own driver threads over the dedupe's wall time
                    hashing = v["dedupe_bytes"] / (sha * 1e9) / r["rows"] * 1e6
                    ray_idle = idle * v["dedupe_wall_s"] / r["rows"] * 1e6
                    text += (f"; of which ~{hashing:.3f} the ledger's sha256 of {v['dedupe_bytes'] / 2**20:.0f} MiB of "
                             f"outputs, ~{ray_idle:.3f} Ray's idle driver threads over {v['dedupe_wall_s']:.0f} s, "
                             f"~{max(x - hashing - ray_idle, 0):.3f} the rest ({v['ledger_entries']} tasks)")
                out[f"dedupe {name} at {size}: driver CPU (the serial part)"] = text
    return out


def run_dedupe(res: dict, n: int, label: str, args, parts_pool: Path, part_rows: int, partitions: list[int],
               serial: bool, suffix: str, work: Path, logs: Path, result: dict) -> None:
    g = extend_parts_pool(parts_pool, n, part_rows, args.dup_fraction, args.seed, args.procs)
    result["generator"][f"parts {label} ({part_rows}-row parts)"] = g
    view = build_view(parts_pool, g["parts"], work / f"build_{label}{suffix}")
    common = dict(lib_dir=str(view), parts=g["parts"], part_rows=part_rows, rows=n)
    ded = res.setdefault("dedupe", {})
    names = []
    if serial:
        names.append("serial")
        if fits_serial(n, args.serial_max_rows):
            ded["serial"] = run_child("dedupe_serial", logs, args.timeout, **common)
        else:
            ded["serial"] = {"skipped": f"the serial planner's index (~200 B/record measured: ~{n * 200 / 2**30:.0f} "
                                        "GiB) does not fit this machine's available memory (with a 30% margin: "
                                        "the machine is shared)"}
        save(result, args.out)
    for P in partitions:
        names.append(f"partitioned_p{P}{suffix}")
        ded[names[-1]] = {"part_rows": part_rows, **run_child(
            "dedupe_partitioned", logs, args.timeout, partitions=P, **common)}
        save(result, args.out)
    ran = {k: ded[k] for k in names if "duplicates" in ded[k]}
    for name, v in ran.items():
        assert v["duplicates"] == g["duplicates"], f"{label} {name}: {v['duplicates']} duplicates, " \
                                                   f"generator made {g['duplicates']}"
        assert v["kept"] == n - g["duplicates"]
    digests = {v["keep_sha256"] for v in ran.values()}
    assert len(digests) <= 1, f"{label}: the planners' keep flags differ"
    res.setdefault("dedupe_check", {})[f"{part_rows}-row parts"] = {
        "generator_duplicates": g["duplicates"], "planners": list(ran),
        "result": "each planner's duplicate count = the generator's; the keep flags of every part hash alike"
        if ran else "nothing ran"}
    print(f"{label} dedupe ({part_rows}-row parts): " + ", ".join(
        f"{k} {ded[k].get('peak_rss_mib')} MiB {ded[k].get('driver_cpu_us_per_record')} us/rec "
        f"{ded[k].get('error', '')}" for k in names), flush=True)
    shutil.rmtree(view)

def _close_metrics(a, b) -> bool:
    """summary.json metrics equal, floats within 1e-12 (the streaming BEDROC sums per tie block)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close_metrics(a[k], b[k]) for k in a)
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-12
    return a == b


def run_library_measures(res: dict, n: int, label: str, want: list[str], args, work: Path, logs: Path,
                         queries: Path, first: bool, result: dict) -> None:
    entries, gen = extend_library_pool(work / "lib_pool", args.source, n, args.shard_rows, args.seed, args.procs)
    result["generator"][f"library {label}"] = {k: v for k, v in gen.items() if k != "source_manifest"}
    lib = library_view(work / "lib_pool", entries, gen["source_manifest"], gen["source_rows"], work / f"lib_{label}",
                       args.seed)
    from biogen.library.verify import verify_library

    t0 = time.perf_counter()
    rep = verify_library(lib, deep=True)
    if not rep.ok:
        raise SystemExit(f"generated library {lib} fails verify: {rep.problems[:5]}")
    res["library"] = {"shards": len(entries), "verify": "ok (deep: sha256, shapes, popcounts, order)",
                      "verify_s": round(time.perf_counter() - t0, 1),
                      "bytes": sum(f["bytes"] for e in entries for f in e["files"].values())}
    print(f"{label} library: {len(entries)} shards, verify ok", flush=True)
    save(result, args.out)
    srch = res.setdefault("search", {})
    saved = {}
    q = dict(library=str(lib), queries=str(queries), k=args.k)
    for m, kind, extra in (("index", "search_index", {}),
                           ("index_streamed", "search_index", {"part_bytes": int(args.part_gib * 2**30)}),
                           ("sharded", "search_sharded", {})):
        if m in want:
            saved[m] = work / f"hits_{m}_{label}.parquet"
            srch[m] = run_child(kind, logs, args.timeout, save=str(saved[m]), **q, **extra)
            save(result, args.out)
    have = {k: p for k, p in saved.items() if p.is_file()}
    tables = [pq.read_table(p) for p in have.values()]
    assert all(t.equals(tables[0]) for t in tables[1:]), f"{label}: the searches' results differ"
    if len(tables) > 1:
        res["search_check"] = f"{', '.join(have)}: identical result tables"
    if have and first:
        res["search_brute_force"] = brute_force_check(lib, queries, next(iter(have.values())), 3, args.k)
    for p in have.values():
        p.unlink()
    print(f"{label} search: " + ", ".join(f"{k} {v.get('peak_rss_mib')} MiB {v.get('wall_s')} s {v.get('error', '')}"
                                          for k, v in srch.items()), flush=True)
    hits = {}
    for m in ("screen", "screen_streaming"):
        if m not in want:
            continue
        out = work / f"{m}_{label}"
        shutil.rmtree(out, ignore_errors=True)
        res[m] = run_child(m, logs, args.timeout, library=str(lib), out=str(out),
                           streaming="true" if m == "screen_streaming" else "false")
        if (out / "hits.parquet").is_file():
            hits[m] = (pq.read_table(out / "hits.parquet"), json.loads((out / "summary.json").read_text())["metrics"])
        shutil.rmtree(out, ignore_errors=True)
        print(f"{label} {m}: {res[m].get('peak_rss_mib')} MiB {res[m].get('wall_s')} s {res[m].get('error', '')}",
              flush=True)
    if len(hits) == 2:
        (a, ma), (b, mb) = hits.values()
        assert a.equals(b), f"{label}: the streaming screen's hits differ from the in-memory screen's"
        assert _close_metrics(ma, mb), f"{label}: the streaming screen's metrics differ: {ma} vs {mb}"
        res["screen_check"] = ("streaming and in-memory screens: identical hits tables; metrics equal (BEDROC "
                               "within 1e-12)" if ma else "streaming and in-memory screens: identical hits tables "
                               "(no labelled actives in this library: no metrics)")
    shutil.rmtree(lib)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=Path("/tmp/bw/lib500k"), help="the real library resampled")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/scale_driver"))
    ap.add_argument("--sizes", default="10M,30M,100M")
    ap.add_argument("--shard-rows", type=int, default=10_000, help="library shard rows (a build's default chunk)")
    ap.add_argument("--part-rows", type=int, default=100_000, help="rows per build part (chunk_size=100000)")
    ap.add_argument("--default-chunk-sizes", default="10M",
                    help="sizes at which the partitioned dedupe also runs on 10,000-row parts (the default chunk)")
    ap.add_argument("--default-chunk-partitions", default="16")
    ap.add_argument("--dup-fraction", type=float, default=0.05)
    ap.add_argument("--partitions", default="16,64")
    ap.add_argument("--check-rows", type=int, default=200_000, help="rows of the exact planner comparison (0: skip)")
    ap.add_argument("--serial-max-rows", type=int, default=None,
                    help="largest size the serial planner runs at (default: what fits in the available memory)")
    ap.add_argument("--skip", default="", help="comma list of: anchors, dedupe, " + ", ".join(MEASURES))
    ap.add_argument("--max-rows", default=DEFAULT_MAX_ROWS, help="largest size per measure")
    ap.add_argument("--part-gib", type=float, default=2.0, help="part_bytes of the index_streamed measure (GiB)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--seed", type=int, default=21)
    ap.add_argument("--procs", type=int, default=len(os.sched_getaffinity(0)), help="generator processes")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per measurement process")
    ap.add_argument("--keep", action="store_true", help="keep the generated data under --workdir")
    ap.add_argument("--out", type=Path, default=RESULTS / "scale_driver.json")
    ap.add_argument("--update", action="store_true", help="add the sizes run now to an existing --out")
    args = ap.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",") if s]
    partitions = [int(p) for p in args.partitions.split(",") if p]
    skip = {s for s in args.skip.split(",") if s}
    max_rows = {k: parse_size(v) for k, v in (x.split("=") for x in args.max_rows.split(",") if x)}
    default_chunk_sizes = {parse_size(s) for s in args.default_chunk_sizes.split(",") if s}
    work = args.workdir
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "scale_driver", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "versions": versions("torch"),
              "command": " ".join(["python", "benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
              "load_average_at_start": os.getloadavg(),
              "settings": {"source": str(args.source), "shard_rows": args.shard_rows, "part_rows": args.part_rows,
                           "dup_fraction": args.dup_fraction, "partitions": partitions, "queries": args.queries,
                           "k": args.k, "seed": args.seed, "runtime": "local Ray, workers=2",
                           "max_rows": max_rows, "index_streamed_part_bytes": int(args.part_gib * 2**30)},
              "measured_as": "each measurement in a fresh process; peak RSS = VmHWM of that process (the "
                             "driver; Ray's workers are other processes; ru_maxrss is not used: Linux keeps it "
                             "across exec, so it would report the parent's peak), file pages of memory-mapped shards "
                             "included (rss_*_now_mib split the end state); driver CPU = its user + sys seconds; "
                             "for the partitioned dedupe, the CPU and wall of the dedupe rounds alone (Ray's "
                             "start excluded) divided by the records",
              "generator": {}, "correctness": {}, "sizes": {}}
    if args.update and args.out.is_file():
        old = json.loads(args.out.read_text())
        old.setdefault("runs", []).append({k: result[k] for k in ("date", "command", "load_average_at_start")})
        for k in ("generator", "correctness", "sizes"):
            old.setdefault(k, {}).update(result[k])
        result = old
    queries = draw_queries(args.queries, QUERY_SEED, work / "queries.smi")
    pool_of = lambda rows: work / f"parts_pool_{rows}"  # noqa: E731

    # correctness first: the two planners, plan for plan
    if args.check_rows and "dedupe" not in skip:
        check_rows = 10_000
        g = extend_parts_pool(pool_of(check_rows), args.check_rows, check_rows, args.dup_fraction, args.seed,
                              args.procs)
        view = build_view(pool_of(check_rows), g["parts"], work / "build_check")
        r = run_child("dedupe_exact", logs, args.timeout, lib_dir=str(view), parts=g["parts"],
                      part_rows=check_rows, rows=args.check_rows, partitions=[1, 3, 16])
        if "error" in r:
            raise SystemExit(f"exact dedupe check failed: {r}")
        assert r["serial_duplicates"] == g["duplicates"], (r, g)
        result["correctness"]["dedupe_exact"] = {**r, "part_rows": check_rows, "generator_duplicates": g["duplicates"]}
        print(f"dedupe exact check on {args.check_rows:,} rows: ok ({g['duplicates']:,} duplicates)", flush=True)
        shutil.rmtree(view)

    if "anchors" not in skip:
        result["anchors"] = {"sha256_gb_per_s": sha256_rate(),
                             "ray_idle": run_child("ray_idle", logs, args.timeout, seconds=30)}
        save(result, args.out)

    for i, n in enumerate(sizes):
        label = human(n)
        res = result["sizes"].setdefault(label, {"rows": n})
        save(result, args.out)
        if "dedupe" not in skip:
            run_dedupe(res, n, label, args, pool_of(args.part_rows), args.part_rows, partitions, True, "", work,
                       logs, result)
            if n in default_chunk_sizes:
                run_dedupe(res, n, label, args, pool_of(10_000), 10_000,
                           [int(p) for p in args.default_chunk_partitions.split(",") if p], False, "_parts10k",
                           work, logs, result)
        want = [m for m in MEASURES if m not in skip and n <= max_rows.get(m, n)]
        for m in MEASURES:
            if m not in skip and m not in want:
                where = res.setdefault("search", {}) if not m.startswith("screen") else res
                where[m] = {"skipped": f"above --max-rows {m}={human(max_rows[m])}: {WHY_SKIPPED[m]}"}
        if want:
            run_library_measures(res, n, label, want, args, work, logs, queries, i == 0, result)
        result["targets"] = summarize_targets(result)
        save(result, args.out)

    result["targets"] = summarize_targets(result)
    result["disk_free_gib_at_end"] = round(shutil.disk_usage(work).free / 2**30, 1)
    save(result, args.out)
    if not args.keep:
        for d in [*work.glob("parts_pool_*"), work / "lib_pool"]:
            shutil.rmtree(d, ignore_errors=True)
    print_table(result)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_main(sys.argv[2], sys.argv[3])
    else:
        main()
