"""ESM-2 architectures and checkpoint loaders (fair-esm ``.pt``, torch hub cache, Hugging Face).

A model is named (``esm2_t33_650M_UR50D``, also ``facebook/esm2_t33_650M_UR50D``) or given
as a path (a fair-esm ``.pt`` file or a Hugging Face model directory). A name is looked
for, in this order:

1. ``cache_dir`` when given: ``<cache_dir>/<name>.pt``, ``<cache_dir>/checkpoints/<name>.pt``,
   ``<cache_dir>/<name>/`` (a Hugging Face directory);
2. the torch hub cache, where fair-esm puts its downloads:
   ``torch.hub.get_dir()/checkpoints/<name>.pt`` (``~/.cache/torch/hub/checkpoints`` unless
   ``TORCH_HOME`` says otherwise);
3. the Hugging Face hub cache: ``$HF_HUB_CACHE`` (or ``$HF_HOME/hub``,
   ``~/.cache/huggingface/hub``) ``/models--facebook--<name>/snapshots/<revision>/``;
4. with ``download=True`` only: fair-esm's own URL, saved into the torch hub cache as
   fair-esm's loader does.

Nothing found: ``CheckpointError`` says where it looked and how to provide the weights.

Checkpoints are read with ``torch.load(weights_only=True)``; the only non-tensor global a
fair-esm ESM-2 checkpoint needs (``argparse.Namespace``, its ``cfg["model"]``) is
allow-listed, nothing else is ever unpickled. Whatever the format, the weights are mapped
to fair-esm's own parameter names (``ESM2.state_dict()`` after its prefix upgrade), the
LM and contact heads dropped, and the file's sha256 recorded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from biogen.errors import ConfigError, InputError
from biogen.files import sha256_file

log = logging.getLogger(__name__)

ALPHABET_SIZE = 33           # fair-esm "ESM-1b" alphabet, shared by all ESM-2 models
MAX_POSITIONS = 1026         # tokens per sequence incl. BOS and EOS (1,024 residues in HF configs)
MAX_RESIDUES = 1022          # what fair-esm's extract.py truncates to (``--truncation_seq_length``)
FAIR_ESM_URL = "https://dl.fbaipublicfiles.com/fair-esm/models/{name}.pt"
HF_REPO = "facebook/{name}"


class CheckpointError(InputError):
    """A checkpoint is missing, unreadable or not an ESM-2 checkpoint."""


@dataclass(frozen=True)
class ESM2Arch:
    """One ESM-2 architecture: pre-LayerNorm transformer, rotary attention, FFN 4 x E."""

    name: str
    num_layers: int
    embed_dim: int
    attention_heads: int
    token_dropout: bool = True
    layer_norm_eps: float = 1e-5

    @property
    def ffn_dim(self) -> int:
        return 4 * self.embed_dim

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.attention_heads

    @property
    def n_params(self) -> int:
        """Parameters of the trunk (embeddings + blocks + final norm; no LM/contact head)."""
        e, f = self.embed_dim, self.ffn_dim
        block = 4 * e * e + 4 * e + 2 * e * f + f + e + 4 * e
        return ALPHABET_SIZE * e + self.num_layers * block + 2 * e

    def flops_per_token(self, seq_len: int) -> float:
        """Forward FLOPs per token at length ``seq_len``: 2 x matmul parameters + attention
        (QK^T and AV: 4 x L x E per layer). LM head excluded (we never run it)."""
        e, f = self.embed_dim, self.ffn_dim
        dense = 2 * (4 * e * e + 2 * e * f)
        return self.num_layers * (dense + 4 * seq_len * e)

    def as_dict(self) -> dict:
        return {"name": self.name, "num_layers": self.num_layers, "embed_dim": self.embed_dim,
                "attention_heads": self.attention_heads, "ffn_dim": self.ffn_dim,
                "token_dropout": self.token_dropout, "layer_norm_eps": self.layer_norm_eps,
                "n_params": self.n_params}


# The published ESM-2 family (fair-esm README, Lin et al. 2023).
ESM2_ARCHS: dict[str, ESM2Arch] = {a.name: a for a in (
    ESM2Arch("esm2_t6_8M_UR50D", 6, 320, 20),
    ESM2Arch("esm2_t12_35M_UR50D", 12, 480, 20),
    ESM2Arch("esm2_t30_150M_UR50D", 30, 640, 20),
    ESM2Arch("esm2_t33_650M_UR50D", 33, 1280, 20),
    ESM2Arch("esm2_t36_3B_UR50D", 36, 2560, 40),
    ESM2Arch("esm2_t48_15B_UR50D", 48, 5120, 40),
)}


def architecture(name: str) -> ESM2Arch:
    """The registered architecture ``name`` (``facebook/`` prefix accepted)."""
    key = name.split("/", 1)[1] if name.startswith("facebook/") else name
    if key not in ESM2_ARCHS:
        raise ConfigError(f"model={name!r} is not a known ESM-2 model; valid names: {', '.join(ESM2_ARCHS)} "
                          "(or a path to a fair-esm .pt checkpoint or a Hugging Face model directory)")
    return ESM2_ARCHS[key]


@dataclass
class ESM2Checkpoint:
    """Weights of one ESM-2 trunk under fair-esm's parameter names (``layers.3.fc1.weight``).

    ``state`` holds tensors (CPU; fp32 or the file's dtype) of the embeddings, blocks and
    final LayerNorm; ``files`` maps each file read to its sha256."""

    arch: ESM2Arch
    state: dict
    path: Path
    source: str                    # "fair-esm" | "huggingface"
    sha256: str
    files: dict = field(default_factory=dict)

    def info(self) -> dict:
        return {"model": self.arch.name, "architecture": self.arch.as_dict(), "checkpoint": str(self.path),
                "source_format": self.source, "sha256": self.sha256, "files": dict(self.files)}


# --------------------------------------------------------------------------- resolution

def torch_hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot a HF cache repo folder points at (refs/main, else the newest)."""
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file() and (snaps / ref.read_text().strip() / "config.json").is_file():
        return snaps / ref.read_text().strip()
    found = sorted((p for p in snaps.glob("*") if (p / "config.json").is_file()), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def candidate_locations(name: str, cache_dir: str | Path | None = None) -> list[Path]:
    """Where a named model is looked for, in order (see the module docstring)."""
    out: list[Path] = []
    if cache_dir is not None:
        c = Path(cache_dir).expanduser()
        out += [c / f"{name}.pt", c / "checkpoints" / f"{name}.pt", c / name]
    out.append(torch_hub_checkpoints() / f"{name}.pt")
    out.append(hf_hub_cache() / f"models--facebook--{name}")
    return out


def resolve_checkpoint(model: str | Path, cache_dir: str | Path | None = None, *, download: bool = False) -> Path:
    """The local file (``.pt``) or directory (Hugging Face) holding ``model``'s weights."""
    p = Path(model).expanduser()
    if p.exists():
        return p
    looks_like_path = (isinstance(model, Path) or str(model).endswith((".pt", ".pth", ".bin"))
                       or (os.sep in str(model) and not str(model).startswith("facebook/")))
    if looks_like_path:
        raise CheckpointError(f"model={str(model)!r}: no such file or directory; expected a fair-esm .pt checkpoint, "
                              f"a Hugging Face model directory or one of the names {', '.join(ESM2_ARCHS)}")
    arch = architecture(str(model))
    for loc in candidate_locations(arch.name, cache_dir):
        if loc.name.startswith("models--"):
            snap = _hf_snapshot(loc) if loc.is_dir() else None
            if snap is not None:
                return snap
        elif loc.suffix == ".pt" and loc.is_file():
            return loc
        elif loc.is_dir() and (loc / "config.json").is_file():
            return loc
    if download:
        return _download_fair_esm(arch.name)
    looked = "\n".join(f"  - {loc}" + ("/snapshots/<revision>/" if loc.name.startswith("models--") else "")
                       for loc in candidate_locations(arch.name, cache_dir))
    raise CheckpointError(
        f"ESM-2 weights for model={arch.name!r} were not found locally (offline: nothing is downloaded). Looked in:\n"
        f"{looked}\nProvide them in one of these ways:\n"
        f"  - fair-esm checkpoint: download {FAIR_ESM_URL.format(name=arch.name)} into {torch_hub_checkpoints()}/ "
        f"(what fair-esm's loader does when online), or pass its path as model=/path/to/{arch.name}.pt;\n"
        f"  - Hugging Face: `huggingface-cli download {HF_REPO.format(name=arch.name)} --local-dir DIR` and pass "
        f"model=DIR (or keep it in the HF hub cache);\n"
        f"  - set cache_dir to a folder holding {arch.name}.pt; or allow the download (download=True) when online.")


def _download_fair_esm(name: str) -> Path:
    """fair-esm's own behaviour when online: fetch the .pt into the torch hub cache."""
    import torch

    dst = torch_hub_checkpoints() / f"{name}.pt"
    dst.parent.mkdir(parents=True, exist_ok=True)
    url = FAIR_ESM_URL.format(name=name)
    log.warning("downloading %s to %s (download=True)", url, dst)
    try:
        torch.hub.download_url_to_file(url, str(dst), progress=False)
    except Exception as exc:  # network errors come in many types; re-raised with the fix
        raise CheckpointError(f"could not download {url} to {dst}: {exc}; download it by other means and pass "
                              f"model=/path/to/{name}.pt") from exc
    return dst


# --------------------------------------------------------------------------- loading



def _torch_load(path: Path) -> object:
    """``torch.load(weights_only=True)`` with the one global fair-esm ESM-2 files need."""
    import pickle

    import torch

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if refused is None:
            raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:200]}); "
                                  "expected a fair-esm ESM-2 .pt file") from None
        raise CheckpointError(
            f"{path} cannot be loaded with torch.load(weights_only=True): it needs the Python object "
            f"{refused.group(1)}. biogen never unpickles arbitrary objects; besides tensors only argparse.Namespace "
            "(fair-esm's cfg) is allowed. Re-save it as {'model': state_dict, 'cfg': {'model': {...}}} or as a "
            "Hugging Face directory (safetensors)") from None
    except Exception as exc:  # RuntimeError, EOFError, KeyError (random bytes), ...: all mean "not a checkpoint"
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); expected a fair-esm ESM-2 .pt file") from None


_FAIR_PREFIX = re.compile(r"^(encoder\.sentence_encoder\.|encoder\.)")
_KEEP = re.compile(r"^(embed_tokens\.weight|emb_layer_norm_after\.(weight|bias)|layers\.\d+\.(self_attn\.(q|k|v|out)_proj"
                   r"\.(weight|bias)|self_attn\.rot_emb\.inv_freq|self_attn_layer_norm\.(weight|bias)|fc[12]\.(weight|bias)"
                   r"|final_layer_norm\.(weight|bias)))$")


def _cfg_get(cfg, key: str):
    if cfg is None:
        return None
    if isinstance(cfg, dict):
        return cfg.get(key)
    return getattr(cfg, key, None)


def _arch_from_state(state: dict, heads: int | None, token_dropout: bool | None, name_hint: str | None,
                     eps: float, where: Path) -> ESM2Arch:
    if "embed_tokens.weight" not in state:
        raise CheckpointError(f"{where} has no token embedding (embed_tokens / embeddings.word_embeddings); "
                              "it is not an ESM-2 checkpoint")
    vocab, dim = state["embed_tokens.weight"].shape
    if vocab != ALPHABET_SIZE:
        raise CheckpointError(f"{where}: token embedding has {vocab} rows, ESM-2 has {ALPHABET_SIZE} "
                              "(the ESM-1b alphabet); not an ESM-2 checkpoint")
    layer_ids = {int(k.split(".")[1]) for k in state if k.startswith("layers.")}
    n_layers = len(layer_ids)
    if layer_ids != set(range(n_layers)) or n_layers == 0:
        raise CheckpointError(f"{where}: transformer layers {sorted(layer_ids)} are not 0..N-1")
    same_dims = [a for a in ESM2_ARCHS.values() if (a.num_layers, a.embed_dim) == (n_layers, dim)]
    if heads is None:
        if not same_dims:
            raise CheckpointError(f"{where}: the number of attention heads is not recorded and {n_layers} layers x "
                                  f"{dim} matches no registered ESM-2 ({', '.join(ESM2_ARCHS)})")
        heads = same_dims[0].attention_heads
    registered = [a for a in same_dims if a.attention_heads == heads]
    if name_hint in ESM2_ARCHS and ESM2_ARCHS[name_hint] not in registered:
        exp = ESM2_ARCHS[name_hint]
        raise CheckpointError(f"{where} is named {name_hint} but holds {n_layers} layers x {dim} dims x {heads} heads; "
                              f"{name_hint} has {exp.num_layers} x {exp.embed_dim} x {exp.attention_heads}")
    name = registered[0].name if registered else (name_hint or f"esm2_t{n_layers}_d{dim}")
    for i in range(n_layers):
        for k in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.out_proj.weight", "fc1.weight", "fc2.weight", "self_attn_layer_norm.weight",
                  "final_layer_norm.weight"):
            if f"layers.{i}.{k}" not in state:
                raise CheckpointError(f"{where}: layers.{i}.{k} is missing; the checkpoint is incomplete or not ESM-2")
    if "emb_layer_norm_after.weight" not in state:
        raise CheckpointError(f"{where}: the final LayerNorm (emb_layer_norm_after) is missing; not an ESM-2 "
                              "checkpoint (ESM-1 models have no rotary attention and are not supported)")
    return ESM2Arch(name, n_layers, int(dim), int(heads), bool(True if token_dropout is None else token_dropout), eps)


def load_fair_esm(path: Path) -> ESM2Checkpoint:
    """A fair-esm ESM-2 ``.pt``: ``{"model": state_dict, "cfg": {"model": Namespace(...)}}``."""
    path = Path(path)
    data = _torch_load(path)
    if not isinstance(data, dict) or "model" not in data or not isinstance(data["model"], dict):
        got = type(data).__name__ + (f" with keys {sorted(data)[:8]}" if isinstance(data, dict) else "")
        raise CheckpointError(f"{path} holds a {got}; expected a fair-esm checkpoint: a dict with 'model' "
                              "(state dict) and 'cfg' (ESM-2) entries")
    cfg = data.get("cfg")
    mcfg = _cfg_get(cfg, "model")
    if mcfg is None:
        args = data.get("args")
        arch_name = _cfg_get(args, "arch")
        if arch_name:
            raise CheckpointError(f"{path} is a fair-esm ESM-1 checkpoint (args.arch={arch_name!r}); only ESM-2 "
                                  f"models are supported: {', '.join(ESM2_ARCHS)}")
        log.warning("%s has no cfg['model']; the architecture is inferred from the weights", path)
    state = {}
    for k, v in data["model"].items():
        k2 = _FAIR_PREFIX.sub("", k)
        if _KEEP.match(k2):
            state[k2] = v
    arch = _arch_from_state(state, _cfg_get(mcfg, "encoder_attention_heads"), _cfg_get(mcfg, "token_dropout"),
                            path.stem, 1e-5, path)
    layers, dim = _cfg_get(mcfg, "encoder_layers"), _cfg_get(mcfg, "encoder_embed_dim")
    if mcfg is not None and (layers, dim) != (arch.num_layers, arch.embed_dim):
        raise CheckpointError(f"{path}: cfg says {layers} layers x {dim} dims, the weights hold "
                              f"{arch.num_layers} x {arch.embed_dim}")
    digest = sha256_file(path)
    return ESM2Checkpoint(arch, state, path, "fair-esm", digest, {path.name: digest})


_HF_MAP = [
    (re.compile(r"^embeddings\.word_embeddings\.weight$"), "embed_tokens.weight"),
    (re.compile(r"^encoder\.emb_layer_norm_after\.(weight|bias)$"), r"emb_layer_norm_after.\1"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.query\.(weight|bias)$"), r"layers.\1.self_attn.q_proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.key\.(weight|bias)$"), r"layers.\1.self_attn.k_proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.value\.(weight|bias)$"), r"layers.\1.self_attn.v_proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.self\.rotary_embeddings\.inv_freq$"),
     r"layers.\1.self_attn.rot_emb.inv_freq"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.(weight|bias)$"), r"layers.\1.self_attn.out_proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.LayerNorm\.(weight|bias)$"), r"layers.\1.self_attn_layer_norm.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.intermediate\.dense\.(weight|bias)$"), r"layers.\1.fc1.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.output\.dense\.(weight|bias)$"), r"layers.\1.fc2.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.LayerNorm\.(weight|bias)$"), r"layers.\1.final_layer_norm.\2"),
]


def _hf_weight_files(d: Path) -> list[Path]:
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (d / index).is_file():
            shards = sorted(set(json.loads((d / index).read_text())["weight_map"].values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{d}/{index} names shards that are missing: {missing}")
            return [d / s for s in shards]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if (d / single).is_file():
            return [d / single]
    raise CheckpointError(f"{d} has a config.json but no weights: expected model.safetensors or pytorch_model.bin "
                          "(or their sharded .index.json)")


def load_huggingface(d: Path) -> ESM2Checkpoint:
    """A Hugging Face ``EsmModel``/``EsmForMaskedLM`` directory (config.json + weights)."""
    d = Path(d)
    try:
        cfg = json.loads((d / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{d}/config.json is not readable JSON ({exc})") from None
    if cfg.get("model_type") != "esm":
        raise CheckpointError(f"{d}/config.json has model_type={cfg.get('model_type')!r}; expected 'esm' (ESM-2)")
    if cfg.get("position_embedding_type", "absolute") != "rotary" or cfg.get("emb_layer_norm_before"):
        raise CheckpointError(f"{d} is an ESM-1 style model (position_embedding_type="
                              f"{cfg.get('position_embedding_type')!r}); only ESM-2 (rotary) is supported")
    if cfg.get("hidden_act", "gelu") != "gelu" or cfg.get("intermediate_size") != 4 * cfg.get("hidden_size", 0):
        raise CheckpointError(f"{d}: hidden_act={cfg.get('hidden_act')!r}, intermediate_size="
                              f"{cfg.get('intermediate_size')} do not describe an ESM-2 (gelu, 4 x hidden_size)")
    raw: dict = {}
    files = _hf_weight_files(d)
    digests = {}
    for f in files:
        if f.suffix == ".safetensors":
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise CheckpointError(f"{f} needs the safetensors package: pip install safetensors") from None
            try:
                raw.update(load_file(str(f)))
            except Exception as exc:  # safetensors raises its own error types
                raise CheckpointError(f"{f} is not a readable safetensors file ({exc})") from None
        else:
            part = _torch_load(f)
            if not isinstance(part, dict):
                raise CheckpointError(f"{f} holds a {type(part).__name__}; expected a state dict")
            raw.update(part)
        digests[f.name] = sha256_file(f)
    state = {}
    for k, v in raw.items():
        k = k[4:] if k.startswith("esm.") else k
        # transformers 5 writes LayerNorms as gamma/beta and one rotary buffer as layer.*
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        if k in ("rotary_embeddings.inv_freq", "encoder.layer.*.attention.self.rotary_embeddings.inv_freq"):
            state["rotary.inv_freq"] = v
            continue
        for pat, rep in _HF_MAP:
            if pat.match(k):
                state[pat.sub(rep, k)] = v
                break
    arch = _arch_from_state(state, cfg.get("num_attention_heads"), cfg.get("token_dropout", True),
                            Path(cfg.get("_name_or_path", "") or d.name).name, float(cfg.get("layer_norm_eps", 1e-5)), d)
    if cfg.get("num_hidden_layers") != arch.num_layers or cfg.get("hidden_size") != arch.embed_dim:
        raise CheckpointError(f"{d}: config.json says {cfg.get('num_hidden_layers')} layers x "
                              f"{cfg.get('hidden_size')} dims, the weights hold {arch.num_layers} x {arch.embed_dim}")
    shared = state.pop("rotary.inv_freq", None)
    if shared is not None:
        for i in range(arch.num_layers):
            state.setdefault(f"layers.{i}.self_attn.rot_emb.inv_freq", shared)
    if len(files) == 1:
        digest = digests[files[0].name]
    else:  # sharded: one digest over the shards' digests, each recorded in files
        digest = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(digests.items())).encode()).hexdigest()
    return ESM2Checkpoint(arch, state, files[0] if len(files) == 1 else d, "huggingface", digest, digests)


def load_checkpoint(model: str | Path, cache_dir: str | Path | None = None, *, download: bool = False) -> ESM2Checkpoint:
    """Resolve ``model`` (name or path) and load its weights (see the module docstring)."""
    path = resolve_checkpoint(model, cache_dir, download=download)
    if path.is_dir():
        if not (path / "config.json").is_file():
            pts = sorted(path.glob("*.pt"))
            raise CheckpointError(f"model={str(model)!r} is a directory without config.json; expected a Hugging Face "
                                  "ESM-2 directory (config.json + model.safetensors) or a fair-esm .pt file"
                                  + (f" (found {', '.join(p.name for p in pts[:3])}: pass one of them)" if pts else ""))
        ckpt = load_huggingface(path)
    else:
        ckpt = load_fair_esm(path)
    if str(model) in ESM2_ARCHS or str(model).startswith("facebook/"):
        want = architecture(str(model))
        got = ckpt.arch
        if (got.num_layers, got.embed_dim, got.attention_heads) != (want.num_layers, want.embed_dim,
                                                                     want.attention_heads):
            raise CheckpointError(f"{path} was found for model={want.name} but holds {got.num_layers} layers x "
                                  f"{got.embed_dim} dims x {got.attention_heads} heads; {want.name} has "
                                  f"{want.num_layers} x {want.embed_dim} x {want.attention_heads}")
    log.info("loaded %s (%s, %d layers x %d) from %s, sha256 %s", ckpt.arch.name, ckpt.source,
             ckpt.arch.num_layers, ckpt.arch.embed_dim, ckpt.path, ckpt.sha256[:12])
    return ckpt


def save_fair_esm(model, path: str | Path) -> Path:
    """A fair-esm ``ESM2`` module saved in the hub checkpoint layout that ``load_fair_esm``
    (and fair-esm's ``load_model_and_alphabet_core``) read: ``{"model": {"encoder.sentence_encoder.<param>":
    ..., "encoder.lm_head.<param>": ...}, "cfg": {"model": Namespace(...)}, "args": None}``."""
    import torch

    state = {}
    for k, v in model.state_dict().items():
        if k.startswith("contact_head."):
            continue  # hub files keep the contact regression in a separate -contact-regression.pt
        prefix = "encoder." if k.startswith("lm_head.") else "encoder.sentence_encoder."
        state[prefix + k] = v.clone()
    cfg = argparse.Namespace(encoder_layers=model.num_layers, encoder_embed_dim=model.embed_dim,
                             encoder_attention_heads=model.attention_heads, token_dropout=model.token_dropout)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": state, "cfg": {"model": cfg}, "args": None}, path)
    return path


def random_esm2(name: str, path: str | Path, seed: int = 0) -> Path:
    """An untrained ESM-2 of the published architecture ``name`` (fair-esm's own
    initialization, seeded) saved at ``path``: the control that shows what pretraining adds
    (``biogen evaluate dti``'s ``esm2_random`` representation)."""
    import esm
    import torch

    arch = architecture(name)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = esm.model.esm2.ESM2(num_layers=arch.num_layers, embed_dim=arch.embed_dim,
                                    attention_heads=arch.attention_heads, alphabet="ESM-1b",
                                    token_dropout=arch.token_dropout)
    return save_fair_esm(model.eval(), path)
