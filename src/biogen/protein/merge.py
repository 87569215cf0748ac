"""``embed merge``: embedding stores of pieces of one FASTA set -> one store.

An array job (``slurm/array_embed.sbatch``) embeds each FASTA chunk into its own store (a
*piece*); ``merge_stores`` joins the pieces, in the order given, into one store laid out
like ``biogen embed`` of all chunks at once: one row per unique sequence in first-seen
order, a sequence present in several pieces kept once (from the first piece that has it)
with the union of its ids (in input order), one manifest (the inputs, counts and shard
hashes of all pieces, ``merged_from`` naming each piece) and the pieces' rejects
concatenated in ``rejects.csv``. The pieces must have been embedded with the same model
checkpoint (sha256), layers, pooling, dtype, long-sequence policy and per-residue setting.

Each output shard holds the new rows of one piece shard (per-residue arrays sliced along),
written to a temporary name and renamed, recorded in the ledger (``_work/``); the manifest is
written last. A killed merge resumes when run again; a finished one is not redone.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.records import Reject
from biogen.errors import InputError, LibraryError
from biogen.files import atomic_path, hash_files, json_digest, sha256_file
from biogen.library.manifest import now_iso, tool_versions
from biogen.library.merge import resolve_pieces
from biogen.protein.store import EmbeddingStore
from biogen.runtime import Ledger, RuntimeSpec, run_shards

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
WORK = "_work"
# what makes two pieces' vectors comparable: (where in the manifest, name in messages)
SETTINGS = ((("model", "sha256"), "model checkpoint sha256"), (("model", "layers"), "layers"),
            (("model", "pooling"), "pooling"), (("model", "dtype"), "dtype"),
            (("model", "long_policy"), "long_policy"), (("model", "chunk_overlap"), "chunk_overlap"),
            (("model", "per_residue"), "per_residue"), (("model", "max_len"), "max_len"),
            (("dim",), "embedding size"), (("vectors",), "vectors"))


@dataclass
class MergeReport:
    store: str
    pieces: int = 0
    sequences: int = 0
    ids: int = 0
    records: int = 0
    rejected: int = 0
    shards: int = 0
    shared_sequences: int = 0  # rows of later pieces whose sequence an earlier piece holds
    shards_done_before: int = 0
    seconds: float = 0.0
    already_done: bool = False
    manifest: dict = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        if self.already_done:
            return f"{self.store}: already holds this merge (same pieces); nothing to do"
        return (f"merged {self.pieces} stores: {self.sequences:,} unique sequences ({self.ids:,} ids of "
                f"{self.records:,} records; {self.rejected} rejected; {self.shared_sequences:,} sequences found in "
                f"more than one piece kept once) in {self.shards} shards ({self.shards_done_before} done before) in "
                f"{self.seconds:.1f} s -> {self.store}")


def _setting(manifest: dict, path: tuple[str, ...]):
    value = manifest
    for k in path:
        value = value.get(k) if isinstance(value, dict) else None
    return value


def _open_piece(path: Path) -> EmbeddingStore:
    if not (path / MANIFEST).is_file() and (path / WORK).is_dir():
        raise InputError(f"piece {path} is an unfinished embed (it has {WORK}/ but no {MANIFEST}); rerun its embed "
                         "(for an array job: resubmit that task, sbatch --array=<id>) before merging")
    return EmbeddingStore.open(path)


def check_compatible(pieces: list[Path], stores: list[EmbeddingStore]) -> None:
    """Refuse pieces embedded differently, naming the piece and the setting."""
    first = stores[0].manifest
    for path, store in zip(pieces[1:], stores[1:]):
        for where, name in SETTINGS:
            a, b = _setting(first, where), _setting(store.manifest, where)
            if a != b:
                raise LibraryError(
                    f"cannot merge: piece {path} was embedded with {name}={b!r} but piece {pieces[0]} with {name}="
                    f"{a!r}; the pieces of a merge must share the model checkpoint, layers, pooling, dtype, "
                    "long-sequence policy and per-residue setting (embed that piece again with the others' settings)")


def write_shard(out: str, name: str, src: str, rows: list[int], ids: list[list[str]],
                vectors: list[str]) -> tuple[list[str], dict]:
    """One output shard: rows ``rows`` of the piece shard ``src`` (in that order) with merged ``ids``."""
    t0 = time.perf_counter()
    out, src = Path(out), Path(src)
    final, tmp = out / "shards" / name, out / "shards" / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    take = np.asarray(rows, dtype=np.int64)
    meta = pq.read_table(src / "meta.parquet").take(pa.array(take))
    files = []
    for v in vectors:
        np.save(tmp / f"{v}.npy", np.ascontiguousarray(np.load(src / f"{v}.npy", mmap_mode="r")[take]))
        files.append(f"{v}.npy")
    cols = {"key": meta.column("key"), "length": meta.column("length"), "truncated": meta.column("truncated"),
            "chunks": meta.column("chunks"), "ids": pa.array(ids, pa.list_(pa.string()))}
    if "res_offset" in meta.column_names:  # per_residue: slice every layer's residues, offsets anew
        offsets = meta.column("res_offset").to_numpy()
        lengths = meta.column("res_length").to_numpy()
        for res in sorted(p.name for p in src.glob("res_L*.npy")):
            arr = np.load(src / res, mmap_mode="r")
            parts = [arr[o: o + n] for o, n in zip(offsets, lengths)]
            np.save(tmp / res, np.concatenate(parts) if parts else arr[:0])
            files.append(res)
        cols["res_length"] = meta.column("res_length")
        cols["res_offset"] = pa.array(np.cumsum([0, *lengths[:-1]]).astype(np.int64) if len(lengths) else [],
                                      pa.int64())
    pq.write_table(pa.table(cols), tmp / "meta.parquet")
    files.append("meta.parquet")
    for f in files:
        with open(tmp / f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.rename(tmp, final)
    return [f"shards/{name}/{f}" for f in sorted(files)], {"rows": len(rows), "seconds": time.perf_counter() - t0}


def _inputs(stores: list[EmbeddingStore], pieces: list[Path]) -> dict[str, str]:
    """Input path -> sha256 over all pieces; a path two pieces name for different files gets
    ``#<piece index>`` appended."""
    out: dict[str, str] = {}
    for j, s in enumerate(stores):
        for path, sha in s.manifest.get("inputs", {}).items():
            if out.get(path, sha) != sha:
                path = f"{path}#{j}"
            out[path] = sha
    return out


def _concat_rejects(stores: list[EmbeddingStore], out: Path) -> None:
    rows = []
    for s in stores:
        path = s.path / "rejects.csv"
        if path.is_file():
            with open(path, newline="") as fh:
                rows += list(csv.DictReader(fh))  # by name: a store may predate a column
    if not rows:
        (out / "rejects.csv").unlink(missing_ok=True)
        return
    with atomic_path(out / "rejects.csv") as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, Reject.COLUMNS, restval="", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def merge_stores(parts, output: str | Path, *, overwrite: bool = False, progress: bool = True) -> MergeReport:
    """Merge embedding stores (a list in the order given, or a glob in natural order) into a new
    store at ``output`` (module docstring). One merge at a time per output (a lock file): a
    second one, e.g. a precompute rerun while the first merge job still runs, is refused."""
    from biogen.library.parts import locked as _locked

    with _locked(Path(output).absolute()):
        return _merge_stores(parts, output, overwrite=overwrite, progress=progress)


def _merge_stores(parts, output: str | Path, *, overwrite: bool, progress: bool) -> MergeReport:
    t0 = time.perf_counter()
    pieces = resolve_pieces(parts, "embedding store")
    stores = [_open_piece(p) for p in pieces]
    check_compatible(pieces, stores)
    hashes = [sha256_file(p / MANIFEST) for p in pieces]
    key = json_digest({"action": "embed merge", "pieces": [[str(p), h] for p, h in zip(pieces, hashes)]})
    out = Path(output).absolute()
    if any(out.resolve() == p.resolve() for p in pieces):
        raise InputError(f"output={out} is one of the pieces; merge into a new directory")
    if (out / MANIFEST).exists() and not (out / WORK).exists():
        done = json.loads((out / MANIFEST).read_text())
        if not overwrite and done.get("merge", {}).get("job_key") == key:
            return MergeReport(str(out), len(pieces), already_done=True, manifest=done)
        if not overwrite:
            raise InputError(f"output={out} already holds an embedding store; choose another output or overwrite=true")
        for child in out.iterdir():
            if child.name != ".lock":  # ours, held
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    elif out.exists() and not (out / WORK).exists() and any(p.name != ".lock" for p in out.iterdir()):
        raise InputError(f"output={out} is a non-empty directory that is not an embedding store; choose a new one")

    # plan (driver): the first piece holding a sequence keeps its row; every piece adds its ids
    first = stores[0].manifest
    ids: dict[str, list[str]] = {}
    plan: list[tuple[str, list[int], list[str]]] = []  # (source shard dir, rows, their keys)
    shared = 0
    for store in stores:
        for shard in store.shards:
            meta = shard.meta(["key", "ids"])
            rows, keys = [], []
            for r, (k, row_ids) in enumerate(zip(meta.column("key").to_pylist(), meta.column("ids").to_pylist())):
                if k in ids:  # an earlier piece holds the sequence: only its ids are added
                    shared += 1
                    ids[k] = list(dict.fromkeys([*ids[k], *row_ids]))
                    continue
                ids[k] = list(dict.fromkeys(row_ids))
                rows.append(r)
                keys.append(k)
            if rows:
                plan.append((str(shard.path), rows, keys))
    names = [f"{n:06d}" for n in range(len(plan))]
    ledger = Ledger(out / WORK / "ledger.jsonl", key, root=out)
    tasks = [(f"shard-{name}", (str(out), name, src, rows, [ids[k] for k in keys], first["vectors"]))
             for name, (src, rows, keys) in zip(names, plan)]
    done_before = sum(ledger.done(k) is not None for k, _ in tasks)
    results = run_shards(write_shard, tasks, ledger=ledger, spec=RuntimeSpec(mode="inline", progress=progress),
                         slots=1, desc="embed merge: write shards", total=len(tasks))
    m = [s.manifest for s in stores]
    by_reason: Counter = Counter()
    for x in m:
        by_reason.update(x.get("rejected_by_reason", {}))
    manifest = {
        "format": first["format"], "schema_version": first["schema_version"], "created": now_iso(),
        "model": first["model"], "spec": first["spec"], "device": first.get("device"), "dim": first["dim"],
        "vectors": first["vectors"], "inputs": _inputs(stores, pieces), "n_sequences": len(ids),
        "n_ids": sum(len(v) for v in ids.values()), "n_records": sum(x["n_records"] for x in m),
        "rejected": sum(x["rejected"] for x in m), "rejected_by_reason": dict(by_reason),
        "shards": [{"name": n, "rows": results[f"shard-{n}"]["rows"],
                    "sha256": hash_files(out, [f"shards/{n}/{f.name}" for f in sorted((out / "shards" / n).iterdir())])}
                   for n in names],
        "versions": {**tool_versions(), "torch": __import__("torch").__version__},
        "run": ledger.run_summary(),
        "merged_from": [{"path": str(p), "manifest_sha256": h, "n_sequences": x["n_sequences"], "n_ids": x["n_ids"],
                         "n_records": x["n_records"], "rejected": x["rejected"], "shards": len(x["shards"]),
                         "inputs": x.get("inputs", {}), "device": x.get("device"), "created": x.get("created"),
                         "run": x.get("run")}
                        for p, h, x in zip(pieces, hashes, m)],
        "merge": {"job_key": key, "time": now_iso(), "shared_sequences": shared,
                  "seconds": round(time.perf_counter() - t0, 3)},
    }
    _concat_rejects(stores, out)
    with atomic_path(out / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    shutil.rmtree(out / WORK, ignore_errors=True)
    EmbeddingStore.open(out)  # readable as written
    return MergeReport(str(out), len(pieces), len(ids), manifest["n_ids"], manifest["n_records"], manifest["rejected"],
                       len(names), shared, done_before, time.perf_counter() - t0, manifest=manifest)
