"""Type stub of the compiled scan kernels (``_kernels.c``).

Every function takes its arguments positionally. Arrays must be C-contiguous with exactly the
dtype given (the C code reads raw buffers and checks only their byte length); outputs are
written in place. ``n`` rows, ``d`` dimensions, ``dp = 4 * ceil(d / 4)``, ``L`` listings.
"""

from typing import Final, TypedDict

import numpy as np
import numpy.typing as npt

#: Rows per packed block of a code table (rows side by side in one AVX-512 register).
BLOCK: Final[int]
#: Queries scored together per pass over a block by ``topk_batch``.
QUERY_BLOCK: Final[int]
#: Largest ``top_n`` that ``segments_agg`` accepts.
MAX_TOP_N: Final[int]
#: Parameters per query (``qparams``): scale, scale_lo, bias, coarse bias, gap (``codes.py``).
QPARAMS: Final[int]
#: Code kinds (``kind`` arguments).
KIND_FLOAT32: Final[int]
KIND_FLOAT16: Final[int]
KIND_INT8: Final[int]
#: Per-listing aggregations (``agg`` argument of ``segments_agg``).
AGG_MAX: Final[int]
AGG_MEAN: Final[int]
AGG_SUM_TOP_N: Final[int]

_Table = npt.NDArray[np.float32] | npt.NDArray[np.uint8]
_Query = npt.NDArray[np.float32] | npt.NDArray[np.int8]

class _Info(TypedDict):
    isa: str
    openmp: int
    max_threads: int

def set_isa(name: str, /) -> None:
    """Select the kernels: ``"auto"`` (the best this CPU supports) or one of :func:`isas`.

    Raises:
        ValueError: an unknown name, or one this CPU does not support.
    """

def isas() -> list[str]:
    """The kernel instruction sets this CPU supports: ``generic``, ``avx2``, ``avx512-vnni``,
    ``avx512-amx`` (AMX-INT8 tiles for the batch scan, where Linux grants the tile state)."""

def info() -> _Info:
    """The instruction set in use (``avx512-amx``, ``avx512-vnni``, ``avx2`` or ``generic``)
    and OpenMP threads."""

def dot_rows(
    x: npt.NDArray[np.float32],
    n: int,
    d: int,
    rows: npt.NDArray[np.int64],
    q: npt.NDArray[np.float32],
    out: npt.NDArray[np.float32],
    /,
) -> None:
    """``out[i] = x[rows[i]] . q`` in float32: ``x`` ``(n, d)``, ``rows`` ``(m,)``, ``q``
    ``(d,)``, ``out`` ``(m,)``.

    Raises:
        ValueError: buffers too small.
        IndexError: a row outside ``[0, n)``.
    """

def encode_i8(
    x: npt.NDArray[np.float32],
    m: int,
    d: int,
    fit: npt.NDArray[np.float64],
    packed: npt.NDArray[np.uint8],
    start: int,
    norms: npt.NDArray[np.float64],
    /,
) -> None:
    """Pack ``x`` ``(m, d)`` as rows ``start .. start + m - 1`` of an int8 table: ``fit``
    ``(3, d)`` holds ``lo``, ``step`` and ``centre`` (codes ``u = clamp(rint((x - lo) / step), 0,
    255)``), and ``norms`` ``(3,)`` is raised to the largest ``||u_i - centre||``, rounding-error
    norm ``||x_i - lo - step u_i||`` and vector norm.

    Raises:
        ValueError: bad sizes.
    """

def encode_f16(
    x: npt.NDArray[np.float32],
    m: int,
    d: int,
    packed: npt.NDArray[np.uint8],
    start: int,
    norms: npt.NDArray[np.float64],
    /,
) -> None:
    """Pack ``x`` ``(m, d)`` as rows ``start .. start + m - 1`` of a float16 table; ``norms``
    as for :func:`encode_i8` (``norms[0]`` unchanged).

    Raises:
        ValueError: bad sizes.
    """

def scores(
    kind: int,
    data: _Table,
    n: int,
    d: int,
    query: _Query,
    qparams: npt.NDArray[np.float64],
    row_listing: npt.NDArray[np.int32] | None,
    lmask: npt.NDArray[np.uint8] | None,
    alive: npt.NDArray[np.uint8] | None,
    n_listings: int,
    out: npt.NDArray[np.float32],
    threads: int,
    kk: int,
    out_rows: npt.NDArray[np.int64] | None,
    out_scores: npt.NDArray[np.float32] | None,
    /,
) -> int:
    """Scan scores of one query against every row of a code table.

    Args:
        kind: ``KIND_*`` of ``data`` (float32 ``(n, d)``, or a packed uint8 table).
        query: ``(d,) float32`` (float tables) or ``(2 * dp,) int8`` (int8 tables: hi, lo).
        qparams: ``(QPARAMS,) float64``; int8 score = ``A * scale + L * scale_lo + bias``
            with ``A``, ``L`` the integer sums of the hi and lo parts (``codes.py``).
        row_listing: ``(n,) int32`` listing number of each row (needed with ``lmask``).
        lmask: ``(n_listings + 3,) uint8`` keep flag per listing (3 bytes of padding).
        alive: ``(n,) uint8`` live flag per row.
        out: ``(n,) float32`` scores, ``-inf`` for excluded rows.
        kk: with ``kk > 0``, also the ``kk`` best rows into ``out_rows`` ``(kk,) int64`` and
            ``out_scores`` ``(kk,) float32`` (unordered).

    Returns:
        How many best rows were written (0 when ``kk == 0``).

    Raises:
        ValueError: bad kind, sizes or buffers.
    """

def topk_batch(
    kind: int,
    data: _Table,
    n: int,
    d: int,
    queries: _Query,
    qparams: npt.NDArray[np.float64],
    nq: int,
    row_listing: npt.NDArray[np.int32] | None,
    lmask: npt.NDArray[np.uint8] | None,
    alive: npt.NDArray[np.uint8] | None,
    n_listings: int,
    kk: int,
    out_rows: npt.NDArray[np.int64],
    out_scores: npt.NDArray[np.float32],
    out_counts: npt.NDArray[np.int64],
    threads: int,
    floors: npt.NDArray[np.float64] | None = None,
    /,
) -> None:
    """The ``kk`` best rows of each of ``nq`` queries (unordered), data read once per
    ``QUERY_BLOCK`` queries (int8: coarse scores first, fine ones only in blocks that can
    matter, see ``_kernels.c``).

    ``queries`` ``(nq, d) float32`` or ``(nq, 2 * dp) int8``; ``qparams`` ``(nq, QPARAMS)``;
    outputs ``(nq, kk)`` rows and scores and ``(nq,)`` counts (valid entries first); with
    ``floors`` ``(nq,)`` only rows scoring above ``floors[i]`` are kept. Other arguments as
    for :func:`scores`.

    Raises:
        ValueError: bad kind, ``nq``, ``kk`` or sizes.
    """

def topk_values(
    values: npt.NDArray[np.float32],
    kk: int,
    out_rows: npt.NDArray[np.int64],
    out_scores: npt.NDArray[np.float32],
    /,
) -> int:
    """The ``kk`` largest finite entries of ``values`` ``(n,)`` (unordered): indices into
    ``out_rows`` ``(kk,)``, values into ``out_scores`` ``(kk,)``; returns how many.

    Raises:
        ValueError: ``kk < 1`` or outputs too small.
    """

def segments_agg(
    scores: npt.NDArray[np.float32],
    starts: npt.NDArray[np.int64],
    seg_listing: npt.NDArray[np.int32],
    n_listings: int,
    agg: int,
    top_n: int,
    unique: int,
    out_agg: npt.NDArray[np.float32],
    out_count: npt.NDArray[np.int32],
    out_best: npt.NDArray[np.int64],
    threads: int,
    /,
) -> None:
    """Per-listing aggregation of dense scores over segments (runs of rows of one listing).

    ``scores`` ``(n,)`` (``-inf`` rows skipped), ``starts`` ``(S + 1,)``, ``seg_listing``
    ``(S,)`` listing number of each segment, ``agg`` an ``AGG_*`` value, ``1 <= top_n <=
    MAX_TOP_N``, ``unique`` 1 when no listing has two segments; outputs ``(n_listings,)``:
    aggregate (``-inf`` when nothing scored), scored-row count, first best row (-1).

    Raises:
        ValueError: bad ``agg``/``top_n`` or sizes.
    """

def read_bandwidth(buffer: npt.NDArray[np.generic], threads: int, repeats: int, /) -> int:
    """Stream ``buffer`` ``repeats`` times on ``threads`` threads; returns a checksum (so the
    reads cannot be optimized away). Used to measure memory read bandwidth."""
