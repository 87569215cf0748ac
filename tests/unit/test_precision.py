"""biogen.precision: dtype=auto on the CPU chosen by measurement (timing monkeypatched: the
choice, its cache, its log, the parity fallback), and the CPU worker threads helper."""

import logging
import math
import sys
import types

import numpy as np
import pytest
import torch

import esm_fixtures as fx
from biogen import precision
from biogen.errors import ConfigError
from biogen.protein.embed import Embedder, EmbedSpec

BOTH = frozenset({"avx512_bf16", "avx512_vnni"})


@pytest.fixture(autouse=True)
def fresh_choice(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("BIOGEN_DTYPE_CACHE", raising=False)
    precision._choose.cache_clear()
    yield
    precision._choose.cache_clear()


def fake_timing(monkeypatch, gflops: dict[str, float], flags=BOTH) -> list:
    calls = []

    def timed(dtypes, shape, threads):
        calls.extend((d, shape, threads) for d in dtypes)
        return {d: gflops[d] for d in dtypes}

    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset(flags))
    monkeypatch.setattr(precision, "linear_gflops", timed)
    monkeypatch.setattr(precision, "SMALL_LINEAR", 0)  # the tiny test models' layers are timed too
    return calls


@pytest.mark.parametrize("gflops, chosen", [({"bfloat16": 350.0, "int8": 450.0}, "int8"),
                                            ({"bfloat16": 2600.0, "int8": 1130.0}, "bfloat16"),
                                            ({"bfloat16": 400.0, "int8": 410.0}, "bfloat16")])  # tie: bf16
def test_auto_picks_the_measured_faster_candidate(monkeypatch, caplog, gflops, chosen):
    calls = fake_timing(monkeypatch, gflops)
    with caplog.at_level(logging.INFO):
        c = precision.choose_cpu_dtype(640, 2560, threads=2)
    other = "int8" if chosen == "bfloat16" else "bfloat16"
    assert c.dtype == chosen and c.order == (chosen, other, "float32")
    assert {d for d, _, _ in calls} == {"bfloat16", "int8"} and all(t == 2 for _, _, t in calls)
    m, k, n = calls[0][1]
    assert (k, n) == (640, 2560) and 64 <= m <= 1024 and m % 64 == 0
    assert c.record()["gflops"] == gflops and c.record()["threads"] == 2 and c.source == "measured"
    assert f"dtype=auto chose {chosen}" in caplog.text
    assert f"bfloat16 {gflops['bfloat16']:.0f} GFLOP/s" in caplog.text and f"int8 {gflops['int8']:.0f}" in caplog.text


@pytest.mark.parametrize("flags, order", [({"avx512_vnni"}, ("int8", "float32")),
                                          ({"amx_bf16"}, ("bfloat16", "float32")),
                                          (set(), ("float32",))])
def test_the_instruction_flags_filter_the_candidates(monkeypatch, caplog, flags, order):
    calls = fake_timing(monkeypatch, {"bfloat16": 1.0, "int8": 1.0}, flags)
    with caplog.at_level(logging.INFO):
        c = precision.choose_cpu_dtype(320, 1280, threads=1)
    assert c.order == order and c.dtype == order[0]
    assert [d for d, _, _ in calls] == list(order[:-1])  # only the candidates are timed
    if not flags:
        assert "neither bf16 nor int8" in c.reason and "dtype=auto on the CPU: float32" in caplog.text


def test_the_choice_is_cached_per_shape_and_threads(monkeypatch):
    calls = fake_timing(monkeypatch, {"bfloat16": 300.0, "int8": 500.0})
    a = precision.choose_cpu_dtype(480, 1920, threads=2)
    assert precision.choose_cpu_dtype(480, 1920, threads=2) is a and len(calls) == 2  # no second timing
    precision.choose_cpu_dtype(480, 1920, threads=1)
    precision.choose_cpu_dtype(640, 2560, threads=2)
    assert len(calls) == 6
    monkeypatch.setattr(precision, "cpu_model", lambda: "another CPU")  # the CPU model is in the key
    precision.choose_cpu_dtype(480, 1920, threads=2)
    assert len(calls) == 8


def test_the_measurement_is_shared_through_the_cache_file(monkeypatch, caplog):
    """Another process (here: a cleared in-process cache) reads the numbers instead of timing."""
    calls = fake_timing(monkeypatch, {"bfloat16": 300.0, "int8": 500.0})
    first = precision.choose_cpu_dtype(480, 1920, threads=1)
    assert first.source == "measured" and precision.dtype_cache_file().exists()
    precision._choose.cache_clear()
    with caplog.at_level(logging.INFO):
        again = precision.choose_cpu_dtype(480, 1920, threads=1)
    assert len(calls) == 2 and again.dtype == "int8" and again.gflops == first.gflops
    assert again.source == str(precision.dtype_cache_file()) and "measured earlier" in caplog.text
    precision.dtype_cache_file().write_text("not json")  # a damaged file is measured over
    precision._choose.cache_clear()
    assert precision.choose_cpu_dtype(480, 1920, threads=1).source == "measured" and len(calls) == 4


def test_an_unusable_cache_directory_still_measures(monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # a file where the directory should be
    calls = fake_timing(monkeypatch, {"bfloat16": 300.0, "int8": 500.0})
    assert precision.choose_cpu_dtype(480, 1920, threads=1).dtype == "int8" and len(calls) == 2


def test_linear_gflops_runs_every_dtype_and_restores_threads():
    before = torch.get_num_threads()
    g = precision.linear_gflops(("float32", "bfloat16", "int8"), (64, 32, 96), threads=1)
    assert set(g) == {"float32", "bfloat16", "int8"} and all(math.isfinite(v) and v > 0 for v in g.values())
    assert torch.get_num_threads() == before


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return fx.build(tmp_path_factory.mktemp("tiny"), "esm2_tiny", 2, 32, 4, seed=1, formats=("fair-esm",))


def failing_parity(monkeypatch, failing: set[str]):
    real = precision.check_parity

    def gate(reduced, reference, what, dtype, min_cosine=precision.MIN_COSINE):
        return real(reduced, reference, what, dtype, 1.0000001 if dtype in failing else min_cosine)

    monkeypatch.setattr(precision, "check_parity", gate)


@pytest.mark.parametrize("failing, expected", [(set(), "int8"), ({"int8"}, "bfloat16"),
                                               ({"int8", "bfloat16"}, "float32")])
def test_auto_falls_back_when_the_choice_fails_parity(tiny, monkeypatch, caplog, failing, expected):
    fake_timing(monkeypatch, {"bfloat16": 300.0, "int8": 500.0})
    failing_parity(monkeypatch, failing)
    with caplog.at_level(logging.INFO):
        emb = Embedder(tiny.pt_path, EmbedSpec(dtype="auto"))
    assert emb.precision == emb.info["dtype"] == expected
    assert emb.info["dtype_auto"]["chosen"] == "int8" and emb.info["dtype_auto"]["gflops"]["int8"] == 500.0
    tried = ["int8", "bfloat16"][:len(failing)]
    assert [f["dtype"] for f in emb.info["parity_failed"] or []] == tried
    for d in tried:
        assert f"dtype=auto: {d} failed the parity gate" in caplog.text
    if expected == "float32":
        assert emb.info["parity_vs_float32"] is None
    else:
        assert emb.info["parity_vs_float32"]["min_cosine"] >= 0.999
    out = emb.embed(fx.random_sequences([5, 30], seed=3))
    assert all(np.isfinite(o["pooled"][2]).all() for o in out)


def test_an_explicit_dtype_is_refused_not_replaced(tiny, monkeypatch):
    failing_parity(monkeypatch, {"int8"})
    with pytest.raises(ConfigError, match=r"dtype=int8 differs from float32 .* min cosine 0\.9\d+"):
        Embedder(tiny.pt_path, EmbedSpec(dtype="int8"))


def test_int8_on_a_gpu_is_refused_with_the_fix():
    from biogen.protein.embed import plan_precision

    with pytest.raises(ConfigError, match="dtype=int8 is a CPU path.*refused on cuda.*device=cpu for int8"):
        plan_precision("int8", torch.device("cuda"))


def test_int8_without_the_instructions_or_the_kernels(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_instructions", lambda: frozenset())
    with caplog.at_level(logging.WARNING):
        precision.check_cpu_dtype("int8")
    assert "without int8 dot products" in caplog.text and "use dtype=auto or float32" in caplog.text
    monkeypatch.setattr(precision, "quantized_engines", lambda: {"qnnpack"})
    with pytest.raises(ConfigError, match="no x86 quantized kernels .* use dtype=float32"):
        precision.check_cpu_dtype("int8")


# ----------------------------------------------------------------------------- worker threads

def fake_ray(monkeypatch, cpus: float | None, actor: bool = True):
    ctx = types.SimpleNamespace(get_actor_id=lambda: "a1" if actor else None,
                                get_assigned_resources=lambda: {} if cpus is None else {"CPU": cpus})
    monkeypatch.setitem(sys.modules, "ray", types.SimpleNamespace(is_initialized=lambda: True,
                                                                  get_runtime_context=lambda: ctx))


def test_worker_threads_outside_ray_keep_the_default_or_the_request(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(precision.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert precision.worker_threads() is None
    assert precision.worker_threads(2) == 2
    assert precision.worker_threads(16) == 4  # never more than the cores here


@pytest.mark.parametrize("cpus, requested, expected", [(1.0, None, 1), (2.0, None, 2), (8.0, None, 4),
                                                       (2.0, 1, 1), (1.0, 3, 1), (0.5, None, 1)])
def test_worker_threads_in_a_ray_actor_follow_its_assigned_cpus(monkeypatch, cpus, requested, expected):
    fake_ray(monkeypatch, cpus)
    monkeypatch.setattr(precision.os, "sched_getaffinity", lambda pid: set(range(4)))
    assert precision.worker_threads(requested) == expected


def test_worker_threads_in_a_process_pool_worker_follow_omp_num_threads(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setattr(precision.multiprocessing, "parent_process", lambda: object())  # a spawned child
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert precision.worker_threads() == 1
    monkeypatch.setattr(precision.multiprocessing, "parent_process", lambda: None)  # the main process: default
    assert precision.worker_threads() is None


def test_worker_threads_in_the_ray_driver_is_not_an_actor(monkeypatch):
    fake_ray(monkeypatch, 2.0, actor=False)
    assert precision.worker_threads() is None


def test_set_worker_threads_sets_torch_and_logs(monkeypatch, caplog):
    fake_ray(monkeypatch, 1.0)
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO):
            assert precision.set_worker_threads(what="embed worker") == 1
        assert torch.get_num_threads() == 1
        assert "embed worker: 1 torch thread(s) (the CPUs Ray assigned" in caplog.text
    finally:
        torch.set_num_threads(before)
