"""The reference engine: exact search with numpy, every live vector scored by BLAS.

:class:`NumpyEngine` is the oracle of the search semantics (``ranking.py``): the compiled and
GPU engines are tested against it. It needs nothing compiled, so it is also the fallback when
the C extension is missing.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..types import CodeKind, RawHits, SearchSpec
from .cache import VectorCache
from .checks import check_listing_mask, check_queries, check_spec
from .ranking import rank

#: Score blocks are sized so that one ``(rows, queries)`` block stays under this many bytes.
BLOCK_BYTES = 256 * 1024 * 1024


class NumpyEngine:
    """Exact inner-product search with numpy (BLAS ``sgemm``/``sgemv``) over a
    :class:`VectorCache`; implements :class:`~lookalike.engine.protocol.SearchEngine`.

    Args:
        cache: the vector cache (read in place: no copy, ``nbytes() == 0``).
    """

    name = "numpy"
    code_kind = CodeKind.FLOAT32
    exact = True

    def __init__(self, cache: VectorCache) -> None:
        self.cache = cache

    def nbytes(self) -> int:
        """0: the engine reads the cache's float32 vectors and holds nothing else."""
        return 0

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query.

        Raises:
            QueryError: bad query (see :func:`check_queries`), spec or listing mask.
        """
        cache = self.cache
        check_spec(spec)
        q = check_queries(queries, cache.dim)
        valid = cache.alive.copy()
        mask = check_listing_mask(spec.listing_mask, len(cache.listings))
        if mask is not None:
            valid &= mask[cache.row_listing]
        rows = np.flatnonzero(valid)
        vectors = cache.vectors
        dense = len(rows) == cache.n_rows
        out: list[RawHits] = []
        block = max(1, BLOCK_BYTES // max(1, 4 * max(len(rows), 1)))
        for start in range(0, len(q), block):
            qb = q[start : start + block]
            scores = (vectors @ qb.T) if dense else (vectors[rows] @ qb.T)
            for j in range(len(qb)):
                out.append(rank(cache, rows, np.ascontiguousarray(scores[:, j]), spec))
        return out
