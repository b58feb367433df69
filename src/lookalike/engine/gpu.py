"""The scan on a GPU through torch: same answers as the CPU engines.

:class:`TorchEngine` keeps a float32 copy of the vectors on the device (uploaded once, then
only appended rows), scores queries with one matrix product there, applies deletes and listing
filters on the device, and hands the dense scores (4 bytes per row) or the per-query top
candidates back to the CPU, where :class:`~lookalike.engine.fast.FastEngine`'s exact
re-scoring, per-listing aggregation and exactness proof run unchanged. The margin of the proof
is float32 summation error (``2 * gamma_d * ||x|| * ||q||``), plus ``2^-11 * ||x|| * ||q||``
when torch is allowed TF32 matrix products (``torch.backends.cuda.matmul.allow_tf32``).

It runs on any torch device; the tests run it on the CPU, so the same suite checks it on
machines without a GPU.
"""

from __future__ import annotations

import numpy as np

from .cache import VectorCache
from .codes import PreparedQuery
from .fast import FastEngine

#: Scores per device matrix product are computed in blocks of about this many bytes.
DEVICE_BLOCK_BYTES = 512 * 2**20


class TorchEngine(FastEngine):
    """Exact search with the scan on a torch device (``cuda`` by default).

    Args:
        cache: the vector cache.
        device: torch device string (``cuda``, ``cuda:1``, ``cpu``).
        rerank: candidates per requested hit before the exactness check.
    """

    name = "torch"

    def __init__(
        self, cache: VectorCache, device: str = "cuda", rerank: int = 4, threads: int | None = None
    ) -> None:
        super().__init__(cache, codes="float32", rerank=rerank, threads=threads)
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self._dev = torch.zeros((0, cache.dim), dtype=torch.float32, device=self.device)
        self._dev_codes = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._dev_layout = -1
        self._dev_n = 0

    def nbytes(self) -> int:
        """Device memory held for the vectors and listing codes, in bytes."""
        return int(self._dev.numel() * 4 + self._dev_codes.numel() * 8)

    def _sync_device(self) -> None:
        torch, cache = self.torch, self.cache
        n = cache.n_rows
        if self._dev_layout != cache.layout or n < self._dev_n:
            self._dev = torch.from_numpy(np.ascontiguousarray(cache.vectors)).to(self.device)
            self._dev_codes = torch.from_numpy(cache.codes.astype(np.int64)).to(self.device)
            self._dev_layout, self._dev_n = cache.layout, n
        elif n > self._dev_n:
            new = torch.from_numpy(np.ascontiguousarray(cache.vectors[self._dev_n : n]))
            self._dev = torch.cat([self._dev, new.to(self.device)])
            codes = torch.from_numpy(cache.codes[self._dev_n : n].astype(np.int64))
            self._dev_codes = torch.cat([self._dev_codes, codes.to(self.device)])
            self._dev_n = n

    def _keep(self, alive, lmask):
        """Device bool mask of rows to score, or None for all."""
        if alive is None and lmask is None:
            return None
        torch = self.torch
        keep = torch.ones(self.cache.n_rows, dtype=torch.bool, device=self.device)
        if alive is not None:
            keep &= torch.from_numpy(alive.view(bool).copy()).to(self.device)
        if lmask is not None:
            lm = torch.from_numpy(lmask[: len(self.cache.listings)].view(bool).copy())
            keep &= lm.to(self.device)[self._dev_codes]
        return keep

    def _tf32_margin(self, pq: PreparedQuery, q: np.ndarray) -> float:
        if self.device.type == "cuda" and self.torch.backends.cuda.matmul.allow_tf32:
            return 2.0**-11 * self.table.max_norm * float(np.linalg.norm(q))
        return 0.0

    def _scores(self, qs: np.ndarray, rows: slice, keep):
        torch = self.torch
        q = torch.from_numpy(np.ascontiguousarray(qs, dtype=np.float32)).to(self.device)
        s = self._dev[rows] @ q.T  # (b, nq) float32
        if keep is not None:
            s = torch.where(keep[rows, None], s, torch.tensor(-np.inf, device=self.device))
        return s

    def _dense(self, pq, alive, lmask, kk: int = 0):
        """Dense scores from the device (see :meth:`FastEngine._dense`)."""
        self._sync_device()
        pq.margin += self._tf32_margin(pq, pq.buf)
        keep = self._keep(alive, lmask)
        s = self._scores(pq.buf[None], slice(0, self.cache.n_rows), keep)[:, 0]
        out = self._scratch("dense", self.cache.n_rows, np.float32)
        out[:] = s.cpu().numpy()
        if not kk:
            return out
        vals, idx = self.torch.topk(s, min(kk, len(s)))
        vals, idx = vals.cpu().numpy(), idx.cpu().numpy().astype(np.int64)
        finite = vals > -np.inf
        return out, idx[finite], vals[finite]

    def _batch_candidates(self, q: np.ndarray, prepared, kk: int, alive, lmask, floors=None):
        """Per-query top ``kk`` candidates from device matrix products in row blocks (above
        ``floors[i]`` when given)."""
        torch, n = self.torch, self.cache.n_rows
        self._sync_device()
        for p, qv in zip(prepared, q, strict=True):
            p.margin += self._tf32_margin(p, qv)
        keep = self._keep(alive, lmask)
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
        vals = best_v.cpu().numpy()
        rows = best_i.cpu().numpy().astype(np.int64)
        low = -np.inf if floors is None else floors[:, None].astype(np.float32)
        counts = (vals > low).sum(axis=1).astype(np.int64)  # topk sorts: best first
        return rows, vals, counts
