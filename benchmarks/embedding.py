"""ESM-2 embedding throughput: biogen's packed forward vs fair-esm and Hugging Face, same run.

Workload (PERFORMANCE.md section 2): real UniProt proteins from Debian's mmseqs2-examples
(``/usr/share/doc/mmseqs2/example-data/DB.fasta.gz``, 20,000 sequences; or
``$BIOGEN_DATA_DIR/uniprot_20k.fasta.gz``, see ``biogen.datasets``), a seeded random
sample of them per model (the CPU cannot run all 20,000 through 150M/650M in a sitting),
truncated to 1,022 residues; ESM-2 architectures with random weights (speed does not
depend on weight values), saved as a fair-esm ``.pt`` and a Hugging Face directory by
``tests/esm_fixtures.py``; mean-pooled last layer.

  anchor  fair-esm: its ``scripts/extract.py`` path: ``FastaBatchedDataset.get_batch_indices``
          (length-sorted, padded batches by ``toks_per_batch``), its BatchConverter,
          ``ESM2(tokens, repr_layers=[L])`` (LM head included, as extract.py runs it), fp32
  anchor  Hugging Face ``EsmModel`` (``attn_implementation="sdpa"``), its ``EsmTokenizer``,
          padded batches: ``hf_padded`` = fixed batches in input order (the usual HF loop),
          ``hf_sorted`` = the same length-sorted token-budget batches as fair-esm
          (the fairer engineering anchor); fp32 on CPU, bf16 on GPU
  biogen  ``Embedder``: packed batches of ``token_budget`` tokens, no padding, no LM head;
          fp32 on CPU, bf16 on GPU (FlashAttention varlen)

Ratios are reported twice: ``speedup`` from the medians and ``speedup_best`` from each
path's fastest run (the least disturbed one on a shared machine).

Correctness first: for every model, each anchor's pooled vectors are compared with ours
(max abs difference in fp32, cosine in bf16) before anything is timed. On a GPU,
``--parity N`` also embeds N sequences with biogen in fp32 and bf16 and reports the
cosine per sequence (PERFORMANCE.md: >= 0.999). Each path is then
run ``--repeats`` times, paths interleaved, median and spread reported. tokens/s counts
residues + BOS + EOS of the (truncated) sequences, the same count for every path; MFU =
useful FLOPs (no padding, no LM head) / time / peak, the peak being a square matmul
measured in the same run (fp32 on CPU, bf16 on GPU) and, on a GPU, also the nominal
bf16 peak (790 TFLOP/s for an H100, PERFORMANCE.md).

    python benchmarks/embedding.py                                # CPU: 8M, 35M, 150M, 650M
    python benchmarks/embedding.py --device cuda --models 8M,35M,150M,650M,3B
    python benchmarks/embedding.py --device cuda --paths hf_padded --sample 2000 --parity 200
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(ROOT / "tests"))
import esm_fixtures as fx  # noqa: E402
from _common import machine, versions  # noqa: E402

from biogen.datasets import dataset_path  # noqa: E402
from biogen.protein.embed import Embedder, EmbedSpec  # noqa: E402
from biogen.protein.models import ESM2_ARCHS, MAX_RESIDUES  # noqa: E402
from biogen.protein.tokenizer import TOKENS  # noqa: E402

ANCHORS = ("fair_esm", "hf_padded", "hf_sorted")
SHORT = {"8M": "esm2_t6_8M_UR50D", "35M": "esm2_t12_35M_UR50D", "150M": "esm2_t30_150M_UR50D",
         "650M": "esm2_t33_650M_UR50D", "3B": "esm2_t36_3B_UR50D", "15B": "esm2_t48_15B_UR50D"}
NOMINAL_BF16 = {"H100": 790e12, "H200": 790e12, "A100": 312e12}


def read_fasta(path: Path) -> list[str]:
    seqs, cur = [], []
    with gzip.open(path, "rt") as f:
        for line in f:
            if line.startswith(">"):
                if cur:
                    seqs.append("".join(cur))
                cur = []
            else:
                cur.append(line.strip())
    if cur:
        seqs.append("".join(cur))
    return seqs


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or sampled process RSS on the CPU
    (10 ms; reported above the RSS at entry)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.proc = psutil.Process()
        self.base = self.peak = self.proc.memory_info().rss
        self.stop = False

        def sample():
            while not self.stop:
                self.peak = max(self.peak, self.proc.memory_info().rss)
                time.sleep(0.01)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.extra_bytes = self.peak_bytes - self.base
        else:
            self.stop = True
            self.thread.join()
            self.peak_bytes = self.peak
            self.extra_bytes = self.peak - self.base


def matmul_peak(device: str, dtype: torch.dtype) -> float:
    n = 4096 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    for _ in range(5 if device == "cpu" else 20):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(10 if device == "cuda" else 2):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, (10 if device == "cuda" else 2) * 2 * n**3 / (time.perf_counter() - t))
    return best


# ----------------------------------------------------------------------------- the three paths

def fair_esm_path(model, seqs: list[str], layer: int, toks_per_batch: int, device: str, dtype) -> np.ndarray:
    """scripts/extract.py: sorted, padded batches by toks_per_batch; mean over residues 1..L."""
    import esm

    alphabet = esm.Alphabet.from_architecture("ESM-1b")
    ds = esm.FastaBatchedDataset([str(i) for i in range(len(seqs))], seqs)
    batches = ds.get_batch_indices(toks_per_batch, extra_toks_per_seq=1)
    loader = torch.utils.data.DataLoader(ds, collate_fn=alphabet.get_batch_converter(MAX_RESIDUES),
                                         batch_sampler=batches)
    out = np.zeros((len(seqs), model.embed_dim), dtype=np.float32)
    with torch.no_grad():
        for labels, strs, toks in loader:
            toks = toks.to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=dtype, enabled=device == "cuda" and dtype != torch.float32):
                rep = model(toks, repr_layers=[layer], return_contacts=False)["representations"][layer]
            for i, lab in enumerate(labels):
                n = min(MAX_RESIDUES, len(strs[i]))
                out[int(lab)] = rep[i, 1:n + 1].float().mean(0).cpu().numpy()
    return out


def hf_tokenizer(tmp: Path):
    from transformers import EsmTokenizer

    vocab = tmp / "vocab.txt"
    vocab.write_text("\n".join(TOKENS) + "\n")
    return EsmTokenizer(str(vocab))


def hf_path(model, tok, seqs: list[str], batches: list[list[int]], device: str) -> np.ndarray:
    out = np.zeros((len(seqs), model.config.hidden_size), dtype=np.float32)
    with torch.no_grad():
        for idx in batches:
            enc = tok([seqs[i] for i in idx], return_tensors="pt", padding=True, truncation=True,
                      max_length=MAX_RESIDUES + 2)
            ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            h = model(input_ids=ids, attention_mask=mask).last_hidden_state  # B x L x E
            m = mask.clone()
            m[:, 0] = 0
            m[torch.arange(len(idx)), mask.sum(1) - 1] = 0  # drop BOS and EOS
            pooled = (h.float() * m[..., None]).sum(1) / m.sum(1, keepdim=True)
            out[idx] = pooled.cpu().numpy()
    return out


def ours_path(emb: Embedder, seqs: list[str], layer: int) -> np.ndarray:
    return np.stack([r["pooled"][layer] for r in emb.embed(seqs)])


# ----------------------------------------------------------------------------- one model

def bench_model(short: str, seqs: list[str], args, tmp: Path, peaks: dict) -> dict:
    from transformers import EsmModel

    arch = ESM2_ARCHS[SHORT[short]]
    dev, gpu = args.device, args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    print(f"\n== {arch.name}: building random weights ({arch.n_params / 1e6:.0f}M trunk parameters)", flush=True)
    want_hf = any(k.startswith("hf_") for k in args.paths)
    r = fx.build(tmp, arch.name, arch.num_layers, arch.embed_dim, arch.attention_heads, seed=0,
                 formats=("fair-esm", "hf") if want_hf else ("fair-esm",))
    layer = arch.num_layers
    ref_model = None
    if "fair_esm" in args.paths:
        ref_model = r.model.to(dev)
        if gpu:
            ref_model = ref_model.to(dtype)  # fair-esm in bf16 weights on GPU (its LayerNorms then run in bf16)
    r.model = None
    hf = EsmModel.from_pretrained(r.hf_dir, attn_implementation="sdpa", dtype=dtype).to(dev).eval() if want_hf else None
    tok = hf_tokenizer(tmp) if want_hf else None
    emb = Embedder(r.pt_path, EmbedSpec(layers=(-1,), token_budget=args.token_budget, dtype=args.biogen_dtypes[0]),
                   device=dev)
    reduced = {f"biogen_{d}": Embedder(r.pt_path, EmbedSpec(layers=(-1,), token_budget=args.token_budget, dtype=d),
                                       device=dev) for d in args.biogen_dtypes[1:]}

    lens = np.array([min(len(s), MAX_RESIDUES) for s in seqs])
    n_tokens = int((lens + 2).sum())
    flops = float(sum((n + 2) * arch.flops_per_token(n + 2) for n in lens))
    import esm

    ds = esm.FastaBatchedDataset([str(i) for i in range(len(seqs))], seqs)
    sorted_batches = [list(b) for b in ds.get_batch_indices(args.toks_per_batch, extra_toks_per_seq=1)]
    fixed_batches = [list(range(i, min(i + args.hf_batch_size, len(seqs))))
                     for i in range(0, len(seqs), args.hf_batch_size)]
    padded = {"fair_esm": sum(len(b) * (max(lens[b]) + 2) for b in sorted_batches),
              "hf_sorted": sum(len(b) * (max(lens[b]) + 2) for b in sorted_batches),
              "hf_padded": sum(len(b) * (max(lens[b]) + 2) for b in fixed_batches)}

    paths = {
        "fair_esm": lambda s: fair_esm_path(ref_model, s, layer, args.toks_per_batch, dev, dtype),
        "hf_padded": lambda s: hf_path(hf, tok, s, fixed_batches if len(s) == len(seqs) else [list(range(len(s)))],
                                       dev),
        "hf_sorted": lambda s: hf_path(hf, tok, s, sorted_batches if len(s) == len(seqs) else [list(range(len(s)))],
                                       dev),
        "biogen": lambda s: ours_path(emb, s, layer),
    }
    paths = {k: f for k, f in paths.items() if k == "biogen" or k in args.paths}
    # correctness first (also the warm-up): every path on the same 6 sequences
    check = seqs[:6]
    got = {k: f(check) for k, f in paths.items()}
    correctness = {}
    for k in [p for p in paths if p != "biogen"]:
        a, b = got[k], got["biogen"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        correctness[k] = {"max_abs_diff": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}
        # fp32: the parity bound of the tests (1e-4) scaled by the vectors' size (deep random models grow);
        # bf16: cosine >= 0.999 per sequence
        bound = 1e-4 * max(1.0, float(np.abs(a).max()))
        ok = correctness[k]["max_abs_diff"] <= bound if not gpu else cos.min() >= 0.999
        correctness[k]["ok"] = bool(ok)
        if not ok:
            print(f"   !!! {arch.name}: {k} disagrees with biogen: {correctness[k]}", flush=True)
    print(f"   correctness vs biogen: {correctness}", flush=True)
    for k, e in reduced.items():  # biogen in reduced precision: cosine per sequence vs its fp32 run
        a, b = ours_path(e, check, layer), got["biogen"]
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        correctness[k] = {"vs": "biogen", "min_cosine": float(cos.min()), "ok": bool(cos.min() >= 0.999),
                          "parity_gate": e.parity}
        paths[k] = lambda s, e=e: ours_path(e, s, layer)
    if reduced:
        print(f"   reduced precision vs biogen {args.biogen_dtypes[0]}: "
              f"{ {k: correctness[k]['min_cosine'] for k in reduced} }", flush=True)
    parity = None
    if gpu and args.parity:  # biogen bf16 vs biogen fp32, per sequence
        sub = seqs[: args.parity]
        fp32 = Embedder(r.pt_path, EmbedSpec(layers=(-1,), token_budget=args.token_budget, dtype="float32"),
                        device=dev)
        a, b = ours_path(emb, sub, layer), ours_path(fp32, sub, layer)
        cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
        parity = {"sequences": len(sub), "min_cosine": float(cos.min()), "median_cosine": float(np.median(cos)),
                  "below_0.999": int((cos < 0.999).sum()), "fp32_attention": fp32.info.get("attention")}
        print(f"   bf16 vs fp32 (biogen, {len(sub)} sequences): {parity}", flush=True)
        del fp32

    times: dict[str, list[float]] = {k: [] for k in paths}
    mem: dict[str, float] = {}
    for rep in range(args.model_repeats):
        for k, f in paths.items():
            with PeakMemory(dev) as pm:
                if gpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                f(seqs)
                if gpu:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            times[k].append(dt)
            mem[k] = max(mem.get(k, 0), pm.extra_bytes)
            print(f"   repeat {rep}: {k:10s} {dt:8.2f} s  {n_tokens / dt:10.0f} tokens/s", flush=True)
    res = {"model": arch.name, "architecture": arch.as_dict(), "sequences": len(seqs), "tokens": n_tokens,
           "flops": flops, "correctness": correctness, "bf16_vs_fp32": parity, "paths": {},
           "padded_tokens": {**padded, "biogen": n_tokens}, "biogen_info": emb.info, "biogen_stats": emb.last_stats}
    for k, ts in times.items():
        med = statistics.median(ts)
        res["paths"][k] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
                           "tokens_per_s": n_tokens / med, "sequences_per_s": len(seqs) / med,
                           "peak_memory_extra_mib": mem[k] / 2**20,
                           "mfu_vs_measured_matmul": flops / med / peaks["measured"]}
        if "nominal" in peaks:
            res["paths"][k]["mfu_vs_nominal"] = flops / med / peaks["nominal"]
    b = res["paths"]["biogen"]["tokens_per_s"]
    res["speedup"] = {k: b / res["paths"][k]["tokens_per_s"] for k in paths if k != "biogen"}
    # on a shared machine the least-disturbed run of each path is the better estimate of its speed
    res["speedup_best"] = {k: res["paths"][k]["min_s"] / res["paths"]["biogen"]["min_s"] for k in paths
                           if k != "biogen"}
    print(f"   speedup of biogen: {res['speedup']}", flush=True)
    if reduced:
        res["reduced_vs_first_dtype"] = {k: res["paths"][k]["tokens_per_s"] / b for k in reduced}
        print(f"   reduced precision, tokens/s vs biogen {args.biogen_dtypes[0]}: {res['reduced_vs_first_dtype']}",
              flush=True)
    ref_model = hf = emb = r = reduced = None  # free the models (the path lambdas close over these names)
    if gpu:
        torch.cuda.empty_cache()
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--models", default=None, help="comma list of 8M,35M,150M,650M,3B (default: CPU 8M..650M, "
                                                   "GPU also 3B)")
    ap.add_argument("--sample", default=None, help="sequences per model, e.g. 8M=240,35M=120,150M=48,650M=16 "
                                                   "(default: all 20,000 on a GPU; these numbers on the CPU)")
    ap.add_argument("--repeats", default="3", help="runs per path: N, or per model like 3,650M=1")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--toks-per-batch", type=int, default=4096, help="fair-esm extract.py's default")
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--paths", default=",".join(ANCHORS), help=f"anchors to run beside biogen: comma list of "
                                                               f"{','.join(ANCHORS)}")
    ap.add_argument("--parity", type=int, default=0, help="GPU: sequences embedded in bf16 and fp32 by biogen "
                                                         "(cosine per sequence)")
    ap.add_argument("--fasta", default=None, help="proteins (FASTA, gzipped); default: data set uniprot_20k")
    ap.add_argument("--biogen-dtypes", default=None,
                    help="biogen's dtypes: the first is compared with the anchors, the others (reduced precision) "
                         "with it; default: float32,bfloat16,int8 on the CPU, auto on a GPU")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.biogen_dtypes = (args.biogen_dtypes or ("auto" if args.device == "cuda" else
                                                 "float32,bfloat16,int8")).split(",")
    unknown = sorted(set(args.paths) - set(ANCHORS))
    if unknown:
        ap.error(f"--paths: unknown {unknown}; choose from {', '.join(ANCHORS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    models = (args.models or ("8M,35M,150M,650M,3B" if gpu else "8M,35M,150M,650M")).split(",")
    default_sample = {} if gpu else {"8M": 240, "35M": 120, "150M": 48, "650M": 16}
    sample = dict(default_sample)
    if args.sample:
        sample.update({k: int(v) for k, v in (kv.split("=") for kv in args.sample.split(","))})
    repeats = {"*": 3}
    for kv in args.repeats.split(","):
        k, _, v = kv.rpartition("=")
        repeats[k or "*"] = int(v)
    db = Path(args.fasta or dataset_path("uniprot_20k"))
    allseqs = read_fasta(db)
    rng = np.random.default_rng(args.seed)
    dtype = torch.bfloat16 if gpu else torch.float32
    peaks = {"measured": matmul_peak(args.device, dtype)}
    if gpu:
        name = torch.cuda.get_device_name(0)
        nominal = next((v for k, v in NOMINAL_BF16.items() if k in name), None)
        if nominal:
            peaks["nominal"] = nominal
    print(f"matmul peak ({args.device}, {dtype}): {peaks['measured'] / 1e9:.1f} GFLOP/s", flush=True)
    results = []
    lens = np.array([len(s) for s in allseqs])
    doc = {"benchmark": "embedding", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "command": " ".join(["python", "benchmarks/embedding.py", *(argv or sys.argv[1:])]),
           "machine": {**machine(), **({"gpu": torch.cuda.get_device_name(0)} if gpu else {}),
                       "torch_threads": torch.get_num_threads()},
           "versions": versions("torch", "fair-esm", "transformers"),
           "device": args.device, "dtype": str(dtype).removeprefix("torch."),
           "data": {"source": str(db), "proteins": len(allseqs), "median_length": float(np.median(lens)),
                    "within_1022": int((lens <= MAX_RESIDUES).sum()), "seed": args.seed},
           "settings": {"paths": ["biogen", *args.paths], "biogen_dtypes": args.biogen_dtypes,
                        "token_budget": args.token_budget,
                        "toks_per_batch": args.toks_per_batch, "hf_batch_size": args.hf_batch_size,
                        "repeats": repeats},
           "matmul_peak_flops": peaks, "results": results}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"embedding-{args.device}.json")
    with tempfile.TemporaryDirectory(prefix="esm-bench-") as tmp:
        for short in models:
            n = sample.get(short, len(allseqs))
            pick = rng.choice(len(allseqs), size=min(n, len(allseqs)), replace=False)
            seqs = [allseqs[i] for i in pick]
            d = Path(tmp) / short
            d.mkdir()
            args.model_repeats = repeats.get(short, repeats["*"])
            results.append(bench_model(short, seqs, args, d, peaks))
            out.write_text(json.dumps(doc, indent=1, default=float))  # after each model: a killed run keeps them
    print(f"\nwrote {out}")
    print(f"{'model':22s} " + " ".join(f"{k:>12s}" for k in results[0]["paths"]) + "   (tokens/s)")
    for r in results:
        print(f"{r['model']:22s} " + " ".join(f"{p['tokens_per_s']:12.0f}" for p in r["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
