"""The partitioned dedupe's building blocks: the key hash (a Numba kernel over Arrow buffers)
against a plain-Python oracle and pinned values, and the grouped split file (one file per
part, a partition's rows read back in input order)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from biogen.errors import LibraryError
from biogen.kernels.keyhash import reference_hash
from biogen.library.dedupe import (
    ROW_SCHEMA, SPLIT_SCHEMA, GroupedFile, decide_batches, decide_probed, key_hashes, key_partition, probe, write_grouped,
)

KEYS = ["BSYNRYMUTXBXSQ-UHFFFAOYSA-N", "", "a", "CC(=O)Oc1ccccc1C(=O)O", "é→ü", "N" * 300, None]


def test_hash_equals_the_python_reference_on_every_arrow_layout():
    want = np.array([reference_hash((k or "").encode()) for k in KEYS], dtype=np.uint64)
    arr = pa.array(KEYS, pa.string())
    layouts = {
        "list": KEYS,
        "array": arr,
        "large_string": arr.cast(pa.large_string()),
        "chunked": pa.chunked_array([arr.slice(0, 3), arr.slice(3)]),
        "sliced": pa.array(["x", "y", *KEYS]).slice(2),  # a non-zero array offset
    }
    for name, keys in layouts.items():
        assert key_hashes(keys).tolist() == want.tolist(), name
    assert key_hashes(pa.array([], pa.string())).shape == (0,)


def test_hash_values_are_pinned():
    """FNV-1a 64's published vectors under splitmix64's finalizer: a change of these values
    changes every partition (bump ``dedupe.SCHEME``, which names the work directory)."""
    m = (1 << 64) - 1

    def mix(h):
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & m
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & m
        return h ^ (h >> 31)

    assert reference_hash(b"") == mix(0xCBF29CE484222325)
    assert reference_hash(b"a") == mix(0xAF63DC4C8601EC8C)
    assert reference_hash(b"foobar") == mix(0x85944171F73967E8)
    assert key_hashes(["", "a", "foobar"]).tolist() == [reference_hash(b""), reference_hash(b"a"),
                                                        reference_hash(b"foobar")]
    assert key_partition(["BSYNRYMUTXBXSQ-UHFFFAOYSA-N"], 1000).tolist() == [
        reference_hash(b"BSYNRYMUTXBXSQ-UHFFFAOYSA-N") % 1000]


def test_partitions_are_balanced():
    keys = [f"KEY{i:08d}" for i in range(64_000)]
    counts = np.bincount(key_partition(keys, 64), minlength=64)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 +- ~4 sigma


def test_grouped_file_reads_one_group_in_input_order(tmp_path):
    keys = pa.array([f"k{i % 5}" for i in range(40)])
    rows = pa.array(np.arange(40, dtype=np.int32))
    batch = pa.record_batch([keys, rows, pa.nulls(40, pa.string())], schema=ROW_SCHEMA)
    groups = key_partition(keys, 3)
    order = np.argsort(groups, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(groups, minlength=3))])
    write_grouped(tmp_path / "f.arrow", [(batch.take(pa.array(order)), offsets)], {"parts": np.array([7])})
    g = GroupedFile(tmp_path / "f.arrow")
    assert g.array("parts").tolist() == [7]
    for p in range(3):
        got = g.group(0, p).column(1).to_pylist()
        assert got == [i for i in range(40) if groups[i] == p]  # ascending: input order kept


def test_grouped_file_of_another_scheme_is_refused(tmp_path):
    path = tmp_path / "old.arrow"
    schema = ROW_SCHEMA.with_metadata({b"scheme": b"1"})
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, schema) as w:
        w.write_batch(pa.record_batch([pa.array(["k"]), pa.array([0], pa.int32()), pa.array(["i"])],
                                      schema=ROW_SCHEMA))
    with pytest.raises(LibraryError, match="dedupe scheme"):
        GroupedFile(path)


def _oracle(library, new, parts):
    """The decide rule in plain Python (the serial planner's: library first, then input order)."""
    first = {}
    for b in library:
        for k, i in zip(b.column(0).to_pylist(), b.column(2).to_pylist()):
            first.setdefault(k, i)
    seen, out = {}, []
    for b, part in zip(new, parts):
        for k, r, i in zip(b.column(0).to_pylist(), b.column(1).to_pylist(), b.column(2).to_pylist()):
            if k in first:
                out.append((r, k, True, first[k], -1, -1))
            elif k in seen:
                out.append((r, k, True, seen[k][2], seen[k][0], seen[k][1]))
            else:
                seen[k] = (part, r, i)
                out.append((r, None, False, None, -1, -1))
    return out, len(set(first) | set(seen))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", ["hash", "colliding hash", "null key"])
def test_vectorized_decide_equals_the_serial_rule(seed, path, monkeypatch, caplog):
    import biogen.library.dedupe as dedupe

    rng = np.random.default_rng(seed)
    vocab = [f"K{i:04d}" for i in range(rng.integers(5, 400))] + ([None] if path == "null key" else [])
    if path == "colliding hash":  # every key hashes alike: the strings disagree, the exact path decides
        monkeypatch.setattr(dedupe, "key_hashes", lambda keys: np.full(len(keys), 7, dtype=np.uint64))

    def batch(n, with_ids):
        keys = [vocab[j] for j in rng.integers(0, len(vocab), n)]
        ids = [f"id{rng.integers(10**9)}" if with_ids and rng.random() < 0.7 else None for _ in range(n)]
        return pa.record_batch([pa.array(keys, pa.string()), pa.array(rng.permutation(n).astype(np.int32)),
                                pa.array(ids, pa.string())], schema=ROW_SCHEMA)

    library = [batch(int(rng.integers(0, 60)), True) for _ in range(int(rng.integers(0, 4)))]
    parts = sorted(rng.choice(50, int(rng.integers(0, 5)), replace=False).tolist())
    new = [batch(int(rng.integers(0, 80)), True) for _ in parts]
    with caplog.at_level("INFO", logger="biogen.library.dedupe"):
        got, distinct = decide_batches(library, new, parts)
    want, want_distinct = _oracle(library, new, parts)
    collided = want_distinct > 1 and path == "colliding hash"
    assert ("hash collision" in caplog.text) == collided
    assert distinct == want_distinct
    assert list(zip(*(got.column(i).to_pylist() for i in range(6)))) == want


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("path", ["hash", "colliding hash", "null key"])
def test_probed_decide_equals_the_serial_rule(seed, path, monkeypatch):
    """``decide_probed`` (new keys searched in the library segments' hash-sorted groups) gives
    the serial rule's decisions, or None (exact matching) on a null key or a collision."""
    import biogen.library.dedupe as dedupe

    rng = np.random.default_rng(100 + seed)
    vocab = [f"K{i:04d}" for i in range(rng.integers(5, 400))]
    hashes = dedupe.key_hashes
    if path == "colliding hash":  # every key hashes alike: a probe meets another string
        hashes = lambda keys: np.full(len(keys), 7, dtype=np.uint64)  # noqa: E731

    def batch(keys, ids, sort):
        keys = pa.array(keys, pa.string())
        h = hashes(keys)
        b = pa.record_batch([keys, pa.array(np.arange(len(keys), dtype=np.int32)), pa.array(ids, pa.string()),
                             pa.array(h, pa.uint64())], schema=SPLIT_SCHEMA)
        return b.take(pa.array(np.argsort(h, kind="stable"))) if sort else b

    lib_keys = rng.permutation(vocab)[: int(rng.integers(0, len(vocab)))].tolist()  # a library's keys are unique
    cuts = sorted(rng.integers(0, len(lib_keys) + 1, 2).tolist())
    library = [batch(ks, [f"L{k}" for k in ks], True) for ks in np.split(np.array(lib_keys, dtype=object), cuts)]
    parts = sorted(rng.choice(50, int(rng.integers(1, 5)), replace=False).tolist())
    new = []
    for _ in parts:
        n = int(rng.integers(0, 80))
        keys = [vocab[j] for j in rng.integers(0, len(vocab), n)]
        if path == "null key" and n:
            keys[int(rng.integers(n))] = None
        new.append(batch(keys, [f"id{rng.integers(10**9)}" if rng.random() < 0.7 else None for _ in range(n)], False))
    got = decide_probed(library, new, parts)
    want, want_distinct = _oracle(library, new, parts)
    if path == "hash" or (path == "null key" and not any(b.column(0).null_count for b in new)):
        assert got is not None
    if got is None:
        assert path != "hash"
        got = decide_batches(library, new, parts)
    decided, distinct = got
    assert distinct == want_distinct
    assert list(zip(*(decided.column(i).to_pylist() for i in range(6)))) == want


def test_probe_finds_strings_by_hash_and_refuses_a_collision():
    side = pa.array(["a", "b", "c", "d"])
    h = np.array([1, 5, 5, 9], dtype=np.uint64)
    assert probe(h, side, np.array([9, 1, 4, 10], np.uint64), pa.array(["d", "a", "x", "y"])).tolist() == [3, 0, -1, -1]
    assert probe(h, side, np.array([5], np.uint64), pa.array(["b"])).tolist() == [1]
    assert probe(h, side, np.array([5], np.uint64), pa.array(["c"])) is None  # "b" has its hash too
    assert probe(h[:0], side[:0], np.array([5], np.uint64), pa.array(["c"])).tolist() == [-1]
