/*
 * lookalike scan kernels: inner products of one or many queries with every row of a table of
 * codes, multi-threaded over rows (OpenMP), with top-k selection by per-thread reservoirs and a
 * per-listing aggregation pass. Built by the package's own setuptools build; Python falls back
 * to numpy (with a warning) when this module is missing.
 *
 * Code layouts (n rows, d dims; rows are grouped in blocks of BLOCK = 16):
 *   KIND_FLOAT32  row-major float32, n x d (the engine's float32 copy, no extra memory)
 *   KIND_FLOAT16  packed float16: block b, dim j, slot s at ((b * d) + j) * 16 + s
 *   KIND_INT8     packed uint8 codes u in [0, 255] (affine per dimension: x_j ~ lo_j + step_j u_j,
 *             see codes.py), d padded to dp = 4 * ceil(d / 4):
 *             block b, dim group g = j / 4, slot s, byte j % 4 at
 *             ((b * dp / 4 + g) * 16 + s) * 4 + j % 4
 * The packed layouts put 16 rows side by side, so one AVX-512 instruction works on 16 rows:
 * for int8, VPDPBUSD multiplies 64 unsigned code bytes (16 rows x 4 dims) by 4 signed query
 * bytes broadcast to every row and accumulates 16 int32 sums, with no horizontal reduction
 * (the layout used by oneDNN's VNNI GEMM kernels).
 *
 * An int8 query is two int8 vectors, hi and lo (the query split into a coarse part and its
 * rounding residual, as in the Ozaki scheme's splitting of a wide operand into narrow slices;
 * Ozaki, Ogita, Oishi, Rump, Numer. Algorithms 59, 2012), with per-query float parameters
 * (QP_* below). With A = sum_j hi_j u_j and L = sum_j lo_j u_j (exact int32 sums):
 *   fine score   = A * scale + L * scale_lo + bias      (every single-query kernel)
 *   coarse score = A * scale + bias_coarse               (first pass of topk_batch)
 * A single query is memory-bound, so it pays for the second VPDPBUSD per load with nothing but
 * spare cycles. A batch is compute-bound: topk_batch scores 16 queries coarsely, and adds the lo
 * part only for the (query, block) pairs where some coarse score exceeds the query's reservoir
 * floor minus `gap` (the difference of the two error margins, codes.py): a row below that
 * cannot enter the candidates with its fine score either, so the answer's proof is unchanged,
 * and once the reservoirs have filled almost no block needs the second pass. With AMX tiles a
 * batch is bound by memory bandwidth instead, and topk_batch computes both parts for every row
 * (amx_sums below).
 *
 * Excluded rows (deleted, or their listing filtered out) get the score -INFINITY in dense
 * output and never enter a top-k reservoir. The filter is checked only for rows whose score
 * would enter a reservoir, so an unselective scan pays nothing for it.
 *
 * Dispatch: AVX-512 (F, BW, VL, VNNI, F16C, FMA) and AVX2 (+ FMA, F16C) paths are compiled
 * with target attributes and chosen at run time with __builtin_cpu_supports; every kernel has a
 * portable C fallback. On CPUs with AMX-INT8 (Intel Sapphire Rapids and later), when Linux
 * grants the tile state, topk_batch computes the int32 sums of both query parts with tile
 * instructions instead (amx_sums below; the same sums, so the same answers). LOOKALIKE_KERNEL_ISA=
 * generic|avx2|avx512-vnni|avx512-amx (or set_isa) picks one (the tests run every path the CPU
 * has).
 *
 * The module exports its constants (BLOCK, QUERY_BLOCK, MAX_TOP_N, QPARAMS, KIND_*, AGG_*) as
 * ints, so Python reads them from here instead of keeping copies; _kernels.pyi types every
 * function.
 * Naming: "codes" are only the compressed vectors of a table; the listing number of each row
 * (a position in the engine's listing table) is `row_listing`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LK_X86 1
#include <immintrin.h>
#define LK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#define LK_AVX2 __attribute__((target("avx2,f16c,fma")))
/* acc += VPDPBUSD(v, the 4 bytes at p broadcast to 16 lanes). Inline assembly because GCC 12
 * compiles _mm512_dpbusd_epi32 in a loop into a register-to-register copy of the accumulator
 * per step (VMOVDQA on the same vector ports, on the dependency chain); see coarse8_avx512. */
#define LK_DPB(acc, v, p)                                                                      \
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(v), "m"(*(const int32_t *)(p)))
#else
#define LK_X86 0
#endif

/* AMX needs a compiler that knows the tile instructions (GCC 11, Clang 12) and Linux, which
 * hands the tile state to a process on request (arch_prctl ARCH_REQ_XCOMP_PERM, Linux 5.16). */
#if LK_X86 && defined(__linux__) &&                                                            \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && __GNUC__ >= 11))
#define LK_AMX_BUILD 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LK_AMX                                                                                 \
    __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")))
#else
#define LK_AMX_BUILD 0
#endif

#define BLOCK 16
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 4096
#endif
enum { KIND_FLOAT32 = 0, KIND_FLOAT16 = 1, KIND_INT8 = 2 };
enum { AGG_MAX = 0, AGG_MEAN = 1, AGG_SUM_TOP_N = 2 };

static int use_avx512 = 0;
static int use_avx2 = 0; /* AVX2 + FMA + F16C, used when AVX-512 is not */
static int use_amx = 0;  /* AMX-INT8 for the int8 sums of topk_batch (implies use_avx512) */

/* ------------------------------------------------------------------------------------------ */
/* tables, filters, reservoirs                                                                 */

typedef struct {
    int kind;
    const void *data;
    int64_t n, d, dp;       /* dp: padded dimension of int8 tables */
    const int32_t *row_listing; /* listing number of each row, or NULL */
    const uint8_t *lmask;   /* keep flag per listing number, or NULL */
    const uint8_t *alive;   /* live flag per row, or NULL */
} Table;

/* Per-query parameters, float64 [nq][QP_COUNT] from Python (int8 tables; 1, 0, 0, 0, 0 else). */
enum { QP_SCALE = 0, QP_SCALE_LO = 1, QP_BIAS = 2, QP_BIAS_COARSE = 3, QP_GAP = 4, QP_COUNT = 5 };

typedef struct {
    const float *f;         /* float query (F32, F16) */
    const int8_t *i8;       /* int8 query hi part, dp bytes (I8) */
    const int8_t *i8lo;     /* int8 query lo part, dp bytes (I8) */
    float scale, scale_lo;  /* I8 fine score = A * scale + L * scale_lo + bias */
    float bias, bias_coarse; /* I8 coarse score = A * scale + bias_coarse */
    float gap;              /* a block needs its fine scores when a coarse one > floor - gap */
} Query;

static inline int row_ok(const Table *t, int64_t i) {
    if (t->alive && !t->alive[i]) return 0;
    if (t->lmask && !t->lmask[t->row_listing[i]]) return 0;
    return 1;
}

/* Top-`cap` selection by a reservoir (what faiss calls ReservoirTopN): candidates above the
 * current floor are appended to a buffer of 2 * cap; when it is full, a quickselect keeps the
 * best cap and raises the floor to the weakest kept. Amortised O(1) per candidate, against
 * O(log cap) for a binary heap, which matters when many candidates arrive (large cap, short
 * scans). The buffers s and r hold 2 * cap entries; call reservoir_finish before reading them. */
typedef struct {
    float *s;               /* scores, 2 * cap slots */
    int64_t *r;             /* row (or index) of each score */
    int64_t size, cap;      /* entries held; entries kept at a trim */
    float floor;            /* only scores above it are taken: the weakest kept at the last trim */
} Reservoir;

/* Reorder s[0..n) (with r) so that s[0..k) are the k largest values. */
static void select_top(float *s, int64_t *r, int64_t n, int64_t k) {
    int64_t lo = 0, hi = n - 1;
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo) / 2;
        float a = s[lo], b = s[mid], c = s[hi]; /* median of three */
        const float pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        int64_t i = lo, j = hi;
        while (i <= j) {
            while (s[i] > pivot) i++;
            while (s[j] < pivot) j--;
            if (i <= j) {
                float ts = s[i];
                s[i] = s[j];
                s[j] = ts;
                int64_t tr = r[i];
                r[i] = r[j];
                r[j] = tr;
                i++;
                j--;
            }
        }
        if (k - 1 <= j) {
            hi = j;
        } else if (k - 1 >= i) {
            lo = i;
        } else {
            break;
        }
    }
}

static void reservoir_trim(Reservoir *h) {
    if (h->size <= h->cap) return;
    select_top(h->s, h->r, h->size, h->cap);
    h->size = h->cap;
    float f = h->s[0];
    for (int64_t e = 1; e < h->cap; e++)
        if (h->s[e] < f) f = h->s[e];
    h->floor = f;
}

static inline void reservoir_push(Reservoir *h, float s, int64_t r) {
    if (!(s > h->floor)) return;
    h->s[h->size] = s;
    h->r[h->size] = r;
    if (++h->size == 2 * h->cap) reservoir_trim(h);
}

static inline float reservoir_floor(const Reservoir *h) { return h->floor; }

/* Keep the best cap entries; afterwards s[0..size) are the result (unordered). */
static inline void reservoir_finish(Reservoir *h) { reservoir_trim(h); }

#if LK_X86
/* Bit s set when sc[s] > floor: one vector compare instead of 16 scalar ones. */
__attribute__((target("avx512f"))) static unsigned above_floor(const float *sc, float floor) {
    return _mm512_cmp_ps_mask(_mm512_loadu_ps(sc), _mm512_set1_ps(floor), _CMP_GT_OQ);
}
#endif

#if LK_X86
LK_AVX2 static unsigned above_floor_avx2(const float *sc, float floor) {
    const __m256 f = _mm256_set1_ps(floor);
    const unsigned lo = (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(sc), f, _CMP_GT_OQ));
    const unsigned hi =
        (unsigned)_mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(sc + 8), f, _CMP_GT_OQ));
    return lo | (hi << 8);
}
#endif

/* Bit s set when sc[s] > floor, for the 16 scores of a block. */
static inline unsigned block_above(const float *sc, float floor) {
#if LK_X86
    if (use_avx512) return above_floor(sc, floor);
    if (use_avx2) return above_floor_avx2(sc, floor);
#endif
    unsigned m = 0;
    for (int s = 0; s < BLOCK; s++)
        if (sc[s] > floor) m |= 1u << s;
    return m;
}

/* Offer the scores sc[s] of block b (rows b*16 ..) with bit s set in m, the ones above the
 * reservoir's floor, to the reservoir; only they are checked against the filter. */
static inline void offer_above(Reservoir *h, const Table *t, int64_t b, const float *sc,
                               unsigned m) {
    while (m) {
        const int s = __builtin_ctz(m);
        m &= m - 1;
        const int64_t i = b * BLOCK + s;
        if (i >= t->n) break;
        if (sc[s] > reservoir_floor(h) && row_ok(t, i)) reservoir_push(h, sc[s], i);
    }
}

/* Offer 16 scores of block b to a reservoir (see offer_above). */
static inline void offer_block(Reservoir *h, const Table *t, int64_t b, const float *sc) {
    /* usually 0 once the reservoir has filled */
    offer_above(h, t, b, sc, block_above(sc, reservoir_floor(h)));
}

/* ------------------------------------------------------------------------------------------ */
/* block scores: 16 rows of block b against one query -> sc[16]                                 */

/* int32 sums of int8 query bytes qq (dp) with the 16 code rows of block b */
static void i8_sums_generic(const Table *t, const int8_t *qq, int64_t b, int32_t *acc) {
    const int64_t groups = t->dp / 4;
    const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
    for (int s = 0; s < BLOCK; s++) acc[s] = 0;
    for (int64_t g = 0; g < groups; g++) {
        const uint8_t *blk = x + g * 64;
        const int8_t *w = qq + g * 4;
        for (int s = 0; s < BLOCK; s++) {
            const uint8_t *c = blk + s * 4;
            acc[s] += (int32_t)c[0] * w[0] + (int32_t)c[1] * w[1] + (int32_t)c[2] * w[2] +
                      (int32_t)c[3] * w[3];
        }
    }
}

static void block_scores_generic(const Table *t, const Query *q, int64_t b, float *sc) {
    const int64_t d = t->d;
    if (t->kind == KIND_FLOAT32) {
        const float *x = (const float *)t->data;
        for (int s = 0; s < BLOCK; s++) {
            int64_t i = b * BLOCK + s;
            float acc = 0.0f;
            if (i < t->n) {
                const float *row = x + i * d;
                for (int64_t j = 0; j < d; j++) acc += row[j] * q->f[j];
            }
            sc[s] = acc;
        }
    } else if (t->kind == KIND_FLOAT16) {
        /* portable half -> float through the compiler's _Float16 when present */
        const uint16_t *x = (const uint16_t *)t->data + b * d * BLOCK;
        float acc[BLOCK] = {0};
        for (int64_t j = 0; j < d; j++) {
            const uint16_t *col = x + j * BLOCK;
            for (int s = 0; s < BLOCK; s++) {
                _Float16 h;
                memcpy(&h, &col[s], 2);
                acc[s] += (float)h * q->f[j];
            }
        }
        memcpy(sc, acc, sizeof(acc));
    } else {
        int32_t acc[BLOCK], lo[BLOCK];
        i8_sums_generic(t, q->i8, b, acc);
        i8_sums_generic(t, q->i8lo, b, lo);
        for (int s = 0; s < BLOCK; s++)
            sc[s] = fmaf((float)lo[s], q->scale_lo, fmaf((float)acc[s], q->scale, q->bias));
    }
}

/* int8 coarse scores (hi part only) of block b */
static void block_coarse_generic(const Table *t, const Query *q, int64_t b, float *sc) {
    int32_t acc[BLOCK];
    i8_sums_generic(t, q->i8, b, acc);
    for (int s = 0; s < BLOCK; s++) sc[s] = fmaf((float)acc[s], q->scale, q->bias_coarse);
}

/* coarse -> fine scores of block b: add the lo part and the change of bias */
static void refine_block_generic(const Table *t, const Query *q, int64_t b, float *sc) {
    int32_t lo[BLOCK];
    i8_sums_generic(t, q->i8lo, b, lo);
    const float dbias = q->bias - q->bias_coarse;
    for (int s = 0; s < BLOCK; s++) sc[s] = fmaf((float)lo[s], q->scale_lo, sc[s] + dbias);
}

#if LK_X86
LK_AVX512 static inline float dot_f32_avx512(const float *x, const float *q, int64_t d) {
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j), _mm512_loadu_ps(q + j), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(x + j + 16), _mm512_loadu_ps(q + j + 16), a1);
    }
    for (; j < d; j += 16) {
        __mmask16 m = (d - j) >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (d - j)) - 1);
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, x + j), _mm512_maskz_loadu_ps(m, q + j), a0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
}

/* The fine int8 scores of 16 rows from their int32 sums with the query's hi and lo parts
 * (module docstring): one formula for the single-query kernel and the AMX batch, which must
 * give the same floats. */
LK_AVX512 static inline __m512 fine_avx512(__m512i hi, __m512i lo, const Query *q) {
    const __m512 c = _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(q->scale),
                                     _mm512_set1_ps(q->bias));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(q->scale_lo), c);
}

LK_AVX512 static void block_scores_avx512(const Table *t, const Query *q, int64_t b, float *sc) {
    const int64_t d = t->d;
    if (t->kind == KIND_FLOAT32) {
        const float *x = (const float *)t->data;
        for (int s = 0; s < BLOCK; s++) {
            int64_t i = b * BLOCK + s;
            sc[s] = i < t->n ? dot_f32_avx512(x + i * d, q->f, d) : 0.0f;
        }
    } else if (t->kind == KIND_FLOAT16) {
        const uint16_t *x = (const uint16_t *)t->data + b * d * BLOCK;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= d; j += 2) {
            __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j * BLOCK)));
            __m512 x1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + (j + 1) * BLOCK)));
            a0 = _mm512_fmadd_ps(x0, _mm512_set1_ps(q->f[j]), a0);
            a1 = _mm512_fmadd_ps(x1, _mm512_set1_ps(q->f[j + 1]), a1);
        }
        if (j < d) {
            __m512 x0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j * BLOCK)));
            a0 = _mm512_fmadd_ps(x0, _mm512_set1_ps(q->f[j]), a0);
        }
        _mm512_storeu_ps(sc, _mm512_add_ps(a0, a1));
    } else {
        const int64_t groups = t->dp / 4;
        const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
        const int32_t *qh = (const int32_t *)q->i8, *ql = (const int32_t *)q->i8lo;
        __m512i h0 = _mm512_setzero_si512(), h1 = _mm512_setzero_si512();
        __m512i l0 = _mm512_setzero_si512(), l1 = _mm512_setzero_si512();
        int64_t g = 0;
        for (; g + 4 <= groups; g += 4) {
            _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES + 128), _MM_HINT_T0);
            _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES + 192), _MM_HINT_T0);
            const __m512i v0 = _mm512_loadu_si512(x + g * 64);
            const __m512i v1 = _mm512_loadu_si512(x + (g + 1) * 64);
            const __m512i v2 = _mm512_loadu_si512(x + (g + 2) * 64);
            const __m512i v3 = _mm512_loadu_si512(x + (g + 3) * 64);
            LK_DPB(h0, v0, qh + g);
            LK_DPB(l0, v0, ql + g);
            LK_DPB(h1, v1, qh + g + 1);
            LK_DPB(l1, v1, ql + g + 1);
            LK_DPB(h0, v2, qh + g + 2);
            LK_DPB(l0, v2, ql + g + 2);
            LK_DPB(h1, v3, qh + g + 3);
            LK_DPB(l1, v3, ql + g + 3);
        }
        for (; g < groups; g++) {
            const __m512i v = _mm512_loadu_si512(x + g * 64);
            LK_DPB(h0, v, qh + g);
            LK_DPB(l0, v, ql + g);
        }
        _mm512_storeu_ps(sc, fine_avx512(_mm512_add_epi32(h0, h1), _mm512_add_epi32(l0, l1), q));
    }
}

/* int32 dot products of the 16 rows of block b with one query's 4-byte groups iq
 * (its hi or lo part), on four accumulator chains: VPDPBUSD's latency is 4-5 cycles */
LK_AVX512 static inline __m512i block_dots_avx512(const Table *t, const int32_t *iq,
                                                   int64_t b) {
    const int64_t groups = t->dp / 4;
    const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t g = 0;
    for (; g + 4 <= groups; g += 4) {
        const __m512i v0 = _mm512_loadu_si512(x + g * 64);
        const __m512i v1 = _mm512_loadu_si512(x + (g + 1) * 64);
        const __m512i v2 = _mm512_loadu_si512(x + (g + 2) * 64);
        const __m512i v3 = _mm512_loadu_si512(x + (g + 3) * 64);
        LK_DPB(a0, v0, iq + g);
        LK_DPB(a1, v1, iq + g + 1);
        LK_DPB(a2, v2, iq + g + 2);
        LK_DPB(a3, v3, iq + g + 3);
    }
    for (; g < groups; g++) {
        const __m512i v = _mm512_loadu_si512(x + g * 64);
        LK_DPB(a0, v, iq + g);
    }
    return _mm512_add_epi32(_mm512_add_epi32(a0, a1), _mm512_add_epi32(a2, a3));
}

/* coarse -> fine scores of block b (see refine_block_generic); the block's codes are in L1 */
LK_AVX512 static void refine_block_avx512(const Table *t, const Query *q, int64_t b, float *sc) {
    const __m512 ls = _mm512_cvtepi32_ps(block_dots_avx512(t, (const int32_t *)q->i8lo, b));
    const __m512 c = _mm512_add_ps(_mm512_loadu_ps(sc), _mm512_set1_ps(q->bias - q->bias_coarse));
    _mm512_storeu_ps(sc, _mm512_fmadd_ps(ls, _mm512_set1_ps(q->scale_lo), c));
}
#endif

#if LK_X86
/* AVX2 (no VNNI): VPMADDUBSW multiplies 32 unsigned code bytes (8 rows x 4 dims) by the
 * query's 4 signed bytes and adds adjacent pairs into int16, VPMADDWD by ones adds the pairs
 * into one int32 per row. The int16 step cannot saturate because query codes are in
 * [-64, 64] (codes.py): 2 * 255 * 64 = 32640 < 32767, so the sums equal VPDPBUSD's. */

LK_AVX2 static inline __m256i dot4_avx2(__m256i acc, __m256i codes, int32_t q4) {
    const __m256i p = _mm256_maddubs_epi16(codes, _mm256_set1_epi32(q4));
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

LK_AVX2 static inline float hsum_avx2(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

LK_AVX2 static inline float dot_f32_avx2(const float *x, const float *q, int64_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= d; j += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(q + j), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 8), _mm256_loadu_ps(q + j + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 16), _mm256_loadu_ps(q + j + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j + 24), _mm256_loadu_ps(q + j + 24), a3);
    }
    for (; j + 8 <= d; j += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(x + j), _mm256_loadu_ps(q + j), a0);
    float acc = hsum_avx2(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; j < d; j++) acc += x[j] * q[j];
    return acc;
}

/* int32 sums of one int8 query part (dp bytes, read as int32 per dim group) with the 16 rows of
 * block b: rows 0-7 into *r0, rows 8-15 into *r1 */
LK_AVX2 static inline void i8_sums_avx2(const Table *t, const int32_t *qq, int64_t b,
                                        __m256i *r0, __m256i *r1) {
    const int64_t groups = t->dp / 4;
    const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
    __m256i a0 = _mm256_setzero_si256(), a1 = _mm256_setzero_si256();
    __m256i a2 = _mm256_setzero_si256(), a3 = _mm256_setzero_si256();
    int64_t g = 0;
    for (; g + 2 <= groups; g += 2) {
        a0 = dot4_avx2(a0, _mm256_loadu_si256((const __m256i *)(x + g * 64)), qq[g]);
        a1 = dot4_avx2(a1, _mm256_loadu_si256((const __m256i *)(x + g * 64 + 32)), qq[g]);
        a2 = dot4_avx2(a2, _mm256_loadu_si256((const __m256i *)(x + g * 64 + 64)), qq[g + 1]);
        a3 = dot4_avx2(a3, _mm256_loadu_si256((const __m256i *)(x + g * 64 + 96)), qq[g + 1]);
    }
    if (g < groups) {
        a0 = dot4_avx2(a0, _mm256_loadu_si256((const __m256i *)(x + g * 64)), qq[g]);
        a1 = dot4_avx2(a1, _mm256_loadu_si256((const __m256i *)(x + g * 64 + 32)), qq[g]);
    }
    *r0 = _mm256_add_epi32(a0, a2);
    *r1 = _mm256_add_epi32(a1, a3);
}

LK_AVX2 static void block_scores_avx2(const Table *t, const Query *q, int64_t b, float *sc) {
    const int64_t d = t->d;
    if (t->kind == KIND_FLOAT32) {
        const float *x = (const float *)t->data;
        for (int s = 0; s < BLOCK; s++) {
            int64_t i = b * BLOCK + s;
            sc[s] = i < t->n ? dot_f32_avx2(x + i * d, q->f, d) : 0.0f;
        }
    } else if (t->kind == KIND_FLOAT16) {
        const uint16_t *x = (const uint16_t *)t->data + b * d * BLOCK;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
        int64_t j = 0;
        for (; j + 2 <= d; j += 2) {
            const __m256 w0 = _mm256_set1_ps(q->f[j]), w1 = _mm256_set1_ps(q->f[j + 1]);
            const uint16_t *c = x + j * BLOCK;
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)c)), w0, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + 8))), w0,
                                 a1);
            a2 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + 16))), w1,
                                 a2);
            a3 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + 24))), w1,
                                 a3);
        }
        if (j < d) {
            const __m256 w0 = _mm256_set1_ps(q->f[j]);
            const uint16_t *c = x + j * BLOCK;
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)c)), w0, a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(c + 8))), w0,
                                 a1);
        }
        _mm256_storeu_ps(sc, _mm256_add_ps(a0, a2));
        _mm256_storeu_ps(sc + 8, _mm256_add_ps(a1, a3));
    } else {
        /* hi and lo in one pass: each 32-byte load feeds both */
        const int64_t groups = t->dp / 4;
        const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
        const int32_t *qh = (const int32_t *)q->i8, *ql = (const int32_t *)q->i8lo;
        __m256i h0 = _mm256_setzero_si256(), h1 = _mm256_setzero_si256();
        __m256i l0 = _mm256_setzero_si256(), l1 = _mm256_setzero_si256();
        for (int64_t g = 0; g < groups; g++) {
            _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES), _MM_HINT_T0);
            const __m256i v0 = _mm256_loadu_si256((const __m256i *)(x + g * 64));
            const __m256i v1 = _mm256_loadu_si256((const __m256i *)(x + g * 64 + 32));
            h0 = dot4_avx2(h0, v0, qh[g]);
            h1 = dot4_avx2(h1, v1, qh[g]);
            l0 = dot4_avx2(l0, v0, ql[g]);
            l1 = dot4_avx2(l1, v1, ql[g]);
        }
        const __m256 s = _mm256_set1_ps(q->scale), sl = _mm256_set1_ps(q->scale_lo);
        const __m256 bias = _mm256_set1_ps(q->bias);
        _mm256_storeu_ps(sc, _mm256_fmadd_ps(_mm256_cvtepi32_ps(l0), sl,
                                             _mm256_fmadd_ps(_mm256_cvtepi32_ps(h0), s, bias)));
        _mm256_storeu_ps(sc + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(l1), sl,
                                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), s, bias)));
    }
}

LK_AVX2 static void block_coarse_avx2(const Table *t, const Query *q, int64_t b, float *sc) {
    __m256i h0, h1;
    i8_sums_avx2(t, (const int32_t *)q->i8, b, &h0, &h1);
    const __m256 s = _mm256_set1_ps(q->scale), bias = _mm256_set1_ps(q->bias_coarse);
    _mm256_storeu_ps(sc, _mm256_fmadd_ps(_mm256_cvtepi32_ps(h0), s, bias));
    _mm256_storeu_ps(sc + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(h1), s, bias));
}

LK_AVX2 static void refine_block_avx2(const Table *t, const Query *q, int64_t b, float *sc) {
    __m256i l0, l1;
    i8_sums_avx2(t, (const int32_t *)q->i8lo, b, &l0, &l1);
    const __m256 sl = _mm256_set1_ps(q->scale_lo), db = _mm256_set1_ps(q->bias - q->bias_coarse);
    _mm256_storeu_ps(sc, _mm256_fmadd_ps(_mm256_cvtepi32_ps(l0), sl,
                                         _mm256_add_ps(_mm256_loadu_ps(sc), db)));
    _mm256_storeu_ps(sc + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(l1), sl,
                                             _mm256_add_ps(_mm256_loadu_ps(sc + 8), db)));
}
#endif

static inline void block_scores(const Table *t, const Query *q, int64_t b, float *sc) {
#if LK_X86
    if (use_avx512) {
        block_scores_avx512(t, q, b, sc);
        return;
    }
    if (use_avx2) {
        block_scores_avx2(t, q, b, sc);
        return;
    }
#endif
    block_scores_generic(t, q, b, sc);
}

/* ------------------------------------------------------------------------------------------ */
/* batch: QB queries at a time against one block (data read once, queries from cache).       */
/* The queries of a group are interleaved (`inter`): for int8, the 4 bytes of dim group g of   */
/* the QB queries are 64 contiguous bytes at inter + g * QB, so the QB broadcasts of one step  */
/* read one cache line (with d = 4096, 16 separate query rows would not stay in L1).           */

#define QB 16
#ifndef BATCH_PREFETCH
#define BATCH_PREFETCH 4096
#endif

/* Batch scores are coarse for int8 tables (refine_block adds the lo part where needed) and
 * final for float tables. */
static void block_scores_batch_generic(const Table *t, const Query *qs, const void *inter,
                                       int nqb, int64_t b, float sc[QB][BLOCK]) {
    (void)inter;
    for (int k = 0; k < nqb; k++) {
        if (t->kind == KIND_INT8)
            block_coarse_generic(t, &qs[k], b, sc[k]);
        else
            block_scores_generic(t, &qs[k], b, sc[k]);
    }
}

#if LK_X86
/* int8 coarse scores of one query (partial query groups of a batch) */
LK_AVX512 static void block_coarse_avx512(const Table *t, const Query *q, int64_t b, float *sc) {
    const __m512 hs = _mm512_cvtepi32_ps(block_dots_avx512(t, (const int32_t *)q->i8, b));
    _mm512_storeu_ps(sc, _mm512_fmadd_ps(hs, _mm512_set1_ps(q->scale),
                                         _mm512_set1_ps(q->bias_coarse)));
}
#endif

#if LK_X86
/* int8 coarse scores of queries o..o+N-1 of a group, N = 4, 8 or 16 accumulators kept in
 * registers: each 64-byte load of 16 rows x 4 dims feeds N VPDPBUSD, one per query, each with
 * its query's 4 bytes broadcast from the interleaved group (stride QB) as a memory operand
 * ({1to16}). Queries from nqb on are the group's zero padding: computed, not stored. A partial
 * group runs as chunks of 8 and 4 (a batch of 8 is what a busy server coalesces); before, it
 * ran one query at a time, reloading the block per query.
 *
 * VPDPBUSD is written as inline assembly: GCC 12 compiles _mm512_dpbusd_epi32 on an
 * accumulator array into a register-to-register copy of every accumulator per step (16
 * VMOVDQA per 8 VPDPBUSD on the same vector ports; the 16-wide loop spilled to the stack). */
#define LK_STORE_COARSE(k, acc)                                                                \
    if (o + (k) < nqb)                                                                         \
    _mm512_storeu_ps(sc[o + (k)], _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc),                     \
                                                  _mm512_set1_ps(qs[o + (k)].scale),           \
                                                  _mm512_set1_ps(qs[o + (k)].bias_coarse)))
#define LK_COARSE_LOOP(BODY)                                                                   \
    const int64_t groups = t->dp / 4;                                                          \
    const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;                             \
    for (int64_t g = 0; g < groups; g++) {                                                     \
        _mm_prefetch((const char *)(x + g * 64 + PREFETCH_BYTES), _MM_HINT_T0);                \
        const __m512i v = _mm512_loadu_si512(x + g * 64);                                      \
        const int32_t *s = iq + g * QB + o;                                                    \
        BODY                                                                                   \
    }

LK_AVX512 static void coarse4_avx512(const Table *t, const Query *qs, const int32_t *iq, int o,
                                     int nqb, int64_t b, float sc[QB][BLOCK]) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    LK_COARSE_LOOP(LK_DPB(a0, v, s); LK_DPB(a1, v, s + 1); LK_DPB(a2, v, s + 2);
                   LK_DPB(a3, v, s + 3);)
    LK_STORE_COARSE(0, a0);
    LK_STORE_COARSE(1, a1);
    LK_STORE_COARSE(2, a2);
    LK_STORE_COARSE(3, a3);
}

LK_AVX512 static void coarse8_avx512(const Table *t, const Query *qs, const int32_t *iq, int o,
                                     int nqb, int64_t b, float sc[QB][BLOCK]) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
            a7 = a0;
    LK_COARSE_LOOP(LK_DPB(a0, v, s); LK_DPB(a1, v, s + 1); LK_DPB(a2, v, s + 2);
                   LK_DPB(a3, v, s + 3); LK_DPB(a4, v, s + 4); LK_DPB(a5, v, s + 5);
                   LK_DPB(a6, v, s + 6); LK_DPB(a7, v, s + 7);)
    LK_STORE_COARSE(0, a0);
    LK_STORE_COARSE(1, a1);
    LK_STORE_COARSE(2, a2);
    LK_STORE_COARSE(3, a3);
    LK_STORE_COARSE(4, a4);
    LK_STORE_COARSE(5, a5);
    LK_STORE_COARSE(6, a6);
    LK_STORE_COARSE(7, a7);
}

LK_AVX512 static void coarse16_avx512(const Table *t, const Query *qs, const int32_t *iq,
                                      int nqb, int64_t b, float sc[QB][BLOCK]) {
    const int o = 0;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
            a7 = a0, a8 = a0, a9 = a0, a10 = a0, a11 = a0, a12 = a0, a13 = a0, a14 = a0,
            a15 = a0;
    LK_COARSE_LOOP(LK_DPB(a0, v, s); LK_DPB(a1, v, s + 1); LK_DPB(a2, v, s + 2);
                   LK_DPB(a3, v, s + 3); LK_DPB(a4, v, s + 4); LK_DPB(a5, v, s + 5);
                   LK_DPB(a6, v, s + 6); LK_DPB(a7, v, s + 7); LK_DPB(a8, v, s + 8);
                   LK_DPB(a9, v, s + 9); LK_DPB(a10, v, s + 10); LK_DPB(a11, v, s + 11);
                   LK_DPB(a12, v, s + 12); LK_DPB(a13, v, s + 13); LK_DPB(a14, v, s + 14);
                   LK_DPB(a15, v, s + 15);)
    LK_STORE_COARSE(0, a0);
    LK_STORE_COARSE(1, a1);
    LK_STORE_COARSE(2, a2);
    LK_STORE_COARSE(3, a3);
    LK_STORE_COARSE(4, a4);
    LK_STORE_COARSE(5, a5);
    LK_STORE_COARSE(6, a6);
    LK_STORE_COARSE(7, a7);
    LK_STORE_COARSE(8, a8);
    LK_STORE_COARSE(9, a9);
    LK_STORE_COARSE(10, a10);
    LK_STORE_COARSE(11, a11);
    LK_STORE_COARSE(12, a12);
    LK_STORE_COARSE(13, a13);
    LK_STORE_COARSE(14, a14);
    LK_STORE_COARSE(15, a15);
}

LK_AVX512 static void block_scores_batch_avx512(const Table *t, const Query *qs,
                                                const void *inter, int nqb, int64_t b,
                                                float sc[QB][BLOCK]) {
    if (t->kind == KIND_INT8 && nqb > 1) {
        const int32_t *iq = (const int32_t *)inter;
        if (nqb == QB) {
            coarse16_avx512(t, qs, iq, nqb, b, sc);
            return;
        }
        int o = 0;
        for (; nqb - o > 4; o += 8) coarse8_avx512(t, qs, iq, o, nqb, b, sc);
        if (nqb - o > 1)
            coarse4_avx512(t, qs, iq, o, nqb, b, sc);
        else if (nqb - o == 1)
            block_coarse_avx512(t, &qs[o], b, sc[o]);
        return;
    }
    if (t->kind == KIND_FLOAT16 && nqb == QB) {
        const int64_t d = t->d;
        const uint16_t *x = (const uint16_t *)t->data + b * d * BLOCK;
        const float *iq = (const float *)inter;
        __m512 a[QB];
        for (int k = 0; k < QB; k++) a[k] = _mm512_setzero_ps();
        for (int64_t j = 0; j < d; j++) {
            __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(x + j * BLOCK)));
            const float *step = iq + j * QB;
            for (int k = 0; k < QB; k++) a[k] = _mm512_fmadd_ps(v, _mm512_set1_ps(step[k]), a[k]);
        }
        for (int k = 0; k < QB; k++) _mm512_storeu_ps(sc[k], a[k]);
        return;
    }
    for (int k = 0; k < nqb; k++) {
        if (t->kind == KIND_INT8)
            block_coarse_avx512(t, &qs[k], b, sc[k]);
        else
            block_scores_avx512(t, &qs[k], b, sc[k]);
    }
}
#endif

#if LK_X86
LK_AVX2 static void block_scores_batch_avx2(const Table *t, const Query *qs, const void *inter,
                                            int nqb, int64_t b, float sc[QB][BLOCK]) {
    if (t->kind == KIND_INT8 && nqb == QB) {
        /* 8 rows x 8 queries at a time (16 ymm registers hold no more): the block's codes
         * stay in L1 across the four passes */
        const int64_t groups = t->dp / 4;
        const uint8_t *x = (const uint8_t *)t->data + b * groups * 64;
        const int32_t *iq = (const int32_t *)inter;
        for (int half = 0; half < 2; half++) {
            for (int k0 = 0; k0 < QB; k0 += 8) {
                __m256i a[8];
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_si256();
                for (int64_t g = 0; g < groups; g++) {
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(x + g * 64 + half * 32));
                    const int32_t *step = iq + g * QB + k0;
#pragma GCC unroll 8
                    for (int k = 0; k < 8; k++) a[k] = dot4_avx2(a[k], v, step[k]);
                }
#pragma GCC unroll 8
                for (int k = 0; k < 8; k++)
                    _mm256_storeu_ps(sc[k0 + k] + half * 8,
                                     _mm256_fmadd_ps(_mm256_cvtepi32_ps(a[k]),
                                                     _mm256_set1_ps(qs[k0 + k].scale),
                                                     _mm256_set1_ps(qs[k0 + k].bias_coarse)));
            }
        }
        return;
    }
    for (int k = 0; k < nqb; k++) {
        if (t->kind == KIND_INT8)
            block_coarse_avx2(t, &qs[k], b, sc[k]);
        else
            block_scores_avx2(t, &qs[k], b, sc[k]);
    }
}
#endif

static inline void block_scores_batch(const Table *t, const Query *qs, const void *inter,
                                      int nqb, int64_t b, float sc[QB][BLOCK]) {
#if LK_X86
    if (use_avx512) {
        block_scores_batch_avx512(t, qs, inter, nqb, b, sc);
        return;
    }
    if (use_avx2) {
        block_scores_batch_avx2(t, qs, inter, nqb, b, sc);
        return;
    }
#endif
    block_scores_batch_generic(t, qs, inter, nqb, b, sc);
}

static inline void refine_block(const Table *t, const Query *q, int64_t b, float *sc) {
#if LK_X86
    if (use_avx512) {
        refine_block_avx512(t, q, b, sc);
        return;
    }
    if (use_avx2) {
        refine_block_avx2(t, q, b, sc);
        return;
    }
#endif
    refine_block_generic(t, q, b, sc);
}

/* Whether some coarse score of block b (sc[16]) exceeds floor - gap, so that the block needs
 * its fine scores before it can be offered to a reservoir with that floor. */
static inline int block_needs_refine(const Table *t, int64_t b, const float *sc, float limit) {
    unsigned m = block_above(sc, limit);
    const int64_t valid = t->n - b * BLOCK;
    if (valid < BLOCK) m &= (1u << valid) - 1;
    return m != 0;
}

/* After the coarse scores sc[k] of queries qs[0..nqb) for block b (int8; final scores for float
 * tables): add the fine part where a coarse score could still enter the query's reservoir
 * res[k] (see block_needs_refine), and offer the block's scores to it. */
static inline void settle_block(const Table *t, const Query *qs, int nqb, Reservoir *res,
                                int64_t b, float sc[QB][BLOCK]) {
    for (int k = 0; k < nqb; k++) {
        if (t->kind == KIND_INT8) {
            if (!block_needs_refine(t, b, sc[k], reservoir_floor(&res[k]) - qs[k].gap)) continue;
            refine_block(t, &qs[k], b, sc[k]);
        }
        offer_block(&res[k], t, b, sc[k]);
    }
}

#if LK_AMX_BUILD
/* AMX (Intel's Advanced Matrix Extensions; Intel Architecture Instruction Set Extensions
 * Programming Reference, ch. 3). TDPBSUD C, A, B adds to the 16 x 16 int32 tile C the products
 * of A, 16 rows x 64 signed bytes, with B, 16 rows of 16 x 4 unsigned bytes: C[m][s] +=
 * sum_j A[m][j] B[j / 4][4 s + j % 4]. With A = one part (hi or lo) of 16 queries, 64 dims, and
 * B = 16 dim groups of a block of codes, which the packed int8 layout already stores as B wants
 * it (16 rows side by side per group of 4 dims, 1024 contiguous bytes per 64 dims), one
 * instruction does 16 queries x 16 rows x 64 dims, the work of 16 VPDPBUSD. That leaves the
 * batch pass bound by memory bandwidth even when it computes both parts for every row, so the
 * AMX path scores fine (the single-query formula, bit for bit) and skips the coarse pass and
 * its refinements (with 1,024 candidates a query, refinements took a third of a batch's time).
 *
 * The query matrix qa holds, per group of 16 queries, the 16 hi parts and then the 16 lo parts,
 * each a row of dpa = 64 * ceil(dp / 64) bytes, zero past dp (zero rows past the batch). When
 * dp is not a multiple of 64, the last B tile of a block reads up to 15 dim groups of the next
 * block; they meet zero query bytes and add nothing, and the table's last block is never read
 * that way (topk_batch scans it with the VNNI path, and uses AMX only when dp >= 64). Tiles:
 * 0-3 the sums (hi, lo) x (2 blocks), 4-5 the query parts, 6-7 the two blocks' codes. */
#define AMX_SPAN 2

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

/* Whether this CPU has AMX-INT8, the OS enables its state (XCR0 bits 17-18) and Linux grants
 * the tile data state to this process (arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). */
static int amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !((d >> 24) & 1) || !((d >> 25) & 1))
        return 0;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return 0; /* OSXSAVE */
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & (3u << 17)) != (3u << 17)) return 0;
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

/* Configure every tile as 16 rows x 64 bytes (palette 1), in the calling thread. */
LK_AMX static void amx_begin(void) {
    TileConfig c;
    memset(&c, 0, sizeof(c));
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    /* not _tile_loadconfig: GCC 12's takes the config as an 8-byte memory operand, so the
     * stores of the rest of it were deleted as dead (LDTILECFG then faulted) */
    __asm__ volatile("ldtilecfg %0" : : "m"(c));
}

LK_AMX static void amx_end(void) { _tile_release(); }

/* A (span, query group) whose sums are computed and whose scores are still to be offered. */
typedef struct {
    int64_t b0;  /* first block of the span */
    int64_t q0;  /* first query of the group */
    int nqb;     /* queries in the group */
    int32_t (*sums)[2][QB][BLOCK]; /* [AMX_SPAN][2][QB][BLOCK] */
} Pending;

/* Offer items [from, to) of a pending span (item i * nqb + k: block b0 + i, query q0 + k) to the
 * queries' reservoirs res[q0 + k]. The fine scores (fine_avx512) are compared with the
 * reservoir's floor in registers first: most blocks of a long scan have no score above it. */
LK_AVX512 static inline void offer_items(const Table *t, const Query *qs, Reservoir *res,
                                         const Pending *p, int from, int to) {
    for (int it = from; it < to; it++) {
        const int i = it / p->nqb, k = it % p->nqb;
        Reservoir *h = &res[p->q0 + k];
        const __m512 f = fine_avx512(_mm512_loadu_si512(p->sums[i][0][k]),
                                     _mm512_loadu_si512(p->sums[i][1][k]), &qs[p->q0 + k]);
        const unsigned m = _mm512_cmp_ps_mask(f, _mm512_set1_ps(reservoir_floor(h)), _CMP_GT_OQ);
        if (!m) continue;
        float sc[BLOCK];
        _mm512_storeu_ps(sc, f);
        offer_above(h, t, p->b0 + i, sc, m);
    }
}

/* sums[i][p][m][s]: int32 sums of part p (0 hi, 1 lo) of query m of the group qa (see above)
 * with row s of block b + i, i < AMX_SPAN (block b + AMX_SPAN must exist). When prev is not
 * NULL its scores are offered meanwhile, a share after each 64-dim step: the tile unit runs
 * the step's TDPBSUD while the core offers (a tile store waits for its sums, so offering
 * between two calls left the tile unit idle: 64 queries at 1M x 512, ~42 ms of sums alone
 * became ~64 ms with the offers after them). */
LK_AMX static void amx_sums(const Table *t, const int8_t *qa, int64_t dpa, int64_t b,
                            int32_t sums[AMX_SPAN][2][QB][BLOCK], const Query *qs,
                            Reservoir *res, const Pending *prev) {
    const int64_t bytes = t->dp * BLOCK; /* per block */
    const uint8_t *x = (const uint8_t *)t->data + b * bytes;
    const int8_t *qlo = qa + QB * dpa;
    const int64_t steps = dpa / 64;
    const int items = prev ? AMX_SPAN * prev->nqb : 0;
    const int share = (int)((items + steps - 1) / steps);
    int done = 0;
    /* the tile intrinsics are asm statements that take addresses, not memory operands: the
     * "memory" barriers tell the compiler that they read qa and the codes and write sums */
    __asm__ volatile("" : : : "memory");
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < steps; k++) {
        const uint8_t *p = x + k * 1024;
        _tile_loadd(4, qa + k * 64, dpa);
        _tile_loadd(6, p, 64);
        _tile_dpbsud(0, 4, 6);
        _tile_loadd(5, qlo + k * 64, dpa);
        _tile_dpbsud(1, 5, 6);
        _tile_loadd(7, p + bytes, 64);
        _tile_dpbsud(2, 4, 7);
        _tile_dpbsud(3, 5, 7);
        if (done < items) {
            const int to = done + share < items ? done + share : items;
            offer_items(t, qs, res, prev, done, to);
            done = to;
        }
    }
    if (done < items) offer_items(t, qs, res, prev, done, items);
    __asm__ volatile("" : : : "memory");
    _tile_stored(0, sums[0][0], 64);
    _tile_stored(1, sums[0][1], 64);
    _tile_stored(2, sums[1][0], 64);
    _tile_stored(3, sums[1][1], 64);
    __asm__ volatile("" : : : "memory");
}

/* The query tiles of topk_batch (see above): int8 [ceil(nq / 16)][2][16][dpa], zero-padded;
 * NULL when out of memory. */
static int8_t *amx_queries(const Table *t, const Query *qs, int64_t nq, int64_t dpa) {
    const int64_t groups = (nq + QB - 1) / QB;
    int8_t *qa = (int8_t *)calloc((size_t)(groups * 2 * QB * dpa), 1);
    if (!qa) return NULL;
    for (int64_t k = 0; k < nq; k++) {
        int8_t *g = qa + (k / QB) * 2 * QB * dpa;
        memcpy(g + (k % QB) * dpa, qs[k].i8, (size_t)t->dp);
        memcpy(g + (QB + k % QB) * dpa, qs[k].i8lo, (size_t)t->dp);
    }
    return qa;
}
#endif

/* Interleave the queries group by group (see above): int8 -> int32 [groups][QB] per group of
 * QB queries, float -> float [d][QB]; a last partial group is zero-padded. */
static void *interleave_queries(const Table *t, const Query *qs, int64_t nq, int64_t *stride) {
    const int64_t ngroups = (nq + QB - 1) / QB;
    if (t->kind == KIND_INT8) {
        const int64_t steps = t->dp / 4;
        int32_t *out = (int32_t *)calloc((size_t)(ngroups * steps * QB), sizeof(int32_t));
        if (!out) return NULL;
        for (int64_t k = 0; k < nq; k++)
            for (int64_t g = 0; g < steps; g++)
                memcpy(&out[((k / QB) * steps + g) * QB + k % QB], qs[k].i8 + g * 4, 4);
        *stride = steps * QB * 4;
        return out;
    }
    const int64_t d = t->d;
    float *out = (float *)calloc((size_t)(ngroups * d * QB), sizeof(float));
    if (!out) return NULL;
    if (t->kind != KIND_FLOAT32)
        for (int64_t k = 0; k < nq; k++)
            for (int64_t j = 0; j < d; j++) out[((k / QB) * d + j) * QB + k % QB] = qs[k].f[j];
    *stride = d * QB * 4;
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* exclusion of deleted rows and filtered-out listings in dense output                          */

static void exclude_rows_generic(const Table *t, int64_t i0, int64_t m, float *o) {
    for (int64_t s = 0; s < m; s++)
        if (!row_ok(t, i0 + s)) o[s] = -INFINITY;
}

#if LK_X86
LK_AVX512 static void exclude_rows_avx512(const Table *t, int64_t i0, int64_t m, float *o) {
    if (m < BLOCK) {
        exclude_rows_generic(t, i0, m, o);
        return;
    }
    __mmask16 keep = 0xFFFF;
    if (t->alive) {
        __m128i a = _mm_loadu_si128((const __m128i *)(t->alive + i0));
        keep &= _mm_cmpneq_epi8_mask(a, _mm_setzero_si128());
    }
    if (t->lmask) {
        __m512i lnum = _mm512_loadu_si512(t->row_listing + i0);
        /* 4-byte gathers at byte offsets; only the low byte is ours (lmask is padded by 3) */
        __m512i flags = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), keep, lnum,
                                                    (const void *)t->lmask, 1);
        keep &= _mm512_test_epi32_mask(flags, _mm512_set1_epi32(0xFF));
    }
    __m512 v = _mm512_loadu_ps(o);
    _mm512_storeu_ps(o, _mm512_mask_blend_ps(keep, _mm512_set1_ps(-INFINITY), v));
}
#endif

static inline void exclude_rows(const Table *t, int64_t i0, int64_t m, float *o) {
#if LK_X86
    if (use_avx512) {
        exclude_rows_avx512(t, i0, m, o);
        return;
    }
#endif
    exclude_rows_generic(t, i0, m, o);
}

/* ------------------------------------------------------------------------------------------ */
/* argument parsing helpers                                                                    */

typedef struct {
    Py_buffer data, query, row_listing, lmask, alive;
    int has_row_listing, has_lmask, has_alive;
} Bufs;

static void release(Bufs *b) {
    PyBuffer_Release(&b->data);
    PyBuffer_Release(&b->query);
    if (b->has_row_listing) PyBuffer_Release(&b->row_listing);
    if (b->has_lmask) PyBuffer_Release(&b->lmask);
    if (b->has_alive) PyBuffer_Release(&b->alive);
}

static int optional_buffer(PyObject *obj, Py_buffer *view, int *has, Py_ssize_t min_len,
                           const char *name) {
    *has = 0;
    if (obj == Py_None) return 0;
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) return -1;
    *has = 1;
    if (view->len < min_len) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need at least %zd", name, view->len,
                     min_len);
        return -1;
    }
    return 0;
}

static int64_t table_bytes(int kind, int64_t n, int64_t d, int64_t dp) {
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    if (kind == KIND_FLOAT32) return n * d * 4;
    if (kind == KIND_FLOAT16) return blocks * BLOCK * d * 2;
    return blocks * BLOCK * dp;
}

/* Parse (kind, data, n, d, row_listing, lmask, alive) into a Table. */
static int parse_table(Table *t, Bufs *b, int kind, PyObject *data, long long n, long long d,
                       PyObject *row_listing, PyObject *lmask, PyObject *alive,
                       Py_ssize_t n_listings) {
    memset(b, 0, sizeof(*b));
    if (kind < KIND_FLOAT32 || kind > KIND_INT8) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0 (f32), 1 (f16) or 2 (i8)");
        return -1;
    }
    if (n < 0 || d <= 0) {
        PyErr_SetString(PyExc_ValueError, "need n >= 0 and d > 0");
        return -1;
    }
    t->kind = kind;
    t->n = n;
    t->d = d;
    t->dp = (d + 3) / 4 * 4;
    if (PyObject_GetBuffer(data, &b->data, PyBUF_SIMPLE) < 0) return -1;
    if (b->data.len < table_bytes(kind, n, d, t->dp)) {
        PyErr_Format(PyExc_ValueError, "data: %zd bytes, need %lld", b->data.len,
                     (long long)table_bytes(kind, n, d, t->dp));
        return -1;
    }
    t->data = b->data.buf;
    if (optional_buffer(row_listing, &b->row_listing, &b->has_row_listing, n * 4,
                        "row_listing") < 0)
        return -1;
    /* +3: the AVX-512 path gathers 4 bytes at each listing's offset */
    if (optional_buffer(lmask, &b->lmask, &b->has_lmask, n_listings + 3, "lmask") < 0) return -1;
    if (optional_buffer(alive, &b->alive, &b->has_alive, n, "alive") < 0) return -1;
    if (b->has_lmask && !b->has_row_listing) {
        PyErr_SetString(PyExc_ValueError, "lmask needs row_listing");
        return -1;
    }
    t->row_listing = b->has_row_listing ? (const int32_t *)b->row_listing.buf : NULL;
    t->lmask = b->has_lmask ? (const uint8_t *)b->lmask.buf : NULL;
    t->alive = b->has_alive ? (const uint8_t *)b->alive.buf : NULL;
    return 0;
}

/* Query `index` of a query buffer (int8 tables: 2 * dp bytes a query, hi then lo; float
 * tables: d float32) with its QP_COUNT float64 parameters. */
static int query_from_buffer(const Table *t, Py_buffer *qb, int64_t index, const double *params,
                             Query *q) {
    memset(q, 0, sizeof(*q));
    q->scale = (float)params[QP_SCALE];
    q->scale_lo = (float)params[QP_SCALE_LO];
    q->bias = (float)params[QP_BIAS];
    q->bias_coarse = (float)params[QP_BIAS_COARSE];
    q->gap = (float)params[QP_GAP];
    if (t->kind == KIND_INT8) {
        if (qb->len < (index + 1) * 2 * t->dp) {
            PyErr_SetString(PyExc_ValueError, "query: too short for an int8 table (2 * dp bytes)");
            return -1;
        }
        q->i8 = (const int8_t *)qb->buf + index * 2 * t->dp;
        q->i8lo = q->i8 + t->dp;
    } else {
        if (qb->len < (index + 1) * t->d * 4) {
            PyErr_SetString(PyExc_ValueError, "query: too short (d float32 values)");
            return -1;
        }
        q->f = (const float *)qb->buf + index * t->d;
    }
    return 0;
}

static int threads_for(int64_t n, int requested) {
    if (n < 32768) return 1;
    return requested > 0 ? requested : 1;
}

/* ------------------------------------------------------------------------------------------ */
/* scores(kind, data, n, d, query, qparams, row_listing, lmask, alive, n_listings, out,
 *        threads, kk, out_rows, out_scores) -> count
 * out[i] = score of row i, or -inf where excluded. With kk > 0 the scan also keeps, per thread,
 * a reservoir of its kk best rows and returns the merged kk best (unordered) in out_rows (int64)
 * and out_scores (f32), and their count; with kk = 0 those may be None and it returns 0. */

static PyObject *py_scores(PyObject *self, PyObject *args) {
    int kind, threads;
    long long n, d, kk;
    Py_ssize_t n_listings;
    PyObject *data, *query, *row_listing, *lmask, *alive, *rows_o, *scores_o;
    Py_buffer qparams, out, orow, osc;
    if (!PyArg_ParseTuple(args, "iOLLOy*OOOnw*iLOO", &kind, &data, &n, &d, &query, &qparams,
                          &row_listing, &lmask, &alive, &n_listings, &out, &threads, &kk,
                          &rows_o, &scores_o))
        return NULL;
    Table t;
    Bufs b;
    Query q;
    Reservoir *reservoirs = NULL;
    float *rs_buf = NULL;
    int64_t *rr_buf = NULL;
    PyObject *result = NULL;
    memset(&orow, 0, sizeof(orow));
    memset(&osc, 0, sizeof(osc));
    if (parse_table(&t, &b, kind, data, n, d, row_listing, lmask, alive, n_listings) < 0) goto done;
    if (PyObject_GetBuffer(query, &b.query, PyBUF_SIMPLE) < 0) goto done;
    if (qparams.len < QP_COUNT * 8) {
        PyErr_SetString(PyExc_ValueError, "scores: qparams needs QP_COUNT float64 values");
        goto done;
    }
    if (query_from_buffer(&t, &b.query, 0, (const double *)qparams.buf, &q) < 0) goto done;
    if (out.len < n * 4 || kk < 0) {
        PyErr_SetString(PyExc_ValueError, "scores: need n float32 values in out, kk >= 0");
        goto done;
    }
    const int nt = threads_for(n, threads);
    if (kk > 0) {
        if (PyObject_GetBuffer(rows_o, &orow, PyBUF_WRITABLE) < 0 ||
            PyObject_GetBuffer(scores_o, &osc, PyBUF_WRITABLE) < 0)
            goto done;
        if (orow.len < kk * 8 || osc.len < kk * 4) {
            PyErr_SetString(PyExc_ValueError, "scores: top-k outputs too small");
            goto done;
        }
        reservoirs = (Reservoir *)calloc((size_t)nt, sizeof(Reservoir));
        rs_buf = (float *)malloc((size_t)(nt * 2 * kk) * sizeof(float));
        rr_buf = (int64_t *)malloc((size_t)(nt * 2 * kk) * sizeof(int64_t));
        if (!reservoirs || !rs_buf || !rr_buf) {
            PyErr_NoMemory();
            goto done;
        }
        for (int th = 0; th < nt; th++) {
            reservoirs[th].s = rs_buf + th * 2 * kk;
            reservoirs[th].r = rr_buf + th * 2 * kk;
            reservoirs[th].cap = kk;
            reservoirs[th].floor = -INFINITY;
        }
    }
    float *o = (float *)out.buf;
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    const int filtered = t.alive || t.lmask;
    int64_t count = 0;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        Reservoir *h = reservoirs ? &reservoirs[tid] : NULL;
#pragma omp for schedule(static)
        for (int64_t bi = 0; bi < blocks; bi++) {
            float sc[BLOCK];
            block_scores(&t, &q, bi, sc);
            int64_t i0 = bi * BLOCK;
            int64_t m = n - i0 < BLOCK ? n - i0 : BLOCK;
            float *ob = o + i0;
            memcpy(ob, sc, m * sizeof(float));
            if (filtered) exclude_rows(&t, i0, m, ob);
            if (h)
                for (int64_t s = 0; s < m; s++)
                    if (ob[s] > reservoir_floor(h)) reservoir_push(h, ob[s], i0 + s);
        }
    }
    if (reservoirs) {
        for (int th = 0; th < nt; th++) reservoir_finish(&reservoirs[th]);
        for (int th = 1; th < nt; th++)
            for (int64_t e = 0; e < reservoirs[th].size; e++)
                reservoir_push(&reservoirs[0], reservoirs[th].s[e], reservoirs[th].r[e]);
        reservoir_finish(&reservoirs[0]);
        count = reservoirs[0].size;
        memcpy(orow.buf, reservoirs[0].r, (size_t)count * sizeof(int64_t));
        memcpy(osc.buf, reservoirs[0].s, (size_t)count * sizeof(float));
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromLongLong(count);
done:
    free(reservoirs);
    free(rs_buf);
    free(rr_buf);
    PyBuffer_Release(&qparams);
    PyBuffer_Release(&out);
    PyBuffer_Release(&orow);
    PyBuffer_Release(&osc);
    release(&b);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* segments_agg(scores f32 (n), starts int64 (S+1), seg_listing int32 (S), n_listings, agg, top_n,
 *              unique, out_agg f32 (L), out_count int32 (L), out_best int64 (L), threads)
 * Per-listing aggregation of dense scores over segments: runs of consecutive rows of one
 * listing (the cache keeps rows clustered by listing, so a listing is usually one segment).
 * Rows with score -inf are skipped. Per listing: max (0), mean (1) or sum of the top_n best (2),
 * the number of scored rows, and the first row with the best score; listings without scored
 * rows get -inf and count 0. unique = 1 promises that no listing has two segments: segments
 * are then reduced in parallel, each writing its listing's slot. seg_listing values (listing
 * numbers) must be < n_listings. */

#define MAX_TOP_N 64

static inline void insert_top(float *tp, int top_n, float v) {
    if (!(v > tp[top_n - 1])) return;
    int p = top_n - 1;
    while (p > 0 && tp[p - 1] < v) {
        tp[p] = tp[p - 1];
        p--;
    }
    tp[p] = v;
}

/* One segment: count, best (first row wins ties), sum and descending top_n values. */
static inline int32_t reduce_segment(const float *s, int64_t a, int64_t b, int agg, int top_n,
                                     float *best, int64_t *best_row, double *sum, float *tops) {
    int32_t count = 0;
    float bv = -INFINITY;
    int64_t br = -1;
    double sm = 0.0;
    for (int64_t i = a; i < b; i++) {
        const float v = s[i];
        if (v == -INFINITY) continue;
        count++;
        if (v > bv) {
            bv = v;
            br = i;
        }
        if (agg == AGG_MEAN) sm += v;
        else if (agg == AGG_SUM_TOP_N) insert_top(tops, top_n, v);
    }
    *best = bv;
    *best_row = br;
    *sum = sm;
    return count;
}

static PyObject *py_segments_agg(PyObject *self, PyObject *args) {
    Py_buffer scores, starts, seg_listing, out_agg, out_count, out_best;
    Py_ssize_t L;
    int agg, top_n, unique, threads;
    if (!PyArg_ParseTuple(args, "y*y*y*niiiw*w*w*i", &scores, &starts, &seg_listing, &L, &agg,
                          &top_n, &unique, &out_agg, &out_count, &out_best, &threads))
        return NULL;
    PyObject *result = NULL;
    float *bests = NULL, *ltops = NULL;
    double *sums = NULL;
    const int64_t S = seg_listing.len / 4;
    const int64_t *st = (const int64_t *)starts.buf;
    if (starts.len < (S + 1) * 8 || out_agg.len < L * 4 || out_count.len < L * 4 ||
        out_best.len < L * 8 || agg < AGG_MAX || agg > AGG_SUM_TOP_N || top_n < 1 ||
        top_n > MAX_TOP_N ||
        (S > 0 && (st[0] < 0 || st[S] > scores.len / 4))) {
        PyErr_SetString(PyExc_ValueError, "segments_agg: bad arguments or output sizes");
        goto done;
    }
    const float *s = (const float *)scores.buf;
    const int32_t *sc = (const int32_t *)seg_listing.buf;
    float *oa = (float *)out_agg.buf;
    int32_t *oc = (int32_t *)out_count.buf;
    int64_t *ob = (int64_t *)out_best.buf;
    if (!unique) {
        bests = (float *)malloc((size_t)L * sizeof(float));
        sums = (double *)calloc((size_t)L, sizeof(double));
        ltops = agg == AGG_SUM_TOP_N ? (float *)malloc((size_t)L * top_n * sizeof(float)) : NULL;
        if (!bests || !sums || (agg == AGG_SUM_TOP_N && !ltops)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    const int nt = threads_for(S * 8, threads);
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t l = 0; l < L; l++) {
        oa[l] = -INFINITY;
        oc[l] = 0;
        ob[l] = -1;
    }
    if (unique) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t g = 0; g < S; g++) {
            float best, tops[MAX_TOP_N];
            int64_t br;
            double sm;
            for (int p = 0; p < top_n; p++) tops[p] = -INFINITY;
            int32_t cnt = reduce_segment(s, st[g], st[g + 1], agg, top_n, &best, &br, &sm, tops);
            if (cnt == 0) continue;
            const int32_t l = sc[g];
            oc[l] = cnt;
            ob[l] = br;
            if (agg == AGG_MAX) {
                oa[l] = best;
            } else if (agg == AGG_MEAN) {
                oa[l] = (float)(sm / cnt);
            } else {
                double t = 0.0;
                for (int p = 0; p < top_n && p < cnt; p++) t += tops[p];
                oa[l] = (float)t;
            }
        }
    } else {
        for (int64_t l = 0; l < L; l++) bests[l] = -INFINITY;
        if (ltops)
            for (int64_t e = 0; e < L * top_n; e++) ltops[e] = -INFINITY;
        for (int64_t g = 0; g < S; g++) {
            const int32_t l = sc[g];
            float best;
            int64_t br;
            double sm;
            int32_t cnt = reduce_segment(s, st[g], st[g + 1], agg, top_n, &best, &br, &sm,
                                         ltops ? ltops + (int64_t)l * top_n : NULL);
            if (cnt == 0) continue;
            oc[l] += cnt;
            sums[l] += sm;
            if (best > bests[l]) {
                bests[l] = best;
                ob[l] = br;
            }
        }
        for (int64_t l = 0; l < L; l++) {
            if (oc[l] == 0) continue;
            if (agg == AGG_MAX) {
                oa[l] = bests[l];
            } else if (agg == AGG_MEAN) {
                oa[l] = (float)(sums[l] / oc[l]);
            } else {
                double t = 0.0;
                for (int p = 0; p < top_n && p < oc[l]; p++) t += ltops[l * top_n + p];
                oa[l] = (float)t;
            }
        }
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(bests);
    free(sums);
    free(ltops);
    PyBuffer_Release(&scores);
    PyBuffer_Release(&starts);
    PyBuffer_Release(&seg_listing);
    PyBuffer_Release(&out_agg);
    PyBuffer_Release(&out_count);
    PyBuffer_Release(&out_best);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* topk_batch(kind, data, n, d, queries, qparams, nq, row_listing, lmask, alive,
 *            n_listings, kk, out_rows int64 (nq*kk), out_scores f32 (nq*kk),
 *            out_counts int64 (nq), threads, floors float64 (nq) or None)
 * For each query, the kk best rows (unordered) by (fine) score, among rows scoring above its
 * floor (-inf without floors). qparams: float64 (nq, QP_COUNT). For int8 tables a block's fine
 * scores are computed only where a coarse score exceeds the reservoir floor minus the query's
 * gap (see the top of this file): every row left out has a fine score that cannot matter. */

static PyObject *py_topk_batch(PyObject *self, PyObject *args) {
    int kind, threads;
    long long n, d, nq, kk;
    Py_ssize_t n_listings;
    PyObject *data, *queries, *row_listing, *lmask, *alive;
    Py_buffer qparams, out_rows, out_scores, out_counts;
    PyObject *floors_o = Py_None;
    if (!PyArg_ParseTuple(args, "iOLLOy*LOOOnLw*w*w*i|O", &kind, &data, &n, &d, &queries,
                          &qparams, &nq, &row_listing, &lmask, &alive, &n_listings, &kk,
                          &out_rows, &out_scores, &out_counts, &threads, &floors_o))
        return NULL;
    Py_buffer floors;
    int has_floors = 0;
    memset(&floors, 0, sizeof(floors));
    Table t;
    Bufs b;
    Query *qs = NULL;
    Reservoir *reservoirs = NULL;
    float *rs_buf = NULL;
    int64_t *rr_buf = NULL;
    void *inter = NULL;
    int64_t inter_stride = 0;
    int8_t *qa = NULL; /* AMX query tiles */
    PyObject *result = NULL;
    int nt = 1;
    if (parse_table(&t, &b, kind, data, n, d, row_listing, lmask, alive, n_listings) < 0) goto done;
    if (PyObject_GetBuffer(queries, &b.query, PyBUF_SIMPLE) < 0) goto done;
    if (nq < 1 || kk < 1 || qparams.len < nq * QP_COUNT * 8 ||
        out_rows.len < nq * kk * 8 || out_scores.len < nq * kk * 4 || out_counts.len < nq * 8) {
        PyErr_SetString(PyExc_ValueError, "topk_batch: bad nq/kk or output sizes");
        goto done;
    }
    qs = (Query *)calloc((size_t)nq, sizeof(Query));
    if (!qs) {
        PyErr_NoMemory();
        goto done;
    }
    for (int64_t k = 0; k < nq; k++)
        if (query_from_buffer(&t, &b.query, k, (const double *)qparams.buf + k * QP_COUNT,
                              &qs[k]) < 0)
            goto done;
    nt = threads_for(n, threads);
    inter = interleave_queries(&t, qs, nq, &inter_stride);
    reservoirs = (Reservoir *)calloc((size_t)(nt * nq), sizeof(Reservoir));
    rs_buf = (float *)malloc((size_t)(nt * nq * 2 * kk) * sizeof(float));
    rr_buf = (int64_t *)malloc((size_t)(nt * nq * 2 * kk) * sizeof(int64_t));
    if (!reservoirs || !rs_buf || !rr_buf || !inter) {
        PyErr_NoMemory();
        goto done;
    }
    if (floors_o != Py_None) {
        if (PyObject_GetBuffer(floors_o, &floors, PyBUF_SIMPLE) < 0) goto done;
        has_floors = 1;
        if (floors.len < nq * 8) {
            PyErr_SetString(PyExc_ValueError, "topk_batch: floors needs nq float64 values");
            goto done;
        }
    }
    for (int64_t h = 0; h < nt * nq; h++) {
        reservoirs[h].s = rs_buf + h * 2 * kk;
        reservoirs[h].r = rr_buf + h * 2 * kk;
        reservoirs[h].cap = kk;
        reservoirs[h].floor = has_floors ? (float)((double *)floors.buf)[h % nq] : -INFINITY;
    }
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    /* AMX scores blocks [0, first) in spans of AMX_SPAN; the per-block loop does the rest */
    int64_t first = 0;
#if LK_AMX_BUILD
    const int64_t dpa = (t.dp + 63) / 64 * 64;
    if (use_amx && t.kind == KIND_INT8 && t.dp >= 64 && blocks > AMX_SPAN) {
        qa = amx_queries(&t, qs, nq, dpa);
        if (!qa) {
            PyErr_NoMemory();
            goto done;
        }
        first = (blocks - 1) / AMX_SPAN * AMX_SPAN; /* the last block is never in a span */
    }
#endif
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel num_threads(nt)
    {
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        Reservoir *mine = reservoirs + (int64_t)tid * nq;
        float sc[QB][BLOCK];
#if LK_AMX_BUILD
        if (first > 0) {
            /* software-pipelined: a (span, query group)'s scores are offered while the tile
             * unit computes the next one's sums (see amx_sums); sums[cur] receives the sums,
             * sums[cur ^ 1] holds the pending item's */
            int32_t sums[2][AMX_SPAN][2][QB][BLOCK] __attribute__((aligned(64)));
            Pending pending = {0, 0, 0, NULL};
            int cur = 0;
            amx_begin();
#pragma omp for schedule(static)
            for (int64_t b0 = 0; b0 < first; b0 += AMX_SPAN) {
                for (int64_t q0 = 0; q0 < nq; q0 += QB) {
                    amx_sums(&t, qa + q0 * 2 * dpa, dpa, b0, sums[cur], qs, mine,
                             pending.sums ? &pending : NULL);
                    pending.b0 = b0;
                    pending.q0 = q0;
                    pending.nqb = (int)(nq - q0 < QB ? nq - q0 : QB);
                    pending.sums = sums[cur];
                    cur ^= 1;
                }
            }
            if (pending.sums) offer_items(&t, qs, mine, &pending, 0, AMX_SPAN * pending.nqb);
            amx_end();
        }
#endif
#pragma omp for schedule(static)
        for (int64_t bi = first; bi < blocks; bi++) {
            for (int64_t q0 = 0; q0 < nq; q0 += QB) {
                const int nqb = (int)(nq - q0 < QB ? nq - q0 : QB);
                block_scores_batch(&t, qs + q0, (const char *)inter + (q0 / QB) * inter_stride,
                                   nqb, bi, sc);
                settle_block(&t, qs + q0, nqb, mine + q0, bi, sc);
            }
        }
    }
    /* merge the per-thread reservoirs of each query */
    for (int64_t k = 0; k < nq; k++) {
        Reservoir *first = &reservoirs[k];
        reservoir_finish(first);
        for (int th = 1; th < nt; th++) {
            Reservoir *other = &reservoirs[(int64_t)th * nq + k];
            reservoir_finish(other);
            for (int64_t e = 0; e < other->size; e++)
                reservoir_push(first, other->s[e], other->r[e]);
        }
        reservoir_finish(first);
        int64_t *orow = (int64_t *)out_rows.buf + k * kk;
        float *osc = (float *)out_scores.buf + k * kk;
        memcpy(orow, first->r, (size_t)first->size * sizeof(int64_t));
        memcpy(osc, first->s, (size_t)first->size * sizeof(float));
        ((int64_t *)out_counts.buf)[k] = first->size;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(qs);
    free(inter);
    free(qa);
    free(reservoirs);
    if (has_floors) PyBuffer_Release(&floors);
    free(rs_buf);
    free(rr_buf);
    PyBuffer_Release(&qparams);
    PyBuffer_Release(&out_rows);
    PyBuffer_Release(&out_scores);
    PyBuffer_Release(&out_counts);
    release(&b);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* topk_values(values f32 (n), kk, out_rows int64 (kk), out_scores f32 (kk)) -> count
 * The kk largest finite values of an array (unordered); -inf entries are skipped. */

static PyObject *py_topk_values(PyObject *self, PyObject *args) {
    Py_buffer values, out_rows, out_scores;
    long long kk;
    if (!PyArg_ParseTuple(args, "y*Lw*w*", &values, &kk, &out_rows, &out_scores)) return NULL;
    PyObject *result = NULL;
    int64_t n = values.len / 4;
    if (kk < 1 || out_rows.len < kk * 8 || out_scores.len < kk * 4) {
        PyErr_SetString(PyExc_ValueError, "topk_values: bad kk or output sizes");
        goto done;
    }
    float *bs = (float *)malloc((size_t)(2 * kk) * sizeof(float));
    int64_t *br = (int64_t *)malloc((size_t)(2 * kk) * sizeof(int64_t));
    if (!bs || !br) {
        free(bs);
        free(br);
        PyErr_NoMemory();
        goto done;
    }
    Reservoir h = {bs, br, 0, kk, -INFINITY};
    const float *v = (const float *)values.buf;
    Py_BEGIN_ALLOW_THREADS
    for (int64_t i = 0; i < n; i++)
        if (v[i] > reservoir_floor(&h)) reservoir_push(&h, v[i], i);
    reservoir_finish(&h);
    memcpy(out_scores.buf, bs, (size_t)h.size * sizeof(float));
    memcpy(out_rows.buf, br, (size_t)h.size * sizeof(int64_t));
    Py_END_ALLOW_THREADS
    free(bs);
    free(br);
    result = PyLong_FromLongLong(h.size);
done:
    PyBuffer_Release(&values);
    PyBuffer_Release(&out_rows);
    PyBuffer_Release(&out_scores);
    return result;
}

/* ------------------------------------------------------------------------------------------ */
/* read_bandwidth(buffer, threads, repeats) -> checksum: streams the buffer (8-byte words) on
 * `threads` threads, to measure the memory read bandwidth the scan kernels can reach. */

#if LK_X86
LK_AVX512 static uint64_t sum_avx512(const uint64_t *p, int64_t m) {
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    int64_t j = 0;
    for (; j + 32 <= m; j += 32) {
        a0 = _mm512_add_epi64(a0, _mm512_loadu_si512(p + j));
        a1 = _mm512_add_epi64(a1, _mm512_loadu_si512(p + j + 8));
        a2 = _mm512_add_epi64(a2, _mm512_loadu_si512(p + j + 16));
        a3 = _mm512_add_epi64(a3, _mm512_loadu_si512(p + j + 24));
    }
    uint64_t s = (uint64_t)_mm512_reduce_add_epi64(
        _mm512_add_epi64(_mm512_add_epi64(a0, a1), _mm512_add_epi64(a2, a3)));
    for (; j < m; j++) s += p[j];
    return s;
}
#endif

static uint64_t sum_generic(const uint64_t *p, int64_t m) {
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int64_t j = 0;
    for (; j + 4 <= m; j += 4) {
        s0 += p[j];
        s1 += p[j + 1];
        s2 += p[j + 2];
        s3 += p[j + 3];
    }
    for (; j < m; j++) s0 += p[j];
    return s0 + s1 + s2 + s3;
}

static PyObject *py_read_bandwidth(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int threads, repeats;
    if (!PyArg_ParseTuple(args, "y*ii", &buf, &threads, &repeats)) return NULL;
    const uint64_t *p = (const uint64_t *)buf.buf;
    int64_t m = buf.len / 8;
    uint64_t total = 0;
    int nt = threads > 0 ? threads : 1;
    Py_BEGIN_ALLOW_THREADS
    for (int r = 0; r < repeats; r++) {
#pragma omp parallel for schedule(static) num_threads(nt) reduction(+ : total)
        for (int th = 0; th < nt; th++) {
            int64_t lo = m * th / nt, hi = m * (th + 1) / nt;
#if LK_X86
            total += use_avx512 ? sum_avx512(p + lo, hi - lo) : sum_generic(p + lo, hi - lo);
#else
            total += sum_generic(p + lo, hi - lo);
#endif
        }
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLongLong(total);
}

/* ------------------------------------------------------------------------------------------ */
/* encode_i8(x f32 (m*d), m, d, fit f64 (3*d) (w), packed (w), start, norms f64[3] (w))
 * encode_f16(x f32 (m*d), m, d, packed (w), start, norms f64[3] (w))
 * Write rows start .. start+m-1 into a packed table (layouts at the top of this file).
 * int8: fit = [lo (d), step (d), centre (d)]; code u_j = clamp(rint((x_j - lo_j) / step_j), 0,
 * 255), so x_j = lo_j + step_j u_j + e_j. Raises norms[0] to the largest centred code norm
 * ||u_i - centre|| (int8), norms[1] to the largest rounding-error norm ||x_i - decode(code_i)||
 * and norms[2] to the largest ||x_i||, all computed in double precision. */

/* one row to float16 at stride BLOCK; returns the squared rounding error */
static double encode_f16_row_generic(const float *row, uint16_t *out, int64_t d) {
    double e2 = 0.0;
    for (int64_t j = 0; j < d; j++) {
        _Float16 h = (_Float16)row[j];
        double e = (double)row[j] - (double)(float)h;
        e2 += e * e;
        memcpy(&out[j * BLOCK], &h, 2);
    }
    return e2;
}

#if LK_X86
__attribute__((target("f16c"))) static double encode_f16_row_f16c(const float *row,
                                                                   uint16_t *out, int64_t d) {
    double e2 = 0.0;
    for (int64_t j = 0; j < d; j++) {
        unsigned short h = _cvtss_sh(row[j], _MM_FROUND_TO_NEAREST_INT);
        double e = (double)row[j] - (double)_cvtsh_ss(h);
        e2 += e * e;
        out[j * BLOCK] = h;
    }
    return e2;
}
#endif

static double encode_f16_row(const float *row, uint16_t *out, int64_t d) {
#if LK_X86
    if (use_avx512 || use_avx2) return encode_f16_row_f16c(row, out, d);
#endif
    return encode_f16_row_generic(row, out, d);
}

static PyObject *py_encode(PyObject *args, int kind) {
    Py_buffer x, fit, packed, norms;
    long long m, d, start;
    memset(&fit, 0, sizeof(fit));
    if (kind == KIND_INT8) {
        if (!PyArg_ParseTuple(args, "y*LLy*w*Lw*", &x, &m, &d, &fit, &packed, &start, &norms))
            return NULL;
    } else {
        if (!PyArg_ParseTuple(args, "y*LLw*Lw*", &x, &m, &d, &packed, &start, &norms))
            return NULL;
    }
    PyObject *result = NULL;
    const int64_t dp = (d + 3) / 4 * 4;
    const int64_t end_blocks = (start + m + BLOCK - 1) / BLOCK;
    const int64_t need = kind == KIND_INT8 ? end_blocks * BLOCK * dp : end_blocks * BLOCK * d * 2;
    if (m < 0 || d <= 0 || start < 0 || x.len < m * d * 4 || packed.len < need ||
        norms.len < 24 || (kind == KIND_INT8 && fit.len < 3 * d * 8)) {
        PyErr_SetString(PyExc_ValueError, "encode: bad sizes");
        goto done;
    }
    const float *xf = (const float *)x.buf;
    const double *lo = kind == KIND_INT8 ? (const double *)fit.buf : NULL;
    const double *step = lo ? lo + d : NULL, *centre = lo ? lo + 2 * d : NULL;
    double *nm = (double *)norms.buf;
    double max_code = nm[0], max_err = nm[1], max_norm = nm[2];
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) reduction(max : max_code, max_err, max_norm) if (m > 4096)
    for (int64_t i = 0; i < m; i++) {
        const int64_t r = start + i, b = r / BLOCK, s = r % BLOCK;
        const float *row = xf + i * d;
        double c2 = 0.0, e2 = 0.0;
        if (kind == KIND_INT8) {
            uint8_t *base = (uint8_t *)packed.buf + b * BLOCK * dp + s * 4;
            for (int64_t j = 0; j < dp; j++) {
                double u = 0.0;
                if (j < d) {
                    u = nearbyint(((double)row[j] - lo[j]) / step[j]);
                    if (!(u >= 0.0)) u = 0.0; /* also NaN */
                    if (u > 255.0) u = 255.0;
                    const double e = (double)row[j] - (lo[j] + u * step[j]);
                    const double v = u - centre[j];
                    c2 += v * v;
                    e2 += e * e;
                }
                base[(j / 4) * BLOCK * 4 + j % 4] = (uint8_t)(int)u;
            }
        } else {
            e2 = encode_f16_row(row, (uint16_t *)packed.buf + b * BLOCK * d + s, d);
        }
        double x2 = 0.0;
        for (int64_t j = 0; j < d; j++) x2 += (double)row[j] * row[j];
        double cn = sqrt(c2), en = sqrt(e2), xn = sqrt(x2);
        if (cn > max_code) max_code = cn;
        if (en > max_err) max_err = en;
        if (xn > max_norm) max_norm = xn;
    }
    Py_END_ALLOW_THREADS
    nm[0] = max_code;
    nm[1] = max_err;
    nm[2] = max_norm;
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&x);
    if (kind == KIND_INT8) PyBuffer_Release(&fit);
    PyBuffer_Release(&packed);
    PyBuffer_Release(&norms);
    return result;
}

static PyObject *py_encode_i8(PyObject *self, PyObject *args) { return py_encode(args, KIND_INT8); }
static PyObject *py_encode_f16(PyObject *self, PyObject *args) {
    return py_encode(args, KIND_FLOAT16);
}

/* ------------------------------------------------------------------------------------------ */
/* dot_rows(x f32 row-major (n*d), n, d, rows int64 (m), q f32 (d), out f32 (m))
 * Exact float32 re-scoring of selected rows, in place (no gather copy). */

static PyObject *py_dot_rows(PyObject *self, PyObject *args) {
    Py_buffer x, rows, q, out;
    long long n, d;
    if (!PyArg_ParseTuple(args, "y*LLy*y*w*", &x, &n, &d, &rows, &q, &out)) return NULL;
    PyObject *result = NULL;
    const int64_t m = rows.len / 8;
    if (d <= 0 || x.len < n * d * 4 || q.len < d * 4 || out.len < m * 4) {
        PyErr_SetString(PyExc_ValueError, "dot_rows: bad sizes");
        goto done;
    }
    const int64_t *r = (const int64_t *)rows.buf;
    for (int64_t i = 0; i < m; i++)
        if (r[i] < 0 || r[i] >= n) {
            PyErr_SetString(PyExc_IndexError, "dot_rows: row out of range");
            goto done;
        }
    const float *xf = (const float *)x.buf, *qf = (const float *)q.buf;
    float *o = (float *)out.buf;
    Py_BEGIN_ALLOW_THREADS
#pragma omp parallel for schedule(static) if (m * d > 262144)
    for (int64_t i = 0; i < m; i++) {
        const float *row = xf + r[i] * d;
#if LK_X86
        if (use_avx512) {
            o[i] = dot_f32_avx512(row, qf, d);
            continue;
        }
        if (use_avx2) {
            o[i] = dot_f32_avx2(row, qf, d);
            continue;
        }
#endif
        float acc = 0.0f;
        for (int64_t j = 0; j < d; j++) acc += row[j] * qf[j];
        o[i] = acc;
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&x);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&q);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------------------------------------ */

static PyObject *py_info(PyObject *self, PyObject *noargs) {
    int max_threads = 1;
#ifdef _OPENMP
    max_threads = omp_get_max_threads();
#endif
    const char *isa =
        use_amx ? "avx512-amx" : (use_avx512 ? "avx512-vnni" : (use_avx2 ? "avx2" : "generic"));
    return Py_BuildValue("{s:s,s:i,s:i}", "isa", isa,
                         "openmp", max_threads > 0 ? 1 : 0, "max_threads", max_threads);
}

static int avx512_supported = 0, avx2_supported = 0, amx_supported = 0;

/* Select the kernels: "auto" (the best this CPU has), "avx512-amx", "avx512-vnni", "avx2" or
 * "generic". Returns 0, or -1 for an unknown or unsupported name. */
static int select_isa(const char *name) {
    if (strcmp(name, "auto") == 0) {
        use_avx512 = avx512_supported;
        use_avx2 = avx2_supported;
        use_amx = amx_supported;
    } else if (strcmp(name, "generic") == 0) {
        use_avx512 = use_avx2 = use_amx = 0;
    } else if (strcmp(name, "avx2") == 0 && avx2_supported) {
        use_avx512 = use_amx = 0;
        use_avx2 = 1;
    } else if (strcmp(name, "avx512-vnni") == 0 && avx512_supported) {
        use_avx512 = 1;
        use_avx2 = avx2_supported;
        use_amx = 0;
    } else if (strcmp(name, "avx512-amx") == 0 && amx_supported) {
        use_avx512 = use_amx = 1;
        use_avx2 = avx2_supported;
    } else {
        return -1;
    }
    return 0;
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    if (select_isa(name) < 0) {
        PyErr_Format(PyExc_ValueError, "isa %s: use 'auto' or one of isas() on this CPU", name);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    if (amx_supported)
        return Py_BuildValue("[ssss]", "generic", "avx2", "avx512-vnni", "avx512-amx");
    if (avx512_supported) return Py_BuildValue("[sss]", "generic", "avx2", "avx512-vnni");
    if (avx2_supported) return Py_BuildValue("[ss]", "generic", "avx2");
    return Py_BuildValue("[s]", "generic");
}

static PyMethodDef methods[] = {
    {"set_isa", py_set_isa, METH_VARARGS, "Select the kernels: 'auto' or one of isas()."},
    {"isas", py_isas, METH_NOARGS, "The kernel instruction sets this CPU supports."},
    {"dot_rows", py_dot_rows, METH_VARARGS, "Float32 inner products of selected rows."},
    {"encode_i8", py_encode_i8, METH_VARARGS, "Pack rows into an int8 table."},
    {"encode_f16", py_encode_f16, METH_VARARGS, "Pack rows into a float16 table."},
    {"scores", py_scores, METH_VARARGS, "Dense scores of one query against every row."},
    {"topk_batch", py_topk_batch, METH_VARARGS, "The kk best rows of each query (unordered)."},
    {"topk_values", py_topk_values, METH_VARARGS, "The kk largest values of an array."},
    {"segments_agg", py_segments_agg, METH_VARARGS, "Per-listing aggregation over segments."},
    {"read_bandwidth", py_read_bandwidth, METH_VARARGS, "Stream a buffer (bandwidth probe)."},
    {"info", py_info, METH_NOARGS, "Instruction set and threading of this build."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "lookalike scan kernels (see _kernels.c)", -1, methods};

PyMODINIT_FUNC PyInit__kernels(void) {
#if LK_X86
    __builtin_cpu_init();
    use_avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
                 __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
    avx512_supported = use_avx512;
    use_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
               __builtin_cpu_supports("fma");
    avx2_supported = use_avx2;
    /* an AVX-512 CPU without AVX2 does not exist; keep the implication explicit */
    if (avx512_supported && !avx2_supported) avx512_supported = use_avx512 = 0;
#endif
#if LK_AMX_BUILD
    /* the AMX path shares the AVX-512 kernels; asking Linux for the tile state only then */
    amx_supported = use_amx = avx512_supported && amx_probe();
#endif
    const char *isa = getenv("LOOKALIKE_KERNEL_ISA");
    if (isa) select_isa(isa); /* an unknown name keeps "auto" */
    PyObject *m = PyModule_Create(&module);
    if (!m) return NULL;
    /* the one definition of the numbers Python passes in (see _kernels.pyi) */
    if (PyModule_AddIntConstant(m, "BLOCK", BLOCK) < 0 ||
        PyModule_AddIntConstant(m, "QUERY_BLOCK", QB) < 0 ||
        PyModule_AddIntConstant(m, "MAX_TOP_N", MAX_TOP_N) < 0 ||
        PyModule_AddIntConstant(m, "KIND_FLOAT32", KIND_FLOAT32) < 0 ||
        PyModule_AddIntConstant(m, "KIND_FLOAT16", KIND_FLOAT16) < 0 ||
        PyModule_AddIntConstant(m, "KIND_INT8", KIND_INT8) < 0 ||
        PyModule_AddIntConstant(m, "QPARAMS", QP_COUNT) < 0 ||
        PyModule_AddIntConstant(m, "AGG_MAX", AGG_MAX) < 0 ||
        PyModule_AddIntConstant(m, "AGG_MEAN", AGG_MEAN) < 0 ||
        PyModule_AddIntConstant(m, "AGG_SUM_TOP_N", AGG_SUM_TOP_N) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
