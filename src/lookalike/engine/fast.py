"""The fast exact engine: the compiled scan over compact codes on every CPU core.

This module owns :class:`KernelScanner` (scan scores from the C kernels of ``_kernels.c``, over
int8, float16 or float32 codes, with deleted rows and filtered-out listings excluded during the
scan) and :class:`FastEngine`, which runs it under the exact search loop of ``refine.py``
(candidates, exact re-scoring, proof): answers equal the numpy engine's whatever the codes.

Float32 batches are compute-bound, so they are scored by BLAS ``sgemm`` in row blocks instead of
the kernel.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from ..types import CodeKind, RawHits, SearchSpec
from . import _kernels
from .cache import VectorCache
from .codes import CodeTable, PreparedQuery
from .refine import Refiner, RowFilter, Rows, Scores, Scratch, default_threads

#: Float32 batches are scored by BLAS in row blocks of about this many bytes of scores.
GEMM_BLOCK_BYTES = 64 * 2**20


class KernelScanner:
    """Scan scores from a :class:`CodeTable` through the compiled kernels (a
    :class:`~lookalike.engine.refine.Scanner`).

    Args:
        cache: the vector cache.
        codes: the code kind (``int8``, ``float16``, ``float32``).
        threads: scan threads.

    Raises:
        LookalikeError: unknown code kind.
    """

    def __init__(self, cache: VectorCache, codes: str, threads: int) -> None:
        self.cache = cache
        self.table = CodeTable(codes, cache.dim)
        self.threads = threads
        self.scratch = Scratch()

    def sync(self) -> None:
        """Encode rows added to the cache since the last call (see :meth:`CodeTable.sync`)."""
        self.table.sync(self.cache)

    def prepare(self, q: npt.NDArray[np.float32]) -> PreparedQuery:
        """The table's form of the ``(d,) float32`` query, with its margin."""
        return self.table.prepare(q)

    def prepare_many(self, q: npt.NDArray[np.float32]) -> list[PreparedQuery]:
        """:meth:`prepare` of each query of ``(m, d) float32``, computed together."""
        return self.table.prepare_many(q)

    def _row_listing(self, rows: RowFilter) -> npt.NDArray[np.int32] | None:
        return self.cache.row_listing if rows.lmask is not None else None

    def _scan(
        self, prepared: PreparedQuery, rows: RowFilter, kk: int
    ) -> tuple[Scores, Rows, Scores]:
        cache = self.cache
        out = self.scratch.get("dense", cache.n_rows, np.float32)
        top_rows = np.empty(kk, dtype=np.int64)
        top_scores = np.empty(kk, dtype=np.float32)
        count = _kernels.scores(
            self.table.kind,
            self.table.data,
            cache.n_rows,
            cache.dim,
            prepared.buf,
            prepared.params(),
            self._row_listing(rows),
            rows.lmask,
            rows.alive,
            len(cache.listings),
            out,
            self.threads,
            kk,
            top_rows if kk else None,
            top_scores if kk else None,
        )
        return out, top_rows[:count], top_scores[:count]

    def dense(self, prepared: PreparedQuery, rows: RowFilter) -> Scores:
        """``(n_rows,) float32`` scan scores, ``-inf`` where excluded (a scratch buffer)."""
        return self._scan(prepared, rows, 0)[0]

    def dense_top(
        self, prepared: PreparedQuery, rows: RowFilter, kk: int
    ) -> tuple[Scores, Rows, Scores]:
        """:meth:`dense` and the ``kk`` best rows with their scan scores (unordered)."""
        return self._scan(prepared, rows, kk)

    def candidates(
        self,
        q: npt.NDArray[np.float32],
        prepared: list[PreparedQuery],
        kk: int,
        rows: RowFilter,
        floors: npt.NDArray[np.float64] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """For each query the ``kk`` best rows by scan score (above ``floors[i]`` if given):
        ``rows (nq, kk)``, ``scores (nq, kk)``, ``counts (nq,)`` (valid entries first)."""
        if self.table.code_kind == CodeKind.FLOAT32:
            top, vals, counts = self._gemm(q, kk, rows)
            if floors is not None:  # rows are sorted best first: cut below the floor
                above = (vals > floors[:, None].astype(np.float32)).sum(1)
                counts = np.minimum(counts, above)
            return top, vals, counts
        cache = self.cache
        nq = len(q)
        bufs = np.ascontiguousarray(np.stack([p.buf for p in prepared]))
        params = np.ascontiguousarray(np.stack([p.params() for p in prepared]))
        out_rows = np.empty((nq, kk), dtype=np.int64)
        out_scores = np.empty((nq, kk), dtype=np.float32)
        out_counts = np.empty(nq, dtype=np.int64)
        _kernels.topk_batch(
            self.table.kind,
            self.table.data,
            cache.n_rows,
            cache.dim,
            bufs,
            params,
            nq,
            self._row_listing(rows),
            rows.lmask,
            rows.alive,
            len(cache.listings),
            kk,
            out_rows,
            out_scores,
            out_counts,
            self.threads,
            floors,
        )
        return out_rows, out_scores, out_counts

    def _gemm(
        self, q: npt.NDArray[np.float32], kk: int, rows: RowFilter
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Float32 batches are compute-bound: BLAS sgemm on row blocks, then per-query top-kk,
        sorted best first."""
        cache = self.cache
        nq, n = len(q), cache.n_rows
        block = max(4096, GEMM_BLOCK_BYTES // (4 * nq))
        best_rows = np.zeros((nq, 0), dtype=np.int64)
        best_vals = np.zeros((nq, 0), dtype=np.float32)
        keep = None
        if rows.lmask is not None or rows.alive is not None:
            keep = np.ones(n, dtype=bool) if rows.alive is None else rows.alive.view(bool).copy()
            if rows.lmask is not None:
                keep &= rows.lmask[: len(cache.listings)].view(bool)[cache.row_listing]
        for a in range(0, n, block):
            s = q @ cache.vectors[a : a + block].T  # (nq, b)
            if keep is not None:
                s[:, ~keep[a : a + block]] = -np.inf
            m = min(kk, s.shape[1])
            part = np.argpartition(s, s.shape[1] - m, axis=1)[:, s.shape[1] - m :]
            vals = np.take_along_axis(s, part, axis=1)
            best_rows = np.concatenate([best_rows, part + a], axis=1)
            best_vals = np.concatenate([best_vals, vals], axis=1)
            if best_rows.shape[1] > kk:
                top = np.argpartition(best_vals, best_vals.shape[1] - kk, axis=1)[:, -kk:]
                best_rows = np.take_along_axis(best_rows, top, axis=1)
                best_vals = np.take_along_axis(best_vals, top, axis=1)
        counts = np.isfinite(best_vals).sum(axis=1).astype(np.int64)
        order = np.argsort(-best_vals, axis=1, kind="stable")  # finite first
        return (
            np.take_along_axis(best_rows, order, axis=1),
            np.take_along_axis(best_vals, order, axis=1),
            counts,
        )


class FastEngine:
    """Exact search through the compiled kernels over int8 / float16 / float32 codes;
    implements :class:`~lookalike.engine.protocol.SearchEngine`.

    Args:
        cache: the vector cache.
        codes: ``"int8"`` (default), ``"float16"`` or ``"float32"`` (a :class:`CodeKind`).
        rerank: candidates per requested hit before the exactness check (>= 1).
        threads: scan threads (default: every core; ``LOOKALIKE_THREADS`` overrides).

    Attributes:
        scanner: the :class:`KernelScanner`; ``table`` is its :class:`CodeTable`.
        refiner: the exact search loop (``refine.py``).

    Raises:
        LookalikeError: unknown code kind.
    """

    name = "fast"
    exact = True

    def __init__(
        self, cache: VectorCache, codes: str = "int8", rerank: int = 4, threads: int | None = None
    ) -> None:
        self.cache = cache
        self.threads = default_threads(threads)
        self.scanner = KernelScanner(cache, codes, self.threads)
        self.refiner = Refiner(cache, self.scanner, rerank=rerank, threads=self.threads)

    @property
    def table(self) -> CodeTable:
        """The code table scanned."""
        return self.scanner.table

    @property
    def code_kind(self) -> CodeKind:
        """The code kind scanned."""
        return self.scanner.table.code_kind

    @property
    def rerank(self) -> int:
        """Candidates per requested hit before the exactness check."""
        return self.refiner.rerank

    @property
    def widened(self) -> int:
        """How many searches needed the proof's widening step (for tests and benchmarks)."""
        return self.refiner.widened

    @property
    def rescored(self) -> int:
        """Rows re-scored exactly over all searches (divide by :attr:`queries`)."""
        return self.refiner.rescored

    @property
    def queries(self) -> int:
        """Queries searched."""
        return self.refiner.queries

    def nbytes(self) -> int:
        """Bytes of codes held beyond the cache's float32 copy (encodes pending rows first;
        0 for ``float32``, which scans the cache's own array)."""
        self.scanner.sync()
        return self.table.nbytes()

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query (exact answers).

        Raises:
            QueryError: bad query, spec or listing mask.
        """
        return self.refiner.search(queries, spec)
