"""Reduced precision for model inference: which dtype a machine runs fastest, and a parity gate.

One helper for every model biogen runs (ESM-2 now; MiniMol, UniRep, the DTI projections and
QSAR inference as they adopt it):

- ``cpu_instructions()``: the matrix instructions this CPU has (``avx512_bf16``,
  ``amx_bf16``, ``amx_int8``, ``avx512_vnni``, ``avx_vnni``), read from ``/proc/cpuinfo``.
- ``auto_cpu_dtype()``: ``bfloat16`` where the CPU multiplies bf16 natively (AVX512-BF16
  or AMX), ``int8`` where it has int8 dot products (VNNI) but no bf16, ``float32``
  otherwise; with the reason, for the log. On an AVX512-BF16 + VNNI CPU, measured here
  for an ESM-2 150M-sized linear layer (4096 x 640 x 2560, 2 threads): fp32 154, bf16
  369, int8 (dynamic, per-channel) 352 GFLOP/s: bf16 is as fast as int8 and needs no
  quantization.
- ``check_parity(...)``: the cosine per item between a reduced-precision run and fp32 on a
  calibration set; below ``MIN_COSINE`` it refuses, naming the measured cosine and the fix.

int8 goes through PyTorch's own quantized kernels (``torch.ops.quantized.linear_dynamic``:
fbgemm/oneDNN, int8 weights with one scale per output channel, activations quantized per
batch), not hand-written GEMMs.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache

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


def auto_cpu_dtype() -> tuple[str, str]:
    """(``bfloat16`` | ``int8`` | ``float32``, why) for this CPU."""
    found = cpu_instructions()
    if found & set(BF16_FLAGS):
        return "bfloat16", f"the CPU multiplies bf16 natively ({', '.join(sorted(found))})"
    if found & set(INT8_FLAGS):
        return "int8", f"the CPU has int8 dot products ({', '.join(sorted(found))}) but no bf16 instructions"
    return "float32", "the CPU has neither bf16 nor int8 matrix instructions (AVX512-BF16, AMX, VNNI)"


def check_cpu_dtype(dtype: str) -> None:
    """Warn when a reduced dtype asked for on the CPU lacks the instructions that make it pay."""
    found = cpu_instructions()
    if dtype in ("bfloat16", "float16") and not found & set(BF16_FLAGS):
        log.warning("dtype=%s on a CPU without bf16 instructions (no AVX512-BF16 or AMX): it is emulated and "
                    "usually slower than float32; use dtype=auto or float32", dtype)
    if dtype == "int8" and not found & set(INT8_FLAGS):
        log.warning("dtype=int8 on a CPU without int8 dot products (no VNNI or AMX): usually slower than float32; "
                    "use dtype=auto or float32")


def int8_linear(weight: torch.Tensor, bias: torch.Tensor | None):
    """A packed int8 linear layer (per-output-channel scales) for ``int8_apply``."""
    w = weight.detach().float().contiguous()
    scales = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
    with warnings.catch_warnings():  # PyTorch marks its quantized-tensor constructors deprecated
        warnings.simplefilter("ignore")
        q = torch.quantize_per_channel(w, scales, torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None if bias is None else bias.detach().float())


def int8_apply(x: torch.Tensor, packed) -> torch.Tensor:
    """``x @ W.T + b`` with the int8 weights; ``x`` float32 (quantized on the fly, per batch)."""
    return torch.ops.quantized.linear_dynamic(x, packed)


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
