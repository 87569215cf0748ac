"""Similarity metrics on packed fingerprints, scored exactly as RDKit scores them.

A pair is described by three integers: ``a`` (query popcount), ``b`` (target popcount)
and ``c`` (popcount of ``query AND target``). Kernels only ever compute ``c``; scores
are float64 ratios computed here with the same expressions RDKit's ``Bulk*Similarity``
uses for ``ExplicitBitVect`` (checked bit for bit in the tests):

- Tanimoto ``c / (a + b - c)``
- Dice ``2c / (a + b)``
- Tversky(alpha, beta) ``c / (alpha*a + beta*b + (1 - alpha - beta)*c)``; ``alpha``
  weighs the query's own bits, ``beta`` the target's (RDKit's ``BulkTverskySimilarity(
  query, targets, alpha, beta)``). A denominator of 0 gives 1.0, as in RDKit.

Any pair with an empty fingerprint scores 0.0 (RDKit's convention).

Every metric is non-decreasing in ``c`` for fixed ``a`` and ``b`` (with alpha, beta >= 0),
so a threshold becomes an integer test per target popcount: ``c >= min_common[b]``,
derived from the float64 score itself. The test therefore selects exactly the pairs
whose RDKit score is ``>= threshold``, with no float rounding at the boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from biogen.errors import ConfigError

METRICS = ("tanimoto", "dice", "tversky")
NEVER = np.int32(1 << 30)  # min_common value of a target popcount that cannot reach a threshold


@dataclass(frozen=True)
class Metric:
    """A similarity metric (config keys ``metric``, ``alpha``, ``beta``)."""

    name: str = "tanimoto"
    alpha: float = 0.5
    beta: float = 0.5

    def __post_init__(self) -> None:
        if self.name not in METRICS:
            raise ConfigError(f"metric={self.name!r} is not supported; valid: {', '.join(METRICS)}")
        if self.name == "tversky" and not (self.alpha >= 0 and self.beta >= 0):
            raise ConfigError(
                f"tversky needs alpha >= 0 and beta >= 0 (got alpha={self.alpha}, beta={self.beta})"
            )

    @property
    def label(self) -> str:
        return f"tversky(alpha={self.alpha:g},beta={self.beta:g})" if self.name == "tversky" else self.name

    def score(self, c, a, b) -> np.ndarray:
        """float64 scores of pairs (arrays broadcast), RDKit's expressions and conventions."""
        c = np.asarray(c, dtype=np.float64)
        a = np.asarray(a, dtype=np.float64)
        b = np.asarray(b, dtype=np.float64)
        if self.name == "tanimoto":
            den = a + b - c
            num = c
        elif self.name == "dice":
            den = a + b
            num = 2.0 * c
        else:
            den = self.alpha * a + self.beta * b + (1.0 - self.alpha - self.beta) * c
            num = c
        with np.errstate(divide="ignore", invalid="ignore"):
            out = num / den
        out = np.where(den == 0.0, 1.0, out)
        return np.where((a == 0.0) | (b == 0.0), 0.0, out)

    def min_common(self, a, threshold, nbits: int) -> np.ndarray:
        """``int32[Q, nbits + 1]``: least ``c`` with ``score(c, a, b) >= threshold`` per ``b``.

        ``a`` and ``threshold`` are scalars or length-Q arrays (one row per query);
        ``NEVER`` marks target popcounts where no ``c <= min(a, b)`` reaches it. Found
        per entry from the real solution and confirmed with the float64 score (Numba
        kernel ``min_common_table``, same expressions as ``score``), so the integer test
        agrees with RDKit's scores.
        """
        from biogen.kernels.cpu import min_common_table

        a = np.atleast_1d(np.asarray(a, dtype=np.int64))
        t = np.ascontiguousarray(np.broadcast_to(np.atleast_1d(np.asarray(threshold, dtype=np.float64)), a.shape))
        return min_common_table(a, t, int(nbits), self.code, float(self.alpha), float(self.beta), NEVER)

    @property
    def code(self) -> int:
        """The metric's code in the Numba kernels (``METRIC_*`` of ``biogen.kernels.cpu``)."""
        return METRICS.index(self.name)
