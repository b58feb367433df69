"""The search engine: an in-RAM vector cache synced from the store, and the scan over it.

The engine knows nothing of files, models or HTTP: it sees ``(n, d) float32`` vectors, keys,
listing codes and listing attributes. :class:`~lookalike.engine.exact.ExactEngine` (numpy) is the
reference implementation of the search semantics.
"""

from .cache import ListingTable, VectorCache
from .exact import AGGREGATIONS, ExactEngine, RawHits, SearchSpec, check_queries
from .filters import Expr, parse_where

__all__ = [
    "AGGREGATIONS",
    "ExactEngine",
    "Expr",
    "ListingTable",
    "RawHits",
    "SearchSpec",
    "VectorCache",
    "check_queries",
    "parse_where",
]
