"""Protein-aware model on KIBA: what the pretrained protein language model adds.

    python benchmarks/protein_aware.py --kiba ../shared/data/dti/kiba --out benchmarks/results/protein-aware-kiba

The same DTI model (``biogen.dti.model``, default settings) trained in one run with
different protein representations, on the same splits (same seed):

* ``unirep1900``: UniRep's mean hidden state (pretrained on UniRef50, 1900-d);
* ``unirep64``: the small UniRep (64-d);
* ``kmer2``: amino-acid 2-mer composition (400-d, normalized counts): no learning, no
  pretraining;
* ``agnostic``: no protein input (every protein gets the same vector, so the protein
  tower is a constant and the model ranks compounds the same way for every protein).

Splits: ``unseen_protein`` (protein clusters held out) and ``random`` pairs. Metrics on the
test part: concordance index, RMSE, median Spearman per protein, AUROC/AUPR of actives
(KIBA >= 12.1). Also the time per epoch and the UniRep embedding time of the 229 kinases.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

METRICS = ("ci", "rmse", "spearman_per_protein_median", "auroc", "aupr")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kiba", required=True, help="DeepDTA's data/kiba folder")
    ap.add_argument("--out", required=True, help="path stem: writes <out>.json and <out>.md")
    ap.add_argument("--splits", default="unseen_protein,random")
    ap.add_argument("--reps", default="unirep1900,unirep64,kmer2,agnostic")
    ap.add_argument("--max-epochs", type=int, default=30)
    args = ap.parse_args(argv)
    import torch

    from biogen.dti.data import read_kiba
    from biogen.dti.model import DTISpec, fit_dti, protein_vectors
    from biogen.evaluation.dti import kmer_composition

    t = time.perf_counter()
    data = read_kiba(args.kiba)
    result = {"benchmark": "protein_aware", "command": " ".join(["python", "benchmarks/protein_aware.py",
                                                                 *(argv or sys.argv[1:])]),
              "machine": machine(), "versions": {**versions(), "torch": torch.__version__},
              "data": {"summary": data.summary(), "read_s": time.perf_counter() - t}, "runs": []}
    reps = {}
    for name in args.reps.split(","):
        t = time.perf_counter()
        if name.startswith("unirep"):
            vec, info, _ = protein_vectors(data.sequences, DTISpec(protein_model=name))
        elif name == "kmer2":
            vec, info = kmer_composition(data.sequences), {"model": "kmer2", "sha256": None, "dim": 400}
        elif name == "agnostic":
            vec, info = np.zeros((len(data.sequences), 1), np.float32), {"model": "agnostic", "sha256": None, "dim": 1}
        else:
            raise SystemExit(f"unknown representation {name}")
        reps[name] = (vec, info)
        result["data"][f"{name}_seconds"] = time.perf_counter() - t
        print(f"{name}: {vec.shape} in {time.perf_counter() - t:.1f} s", flush=True)
    out = Path(args.out)
    for split in args.splits.split(","):
        for name, (vec, info) in reps.items():
            spec = DTISpec(split=split, max_epochs=args.max_epochs, protein_model=name)
            pred, parts = fit_dti(data, vec, info, spec)
            run = {"split": split, "protein": name, **{k: pred.metrics.get(f"test_{k}") for k in METRICS},
                   "n_train": len(parts["train"]), "n_test": len(parts["test"]),
                   "best_epoch": pred.info["best_epoch"], "epochs": pred.info["epochs"],
                   "seconds": pred.info["seconds"], "seconds_per_epoch": pred.info["seconds"] / max(1, pred.info["epochs"])}
            result["runs"].append(run)
            print(json.dumps(run), flush=True)
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = ["| split | protein representation | CI | RMSE | Spearman/protein (median) | AUROC | AUPR | epochs |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["runs"]:
        lines.append(f"| {r['split']} | {r['protein']} | " + " | ".join(
            f"{r[k]:.3f}" if r[k] is not None else "n/a" for k in METRICS) + f" | {r['epochs']} |")
    out.with_suffix(".md").write_text(
        f"# Protein-aware model on KIBA ({data.summary()})\n\n`{result['command']}`\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
