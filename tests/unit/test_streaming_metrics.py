"""The streaming screen's exact statistics against the in-memory ones: metrics from tie
counts summed over shards (``EnrichmentMetrics.from_counts``, the null model, the report's
curve) and global ranks from the sample sort (``StreamingScreen.bucket_ranks``), on data with
heavy ties, NaN and infinities, empty shards and several bucket counts."""

from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from biogen.screen.metrics import (EnrichmentMetrics, TieCounts, _block_sum, distinct_values, fractional_ranks,
                                   null_model, pick_null_model, property_ranking, tie_counts, zscores)
from biogen.screen.selection import best_first
from biogen.screen.streaming import (RUN_SAMPLE, SAMPLE_PER_BUCKET, StreamingScreen, _read_sample, bucket_bounds,
                                     merge_moments, _moments, grow_factor, run_sample)


def _split(n: int, parts: int, rng) -> list[slice]:
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))  # empty shards included
    edges = [0, *cuts.tolist(), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _counts_of(scores: np.ndarray, labels: np.ndarray, shards: list[slice]) -> TieCounts:
    values = distinct_values(scores[labels])
    g = np.zeros(len(values), dtype=np.int64)
    e = np.zeros(len(values), dtype=np.int64)
    for sl in shards:
        gg, ee = tie_counts(scores[sl], values)
        g += gg
        e += ee
    return TieCounts.of(values, g, e, scores[labels], len(scores))


def _tied_scores(rng, n: int) -> np.ndarray:
    s = rng.integers(0, int(rng.integers(1, 40)), n).astype(np.float64) / 7.0  # heavy ties
    s[rng.random(n) < 0.1] = np.nan
    s[rng.random(n) < 0.1] = -np.inf
    s[rng.random(n) < 0.02] = np.inf
    return s


@pytest.mark.parametrize("seed", range(40))
def test_metrics_from_counts_equal_the_in_memory_ones(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 4000))
    s = _tied_scores(rng, n)
    y = rng.random(n) < rng.uniform(0.005, 0.5)
    i, j = rng.choice(n, 2, replace=False)
    y[i], y[j] = True, False  # both classes
    want = EnrichmentMetrics.of(s, y)
    got = EnrichmentMetrics.from_counts(_counts_of(s, y, _split(n, int(rng.integers(1, 9)), rng)))
    # AUROC, EF1/5 % and the recovered count bit for bit (the same float sums); BEDROC's sum
    # is a dot product in memory and a geometric series per tie block here
    assert (got.auroc, got.ef1, got.ef5, got.n_actives, got.n, got.recovered_top_1pct) == (
        want.auroc, want.ef1, want.ef5, want.n_actives, want.n, want.recovered_top_1pct)
    assert abs(got.bedroc20 - want.bedroc20) <= 1e-12


def test_recovered_count_truncates_the_same_float_sum():
    # a tie block of 3 molecules holding 1 active, all in the top 1 %: the in-memory sum of
    # 1/3 + 1/3 + 1/3 + ... lands just below an integer, and int() truncates it
    for seed in (74, 110, 152):
        rng = np.random.default_rng(seed)
        n = int(rng.integers(2, 3000))
        s = rng.integers(0, rng.integers(1, 50), n).astype(float)
        s[rng.random(n) < 0.1] = np.nan
        s[rng.random(n) < 0.1] = -np.inf
        y = rng.random(n) < rng.uniform(0.01, 0.5)
        y[0], y[1] = True, False
        got = EnrichmentMetrics.from_counts(_counts_of(s, y, [slice(0, n)]))
        assert got.recovered_top_1pct == EnrichmentMetrics.of(s, y).recovered_top_1pct


@pytest.mark.parametrize("seed", range(20))
def test_block_sum_is_numpys_pairwise_sum(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 20000))
    w = np.zeros(n)
    starts = np.sort(rng.choice(n, size=min(n, int(rng.integers(1, 60))), replace=False))
    ends = np.append(starts[1:], n)
    sizes = np.maximum(1, (rng.random(len(starts)) * (ends - starts)).astype(np.int64))
    vals = rng.integers(1, 5, len(starts)) / np.maximum(sizes, 1)
    for a, m, v in zip(starts, sizes, vals):
        w[a:a + m] = v
    for top in (1, n // 100 + 1, n // 20 + 1, n):
        assert _block_sum(starts, sizes, vals, top) == w[:top].sum()


@pytest.mark.parametrize("seed", range(10))
def test_null_model_from_counts(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 3000))
    props = {"heavy_atoms": rng.integers(5, 40, n).astype(np.float64), "mw": np.round(rng.normal(350, 60, n), 1)}
    props["mw"][rng.random(n) < 0.05] = np.nan
    y = rng.random(n) < 0.05
    y[:2] = True, False
    keep = rng.random(n) < 0.7
    want = null_model(props, y, keep=keep)
    shards = _split(n, 4, rng)
    options = []
    for name, v in props.items():
        for high in (True, False):
            ranked = property_ranking(v, high, keep)
            options.append((name, high, EnrichmentMetrics.from_counts(_counts_of(ranked, y, shards))))
    got = pick_null_model(options)
    assert (got.prop, got.high_first) == (want.prop, want.high_first)
    for k, v in want.metrics.as_dict().items():
        assert abs(got.metrics.as_dict()[k] - v) <= 1e-12, k


def test_report_curve_from_counts_equals_the_in_memory_curve():
    from biogen.screen.report import _counts_curve, _enrichment_curve

    rng = np.random.default_rng(3)
    for n in (10, 700, 5000):
        s = _tied_scores(rng, n)
        y = rng.random(n) < 0.1
        y[:2] = True, False
        x1, y1 = _enrichment_curve(s, y)
        x2, y2 = _counts_curve(_counts_of(s, y, _split(n, 3, rng)))
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_allclose(y1, y2, rtol=0, atol=1e-12)


def test_merged_moments_give_the_in_memory_zscores():
    rng = np.random.default_rng(0)
    x = np.round(rng.normal(3, 2, 5000), 2)
    x[rng.random(5000) < 0.1] = np.nan
    shards = _split(len(x), 7, rng)
    mean, sd = merge_moments([_moments(x[sl]) for sl in shards])
    np.testing.assert_allclose((x - mean) / sd, zscores(x), rtol=0, atol=1e-12)
    assert merge_moments([_moments(np.full(3, np.nan)), _moments(np.zeros(0))]) == (0.0, 0.0)


# ----------------------------------------------------------------------------- the sample sort

def test_top_k_grows_by_the_walks_fill_rate():
    assert grow_factor(1000, 2000) == 3      # half found: 1.5 x 2
    assert grow_factor(1999, 2000) == 2      # nearly full: at least doubles
    assert grow_factor(10, 2000) == 64       # a scaffold cap that fills slowly: capped
    assert grow_factor(0, 2000) == 64


def test_run_sample_keeps_the_driver_sample_per_bucket_not_per_shard():
    # 100M rows in 100,000 shards, 1,000 buckets: ceil(512,000 / 100,000) = 6 values per shard, not 64
    assert run_sample(100_000, 1_000) == 6
    assert run_sample(100_000, 10) == 4
    assert run_sample(10, 1_000) == RUN_SAMPLE
    assert run_sample(0, 1) == RUN_SAMPLE
    for shards, buckets in [(1_000, 100), (10_000, 1_000), (30_000, 3_000)]:
        assert run_sample(shards, buckets) * shards >= SAMPLE_PER_BUCKET * buckets

def _job(tmp_path, sizes: list[int], run_sample: int = RUN_SAMPLE) -> StreamingScreen:
    return StreamingScreen(str(tmp_path), "unused", len(sizes), sum(sizes), (), ("x",),
                           (("x", 1.0),), "rank", None, None, (), (), "t", run_sample)


def _sample_sort(tmp_path, values: np.ndarray, shards: list[slice], buckets: int, average: bool,
                 sample: int = RUN_SAMPLE) -> np.ndarray:
    """Global ranks of ``values`` (split into ``shards``) through the rounds' own code."""
    job = _job(tmp_path, [sl.stop - sl.start for sl in shards], sample)
    samples = []
    for i, sl in enumerate(shards):
        v = values[sl]
        samples.append(job._write_run("x", i, v, np.arange(len(v)))[1])
    bounds = bucket_bounds(samples, buckets)
    assert len(bounds) <= max(buckets - 1, 0)
    for j in range(len(bounds) + 1):
        job.bucket_ranks("x", j, bounds, len(values), average)
    fill = np.nan if average else -1
    parts = [job._assemble("x", i, bounds, sl.stop - sl.start, fill) for i, sl in enumerate(shards)]
    return np.concatenate(parts) if parts else np.zeros(0)


@pytest.mark.parametrize("buckets", [1, 2, 3, 7, 50])
@pytest.mark.parametrize("case", ["ties", "nan_inf", "all_nan", "empty_shards", "one_value"])
def test_sample_sort_ranks_equal_the_in_memory_ranks(tmp_path, buckets, case):
    rng = np.random.default_rng(buckets)
    n = 3000
    v = rng.integers(0, 4, n).astype(np.float64)  # four values: every bucket boundary cuts at a tie
    if case == "nan_inf":
        v[rng.random(n) < 0.2] = np.nan
        v[rng.random(n) < 0.1] = np.inf
        v[rng.random(n) < 0.1] = -np.inf
    elif case == "all_nan":
        v[:] = np.nan
    elif case == "one_value":
        v[:] = 0.5
    elif case == "ties":
        v = np.round(rng.normal(size=n), 1)
    shards = _split(n, 6, rng) if case == "empty_shards" else [slice(a, min(a + 700, n)) for a in range(0, n, 700)]
    if case == "empty_shards":
        shards = [slice(0, 0), *shards, slice(n, n)]
    # fractional ranks (rank fusion): bit for bit, whatever sample the runs offer
    for sample in (4, RUN_SAMPLE):
        got = _sample_sort(tmp_path / f"avg{sample}", v, shards, buckets, True, sample)
        np.testing.assert_array_equal(got, fractional_ranks(v))
    # best-first positions of the fused scores (ties in library order, NaN last)
    key = -v
    got = _sample_sort(tmp_path / "ord", key, shards, buckets, False)
    want = np.empty(n, dtype=np.int64)
    want[best_first(v)] = np.arange(1, n + 1)
    np.testing.assert_array_equal(got, want)


def test_the_report_sample_is_read_in_blocks_in_shard_order(tmp_path):
    """The report's sample: every shard's file in shard order (an empty one included), one
    contiguous table, whatever the block of files combined at a time."""
    (tmp_path / "sample").mkdir()
    tables = [pa.table({"fused": np.arange(i * 10, i * 10 + n, dtype=np.float64), "alive": np.ones(n, dtype=bool)})
              for i, n in enumerate([3, 0, 2, 5, 1])]
    for i, t in enumerate(tables):
        pq.write_table(t, tmp_path / "sample" / f"{i:06d}.parquet")
    job = SimpleNamespace(root=tmp_path, n_shards=len(tables))
    want = pa.concat_tables(tables)
    for block in (1, 2, 256):
        got = _read_sample(job, block)
        assert got.equals(want.combine_chunks()) and got.column("fused").num_chunks == 1
    assert _read_sample(SimpleNamespace(root=tmp_path, n_shards=0)) is None
