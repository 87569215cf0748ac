"""ESM-2 embedding: our packed forward vs fair-esm's ESM2 forward (the oracle) on the same
random weights, both checkpoint formats, chunking, OOM halving, loaders and their errors."""

import argparse
import hashlib
import logging
import pickle

import numpy as np
import pytest
import torch

import esm_fixtures as fx
from biogen.errors import ConfigError
from biogen.protein.batching import OutOfMemoryAtMinimum, run_with_oom_halving, token_budget_batches
from biogen.protein.embed import Embedder, EmbedSpec, stitch_bounds, windows
from biogen.protein.esm import GROUP_WASTE, FastESM2, PackedBatch, attention_groups
from biogen.protein.models import CheckpointError, load_checkpoint, resolve_checkpoint
from biogen.protein.tokenizer import MASK, encode_packed

TOL = 1e-4
MIXED = [1, 5, 40, 17, 230, 3, 97, 512]
try:  # Hugging Face format fixtures need transformers (EsmForMaskedLM.save_pretrained)
    import transformers  # noqa: F401
    FORMATS = ("fair-esm", "hf")
except ImportError:
    FORMATS = ("fair-esm",)


def need_hf(model):
    if model.hf_dir is None:
        pytest.skip("transformers is not installed (pip install transformers): no Hugging Face fixture")
    return model.hf_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("tiny"), "esm2_tiny", 2, 32, 4, seed=1, formats=FORMATS)


@pytest.fixture(scope="module")
def real8m(tmp_path_factory):
    """esm2_t6_8M_UR50D's architecture (6 x 320, 20 heads) with random weights."""
    return fx.build(tmp_path_factory.mktemp("t6"), "esm2_t6_8M_UR50D", 6, 320, 20, seed=2, formats=FORMATS)


@pytest.fixture(autouse=True)
def dtype_cache(tmp_path, monkeypatch):
    """dtype=auto's measurements go to a file of the test, not ~/.cache/biogen."""
    monkeypatch.setenv("BIOGEN_DTYPE_CACHE", str(tmp_path / "cpu_dtype.json"))


@pytest.fixture
def no_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return tmp_path


def max_diff(out, ref, seqs, layers, pooling="both"):
    d = 0.0
    for o, r, s in zip(out, ref, seqs):
        for la in layers:
            res = r[la][1:len(s) + 1]
            d = max(d, np.abs(o["residues"][la] - res).max())
            pooled = o["pooled"][la]
            if pooling == "both":
                d = max(d, np.abs(pooled["mean"] - res.mean(0)).max(), np.abs(pooled["bos"] - r[la][0]).max())
            elif pooling == "mean":
                d = max(d, np.abs(pooled - res.mean(0)).max())
    return d


# ----------------------------------------------------------------------------- parity

@pytest.mark.parametrize("fmt", ["fair-esm", "hf"])
def test_parity_tiny_mixed_lengths_all_layers(tiny, fmt):
    seqs = fx.random_sequences(MIXED, seed=3)
    ref = fx.fair_esm_representations(tiny.model, seqs, [0, 1, 2])
    emb = Embedder(tiny.pt_path if fmt == "fair-esm" else need_hf(tiny),
                   EmbedSpec(layers=(0, 1, -1), pooling="both", per_residue=True, dtype="float32"))
    out = emb.embed(seqs)
    assert emb.layers == (0, 1, 2)
    assert max_diff(out, ref, seqs, (0, 1, 2)) <= TOL
    assert [o["length"] for o in out] == MIXED and not any(o["truncated"] for o in out)
    assert all(o["chunks"] == 1 for o in out)
    assert all(v["mean"].dtype == np.float32 and v["mean"].shape == (32,) for o in out for v in o["pooled"].values())


def test_parity_real_8m_architecture(real8m):
    seqs = fx.random_sequences([300, 12, 150, 700, 45, 1022], seed=4)
    ref = fx.fair_esm_representations(real8m.model, seqs, [3, 6])
    emb = Embedder(real8m.pt_path, EmbedSpec(layers=(3, -1), pooling="both", per_residue=True, token_budget=2048, dtype="float32"))
    out = emb.embed(seqs)
    d = max_diff(out, ref, seqs, (3, 6))
    assert d <= TOL, d
    assert emb.last_stats["batches"] > 1  # several packed batches, results back in input order
    assert emb.info["model"] == "esm2_t6_8M_UR50D" and emb.info["architecture"]["embed_dim"] == 320


def test_same_weights_both_formats_and_hf_anchor(real8m):
    need_hf(real8m)
    from transformers import EsmModel

    seqs = fx.random_sequences([50, 200, 9], seed=5)
    a = Embedder(real8m.pt_path, EmbedSpec(per_residue=True, dtype="float32")).embed(seqs)
    b = Embedder(real8m.hf_dir, EmbedSpec(per_residue=True, dtype="float32")).embed(seqs)
    hf = EsmModel.from_pretrained(real8m.hf_dir, add_pooling_layer=False, attn_implementation="sdpa").eval()
    from biogen.protein.tokenizer import encode_padded

    ids = torch.from_numpy(encode_padded(seqs))
    with torch.no_grad():
        last = hf(input_ids=ids, attention_mask=(ids != 1).long()).last_hidden_state.numpy()
    for x, y, s, h in zip(a, b, seqs, last):
        np.testing.assert_allclose(x["residues"][6], y["residues"][6], atol=1e-6)
        np.testing.assert_allclose(x["residues"][6], h[1:len(s) + 1], atol=TOL)


@pytest.mark.parametrize("attention", ["grouped", "segments"])
def test_cpu_attention_backends_match_fair_esm(tiny, attention):
    """Both CPU attention backends; equal lengths (a copy-free group), near-equal (a padded
    group) and far apart (groups of one)."""
    seqs = fx.random_sequences([64, 64, 64, 60, 58, 300, 7, 1, 130], seed=10)
    ref = fx.fair_esm_representations(tiny.model, seqs, [2])
    model = FastESM2.from_checkpoint(load_checkpoint(tiny.pt_path), attention=attention)
    p = encode_packed(seqs)
    batch = PackedBatch(p.tokens, p.cu_seqlens, torch.device("cpu"))
    if attention == "grouped":
        assert [g[2] for g in batch.groups] == [5, 1, 1, 1, 1]
        assert batch.groups[0][4] is not None  # 64 x 3 + 60 + 58 -> padded to 66 tokens with a mask
    out = model(batch, {2})[2].numpy()
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(out[p.cu_seqlens[i]:p.cu_seqlens[i + 1]], ref[i][2], atol=TOL)


def test_varlen_backend_on_the_cpu_through_its_reference(tiny, monkeypatch):
    """The ``varlen`` branch (rotary on the packed stream, int32 cu_seqlens, dense T x H x D
    rows) runs on the CPU with flash's varlen_attn replaced by its reference semantics, and
    matches fair-esm; the reference itself equals one SDPA call per sequence."""
    from biogen.protein import esm as esm_mod

    calls = []

    def reference(*args):
        calls.append(args[3].dtype)
        return esm_mod.varlen_attn_reference(*args)

    monkeypatch.setattr(esm_mod, "_varlen_attn", lambda: reference)
    seqs = fx.random_sequences([64, 1, 300, 7, 60, 130], seed=11)
    ref = fx.fair_esm_representations(tiny.model, seqs, [2])
    model = FastESM2.from_checkpoint(load_checkpoint(tiny.pt_path), attention="varlen")
    p = encode_packed(seqs)
    out = model(PackedBatch(p.tokens, p.cu_seqlens, torch.device("cpu")), {2})[2].numpy()
    assert calls and set(calls) == {torch.int32}  # one launch per layer, flash's offsets dtype
    for i, s in enumerate(seqs):
        np.testing.assert_allclose(out[p.cu_seqlens[i]:p.cu_seqlens[i + 1]], ref[i][2], atol=TOL)


@pytest.mark.parametrize("cap, dtype, attention", [((9, 0), torch.bfloat16, "varlen"),
                                                   ((8, 0), torch.bfloat16, "varlen"),
                                                   ((7, 5), torch.float16, "segments"),
                                                   ((7, 0), torch.float16, "segments")])
def test_gpu_dtype_and_attention_follow_the_architecture(monkeypatch, caplog, cap, dtype, attention):
    """dtype=auto: bf16 from compute capability 8.0 (native), fp16 before; FlashAttention varlen
    from 8.0, per-sequence SDPA before (logged)."""
    from biogen.protein import embed as embed_mod
    from biogen.protein import esm as esm_mod

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    monkeypatch.setattr(esm_mod, "_varlen_attn", lambda: esm_mod.varlen_attn_reference)
    with caplog.at_level(logging.INFO):
        got = embed_mod.resolve_dtype("auto", torch.device("cuda"))
        assert got == dtype and esm_mod.choose_attention(torch.device("cuda"), got) == attention
    assert f"compute capability {cap[0]}.{cap[1]}" in caplog.text
    assert embed_mod.resolve_dtype("float16", torch.device("cuda")) == torch.float16  # explicit wins


@pytest.mark.parametrize("flags, expected", [({"avx512_bf16", "avx512_vnni"}, "bfloat16"),
                                             ({"amx_bf16", "amx_int8"}, "bfloat16"),
                                             ({"avx512_vnni"}, "int8"), (set(), "float32")])
def test_cpu_dtype_auto_follows_the_instruction_set(monkeypatch, caplog, flags, expected):
    from biogen import precision
    from biogen.protein import embed as embed_mod

    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset(flags))
    with caplog.at_level(logging.INFO):
        assert embed_mod.resolve_precision("auto", torch.device("cpu")) == expected
    assert f"dtype=auto on the CPU: {expected}" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        embed_mod.resolve_precision("bfloat16", torch.device("cpu"))
    assert ("emulated and usually slower" in caplog.text) == (expected != "bfloat16")


def test_reduced_precision_on_the_cpu_passes_its_parity_gate(real8m):
    """bf16 and int8 (PyTorch's quantized linear kernels) next to fp32 on real proteins' lengths:
    the gate's record is in the store's info, and the vectors agree to cosine >= 0.999."""
    seqs = fx.random_sequences([30, 345, 120, 1022, 7], seed=12)
    ref = np.stack([o["pooled"][6] for o in Embedder(real8m.pt_path, EmbedSpec(dtype="float32")).embed(seqs)])
    for dtype in ("bfloat16", "int8"):
        emb = Embedder(real8m.pt_path, EmbedSpec(dtype=dtype))
        assert emb.info["dtype"] == dtype and emb.info["parity_vs_float32"]["min_cosine"] >= 0.999
        assert (emb.info["quantization"] is not None) == (dtype == "int8")
        got = np.stack([o["pooled"][6] for o in emb.embed(seqs)])
        cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
        assert cos.min() >= 0.999, (dtype, cos)
    assert Embedder(real8m.pt_path, EmbedSpec(dtype="float32")).info["parity_vs_float32"] is None


def test_int8_vectors_do_not_depend_on_the_batch(real8m):
    """int8 activations are quantized per token: a protein's vector is the same, bit for bit,
    embedded alone or packed with others (one scale per batch moved it by up to ~0.04)."""
    seqs = fx.random_sequences([30, 345, 120, 500, 7, 250], seed=12)
    emb = Embedder(real8m.pt_path, EmbedSpec(dtype="int8", token_budget=4096))
    together = [o["pooled"][6] for o in emb.embed(seqs)]
    for s, v in zip(seqs, together):
        assert np.array_equal(emb.embed([s])[0]["pooled"][6], v)


def test_the_parity_gate_refuses_a_model_that_fails_it(real8m, monkeypatch):
    from biogen import precision

    monkeypatch.setattr(precision, "MIN_COSINE", 1.0000001)  # no reduced run can reach it
    monkeypatch.setattr(precision.check_parity, "__defaults__", (1.0000001,))
    with pytest.raises(ConfigError, match=r"dtype=int8 differs from float32 on the calibration set: min cosine "
                                          r"0\.9\d+ per item \(needed >= 1\.0000001\); use dtype=float32"):
        Embedder(real8m.pt_path, EmbedSpec(dtype="int8"))
    with pytest.raises(ConfigError, match="embed.dtype=int8 is a CPU path"):
        from biogen.protein.embed import resolve_precision

        resolve_precision("int8", torch.device("cuda"))


def test_attention_groups_bound_padding():
    rng = np.random.default_rng(0)
    lens = np.sort(rng.integers(2, 1024, 300))[::-1]
    groups = attention_groups(lens)
    assert groups[0][0] == 0 and groups[-1][1] == len(lens)
    assert all(a[1] == b[0] for a, b in zip(groups, groups[1:]))
    for i, j in groups:
        g = lens[i:j]
        assert j - i == 1 or (j - i) * g.max() ** 2 <= GROUP_WASTE * (g.astype(float) ** 2).sum()
    assert len(groups) < len(lens) / 3  # sorted UniProt-like lengths do group


def test_lower_case_accepted(tiny):
    emb = Embedder(tiny.pt_path, EmbedSpec(dtype="float32"))
    up, low = emb.embed(["MKVLAAGIW"]), emb.embed(["mkvlaagiw"])
    np.testing.assert_array_equal(up[0]["pooled"][2], low[0]["pooled"][2])


def test_mask_tokens_token_dropout_parity(tiny):
    """The observed-mask-ratio rescaling (fair-esm's token dropout) on packed input."""
    seqs = fx.random_sequences([20, 33], seed=6)
    p = encode_packed(seqs)
    toks = p.tokens.copy()
    toks[[3, 7, 25, 30, 31]] = MASK
    import esm

    conv = esm.Alphabet.from_architecture("ESM-1b").get_batch_converter()
    _, _, padded = conv([("a", seqs[0]), ("b", seqs[1])])
    padded[0, [3, 7]] = MASK
    padded[1, [25 - 22, 30 - 22, 31 - 22]] = MASK
    with torch.no_grad():
        ref = tiny.model(padded, repr_layers=[2])["representations"][2]
    model = FastESM2.from_checkpoint(load_checkpoint(tiny.pt_path))
    ours = model(PackedBatch(toks, p.cu_seqlens, torch.device("cpu")), {2})[2]
    np.testing.assert_allclose(ours[:22].numpy(), ref[0, :22].numpy(), atol=TOL)
    np.testing.assert_allclose(ours[22:].numpy(), ref[1, :35].numpy(), atol=TOL)


# ----------------------------------------------------------------------------- long sequences

def test_windows_and_stitching():
    assert windows(1000, 1022, 256) == [(0, 1000)]
    w = windows(2500, 1022, 256)
    assert w[0] == (0, 1022) and w[-1] == (1478, 2500)
    assert all(b - a == 1022 for a, b in w) and all(w[k + 1][0] < w[k][1] - 255 for k in range(len(w) - 1))
    bounds = stitch_bounds(w)
    assert bounds[0][0] == 0 and bounds[-1][1] == 2500
    assert all(bounds[k][1] == bounds[k + 1][0] for k in range(len(bounds) - 1))
    assert all(a >= wa and b <= wb for (a, b), (wa, wb) in zip(bounds, w))


def test_chunk_parity_with_fair_esm_windows(tiny):
    seqs = fx.random_sequences([2500, 40, 1100], seed=7)
    emb = Embedder(tiny.pt_path, EmbedSpec(layers=(1, -1), pooling="both", per_residue=True, long_policy="chunk",
                                           chunk_overlap=256, dtype="float32"))
    out = emb.embed(seqs)
    assert [o["chunks"] for o in out] == [3, 1, 2] and not any(o["truncated"] for o in out)
    assert emb.info["long_policy"] == "chunk" and emb.info["chunk_overlap"] == 256
    for o, s in zip(out, seqs):
        wins = windows(len(s), 1022, 256)
        ref_w = fx.fair_esm_representations(tiny.model, [s[a:b] for a, b in wins], [1, 2])
        for la in (1, 2):
            stitched = np.concatenate([r[la][1 + a - w0:1 + b - w0] for r, (w0, _), (a, b)
                                       in zip(ref_w, wins, stitch_bounds(wins))])
            assert o["residues"][la].shape == (len(s), 32)
            assert np.abs(o["residues"][la] - stitched).max() <= TOL
            assert np.abs(o["pooled"][la]["mean"] - stitched.mean(0)).max() <= TOL
            assert np.abs(o["pooled"][la]["bos"] - ref_w[0][la][0]).max() <= TOL


def test_truncate_policy(tiny):
    s = fx.random_sequences([1500], seed=8)[0]
    out = Embedder(tiny.pt_path, EmbedSpec(per_residue=True, dtype="float32")).embed([s])[0]
    ref = fx.fair_esm_representations(tiny.model, [s[:1022]], [2])[0][2]
    assert out["truncated"] and out["length"] == 1500 and out["chunks"] == 1
    assert out["residues"][2].shape == (1022, 32)
    assert np.abs(out["pooled"][2] - ref[1:1023].mean(0)).max() <= TOL


# ----------------------------------------------------------------------------- batching / OOM

def test_token_budget_batches():
    tok = np.array([10, 300, 50, 1200, 7, 400, 400])
    batches = token_budget_batches(tok, 1000)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(tok)))
    assert all(tok[b].sum() <= 1000 or len(b) == 1 for b in batches)
    flat = tok[np.concatenate(batches)]
    assert list(flat) == sorted(flat, reverse=True)


def test_oom_halving_helper():
    seen = []

    def run(idx):
        if len(idx) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        seen.extend(idx.tolist())

    assert run_with_oom_halving(np.full(8, 100), 1000, run) == 250
    assert sorted(seen) == list(range(8))

    def always(idx):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(OutOfMemoryAtMinimum, match="one sequence does not fit"):
        run_with_oom_halving(np.full(4, 100), 1000, always)

    def other(idx):
        raise ValueError("not memory")

    with pytest.raises(ValueError):
        run_with_oom_halving(np.full(4, 100), 1000, other)


def test_embedder_recovers_from_oom(tiny, monkeypatch, caplog):
    seqs = fx.random_sequences([300, 200, 250, 90, 400, 310], seed=9)
    # float32: a re-planned batch must give the same vectors (to float32's rounding)
    emb = Embedder(tiny.pt_path, EmbedSpec(token_budget=4096, dtype="float32"))
    expected = emb.embed(seqs)
    forward = emb.model.forward

    def flaky(batch, layers):
        if batch.n_tokens > 1100:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return forward(batch, layers)

    monkeypatch.setattr(emb.model, "forward", flaky)
    with caplog.at_level(logging.WARNING):
        got = emb.embed(seqs)
    assert emb.token_budget == 1024 and "halved" in caplog.text
    for a, b in zip(expected, got):
        np.testing.assert_allclose(a["pooled"][2], b["pooled"][2], atol=1e-6)


# ----------------------------------------------------------------------------- loaders

def test_fixture_is_fair_esms_own_format(real8m):
    import esm

    data = torch.load(real8m.pt_path, weights_only=False)
    model, _ = esm.pretrained.load_model_and_alphabet_core("esm2_t6_8M_UR50D", data)
    for k, v in real8m.model.state_dict().items():
        if not k.startswith("contact_head"):
            assert torch.equal(model.state_dict()[k], v), k


def test_named_model_from_torch_hub_cache(real8m, no_caches):
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "esm2_t6_8M_UR50D.pt").write_bytes(real8m.pt_path.read_bytes())
    emb = Embedder("esm2_t6_8M_UR50D", EmbedSpec(dtype="float32"))
    assert emb.info["checkpoint"] == str(hub / "esm2_t6_8M_UR50D.pt")
    assert emb.info["sha256"] == hashlib.sha256(real8m.pt_path.read_bytes()).hexdigest()
    assert emb.info["source_format"] == "fair-esm" and emb.info["max_len"] == 1022
    assert emb.info["dtype"] == "float32" and emb.info["layers"] == [6]
    assert emb.info["token_budget"] == 4096 and emb.info["token_budget_requested"] == 16384  # CPU cap


def test_named_model_from_hf_cache_and_cache_dir_first(real8m, no_caches):
    import shutil

    need_hf(real8m)
    repo = no_caches / "hf" / "hub" / "models--facebook--esm2_t6_8M_UR50D"
    shutil.copytree(real8m.hf_dir, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    assert resolve_checkpoint("facebook/esm2_t6_8M_UR50D") == repo / "snapshots" / "abc123"
    ck = load_checkpoint("esm2_t6_8M_UR50D")
    assert ck.source == "huggingface"
    assert ck.sha256 == hashlib.sha256((real8m.hf_dir / "model.safetensors").read_bytes()).hexdigest()
    own = no_caches / "mine"
    own.mkdir()
    (own / "esm2_t6_8M_UR50D.pt").write_bytes(real8m.pt_path.read_bytes())
    assert resolve_checkpoint("esm2_t6_8M_UR50D", cache_dir=own) == own / "esm2_t6_8M_UR50D.pt"


def test_missing_checkpoint_says_where_and_how(no_caches):
    with pytest.raises(CheckpointError) as e:
        Embedder("esm2_t33_650M_UR50D", cache_dir=no_caches / "c")
    msg = str(e.value)
    assert str(no_caches / "torch" / "hub" / "checkpoints" / "esm2_t33_650M_UR50D.pt") in msg
    assert "models--facebook--esm2_t33_650M_UR50D" in msg and str(no_caches / "c") in msg
    assert "https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t33_650M_UR50D.pt" in msg
    assert "huggingface-cli download facebook/esm2_t33_650M_UR50D" in msg


def test_download_is_opt_in_and_uses_the_hub_cache(real8m, no_caches, monkeypatch):
    urls = []

    def fake_download(url, dst, progress=False):
        urls.append(url)
        open(dst, "wb").write(real8m.pt_path.read_bytes())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    with pytest.raises(CheckpointError):
        resolve_checkpoint("esm2_t6_8M_UR50D")
    assert not urls
    path = resolve_checkpoint("esm2_t6_8M_UR50D", download=True)
    assert urls == ["https://dl.fbaipublicfiles.com/fair-esm/models/esm2_t6_8M_UR50D.pt"]
    assert path == no_caches / "torch" / "hub" / "checkpoints" / "esm2_t6_8M_UR50D.pt"


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError, match="esm2_t6_8M_UR50D, esm2_t12_35M_UR50D.*esm2_t48_15B_UR50D"):
        Embedder("esm2_t99_1T")


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_wrong_checkpoint_formats(tmp_path, tiny):
    (tmp_path / "tensor.pt").parent.mkdir(exist_ok=True)
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="expected a fair-esm checkpoint"):
        load_checkpoint(tmp_path / "tensor.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    torch.save({"model": {}, "cfg": Evil()}, tmp_path / "evil.pt", pickle_module=pickle)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "evil.pt")
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(arch="roberta_large")}, tmp_path / "e1.pt")
    with pytest.raises(CheckpointError, match="ESM-1"):
        load_checkpoint(tmp_path / "e1.pt")
    with pytest.raises(CheckpointError, match="no such file"):
        load_checkpoint(tmp_path / "absent.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="without config.json"):
        load_checkpoint(tmp_path / "empty_dir")
    import json
    import shutil

    bert = tmp_path / "bert"
    shutil.copytree(need_hf(tiny), bert)
    cfg = json.loads((bert / "config.json").read_text())
    (bert / "config.json").write_text(json.dumps({**cfg, "model_type": "bert"}))
    with pytest.raises(CheckpointError, match="model_type='bert'"):
        load_checkpoint(bert)


def test_named_file_with_other_architecture_is_refused(tiny, no_caches):
    hub = no_caches / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "esm2_t6_8M_UR50D.pt").write_bytes(tiny.pt_path.read_bytes())
    with pytest.raises(CheckpointError, match="esm2_t6_8M_UR50D has 6 x 320 x 20"):
        load_checkpoint("esm2_t6_8M_UR50D")


def test_hf_pytorch_model_bin(tiny, tmp_path):
    import shutil

    src = need_hf(tiny)  # skips, with the reason, where transformers (and safetensors) are absent
    from safetensors.torch import load_file

    d = tmp_path / "bin"
    shutil.copytree(src, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    ck = load_checkpoint(d)
    assert ck.path.name == "pytorch_model.bin" and ck.arch.num_layers == 2


def test_spec_and_layer_validation(tiny):
    with pytest.raises(ConfigError, match="pooling"):
        EmbedSpec(pooling="max")
    with pytest.raises(ConfigError, match="long_policy"):
        EmbedSpec(long_policy="drop")
    with pytest.raises(ConfigError, match="token_budget"):
        EmbedSpec(token_budget=100)
    with pytest.raises(ConfigError, match="out of range.*0..2"):
        Embedder(tiny.pt_path, EmbedSpec(layers=(5,)))
    with pytest.raises(ConfigError, match="CUDA|cuda"):
        if torch.cuda.is_available():
            raise ConfigError("cuda present: nothing to check")
        Embedder(tiny.pt_path, device="cuda")
