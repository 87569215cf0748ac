"""A library's shard memory maps are bounded (each holds a file descriptor), thread-safe and
picklable; reading every shard of a library with more shards than the bound keeps at most
the bound open."""

from __future__ import annotations

import os
import pickle
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from biogen.library.store import MapCache


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_the_cache_keeps_at_most_its_size_of_maps_open(tmp_path):
    paths = []
    for i in range(60):
        p = tmp_path / f"a{i}.npy"
        np.save(p, np.full(1000, i, dtype=np.int32))
        paths.append(p)
    cache = MapCache(size=8)
    before = _open_fds()
    for i, p in enumerate(paths):
        a = cache.get(p, lambda p=p: np.load(p, mmap_mode="r"))
        assert a[0] == i
    del a
    assert _open_fds() - before <= 8  # was one per file (60) with a map cached per shard for good
    hit = cache.get(paths[-1], lambda: (_ for _ in ()).throw(AssertionError("a cached map is not reloaded")))
    assert hit[5] == 59
    with ThreadPoolExecutor(4) as pool:  # concurrent readers get the right arrays
        got = list(pool.map(lambda i: int(cache.get(paths[i], lambda: np.load(paths[i], mmap_mode="r"))[0]),
                            [i % 60 for i in range(400)]))
    assert got == [i % 60 for i in range(400)]
    back = pickle.loads(pickle.dumps(cache))  # sent to a worker: empty, same bound
    assert back.size == 8 and not back._maps


def test_reading_and_verifying_every_shard_keeps_the_bound(tmp_path, monkeypatch):
    from biogen.library import Library
    from biogen.library.ingest import build_library
    from biogen.library.verify import verify_library
    from biogen.runtime import RuntimeSpec
    from biogen.library import store

    smi = tmp_path / "in.smi"
    smi.write_text("".join(f"{'C' * (1 + i % 12)}O{'N' * (i // 12)}\n" for i in range(90)))
    build_library(str(smi), tmp_path / "lib", chunk_size=3, runtime=RuntimeSpec(mode="inline", progress=False))
    monkeypatch.setattr(store, "MAPPED", 6)
    lib = Library.open(tmp_path / "lib")
    assert len(lib.shards) >= 25
    before = _open_fds()
    rows = sum(len(s.fingerprints) + len(s.popcounts) for s in lib.shards) // 2
    assert rows == lib.n_rows and _open_fds() - before <= 6
    assert verify_library(tmp_path / "lib").ok  # it opened every shard (deep); was 2 descriptors per shard
