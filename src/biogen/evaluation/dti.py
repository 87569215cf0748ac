"""``biogen evaluate dti``: what a protein language model adds to a drug–target model.

One run trains the same DTI model (``biogen.dti.model``) on the same splits with each
protein representation, next to a model-free baseline, and tabulates the test metrics:

* a PLM: ``unirep1900`` | ``unirep256`` | ``unirep64`` (pretrained, offline), an ESM-2
  name or checkpoint path (real weights where the user has them);
* ``esm2_random``: the ESM-2 8M architecture with untrained weights (what the
  architecture alone gives, without pretraining);
* ``kmer2`` / ``kmer3``: amino-acid 2-/3-mer composition (no learning at all);
* ``agnostic``: no protein input (one constant vector): the compound side alone;
* ``nearest_neighbour`` (baseline, no training): a test pair (c, p) gets the affinity of
  the training compound most similar to c (Tanimoto, the data's fingerprints) among the
  training pairs of p, or, when p has none (unseen proteins), of p's most similar
  training protein (3-mer Jaccard); equal similarities are averaged.

Splits: ``random`` pairs, ``unseen_compound``, ``unseen_protein`` (protein clusters held
out: single linkage over 3-mer Jaccard >= model.protein_similarity), ``unseen_both``.
Metrics on each split's test pairs: concordance index, MSE/RMSE, median Spearman per
protein, AUROC/AUPR of actives (the data set's threshold: KIBA >= 12.1), and EF1% per
test protein when its test compounds are ranked (median over proteins with >= 1 active
and >= ``ef_min_pairs`` test pairs).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from pathlib import Path

import numpy as np

from biogen.errors import ConfigError

log = logging.getLogger(__name__)

PLAIN = ("esm2_random", "kmer2", "kmer3", "agnostic")
BASELINES = ("nearest_neighbour",)
METRICS = ("ci", "rmse", "spearman_per_protein_median", "auroc", "aupr", "ef1_per_protein_median")
RANDOM_ESM2 = "esm2_t6_8M_UR50D"


@dataclass(frozen=True)
class DTIEvalSpec:
    splits: tuple[str, ...] = ("unseen_protein", "unseen_compound", "unseen_both", "random")
    representations: tuple[str, ...] = ("unirep1900", "kmer2", "esm2_random", "agnostic")
    baselines: tuple[str, ...] = BASELINES
    ef_fraction: float = 0.01
    ef_min_pairs: int = 50
    model: dict = field(default_factory=dict)   # DTISpec settings shared by every run

    def __post_init__(self) -> None:
        from biogen.dti.splits import SPLITS

        bad = [s for s in self.splits if s not in SPLITS]
        if bad or not self.splits:
            raise ConfigError(f"splits={list(self.splits)}: choose from {', '.join(SPLITS)}")
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ConfigError(f"baselines={bad}: valid: {', '.join(BASELINES)}")
        if not self.representations and not self.baselines:
            raise ConfigError("nothing to evaluate: give representations and/or baselines")
        if not 0 < self.ef_fraction < 1:
            raise ConfigError(f"ef_fraction={self.ef_fraction} must be in (0, 1)")


def kmer_composition(sequences: list[str], k: int = 2) -> np.ndarray:
    """Normalized counts of the 20^k amino-acid k-mers (other letters skipped)."""
    letters = "ACDEFGHIKLMNPQRSTVWY"
    index = {"".join(p): i for i, p in enumerate(product(letters, repeat=k))}
    out = np.zeros((len(sequences), len(index)), np.float32)
    for r, s in enumerate(sequences):
        for i in range(len(s) - k + 1):
            j = index.get(s[i:i + k])
            if j is not None:
                out[r, j] += 1
        out[r] /= max(1.0, out[r].sum())
    return out


def protein_representation(name: str, sequences: list[str], work: Path, device: str = "cpu",
                           dtype: str = "float32") -> tuple[np.ndarray, dict]:
    """(P x E float32, info) of the proteins under representation ``name``."""
    from biogen.dti.predictor import DTISpec, protein_vectors

    t0 = time.perf_counter()
    if name == "agnostic":
        vec, info = np.ones((len(sequences), 1), np.float32), {"model": "agnostic", "sha256": None}
    elif name in ("kmer2", "kmer3"):
        vec, info = kmer_composition(sequences, int(name[-1])), {"model": name, "sha256": None}
    else:
        model = name
        if name == "esm2_random":  # written to a scratch folder and removed: 30 MB of noise is no result
            import tempfile

            from biogen.protein.models import random_esm2

            with tempfile.TemporaryDirectory(dir=work) as tmp:
                model = str(random_esm2(RANDOM_ESM2, Path(tmp) / f"{RANDOM_ESM2}-random.pt"))
                vec, info, _ = protein_vectors(sequences, DTISpec(protein_model=model, protein_dtype=dtype), device)
            info = {**info, "model": name, "architecture": RANDOM_ESM2, "seed": 0}
        else:
            vec, info, _ = protein_vectors(sequences, DTISpec(protein_model=model, protein_dtype=dtype), device)
            info = {**info, "model": name}
    info = {**info, "dim": int(vec.shape[1]), "seconds": round(time.perf_counter() - t0, 2)}
    return vec.astype(np.float32), info


def _used_proteins_representation(name: str, data, work: Path, device: str) -> tuple[np.ndarray, dict]:
    """``protein_representation`` of the proteins that have pairs (a subset of KIBA holds
    all 229 sequences): one row per ``data.protein_ids``, zeros for proteins without pairs
    (no pair reads them)."""
    used = np.unique(data.pairs[:, 1])
    vec, info = protein_representation(name, [data.sequences[i] for i in used], work, device)
    full = np.zeros((len(data.sequences), vec.shape[1]), np.float32)
    full[used] = vec
    log.info("protein representation %s: %d proteins with pairs (of %d) x %d (%.1f s)", name, len(used),
             len(data.sequences), vec.shape[1], info["seconds"])
    return full, info


def _bits(fps: np.ndarray) -> np.ndarray:
    return np.unpackbits(np.ascontiguousarray(fps).view(np.uint8), axis=1, bitorder="little").astype(np.float32)


def _kmer_sets(sequences: list[str], k: int = 3) -> list[frozenset]:
    return [frozenset(s[i:i + k] for i in range(len(s) - k + 1)) or frozenset([s]) for s in sequences]


def nearest_neighbour(data, train: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Predictions of the nearest-neighbour baseline for the ``test`` pair positions."""
    bits = _bits(data.fps)
    pop = bits.sum(1)
    pairs, y = data.pairs, data.y.astype(np.float64)
    by_protein: dict[int, np.ndarray] = {}
    for p in np.unique(pairs[train, 1]):
        by_protein[int(p)] = train[pairs[train, 1] == p]
    seen = np.array(sorted(by_protein), dtype=np.int64)
    sets = _kmer_sets(data.sequences)
    pred = np.full(len(test), np.nan)
    tp = pairs[test, 1]
    for p in np.unique(tp):
        q = int(p)
        if q not in by_protein:  # unseen protein: its most similar training protein
            sims = [len(sets[q] & sets[s]) / max(1, len(sets[q] | sets[s])) for s in seen]
            q = int(seen[int(np.argmax(sims))])
        ref = by_protein[q]
        at = np.flatnonzero(tp == p)
        a, b = bits[pairs[test[at], 0]], bits[pairs[ref, 0]]
        inter = a @ b.T
        tani = inter / np.maximum(pop[pairs[test[at], 0]][:, None] + pop[pairs[ref, 0]][None, :] - inter, 1)
        best = tani.max(1, keepdims=True)
        tie = tani >= best - 1e-9
        pred[at] = (tie * y[ref][None, :]).sum(1) / tie.sum(1)
    return pred


def ef_per_protein(pred: np.ndarray, y: np.ndarray, proteins: np.ndarray, threshold: float | None,
                   fraction: float = 0.01, min_pairs: int = 50) -> dict:
    """EF at ``fraction`` of each protein's test compounds ranked by ``pred``."""
    if threshold is None:
        return {"ef1_per_protein_median": float("nan"), "ef1_proteins": 0}
    efs = []
    for p in np.unique(proteins):
        sel = np.flatnonzero(proteins == p)
        act = y[sel] >= threshold
        if len(sel) < min_pairs or not act.any():
            continue
        n_top = max(1, int(round(fraction * len(sel))))
        top = np.argsort(-pred[sel], kind="stable")[:n_top]
        efs.append((act[top].sum() / n_top) / (act.sum() / len(sel)))
    return {"ef1_per_protein_median": float(np.median(efs)) if efs else float("nan"),
            "ef1_per_protein_mean": float(np.mean(efs)) if efs else float("nan"), "ef1_proteins": len(efs)}


def _clean(d: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}


def run_dti_evaluation(data, spec: DTIEvalSpec, out_dir: Path, *, accelerator: str = "cpu",
                       progress: bool = False) -> list[dict]:
    """Every (split, representation) run and every baseline; rows written as they finish to
    ``dti-results.{json,csv}`` and the table to ``dti-results.md`` in ``out_dir``."""
    from biogen.dti.model import DTISpec, fit_dti, split_data
    from biogen.dti.splits import dti_metrics

    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        base = DTISpec(**{k: v for k, v in spec.model.items() if k not in ("type", "split")})
    except TypeError as exc:
        raise ConfigError(f"invalid model settings ({exc})") from None
    reps = {name: _used_proteins_representation(name, data, out_dir, accelerator) for name in spec.representations}
    rows: list[dict] = []
    y = data.y.astype(np.float64)
    for split in spec.splits:
        s = replace(base, split=split)
        parts = split_data(data, s)
        te, tr = parts["test"], parts["train"]

        def record(name: str, kind: str, pred: np.ndarray, extra: dict) -> None:
            m = dti_metrics(pred, y[te], data.pairs[te, 1], data.active_threshold)
            m.update(ef_per_protein(pred, y[te], data.pairs[te, 1], data.active_threshold, spec.ef_fraction,
                                    spec.ef_min_pairs))
            row = _clean({"split": split, "representation": name, "kind": kind, **m, "n_train": int(len(tr)),
                          "n_test": int(len(te)), **extra})
            rows.append(row)
            log.info("%s / %s: %s", split, name, ", ".join(f"{k} {row[k]:.3f}" for k in METRICS
                                                           if isinstance(row.get(k), float)))
            _write(out_dir, rows, data, spec)

        for name in spec.baselines:
            t0 = time.perf_counter()
            record(name, "baseline", nearest_neighbour(data, np.concatenate([tr, parts["val"]]), te),
                   {"seconds": round(time.perf_counter() - t0, 2)})
        for name, (vec, info) in reps.items():
            pred_model, got = fit_dti(data, vec, info, replace(s, protein_model=name), accelerator=accelerator,
                                      progress=progress)
            zc, zp = pred_model.project_compounds(data.fps), pred_model.project_proteins(vec)
            record(name, "model", pred_model.predict_pairs(zc, zp, data.pairs[te]),
                   {"best_epoch": pred_model.info["best_epoch"], "epochs": pred_model.info["epochs"],
                    "seconds": pred_model.info["seconds"], "protein_dim": int(vec.shape[1])})
    return rows


def _write(out_dir: Path, rows: list[dict], data, spec: DTIEvalSpec) -> None:
    (out_dir / "dti-results.json").write_text(json.dumps({"data": data.summary(), "spec": asdict(spec),
                                                          "active_threshold": data.active_threshold,
                                                          "rows": rows}, indent=1, default=str) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out_dir / "dti-results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    head = "| split | protein representation | CI | RMSE | Spearman/protein (median) | AUROC | AUPR | EF1%/protein (median) |"
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['split']} | {r['representation']} | " + " | ".join(
            f"{r[k]:.3f}" if isinstance(r.get(k), float) else "n/a" for k in METRICS) + " |")
    (out_dir / "dti-results.md").write_text(
        f"# DTI evaluation ({data.summary()})\n\nActives: affinity >= {data.active_threshold}. EF1%: per test "
        f"protein with >= {spec.ef_min_pairs} test pairs and >= 1 active, median.\n\n" + "\n".join(lines) + "\n")
