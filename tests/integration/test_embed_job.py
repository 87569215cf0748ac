"""biogen embed end to end with a randomly initialized ESM-2 of the real architecture:
FASTA rejects, dedupe, store layout, equality with the model's own embeddings, Ray actors,
resume after a kill, embed-search, CLI."""

import json
import signal
import time

import numpy as np
import pytest

from biogen.protein.embed import EmbedSpec, Embedder
from biogen.protein.job import embed_proteins
from biogen.protein.search import cosine_topk, search_store
from biogen.protein.store import EmbeddingStore
from esm_fixtures import build, random_sequences
from tests_support import run_biogen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build(tmp_path_factory.mktemp("esm"), "tiny", 2, 32, 4, formats=("fair-esm",))


@pytest.fixture(scope="module")
def fasta(tmp_path_factory):
    seqs = random_sequences([30, 120, 45, 200, 77, 60, 15, 90], seed=3)
    body = "".join(f">p{i} protein {i}\n{s.lower() if i == 2 else s}\n" for i, s in enumerate(seqs))
    body += f">dup_of_p1\n{seqs[1]}\n>bad\nMKT1X\n>empty\n\n"
    path = tmp_path_factory.mktemp("fa") / "proteins.fasta"
    path.write_text(body)
    return path, seqs


def test_embed_store_matches_the_model_and_maps_every_id(tiny, fasta, tmp_path, inline_rt):
    path, seqs = fasta
    rep = embed_proteins(str(path), tmp_path / "store", model=str(tiny.pt_path), shard_size=3, runtime=inline_rt)
    assert (rep.sequences, rep.ids, rep.records, rep.rejected, rep.shards) == (8, 9, 11, 2, 3)
    store = EmbeddingStore.open(tmp_path / "store")
    m = store.manifest
    assert m["model"]["sha256"] and m["model"]["source_format"] and m["spec"]["pooling"] == "mean"
    assert m["n_sequences"] == 8 and m["rejected_by_reason"] == {"invalid_residue": 1, "empty_sequence": 1}
    assert (tmp_path / "store" / "rejects.csv").read_text().count("\n") == 3
    vec = store.vectors()
    assert vec.shape == (8, 32) and vec.dtype == np.float32
    by_id = store.by_id()
    assert by_id["p1"] == by_id["dup_of_p1"] and len(by_id) == 9
    direct = Embedder(str(tiny.pt_path), EmbedSpec()).embed([seqs[i] for i in range(8)])
    for i in range(8):
        layer = next(iter(direct[i]["pooled"]))
        assert np.allclose(vec[by_id[f"p{i}"]], direct[i]["pooled"][layer], atol=1e-6)
    with pytest.raises(Exception, match="already holds an embedding store"):
        embed_proteins(str(path), tmp_path / "store", model=str(tiny.pt_path), runtime=inline_rt)


def test_per_residue_and_both_poolings(tiny, fasta, tmp_path, inline_rt):
    path, seqs = fasta
    spec = EmbedSpec(pooling="both", per_residue=True, layers=(1, -1))
    embed_proteins(str(path), tmp_path / "s", model=str(tiny.pt_path), spec=spec, shard_size=4, runtime=inline_rt)
    store = EmbeddingStore.open(tmp_path / "s")
    assert sorted(store.vector_names) == ["bos_L1", "bos_L2", "mean_L1", "mean_L2"]
    row = store.by_id()["p3"]
    shard, local = store.shards[row // 4], row % 4
    res = shard.residues(2, local)
    assert res.shape == (200, 32)
    assert np.allclose(res.mean(0), store.vectors("mean_L2")[row], atol=1e-5)


@pytest.mark.ray
def test_ray_actors_give_the_same_store(tiny, fasta, tmp_path, inline_rt, ray_rt):
    """What biogen promises (README, "Runtime"): across runtimes the vectors agree to float
    rounding (the worker processes run torch on other thread counts, so reductions differ in
    order and the bytes may too); within one runtime a store is byte-for-byte reproducible."""
    path, _ = fasta
    embed_proteins(str(path), tmp_path / "a", model=str(tiny.pt_path), shard_size=2, runtime=inline_rt)
    embed_proteins(str(path), tmp_path / "b", model=str(tiny.pt_path), shard_size=2, runtime=ray_rt)
    a, b = EmbeddingStore.open(tmp_path / "a"), EmbeddingStore.open(tmp_path / "b")
    assert a.keys == b.keys and np.allclose(a.vectors(), b.vectors(), rtol=1e-5, atol=1e-6)
    embed_proteins(str(path), tmp_path / "c", model=str(tiny.pt_path), shard_size=2, runtime=ray_rt)
    c = EmbeddingStore.open(tmp_path / "c")
    assert [s["sha256"] for s in c.manifest["shards"]] == [s["sha256"] for s in b.manifest["shards"]]


def test_a_redone_shard_is_byte_identical(tiny, fasta, tmp_path, inline_rt):
    """A job stopped before its last shards and run again (the same command, the same runtime)
    gives the bytes an uninterrupted run gives."""
    from biogen.runtime import ledger as ledger_mod

    path, _ = fasta
    embed_proteins(str(path), tmp_path / "full", model=str(tiny.pt_path), shard_size=2, runtime=inline_rt)
    original = ledger_mod.Ledger.record
    calls = {"n": 0}

    def record_then_stop(self, *args, **kwargs):  # the process "dies" after its 2nd shard is recorded
        original(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    ledger_mod.Ledger.record = record_then_stop
    try:
        with pytest.raises(KeyboardInterrupt):
            embed_proteins(str(path), tmp_path / "cut", model=str(tiny.pt_path), shard_size=2, runtime=inline_rt)
    finally:
        ledger_mod.Ledger.record = original
    assert (tmp_path / "cut" / "_work").exists()
    embed_proteins(str(path), tmp_path / "cut", model=str(tiny.pt_path), shard_size=2, runtime=inline_rt)
    full, cut = EmbeddingStore.open(tmp_path / "full"), EmbeddingStore.open(tmp_path / "cut")
    assert cut.manifest["run"]["resumed_shards"] == 2
    assert [s["sha256"] for s in cut.manifest["shards"]] == [s["sha256"] for s in full.manifest["shards"]]


def test_embed_search_cosine_topk(tiny, fasta, tmp_path, inline_rt):
    path, seqs = fasta
    embed_proteins(str(path), tmp_path / "store", model=str(tiny.pt_path), runtime=inline_rt)
    q = tmp_path / "q.fasta"
    q.write_text(f">q3\n{seqs[3]}\n>q5\n{seqs[5]}\n")
    table = search_store(str(tmp_path / "store"), str(q), k=3)
    rows = table.to_pylist()
    assert [r["hit_id"] for r in rows if r["rank"] == 1] == ["p3", "p5"]  # each query finds itself first
    assert all(abs(r["score"] - 1.0) < 1e-5 for r in rows if r["rank"] == 1)
    # brute-force oracle over blocks smaller than the store
    store = EmbeddingStore.open(tmp_path / "store")
    v = store.vectors()
    s, i = cosine_topk(v[:2], v, k=5, block_rows=3)
    n = v / np.linalg.norm(v, axis=1, keepdims=True)
    ref = n[:2] @ n.T
    assert np.array_equal(i, np.argsort(-ref, axis=1, kind="stable")[:, :5])
    assert np.allclose(s, np.sort(ref, axis=1)[:, ::-1][:, :5], atol=1e-6)


def _biogen(args, cwd):
    return run_biogen(*args, cwd=cwd, wait=False)


@pytest.mark.slow
def test_cli_embed_kill_and_resume_then_search(tmp_path):
    # the real esm2_t6_8M architecture (random weights): slow enough to be killed mid-job
    model = build(tmp_path, "esm2_t6_8M_UR50D", 6, 320, 20, formats=("fair-esm",))
    n = 80
    seqs = random_sequences([int(x) for x in np.random.default_rng(1).integers(100, 400, size=n)], seed=9)
    fa = tmp_path / "many.fasta"
    fa.write_text("".join(f">s{i}\n{s}\n" for i, s in enumerate(seqs)))
    args = ["embed", f"input={fa}", f"output={tmp_path / 'store'}", f"model={model.pt_path}", "shard_size=4",
            "runtime=inline", "token_budget=2048",
            "dtype=float32"]  # the same vectors on any CPU (auto may take int8 or bf16)
    p = _biogen(args, tmp_path)
    ledger = tmp_path / "store" / "_work" / "ledger.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and (
            not ledger.exists() or ledger.read_text().count('"outputs"') < 3):
        time.sleep(0.02)
    assert p.poll() is None, "the job ended before it could be killed: " + p.stderr.read()[-2000:]
    p.send_signal(signal.SIGKILL)
    p.wait()
    done = ledger.read_text().count('"outputs"')  # shard entries (events aside)
    assert 3 <= done < n // 4, done
    p = _biogen(args, tmp_path)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert f"({done} done before)" in out
    store = EmbeddingStore.open(tmp_path / "store")
    assert len(store) == n and len(set(store.keys)) == n
    ref = Embedder(str(model.pt_path), EmbedSpec(dtype="float32")).embed(seqs[:5])
    layer = next(iter(ref[0]["pooled"]))
    assert np.allclose(store.vectors()[:5], np.stack([r["pooled"][layer] for r in ref]), atol=1e-5)
    q = tmp_path / "q.fa"
    q.write_text(f">q\n{seqs[7]}\n")
    s = _biogen(["embed-search", f"store={tmp_path / 'store'}", f"query={q}", "k=2"], tmp_path)
    out, err = s.communicate(timeout=300)
    assert s.returncode == 0, err[-2000:]
    lines = out.strip().splitlines()
    assert lines[0].split("\t")[:3] == ["query_id", "rank", "hit_id"] and lines[1].split("\t")[2] == "s7"
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert manifest["n_sequences"] == n and not (tmp_path / "store" / "_work").exists()
    assert manifest["run"]["driver_sessions"] == 2 and manifest["run"]["resumed_shards"] == done
    st = run_biogen("status", str(tmp_path / "store"), cwd=tmp_path, timeout=60)
    assert st.returncode == 0 and "embed at" in st.stdout and f"{n} sequences" in st.stdout


def test_bad_model_files_are_clear_errors(fasta, tmp_path, inline_rt, monkeypatch):
    from biogen.protein.models import CheckpointError

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no cached weights, whatever this machine has
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    path, _ = fasta
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 100)
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        embed_proteins(str(path), tmp_path / "s1", model=str(junk), runtime=inline_rt)
    with pytest.raises(CheckpointError, match="esm2_t6_8M_UR50D"):
        embed_proteins(str(path), tmp_path / "s2", model="esm2_t6_8M_UR50D", cache_dir=str(tmp_path / "empty"),
                       runtime=inline_rt)
