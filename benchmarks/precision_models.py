"""Reduced precision for the small models (issue 22): QSAR scoring and the DTI compound tower
in float32, bfloat16 and int8 on the CPU, through ``biogen.precision``'s shared plan and gate.

    python benchmarks/precision_models.py --out benchmarks/results/precision-models-cpu.json

On the fingerprints of ``--n`` MOSES test molecules (real ECFP4, featurized once):

- QSAR (``QSARPredictor.with_precision``): a 2048 -> 512 -> 128 -> 1 MLP (the default
  ``QSARSpec.hidden``) with seeded random weights; molecules/s of ``predict`` (the CPU's
  sparse input layer + the head) per dtype, and the parity against float32: max |score
  difference| (score units: y_std = 1) and Pearson r over the molecules.
- DTI compound tower (``DTICompounds``): 2048 -> 1024 -> 512 (the default ``DTISpec``),
  seeded random weights; molecules/s of the projection per dtype and the min cosine per
  molecule against float32.

What ``dtype=auto`` picks on this CPU is recorded for each (int8 included: its activations
are quantized per row, so a stored vector or score does not depend on its batch mates). Parity is checked before timing; each timing is the best of ``--repeats`` on
``torch.get_num_threads()`` threads (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

DTYPES = ("float32", "bfloat16", "int8")


def fingerprints(n: int) -> np.ndarray:
    import gzip

    from rdkit import Chem, rdBase

    from biogen.chem.fingerprints import Fingerprinter, FingerprintSpec
    from biogen.datasets import dataset_path

    with gzip.open(dataset_path("moses_test"), "rt") as fh:
        smiles = [line.split(",")[0] for line in fh.read().splitlines()[1:n + 1]]
    with rdBase.BlockLogs():
        mols = [Chem.MolFromSmiles(s) for s in smiles]
    return Fingerprinter(FingerprintSpec()).compute([m for m in mols if m is not None])


def best_of(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def qsar(fps: np.ndarray, repeats: int) -> dict:
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.models.predictor import QSARNet, QSARPredictor, QSARSpec

    torch.manual_seed(0)
    hidden = list(QSARSpec().hidden)
    base = QSARPredictor(QSARNet(2048, hidden, task="regression", featurizer=FingerprintSpec().to_dict()))
    want = base.predict(fps)
    out = {"model": f"2048 -> {' -> '.join(map(str, hidden))} -> 1 (QSARSpec default), random weights",
           "auto": base.with_precision("auto").precision, "dtypes": {}}
    for d in DTYPES:
        p = base.with_precision(d)
        got = p.predict(fps)
        s = best_of(lambda: p.predict(fps), repeats)
        out["dtypes"][d] = {"molecules_per_s": round(len(fps) / s), "max_abs_score_diff": float(np.abs(got - want).max()),
                            "pearson_r": float(np.corrcoef(got, want)[0, 1]) if d != "float32" else 1.0,
                            "gate": (p.precision_record or {}).get("parity_vs_float32")}
    f32 = out["dtypes"]["float32"]["molecules_per_s"]
    for d in DTYPES:
        out["dtypes"][d]["x_float32"] = round(out["dtypes"][d]["molecules_per_s"] / f32, 2)
    return out


def dti_tower(fps: np.ndarray, repeats: int, workdir: Path) -> dict:
    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.dti.predictor import DTINet, DTIPredictor, DTISpec
    from biogen.embeddings.dti import DTICompounds

    torch.manual_seed(0)
    spec = DTISpec()
    net = DTINet(2048, 64, spec.hidden, spec.latent, 0.0).eval()
    ckpt = DTIPredictor(net, FingerprintSpec(), {"model": "none", "dim": 64, "sha256": "0" * 64}, 0.0, 1.0,
                        spec).save(workdir / "dti.ckpt")
    want = DTICompounds(ckpt, dtype="float32").embed_stored(fps).vectors
    out = {"model": f"2048 -> {spec.hidden} -> {spec.latent} (DTISpec default), random weights",
           "auto": DTICompounds(ckpt, dtype="auto").dtype, "dtypes": {}}
    for d in DTYPES:
        m = DTICompounds(ckpt, dtype=d)
        got = m.embed_stored(fps).vectors
        s = best_of(lambda: m.embed_stored(fps), repeats)
        cos = (got * want).sum(1)  # unit vectors
        out["dtypes"][d] = {"molecules_per_s": round(len(fps) / s), "min_cosine": float(cos.min()),
                            "median_cosine": float(np.median(cos)),
                            "gate": m.identity()["precision"]["parity_vs_float32"]}
    f32 = out["dtypes"]["float32"]["molecules_per_s"]
    for d in DTYPES:
        out["dtypes"][d]["x_float32"] = round(out["dtypes"][d]["molecules_per_s"] / f32, 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="MOSES test molecules")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from biogen.precision import cpu_instructions

    fps = fingerprints(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"benchmark": "precision_models", "command": " ".join(["python", *sys.argv]),
                  "machine": machine(), "versions": versions(), "cpu_flags": sorted(cpu_instructions()),
                  "threads": torch.get_num_threads(), "molecules": len(fps),
                  "qsar": qsar(fps, args.repeats), "dti_compound_tower": dti_tower(fps, args.repeats, Path(tmp))}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
