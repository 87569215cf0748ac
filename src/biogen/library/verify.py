"""``library info`` and ``library verify``: what a library holds, and whether it is intact."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from biogen.chem.fingerprints import popcounts
from biogen.library.parts import WORK
from biogen.library.manifest import SHARD_FILES
from biogen.library.store import Library
from biogen.files import sha256_file


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def library_info(path: str | Path) -> dict:
    """Counts, parameters, size on disk and history of a library (JSON-serializable)."""
    lib = Library.open(path)
    m = lib.manifest
    pending = sorted(p.name for p in (lib.path / WORK).iterdir()) if (lib.path / WORK).is_dir() else []
    return {
        "path": str(lib.path),
        "rows": m["n_rows"],
        "shards": len(m["shards"]),
        "rejected_total": m.get("rejected_total", 0),
        "bytes_on_disk": _dir_bytes(lib.path),
        "fingerprint_bytes": sum(s["files"]["fp.npy"]["bytes"] for s in m["shards"]),
        "featurizer": m["featurizer"],
        "standardize": m["standardize"],
        "descriptors": m["descriptors"],
        "dedupe": m["dedupe"],
        "created": m["created"],
        "updated": m["updated"],
        "history": [
            {k: h.get(k) for k in ("action", "time", "records_read", "rows_added", "duplicates",
                                   "rejected", "rejects_file", "seconds")}
            | {"inputs": [i["path"] for i in h["inputs"]], "biogen": h["versions"]["biogen"],
               "rdkit": h["versions"]["rdkit"]}
            for h in m["history"]
        ],
        "unfinished_jobs": pending,
        "key_index": _key_index(lib.path, m),
        "embeddings": {model: {"version": e["version"], "dim": e["dim"], "dtype": e["dtype"],
                               "compute_dtype": e.get("compute_dtype"), "weights_sha256": e["weights_sha256"],
                               "shards": len(e["shards"]), "rows": sum(s["rows"] for s in e["shards"].values()),
                               "failed": e.get("n_failed", 0), "failed_by_reason": e.get("failed_by_reason", {}),
                               "bytes": sum(f["bytes"] for s in e["shards"].values() for f in s["files"].values())}
                       for model, e in sorted((m.get("embeddings") or {}).items())},
    }


def _key_index(path: Path, manifest: dict) -> dict | None:
    """The partitioned dedupe's key index (``biogen.library.dedupe``): its partitions, the
    segments it holds of the library's and its size; None when there is none."""
    from biogen.library.dedupe import index_dir, index_segments, indexed_partitions

    found = indexed_partitions(path)
    if not found:
        return None
    d = index_dir(path, found[0])
    files = {f.name for f in d.iterdir() if f.suffix == ".arrow"}
    segments = index_segments(manifest)
    return {"partitions": found[0], "segments_indexed": sum(seg.file in files for seg in segments),
            "segments": len(segments), "bytes": _dir_bytes(d)}


def format_info(info: dict) -> str:
    def human(n: int) -> str:
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if n < 1024:
                return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
            n /= 1024
        return f"{n:.1f} PiB"

    f = info["featurizer"]
    lines = [
        f"library      {info['path']}",
        f"molecules    {info['rows']:,} in {info['shards']} shards ({info['rejected_total']:,} records rejected)",
        f"size         {human(info['bytes_on_disk'])} (fingerprints {human(info['fingerprint_bytes'])})",
        "featurizer   " + ", ".join(f"{k}={v}" for k, v in f.items()),
        "standardize  " + ", ".join(f"{k}={v}" for k, v in info["standardize"].items()),
        "descriptors  " + ", ".join(info["descriptors"]),
        f"dedupe       {info['dedupe']['mode']} by {info['dedupe']['key']}",
        f"created      {info['created']}   updated {info['updated']}",
        "history:",
    ]
    for i, h in enumerate(info["history"]):
        lines.append(
            f"  {i:3d} {h['action']:<6} {h['time']}  read {h['records_read']:,}  added {h['rows_added']:,}"
            f"  duplicates {h['duplicates']:,}  rejected {h['rejected']:,}  {h['seconds']:.1f}s"
            f"  (biogen {h['biogen']}, rdkit {h['rdkit']})"
        )
        lines.append(f"      inputs: {', '.join(h['inputs'])}; rejects: {h['rejects_file']}")
    for model, e in info["embeddings"].items():
        complete = "complete" if e["shards"] == info["shards"] else f"{e['shards']} of {info['shards']} shards"
        lines.append(f"embeddings   {model} {e['version']} ({e['dim']}-d {e['dtype']}, computed in {e['compute_dtype']}; "
                     f"{complete}; {e['rows']:,} rows, {e['failed']:,} without a vector; {human(e['bytes'])})")
    if info.get("key_index"):
        k = info["key_index"]
        lines.append(f"key index    {k['partitions']} partitions; {k['segments_indexed']} of {k['segments']} segments "
                     f"indexed ({human(k['bytes'])}; the next partitioned append splits the rest)")
    if info["unfinished_jobs"]:
        lines.append("unfinished jobs (rerun the same command to finish them): " + ", ".join(info["unfinished_jobs"]))
    return "\n".join(lines)


@dataclass
class VerifyReport:
    path: str
    shards_checked: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_library(path: str | Path, *, deep: bool = True) -> VerifyReport:
    """Re-hash every shard file against the manifest; with ``deep``, also check contents
    (row counts, shapes, popcounts equal to the fingerprints, popcount order)."""
    lib = Library.open(path)
    report = VerifyReport(str(lib.path))
    listed = set()
    for s, shard in zip(lib.manifest["shards"], lib.shards):
        listed.add(s["name"])
        report.shards_checked += 1
        where = f"shard {s['name']}"
        missing = [f for f in SHARD_FILES if not (shard.path / f).is_file()]
        if missing:
            report.problems.append(f"{where}: missing file(s) {missing}")
            continue
        bad = []
        for f in SHARD_FILES:
            expect = s["files"][f]
            fpath = shard.path / f
            if fpath.stat().st_size != expect["bytes"]:
                bad.append(f"{f} has {fpath.stat().st_size} bytes, manifest says {expect['bytes']}")
            elif sha256_file(fpath) != expect["sha256"]:
                bad.append(f"{f} sha256 differs from the manifest")
        if bad:
            report.problems.append(f"{where}: " + "; ".join(bad) + " (corrupted: restore it from a backup or rebuild)")
            continue
        if deep:
            try:
                fp, pc = shard.fingerprints, np.asarray(shard.popcounts)
                n_meta = pq.ParquetFile(shard.path / "meta.parquet").metadata.num_rows
            except Exception as exc:  # unreadable despite matching hashes: report, do not crash
                report.problems.append(f"{where}: unreadable ({exc})")
                continue
            if not (fp.shape[0] == pc.shape[0] == n_meta == s["rows"]):
                report.problems.append(f"{where}: row counts differ (fp {fp.shape[0]}, popcounts "
                                       f"{pc.shape[0]}, metadata {n_meta}, manifest {s['rows']})")
            elif not np.array_equal(popcounts(np.asarray(fp)), pc):
                report.problems.append(f"{where}: stored popcounts do not match the fingerprints")
            elif len(pc) and np.any(np.diff(pc) < 0):
                report.problems.append(f"{where}: rows are not sorted by popcount")
    from biogen.library.embeddings import verify_embeddings

    problems, warnings = verify_embeddings(lib.path, lib.manifest, deep)
    report.problems += problems
    report.warnings += warnings
    total = sum(s["rows"] for s in lib.manifest["shards"])
    if total != lib.n_rows:
        report.problems.append(f"manifest n_rows={lib.n_rows} but its shards hold {total} rows")
    shard_dir = lib.path / "shards"
    if shard_dir.is_dir():
        extra = sorted(p.name for p in shard_dir.iterdir() if p.name not in listed)
        if extra:
            report.warnings.append(
                f"directories not in the manifest (left by an unfinished job; ignored by readers): {extra}")
    return report
