"""Randomly initialized ESM-2 models of the real architecture, saved as fair-esm ``.pt``
files and Hugging Face directories (nothing is downloaded).

The fair-esm file has the layout of fair-esm's hub checkpoints:
``{"model": {"encoder.sentence_encoder.<param>": ..., "encoder.lm_head.<param>": ...},
"cfg": {"model": Namespace(encoder_layers, encoder_embed_dim, encoder_attention_heads,
token_dropout)}, "args": None}``, which ``esm.pretrained.load_model_and_alphabet_core``
reads. The Hugging Face directory is ``EsmForMaskedLM.save_pretrained`` of the same
weights (``config.json`` + ``model.safetensors``).

Used by tests (tiny models: 2 layers x 32 dims; the real ``esm2_t6_8M_UR50D`` shape) and
by ``benchmarks/embedding.py`` (the real 8M ... 650M shapes).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

AA = "LAGVSERTIDPKQNFYMHWC"


@dataclass
class RandomESM2:
    name: str
    model: object          # esm.model.esm2.ESM2, eval mode, fp32
    pt_path: Path | None
    hf_dir: Path | None


def random_fair_esm(num_layers: int, embed_dim: int, heads: int, seed: int = 0):
    """fair-esm's ``ESM2`` with random weights; LayerNorms and biases perturbed so that
    every parameter matters in a parity test."""
    import esm

    torch.manual_seed(seed)
    model = esm.model.esm2.ESM2(num_layers=num_layers, embed_dim=embed_dim, attention_heads=heads,
                                alphabet="ESM-1b", token_dropout=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def save_fair_esm(model, path: Path) -> Path:
    """The hub checkpoint layout (``biogen.protein.models.save_fair_esm``)."""
    from biogen.protein.models import save_fair_esm as save

    return save(model, path)


def fair_to_hf_state(model) -> dict:
    m = {"embed_tokens.weight": "esm.embeddings.word_embeddings.weight"}
    out = {}
    for k, v in model.state_dict().items():
        if k in m:
            out[m[k]] = v
        elif k.startswith("emb_layer_norm_after."):
            out["esm.encoder." + k] = v
        elif k.startswith("layers."):
            _, i, rest = k.split(".", 2)
            hf = {"self_attn.q_proj": "attention.self.query", "self_attn.k_proj": "attention.self.key",
                  "self_attn.v_proj": "attention.self.value", "self_attn.out_proj": "attention.output.dense",
                  "self_attn_layer_norm": "attention.LayerNorm", "fc1": "intermediate.dense", "fc2": "output.dense",
                  "final_layer_norm": "LayerNorm"}
            mod, param = rest.rsplit(".", 1)
            if mod == "self_attn.rot_emb":
                continue
            out[f"esm.encoder.layer.{i}.{hf[mod]}.{param}"] = v
        elif k.startswith("lm_head."):
            out[{"lm_head.weight": "lm_head.decoder.weight", "lm_head.bias": "lm_head.bias",
                 "lm_head.dense.weight": "lm_head.dense.weight", "lm_head.dense.bias": "lm_head.dense.bias",
                 "lm_head.layer_norm.weight": "lm_head.layer_norm.weight",
                 "lm_head.layer_norm.bias": "lm_head.layer_norm.bias"}[k]] = v
    return out


def hf_config(model):
    from transformers import EsmConfig

    from biogen.protein.tokenizer import TOKENS

    return EsmConfig(vocab_size=33, mask_token_id=32, pad_token_id=1, hidden_size=model.embed_dim,
                     num_hidden_layers=model.num_layers, num_attention_heads=model.attention_heads,
                     intermediate_size=4 * model.embed_dim, hidden_act="gelu", hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, max_position_embeddings=1026, layer_norm_eps=1e-5,
                     position_embedding_type="rotary", token_dropout=True, emb_layer_norm_before=False,
                     vocab_list=list(TOKENS), is_folding_model=False)


def save_hf(model, directory: Path) -> Path:
    """``EsmForMaskedLM.save_pretrained`` of the same weights (what facebook/esm2_* hold)."""
    from transformers import EsmForMaskedLM

    hf = EsmForMaskedLM(hf_config(model)).eval()
    missing, unexpected = hf.load_state_dict(fair_to_hf_state(model), strict=False)
    missing = [k for k in missing if "contact_head" not in k and "rotary" not in k and "position_ids" not in k]
    assert not missing and not unexpected, (missing, unexpected)
    hf.save_pretrained(directory)
    return directory


def build(tmp: Path, name: str, num_layers: int, embed_dim: int, heads: int, *, seed: int = 0,
          formats: tuple[str, ...] = ("fair-esm", "hf")) -> RandomESM2:
    model = random_fair_esm(num_layers, embed_dim, heads, seed)
    pt = save_fair_esm(model, tmp / f"{name}.pt") if "fair-esm" in formats else None
    hf = save_hf(model, tmp / f"{name}-hf") if "hf" in formats else None
    return RandomESM2(name, model, pt, hf)


def random_sequences(lengths, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list(AA), size=n)) for n in lengths]


@torch.no_grad()
def fair_esm_representations(model, seqs: list[str], layers: list[int]) -> list[dict[int, np.ndarray]]:
    """fair-esm's own forward on one padded batch (its BatchConverter): per sequence,
    {layer: (L + 2) x E} including BOS and EOS."""
    import esm

    conv = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, toks = conv([(str(i), s) for i, s in enumerate(seqs)])
    reps = model(toks, repr_layers=layers)["representations"]
    return [{la: reps[la][i, :len(s) + 2].float().numpy() for la in layers} for i, s in enumerate(seqs)]


def main(argv=None) -> int:
    """Write a randomly initialized ESM-2 of a real architecture as a fair-esm ``.pt`` file
    (used by benchmarks/gpu_suite.py to run ``biogen embed`` without downloading weights)."""
    from biogen.protein.models import ESM2_ARCHS

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("arch", choices=sorted(ESM2_ARCHS))
    ap.add_argument("out", type=Path, help="the .pt file to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    a = ESM2_ARCHS[args.arch]
    save_fair_esm(random_fair_esm(a.num_layers, a.embed_dim, a.attention_heads, args.seed), args.out)
    print(f"wrote {args.out} (random {a.name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
