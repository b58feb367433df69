"""Codes: the compact copies of the vectors that the scan reads, and their error bounds.

This module owns :class:`CodeTable` (codes of every cache row, kept in sync incrementally) and
:class:`PreparedQuery` (a query in the form a table's scan kernel wants, with its error margin).
It needs the compiled kernels (``_kernels``), so only the compiled engines import it.

Three kinds (:class:`~lookalike.types.CodeKind`), chosen per catalog:

* ``float32``: the cache's own row-major float32 array (no copy). Exact up to float rounding.
* ``float16``: IEEE half precision, packed 16 rows side by side (see ``_kernels.c``). Half the
  memory traffic of float32; relative rounding error <= 2^-11 per value.
* ``int8``: per-dimension symmetric scale, ``code = round(x_j * a_j)`` with
  ``a_j = 127 / max_i |x_ij|`` (fitted on the rows present when the table is built, refitted when
  the collection has doubled), stored as ``code + 128`` in bytes packed for AVX-512 VNNI.
  A quarter of the float32 traffic. The data scale is folded into the query: ``w_j = q_j / a_j``,
  quantized to int8 with one scale ``b = 127 / max_j |w_j|``.

Every code table gives, for each query, a **margin**: a rigorous bound on
``|scan score - exact float32 score|`` for every row. The engine uses it to re-score candidates
exactly and to prove that no row outside the candidates can enter the answer (see
``fast.py``). For int8, with ``xq_i`` the codes of row ``i``, ``e_i = x_i - xq_i / a`` its
rounding error, ``delta = w - wq / b`` the query's::

    exact - approx = sum_j xq_ij * delta_j + sum_j e_ij * q_j
    |exact - approx| <= max_i ||xq_i|| * ||delta|| + max_i ||e_i|| * ||q||   (Cauchy-Schwarz)

plus the float32 rounding of the exact score itself, ``gamma_d * max_i ||x_i|| * ||q||`` with
``gamma_d = d u / (1 - d u)``, ``u = 2^-24`` (Higham, *Accuracy and Stability of Numerical
Algorithms*, 2002, eq. 3.5), counted twice (scan and re-score).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import LookalikeError
from ..types import CodeKind, choices
from . import _kernels
from .cache import VectorCache

#: Rows per packed block (defined by the kernels).
BLOCK: int = _kernels.BLOCK
#: Kernel number of each code kind (defined by the kernels).
KINDS: dict[CodeKind, int] = {
    CodeKind.FLOAT32: _kernels.KIND_FLOAT32,
    CodeKind.FLOAT16: _kernels.KIND_FLOAT16,
    CodeKind.INT8: _kernels.KIND_INT8,
}
#: float32 unit roundoff (2^-24)
U32 = 2.0**-24
FLOAT16_MAX = 65504.0
#: Rows encoded per step (bounds the temporary arrays to a few tens of MB).
ENCODE_CHUNK = 16384


def gamma(d: int) -> float:
    """Higham's ``gamma_d = d u / (1 - d u)`` for float32: the relative error bound of a sum."""
    return d * U32 / (1 - d * U32)


@dataclass
class PreparedQuery:
    """A query in the form the scan kernel of a code table wants.

    Attributes:
        buf: ``(d,) float32`` (float32/float16 tables) or ``(dp,) int8`` (int8 tables).
        scale, offset: int8 score = ``(sum + offset) * scale``; 1 and 0 otherwise.
        margin: bound on ``|scan score - exact float32 score|`` for every row (score units;
            a scanner may add its own error, e.g. TF32 on a GPU).
    """

    buf: np.ndarray
    scale: float
    offset: float
    margin: float


class CodeTable:
    """Codes for every row of a :class:`VectorCache`, kept in sync incrementally.

    Args:
        kind: ``"float32"``, ``"float16"`` or ``"int8"`` (a :class:`CodeKind`).
        dim: vector dimension.

    Attributes:
        code_kind: the :class:`CodeKind`.
        kind: its kernel number (``_kernels.KIND_*``).
        max_norm: ``max_i ||x_i||`` over the encoded rows.

    Raises:
        LookalikeError: unknown kind.
    """

    def __init__(self, kind: str, dim: int) -> None:
        try:
            self.code_kind = CodeKind(kind)
        except ValueError:
            raise LookalikeError(
                f"unknown codes {kind!r}; use one of {', '.join(choices(CodeKind))}"
            ) from None
        self.kind = KINDS[self.code_kind]
        self.dim = dim
        self.dp = (dim + 3) // 4 * 4
        self._layout = -1
        self.n_encoded = 0
        self._n_at_fit = 0
        self._packed = np.zeros(0, dtype=np.uint8)
        self._scale = np.ones(dim, dtype=np.float32)  # int8: a_j
        self.max_norm = 0.0  # max_i ||x_i||
        self.max_code_norm = 0.0  # int8: max_i ||xq_i||
        self.max_err_norm = 0.0  # max_i ||x_i - decode(code_i)||
        self._cache_vectors: np.ndarray | None = None

    # ------------------------------------------------------------------ sync

    def sync(self, cache: VectorCache) -> None:
        """Encode rows added to ``cache`` since the last call; rebuild after a compaction, and
        refit the int8 scales when the collection has doubled since the last fit."""
        self._cache_vectors = cache.vectors
        n = cache.n_rows
        if (
            self._layout != cache.layout
            or n < self.n_encoded
            or (self.code_kind == CodeKind.INT8 and n > 2 * max(self._n_at_fit, 512))
        ):
            self._rebuild(cache)
        elif n > self.n_encoded:
            self._encode(cache.vectors, self.n_encoded, n)

    def _rebuild(self, cache: VectorCache) -> None:
        self._layout = cache.layout
        self.n_encoded = 0
        self.max_norm = self.max_code_norm = self.max_err_norm = 0.0
        x = cache.vectors
        if self.code_kind == CodeKind.INT8:
            maxabs = np.zeros(self.dim, dtype=np.float32)
            for a in range(0, len(x), ENCODE_CHUNK):
                np.maximum(maxabs, np.abs(x[a : a + ENCODE_CHUNK]).max(axis=0), out=maxabs)
            self._scale = np.where(
                maxabs > 0, np.float32(127.0) / np.maximum(maxabs, 1e-30), np.float32(1.0)
            ).astype(np.float32)
            self._n_at_fit = cache.n_rows
        self._packed = np.zeros(0, dtype=np.uint8)
        self._encode(x, 0, cache.n_rows)

    def _ensure_capacity(self, n: int) -> None:
        blocks = (n + BLOCK - 1) // BLOCK
        per_block = BLOCK * self.dim * 2 if self.kind == _kernels.KIND_FLOAT16 else BLOCK * self.dp
        need = blocks * per_block
        if self._packed.size < need:
            cap_blocks = max(blocks, int(self._packed.size / per_block * 1.5) + 64)
            grown = np.zeros(cap_blocks * per_block, dtype=np.uint8)
            grown[: self._packed.size] = self._packed
            self._packed = grown

    def _encode(self, x: np.ndarray, start: int, stop: int) -> None:
        """Encode rows ``start .. stop - 1`` of ``x`` (C kernels, all cores)."""
        if stop <= start:
            return
        if self.kind == _kernels.KIND_FLOAT32:
            for a in range(start, stop, ENCODE_CHUNK):  # bounded temporaries
                norms = np.linalg.norm(x[a : min(stop, a + ENCODE_CHUNK)], axis=1)
                self.max_norm = max(self.max_norm, float(norms.max()))
        else:
            self._ensure_capacity(stop)
            rows = np.ascontiguousarray(x[start:stop], dtype=np.float32)
            out = np.array([self.max_code_norm, self.max_err_norm, self.max_norm], np.float64)
            if self.kind == _kernels.KIND_INT8:
                _kernels.encode_i8(
                    rows, stop - start, self.dim, self._scale, self._packed, start, out
                )
            else:
                if np.abs(rows).max() > FLOAT16_MAX:
                    raise LookalikeError(
                        "vector values exceed the float16 range; use int8 or float32 codes"
                    )
                _kernels.encode_f16(rows, stop - start, self.dim, self._packed, start, out)
            self.max_code_norm, self.max_err_norm, self.max_norm = (float(v) for v in out)
        self.n_encoded = stop

    # ------------------------------------------------------------------ queries

    @property
    def data(self) -> np.ndarray:
        """The buffer the kernels scan (the cache's float32 array for ``float32``)."""
        if self.kind == _kernels.KIND_FLOAT32:
            assert self._cache_vectors is not None
            return self._cache_vectors
        return self._packed

    def prepare(self, q: np.ndarray) -> PreparedQuery:
        """Turn a ``(d,) float32`` query into the kernel's form, with its error margin (call
        :meth:`sync` first: the margin covers the rows encoded so far)."""
        qn = float(np.linalg.norm(q))
        rounding = 2 * gamma(self.dim) * self.max_norm * qn + 1e-7
        if self.kind == _kernels.KIND_FLOAT32:
            return PreparedQuery(np.ascontiguousarray(q, dtype=np.float32), 1.0, 0.0, rounding)
        if self.kind == _kernels.KIND_FLOAT16:
            margin = self.max_err_norm * qn + rounding
            return PreparedQuery(np.ascontiguousarray(q, dtype=np.float32), 1.0, 0.0, margin)
        w = q.astype(np.float64) / self._scale.astype(np.float64)
        top = float(np.abs(w).max())
        b = 127.0 / top if top > 0 else 1.0
        wq = np.rint(w * b)
        buf = np.zeros(self.dp, dtype=np.int8)
        buf[: self.dim] = wq.astype(np.int8)
        delta = float(np.linalg.norm(w - wq / b))
        margin = (self.max_code_norm * delta + self.max_err_norm * qn) * (1 + 1e-6) + rounding
        return PreparedQuery(buf, 1.0 / b, -128.0 * float(wq.sum()), margin)

    def nbytes(self) -> int:
        """Bytes held by the codes (0 for float32, which reads the cache's own array)."""
        return 0 if self.kind == _kernels.KIND_FLOAT32 else int(self._packed.nbytes)
