"""Length-sorted batches filled to a token budget, and the out-of-memory halving retry.

Written once above the backends (CPU and GPU use the same planning). A batch's cost is
its packed token count (residues + BOS + EOS per sequence: no padding is ever computed),
so a budget of 16,384 tokens holds about 47 sequences of the UniProt median length (345).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from biogen.errors import BiogenError

log = logging.getLogger(__name__)


def token_budget_batches(tokens: Sequence[int] | np.ndarray, token_budget: int) -> list[np.ndarray]:
    """Indices of items grouped into batches whose summed ``tokens`` stay within ``token_budget``.

    Items are sorted by length (longest first, so a batch that runs out of memory shows up
    at the start of a job); an item longer than the budget gets a batch of its own."""
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} must be >= 1")
    tok = np.asarray(tokens, dtype=np.int64)
    order = np.argsort(-tok, kind="stable")
    batches: list[np.ndarray] = []
    start, used = 0, 0
    for pos, i in enumerate(order):
        if used and used + tok[i] > token_budget:
            batches.append(order[start:pos])
            start, used = pos, 0
        used += int(tok[i])
    if start < len(order):
        batches.append(order[start:])
    return batches


def is_out_of_memory(exc: BaseException) -> bool:
    """A CUDA OOM (``torch.OutOfMemoryError``) or a CPU allocator failure."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError | MemoryError):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


class OutOfMemoryAtMinimum(BiogenError):
    """One sequence alone does not fit in memory (the budget cannot be halved further)."""


def run_with_oom_halving(tokens: Sequence[int] | np.ndarray, token_budget: int,
                         run_batch: Callable[[np.ndarray], None], *, min_budget: int = 1,
                         on_oom: Callable[[], None] | None = None) -> int:
    """Call ``run_batch(indices)`` over token-budget batches of all items; on out-of-memory,
    halve the budget, re-plan what the failed batch held (and every later batch) and go on.

    Returns the budget in force at the end (callers keep it for their next call). A batch of
    one item that still runs out of memory raises ``OutOfMemoryAtMinimum`` with the item's
    size. ``on_oom`` runs after each failure (the GPU backend frees its cache there)."""
    tok = np.asarray(tokens, dtype=np.int64)
    budget = int(token_budget)
    pending = token_budget_batches(tok, budget)
    k = 0
    while k < len(pending):
        idx = pending[k]
        try:
            run_batch(idx)
            k += 1
            continue
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        if on_oom is not None:
            on_oom()
        if len(idx) == 1 or budget // 2 < max(min_budget, 1):
            raise OutOfMemoryAtMinimum(
                f"out of memory on a batch of {len(idx)} sequence(s), {int(tok[idx].sum())} tokens, at token_budget="
                f"{budget} ({err}); one sequence does not fit: use long_policy=chunk with a smaller window, a "
                "smaller model, or a device with more memory")
        budget //= 2
        log.warning("out of memory on a batch of %d sequences (%d tokens): token_budget halved to %d and the "
                    "remaining work re-planned (%s)", len(idx), int(tok[idx].sum()), budget, err)
        rest = np.concatenate(pending[k:])
        pending = pending[:k] + [rest[b] for b in token_budget_batches(tok[rest], budget)]
    return budget
