"""Protein-aware screening throughput: compound-protein pairs/s of the exact GEMM + top-k
over a library's stored DTI projections, against a plain numpy anchor, and a whole screen.

    python benchmarks/protein_aware_screen.py --library ~/.cache/biogen/libraries/moses_test_actives-.../library \\
        --kiba ../shared/data/dti/kiba --out benchmarks/results/protein-aware-screen-cpu.json

What is timed (same process, same vectors, best of ``--repeats``):
* projection: the DTI compound tower over the library's fingerprints (what ``biogen
  library embed model=<ckpt>`` computes once per library), molecules/s;
* scan: ``biogen.search.embedding.exact_scan`` (what the panel and the screen's selection
  run): P unit protein projections against N unit compound projections held as 65,536-row
  float32 blocks, exact top-100 per protein with ties by row, vs the anchor ``S = P @ Z.T``
  (numpy BLAS, one product) + ``np.argpartition`` + a sort of the k best. Correctness first:
  both return the same rows per protein.
  Libraries: the real library's N projections, and 1.58M rows (MOSES train's size) made
  by repeating them 9 times with a small deterministic perturbation (1e-3, renormalized:
  no exact ties; the cost of a product does not depend on the values) - said in the JSON;
* screen: ``biogen screen scoring=protein_aware`` with the 229 KIBA kinases as the panel
  (runtime=inline, stored float32 projections), time per step from its summary.

The DTI network has random weights of the default shape (fingerprint 2048 -> 1024 -> 512,
protein 64 -> 1024 -> 512, UniRep-64 proteins): throughput depends on shapes, not values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

K = 100


def best(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def anchor(zp: np.ndarray, z: np.ndarray, k: int) -> np.ndarray:
    """numpy: the whole P x N product, argpartition, then the k best sorted (ties by row)."""
    s = zp @ z.T
    part = np.argpartition(-s, k, axis=1)[:, :k]
    vals = np.take_along_axis(s, part, 1)
    order = np.lexsort((part, -vals), axis=1)
    return np.take_along_axis(part, order, 1)


def ours(zp, blocks, k: int):
    import torch

    from biogen.search.embedding import exact_scan

    return exact_scan(torch.from_numpy(zp), blocks, k=k)


def make_blocks(z: np.ndarray):
    import torch

    from biogen.search.embedding import BLOCK_ROWS

    return [(torch.from_numpy(np.ascontiguousarray(z[i:i + BLOCK_ROWS])), np.arange(i, min(i + BLOCK_ROWS, len(z))))
            for i in range(0, len(z), BLOCK_ROWS)]


def scan_case(z: np.ndarray, zp: np.ndarray, repeats: int, label: str) -> dict:
    blocks = make_blocks(z)
    qi, rows, _ = ours(zp, blocks, K)
    want = anchor(zp, z, K)
    got = rows.reshape(len(zp), K)
    same = float(np.mean([len(set(got[p]) & set(want[p])) / K for p in range(len(zp))]))
    exact_order = bool((got == want).all())
    t_ours, _ = best(lambda: ours(zp, blocks, K), repeats)
    t_anchor, _ = best(lambda: anchor(zp, z, K), repeats)
    pairs = len(z) * len(zp)
    r = {"library": label, "rows": len(z), "proteins": len(zp), "k": K, "overlap_with_anchor": same,
         "same_order_as_anchor": exact_order, "ours_seconds": round(t_ours, 4), "anchor_seconds": round(t_anchor, 4),
         "ours_pairs_per_s": pairs / t_ours, "anchor_pairs_per_s": pairs / t_anchor, "ratio": t_anchor / t_ours}
    print(json.dumps(r), flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--library", required=True, help="a biogen library (ECFP4-2048), e.g. the default screen's cache")
    ap.add_argument("--kiba", required=True, help="DeepDTA's data/kiba folder (the 229 kinases)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from biogen.dti.data import read_kiba
    from biogen.dti.predictor import DTINet, DTIPredictor, DTISpec, protein_vectors
    from biogen.library import Library
    from biogen.library.embeddings import embed_library
    from biogen.runtime import RuntimeSpec

    out = Path(args.out)
    result = {"command": " ".join(sys.argv), "machine": machine(), "versions": versions("torch"),
              "threads": torch.get_num_threads(), "cases": []}
    tmp = Path(tempfile.mkdtemp(prefix="pa-bench-"))
    lib_dir = tmp / "lib"
    shutil.copytree(args.library, lib_dir, ignore=shutil.ignore_patterns("embeddings", "_work"))
    manifest = json.loads((lib_dir / "manifest.json").read_text())
    manifest.pop("embeddings", None)
    (lib_dir / "manifest.json").write_text(json.dumps(manifest))
    lib = Library.open(lib_dir)

    kiba = read_kiba(args.kiba)
    spec = DTISpec(protein_model="unirep64", protein_dtype="float32")
    t = time.perf_counter()
    plm, protein, _ = protein_vectors(kiba.sequences, spec)
    result["embed_229_kinases_unirep64_seconds"] = round(time.perf_counter() - t, 2)
    torch.manual_seed(0)
    net = DTINet(lib.featurizer.stored_bits, plm.shape[1], spec.hidden, spec.latent, 0.0).eval()
    ckpt = DTIPredictor(net, lib.featurizer, protein, 11.7, 0.8, spec, {}, {"source": "random weights"}).save(
        tmp / "dti.ckpt")
    pred = DTIPredictor.load(ckpt)

    fps = lib.fingerprints()
    t_proj, z = best(lambda: pred.project_compounds(fps), 1)
    result["projection"] = {"rows": len(fps), "seconds": round(t_proj, 2), "molecules_per_s": len(fps) / t_proj}
    t = time.perf_counter()
    rep = embed_library(lib_dir, str(ckpt), dtype="float32", runtime=RuntimeSpec(mode="inline", progress=False))
    result["library_embed"] = {"rows": rep["rows"], "seconds": round(time.perf_counter() - t, 2)}
    print(json.dumps({k: result[k] for k in ("projection", "library_embed")}), flush=True)

    zp_all = pred.project_proteins(plm).astype(np.float32)
    rng = np.random.default_rng(0)
    big = np.concatenate([z] + [z + rng.normal(0, 1e-3, z.shape).astype(np.float32) for _ in range(8)])
    big /= np.linalg.norm(big, axis=1, keepdims=True)
    for label, zz in (("moses_test_actives (real)", z), ("1.58M (9 x real, perturbed)", big)):
        for p in (1, 229):
            result["cases"].append(scan_case(zz, zp_all[:p], args.repeats, label))
            out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    del big

    from biogen.dti.screen import ProteinAwareScorer
    from biogen.screen.pipeline import run_screen
    from biogen.screen.presets import LibrarySpec
    from biogen.screen.selection import SelectionSpec
    from biogen.screen.target import TargetSpec

    fasta = tmp / "kinases.fasta"
    fasta.write_text("".join(f">{i}\n{s}\n" for i, s in zip(kiba.protein_ids, kiba.sequences)))
    screens = {}
    for label, target in (("1 protein", TargetSpec(name=kiba.protein_ids[0], sequence=kiba.sequences[0])),
                          ("229 kinases", TargetSpec(name="kiba", fasta=str(fasta)))):
        t = time.perf_counter()
        res = run_screen(LibrarySpec(path=str(lib_dir)), target, [], [ProteinAwareScorer(checkpoint=str(ckpt))],
                         selection=SelectionSpec(n=100), runtime=RuntimeSpec(mode="inline", progress=False),
                         run_dir=tmp / f"run-{len(screens)}", report=False)
        screens[label] = {"wall_seconds": round(time.perf_counter() - t, 2),
                          "steps": {k: v for k, v in res.summary.seconds.items()}}
        print(label, json.dumps(screens[label]), flush=True)
    result["screen"] = screens
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
