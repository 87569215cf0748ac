"""Our ESM-2 forward: packed (padding-free) token stream, varlen attention, no LM head.

The model computes what fair-esm's ``ESM2(tokens, repr_layers=...)["representations"]``
returns, on a packed stream of T tokens (``<cls> s0 <eos> <cls> s1 <eos> ...``) instead of
a padded B x L batch:

- embeddings x 0.88 (token dropout at inference: (1 - 0.15 x 0.8) / (1 - observed mask
  ratio); the ratio is computed per sequence when ``<mask>`` tokens are present);
- per block (pre-LayerNorm): x += out_proj(attn(rotary(q), rotary(k), v)) on LN(x);
  x += fc2(gelu_erf(fc1(LN(x))));
- representation ``i`` = the stream after block ``i`` (0 = embeddings); the last one is
  after ``emb_layer_norm_after``. Blocks after the highest requested layer are skipped.

Every linear layer, LayerNorm and GELU runs on the packed stream (no FLOP is spent on
padding); only attention sees sequence boundaries, through one of three backends chosen
once when the model is built:

- ``varlen`` (CUDA, fp16/bf16): ``torch.nn.attention.varlen.varlen_attn`` (FlashAttention
  over ``cu_seqlens``), one launch per layer, no padding anywhere;
- ``grouped`` (CPU default): consecutive sequences of near-equal length (batches are
  length-sorted) are gathered into one B x H x L x D block with a key-padding mask, at most
  ``GROUP_WASTE`` (15%) more attention pairs than the sequences hold, and one fused
  ``scaled_dot_product_attention`` call runs per group. Measured on this project's 2-core
  CPU: one SDPA call per sequence (B = 1) is about 2x slower than one call per group,
  padding included (the CPU flash kernel parallelises poorly over a single sequence);
- ``segments`` (CUDA in fp32, or on request): one SDPA call per sequence, no padding.

Rotary ``inv_freq`` comes from the checkpoint (recomputing it drifts), cos/sin tables are
built once in fp32 exactly as fair-esm builds them.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biogen.protein.models import MAX_POSITIONS, ESM2Arch, ESM2Checkpoint
from biogen.protein.tokenizer import MASK

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("grouped", "segments", "varlen")
GROUP_WASTE = 1.15  # attention pairs computed / pairs needed, per group (grouped backend)
MASK_RATIO_TRAIN = 0.15 * 0.8


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


FLASH_CAPABILITY = (8, 0)  # FlashAttention-2 kernels (varlen) need Ampere or later


def choose_attention(device: torch.device, dtype: torch.dtype) -> str:
    """``varlen`` on CUDA in half precision when torch has it and the GPU runs FlashAttention
    (compute capability >= 8.0); ``grouped`` on the CPU; ``segments`` on CUDA otherwise
    (with a warning that says why: it costs speed)."""
    if device.type != "cuda":
        return "grouped"
    if dtype not in (torch.float16, torch.bfloat16):
        log.warning("attention: FlashAttention varlen needs fp16/bf16, the model runs in %s on %s; falling back "
                    "to per-sequence SDPA (slower)", dtype, device)
        return "segments"
    cap = torch.cuda.get_device_capability(device)
    if cap < FLASH_CAPABILITY:
        log.warning("attention: FlashAttention varlen needs compute capability >= 8.0, %s has %d.%d; falling back "
                    "to per-sequence SDPA (slower)", torch.cuda.get_device_name(device), *cap)
        return "segments"
    if _varlen_attn() is None:
        log.warning("attention: torch %s has no torch.nn.attention.varlen; falling back to per-sequence SDPA "
                    "(slower; torch >= 2.9 has it)", torch.__version__)
        return "segments"
    return "varlen"


def varlen_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seq_q: torch.Tensor,
                          cu_seq_k: torch.Tensor, max_q: int, max_k: int) -> torch.Tensor:
    """What ``torch.nn.attention.varlen.varlen_attn`` computes (non-causal, default scale),
    one SDPA per sequence: q, k, v T x H x D packed, cu_seq_* B+1 int32 offsets -> T x H x D.
    Any device and dtype: the tests run the ``varlen`` backend through it on the CPU."""
    out = torch.empty_like(q)
    cq, ck = cu_seq_q.tolist(), cu_seq_k.tolist()
    for i in range(len(cq) - 1):
        qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
        o = F.scaled_dot_product_attention(q[qs].transpose(0, 1)[None], k[ks].transpose(0, 1)[None],
                                           v[ks].transpose(0, 1)[None])
        out[qs] = o[0].transpose(0, 1)
    return out


def attention_groups(seqlens: np.ndarray, waste: float = GROUP_WASTE) -> list[tuple[int, int]]:
    """Runs [i, j) of consecutive sequences whose padded attention (n x max^2 pairs) stays
    within ``waste`` x the pairs they need (sum of L^2)."""
    groups, i, n = [], 0, len(seqlens)
    while i < n:
        j, hi, need = i + 1, int(seqlens[i]), int(seqlens[i]) ** 2
        while j < n:
            hi2, need2 = max(hi, int(seqlens[j])), need + int(seqlens[j]) ** 2
            if (j + 1 - i) * hi2 * hi2 > waste * need2:
                break
            hi, need, j = hi2, need2, j + 1
        groups.append((i, j))
        i = j
    return groups


class PackedBatch:
    """One packed batch on a device.

    tokens: T int64; cu_seqlens: B+1 (host numpy int64 ``cu_host``, device int32);
    positions: T int64 (index of each token within its sequence, BOS = 0); max_len: the
    longest sequence in tokens; groups (``grouped`` attention): per run of sequences, its
    token range [start, stop), count n, padded length L, the slots (n*L index, device) its
    tokens occupy and the key-padding mask (n x 1 x 1 x L bool, None when all are L)."""

    def __init__(self, tokens: np.ndarray, cu_seqlens: np.ndarray, device: torch.device):
        self.cu_host = np.asarray(cu_seqlens, dtype=np.int64)
        seqlens = np.diff(self.cu_host)
        self.seqlens = seqlens
        self.max_len = int(seqlens.max(initial=0))
        pos = np.arange(tokens.size, dtype=np.int64) - np.repeat(self.cu_host[:-1], seqlens)
        self.device = device
        nb = device.type == "cuda"
        self.tokens = torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int64)).to(device, non_blocking=nb)
        self.positions = torch.from_numpy(pos).to(device, non_blocking=nb)
        self.cu_seqlens = torch.from_numpy(self.cu_host.astype(np.int32)).to(device, non_blocking=nb)
        self.n_tokens = int(tokens.size)
        self._groups = None
        self.rot: tuple[torch.Tensor, torch.Tensor] | None = None  # per-token cos/sin, set by the model

    @property
    def groups(self) -> list[tuple]:
        if self._groups is None:
            self._groups = []
            for i, j in attention_groups(self.seqlens):
                lens = self.seqlens[i:j]
                L, n = int(lens.max()), j - i
                if n == 1 or (lens == L).all():
                    slots, mask = None, None
                else:
                    slots = np.concatenate([k * L + np.arange(m) for k, m in enumerate(lens)])
                    slots = torch.from_numpy(slots).to(self.device)
                    mask = torch.from_numpy(np.arange(L)[None, :] < lens[:, None]).to(self.device)[:, None, None, :]
                self._groups.append((int(self.cu_host[i]), int(self.cu_host[j]), n, L, slots, mask))
        return self._groups


class FastESM2(nn.Module):
    """ESM-2 trunk for embeddings (no LM head, no contact head) on packed token streams.

    Parameters follow fair-esm's ``ESM2``; q/k/v projections are fused into one E -> 3E
    matmul. Build it with ``FastESM2.from_checkpoint`` (fair-esm or Hugging Face weights)."""

    def __init__(self, arch: ESM2Arch, inv_freq: torch.Tensor, *, attention: str = "grouped"):
        super().__init__()
        if attention not in ATTENTION_BACKENDS:
            raise ValueError(f"attention={attention!r}; expected one of {ATTENTION_BACKENDS}")
        self.arch = arch
        self.attention = attention
        e, f, n = arch.embed_dim, arch.ffn_dim, arch.num_layers
        self.embed = nn.Parameter(torch.empty(33, e))
        self.qkv_w = nn.ParameterList([nn.Parameter(torch.empty(3 * e, e)) for _ in range(n)])
        self.qkv_b = nn.ParameterList([nn.Parameter(torch.empty(3 * e)) for _ in range(n)])
        self.out_w = nn.ParameterList([nn.Parameter(torch.empty(e, e)) for _ in range(n)])
        self.out_b = nn.ParameterList([nn.Parameter(torch.empty(e)) for _ in range(n)])
        self.fc1_w = nn.ParameterList([nn.Parameter(torch.empty(f, e)) for _ in range(n)])
        self.fc1_b = nn.ParameterList([nn.Parameter(torch.empty(f)) for _ in range(n)])
        self.fc2_w = nn.ParameterList([nn.Parameter(torch.empty(e, f)) for _ in range(n)])
        self.fc2_b = nn.ParameterList([nn.Parameter(torch.empty(e)) for _ in range(n)])
        self.ln1 = nn.ParameterList([nn.Parameter(torch.empty(2, e)) for _ in range(n)])  # weight, bias
        self.ln2 = nn.ParameterList([nn.Parameter(torch.empty(2, e)) for _ in range(n)])
        self.ln_after = nn.Parameter(torch.empty(2, e))
        # rotary tables (fp32, fair-esm's construction): cos/sin of positions x inv_freq, MAX_POSITIONS x D
        self.register_buffer("inv_freq", inv_freq.detach().to(torch.float32).clone(), persistent=False)
        self._tables(MAX_POSITIONS)
        self._int8: list[dict] | None = None  # packed int8 linear layers per block (quantize_int8)

    def _tables(self, n_pos: int) -> None:
        t = torch.arange(n_pos, device=self.inv_freq.device).type_as(self.inv_freq)
        freqs = torch.einsum("i,j->ij", t, self.inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("rot_cos", emb.cos(), persistent=False)  # P x D
        # rotate_half(x) * sin == cat(x2, x1) * cat(-sin, sin): one op fewer per layer, same values
        half = emb.shape[1] // 2
        self.register_buffer("rot_sin", torch.cat((-emb[:, :half].sin(), emb[:, half:].sin()), dim=-1),
                             persistent=False)

    @classmethod
    def from_checkpoint(cls, ckpt: ESM2Checkpoint, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, attention: str | None = None) -> FastESM2:
        """Build from fair-esm-named weights, move to ``device`` and cast to ``dtype``.

        ``attention=None`` chooses the backend for the device and dtype (``choose_attention``)."""
        arch, s = ckpt.arch, ckpt.state
        device = torch.device(device)
        inv = [s.get(f"layers.{i}.self_attn.rot_emb.inv_freq") for i in range(arch.num_layers)]
        if inv[0] is None:
            log.warning("%s: rotary inv_freq is not in the checkpoint; computing it (fp32, fair-esm's formula)",
                        ckpt.path)
            d = arch.head_dim
            inv0 = 1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))
        else:
            inv0 = inv[0].float()
            if any(x is not None and not torch.equal(x.float(), inv0) for x in inv[1:]):
                raise ValueError(f"{ckpt.path}: rotary inv_freq differs between layers; ESM-2 shares one")
        attention = attention or choose_attention(device, dtype)
        with torch.device("meta"):
            model = cls(arch, torch.empty(arch.head_dim // 2), attention=attention)

        # cast while copying (host memory: one copy in the compute dtype, not an fp32 one as well)
        def p(*names: str) -> nn.Parameter:  # fused q/k/v: concatenated along the output dim
            return nn.Parameter(torch.cat([s[n].to(dtype) for n in names]), requires_grad=False)

        def ln(prefix: str) -> nn.Parameter:
            return nn.Parameter(torch.stack([s[f"{prefix}.weight"], s[f"{prefix}.bias"]]).to(dtype),
                                requires_grad=False)

        model.embed = p("embed_tokens.weight")
        for i in range(arch.num_layers):
            a = f"layers.{i}.self_attn"
            model.qkv_w[i] = p(f"{a}.q_proj.weight", f"{a}.k_proj.weight", f"{a}.v_proj.weight")
            model.qkv_b[i] = p(f"{a}.q_proj.bias", f"{a}.k_proj.bias", f"{a}.v_proj.bias")
            model.out_w[i], model.out_b[i] = p(f"{a}.out_proj.weight"), p(f"{a}.out_proj.bias")
            model.fc1_w[i], model.fc1_b[i] = p(f"layers.{i}.fc1.weight"), p(f"layers.{i}.fc1.bias")
            model.fc2_w[i], model.fc2_b[i] = p(f"layers.{i}.fc2.weight"), p(f"layers.{i}.fc2.bias")
            model.ln1[i] = ln(f"layers.{i}.self_attn_layer_norm")
            model.ln2[i] = ln(f"layers.{i}.final_layer_norm")
        model.ln_after = ln("emb_layer_norm_after")
        model.eval()
        model.inv_freq = inv0.clone()         # real buffers before moving (they were built on meta)
        model._tables(MAX_POSITIONS)
        model.to(device=device, dtype=dtype)  # parameters in the compute dtype
        model.inv_freq = inv0.to(device)      # rotary tables stay fp32, built on the device
        model._tables(MAX_POSITIONS)
        return model

    def quantize_int8(self) -> None:
        """Run each block's four linear layers (q/k/v, out, fc1, fc2: nearly all of the FLOPs)
        in int8 on the CPU: weights per output channel, activations per token
        (``precision.int8_apply``: a protein's vector does not depend on its batch mates),
        PyTorch's quantized kernels. Embeddings, LayerNorms
        and attention stay in float32. The float32 weights of those layers are released."""
        from biogen.precision import int8_linear

        if self.device.type != "cpu" or self.dtype != torch.float32:
            raise ValueError("int8 quantization needs a float32 model on the CPU")
        packed = []
        for i in range(self.arch.num_layers):
            packed.append({k: int8_linear(getattr(self, f"{k}_w")[i], getattr(self, f"{k}_b")[i])
                           for k in ("qkv", "out", "fc1", "fc2")})
            for k in ("qkv", "out", "fc1", "fc2"):
                getattr(self, f"{k}_w")[i] = nn.Parameter(torch.empty(0), requires_grad=False)
        self._int8 = packed

    def _linear(self, x: torch.Tensor, kind: str, i: int) -> torch.Tensor:
        if self._int8 is not None:
            from biogen.precision import int8_apply

            return int8_apply(x, self._int8[i][kind])
        return F.linear(x, getattr(self, f"{kind}_w")[i], getattr(self, f"{kind}_b")[i])

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    # ------------------------------------------------------------------ forward

    def _embed(self, b: PackedBatch) -> torch.Tensor:
        x = F.embedding(b.tokens, self.embed)  # T x E
        if not self.arch.token_dropout:
            return x
        is_mask = b.tokens == MASK
        if bool(is_mask.any()):
            x = x.masked_fill(is_mask[:, None], 0.0)
            seqlens = torch.diff(b.cu_seqlens.long())
            seq_of = torch.repeat_interleave(torch.arange(seqlens.numel(), device=x.device), seqlens)  # T
            n_mask = torch.zeros(seqlens.numel(), device=x.device).index_add_(0, seq_of, is_mask.float())
            ratio = (n_mask / seqlens.float())[seq_of].to(x.dtype)  # T
            return x * (1 - MASK_RATIO_TRAIN) / (1 - ratio)[:, None]
        return x * (1 - MASK_RATIO_TRAIN)

    @staticmethod
    def _rotate(qk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """fair-esm's apply_rotary_pos_emb: x * cos + rotate_half(x) * sin (sin sign-folded)."""
        x1, x2 = qk.chunk(2, dim=-1)
        return qk * cos + torch.cat((x2, x1), dim=-1) * sin

    def _attention(self, qkv: torch.Tensor, b: PackedBatch) -> torch.Tensor:
        """qkv: T x 3 x H x D (q, k before rotary) -> T x H x D, attention within each sequence."""
        if b.max_len > self.rot_cos.shape[0]:
            self._tables(b.max_len)
        if self.attention == "grouped":
            return self._attend_grouped(qkv, b)
        if b.rot is None:  # per-token tables, once per batch
            b.rot = (self.rot_cos[b.positions].to(qkv.dtype)[:, None, None, :],  # T x 1 x 1 x D
                     self.rot_sin[b.positions].to(qkv.dtype)[:, None, None, :])
        qk = self._rotate(qkv[:, :2], *b.rot)  # T x 2 x H x D
        q, k, v = qk[:, 0], qk[:, 1], qkv[:, 2]
        if self.attention == "varlen":
            return _varlen_attn()(q.contiguous(), k.contiguous(), v.contiguous(), b.cu_seqlens, b.cu_seqlens,
                                  b.max_len, b.max_len)  # flash wants dense T x H x D rows
        out = torch.empty_like(q)
        cu = b.cu_host
        for i in range(len(cu) - 1):
            s, e = int(cu[i]), int(cu[i + 1])
            o = F.scaled_dot_product_attention(q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None],
                                               v[s:e].transpose(0, 1)[None])  # 1 x H x L x D
            out[s:e] = o[0].transpose(0, 1)
        return out

    def _attend_grouped(self, qkv: torch.Tensor, b: PackedBatch) -> torch.Tensor:
        t, _, h, d = qkv.shape
        out = qkv.new_empty(t, h, d)
        for s, e, n, L, slots, mask in b.groups:
            if slots is None:  # n sequences of length L each: a view, no copy
                x = qkv[s:e].view(n, L, 3, h, d)
            else:
                x = qkv.new_zeros(n * L, 3, h, d).index_copy_(0, slots, qkv[s:e]).view(n, L, 3, h, d)
            cos = self.rot_cos[:L].to(qkv.dtype)[None, :, None, None, :]  # 1 x L x 1 x 1 x D
            sin = self.rot_sin[:L].to(qkv.dtype)[None, :, None, None, :]
            qk = self._rotate(x[:, :, :2], cos, sin)  # n x L x 2 x H x D
            o = F.scaled_dot_product_attention(qk[:, :, 0].transpose(1, 2), qk[:, :, 1].transpose(1, 2),
                                               x[:, :, 2].transpose(1, 2), attn_mask=mask)  # n x H x L x D
            o = o.transpose(1, 2).reshape(n * L, h, d)
            out[s:e] = o if slots is None else o.index_select(0, slots)
        return out

    @torch.inference_mode()
    def forward(self, b: PackedBatch, repr_layers: set[int] | frozenset[int]) -> dict[int, torch.Tensor]:
        """Representations (T x E, model dtype) of the packed batch at ``repr_layers``
        (0..num_layers; num_layers = after the final LayerNorm)."""
        n, e, h = self.arch.num_layers, self.arch.embed_dim, self.arch.attention_heads
        eps = self.arch.layer_norm_eps
        x = self._embed(b)  # T x E
        reps: dict[int, torch.Tensor] = {}
        if 0 in repr_layers:
            reps[0] = x
        last = max(repr_layers, default=0)
        t = x.shape[0]
        for i in range(min(last, n)):
            y = F.layer_norm(x, (e,), self.ln1[i][0], self.ln1[i][1], eps)
            qkv = self._linear(y, "qkv", i).view(t, 3, h, e // h)  # T x 3 x H x D
            a = self._attention(qkv, b).reshape(t, e)  # T x E
            x = x + self._linear(a, "out", i)
            y = F.layer_norm(x, (e,), self.ln2[i][0], self.ln2[i][1], eps)
            x = x + self._linear(F.gelu(self._linear(y, "fc1", i)), "fc2", i)
            if i + 1 in repr_layers and i + 1 < n:
                reps[i + 1] = x
        if n in repr_layers:
            reps[n] = F.layer_norm(x, (e,), self.ln_after[0], self.ln_after[1], eps)
        return reps
