"""GPU validation: every GPU path of biogen on one CUDA node, in one command, without Ray.

    python benchmarks/gpu_suite.py --out gpu-out                  # on a CUDA node (about 9 minutes)
    python benchmarks/gpu_suite.py --out /tmp/dry --size dry      # anywhere: tiny sizes, GPU parts skip

Parts (each a subprocess with its own time limit and log; one failing part does not stop
the others; each part prints its time):

  env         GPU name, memory, driver and CUDA versions, torch / CuPy / numba versions,
              numba's CUDA target, nvcc, CPU cores, the biogen commit            -> env.json
  pytest      ``pytest -m gpu tests/gpu`` (all of them, no -x): junit XML and log  -> pytest.xml
  similarity  MOSES train (1.58M, ECFP4-2048) fingerprinted on all cores; biogen's CUDA
              engine vs FPSim2's CUDA engine and biogen's CPU engine on all cores:
              exactness first, then single queries (threshold 0.7 / 0.4, top-10 / 100), a
              1,000-query top-100 batch and the one-query full scan (benchmarks/gpu_similarity.py)
  embedding   ESM-2 8M / 35M / 150M / 650M (and 3B with --esm-3b), random weights, UniProt
              proteins: biogen's bf16 packed path vs Hugging Face EsmModel padded bf16 (sdpa),
              tokens/s, MFU, peak memory, bf16 vs fp32 cosine (benchmarks/embedding.py)
  embed_job   ``biogen embed`` (ESM-2 35M, random weights) of the UniProt proteins on the GPU
              with runtime=processes, then ``biogen embed-search`` of them against the store
  screen      ``biogen screen`` of the first 1M molecules of MOSES train (+ thrombin's held-out
              actives) with similarity and QSAR scoring on the GPU, runtime=processes (no
              Ray): once building the library, once more on the cached library; time per stage

Everything lands in ``--out``: one JSON and one log per part, ``summary.json`` (the exit
status, time and headline numbers of each part, checked against PERFORMANCE.md's H200
targets) and ``summary.md`` (the same as a short table, also printed last).

An air-gapped node needs the offline bundle that ``benchmarks/gpu_bundle.sh`` builds
(wheels in .whl/, data in .devdata/); then, from the project root:

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:src BIOGEN_DATA_DIR=$PWD/.devdata python3 benchmarks/gpu_suite.py --out gpu-out
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("env", "pytest", "similarity", "embedding", "embed_job", "screen")
# wall-clock limit of each part (seconds), sized from the parts' times on an H200 node (16 cores,
# 2026-12-04: env 2 s, pytest 56 s, similarity 113 s, embedding ~160 s, screen of 1M ~175 s)
LIMITS = {"env": 60, "pytest": 120, "similarity": 180, "embedding": 220, "embed_job": 90, "screen": 260}
TARGETS = {  # PERFORMANCE.md, for an H200
    "full_scan_g_pairs_per_s": 12.0, "batch_top_100_g_pairs_per_s": 300.0, "vs_fpsim2_cuda": 20.0,
    "esm650m_tokens_per_s": 300_000.0, "esm650m_vs_hf_padded": 3.0, "screen_1m_s": 120.0,
}


def log(msg: str) -> None:
    print(f"[gpu_suite {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_visible() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as exc:
        return False, f"torch not importable ({exc})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda or 'none'})"
    return True, torch.cuda.get_device_name(0)


def run_part(name: str, cmd: list[str], out: Path, limit: float, env: dict | None = None) -> dict:
    """Run one part's command with a time limit; its output goes to <out>/<name>.log (and is
    echoed with a prefix). Returns status, exit code and seconds."""
    log(f"part {name}: {' '.join(cmd)}")
    t0 = time.perf_counter()
    logf = out / f"{name}.log"
    with open(logf, "w") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, start_new_session=True)

        def pump() -> None:  # the part's output to its log and, prefixed, to ours
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                print(f"  {name}| {line}", end="", flush=True)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)  # the part and every process it started
            rc = proc.wait()
        reader.join(timeout=10)
    seconds = time.perf_counter() - t0
    status = "timeout" if timed_out else ("ok" if rc == 0 else "failed")
    log(f"part {name}: {status} (exit {rc}) in {seconds:.0f} s")
    return {"status": status, "exit_code": rc, "seconds": round(seconds, 1), "log": logf.name,
            "command": " ".join(cmd), "limit_s": limit}


# ----------------------------------------------------------------------------- env

def environment(out: Path) -> dict:
    """Facts about this node; each probe's failure is recorded, never raised."""
    env: dict = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
                 "python": platform.python_version(), "cpu_cores": len(os.sched_getaffinity(0)),
                 "platform": platform.platform()}

    def probe(key, fn):
        try:
            env[key] = fn()
        except Exception as exc:  # a missing tool or package is a fact about the node
            env[key] = f"unavailable: {type(exc).__name__}: {exc}"

    def git():
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip() + (" (with uncommitted changes)" if subprocess.run(
                                  ["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                  capture_output=True, text=True).stdout.strip() else "")

    def smi():
        q = "name,memory.total,driver_version,clocks.max.sm,clocks.max.memory,power.limit,compute_cap"
        rows = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                              text=True, check=True).stdout.strip().splitlines()
        return [dict(zip(q.split(","), (x.strip() for x in r.split(",")))) for r in rows]

    def torch_info():
        import torch

        d = {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
             "cuda_available": torch.cuda.is_available()}
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            d.update(device=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                     memory_gib=round(p.total_memory / 2**30, 1), devices=torch.cuda.device_count(),
                     bf16=torch.cuda.is_bf16_supported())
        try:
            from torch.nn.attention.varlen import varlen_attn  # noqa: F401

            d["varlen_attn"] = True
        except ImportError:
            d["varlen_attn"] = False
        return d

    def cupy_info():
        import cupy

        d = {"version": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
             "driver": cupy.cuda.runtime.driverGetVersion(), "devices": cupy.cuda.runtime.getDeviceCount()}
        return d

    def numba_info():
        import numba

        d = {"version": numba.__version__}
        try:
            from numba import cuda

            d["cuda_available"] = bool(cuda.is_available())
        except Exception as exc:
            d["cuda_available"] = f"{type(exc).__name__}: {exc}"
        return d

    def nvcc():
        return subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]

    def packages():
        from importlib.metadata import PackageNotFoundError, version

        out = {}
        for name in ("numpy", "pyarrow", "rdkit", "hydra-core", "fair-esm", "transformers", "pytorch-lightning",
                     "lightning", "fpsim2", "tables", "scikit-learn", "ray"):
            try:
                out[name] = version(name)
            except PackageNotFoundError:
                out[name] = None
        return out

    for key, fn in (("biogen_commit", git), ("nvidia_smi", smi), ("torch", torch_info), ("cupy", cupy_info),
                    ("numba", numba_info), ("nvcc", nvcc), ("packages", packages)):
        probe(key, fn)
    (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    return env


# ----------------------------------------------------------------------------- part commands

SMALL_FASTA = """import gzip, sys
from biogen.datasets import dataset_path
src = sys.argv[1] if not sys.argv[1].startswith("${") else dataset_path("uniprot_20k")
n = -1
with gzip.open(src, "rt") as f, open(sys.argv[2], "w") as o:
    for line in f:
        n += line.startswith(">")
        if n >= 24:
            break
        o.write(line)
"""


def commands(args, out: Path, work: Path, full: bool) -> dict[str, list[tuple[str, list[str], dict]]]:
    """Each part: a list of (label, command, extra environment) run in order until one fails."""
    py = sys.executable
    cmds: dict[str, list[tuple[str, list[str], dict]]] = {}
    cmds["pytest"] = [("pytest", [py, "-m", "pytest", "-m", "gpu", "tests/gpu", "-p", "no:cacheprovider", "-rA",
                                  f"--junitxml={out / 'pytest.xml'}"], {})]
    sim = [py, "benchmarks/gpu_similarity.py", "--out", str(out / "similarity.json"), "--workdir", str(work)]
    cmds["similarity"] = [("similarity", sim + ([] if full else ["--limit", "20000", "--queries", "3", "--batch",
                                                                 "40", "--repeats", "1"]), {})]
    data_dir = os.environ.get("BIOGEN_DATA_DIR", os.environ.get("BIOGEN_DEVDATA", ""))
    fasta = Path(data_dir) / "uniprot_4k.fasta.gz" if data_dir else None
    fasta_args = ["--fasta", str(fasta)] if fasta and fasta.is_file() else []
    emb = [py, "benchmarks/embedding.py", "--out", str(out / "embedding.json"), *fasta_args]
    if full:
        models = args.esm_models + (",3B" if args.esm_3b else "")
        emb += ["--device", "cuda", "--models", models, "--paths", "hf_padded,hf_sorted",
                "--sample", ",".join(f"{m}={args.proteins}" for m in models.split(",")), "--repeats", "3",
                "--parity", "200"]
    else:
        emb += ["--device", "cpu", "--models", "8M", "--sample", "8M=12", "--repeats", "1", "--paths", "hf_padded"]
    cmds["embedding"] = [("embedding", emb, {})]
    device = "cuda" if full else "auto"
    proteins = str(fasta) if fasta_args else "${dataset:uniprot_20k}"
    arch = "esm2_t12_35M_UR50D" if full else "esm2_t6_8M_UR50D"
    model = work / f"{arch}.pt"
    first = []
    if not full:  # the first 24 proteins: a CPU embeds 4,000 in minutes
        small = work / "proteins_24.fasta"
        first = [("embed_job-input", [py, "-c", SMALL_FASTA, proteins, str(small)], {})]
        proteins = str(small)
    cmds["embed_job"] = first + [
        ("embed_job-model", [py, "tests/esm_fixtures.py", arch, str(model)], {}),
        ("embed_job-embed", [py, "-m", "biogen.cli.main", "embed", f"input={proteins}", f"output={work / 'emb'}",
                             f"model={model}", f"device={device}", "runtime=processes", "long_policy=chunk",
                             "overwrite=true"], {"BIOGEN_RUNS_DIR": str(work / "runs")}),
        ("embed_job-search", [py, "-m", "biogen.cli.main", "embed-search", f"store={work / 'emb'}",
                              f"query={proteins}", "k=10", f"device={device}", f"output={out / 'embed_search.csv'}"],
         {"BIOGEN_RUNS_DIR": str(work / "runs")}),
    ]
    screen = [py, "-m", "biogen.cli.main", "screen", "library.base=moses_train", "runtime=processes",
              f"device={device}"] + ([f"library.limit={args.screen_limit}"] if full and args.screen_limit else
                                     [] if full else ["library.limit=5000"])
    env = {"BIOGEN_CACHE_DIR": str(work / "cache"), "BIOGEN_RUNS_DIR": str(work / "runs")}
    # twice: the first run builds (and caches) the library, the second screens the cached one
    cmds["screen"] = [(f"screen-{i}", screen + [f"output={work / f'screen-{i}'}"], env) for i in (1, 2)]
    return cmds


def run_steps(name: str, steps: list[tuple[str, list[str], dict]], out: Path, limit: float) -> dict:
    """Run a part's commands in order (stopping at the first that fails) within ``limit`` seconds."""
    t_end = time.monotonic() + limit
    runs = []
    for label, cmd, env in steps:
        left = t_end - time.monotonic()
        if left < 1:
            runs.append({"label": label, "status": "skipped" if not runs else "timeout",
                         "why": "the suite's budget was spent" if not runs else "the part's time limit was reached"})
            break
        r = {"label": label, **run_part(label, cmd, out, left, env)}
        out_dir = next((a.split("=", 1)[1] for a in cmd if a.startswith("output=")), None)
        summary = Path(out_dir) / "summary.json" if out_dir and name == "screen" else None
        if summary is not None and summary.exists():
            sm = json.loads(summary.read_text())
            r.update(molecules=sm.get("molecules"), shards=sm.get("shards"), workers=sm.get("workers"),
                     accelerator=sm.get("accelerator"), seconds_by_stage=sm.get("seconds"),
                     metrics=sm.get("metrics"), funnel=sm.get("funnel"),
                     qsar_train_metrics=sm.get("qsar_train_metrics"))
        manifest = Path(out_dir) / "manifest.json" if out_dir and name == "embed_job" else None
        if manifest is not None and manifest.exists():
            mf = json.loads(manifest.read_text())
            r.update(model=mf.get("model"), device=mf.get("device"), n_sequences=mf.get("n_sequences"),
                     stats=mf.get("stats"))
        runs.append(r)
        if r["status"] != "ok":
            break
    bad = [r["status"] for r in runs if r["status"] != "ok"]
    res = {"status": bad[0] if bad else "ok", "seconds": round(sum(r.get("seconds", 0) for r in runs), 1),
           "runs": runs}
    if len(steps) > 1:
        (out / f"{name}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    return res


# ----------------------------------------------------------------------------- summary

def headline(out: Path, parts: dict) -> list[tuple[str, str, str, str]]:
    """(measure, value, target, verdict) rows from the parts' JSON files."""
    rows: list[tuple[str, str, str, str]] = []

    def verdict(value, target, higher=True):
        if value is None:
            return "not measured"
        return "met" if (value >= target if higher else value <= target) else "missed"

    def load(name):
        p = out / f"{name}.json"
        return json.loads(p.read_text()) if p.exists() else None

    sim = load("similarity")
    if sim and sim.get("full_scan"):
        fs = sim["full_scan"]
        v = fs["kernel_pairs_per_s"] / 1e9
        rows.append(("similarity: one-query full scan, kernel (G pairs/s)",
                     f"{v:.1f} ({fs['fraction_of_copy_bandwidth']:.0%} of copy bandwidth)", ">= 12",
                     verdict(v, TARGETS["full_scan_g_pairs_per_s"])))
        rows.append(("similarity: one-query full scan, engine call (G pairs/s)",
                     f"{fs['call_pairs_per_s'] / 1e9:.1f}", "-", "-"))
    if sim and "batch_top_100" in sim.get("results", {}):
        for label, b in sim["results"]["batch_top_100"].items():
            v = b["pairs_per_s"] / 1e9
            is_gpu = label == "biogen_cuda"
            rows.append((f"similarity: {b['queries']}-query top-100, {label} (G pairs/s)", f"{v:.1f}",
                         ">= 300" if is_gpu else "-", verdict(v, TARGETS["batch_top_100_g_pairs_per_s"]) if is_gpu else "-"))
    if sim and sim.get("ratios"):
        for mode in ("threshold_0.7", "threshold_0.4"):
            rt = sim["ratios"].get(mode, {})
            if "vs_fpsim2_cuda" in rt:
                rows.append((f"similarity: {mode} vs FPSim2 CUDA (x)", f"{rt['vs_fpsim2_cuda']:.1f}", ">= 20",
                             verdict(rt["vs_fpsim2_cuda"], TARGETS["vs_fpsim2_cuda"])))
        for mode in ("threshold_0.7", "top_100"):
            r = sim["results"].get(mode, {})
            if "biogen_cuda" in r:
                rows.append((f"similarity: {mode}, one query, biogen_cuda (ms)", f"{r['biogen_cuda']['median_s'] * 1e3:.2f}",
                             "-", "-"))
    emb = load("embedding")
    if emb:
        for m in emb.get("results", []):
            b = m["paths"]["biogen"]
            name = m["model"].split("_")[2] if m["model"].count("_") >= 2 else m["model"]  # esm2_t33_650M_UR50D: 650M
            rows.append((f"ESM-2 {name}: biogen {emb['dtype']} tokens/s (MFU vs measured matmul)",
                         f"{b['tokens_per_s']:,.0f} ({b['mfu_vs_measured_matmul']:.0%})",
                         ">= 300,000" if "650M" in m["model"] and emb["device"] == "cuda" else "-",
                         verdict(b["tokens_per_s"], TARGETS["esm650m_tokens_per_s"])
                         if "650M" in m["model"] and emb["device"] == "cuda" else "-"))
            if "hf_padded" in m.get("speedup", {}):
                is650 = "650M" in m["model"] and emb["device"] == "cuda"
                rows.append((f"ESM-2 {name}: biogen vs HF padded (x)", f"{m['speedup']['hf_padded']:.2f}",
                             ">= 3" if is650 else "-",
                             verdict(m["speedup"]["hf_padded"], TARGETS["esm650m_vs_hf_padded"]) if is650 else "-"))
            if m.get("bf16_vs_fp32"):
                p = m["bf16_vs_fp32"]
                rows.append((f"ESM-2 {name}: bf16 vs fp32 min cosine ({p['sequences']} seqs)", f"{p['min_cosine']:.5f}",
                             ">= 0.999", verdict(p["min_cosine"], 0.999)))
    job = load("embed_job")
    if job:
        for r in job.get("runs", []):
            if r.get("label") == "embed_job-embed" and r.get("status") == "ok":
                model = (r.get("model") or {}).get("name", "ESM-2")
                rows.append((f"biogen embed: {r.get('n_sequences')} proteins, {model}, {r.get('device')} (s, with start-up)",
                             f"{r['seconds']:.1f}", "-", "-"))
    scr = load("screen")
    if scr:
        for r in scr.get("runs", []):
            s = r.get("seconds_by_stage") or {}
            if "total" in s:
                which = "library built" if s.get("library", 0) > 5 else "cached library"
                cached = which == "cached library"
                on_gpu = (r.get("accelerator") or "").startswith("cuda")
                target_ok = cached and (r.get("molecules") or 0) >= 1_000_000 and on_gpu
                rows.append((f"screen of {r.get('molecules', 0):,} molecules ({which}, {r.get('accelerator')}) (s)",
                             f"{s['total']:.1f}", "< 120" if target_ok else "-",
                             verdict(s["total"], TARGETS["screen_1m_s"], higher=False) if target_ok else "-"))
    return rows


def write_summary(out: Path, env: dict, parts: dict, started: float, args) -> str:
    rows = headline(out, parts)
    gpu = env.get("torch", {}).get("device") if isinstance(env.get("torch"), dict) else None
    summary = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "command": " ".join(sys.argv),
               "gpu": gpu, "size": args.size, "seconds": round(time.perf_counter() - started, 1),
               "parts": parts, "headline": [dict(zip(("measure", "value", "target", "verdict"), r)) for r in rows],
               "env": env}
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    lines = [f"# biogen GPU suite: {gpu or 'no GPU'} ({args.size}), {summary['date']}", "",
             f"Commit {env.get('biogen_commit')}; torch {env.get('torch', {}).get('version') if isinstance(env.get('torch'), dict) else '?'}, "
             f"CuPy {env.get('cupy', {}).get('version') if isinstance(env.get('cupy'), dict) else 'none'}; "
             f"{summary['seconds']:.0f} s in all.", "",
             "| part | status | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v.get('seconds', '')} |" for k, v in parts.items()]
    lines += ["", "| measure | value | target | verdict |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="output folder (created)")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {','.join(PARTS)}, run in that order")
    ap.add_argument("--size", choices=("auto", "full", "dry"), default="auto",
                    help="full: the sizes of PERFORMANCE.md (needs a GPU); dry: tiny, anywhere; auto: full when "
                         "torch sees a GPU")
    ap.add_argument("--proteins", type=int, default=800, help="UniProt proteins per ESM-2 model (full size)")
    ap.add_argument("--esm-models", default="8M,35M,150M,650M", help="ESM-2 sizes (full size)")
    ap.add_argument("--esm-3b", action="store_true", help="also ESM-2 3B (about a minute more)")
    ap.add_argument("--screen-limit", type=int, default=1_000_000,
                    help="screen the first N molecules of MOSES train (PERFORMANCE.md's 1M screen; 0: all 1.58M)")
    ap.add_argument("--budget", type=float, default=570, help="seconds for the whole suite: a part gets at most "
                                                              "what is left (the summary is always written)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch space (default: <out>/work, removed)")
    ap.add_argument("--limit-scale", type=float, default=1.0, help="multiply every part's time limit")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    parts_wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(parts_wanted) - set(PARTS))
    if unknown:
        ap.error(f"--parts: unknown {unknown}; choose from {', '.join(PARTS)}")
    has_gpu, gpu_why = gpu_visible()
    if args.size == "auto":
        args.size = "full" if has_gpu else "dry"
    full = args.size == "full"
    if full and not has_gpu:
        log(f"--size full without a GPU ({gpu_why}): the GPU parts will fail or fall back to the CPU")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.workdir or out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    log(f"output {out}; size {args.size}; GPU: {gpu_why}")

    parts: dict[str, dict] = {}
    env: dict = {}
    if "env" in parts_wanted:
        t0 = time.perf_counter()
        env = environment(out)
        parts["env"] = {"status": "ok", "seconds": round(time.perf_counter() - t0, 1), "json": "env.json"}
        log(f"part env: {json.dumps({k: env.get(k) for k in ('torch', 'cupy', 'numba', 'nvcc')}, default=str)}")
    cmds = commands(args, out, work, full)
    for name in [p for p in parts_wanted if p != "env"]:  # in the order asked for
        limit = LIMITS[name] * args.limit_scale
        if args.budget:
            limit = min(limit, args.budget - (time.perf_counter() - started))
        parts[name] = run_steps(name, cmds[name], out, limit)
        if not full and name in ("similarity", "embedding", "embed_job", "screen"):
            parts[name]["note"] = f"dry run without a GPU ({gpu_why}): CPU paths at tiny sizes"
    text = write_summary(out, env, parts, started, args)
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    print("\n" + text, flush=True)
    return 0 if all(p["status"] == "ok" for p in parts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
