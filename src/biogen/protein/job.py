"""``biogen embed``: FASTA -> unique sequences -> shards embedded by Ray actors that hold
the model (one per GPU, or CPU actors) -> an embedding store, resumable by the ledger.

Shards hold ``shard_size`` unique sequences in input order, so their keys depend only
on the input: a rerun after a kill skips every shard the ledger records as complete
(its files re-hashed) and embeds only the rest.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from biogen.chem.records import write_rejects
from biogen.device import cluster_device, resolve_device
from biogen.errors import ConfigError, InputError
from biogen.library.manifest import now_iso, tool_versions
from biogen.protein.fasta import read_proteins
from biogen.protein.store import FORMAT, SCHEMA_VERSION, EmbeddingStore, pooled_vectors
from biogen.files import hash_files, json_digest, sha256_file
from biogen.runtime import NO_RAY, Ledger, RuntimeSpec, ray_session, run_shards_on_actors

log = logging.getLogger(__name__)


@dataclass
class EmbedReport:
    store: str
    sequences: int = 0
    ids: int = 0
    records: int = 0
    rejected: int = 0
    shards: int = 0
    shards_done_before: int = 0
    tokens: int = 0
    truncated: int = 0
    chunked: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)

    def summary(self) -> str:
        return (f"embedded {self.sequences:,} unique sequences ({self.ids:,} ids of {self.records:,} records; "
                f"{self.rejected} rejected) in {self.shards} shards ({self.shards_done_before} done before) "
                f"in {self.seconds:.1f} s -> {self.store}")


class EmbedWorker:
    """Holds one model (on its GPU or the CPU) and embeds one shard at a time. On the CPU,
    torch runs on the CPUs Ray assigned to this actor, or on ``OMP_NUM_THREADS`` (1) in a
    ``processes`` worker (``biogen.precision.set_worker_threads``); inline runs keep
    torch's default."""

    def __init__(self, model: str, spec, device: str, out_dir: str, cache_dir: str | None, download: bool = False):
        from biogen.protein.embed import load_embedder

        if device == "cpu":  # before the model is built: dtype=auto times its layer on these threads
            from biogen.precision import set_worker_threads

            set_worker_threads(what="embed worker")
        self.embedder = load_embedder(model, spec, device=device, cache_dir=cache_dir, download=download)
        self.pooling = spec.pooling
        self.per_residue = spec.per_residue
        self.out_dir = Path(out_dir)

    def run(self, name: str, keys: list[str], sequences: list[str], ids: list[list[str]]) -> tuple[list[str], dict]:
        t0 = time.perf_counter()
        results = self.embedder.embed(sequences)
        tmp = self.out_dir / "shards" / f".{name}.tmp"
        final = self.out_dir / "shards" / name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        vectors: dict[str, list[np.ndarray]] = {}
        for r in results:
            for k, v in pooled_vectors(r, self.pooling).items():
                vectors.setdefault(k, []).append(np.asarray(v, dtype=np.float32))
        files = []
        for k, rows in vectors.items():
            np.save(tmp / f"{k}.npy", np.stack(rows))
            files.append(f"{k}.npy")
        meta = {"key": keys, "length": [int(r["length"]) for r in results],
                "truncated": [bool(r.get("truncated", False)) for r in results],
                "chunks": [int(r.get("chunks", 1)) for r in results],
                "ids": pa.array(ids, pa.list_(pa.string()))}
        if self.per_residue:
            lengths = []
            for layer in results[0]["residues"] if results else []:
                arrs = [np.asarray(r["residues"][layer], dtype=np.float32) for r in results]
                np.save(tmp / f"res_L{layer}.npy", np.concatenate(arrs))
                files.append(f"res_L{layer}.npy")
                lengths = [len(a) for a in arrs]
            meta["res_length"] = lengths
            meta["res_offset"] = list(np.cumsum([0, *lengths[:-1]]).astype(np.int64)) if lengths else []
        pq.write_table(pa.table(meta), tmp / "meta.parquet")
        files.append("meta.parquet")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        outputs = [f"shards/{name}/{f}" for f in sorted(files)]
        tokens = int(self.embedder.last_stats.get("tokens", 0))
        return outputs, {"rows": len(keys), "tokens": tokens, "seconds": time.perf_counter() - t0,
                         "truncated": sum(bool(r.get("truncated")) for r in results),
                         "chunked": sum(int(r.get("chunks", 1)) > 1 for r in results),
                         "dim": int(next(iter(vectors.values()))[0].shape[0]) if vectors else 0,
                         "vectors": sorted(vectors), "info": self.embedder.info}


def embed_proteins(inputs, output: str | Path, *, model: str, spec=None, device: str = "cpu",
                   shard_size: int = 1000, cache_dir: str | None = None, download: bool = False,
                   overwrite: bool = False,
                   runtime: RuntimeSpec = RuntimeSpec()) -> EmbedReport:
    """Embed the proteins of FASTA ``inputs`` into an embedding store at ``output``.

    device: auto | cpu | cuda; on ``runtime=ray_cluster`` decided by the
    cluster's GPUs once connected, else by what torch sees here, before anything starts."""
    from biogen.protein.embed import EmbedSpec

    cluster = runtime.mode == "ray_cluster"  # there the workers' GPUs count, not this machine's
    if not cluster:
        device = resolve_device(device)

    spec = spec or EmbedSpec()
    if shard_size < 1:
        raise ConfigError(f"shard_size={shard_size} must be >= 1")
    t0 = time.perf_counter()
    out = Path(output).absolute()
    if (out / "manifest.json").exists() and not (out / "_work").exists():
        if not overwrite:
            raise InputError(f"output={out} already holds an embedding store; choose another output or "
                             "overwrite=true")
        shutil.rmtree(out)
    from biogen.protein.embed import check_model

    # fail here, with the whole message (where weights were looked for, how to get them),
    # not in every worker; workers on other nodes resolve the same path or name again
    check_model(model, cache_dir, download=download)
    pset = read_proteins(inputs)
    if not len(pset):
        raise InputError(f"no usable protein sequence in {inputs} ({len(pset.rejects)} record(s) rejected: "
                         f"{', '.join(sorted({r.reason for r in pset.rejects})) or 'empty input'})")
    from biogen.chem.readers import resolve_inputs

    input_hashes = {str(p): sha256_file(p) for p in resolve_inputs(inputs)}  # globs expanded: all in the job key
    job = {"inputs": sorted(input_hashes.values()), "model": str(model), "spec": asdict(spec),
           "shard_size": shard_size, "format": SCHEMA_VERSION}
    job_key = json_digest(job)
    ledger = Ledger(out / "_work" / "ledger.jsonl", job_key, root=out)
    names = []
    shards = []
    for i, start in enumerate(range(0, len(pset), shard_size)):
        keys = pset.keys[start: start + shard_size]
        name = f"{i:06d}"
        names.append(name)
        shards.append((f"shard-{name}", (name, keys, pset.sequences[start: start + shard_size],
                                         [pset.ids[k] for k in keys])))
    done_before = sum(ledger.done(k) is not None for k, _ in shards)
    with ray_session(runtime) as slots:
        if cluster:
            device = cluster_device(device)
        gpus = 1.0 if device.startswith("cuda") else 0.0
        if gpus and runtime.mode in NO_RAY:
            import torch

            if torch.cuda.device_count() > 1:
                log.warning("runtime.mode=%s uses one GPU of the %d here; runtime=local (Ray) uses them all",
                            runtime.mode, torch.cuda.device_count())
            slots = 1  # one process holding the model on the GPU
        elif gpus:
            import ray

            n_gpus = int(ray.cluster_resources().get("GPU", 0)) if ray.is_initialized() else 1
            slots = max(1, min(slots, n_gpus))  # one actor per GPU, each holding the model
        results = run_shards_on_actors(
            EmbedWorker, (str(model), spec, device, str(out), cache_dir, download),
            shards, ledger=ledger, spec=runtime,
            slots=min(slots, len(shards)), desc="embed", total=len(shards), num_gpus=gpus)
    first = results[shards[0][0]]
    dtypes = sorted({r["info"].get("dtype") for r in results.values()} - {None})
    if len(dtypes) > 1:  # dtype=auto measured on each worker: workers on unlike CPUs may choose differently
        log.warning("embed workers ran in different dtypes (%s; dtype=%s chose per worker): the store mixes "
                    "them; rerun with embed.dtype=%s to make it uniform", ", ".join(dtypes), spec.dtype, dtypes[0])
    manifest = {
        "format": FORMAT, "schema_version": SCHEMA_VERSION, "created": now_iso(),
        "model": first["info"], "spec": asdict(spec), "device": device, "dim": first["dim"],
        "vectors": first["vectors"], "inputs": input_hashes, "n_sequences": len(pset), "n_ids": pset.n_ids,
        "n_records": pset.n_records, "rejected": len(pset.rejects),
        "rejected_by_reason": {r: sum(x.reason == r for x in pset.rejects) for r in {x.reason for x in pset.rejects}},
        "shards": [{"name": n, "rows": results[f"shard-{n}"]["rows"],
                    "sha256": hash_files(out, [f"shards/{n}/{f}" for f in sorted(p.name for p in (out / "shards" / n).iterdir())])}
                   for n in names],
        "versions": {**tool_versions(), "torch": __import__("torch").__version__},
        "dtypes": dtypes,  # all workers' dtypes (one, unless dtype=auto chose differently on unlike CPUs)
        "run": ledger.run_summary(),  # driver sessions, workers or nodes lost (the ledger goes with _work)
    }
    write_rejects(pset.rejects, out / "rejects.csv")
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(out / "manifest.json")
    shutil.rmtree(out / "_work", ignore_errors=True)
    EmbeddingStore.open(out)  # readable as written
    return EmbedReport(str(out), len(pset), pset.n_ids, pset.n_records, len(pset.rejects), len(shards), done_before,
                       sum(r["tokens"] for r in results.values()), sum(r["truncated"] for r in results.values()),
                       sum(r["chunked"] for r in results.values()), time.perf_counter() - t0, first["info"])
