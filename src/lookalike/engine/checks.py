"""Validation of search input, shared by every engine: the spec, the query vectors, the mask.

Each check raises :class:`~lookalike.errors.QueryError` with a message meant for the user, so
every engine refuses the same input with the same words.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..errors import QueryError
from ..types import SearchSpec


def check_spec(spec: SearchSpec) -> SearchSpec:
    """Return ``spec`` if it is consistent.

    Raises:
        QueryError: ``k < 1``, no limit without a threshold, an unknown aggregation or grouping,
            ``top_n < 1``, or a non-finite threshold (:meth:`SearchSpec.problem`).
    """
    problem = spec.problem()
    if problem is not None:
        raise QueryError(problem)
    return spec


def check_queries(queries: npt.ArrayLike, dim: int) -> npt.NDArray[np.float32]:
    """Validate query vectors and return them as ``(nq, d) float32`` C-contiguous.

    Args:
        queries: ``(d,)`` (one query) or ``(nq, d)``, any numeric dtype.
        dim: the collection's dimension ``d``.

    Raises:
        QueryError: wrong dimension, wrong rank, a non-numeric dtype, or a NaN/inf value.
    """
    q = np.asarray(queries)
    if q.ndim == 1:
        q = q[None, :]
    if q.ndim != 2:
        raise QueryError(f"query must be (d,) or (n, d); got shape {np.shape(queries)}")
    if q.shape[1] != dim:
        raise QueryError(f"query has d={q.shape[1]}, the collection has d={dim}")
    if not np.issubdtype(q.dtype, np.number):
        raise QueryError(f"query must be numeric, got dtype {q.dtype}")
    out = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(out).all():
        raise QueryError("query vector contains NaN or infinity")
    return out


def check_listing_mask(mask: npt.ArrayLike | None, n_listings: int) -> npt.NDArray[np.bool_] | None:
    """``spec.listing_mask`` as ``(n_listings,) bool`` (indexed by listing number), or None.

    Raises:
        QueryError: the mask does not have one entry per listing.
    """
    if mask is None:
        return None
    m = np.asarray(mask, dtype=bool)
    if m.shape != (n_listings,):
        raise QueryError(f"listing_mask has shape {m.shape}, expected ({n_listings},)")
    return m
