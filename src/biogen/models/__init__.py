"""Scoring models: fingerprint MLP QSAR (Lightning), trained by ``biogen train``.

``biogen.models.data`` (sources, splits, bit lists) imports without torch; the names
below import ``biogen.models.qsar`` (torch + Lightning) on first use.
"""

from __future__ import annotations

_QSAR = ("QSARSpec", "QSARModule", "QSARPredictor", "fit_qsar", "qsar_metrics", "auroc")

__all__ = list(_QSAR)


def __getattr__(name: str):
    if name in _QSAR:
        from biogen.models import qsar

        return getattr(qsar, name)
    raise AttributeError(f"module 'biogen.models' has no attribute {name!r}")
