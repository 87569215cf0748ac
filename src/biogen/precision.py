"""Reduced precision for model inference: which dtype a machine runs fastest, and a parity gate.

One helper for every model biogen runs (ESM-2 now; MiniMol, UniRep, the DTI projections and
QSAR inference as they adopt it):

- ``cpu_instructions()``: the matrix instructions this CPU has (``avx512_bf16``,
  ``amx_bf16``, ``amx_int8``, ``avx512_vnni``, ``avx_vnni``), read from ``/proc/cpuinfo``.
- ``auto_cpu_dtype()``: what the instruction flags alone allow (``cpu_candidates()``: bf16
  where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), int8 where it has int8 dot
  products (VNNI, AMX-INT8)), ``float32`` where neither is there.
- ``choose_cpu_dtype(shape)``: among those candidates, the one that is *measured* faster on
  the model's own largest linear layer, on the threads the model will run on (as
  ``cudnn.benchmark`` or FFTW's planner do): a flag says an instruction exists, not which
  kernel PyTorch has for it. Measured on two CPUs of this project, 2 threads: AMD EPYC
  (AVX512-BF16 + VNNI, no AMX), a 640 x 2560 layer: bf16 369, int8 352 GFLOP/s, and int8
  1.1-1.25x faster end to end; Intel Xeon with AMX: bf16 2,600, int8 1,130, fp32 430
  GFLOP/s. The measurement is cached per (CPU model, torch version, threads, shape,
  candidates) in-process and in ``$XDG_CACHE_HOME/biogen/cpu_dtype.json``
  (``~/.cache/biogen``), under a file lock: the first worker on a node measures, the
  others read its numbers, so that the actors of one job agree (a noisy neighbour could
  otherwise tip one of them the other way). Delete the file to measure again
  (``BIOGEN_DTYPE_CACHE`` names another file).
- ``set_worker_threads()``: torch's intra-op threads in a CPU model worker = the CPUs Ray
  assigned to it (no oversubscription when several actors share a node).
- ``check_parity(...)``: the cosine per item between a reduced-precision run and fp32 on a
  calibration set; below ``MIN_COSINE`` it refuses, naming the measured cosine and the fix.

- ``plan_precision(dtype, device, linear, what, valid)`` -> ``PrecisionPlan`` (the dtypes to
  try, in order) and ``build_gated(plan, build, calibrate, what)`` -> ``Gated``: the one
  switch and gate every model uses (ESM-2, MiniMol, UniRep): fp32 reference built once and
  only when a reduced dtype is tried, an explicit dtype that fails refused with its cosine,
  ``auto`` moving down the plan with a warning. ``Int8Linear``/``quantize_linears`` and
  ``autocast`` for plain ``nn.Module`` models.

int8 goes through PyTorch's own quantized kernels (``torch.ops.quantized.linear_dynamic``:
fbgemm/oneDNN, int8 weights with one scale per output channel, activations quantized per
batch), not hand-written GEMMs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import multiprocessing
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Generic, TypeVar

import numpy as np
import torch

from biogen.errors import ConfigError

log = logging.getLogger(__name__)
MIN_COSINE = 0.999  # per calibration item, reduced precision vs fp32
BF16_FLAGS = ("avx512_bf16", "amx_bf16")
INT8_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


@cache
def cpu_instructions() -> frozenset[str]:
    """The CPU's bf16/int8 matrix instruction flags (empty where /proc/cpuinfo is missing)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return frozenset(flags & {*BF16_FLAGS, *INT8_FLAGS})
    except OSError:
        pass
    return frozenset()


def cpu_candidates() -> tuple[str, ...]:
    """The reduced dtypes this CPU has instructions for, in tie-break order (bf16 first:
    it needs no quantization and keeps closer to fp32)."""
    found = cpu_instructions()
    return tuple(d for d, flags in (("bfloat16", BF16_FLAGS), ("int8", INT8_FLAGS)) if found & set(flags))


def auto_cpu_dtype() -> tuple[str, str]:
    """(``bfloat16`` | ``int8`` | ``float32``, why) by the instruction flags alone (the
    candidate filter of ``choose_cpu_dtype``, and the answer where no model shape is known)."""
    found = cpu_instructions()
    if found & set(BF16_FLAGS):
        return "bfloat16", f"the CPU multiplies bf16 natively ({', '.join(sorted(found))})"
    if found & set(INT8_FLAGS):
        return "int8", f"the CPU has int8 dot products ({', '.join(sorted(found))}) but no bf16 instructions"
    return "float32", NO_REDUCED


NO_REDUCED = "the CPU has neither bf16 nor int8 matrix instructions (AVX512-BF16, AMX, VNNI)"
TIMING_FLOP = 2e9     # FLOPs of the timed layer call: M rows chosen so that one call is ~2 GFLOP
TIMING_SECONDS = 0.1  # per dtype, after one warm-up call (so the whole choice stays well under a second)
TIE = 1.05            # int8 must be >= 5% faster than bf16 to be chosen (bf16 needs no quantization)


@cache
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            return next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "unknown")
    except OSError:
        return "unknown"


def timing_rows(k: int, n: int) -> int:
    """Rows (tokens) of the timed ``M x K -> N`` call: ~``TIMING_FLOP`` per call, 64..1024."""
    return int(max(64, min(1024, TIMING_FLOP / (2 * k * n) // 64 * 64)))


def linear_gflops(dtypes: tuple[str, ...], shape: tuple[int, int, int], threads: int) -> dict[str, float]:
    """Measured GFLOP/s of one ``M x K -> N`` linear layer (``shape`` = (M, K, N)) in each of
    ``dtypes`` as the models run it (bf16: bf16 weights and activations through
    ``F.linear``; int8: ``int8_apply`` on fp32 activations; fp32: ``F.linear``) on
    ``threads`` threads. The dtypes take turns (one warm-up call each, then rounds of one
    call each, at least 3 and at most 7 rounds within ``TIMING_SECONDS`` per dtype), so a
    burst of load from a neighbour hits them alike; each dtype's best call counts. On an
    oversubscribed node (more busy threads than cores) short multi-threaded calls wait for
    preempted threads and the numbers are noise; the cache file keeps the first answer."""
    m, k, n = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(m, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k ** 0.5
    b = torch.randn(n, generator=gen) * 0.1
    calls = {}
    for d in dtypes:
        if d == "int8":
            packed = int8_linear(w, b)
            calls[d] = lambda packed=packed: int8_apply(x, packed)
        else:
            td = {"bfloat16": torch.bfloat16, "float32": torch.float32}[d]
            xd, wd, bd = x.to(td), w.to(td), b.to(td)
            calls[d] = lambda xd=xd, wd=wd, bd=bd: torch.nn.functional.linear(xd, wd, bd)
    best = dict.fromkeys(dtypes, float("inf"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for call in calls.values():
                call()
            t0, rounds = time.perf_counter(), 0
            while rounds < 7 and (rounds < 3 or time.perf_counter() - t0 < TIMING_SECONDS * len(dtypes)):
                for d, call in calls.items():
                    t = time.perf_counter()
                    call()
                    best[d] = min(best[d], time.perf_counter() - t)
                rounds += 1
    finally:
        torch.set_num_threads(before)
    return {d: 2.0 * m * k * n / t / 1e9 for d, t in best.items()}


@dataclass(frozen=True)
class CpuDtypeChoice:
    """What ``dtype=auto`` runs on this CPU and why. ``order``: the dtypes to try, chosen
    first, then the other candidate, ``float32`` last (the parity gate moves down it);
    ``gflops``: measured per candidate on ``shape`` = (M, K, N) with ``threads`` threads."""

    dtype: str
    order: tuple[str, ...]
    reason: str
    shape: tuple[int, int, int] | None = None
    threads: int | None = None
    cpu: str = ""
    gflops: dict[str, float] = field(default_factory=dict)
    source: str = "measured"  # or the cache file the numbers were read from

    def record(self) -> dict:
        return {"chosen": self.dtype, "order": list(self.order), "reason": self.reason,
                "timed_linear_mkn": list(self.shape) if self.shape else None, "threads": self.threads,
                "cpu": self.cpu, "gflops": {k: round(v, 1) for k, v in self.gflops.items()}, "source": self.source}


def dtype_cache_file() -> Path:
    """``$BIOGEN_DTYPE_CACHE`` if set (a benchmark points it at a fresh file), else
    ``$XDG_CACHE_HOME/biogen/cpu_dtype.json`` (``~/.cache/biogen/...`` when unset)."""
    if os.environ.get("BIOGEN_DTYPE_CACHE"):
        return Path(os.environ["BIOGEN_DTYPE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "biogen" / "cpu_dtype.json"


@contextlib.contextmanager
def _dtype_cache():
    """The saved measurements (a dict, written back on exit when changed) under an exclusive
    lock; None where the cache directory cannot be used (then each process measures)."""
    path = dtype_cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a")
    except OSError as exc:
        log.info("dtype=auto: no measurement cache (%s); measuring in this process only", exc)
        yield None
        return
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            saved = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            saved = {}
        before = json.dumps(saved, sort_keys=True)
        yield saved
        if json.dumps(saved, sort_keys=True) != before:
            try:
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(saved, indent=1, sort_keys=True) + "\n")
                tmp.replace(path)
            except OSError as exc:
                log.info("dtype=auto: could not write the measurement cache %s (%s)", path, exc)


def choose_cpu_dtype(k: int, n: int, threads: int | None = None) -> CpuDtypeChoice:
    """``dtype=auto`` on the CPU for a model whose largest linear layer is ``K -> N``: the
    candidates the instruction flags allow (``cpu_candidates``), timed on that layer
    (``linear_gflops``) on ``threads`` (default: torch's current count); the faster one
    wins (bf16 on ties within ``TIE``); ``float32`` when there is no candidate. Cached
    in-process per (shape, threads, CPU model); the choice is logged with the GFLOP/s."""
    threads = int(threads or torch.get_num_threads())
    return _choose(timing_rows(k, n), int(k), int(n), threads, cpu_model())


@cache
def _choose(m: int, k: int, n: int, threads: int, cpu: str) -> CpuDtypeChoice:
    cands = cpu_candidates()
    if not cands:
        choice = CpuDtypeChoice("float32", ("float32",), NO_REDUCED, cpu=cpu)
        log.info("dtype=auto on the CPU: float32 (%s)", choice.reason)
        return choice
    flags = ", ".join(sorted(cpu_instructions()))
    shape = (m, k, n)
    # "int8 rows": int8 timed with per-row activation scales (a cache entry timed before is not reused)
    key = (f"{cpu} | torch {torch.__version__} | {threads} threads | {m}x{k}x{n} | {','.join(cands)}"
           + (" | int8 rows" if "int8" in cands else ""))
    source = "measured"
    with _dtype_cache() as saved:
        if saved is not None and key in saved and set(saved[key].get("gflops", {})) == set(cands):
            gflops, source = saved[key]["gflops"], str(dtype_cache_file())
        else:
            gflops = linear_gflops(cands, shape, threads)
            if saved is not None:
                saved[key] = {"gflops": gflops, "measured": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if len(cands) == 1:
        best, why = cands[0], f"the only reduced dtype the CPU has instructions for ({flags})"
    else:
        best = "int8" if gflops["int8"] >= TIE * gflops["bfloat16"] else "bfloat16"
        other = "bfloat16" if best == "int8" else "int8"
        why = (f"faster on the model's largest linear layer ({m} x {k} -> {n}, {threads} threads): "
               f"{gflops[best]:.0f} vs {other} {gflops[other]:.0f} GFLOP/s"
               + ("" if best == "int8" or gflops["bfloat16"] >= gflops["int8"] else
                  f" (int8 within {100 * (TIE - 1):.0f}%: bf16 needs no quantization)") + f"; {flags}")
    order = (best, *[d for d in cands if d != best], "float32")
    choice = CpuDtypeChoice(best, order, why, shape, threads, cpu, gflops, source)
    log.info("dtype=auto on the CPU (%s): %s; %s %s", cpu, best,
             "measured" if source == "measured" else f"measured earlier ({source}):",
             ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in gflops.items()))
    log.info("dtype=auto chose %s: %s", best, why)
    return choice


def check_cpu_dtype(dtype: str) -> None:
    """Warn when a reduced dtype asked for on the CPU lacks the instructions that make it pay;
    refuse int8 where PyTorch has no quantized CPU kernels at all."""
    found = cpu_instructions()
    if dtype in ("bfloat16", "float16") and not found & set(BF16_FLAGS):
        log.warning("dtype=%s on a CPU without bf16 instructions (no AVX512-BF16 or AMX): it is emulated and "
                    "usually slower than float32; use dtype=auto or float32", dtype)
    if dtype == "int8":
        engines = quantized_engines()
        if not engines & {"x86", "fbgemm", "onednn"}:
            raise ConfigError(f"dtype=int8: this torch build has no x86 quantized kernels (engines: "
                              f"{', '.join(sorted(engines)) or 'none'}); use dtype=float32 or auto")
        if not found & set(INT8_FLAGS):
            log.warning("dtype=int8 on a CPU without int8 dot products (no VNNI or AMX): usually slower than "
                        "float32; use dtype=auto or float32")


def quantized_engines() -> set[str]:
    """PyTorch's quantized CPU engines in this build (x86/fbgemm/onednn run ``int8_apply``)."""
    return set(torch.backends.quantized.supported_engines) - {"none"}


def worker_threads(requested: int | None = None) -> int | None:
    """Torch intra-op threads for a CPU model worker, never more than the cores this
    process may run on:

    - in a Ray actor: the CPUs Ray assigned to it (``get_assigned_resources()["CPU"]``, at
      least 1; at most ``requested`` where given), so that actors sharing a node share its
      cores instead of each starting a thread per core;
    - in a worker process of ``runtime.mode=processes`` (a multiprocessing child): its
      ``OMP_NUM_THREADS`` (that mode sets 1 per process unless the user set it), applied
      explicitly because torch may have been imported before the variable was set;
    - else ``requested``, or None: keep torch's default (inline runs)."""
    n = requested
    ray = sys.modules.get("ray")  # only a process Ray started has it imported and initialized
    if ray is not None and ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        if cpus:
            n = max(1, int(cpus)) if n is None else min(int(n), max(1, int(cpus)))
    elif n is None and multiprocessing.parent_process() is not None and os.environ.get("OMP_NUM_THREADS", "").isdigit():
        n = int(os.environ["OMP_NUM_THREADS"])
    if n is None:
        return None
    return max(1, min(int(n), len(os.sched_getaffinity(0))))


def set_worker_threads(requested: int | None = None, what: str = "model worker") -> int:
    """Set torch's intra-op threads to ``worker_threads(requested)`` and log it; returns the
    threads in use."""
    n = worker_threads(requested)
    if n is None:
        log.info("%s: torch's default threads (%d)", what, torch.get_num_threads())
        return torch.get_num_threads()
    torch.set_num_threads(n)
    log.info("%s: %d torch thread(s) (%s; %d cores here)", what, n,
             f"requested {requested}" if requested is not None else
             "the CPUs Ray assigned" if multiprocessing.parent_process() is None else "OMP_NUM_THREADS",
             len(os.sched_getaffinity(0)))
    return n


@dataclass(frozen=True)
class Int8Layer:
    """A linear layer for ``int8_apply``: the weights in int8 with a scale per output
    channel, prepacked for PyTorch's quantized CPU kernels (without the bias), and the bias."""

    packed: object
    bias: torch.Tensor | None


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Int8Layer:
    """``weight`` (N x K) as an ``Int8Layer`` (per-output-channel scales)."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # PyTorch marks its quantized-tensor constructors deprecated
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        packed = torch.ops.quantized.linear_prepack(q, None)
    return Int8Layer(packed, None if bias is None else bias.detach().float().contiguous())


def int8_apply(x: torch.Tensor, layer: Int8Layer) -> torch.Tensor:
    """``x @ W.T + b`` (``x``: M x K float32) with int8 weights and activations quantized with
    a scale per row (per token, per molecule), through PyTorch's dynamic int8 linear: each
    row is divided by its max-abs, two fixed rows (+1 and -1 in column 0) pin the call's
    quantization range to [-1, 1], and the rows are scaled back. So a row's result depends
    on that row alone (int32 accumulation is exact): an item's output does not move with
    its batch mates, as it does with PyTorch's one scale per call, and a row of small
    values keeps its precision. Costs ~10% of an ESM-2 forward over one scale per call
    (three extra elementwise passes)."""
    t, k = x.shape
    s = x.abs().amax(dim=1, keepdim=True).clamp_min_(1e-30)  # (faster than vector_norm(ord=inf))
    xn = x.new_zeros(t + 2, k)
    torch.div(x, s, out=xn[:t])
    xn[t, 0], xn[t + 1, 0] = 1.0, -1.0
    y = torch.ops.quantized.linear_dynamic(xn, layer.packed)[:t]
    return y.mul_(s) if layer.bias is None else torch.addcmul(layer.bias, y, s, out=y)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def check_parity(reduced: np.ndarray, reference: np.ndarray, what: str, dtype: str,
                 min_cosine: float = MIN_COSINE) -> dict:
    """The parity record (items, min and median cosine); ConfigError below ``min_cosine``."""
    c = cosines(reduced, reference)
    rec = {"calibration_items": int(len(c)), "min_cosine": float(c.min()), "median_cosine": float(np.median(c)),
           "threshold": min_cosine}
    if not np.isfinite(c).all() or c.min() < min_cosine:
        raise ConfigError(f"{what} in dtype={dtype} differs from float32 on the calibration set: min cosine "
                          f"{c.min():.5f} per item (needed >= {min_cosine}); use dtype=float32 (or bfloat16 where "
                          "int8 failed)")
    return rec


# ---------------------------------------------------------------- the plan and the gate, shared by every model

DTYPE_WORDS = ("float32", "bfloat16", "float16", "int8")
BF16_CAPABILITY = (8, 0)  # native bf16 matrix units from Ampere on
# auto on the CPU runs float32 without timing a model whose largest linear layer has fewer
# weights (K x N) than this: a 512 x 128 layer takes ~0.1 ms per 4,096 rows in fp32 on the
# 2-core AMX Xeon, so casting or quantizing activations cannot win back the gate's start-up
SMALL_LINEAR = 1 << 16
INT8_QUANTIZATION = "int8 linear layers, per-channel weight scales, per-row (per-token) dynamic activation scales"
M = TypeVar("M")


@dataclass(frozen=True)
class PrecisionPlan:
    """The dtypes a run tries, in order: the parity gate moves to the next one when a
    reduced dtype chosen by ``auto`` fails it (an explicit dtype has one entry and is
    refused instead). ``choice``: the CPU measurement behind ``auto`` (for the manifest)."""

    order: tuple[str, ...]
    auto: bool = False
    choice: dict | None = None


def model_words(device: torch.device) -> tuple[str, ...]:
    """The dtype words a model made of ``nn.Linear`` layers runs in on ``device``: float16
    on GPUs (emulated on most CPUs), int8 on CPUs (PyTorch's quantized kernels are CPU ones)."""
    return ("float32", "bfloat16", "float16") if device.type == "cuda" else ("float32", "bfloat16", "int8")


def plan_precision(dtype: str, device: torch.device, linear: tuple[int, int] | None = None,
                   what: str = "dtype", valid: tuple[str, ...] | None = None) -> PrecisionPlan:
    """The precision plan of ``dtype`` (a word of ``valid``, or ``auto``) on ``device`` for a
    model whose largest linear layer is ``linear`` = (K, N); ``what`` names the config key
    in messages. ``auto``: on a GPU bf16 where the architecture has it natively (compute
    capability >= 8.0: A100, H100/H200, L40...), fp16 before (V100, T4: bf16 would be
    emulated, slowly); on the CPU the measured faster of the reduced dtypes its
    instructions allow, timed on ``linear`` (``choose_cpu_dtype``; without a shape, by the
    flags alone; below ``SMALL_LINEAR`` weights float32, untimed), then the other one;
    float32 last everywhere. ``int8`` on a GPU and words outside ``valid`` (default
    ``DTYPE_WORDS``; ``model_words(device)`` for a model of linear layers) are refused.
    Every dtype gives an item the same output in any batch (int8's activation scales are
    per row: ``int8_apply``), so stored vectors and scores may take any of them."""
    valid = DTYPE_WORDS if valid is None else valid
    _check_word(dtype, device, what, valid)
    if dtype == "auto":
        return _plan_gpu(device, valid) if device.type == "cuda" else _plan_cpu(linear, valid)
    if device.type == "cpu":
        check_cpu_dtype(dtype)
    return PrecisionPlan((dtype,))


def _check_word(dtype: str, device: torch.device, what: str, valid: tuple[str, ...]) -> None:
    if dtype == "int8" and device.type != "cpu":
        raise ConfigError(f"{what}=int8 is a CPU path (int8 linear layers through PyTorch's CPU kernels); "
                          f"refused on {device}: use {what}=auto (bfloat16 on compute capability >= 8.0) or "
                          "float16 there, or device=cpu for int8")
    if dtype != "auto" and dtype not in valid:
        hint = ("; float16 is for GPUs: on the CPU use bfloat16 (or auto)"
                if dtype == "float16" and device.type == "cpu" else "")
        raise ConfigError(f"{what}={dtype!r} is not one of auto, {', '.join(valid)} (this model on "
                          f"{device.type}){hint}")


def _plan_gpu(device: torch.device, valid: tuple[str, ...]) -> PrecisionPlan:
    cap = torch.cuda.get_device_capability(device)
    choice = "bfloat16" if cap >= BF16_CAPABILITY else "float16"
    log.info("dtype=auto: %s on %s (compute capability %d.%d%s)", choice, torch.cuda.get_device_name(device),
             *cap, "" if choice == "bfloat16" else "; bf16 needs >= 8.0")
    return PrecisionPlan(tuple(dict.fromkeys([d for d in (choice,) if d in valid] + ["float32"])), auto=True)


def _plan_cpu(linear: tuple[int, int] | None, valid: tuple[str, ...]) -> PrecisionPlan:
    if linear is None:
        choice, why = auto_cpu_dtype()
        choice = choice if choice in valid else "float32"
        log.info("dtype=auto on the CPU: %s (%s; by instruction flags, no layer shape to time)", choice, why)
        return PrecisionPlan(tuple(dict.fromkeys((choice, "float32"))), auto=True,
                             choice={"chosen": choice, "reason": why})
    k, n = int(linear[0]), int(linear[1])
    if k * n < SMALL_LINEAR:
        why = (f"the largest linear layer ({k} -> {n}) has fewer than {SMALL_LINEAR:,} weights: casting or "
               "quantizing its inputs costs more than a reduced GEMM saves (not timed)")
        log.info("dtype=auto on the CPU: float32 (%s)", why)
        return PrecisionPlan(("float32",), auto=True, choice={"chosen": "float32", "reason": why,
                                                             "largest_linear_kn": [k, n]})
    c = choose_cpu_dtype(k, n)
    order = tuple(d for d in c.order if d in valid or d == "float32")
    return PrecisionPlan(order, auto=True, choice={**c.record(), "chosen": order[0]})


@dataclass
class Gated(Generic[M]):
    """A model built by ``build_gated``: ``precision`` (the dtype word it runs in),
    ``parity`` (``check_parity``'s record; None in float32), ``parity_failed`` (the dtypes
    ``auto`` tried first and why they failed), ``choice`` (the CPU measurement behind auto)."""

    model: M
    precision: str
    parity: dict | None = None
    parity_failed: list[dict] = field(default_factory=list)
    choice: dict | None = None

    def record(self) -> dict:
        """The manifest fields every model records (the same keys as ESM-2's info)."""
        return {"dtype": self.precision, "quantization": INT8_QUANTIZATION if self.precision == "int8" else None,
                "parity_vs_float32": self.parity, "dtype_auto": self.choice,
                "parity_failed": self.parity_failed or None}


def build_gated(plan: PrecisionPlan, build: Callable[[str], M], calibrate: Callable[[M], np.ndarray],
                what: str) -> Gated[M]:
    """The model in the first dtype of ``plan`` that passes the parity gate: ``build(dtype)``
    makes the model, ``calibrate(model)`` its vectors on a fixed calibration set (items x
    dim); the float32 reference is built once, only when a reduced dtype is tried, and is
    the model returned when the plan ends in float32 (which needs no gate). An explicit
    reduced dtype that fails is refused (ConfigError with the measured cosine); under
    ``auto`` the next dtype is tried and why is logged as a warning."""
    failed: list[dict] = []
    reference = ref_model = None
    for k, prec in enumerate(plan.order):
        if prec == "float32":
            return Gated(ref_model if ref_model is not None else build("float32"), prec, None, failed, plan.choice)
        if reference is None:  # the gate's reference, fp32 on the same device
            ref_model = build("float32")
            reference = calibrate(ref_model)
        model = build(prec)
        try:
            parity = check_parity(calibrate(model), reference, what, prec)
        except ConfigError as exc:
            if not plan.auto or k + 1 == len(plan.order):
                raise
            failed.append({"dtype": prec, "error": str(exc)})
            log.warning("dtype=auto: %s failed the parity gate (%s); trying %s", prec, exc, plan.order[k + 1])
            continue
        log.info("%s: dtype=%s parity with float32: min cosine %.5f over %d calibration items", what, prec,
                 parity["min_cosine"], parity["calibration_items"])
        return Gated(model, prec, parity, failed, plan.choice)
    raise ConfigError(f"{what}: empty precision plan")  # pragma: no cover - plans are never empty


# ---------------------------------------------------------------- torch.nn modules in int8 and bf16

class Int8Linear(torch.nn.Module):
    """An ``nn.Linear`` run through ``int8_apply`` (per-channel int8 weights; ``x`` any float
    dtype, computed in fp32 activations quantized per row; any leading shape)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.layer = int8_linear(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = int8_apply(x.reshape(-1, self.in_features).float().contiguous(), self.layer)
        return y.reshape(*x.shape[:-1], self.out_features)


def quantize_linears(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every ``nn.Linear`` below it replaced by an ``Int8Linear`` (in place)."""
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, Int8Linear(child))
        else:
            quantize_linears(child)
    return module


class ReducedLinear(torch.nn.Module):
    """An ``nn.Linear`` whose product runs in ``dtype`` (bfloat16/float16 weights) and whose
    output is float32: a model can run some layers reduced and keep others (an output layer
    whose value is the score itself) in float32, which autocast cannot."""

    def __init__(self, linear: torch.nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.register_buffer("weight", linear.weight.detach().to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).float()


def reduce_linears(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """``module`` with every ``nn.Linear`` below it run in ``precision`` (in place): an
    ``Int8Linear`` for int8, a ``ReducedLinear`` for bfloat16/float16, unchanged for float32."""
    if precision == "int8":
        return quantize_linears(module)
    if precision == "float32":
        return module
    for name, child in list(module.named_children()):
        if isinstance(child, torch.nn.Linear):
            setattr(module, name, ReducedLinear(child, getattr(torch, precision)))
        else:
            reduce_linears(child, precision)
    return module


def largest_linear(module: torch.nn.Module) -> tuple[int, int] | None:
    """(K, N) of the ``nn.Linear`` with the most weights below ``module`` (None: none)."""
    shapes = [(m.in_features, m.out_features) for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return max(shapes, key=lambda s: s[0] * s[1]) if shapes else None


def autocast(device: torch.device, precision: str):
    """The context a module built by ``build`` runs under: bf16/fp16 autocast for those words,
    nothing for float32 and int8 (whose linear layers are ``Int8Linear``)."""
    if precision in ("bfloat16", "float16"):
        return torch.autocast(device.type, dtype=getattr(torch, precision))
    return contextlib.nullcontext()
