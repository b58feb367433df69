"""The scan on a GPU through torch: same answers as the CPU engines.

This module owns :class:`TorchScanner` and :class:`TorchEngine`. The scanner keeps a float32
copy of the vectors on the device (uploaded once, then only appended rows), scores queries with
one matrix product there, applies deletes and listing filters on the device, and hands the
dense scores (4 bytes per row) or the per-query top candidates back to the CPU, where the exact
search loop of ``refine.py`` (exact re-scoring, per-listing aggregation, exactness proof) runs
unchanged. The margin of the proof is float32 summation error (``2 * gamma_d * ||x|| * ||q||``),
plus ``2^-11 * ||x|| * ||q||`` when torch is allowed TF32 matrix products
(``torch.backends.cuda.matmul.allow_tf32``).

It runs on any torch device; the tests run it on the CPU, so the same suite checks it on
machines without a GPU.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ..types import CodeKind, RawHits, SearchSpec
from .cache import VectorCache
from .codes import CodeTable, PreparedQuery
from .refine import Refiner, RowFilter, Rows, Scores, Scratch

#: Scores per device matrix product are computed in blocks of about this many bytes.
DEVICE_BLOCK_BYTES = 512 * 2**20


class TorchScanner:
    """Scan scores from a device copy of the float32 vectors (a
    :class:`~lookalike.engine.refine.Scanner`).

    Args:
        cache: the vector cache.
        device: torch device string (``cuda``, ``cuda:1``, ``cpu``).
    """

    def __init__(self, cache: VectorCache, device: str) -> None:
        import torch

        self.torch: Any = torch
        self.cache = cache
        self.table = CodeTable(CodeKind.FLOAT32, cache.dim)  # margins (max_norm) only
        self.device = torch.device(device)
        self.scratch = Scratch()
        self._dev = torch.zeros((0, cache.dim), dtype=torch.float32, device=self.device)
        self._dev_listing = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._dev_layout = -1
        self._dev_n = 0

    def nbytes(self) -> int:
        """Device memory held for the vectors and listing numbers, in bytes."""
        return int(self._dev.numel() * 4 + self._dev_listing.numel() * 8)

    def sync(self) -> None:
        """Follow the cache: re-upload after a compaction, else append new rows."""
        torch, cache = self.torch, self.cache
        self.table.sync(cache)
        n = cache.n_rows
        if self._dev_layout != cache.layout or n < self._dev_n:
            self._dev = torch.from_numpy(np.ascontiguousarray(cache.vectors)).to(self.device)
            lnum = cache.row_listing.astype(np.int64)
            self._dev_listing = torch.from_numpy(lnum).to(self.device)
            self._dev_layout, self._dev_n = cache.layout, n
        elif n > self._dev_n:
            new = torch.from_numpy(np.ascontiguousarray(cache.vectors[self._dev_n : n]))
            self._dev = torch.cat([self._dev, new.to(self.device)])
            lnum = torch.from_numpy(cache.row_listing[self._dev_n : n].astype(np.int64))
            self._dev_listing = torch.cat([self._dev_listing, lnum.to(self.device)])
            self._dev_n = n

    def prepare(self, q: npt.NDArray[np.float32]) -> PreparedQuery:
        """The float32 query, its margin widened by TF32 rounding when torch may use it."""
        return self.prepare_many(q[None])[0]

    def prepare_many(self, q: npt.NDArray[np.float32]) -> list[PreparedQuery]:
        """:meth:`prepare` of each query of ``(m, d) float32``, computed together."""
        prepared = self.table.prepare_many(q)
        if self.device.type == "cuda" and self.torch.backends.cuda.matmul.allow_tf32:
            norms = np.linalg.norm(q.astype(np.float64), axis=1)
            for p, qn in zip(prepared, norms, strict=True):
                p.margin += 2.0**-11 * self.table.max_norm * float(qn)
        return prepared

    def _keep(self, rows: RowFilter) -> Any:
        """Device bool mask of rows to score, or None for all."""
        if rows.alive is None and rows.lmask is None:
            return None
        torch = self.torch
        keep = torch.ones(self.cache.n_rows, dtype=torch.bool, device=self.device)
        if rows.alive is not None:
            keep &= torch.from_numpy(rows.alive.view(bool).copy()).to(self.device)
        if rows.lmask is not None:
            lm = torch.from_numpy(rows.lmask[: len(self.cache.listings)].view(bool).copy())
            keep &= lm.to(self.device)[self._dev_listing]
        return keep

    def _scores(self, qs: npt.NDArray[np.float32], rows: slice, keep: Any) -> Any:
        """Device scores ``(b, nq) float32`` of a row slice, ``-inf`` where not kept."""
        torch = self.torch
        q = torch.from_numpy(np.ascontiguousarray(qs, dtype=np.float32)).to(self.device)
        s = self._dev[rows] @ q.T
        if keep is not None:
            s = torch.where(keep[rows, None], s, torch.tensor(-np.inf, device=self.device))
        return s

    def _device_dense(self, prepared: PreparedQuery, rows: RowFilter) -> tuple[Any, Scores]:
        s = self._scores(prepared.buf[None], slice(0, self.cache.n_rows), self._keep(rows))[:, 0]
        out = self.scratch.get("dense", self.cache.n_rows, np.float32)
        out[:] = s.cpu().numpy()
        return s, out

    def dense(self, prepared: PreparedQuery, rows: RowFilter) -> Scores:
        """``(n_rows,) float32`` scores from the device, ``-inf`` where excluded."""
        return self._device_dense(prepared, rows)[1]

    def dense_top(
        self, prepared: PreparedQuery, rows: RowFilter, kk: int
    ) -> tuple[Scores, Rows, Scores]:
        """:meth:`dense` and the ``kk`` best rows (``torch.topk`` on the device)."""
        s, out = self._device_dense(prepared, rows)
        vals_t, idx_t = self.torch.topk(s, min(kk, len(s)))
        vals: Scores = vals_t.cpu().numpy()
        idx: Rows = idx_t.cpu().numpy().astype(np.int64)
        finite = vals > -np.inf
        return out, idx[finite], vals[finite]

    def candidates(
        self,
        q: npt.NDArray[np.float32],
        prepared: list[PreparedQuery],
        kk: int,
        rows: RowFilter,
        floors: npt.NDArray[np.float64] | None,
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32], npt.NDArray[np.int64]]:
        """Per-query top ``kk`` candidates from device matrix products in row blocks (above
        ``floors[i]`` when given), sorted best first."""
        torch, n = self.torch, self.cache.n_rows
        keep = self._keep(rows)
        nq = len(q)
        block = max(4096, DEVICE_BLOCK_BYTES // (4 * nq))
        best_v = torch.full((nq, 0), -np.inf, device=self.device)
        best_i = torch.zeros((nq, 0), dtype=torch.int64, device=self.device)
        for a in range(0, n, block):
            s = self._scores(q, slice(a, min(n, a + block)), keep).T  # (nq, b)
            v, i = torch.topk(s, min(kk, s.shape[1]), dim=1)
            best_v = torch.cat([best_v, v], dim=1)
            best_i = torch.cat([best_i, i + a], dim=1)
            if best_v.shape[1] > kk:
                best_v, pos = torch.topk(best_v, kk, dim=1)
                best_i = torch.gather(best_i, 1, pos)
        vals: npt.NDArray[np.float32] = best_v.cpu().numpy()
        top: npt.NDArray[np.int64] = best_i.cpu().numpy().astype(np.int64)
        low = -np.inf if floors is None else floors[:, None].astype(np.float32)
        counts = (vals > low).sum(axis=1).astype(np.int64)  # topk sorts: best first
        return top, vals, counts


class TorchEngine:
    """Exact search with the scan on a torch device (``cuda`` by default); implements
    :class:`~lookalike.engine.protocol.SearchEngine`.

    Args:
        cache: the vector cache.
        device: torch device string (``cuda``, ``cuda:1``, ``cpu``).
        rerank: candidates per requested hit before the exactness check.
        threads: CPU threads of the aggregation kernel.

    Raises:
        ImportError: torch is not installed.
    """

    name = "torch"
    exact = True
    code_kind = CodeKind.FLOAT32

    def __init__(
        self, cache: VectorCache, device: str = "cuda", rerank: int = 4, threads: int | None = None
    ) -> None:
        self.cache = cache
        self.scanner = TorchScanner(cache, device)
        self.refiner = Refiner(cache, self.scanner, rerank=rerank, threads=threads)

    @property
    def device(self) -> Any:
        """The ``torch.device`` scanned on."""
        return self.scanner.device

    @property
    def table(self) -> CodeTable:
        """The float32 code table (margins only: the device holds the vectors)."""
        return self.scanner.table

    @property
    def widened(self) -> int:
        """How many searches needed the proof's widening step."""
        return self.refiner.widened

    def nbytes(self) -> int:
        """Device memory held for the vectors and listing numbers, in bytes."""
        return self.scanner.nbytes()

    def search(self, queries: npt.ArrayLike, spec: SearchSpec) -> list[RawHits]:
        """Search ``(nq, d) float32`` queries; one :class:`RawHits` per query (exact answers).

        Raises:
            QueryError: bad query, spec or listing mask.
        """
        return self.refiner.search(queries, spec)
