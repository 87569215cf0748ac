"""``exact_scan``: the block scan behind embedding search and protein-aware panels is exact
(same rows, same order as a float64 brute force, ties by row) whatever the block sizes, the number of queries, ties across blocks and k beyond a block."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from biogen.search.embedding import exact_scan


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("block,k", [(1000, 10), (997, 50), (30, 40), (20000, 5)])
def test_top_k_equals_brute_force_with_ties(block, k):
    rng = np.random.default_rng(block + k)
    z = _unit(rng.normal(size=(12000, 64)))
    z[7000:7012] = z[3]             # exact ties, spread over blocks
    q = _unit(rng.normal(size=(17, 64)))
    q[2] = z[3]                      # a query whose best rows tie (row 3 first, then 7000...)
    blocks = [(torch.from_numpy(z[i:i + block]), np.arange(i, min(i + block, len(z)))) for i in range(0, len(z), block)]
    qi, rows, score = exact_scan(torch.from_numpy(q), blocks, k=k)
    s = q.astype(np.float64) @ z.T.astype(np.float64)
    for p in range(len(q)):
        got = rows[qi == p]
        want = np.lexsort((np.arange(len(z)), -s[p]))[:k]
        if p == 2:  # ties in float32 as in float64: the tied rows by row number
            assert got[:min(k, 13)].tolist() == [3, *range(7000, 7012)][:min(k, 13)]
        else:
            assert got.tolist() == want.tolist()
        assert np.all(np.diff(score[qi == p]) <= 0)


def test_threshold_mode_and_shuffled_blocks():
    rng = np.random.default_rng(0)
    z = _unit(rng.normal(size=(5000, 32)))
    q = _unit(rng.normal(size=(3, 32)))
    order = rng.permutation(5000)
    blocks = [(torch.from_numpy(z[order[i:i + 700]]), order[i:i + 700]) for i in range(0, 5000, 700)]
    qi, rows, score = exact_scan(torch.from_numpy(q), blocks, k=25)
    s = q @ z.T
    for p in range(3):
        assert rows[qi == p].tolist() == np.lexsort((np.arange(5000), -s[p]))[:25].tolist()
    qi, rows, score = exact_scan(torch.from_numpy(q), blocks, threshold=0.5)
    assert len(rows) == int((s >= 0.5).sum()) and (score >= 0.5).all()


def test_k_beyond_the_library_returns_every_row_once_in_order():
    rng = np.random.default_rng(1)
    z = _unit(rng.normal(size=(90, 16)))
    q = _unit(rng.normal(size=(4, 16)))
    blocks = [(torch.from_numpy(z[i:i + 40]), np.arange(i, min(i + 40, 90))) for i in range(0, 90, 40)]
    qi, rows, score = exact_scan(torch.from_numpy(q), blocks, k=150)
    s = q.astype(np.float64) @ z.T.astype(np.float64)
    for p in range(4):
        assert rows[qi == p].tolist() == np.lexsort((np.arange(90), -s[p])).tolist()
    assert qi.dtype == np.int32 and score.dtype == np.float64
    qi, rows, score = exact_scan(torch.from_numpy(q), [], k=5)
    assert len(qi) == len(rows) == len(score) == 0
