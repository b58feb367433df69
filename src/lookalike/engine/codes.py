"""Codes: the compact copies of the vectors that the scan reads, and their error bounds.

This module owns :class:`CodeTable` (codes of every cache row, kept in sync incrementally) and
:class:`PreparedQuery` (a query in the form a table's scan kernel wants, with its error margin).
It needs the compiled kernels (``_kernels``), so only the compiled engines import it.

Three kinds (:class:`~lookalike.types.CodeKind`), chosen per catalog:

* ``float32``: the cache's own row-major float32 array (no copy). Exact up to float rounding.
* ``float16``: IEEE half precision, packed 16 rows side by side (see ``_kernels.c``). Half the
  memory traffic of float32; relative rounding error <= 2^-11 per value.
* ``int8``: one byte a value, **affine per dimension**: ``x_ij = lo_j + step_j u_ij + e_ij``
  with the code ``u_ij = clamp(round((x_ij - lo_j) / step_j), 0, 255)``, ``lo_j``/``hi_j`` the
  smallest/largest value of dimension ``j`` and ``step_j = (hi_j - lo_j) / 255`` (the
  asymmetric "zero-point" quantization of Jacob et al., CVPR 2018, section 2.1). Every code
  uses all 256 levels of its dimension's own range, so one-sided data (real CNN features after
  ReLU and pooling, HOG, any non-negative vector) is coded twice as finely as by a symmetric
  scale ``127 / max |x_ij|``, which wastes the negative half. The fit (``lo``, ``step`` and the
  centre ``c_j = (mean_i x_ij - lo_j) / step_j``, the collection mean in code units) is made on
  the rows present when the table is built and refitted when the collection has doubled;
  later rows outside the range are clamped, and their larger error is part of the bound.
  A quarter of the float32 traffic, scanned with AVX-512 VNNI or AVX2 (``_kernels.c``).

**int8 scores.** With ``w_j = q_j step_j`` the score is
``q . x_i = q . lo + w . u_i + q . e_i``: ``q . lo`` is a per-query constant (the ranking of
``w . u_i`` is the ranking of the scores) and ``w . u_i`` is an integer product once ``w`` is
quantized. The query is split into two int8 vectors, as the Ozaki scheme splits a wide operand
into narrow slices (Ozaki, Ogita, Oishi, Rump, *Numerical Algorithms* 59, 2012)::

    hi = round(w b),   b = 64 / max_j |w_j|            r = w - hi / b       (coarse residual)
    lo = round(r b'),  b' = 64 / max_j |r_j|           delta = r - lo / b'  (fine residual)

(query codes in [-64, 64], so that AVX2's 16-bit ``VPMADDUBSW`` step, 2 * 255 * 64 < 2^15,
cannot saturate and every instruction set computes the same integer sums)

and the kernel computes exact int32 sums ``A_i = hi . u_i`` and ``L_i = lo . u_i``::

    fine   score  f_i = A_i / b + L_i / b' + q . lo + delta . c
    coarse score  g_i = A_i / b            + q . lo + r . c

Then ``q . x_i - f_i = delta . (u_i - c) + q . e_i`` exactly, so by Cauchy-Schwarz

    |q . x_i - f_i| <= ||delta|| max_i ||u_i - c|| + ||q|| max_i ||e_i||

and the same with ``r`` for ``g_i``. Centring the codes on the collection mean ``c`` (whose
term ``delta . c`` is added back exactly as part of the per-query constant) keeps
``||u_i - c||`` at the spread of the data instead of its offset, which on non-negative data
is most of its size. ``||delta|| ~ 2^-7 ||r||``, so the fine margin is almost only the data's
own rounding ``||q|| max ||e_i||``: on non-negative vectors about 3.2x below the former
symmetric scheme's (0.0059 against 0.019 for unit vectors at d = 512), on random ones about
1.7x (0.011 against 0.019). Single-query scans compute ``f_i`` for every row (the second
integer product per load is nearly free on a memory-bound scan); batches compute ``g_i`` and add the
``lo`` part only in blocks where some ``g_i`` could still enter the candidates (``_kernels.c``).

Every code table gives, for each query, a **margin**: a rigorous bound on
``|scan score - exact float32 score|`` for every row. The engine uses it to re-score candidates
exactly and to prove that no row outside the candidates can enter the answer (see
``refine.py``). Besides the terms above it counts the float32 evaluation of the scan score
(at most eight roundings, each relative to a magnitude <= ``M = 255 (sum |hi| / b + sum |lo|
/ b') + |q . lo + delta . c| + |q . lo + r . c|``, so ``16 u M`` with ``u = 2^-24``) and the
float32 rounding of the exact score itself, ``gamma_d * max_i ||x_i|| * ||q||`` with
``gamma_d = d u / (1 - d u)`` (Higham, *Accuracy and Stability of Numerical Algorithms*, 2002,
eq. 3.5), counted twice (scan and re-score). The norms are computed in double precision when
rows are encoded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
#: Largest query code: 2 * 255 * 64 < 2^15, so AVX2's int16 products cannot saturate.
QUERY_LEVELS = 64
#: int8 sums stay exact in int32 up to this dimension (255 * 64 * d < 2^31).
MAX_INT8_DIM = 131072
#: Parameters per query of the kernels (``PreparedQuery.params``).
QPARAMS: int = _kernels.QPARAMS


def gamma(d: int) -> float:
    """Higham's ``gamma_d = d u / (1 - d u)`` for float32: the relative error bound of a sum."""
    return d * U32 / (1 - d * U32)


@dataclass
class PreparedQuery:
    """A query in the form the scan kernel of a code table wants.

    Attributes:
        buf: ``(d,) float32`` (float32/float16 tables) or ``(2 * dp,) int8`` (int8 tables: the
            ``hi`` then the ``lo`` part, see the module docstring).
        scale, offset: int8 fine score = ``A * scale + L * scale_lo + offset``; 1 and 0 for
            float tables, whose score is the plain sum.
        margin: bound on ``|scan score - exact float32 score|`` for every row (score units;
            a scanner may add its own error, e.g. TF32 on a GPU).
        scale_lo: int8: the ``lo`` part's scale ``1 / b'``.
        coarse_offset: int8 coarse score = ``A * scale + coarse_offset``.
        coarse_margin: the bound for coarse scores (>= ``margin``).
        gap: ``coarse_margin - margin`` plus the float32 rounding of the kernel's comparison:
            a block whose coarse scores are all <= ``floor - gap`` holds no row whose fine
            score could matter above ``floor``.
    """

    buf: np.ndarray
    scale: float
    offset: float
    margin: float
    scale_lo: float = 0.0
    coarse_offset: float = 0.0
    coarse_margin: float = 0.0
    gap: float = 0.0

    def params(self) -> np.ndarray:
        """The kernels' per-query parameters: ``(QPARAMS,) float64`` (``_kernels.c``)."""
        return np.array(
            [self.scale, self.scale_lo, self.offset, self.coarse_offset, self.gap],
            dtype=np.float64,
        )


class CodeTable:
    """Codes for every row of a :class:`VectorCache`, kept in sync incrementally.

    The state is a few numpy arrays and scalars: the packed codes, the int8 fit (``lo``,
    ``step``, ``centre``: ``(d,) float64`` each) and the norms of the bound.

    Args:
        kind: ``"float32"``, ``"float16"`` or ``"int8"`` (a :class:`CodeKind`).
        dim: vector dimension.

    Attributes:
        code_kind: the :class:`CodeKind`.
        kind: its kernel number (``_kernels.KIND_*``).
        max_norm: ``max_i ||x_i||`` over the encoded rows.
        max_code_norm: int8: ``max_i ||u_i - centre||`` (code units).
        max_err_norm: ``max_i ||x_i - decode(code_i)||`` (int8, float16).
        n_at_fit: rows present at the last int8 fit.

    Raises:
        LookalikeError: unknown kind, or int8 codes of more than ``MAX_INT8_DIM`` dimensions.
    """

    def __init__(self, kind: str, dim: int) -> None:
        try:
            self.code_kind = CodeKind(kind)
        except ValueError:
            raise LookalikeError(
                f"unknown codes {kind!r}; use one of {', '.join(choices(CodeKind))}"
            ) from None
        if self.code_kind == CodeKind.INT8 and dim > MAX_INT8_DIM:
            raise LookalikeError(
                f"int8 codes support at most {MAX_INT8_DIM} dimensions; use float16 codes"
            )
        self.kind = KINDS[self.code_kind]
        self.dim = dim
        self.dp = (dim + 3) // 4 * 4
        self._layout = -1
        self.n_encoded = 0
        self.n_at_fit = 0
        self._packed = np.zeros(0, dtype=np.uint8)
        # int8 fit: lo, step, centre (rows of one (3, d) float64 array, as the kernel reads it)
        self._fit = np.zeros((3, dim), dtype=np.float64)
        self._fit[1] = 1.0
        self.max_norm = 0.0  # max_i ||x_i||
        self.max_code_norm = 0.0  # int8: max_i ||u_i - centre||
        self.max_err_norm = 0.0  # max_i ||x_i - decode(code_i)||
        self._cache_vectors: np.ndarray | None = None

    @property
    def fit(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """int8: ``lo``, ``step`` and ``centre``, ``(d,) float64`` each (read-only views):
        ``x_j ~ lo_j + step_j * u_j``, ``centre`` the fitted rows' mean in code units."""
        view = self._fit.view()
        view.flags.writeable = False
        return view[0], view[1], view[2]

    # ------------------------------------------------------------------ sync

    def sync(self, cache: VectorCache) -> None:
        """Encode rows added to ``cache`` since the last call; rebuild after a compaction, and
        refit the int8 ranges and centre when the collection has doubled since the last fit."""
        self._cache_vectors = cache.vectors
        n = cache.n_rows
        if (
            self._layout != cache.layout
            or n < self.n_encoded
            or (self.code_kind == CodeKind.INT8 and n > 2 * max(self.n_at_fit, 512))
        ):
            self._rebuild(cache)
        elif n > self.n_encoded:
            self._encode(cache.vectors, self.n_encoded, n)

    def _rebuild(self, cache: VectorCache) -> None:
        self._layout = cache.layout
        self.n_encoded = 0
        self.max_norm = self.max_code_norm = self.max_err_norm = 0.0
        x = cache.vectors[: cache.n_rows]
        if self.code_kind == CodeKind.INT8:
            self._fit = fit_affine(x, self.dim)
            self.n_at_fit = cache.n_rows
        self._packed = np.zeros(0, dtype=np.uint8)
        self._encode(x, 0, cache.n_rows)

    def packed_bytes(self, n: int) -> int:
        """Bytes of packed codes that hold rows ``0 .. n - 1`` (whole blocks of
        :data:`BLOCK` rows; 0 for ``float32``)."""
        if self.kind == _kernels.KIND_FLOAT32:
            return 0
        per_block = BLOCK * self.dim * 2 if self.kind == _kernels.KIND_FLOAT16 else BLOCK * self.dp
        return (n + BLOCK - 1) // BLOCK * per_block

    @property
    def layout(self) -> int:
        """The ``layout`` of the cache whose rows the codes hold (-1 before the first sync)."""
        return self._layout

    def state(self, n: int) -> tuple[dict[str, Any], np.ndarray]:
        """What :meth:`restore` needs to scan the first rows without encoding them again:
        JSON-ready scalars (kind, dim, rows, the int8 fit, the norms of the bound) and the
        packed codes, ``(packed_bytes(m),) uint8`` (a view), for the ``m`` rows of the whole
        :data:`BLOCK`-row blocks among the first ``min(n, n_encoded)`` (a partial block may
        still be written by a later encode; whole ones never are, until a rebuild makes a
        new array).

        The norms are maxima over every encoded row, so they bound the first ``m`` too (a
        bound that is larger than needed keeps answers exact).

        Raises:
            ValueError: the table is ``float32`` (it has no codes).
        """
        if self.kind == _kernels.KIND_FLOAT32:
            raise ValueError("a float32 table has no codes to save")
        n = min(n, self.n_encoded) // BLOCK * BLOCK
        meta = {
            "kind": str(self.code_kind),
            "dim": self.dim,
            "n_encoded": n,
            "n_at_fit": self.n_at_fit,
            "fit": self._fit.tolist(),  # float64 -> JSON numbers: repr round-trips exactly
            "max_norm": self.max_norm,
            "max_code_norm": self.max_code_norm,
            "max_err_norm": self.max_err_norm,
        }
        return meta, self._packed[: self.packed_bytes(n)]

    def restore(self, meta: dict[str, Any], packed: np.ndarray, layout: int) -> None:
        """Take a state from :meth:`state` (codes of the first ``meta["n_encoded"]`` rows of a
        cache whose ``layout`` is ``layout``); later rows are encoded by :meth:`sync` as usual.
        ``packed`` is used as it is (e.g. a copy-on-write memory map) until the table grows.

        Raises:
            ValueError: the state is of another kind or dimension, or its sizes disagree.
        """
        n = int(meta["n_encoded"])
        if meta["kind"] != str(self.code_kind) or int(meta["dim"]) != self.dim or n < 0:
            raise ValueError(f"codes of {meta['kind']} d={meta['dim']} do not fit this table")
        if packed.dtype != np.uint8 or packed.ndim != 1 or len(packed) < self.packed_bytes(n):
            raise ValueError(f"{len(packed)} bytes of codes cannot hold {n} rows")
        fit = np.asarray(meta["fit"], dtype=np.float64)
        if fit.shape != (3, self.dim):
            raise ValueError(f"an int8 fit of shape {fit.shape}")
        self._fit = np.ascontiguousarray(fit)
        self.n_at_fit = int(meta["n_at_fit"])
        self.max_norm = float(meta["max_norm"])
        self.max_code_norm = float(meta["max_code_norm"])
        self.max_err_norm = float(meta["max_err_norm"])
        self._packed = packed
        self.n_encoded = n
        self._layout = layout

    def _ensure_capacity(self, n: int) -> None:
        need = self.packed_bytes(n)
        per_block = self.packed_bytes(1)
        if self._packed.size < need:
            cap_blocks = max(need // per_block, int(self._packed.size / per_block * 1.5) + 64)
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
                m = stop - start
                _kernels.encode_i8(rows, m, self.dim, self._fit, self._packed, start, out)
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
        """Turn a ``(d,) float32`` query into the kernel's form, with its error margin
        (:meth:`prepare_many` of one query)."""
        return self.prepare_many(q[None])[0]

    def prepare_many(self, q: np.ndarray) -> list[PreparedQuery]:
        """Turn ``(m, d) float32`` queries into the kernel's form, each with its error margin
        (call :meth:`sync` first: the margins cover the rows encoded so far). The derivation is
        in the module docstring; the arithmetic runs on all queries at once (float64)."""
        q = np.asarray(q, dtype=np.float32).reshape(-1, self.dim)
        q64 = q.astype(np.float64)
        qn = np.sqrt((q64 * q64).sum(axis=1))
        rounding = 2 * gamma(self.dim) * self.max_norm * qn + 1e-7
        if self.kind != _kernels.KIND_INT8:
            margin = rounding
            if self.kind == _kernels.KIND_FLOAT16:
                margin = self.max_err_norm * qn + rounding
            return [
                PreparedQuery(np.ascontiguousarray(v), 1.0, 0.0, float(m))
                for v, m in zip(q, margin, strict=True)
            ]
        lo, step, centre = self._fit
        hi, b, r = _split(q64 * step)
        low, b_lo, delta = _split(r)
        base = q64 @ lo
        fine_bias = base + delta @ centre
        coarse_bias = base + r @ centre
        data_term = self.max_err_norm * qn
        magnitude = (
            255.0 * (np.abs(hi).sum(axis=1) / b + np.abs(low).sum(axis=1) / b_lo)
            + np.abs(fine_bias)
            + np.abs(coarse_bias)
        )
        evaluation = 16 * U32 * magnitude
        slack = 1 + 1e-6  # the norms' own double-precision rounding
        fine = (self.max_code_norm * np.sqrt((delta * delta).sum(axis=1)) + data_term) * slack
        coarse = (self.max_code_norm * np.sqrt((r * r).sum(axis=1)) + data_term) * slack
        margin = fine + evaluation + rounding
        coarse_margin = coarse + evaluation + rounding
        # the kernel compares coarse scores with floor - gap in float32: |floor| is at most
        # a score plus its margin
        compare = 4 * U32 * (self.max_norm * qn + coarse_margin)
        gap = coarse_margin - margin + compare
        bufs = np.zeros((len(q), 2 * self.dp), dtype=np.int8)
        bufs[:, : self.dim] = hi
        bufs[:, self.dp : self.dp + self.dim] = low
        return [
            PreparedQuery(
                bufs[i],
                1.0 / float(b[i]),
                float(fine_bias[i]),
                float(margin[i]),
                scale_lo=1.0 / float(b_lo[i]),
                coarse_offset=float(coarse_bias[i]),
                coarse_margin=float(coarse_margin[i]),
                gap=float(gap[i]),
            )
            for i in range(len(q))
        ]

    def nbytes(self) -> int:
        """Bytes held by the codes (0 for float32, which reads the cache's own array)."""
        return 0 if self.kind == _kernels.KIND_FLOAT32 else int(self._packed.nbytes)


def _split(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``w`` ``(m, d) float64`` -> integer codes ``round(w b)`` in ``[-QUERY_LEVELS,
    QUERY_LEVELS]`` ``(m, d) float64``, the scales ``b = QUERY_LEVELS / max |w|`` ``(m,)``
    (1 for a zero row) and the residuals ``w - codes / b`` ``(m, d)``."""
    top = np.abs(w).max(axis=1, initial=0.0)
    b = np.divide(QUERY_LEVELS, top, out=np.ones_like(top), where=top > 0)
    codes = np.rint(w * b[:, None])
    np.clip(codes, -QUERY_LEVELS, QUERY_LEVELS, out=codes)
    return codes, b, w - codes / b[:, None]


def fit_affine(x: np.ndarray, dim: int) -> np.ndarray:
    """The int8 fit of rows ``x`` ``(n, d) float32``: ``(3, d) float64`` rows ``lo`` (smallest
    value per dimension), ``step`` (``(hi - lo) / 255``; for a constant dimension the largest
    step of the others, so later rows that do vary are still coded) and ``centre`` (the mean in
    code units). Read in chunks of ``ENCODE_CHUNK`` rows (bounded temporaries)."""
    fit = np.zeros((3, dim), dtype=np.float64)
    fit[1] = 1.0
    if len(x) == 0:
        return fit
    lo = np.full(dim, np.inf)
    hi = np.full(dim, -np.inf)
    total = np.zeros(dim)
    for a in range(0, len(x), ENCODE_CHUNK):
        chunk = x[a : a + ENCODE_CHUNK]
        np.minimum(lo, chunk.min(axis=0), out=lo)
        np.maximum(hi, chunk.max(axis=0), out=hi)
        total += chunk.sum(axis=0, dtype=np.float64)
    span = hi - lo
    widest = float(span.max())
    step = np.where(span > 0, span / 255.0, widest / 255.0 if widest > 0 else 1.0)
    fit[0] = lo
    fit[1] = step
    fit[2] = (total / len(x) - lo) / step
    return fit
