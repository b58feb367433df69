"""The search engine: an in-RAM vector cache synced from the store, and the scan over it.

The engine knows nothing of files, models or HTTP: it sees ``(n, d) float32`` vectors, keys,
listing codes and listing attributes.

* :class:`~lookalike.engine.exact.ExactEngine` (numpy) is the reference implementation of the
  search semantics;
* :class:`~lookalike.engine.fast.FastEngine` scans int8 / float16 / float32 codes with the
  compiled kernels and returns the same answers (exact re-scoring with a proof);
* :func:`make_engine` picks one: the fast engine when its C extension is built, numpy (with a
  warning) when it is not.
"""

from __future__ import annotations

import logging
import warnings

from ..errors import LookalikeError
from ..types import RawHits, SearchSpec
from .cache import ListingTable, VectorCache
from .exact import AGGREGATIONS, ExactEngine, check_queries, check_spec
from .filters import Expr, parse_where

log = logging.getLogger(__name__)

SearchEngine = ExactEngine  # MERGE-ENGINE: replaced by the protocol


#: Engines :func:`make_engine` knows.
ENGINES: tuple[str, ...] = ("auto", "fast", "numpy", "torch")
#: Code kinds of the fast engine.
CODES: tuple[str, ...] = ("int8", "float16", "float32")


def kernels_available() -> tuple[bool, str]:
    """Whether the compiled scan kernels import, and why not."""
    try:
        from . import _kernels  # noqa: F401
    except ImportError as exc:
        return False, str(exc)
    return True, ""


def make_engine(
    cache: VectorCache,
    engine: str = "auto",
    codes: str = "int8",
    rerank: int = 4,
    device: str | None = None,
) -> ExactEngine:
    """Build the search engine for ``cache``.

    Args:
        engine: ``auto`` (torch on a CUDA GPU when one is present, else the compiled CPU
            kernels, else numpy with a warning), ``fast``, ``numpy``, or ``torch``.
        codes: code kind of the fast engine (``int8``, ``float16``, ``float32``).
        rerank: candidates per requested hit before the exactness check.
        device: torch device for ``engine="torch"`` (default ``cuda``).

    Raises:
        LookalikeError: unknown engine or codes, or ``fast``/``torch`` requested but unavailable.
    """
    if engine not in ENGINES:
        raise LookalikeError(f"unknown engine {engine!r}; use one of {', '.join(ENGINES)}")
    if codes not in CODES:
        raise LookalikeError(f"unknown codes {codes!r}; use one of {', '.join(CODES)}")
    if engine == "numpy":
        return ExactEngine(cache)
    ok, why = kernels_available()
    if engine == "torch" or (engine == "auto" and ok and _cuda()):
        if not ok:
            raise LookalikeError(f"the torch engine needs the compiled kernels too: {why}")
        from .gpu import TorchEngine

        return TorchEngine(cache, device=device or "cuda", rerank=rerank)
    if not ok:
        if engine == "fast":
            raise LookalikeError(f"compiled scan kernels unavailable: {why}")
        msg = (
            f"lookalike: compiled scan kernels unavailable ({why}); searching with numpy "
            "(exact, slower). Reinstall with a C compiler to build them."
        )
        warnings.warn(msg, RuntimeWarning, stacklevel=2)
        log.warning(msg)
        return ExactEngine(cache)
    from .fast import FastEngine

    return FastEngine(cache, codes=codes, rerank=rerank)


def _cuda() -> bool:
    from ..devices import cuda_available

    return cuda_available()


__all__ = [
    "AGGREGATIONS",
    "CODES",
    "ENGINES",
    "ExactEngine",
    "Expr",
    "ListingTable",
    "RawHits",
    "SearchEngine",
    "SearchSpec",
    "VectorCache",
    "check_queries",
    "check_spec",
    "kernels_available",
    "make_engine",
    "parse_where",
]
