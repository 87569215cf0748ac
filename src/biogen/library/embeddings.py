"""Library embeddings: one learned vector per library row, stored beside the fingerprints.

    biogen library embed library=mylib model=minimol

Layout (one directory per model, one per shard, aligned row for row with the shard's
``meta.parquet`` and ``fp.npy``)::

    embeddings/<model>/<shard>/vectors.npy   N x dim float16 (or float32), memory-mappable;
                                             a molecule the model cannot handle has a NaN row
    embeddings/<model>/<shard>/ok.npy        N bool: False for those molecules
    embeddings/<model>/<shard>/failed.parquet  row, id, smiles, reason of each of them

The manifest's ``embeddings.<model>`` records the model's identity (name, version, dim,
weights sha256), the storage dtype, the compute dtype, each shard's files (bytes, sha256),
the failures by reason and each run. The job is incremental: shards already embedded by
the same model are kept, so after ``library append`` only the new shards are embedded
(``append`` does it itself for every model the library holds). Shards run on workers that
hold the model (Ray actors: one per GPU, else CPU actors), recorded in a resume ledger
(``_work/<model>-embed``): a killed job rerun embeds only the shards not yet done, and
``biogen status <dir>`` reports it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.errors import ConfigError, CorruptLibraryError, LibraryError
from biogen.files import atomic_path, json_digest, sha256_file
from biogen.library.manifest import now_iso, read_manifest, tool_versions, write_manifest
from biogen.library.parts import WORK, locked
from biogen.runtime import NO_RAY, Ledger, RuntimeSpec, ray_session, run_shards_on_actors

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings"
FILES = ("vectors.npy", "ok.npy", "failed.parquet")
STORAGE_DTYPES = ("float16", "float32")
CHUNK = 4096  # molecules read and embedded at a time inside a shard


def shard_dir(lib_dir: Path, model: str, shard: str) -> Path:
    return Path(lib_dir) / EMBEDDINGS / model / shard


def embedding_entry(manifest: dict, model: str) -> dict | None:
    return (manifest.get("embeddings") or {}).get(model)


def missing_shards(manifest: dict, model: str) -> list[str]:
    """Shards of the library that the model's embeddings do not cover yet."""
    done = (embedding_entry(manifest, model) or {}).get("shards", {})
    return [s["name"] for s in manifest["shards"] if s["name"] not in done]


class EmbedShardWorker:
    """Holds one compound model (on its GPU or the CPU) and embeds one library shard at a time."""

    def __init__(self, model: str, model_kwargs: dict, lib_dir: str, dtype: str, threads: int | None):
        from biogen.embeddings.base import load_model

        if threads:  # CPU workers under Ray or processes; inline and GPU runs keep torch's default
            from biogen.precision import set_worker_threads

            set_worker_threads(threads, what="library embed worker")
        self.model = load_model(model, **model_kwargs)
        self.lib_dir = Path(lib_dir)
        self.dtype = np.dtype(dtype)

    def run(self, shard: str) -> tuple[list[str], dict]:
        t0 = time.perf_counter()
        meta = pq.read_table(self.lib_dir / "shards" / shard / "meta.parquet", columns=["id", "smiles"])
        smiles = meta.column("smiles").to_pylist()
        n = len(smiles)
        stored = None  # a model that reads what the library stores (a DTI compound tower)
        if self.model.inputs == "fingerprints":
            stored = np.load(self.lib_dir / "shards" / shard / "fp.npy", mmap_mode="r")
        elif self.model.inputs.startswith("embedding:"):
            stored = np.load(shard_dir(self.lib_dir, self.model.inputs.split(":", 1)[1], shard) / "vectors.npy",
                             mmap_mode="r")
        if stored is not None and len(stored) != n:
            raise CorruptLibraryError(f"shard {shard}: {len(stored)} rows of {self.model.inputs}, {n} metadata rows; "
                                      f"run biogen library verify library={self.lib_dir}")
        vectors = np.full((n, self.model.dim), np.nan, dtype=self.dtype)
        ok = np.zeros(n, dtype=bool)
        failed: dict[int, str] = {}
        seconds = Counter()
        for start in range(0, n, CHUNK):
            out = (self.model.embed(smiles[start:start + CHUNK]) if stored is None
                   else self.model.embed_stored(np.asarray(stored[start:start + CHUNK])))
            v = out.vectors.astype(self.dtype)
            if not np.isfinite(v[out.ok]).all():
                raise LibraryError(f"shard {shard}: a {self.model.name} vector does not fit {self.dtype} "
                                   f"(overflow); embed with dtype=float32")
            vectors[start:start + len(v)] = v
            ok[start:start + len(v)] = out.ok
            failed.update({start + i: r for i, r in out.reasons.items()})
            seconds.update(out.seconds)
        out_dir = shard_dir(self.lib_dir, self.model.name, shard)
        out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(out_dir / "vectors.npy") as tmp:
            np.save(tmp, vectors)
        with atomic_path(out_dir / "ok.npy") as tmp:
            np.save(tmp, ok)
        rows = sorted(failed)
        ids = meta.column("id").to_pylist()
        with atomic_path(out_dir / "failed.parquet") as tmp:
            pq.write_table(pa.table({"row": pa.array(rows, pa.int64()), "id": pa.array([ids[r] for r in rows], pa.string()),
                                     "smiles": pa.array([smiles[r] for r in rows], pa.string()),
                                     "reason": pa.array([failed[r] for r in rows], pa.string())}), tmp)
        rel = f"{EMBEDDINGS}/{self.model.name}/{shard}"
        return [f"{rel}/{f}" for f in FILES], {
            "rows": n, "failed": len(rows), "reasons": dict(Counter(_reason_kind(failed[r]) for r in rows)),
            "seconds": time.perf_counter() - t0, "featurize_s": seconds["featurize"], "forward_s": seconds["forward"],
            "identity": self.model.identity()}


def _reason_kind(reason: str) -> str:
    """A reason's kind for the counts (``element Xe outside ...`` -> ``element outside vocabulary``)."""
    if reason.startswith("element "):
        return "element outside vocabulary"
    if reason.startswith("featurization failed"):
        return "featurization failed"
    if "heavy atoms, more than" in reason:
        return "too many atoms"
    return reason


def _model_identity(model: str, model_kwargs: dict, lib_dir: Path) -> dict:
    """The identity (name, version, dim, weights hash), without building the network where
    that is slow; a model that cannot embed the library (other fingerprints) is refused."""
    if model == "minimol":
        from biogen.embeddings.minimol import DIM, ONNX_SHA256, VERSION, onnx_path, read_weights

        path = str(model_kwargs.get("weights") or onnx_path())
        _, digest = read_weights(path, model_kwargs.get("weights_sha256", ONNX_SHA256))
        return {"model": model, "version": VERSION, "dim": DIM, "weights_sha256": digest}
    from biogen.embeddings.base import load_model
    from biogen.library.store import Library

    m = load_model(model, **{**model_kwargs, "device": "cpu"})
    m.check_library(Library.open(lib_dir))
    return {k: v for k, v in m.identity().items() if k != "dtype"}


def _placement(device: str, runtime: RuntimeSpec, slots: int, n_shards: int) -> tuple[float, int, int | None]:
    """(GPUs per worker, workers, torch threads per worker)."""
    if device.startswith("cuda"):
        if runtime.mode in NO_RAY:
            return 1.0, 1, None
        import ray

        n_gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 1
        return 1.0, max(1, min(slots, n_gpus, n_shards)), None
    workers = max(1, min(slots, n_shards))
    if runtime.mode == "inline":
        return 0.0, 1, None  # this process: torch's own threads
    return 0.0, workers, 1


def embed_library(library: str | Path, model: str = "minimol", *, device: str = "auto", dtype: str = "float16",
                  compute_dtype: str = "auto", batch_size: int = 256, overwrite: bool = False,
                  runtime: RuntimeSpec = RuntimeSpec()) -> dict:
    """Embed every library row not yet embedded by ``model``; returns a report (dict).

    dtype: how vectors are stored (float16 | float32); compute_dtype: the model's forward
    precision (auto | float32 | bfloat16 | float16), recorded; overwrite: recompute all
    (needed when the stored vectors come from another model version or weights)."""
    from biogen.device import cluster_device, resolve_device
    from biogen.embeddings.base import MODELS, check_model_name

    model = check_model_name(model)  # a registered name, or a DTI checkpoint path (its compound tower)
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"dtype={dtype!r}: embeddings are stored as {' or '.join(STORAGE_DTYPES)}")
    lib_dir = Path(library).absolute()
    t0 = time.perf_counter()
    cluster = runtime.mode == "ray_cluster"
    if not cluster:
        device = resolve_device(device)
    model_kwargs = {"device": device, "dtype": compute_dtype, "batch_size": int(batch_size)}
    source = model if model in MODELS else str(Path(model).absolute())  # what the workers load
    identity = _model_identity(model, model_kwargs, lib_dir)
    model = identity["model"]   # the stored name (a DTI checkpoint's: dti-<sha12>)
    with locked(lib_dir):
        manifest = _open_entry(lib_dir, model, identity, dtype, overwrite)
        todo = missing_shards(manifest, model)
        report = {"library": str(lib_dir), "model": model, "identity": identity, "dtype": dtype,
                  "shards_total": len(manifest["shards"]), "shards_embedded": len(todo), "rows": 0, "failed": 0,
                  "reasons": {}, "seconds": 0.0}
        if not todo:
            log.info("%s embeddings of %s are complete (%d shards); nothing to do", model, lib_dir,
                     len(manifest["shards"]))
            return report
        key = json_digest({"action": "embed", "model": identity, "dtype": dtype, "compute_dtype": compute_dtype,
                           "shards": [(s["name"], s["files"]["meta.parquet"]["sha256"]) for s in manifest["shards"]
                                      if s["name"] in todo]})
        work = lib_dir / WORK / f"{model}-embed"
        ledger = _ledger(work, key, lib_dir, model)
        with ray_session(runtime) as slots:
            if cluster:
                device = cluster_device(device)
                model_kwargs["device"] = device
            gpus, workers, threads = _placement(device, runtime, slots, len(todo))
            results = run_shards_on_actors(
                EmbedShardWorker, (source, model_kwargs, str(lib_dir), dtype, threads),
                ((f"embed-{name}", (name,)) for name in todo), ledger=ledger, spec=runtime, slots=workers,
                desc=f"embed {model}", total=len(todo), num_gpus=gpus)
        results = [results[f"embed-{name}"] for name in todo]
        _tally(report, results, t0)
        _record_run(lib_dir, model, {**identity, "source": source}, dtype, dict(zip(todo, results)),
                    {"time": now_iso(), "job_key": key, "shards": todo, "rows": report["rows"],
                     "failed": report["failed"], "device": device,
                     "compute_dtype": results[0]["identity"].get("dtype"),
                     "precision": results[0]["identity"].get("precision"), "seconds": report["seconds"],
                     "stage_seconds": report["stage_seconds"], "versions": tool_versions(),
                     "run": ledger.run_summary()})
        shutil.rmtree(work, ignore_errors=True)
        if (lib_dir / WORK).is_dir() and not any((lib_dir / WORK).iterdir()):
            os.rmdir(lib_dir / WORK)
    return report


def _open_entry(lib_dir: Path, model: str, identity: dict, dtype: str, overwrite: bool) -> dict:
    """The manifest, with the model's stored embeddings removed (``overwrite``) or checked to
    come from the same model and dtype."""
    manifest = read_manifest(lib_dir)
    entry = embedding_entry(manifest, model)
    if entry is not None and overwrite:
        log.warning("overwrite=true: removing the stored %s embeddings of %s", model, lib_dir)
        shutil.rmtree(lib_dir / EMBEDDINGS / model, ignore_errors=True)
        manifest.setdefault("embeddings", {}).pop(model)
        write_manifest(lib_dir, manifest)
    elif entry is not None:
        _check_same_model(entry, identity, dtype, lib_dir)
    return manifest


def _ledger(work: Path, key: str, lib_dir: Path, model: str) -> Ledger:
    """The resume ledger of this job; an unfinished job with another key is abandoned."""
    if _ledger_key(work / "ledger.jsonl") not in (None, key):
        # its shards' files are not in the manifest: nothing is lost but its time
        log.warning("an unfinished %s embedding job with other parameters (or on other shards) is abandoned",
                    model)
        shutil.rmtree(work)
    return Ledger(work / "ledger.jsonl", key, root=lib_dir)


def _tally(report: dict, results: list[dict], t0: float) -> None:
    """Rows, failures by reason and per-stage seconds of the shards' results, into ``report``."""
    report["rows"] += sum(r["rows"] for r in results)
    report["failed"] += sum(r["failed"] for r in results)
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["reasons"] = dict(sum((Counter(r["reasons"]) for r in results), Counter()))
    report["stage_seconds"] = {k: round(sum(r[k] for r in results), 3)
                               for k in ("featurize_s", "forward_s", "seconds")}


def _record_run(lib_dir: Path, model: str, identity: dict, dtype: str, results: dict[str, dict],
                run: dict) -> None:
    """Record the embedded shards (files, rows, failures) and the run in the manifest."""
    source = identity.pop("source")
    manifest = read_manifest(lib_dir)
    sizes = {s["name"]: s["rows"] for s in manifest["shards"]}
    entry = manifest.setdefault("embeddings", {}).setdefault(model, {
        **identity, "dtype": dtype, "compute_dtype": run["compute_dtype"],
        **({"source": str(Path(source).absolute())} if source != model else {}),
        "layout": {"files": list(FILES), "vectors": f"N x {identity['dim']} {dtype}, row i = shard row i; "
                                                  "NaN rows where ok.npy is False (see failed.parquet)"},
        "shards": {}, "failed_by_reason": {}, "runs": []})
    reasons: Counter = Counter(entry["failed_by_reason"])
    for name, r in results.items():
        if r["rows"] != sizes[name]:
            raise CorruptLibraryError(f"shard {name}: {r['rows']} rows embedded, the manifest says {sizes[name]}")
        d = shard_dir(lib_dir, model, name)
        entry["shards"][name] = {"rows": r["rows"], "failed": r["failed"],
                                 "files": {f: {"bytes": (d / f).stat().st_size, "sha256": sha256_file(d / f)}
                                           for f in FILES}}
        reasons.update(r["reasons"])
    entry["failed_by_reason"] = dict(reasons)
    entry["n_failed"] = sum(s["failed"] for s in entry["shards"].values())
    entry["runs"].append(run)
    manifest["updated"] = now_iso()
    write_manifest(lib_dir, manifest)


def _ledger_key(path: Path) -> str | None:
    try:
        return json.loads(path.read_text().splitlines()[0]).get("job_key")
    except (OSError, IndexError, ValueError, AttributeError):
        return None


def _check_same_model(entry: dict, identity: dict, dtype: str, lib_dir: Path) -> None:
    diff = [f"{k} {entry.get(k)!r} (stored) vs {identity[k]!r}" for k in ("version", "dim", "weights_sha256")
            if entry.get(k) != identity[k]]
    if entry.get("dtype") != dtype:
        diff.append(f"dtype {entry.get('dtype')!r} (stored) vs {dtype!r}")
    if diff:
        raise LibraryError(f"{lib_dir} holds {identity['model']} embeddings made differently: {'; '.join(diff)}. "
                           f"Embedding its new rows this way would mix two spaces; rerun with the stored "
                           f"settings, or with overwrite=true to recompute every shard")


def complete_embeddings(library: str | Path, runtime: RuntimeSpec = RuntimeSpec(), device: str = "auto") -> list[dict]:
    """Embed the rows that the library's stored models do not cover yet (after an append)."""
    manifest = read_manifest(Path(library))
    reports = []
    for model, entry in sorted((manifest.get("embeddings") or {}).items()):
        if missing_shards(manifest, model):
            if entry.get("source") and not Path(entry["source"]).is_file():
                raise LibraryError(f"{model} embeddings of {library} come from {entry['source']}, which no longer "
                                   f"exists: the new rows cannot be embedded; restore the checkpoint, or remove "
                                   f"the embeddings ({Path(library) / EMBEDDINGS / model} and the manifest entry)")
            reports.append(embed_library(library, entry.get("source") or model, device=device, dtype=entry["dtype"],
                                         compute_dtype=entry.get("compute_dtype") or "auto", runtime=runtime))
    return reports


def verify_embeddings(lib_dir: Path, manifest: dict, deep: bool = True) -> tuple[list[str], list[str]]:
    """(problems, warnings) of the stored embeddings: files re-hashed against the manifest;
    with ``deep``, shapes, row counts, NaN rows exactly where ok.npy is False."""
    problems, warnings = [], []
    for model, entry in sorted((manifest.get("embeddings") or {}).items()):
        missing = missing_shards(manifest, model)
        if missing:
            warnings.append(f"{model} embeddings do not cover {len(missing)} shard(s) ({', '.join(missing[:5])}"
                            f"{'...' if len(missing) > 5 else ''}): run biogen library embed library={lib_dir} "
                            f"model={model}")
        rows = {s["name"]: s["rows"] for s in manifest["shards"]}
        for name, s in entry["shards"].items():
            where = f"{model} embeddings of shard {name}"
            if name not in rows:
                problems.append(f"{where}: no such shard in the manifest")
                continue
            d = shard_dir(lib_dir, model, name)
            bad = []
            for f in FILES:
                p = d / f
                if not p.is_file():
                    bad.append(f"{f} missing")
                elif p.stat().st_size != s["files"][f]["bytes"]:
                    bad.append(f"{f} has {p.stat().st_size} bytes, manifest says {s['files'][f]['bytes']}")
                elif sha256_file(p) != s["files"][f]["sha256"]:
                    bad.append(f"{f} sha256 differs from the manifest")
            if bad:
                problems.append(f"{where}: {'; '.join(bad)} (rerun biogen library embed library={lib_dir} "
                                f"model={model} overwrite=true)")
                continue
            if deep:
                v = np.load(d / "vectors.npy", mmap_mode="r")
                ok = np.load(d / "ok.npy")
                if v.shape != (rows[name], entry["dim"]) or ok.shape != (rows[name],):
                    problems.append(f"{where}: shape {v.shape} / ok {ok.shape}, expected ({rows[name]}, {entry['dim']})")
                    continue
                finite = np.isfinite(np.asarray(v, dtype=np.float32)).all(axis=1)
                if not np.array_equal(finite, ok):
                    problems.append(f"{where}: rows with a vector do not match ok.npy")
    return problems, warnings


IDENTITY_KEYS = ("version", "dim", "weights_sha256", "dtype")


def carry_embeddings(out: Path, pieces: list[tuple[Path, dict]], moves: list[tuple[int, str, str]]) -> dict:
    """``library merge``: the pieces' stored embeddings, carried row by row into the merged
    library's shards (nothing recomputed). ``pieces``: (directory, manifest) of each piece;
    ``moves``: (piece index, piece shard, merged shard) for every merged shard, whose rows
    are a subset of that piece shard's. A vector depends only on the SMILES, so rows are
    matched by SMILES. A model that not every piece holds completely, or holds with another
    identity, is not carried (warned: ``library embed`` the merged library). Returns the
    merged manifest's ``embeddings``."""
    models = set.intersection(*(set(m.get("embeddings") or {}) for _, m in pieces)) if pieces else set()
    for model in sorted(set().union(*(set(m.get("embeddings") or {}) for _, m in pieces)) - models):
        log.warning("not every piece holds %s embeddings: the merged library has none (add them with biogen "
                    "library embed library=%s model=%s)", model, out, model)
    result = {}
    for model in sorted(models):
        entries = [m["embeddings"][model] for _, m in pieces]
        differ = [k for k in IDENTITY_KEYS if len({json.dumps(e.get(k)) for e in entries}) > 1]
        incomplete = [str(d) for d, m in pieces if missing_shards(m, model)]
        if differ or incomplete:
            log.warning("%s embeddings not carried into %s: %s; add them with biogen library embed library=%s "
                        "model=%s", model, out, f"the pieces differ in {differ}" if differ else
                        f"pieces {incomplete} are not completely embedded", out, model)
            continue
        e0 = entries[0]
        entry = {k: e0[k] for k in ("model", "version", "dim", "weights_sha256", "dtype", "compute_dtype", "layout",
                                    "source")
                 if k in e0}
        entry.update(shards={}, runs=[])
        reasons: Counter = Counter()
        for j, src_shard, dst_shard in moves:
            piece = pieces[j][0]
            failed = _carry_shard(piece, out, model, src_shard, dst_shard)
            d = shard_dir(out, model, dst_shard)
            rows = int(np.load(d / "ok.npy", mmap_mode="r").shape[0])
            entry["shards"][dst_shard] = {"rows": rows, "failed": len(failed),
                                          "files": {f: {"bytes": (d / f).stat().st_size, "sha256": sha256_file(d / f)}
                                                    for f in FILES}}
            reasons.update(_reason_kind(r) for r in failed)
        entry["failed_by_reason"] = dict(reasons)
        entry["n_failed"] = sum(s["failed"] for s in entry["shards"].values())
        entry["runs"].append({"time": now_iso(), "action": "merge", "job_key": None,
                              "carried_from": [str(d) for d, _ in pieces], "rows": sum(
                                  s["rows"] for s in entry["shards"].values()), "versions": tool_versions()})
        result[model] = entry
    return result


def _carry_shard(piece: Path, out: Path, model: str, src_shard: str, dst_shard: str) -> list[str]:
    src_meta = pq.read_table(piece / "shards" / src_shard / "meta.parquet", columns=["smiles"])
    dst_meta = pq.read_table(out / "shards" / dst_shard / "meta.parquet", columns=["id", "smiles"])
    row_of = {s: i for i, s in enumerate(src_meta.column("smiles").to_pylist())}
    smiles = dst_meta.column("smiles").to_pylist()
    try:
        rows = np.array([row_of[s] for s in smiles], dtype=np.int64)
    except KeyError as exc:
        raise LibraryError(f"merged shard {dst_shard} holds {exc.args[0]!r}, which piece {piece} shard {src_shard} "
                           f"does not: the pieces changed during the merge; rerun it") from None
    src = shard_dir(piece, model, src_shard)
    vectors = np.load(src / "vectors.npy", mmap_mode="r")[rows]
    ok = np.load(src / "ok.npy")[rows]
    why = dict(zip(*(pq.read_table(src / "failed.parquet", columns=["row", "reason"]).to_pydict().values())))
    dst = shard_dir(out, model, dst_shard)
    dst.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst / "vectors.npy") as tmp:
        np.save(tmp, np.ascontiguousarray(vectors))
    with atomic_path(dst / "ok.npy") as tmp:
        np.save(tmp, ok)
    bad = np.flatnonzero(~ok)
    ids = dst_meta.column("id").to_pylist()
    reasons = [why.get(int(rows[r]), "no vector in the piece") for r in bad]
    with atomic_path(dst / "failed.parquet") as tmp:
        pq.write_table(pa.table({"row": pa.array(bad, pa.int64()), "id": pa.array([ids[r] for r in bad], pa.string()),
                                 "smiles": pa.array([smiles[r] for r in bad], pa.string()),
                                 "reason": pa.array(reasons, pa.string())}), tmp)
    return reasons
