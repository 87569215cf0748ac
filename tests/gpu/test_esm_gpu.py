"""ESM-2 on a CUDA GPU: FlashAttention varlen backend, bf16 vs fp32 parity, fp32 vs fair-esm,
and recovery from a real out-of-memory (memory capped with set_per_process_memory_fraction)."""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import esm_fixtures as fx  # noqa: E402
from biogen.protein.embed import Embedder, EmbedSpec  # noqa: E402

pytestmark = pytest.mark.gpu




@pytest.fixture(scope="module")
def real35m(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("t12"), "esm2_t12_35M_UR50D", 12, 480, 20, seed=3, formats=("fair-esm",))


def cosines(a, b):
    return np.array([float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)) for x, y in zip(a, b)])


def test_bf16_matches_fp32_per_sequence(cuda, real35m):
    seqs = fx.random_sequences([1, 30, 345, 1022, 64, 700, 2000, 128], seed=1)
    spec = dict(layers=(6, -1), pooling="both", long_policy="chunk", per_residue=True)
    bf = Embedder(real35m.pt_path, EmbedSpec(**spec), device="cuda")
    fp = Embedder(real35m.pt_path, EmbedSpec(**spec, dtype="float32"), device="cuda")
    assert bf.info["dtype"] == "bfloat16" and bf.info["attention"] == "varlen"
    assert fp.info["attention"] == "segments"  # flash varlen has no fp32 kernel (logged)
    a, b = bf.embed(seqs), fp.embed(seqs)
    for la in (6, 12):
        for kind in ("mean", "bos"):
            c = cosines([x["pooled"][la][kind] for x in a], [y["pooled"][la][kind] for y in b])
            assert c.min() >= 0.999, (la, kind, c)
        res = cosines([x["residues"][la].ravel() for x in a], [y["residues"][la].ravel() for y in b])
        assert res.min() >= 0.999, res


def test_fp32_on_gpu_matches_fair_esm(cuda, real35m):
    torch.backends.cuda.matmul.allow_tf32 = False
    seqs = fx.random_sequences([50, 400, 7, 1022], seed=2)
    ref = fx.fair_esm_representations(real35m.model, seqs, [12])
    out = Embedder(real35m.pt_path, EmbedSpec(dtype="float32", per_residue=True), device="cuda").embed(seqs)
    for o, r, s in zip(out, ref, seqs):
        assert np.abs(o["residues"][12] - r[12][1:len(s) + 1]).max() <= 1e-4
        assert np.abs(o["pooled"][12] - r[12][1:len(s) + 1].mean(0)).max() <= 1e-4


def test_real_oom_halves_the_budget(cuda, real35m, caplog):
    seqs = fx.random_sequences([1000] * 600, seed=3)  # 601,200 tokens
    emb = Embedder(real35m.pt_path, EmbedSpec(token_budget=1 << 20), device="cuda")
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    total = torch.cuda.get_device_properties(0).total_memory
    # a 601k-token batch needs > 601k x 1920 x 2 bytes (fc1 output, bf16) = 2.3 GB at once; allow ~1.5 GB beyond
    # the weights so that it fails and the halved budgets fit
    torch.cuda.set_per_process_memory_fraction(min(1.0, (base + 1.5 * 2**30) / total))
    try:
        with caplog.at_level(logging.WARNING):
            out = emb.embed(seqs)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert "out of memory" in caplog.text and emb.token_budget < (1 << 20)
    assert len(out) == 600 and all(np.isfinite(o["pooled"][12]).all() for o in out)
    ref = Embedder(real35m.pt_path, EmbedSpec(), device="cuda").embed(seqs[:4])
    assert cosines([o["pooled"][12] for o in out[:4]], [r["pooled"][12] for r in ref]).min() >= 0.999
