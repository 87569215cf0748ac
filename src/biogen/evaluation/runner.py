"""Run the benchmark over targets: one shard per target (Ray or inline), resumable.

Each shard loads its target's actives (and, for DUD, its decoys), fingerprints them,
runs ``evaluate_target`` and writes ``targets/<dataset>_<target>.csv`` (one row per
scorer x n x repeat). The ChEMBL decoys are shared by all 80 ChEMBL targets, so they are
read and fingerprinted once by the driver (when a ChEMBL target is left to run) and
shipped to the shards. A ledger
(``ledger.jsonl``) in the output directory records finished targets: a rerun of the same
command resumes, a run with other parameters is refused.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from biogen.chem.fingerprints import FingerprintSpec
from biogen.errors import InputError
from biogen.evaluation.data import CompoundList, Note, list_targets, load_list, target_files
from biogen.evaluation.protocol import ProtocolSpec, evaluate_target
from biogen.evaluation.scorers import NamedScorer, TargetContext
from biogen.files import atomic_path, json_digest
from biogen.runtime import NO_RAY, Ledger, RuntimeSpec, ray_session, run_shards

log = logging.getLogger(__name__)

ROW_FIELDS = ("dataset", "target", "scorer", "n_queries", "repeat", "auroc", "ef1", "ef5", "bedroc20",
              "n_actives", "n", "seconds")
NOTE_FIELDS = ("dataset", "target", "file", "id", "status", "reason", "smiles")


@dataclass
class RunResult:
    """rows: every (dataset, target, scorer, n, repeat) metric row; notes: partial/rejected
    records; targets: per-target shard results; seconds: wall time."""

    rows: list[dict]
    notes: list[dict]
    targets: dict[str, dict]
    seconds: float


def _notes(dataset: str, target: str, notes: list[Note]) -> list[dict]:
    return [{"dataset": dataset, "target": target, **asdict(n)} for n in notes]


def run_target(out_dir: str, dataset: str, target: str, actives: str, decoys: str,
               shared: CompoundList | None, specs: dict[str, FingerprintSpec], scorers: list[NamedScorer],
               protocol: ProtocolSpec, invalid: str) -> tuple[list[str], dict]:
    """The shard: evaluate one target, write its rows; returns (output relpaths, summary)."""
    t0 = time.perf_counter()
    act = load_list(actives, specs, invalid)
    dec = shared if shared is not None else load_list(decoys, specs, invalid)
    fps = {name: np.concatenate([act.fps[name], dec.fps[name]]) for name in specs}
    props = {name: np.concatenate([act.props[name], dec.props[name]]) for name in act.props}
    labels = np.zeros(len(act) + len(dec), dtype=bool)
    labels[: len(act)] = True
    t1 = time.perf_counter()
    rows = evaluate_target(TargetContext(fps, labels, specs, props), scorers, protocol, dataset, target)
    rel = f"targets/{dataset}_{target}.csv"
    path = Path(out_dir) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.DictWriter(fh, ROW_FIELDS)
        w.writeheader()
        w.writerows(rows)
    notes = _notes(dataset, target, act.notes + (dec.notes if shared is None else []))
    return [rel], {"actives": len(act), "decoys": len(dec), "notes": notes,
                   "featurize_s": round(t1 - t0, 3), "evaluate_s": round(time.perf_counter() - t1, 3)}


def _read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for r in rows:
        for k in ("n_queries", "repeat", "n_actives", "n"):
            r[k] = int(r[k])
        for k in ("auroc", "ef1", "ef5", "bedroc20", "seconds"):
            r[k] = float(r[k])
    return rows


def job_key(params: dict) -> str:
    from rdkit import __version__ as rdkit_version

    return json_digest({**params, "rdkit": rdkit_version})


def run_benchmark(root: str | Path, out_dir: str | Path, *, datasets: list[str], targets: list[str] | None,
                  specs: dict[str, FingerprintSpec], scorers: list[NamedScorer], protocol: ProtocolSpec,
                  runtime: RuntimeSpec, invalid: str = "partial", key_params: dict | None = None) -> RunResult:
    """Evaluate every scorer on every selected target of ``datasets``.

    targets: ``None`` for all, or names (``fxa``, ``100126``) or ``dataset/name`` items; an
    unknown name is an error listing the valid ones.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plan: list[tuple[str, str]] = []
    known: list[str] = []
    for ds in datasets:
        for t in list_targets(root, ds):
            known.append(f"{ds}/{t}")
            if targets is None or t in targets or f"{ds}/{t}" in targets:
                plan.append((ds, t))
    if targets is not None:
        missing = [t for t in targets if t not in {k.split("/")[1] for k in known} and t not in known]
        if missing:
            raise InputError(f"targets {missing} not found in datasets {datasets}; valid: {', '.join(known)}")
    ledger = Ledger(out_dir / "ledger.jsonl", job_key({**(key_params or {}), "plan": plan}))
    notes: list[dict] = []
    shared: CompoundList | None = None
    if any(ds == "ChEMBL" and ledger.done(f"{ds}/{t}") is None for ds, t in plan):
        _, decoys = target_files(root, "ChEMBL", next(t for ds, t in plan if ds == "ChEMBL"))
        shared = load_list(decoys, specs, invalid)
        notes += _notes("ChEMBL", "*", shared.notes)
    if all(ledger.done(f"{ds}/{t}") is not None for ds, t in plan):  # a finished job's rerun: no Ray to start
        log.info("all %d targets are done (ledger %s): reading their results", len(plan), ledger.path)
        runtime = replace(runtime, mode="inline")
    with ray_session(runtime) as slots:
        shared_arg = shared
        if shared is not None and runtime.mode not in NO_RAY:
            import ray

            shared_arg = ray.put(shared)
        shards = []
        for ds, t in plan:
            actives, decoys = target_files(root, ds, t)
            shards.append((f"{ds}/{t}", (str(out_dir), ds, t, str(actives), str(decoys),
                                         shared_arg if ds == "ChEMBL" else None, specs, scorers, protocol, invalid)))
        results = run_shards(run_target, shards, ledger=ledger, spec=runtime, slots=slots,
                             desc="evaluate targets", total=len(shards))
    rows = []
    for ds, t in plan:
        rows += _read_rows(out_dir / f"targets/{ds}_{t}.csv")
        notes += results[f"{ds}/{t}"]["notes"]
    ledger.complete(rows=len(rows))
    return RunResult(rows, notes, results, time.perf_counter() - t0)
