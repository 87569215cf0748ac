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
  anchor  esm-cpp (CPU; PyPI ``esm-cpp``, C++, int8 weights with VNNI/AMX): ``esm_cpp_fp32``
          and ``esm_cpp_int8`` (``Model.quantize_weights``: per-channel symmetric int8; with
          SmoothQuant, alpha 0.5, calibrated on the first 8 sequences, for models >= 100M
          parameters, as esm-cpp's own recipe does for 150M+), at 1 and 2 threads
          (``--esm-cpp-threads``), each thread count in its own process (esm-cpp sizes its
          thread pool once per process from ``ESM_NUM_THREADS``). Same weights: it reads the
          Hugging Face directory written for the HF anchor, rewritten with the keys of the
          official checkpoints (LayerNorm ``weight``/``bias``, per-layer rotary ``inv_freq``).
          Like for like: its tokenizer adds ``<cls>``/``<eos>`` and truncates to 1,024 tokens
          (1,022 residues, as biogen); the last hidden state (after the final LayerNorm) comes
          from ``forward_with_hidden_states``, one sequence at a time (its only embedding API;
          it also computes the LM-head logits and copies every layer's states), mean-pooled
          over the residues (BOS/EOS excluded), as biogen. ``--esm-cpp-packed`` also times its
          packed ``forward_scheduled`` (logits only, no embeddings: its best-case speed).
  biogen  ``Embedder``: packed batches of ``token_budget`` tokens, no padding, no LM head;
          fp32 on CPU, bf16 on GPU (FlashAttention varlen); on the CPU also bf16 and int8
          (``--biogen-dtypes``) and the same at 1 thread (``<path>@1t``) when the main run
          uses more; ``dtype_auto`` records what ``dtype=auto`` picks on this CPU (measured)
  job     ``--job-models``: biogen's own embed job (``embed_proteins``, Ray actors by
          default, ``--job-runtime processes`` for a process pool) with 1 and 2 workers of
          1 thread each on the same proteins: wall time (start-up and model loading
          included) and the speed-up

Ratios are reported twice: ``speedup`` from the medians and ``speedup_best`` from each
path's fastest run (the least disturbed one on a shared machine).

Correctness first: for every model, each anchor's pooled vectors are compared with ours
(max abs difference in fp32, cosine in bf16) before anything is timed. On a GPU,
``--parity N`` also embeds N sequences with biogen in fp32 and bf16 and reports the
cosine per sequence (PERFORMANCE.md: >= 0.999). Each path is then
run ``--repeats`` times, paths interleaved (esm-cpp after them, in its own processes),
median and spread reported. tokens/s counts residues + BOS + EOS of the (truncated)
sequences, the same count for every path; MFU = useful FLOPs (no padding, no LM head) /
time / peak: ``mfu_vs_measured_matmul`` against the fp32 (CPU) or bf16 (GPU) square
matmul measured in the same run, ``mfu`` against the measured peak of the path's own
dtype at its own thread count (fp32 and bf16: ``torch.matmul``; int8: ``int8_apply``
of ``biogen.precision``, PyTorch's quantized linear, activations quantized on the fly)
and, on a GPU, also the nominal bf16 peak (790 TFLOP/s for an H100, PERFORMANCE.md).

    python benchmarks/embedding.py                                # CPU: 8M, 35M, 150M, 650M
    python benchmarks/embedding.py --device cuda --models 8M,35M,150M,650M,3B
    python benchmarks/embedding.py --device cuda --paths hf_padded --sample 2000 --parity 200
    python benchmarks/embedding.py --models 35M --sample 35M=6 --repeats 1 --job-models 35M   # smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import subprocess
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
from biogen.precision import cpu_instructions  # noqa: E402
from biogen.protein.embed import Embedder, EmbedSpec  # noqa: E402
from biogen.protein.models import ESM2_ARCHS, MAX_RESIDUES  # noqa: E402
from biogen.protein.tokenizer import TOKENS  # noqa: E402

ANCHORS = ("fair_esm", "hf_padded", "hf_sorted", "esm_cpp")
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


def matmul_peak(device: str, dtype: torch.dtype, threads: int | None = None) -> float:
    """Best FLOP/s of a square matmul (``threads``: torch's intra-op threads meanwhile)."""
    n = 4096 if device == "cuda" else 1536
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = 0.0
    with torch_threads(threads):
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


def int8_peak(threads: int | None = None, n: int = 1536) -> float:
    """Best FLOP/s of a square int8 GEMM as biogen runs it (``precision.int8_apply``: int8
    weights, per-channel scales, fp32 activations quantized per call)."""
    from biogen.precision import int8_apply, int8_linear

    x = torch.randn(n, n)
    packed = int8_linear(torch.randn(n, n) / n ** 0.5, None)
    best = 0.0
    with torch_threads(threads), torch.inference_mode():
        int8_apply(x, packed)
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(2):
                int8_apply(x, packed)
            best = max(best, 2 * 2 * n**3 / (time.perf_counter() - t))
    return best


class torch_threads:
    """torch's intra-op threads set to ``n`` within the block (None: unchanged)."""

    def __init__(self, n: int | None):
        self.n = n

    def __enter__(self):
        self.before = torch.get_num_threads()
        if self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def set_mfu(res: dict, peaks: dict) -> None:
    """Each path's ``mfu`` against the measured GEMM peak of its dtype at its thread count (CPU)."""
    if "by_threads" not in peaks:
        return
    for p in res["paths"].values():
        p["mfu"] = res["flops"] / p["median_s"] / peaks["by_threads"][str(p["threads"])][
            "bfloat16" if p["dtype"] == "float16" else p["dtype"]]


def cpu_peaks(thread_counts: list[int]) -> dict[str, dict[str, float]]:
    """Measured fp32, bf16 and int8 GEMM peaks (FLOP/s) per thread count, keyed ``"<threads>"``."""
    out = {}
    for t in sorted(set(thread_counts)):
        out[str(t)] = {"float32": matmul_peak("cpu", torch.float32, t),
                       "bfloat16": matmul_peak("cpu", torch.bfloat16, t), "int8": int8_peak(t)}
        print(f"GEMM peaks, {t} thread(s): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in out[str(t)].items()),
              flush=True)
    return out


# ----------------------------------------------------------------------------- esm-cpp (own processes)

def write_official_hf_keys(hf_dir: Path, fair_model) -> Path:
    """Rewrite ``hf_dir/model.safetensors`` with the keys of the official facebook/esm2_*
    checkpoints, which esm-cpp needs: LayerNorm ``weight``/``bias`` (transformers 5 saves
    ``gamma``/``beta``) and ``esm.encoder.layer.<i>.attention.self.rotary_embeddings.inv_freq``
    per layer (fp32, from the fair-esm model). Hugging Face reads either spelling."""
    from safetensors.torch import load_file, save_file

    path = Path(hf_dir) / "model.safetensors"
    state = load_file(str(path))
    out = {k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias"): v.contiguous()
           for k, v in state.items() if "*" not in k}  # transformers 5 writes one wildcard inv_freq key
    for k, v in fair_model.state_dict().items():
        if k.endswith("self_attn.rot_emb.inv_freq"):
            i = k.split(".")[1]
            out[f"esm.encoder.layer.{i}.attention.self.rotary_embeddings.inv_freq"] = v.float().contiguous()
    save_file(out, str(path), metadata={"format": "pt"})
    return path


def esm_cpp_worker(job_path: str) -> int:
    """Runs in its own process (``ESM_NUM_THREADS`` set by the parent): esm-cpp fp32, then
    int8, on the job's sequences; writes timings (JSON) and pooled vectors (.npy)."""
    import esm_cpp

    job = json.loads(Path(job_path).read_text())
    out = Path(job["out"])
    model = esm_cpp.Model.load_from_safetensors(job["weights"])
    tok = esm_cpp.Tokenizer()
    ids = [np.asarray(tok.encode(s), dtype=np.int32) for s in job["seqs"]]  # <cls> s <eos>, truncated to 1,024

    def embed(xs):  # last hidden state (after the final LayerNorm), mean over residues
        return np.stack([model.forward_with_hidden_states(x)[1][-1][1:-1].mean(0) for x in xs])

    res = {"isa": esm_cpp.current_isa(), "host_isa": esm_cpp.host_isa(), "threads": esm_cpp.Model.num_threads,
           "tokens": int(sum(len(x) for x in ids)), "modes": {}}
    for mode in job["modes"]:
        rec: dict = {}
        if mode == "int8":
            if job["smoothquant"]:
                obs = esm_cpp.ActivationObserver()
                for x in ids[:8]:
                    model.forward_with_observer(x, np.ones_like(x), obs)
                model.apply_smoothquant(obs.percentile(99.9), 0.5)
                rec["smoothquant"] = {"alpha": 0.5, "percentile": 99.9, "calibration_sequences": min(8, len(ids))}
            model.quantize_weights()
            rec["weights_quantized"] = bool(model.config.weights_quantized)
        embed(ids[:2])  # warm-up
        times = []
        for _ in range(job["repeats"]):
            t = time.perf_counter()
            vec = embed(ids)
            times.append(time.perf_counter() - t)
        np.save(out / f"{mode}.npy", vec.astype(np.float32))
        rec["times"] = times
        if job["packed"]:
            model.forward_scheduled(ids[:2])
            packed = []
            for _ in range(job["repeats"]):
                t = time.perf_counter()
                model.forward_scheduled(ids)
                packed.append(time.perf_counter() - t)
            rec["packed_logits_times"] = packed
        res["modes"][mode] = rec
        print(f"   esm-cpp {mode} ({res['threads']} threads, {res['isa']}): "
              f"{res['tokens'] / statistics.median(times):.0f} tokens/s", flush=True)
    (out / "result.json").write_text(json.dumps(res))
    return 0


def run_esm_cpp(weights: Path, seqs: list[str], threads: int, repeats: int, smoothquant: bool, packed: bool,
                tmp: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """esm-cpp in a child process with ``threads`` threads: (its result, pooled vectors per mode)."""
    out = tmp / f"esm-cpp-{threads}t"
    out.mkdir(exist_ok=True)
    job = out / "job.json"
    job.write_text(json.dumps({"weights": str(weights), "seqs": seqs, "modes": ["fp32", "int8"], "repeats": repeats,
                               "smoothquant": smoothquant, "packed": packed, "out": str(out)}))
    env = {**os.environ, "ESM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    subprocess.run([sys.executable, __file__, "--esm-cpp-worker", str(job)], env=env, check=True)
    res = json.loads((out / "result.json").read_text())
    if res["threads"] != threads:
        raise RuntimeError(f"esm-cpp ran {res['threads']} threads, asked for {threads} (ESM_NUM_THREADS)")
    return res, {m: np.load(out / f"{m}.npy") for m in res["modes"]}


# ----------------------------------------------------------------------------- biogen's embed job, 1 vs 2 workers

def job_scaling(pt_path: Path, seqs: list[str], args, tmp: Path) -> dict:
    """``embed_proteins`` on the same proteins with 1 and 2 workers of 1 thread each."""
    from biogen.protein.job import embed_proteins
    from biogen.runtime import RuntimeSpec

    fasta = tmp / "job.fasta"
    fasta.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(seqs)))
    shard = max(1, -(-len(seqs) // 8))  # 8 shards: work for both workers to the end
    runs = []
    for w in (1, 2):
        t = time.perf_counter()
        rep = embed_proteins(str(fasta), tmp / f"store-{w}", model=str(pt_path),
                             spec=EmbedSpec(dtype=args.job_dtype), device="cpu", shard_size=shard,
                             runtime=RuntimeSpec(mode=args.job_runtime, workers=w, progress=False))
        dt = time.perf_counter() - t
        runs.append({"workers": w, "threads_per_worker": 1, "seconds": dt, "tokens": rep.tokens,
                     "tokens_per_s": rep.tokens / dt, "dtype": rep.info.get("dtype"), "shards": rep.shards})
        print(f"   embed job, {w} worker(s) x 1 thread ({args.job_runtime}, dtype {rep.info.get('dtype')}): "
              f"{dt:.1f} s, {rep.tokens / dt:.0f} tokens/s", flush=True)
    return {"runtime": args.job_runtime, "dtype_requested": args.job_dtype, "sequences": len(seqs),
            "shard_size": shard, "runs": runs, "speedup_2_vs_1": runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"],
            "note": "wall time of embed_proteins: Ray or process start-up and model loading included"}


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


def one_thread(f, seqs: list[str]) -> np.ndarray:
    with torch_threads(1):
        return f(seqs)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    from biogen.precision import cosines as cos

    return cos(a, b)


# ----------------------------------------------------------------------------- one model

def bench_model(short: str, seqs: list[str], args, tmp: Path, peaks: dict) -> dict:
    from transformers import EsmModel

    arch = ESM2_ARCHS[SHORT[short]]
    dev, gpu = args.device, args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    print(f"\n== {arch.name}: building random weights ({arch.n_params / 1e6:.0f}M trunk parameters)", flush=True)
    want_hf = any(k.startswith("hf_") for k in args.paths)
    want_cpp = "esm_cpp" in args.paths
    r = fx.build(tmp, arch.name, arch.num_layers, arch.embed_dim, arch.attention_heads, seed=0,
                 formats=("fair-esm", "hf") if want_hf or want_cpp else ("fair-esm",))
    if want_cpp:  # before Hugging Face reads it: the HF anchor then checks the rewritten file too
        cpp_weights = write_official_hf_keys(r.hf_dir, r.model)
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
    main_threads = torch.get_num_threads()
    # (dtype, threads) of each path: its MFU is taken against the measured GEMM peak of both
    meta = {k: ("float32" if not gpu else "bfloat16", main_threads) for k in paths}
    meta["biogen"] = (emb.precision, main_threads)
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
        meta[k] = (e.precision, main_threads)
    if not gpu and 1 in args.esm_cpp_threads and main_threads != 1:  # biogen at 1 thread, beside esm-cpp's
        for k in [k for k in paths if k.startswith("biogen")]:
            paths[f"{k}@1t"] = lambda s, f=paths[k]: one_thread(f, s)
            meta[f"{k}@1t"] = (meta[k][0], 1)
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
    vectors: dict[str, np.ndarray] = {}
    for rep in range(args.model_repeats):
        for k, f in paths.items():
            with PeakMemory(dev) as pm:
                if gpu:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                vectors[k] = f(seqs)
                if gpu:
                    torch.cuda.synchronize()
                dt = time.perf_counter() - t
            times[k].append(dt)
            mem[k] = max(mem.get(k, 0), pm.extra_bytes)
            print(f"   repeat {rep}: {k:10s} {dt:8.2f} s  {n_tokens / dt:10.0f} tokens/s", flush=True)
    cpp = {}
    if want_cpp:
        ref = vectors["biogen"] if emb.precision == "float32" else None
        for t in args.esm_cpp_threads:
            out, vecs = run_esm_cpp(cpp_weights, seqs, t, args.esm_cpp_repeats or args.model_repeats,
                                    arch.n_params >= 100e6,
                                    args.esm_cpp_packed, tmp)
            if out["tokens"] != n_tokens:
                raise RuntimeError(f"esm-cpp counted {out['tokens']} tokens, biogen {n_tokens}: not the same input")
            cpp[str(t)] = {"isa": out["isa"], "host_isa": out["host_isa"]}
            for mode, rec in out["modes"].items():
                k = f"esm_cpp_{mode}@{t}t"
                times[k], mem[k] = rec["times"], None  # its own process: not sampled
                meta[k] = ("int8" if mode == "int8" else "float32", t)
                if ref is not None:
                    cos = cosines(vecs[mode], ref)
                    correctness[k] = {"vs": "biogen float32 (all timed sequences)", "min_cosine": float(cos.min()),
                                      "median_cosine": float(np.median(cos)), "max_abs_diff":
                                      float(np.abs(vecs[mode] - ref).max()), "ok": bool(cos.min() >= 0.999),
                                      **{k2: v for k2, v in rec.items() if k2 not in ("times", "packed_logits_times")}}
                if "packed_logits_times" in rec:
                    cpp[str(t)][f"{mode}_packed_logits_tokens_per_s"] = n_tokens / statistics.median(
                        rec["packed_logits_times"])
        cpp_cos = {k: round(v["min_cosine"], 5) for k, v in correctness.items() if k.startswith("esm_cpp")}
        print(f"   esm-cpp vs biogen float32, min cosine per sequence: {cpp_cos}", flush=True)
    for k in [k for k in vectors if k.startswith("biogen_") and "biogen" in vectors and emb.precision == "float32"]:
        correctness.setdefault(k, {})["min_cosine_all_timed"] = float(cosines(vectors[k], vectors["biogen"]).min())
    from biogen.precision import choose_cpu_dtype

    auto = None if gpu else choose_cpu_dtype(arch.embed_dim, arch.ffn_dim).record()
    res = {"model": arch.name, "architecture": arch.as_dict(), "sequences": len(seqs), "tokens": n_tokens,
           "flops": flops, "correctness": correctness, "bf16_vs_fp32": parity, "paths": {},
           "padded_tokens": {**padded, "biogen": n_tokens}, "biogen_info": emb.info, "biogen_stats": emb.last_stats,
           "dtype_auto": auto, "esm_cpp": cpp or None}
    for k, ts in times.items():
        med = statistics.median(ts)
        res["paths"][k] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "n": len(ts),
                           "tokens_per_s": n_tokens / med, "sequences_per_s": len(seqs) / med,
                           "peak_memory_extra_mib": None if mem[k] is None else mem[k] / 2**20,
                           "mfu_vs_measured_matmul": flops / med / peaks["measured"],
                           "dtype": meta[k][0], "threads": meta[k][1]}
        if "nominal" in peaks:
            res["paths"][k]["mfu_vs_nominal"] = flops / med / peaks["nominal"]
    set_mfu(res, peaks)
    b = res["paths"]["biogen"]["tokens_per_s"]
    res["speedup"] = {k: b / res["paths"][k]["tokens_per_s"] for k in paths if k != "biogen"}
    # on a shared machine the least-disturbed run of each path is the better estimate of its speed
    res["speedup_best"] = {k: res["paths"][k]["min_s"] / res["paths"]["biogen"]["min_s"] for k in paths
                           if k != "biogen"}
    print(f"   speedup of biogen: {res['speedup']}", flush=True)
    if cpp:  # biogen's fastest path vs esm-cpp int8 at the same thread count
        res["vs_esm_cpp_int8"] = {}
        for t in args.esm_cpp_threads:
            mine = {k: v["tokens_per_s"] for k, v in res["paths"].items()
                    if k.startswith("biogen") and v["threads"] == t}
            if mine:
                best = max(mine, key=mine.get)
                res["vs_esm_cpp_int8"][f"{t}t"] = {"biogen_path": best, "ratio": mine[best] / res["paths"][
                    f"esm_cpp_int8@{t}t"]["tokens_per_s"]}
        print(f"   biogen's best vs esm-cpp int8: {res['vs_esm_cpp_int8']}", flush=True)
    if reduced:
        res["reduced_vs_first_dtype"] = {k: res["paths"][k]["tokens_per_s"] / b for k in reduced}
        print(f"   reduced precision, tokens/s vs biogen {args.biogen_dtypes[0]}: {res['reduced_vs_first_dtype']}",
              flush=True)
    if short in args.job_models:
        res["embed_job"] = job_scaling(r.pt_path, args.job_seqs or seqs, args, tmp)
        print(f"   embed job speed-up, 2 vs 1 worker: {res['embed_job']['speedup_2_vs_1']:.2f}x", flush=True)
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
    ap.add_argument("--esm-cpp-threads", default="1,2", help="CPU: thread counts of the esm-cpp anchor (and of "
                                                             "biogen's @1t paths), capped at the cores here")
    ap.add_argument("--esm-cpp-repeats", type=int, default=None,
                    help="runs of each esm-cpp mode (default: the model's --repeats; its fp32 is the slowest path)")
    ap.add_argument("--esm-cpp-packed", action="store_true", help="also time esm-cpp's packed forward_scheduled "
                                                                 "(logits only: its best case, no embeddings)")
    ap.add_argument("--job-models", default="", help="CPU: models whose embed job runs with 1 and 2 workers, e.g. 35M")
    ap.add_argument("--job-sample", type=int, default=0,
                    help="proteins of the 1 vs 2 worker embed job (default: the model's timed sample); a "
                         "longer job amortizes Ray's start and the model load that its wall time includes")
    ap.add_argument("--job-runtime", default="local", choices=["local", "processes"],
                    help="the embed job's runtime: Ray actors (local) or a process pool")
    ap.add_argument("--job-dtype", default="auto", help="the embed job's embed.dtype")
    ap.add_argument("--esm-cpp-worker", default=None, help=argparse.SUPPRESS)  # internal: one esm-cpp process
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.esm_cpp_worker:
        return esm_cpp_worker(args.esm_cpp_worker)
    args.paths = [p for p in args.paths.split(",") if p]
    args.job_models = [m for m in args.job_models.split(",") if m]
    cores = len(os.sched_getaffinity(0))
    args.esm_cpp_threads = sorted({min(int(t), cores) for t in args.esm_cpp_threads.split(",") if t})
    args.biogen_dtypes = (args.biogen_dtypes or ("auto" if args.device == "cuda" else
                                                 "float32,bfloat16,int8")).split(",")
    unknown = sorted(set(args.paths) - set(ANCHORS))
    if unknown:
        ap.error(f"--paths: unknown {unknown}; choose from {', '.join(ANCHORS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    if gpu and "esm_cpp" in args.paths:
        args.paths.remove("esm_cpp")  # a CPU engine
    if "esm_cpp" in args.paths:
        import importlib.util

        if importlib.util.find_spec("esm_cpp") is None:
            ap.error("--paths esm_cpp needs esm-cpp: pip install --no-deps esm-cpp==0.2.1 (it declares numpy<2 but "
                     "runs with numpy 2; see pyproject.toml), or leave esm_cpp out of --paths")
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
    if gpu:
        peaks = {"measured": matmul_peak(args.device, dtype)}
    else:
        by_threads = cpu_peaks([torch.get_num_threads(), *args.esm_cpp_threads])
        peaks = {"measured": by_threads[str(torch.get_num_threads())]["float32"], "by_threads": by_threads}
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
           "versions": versions("torch", "fair-esm", "transformers", "esm-cpp"),
           "device": args.device, "dtype": str(dtype).removeprefix("torch."),
           "data": {"source": str(db), "proteins": len(allseqs), "median_length": float(np.median(lens)),
                    "within_1022": int((lens <= MAX_RESIDUES).sum()), "seed": args.seed},
           "settings": {"paths": ["biogen", *args.paths], "biogen_dtypes": args.biogen_dtypes,
                        "token_budget": args.token_budget,
                        "toks_per_batch": args.toks_per_batch, "hf_batch_size": args.hf_batch_size,
                        "repeats": repeats, "esm_cpp_threads": args.esm_cpp_threads,
                        "esm_cpp_repeats": args.esm_cpp_repeats, "esm_cpp_packed": args.esm_cpp_packed,
                        "job_models": args.job_models, "job_runtime": args.job_runtime,
                        "job_sample": args.job_sample or None},
           "cpu_instructions": sorted(cpu_instructions()),
           "matmul_peak_flops": peaks, "results": results}
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"embedding-{args.device}.json")
    with tempfile.TemporaryDirectory(prefix="esm-bench-") as tmp:
        # dtype=auto measures in this run (and the embed job's workers share it), not reads ~/.cache
        os.environ["BIOGEN_DTYPE_CACHE"] = str(Path(tmp) / "cpu_dtype.json")
        for short in models:
            n = sample.get(short, len(allseqs))
            pick = rng.choice(len(allseqs), size=min(n, len(allseqs)), replace=False)
            seqs = [allseqs[i] for i in pick]
            args.job_seqs = None
            if args.job_sample and short in args.job_models:  # its own seeded draw, same for every model
                job_pick = np.random.default_rng(args.seed + 1).choice(len(allseqs), min(args.job_sample, len(allseqs)),
                                                                       replace=False)
                args.job_seqs = [allseqs[i] for i in job_pick]
            d = Path(tmp) / short
            d.mkdir()
            args.model_repeats = repeats.get(short, repeats["*"])
            results.append(bench_model(short, seqs, args, d, peaks))
            out.write_text(json.dumps(doc, indent=1, default=float))  # after each model: a killed run keeps them
        if "by_threads" in peaks:  # peaks again at the end, the best of both kept (a busy neighbour lowers one)
            for t, d in cpu_peaks(list(map(int, peaks["by_threads"]))).items():
                peaks["by_threads"][t] = {k: max(v, peaks["by_threads"][t][k]) for k, v in d.items()}
            peaks["measured"] = peaks["by_threads"][str(torch.get_num_threads())]["float32"]
            for r in results:
                set_mfu(r, peaks)
                for p in r["paths"].values():
                    p["mfu_vs_measured_matmul"] = r["flops"] / p["median_s"] / peaks["measured"]
            out.write_text(json.dumps(doc, indent=1, default=float))
    print(f"\nwrote {out}")
    print(f"{'model':22s} " + " ".join(f"{k:>12s}" for k in results[0]["paths"]) + "   (tokens/s)")
    for r in results:
        print(f"{r['model']:22s} " + " ".join(f"{p['tokens_per_s']:12.0f}" for p in r["paths"].values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
