"""Similarity and substructure search over compound libraries (see ``index.py``)."""

from biogen.search.index import SimilarityIndex
from biogen.search.metrics import Metric
from biogen.search.queries import Queries

__all__ = ["Metric", "Queries", "SimilarityIndex"]
