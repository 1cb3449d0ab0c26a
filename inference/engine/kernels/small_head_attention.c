/* Attention for heads of 8 or 16 channels on a CPU: softmax(q k^T * scale + bias) v, in float32.
 *
 * PyTorch's CPU flash-attention kernel is built around matrix-multiply blocks; with heads this narrow its blocks are
 * mostly overhead and it spends 2-3 ns per query-key score per thread. Here one query row at a time: the scores
 * against every key (the keys transposed once per head, so eight keys' scores are one vector), their softmax with
 * a polynomial 2^x, and the weighted sum of the values (also transposed). Plain C with GCC's vector extensions
 * (eight floats per vector), compiled at first use for the machine's instruction set
 * (`inference.engine.attention`) and called through ctypes; OpenMP threads over (batch, head, block of queries),
 * sharing PyTorch's OpenMP runtime.
 *
 * Layouts: query [B, L, H, D], key and value [B, S, H, D], each with its channels contiguous and heads D apart
 * (strides given per batch and per token, so the views of a fused QKV projection need no copy); bias, when given,
 * [B, S] (added to every head's and query's scores of that key: diffusers' padding masks); output [B, L, H * D]
 * contiguous, which is what the output projection reads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8f __attribute__((vector_size(32), aligned(32)));
typedef int32_t v8i __attribute__((vector_size(32), aligned(32)));

#define LANES 8
/* Queries per task: a task re-reads its head's transposed keys and values only when the head changes. */
#define QUERY_BLOCK 32
#define LOG2_E 1.4426950408889634f
/* Scores of the keys that only pad the key count to a multiple of eight: no weight. */
#define NO_KEY (-__builtin_inff())
/* Biases are clamped here first, so that scaled to base 2 they stay finite (float32's lowest, a common mask value,
 * would overflow): a key so biased still weighs 2^-126 of the top key, nothing at float32's precision. */
#define LOWEST_BIAS (-1.0e30f)

static inline v8f splat(float x) { return (v8f){x, x, x, x, x, x, x, x}; }

/* Where `pick`, a; elsewhere b. */
static inline v8f choose(v8i pick, v8f a, v8f b) { return (v8f)(((v8i)a & pick) | ((v8i)b & ~pick)); }

/* a > b ? a : b (so b where either is NaN), in one instruction where there is one. */
#ifdef __AVX__
static inline v8f vmax(v8f a, v8f b) { return __builtin_ia32_maxps256(a, b); }
#else
static inline v8f vmax(v8f a, v8f b) { return choose(a > b, a, b); }
#endif

static inline float hmax(v8f a) {
    float m = a[0];
    for (int i = 1; i < LANES; i++) m = a[i] > m ? a[i] : m;
    return m;
}

static inline float hsum(v8f a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

/* 2^x for x <= 0: x = n + f with n whole and |f| <= 1/2, 2^f by a degree-6 polynomial (relative error about
 * 1e-7), n added to the exponent bits. Below -126 the result is 2^-126 (1e-38): the weight of a masked key. NaN
 * stays NaN (put back at the end), so a NaN score makes its row NaN, as in PyTorch. */
static inline v8f vexp2(v8f in) {
    const v8f x = vmax(in, splat(-126.0f));
    const v8f magic = splat(12582912.0f); /* 1.5 * 2^23: adding it rounds to a whole number, kept in the low bits */
    const v8f t = x + magic;
    const v8f f = x - (t - magic);
    v8f p = splat(1.535336188319500e-4f);
    p = p * f + splat(1.339887440266574e-3f);
    p = p * f + splat(9.618437357674640e-3f);
    p = p * f + splat(5.550332471162809e-2f);
    p = p * f + splat(2.402264791363012e-1f);
    p = p * f + splat(6.931472028550421e-1f);
    p = p * f + splat(1.0f);
    return choose(in != in, in, (v8f)((v8i)p + ((v8i)t << 23)));
}

/* Lane i of the result: the sum of the eight lanes of a<i>. */
static inline v8f sum_lanes(v8f a0, v8f a1, v8f a2, v8f a3, v8f a4, v8f a5, v8f a6, v8f a7) {
#define PAIRS(x, y)                                                                                                  \
    (__builtin_shufflevector(x, y, 0, 8, 1, 9, 4, 12, 5, 13) + __builtin_shufflevector(x, y, 2, 10, 3, 11, 6, 14, 7, 15))
#define QUADS(x, y)                                                                                                  \
    (__builtin_shufflevector(x, y, 0, 1, 8, 9, 4, 5, 12, 13) + __builtin_shufflevector(x, y, 2, 3, 10, 11, 6, 7, 14, 15))
    const v8f t0 = PAIRS(a0, a1), t1 = PAIRS(a2, a3), t2 = PAIRS(a4, a5), t3 = PAIRS(a6, a7);
    const v8f u0 = QUADS(t0, t1), u1 = QUADS(t2, t3);
    return __builtin_shufflevector(u0, u1, 0, 1, 2, 3, 8, 9, 10, 11) +
           __builtin_shufflevector(u0, u1, 4, 5, 6, 7, 12, 13, 14, 15);
#undef PAIRS
#undef QUADS
}

/* `rows` query rows of one head. kt and vt: the head's keys (pre-scaled by scale * log2 e) and values, transposed
 * ([D][keys] with `keys` a multiple of eight); bias: per key, in base 2; s: room for one row of scores. Inlined
 * with D a constant, so the channel loops unroll. */
static inline __attribute__((always_inline)) void attend_rows(const int D, const float *restrict q, int64_t q_step,
                                                              int64_t rows, const float *restrict kt,
                                                              const float *restrict vt, const float *restrict bias,
                                                              int64_t keys, float *restrict s, float *restrict o,
                                                              int64_t o_step) {
    const int64_t vectors = keys / LANES;
    for (int64_t row = 0; row < rows; row++, q += q_step, o += o_step) {
        v8f qd[16];
        for (int d = 0; d < D; d++) qd[d] = splat(q[d]);
        v8f m = splat(NO_KEY);
        for (int64_t jv = 0; jv < vectors; jv++) {
            v8f score = *(const v8f *)(bias + jv * LANES);
#pragma GCC unroll 16
            for (int d = 0; d < D; d++) score += qd[d] * *(const v8f *)(kt + d * keys + jv * LANES);
            *(v8f *)(s + jv * LANES) = score;
            m = vmax(m, score);
        }
        const v8f top = splat(hmax(m));
        v8f sum = splat(0.f);
        for (int64_t jv = 0; jv < vectors; jv++) {
            const v8f e = vexp2(*(const v8f *)(s + jv * LANES) - top);
            *(v8f *)(s + jv * LANES) = e;
            sum += e;
        }
        const v8f inverse = splat(1.f / hsum(sum));
        for (int d0 = 0; d0 < D; d0 += 8) {
            v8f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0}, a4 = {0}, a5 = {0}, a6 = {0}, a7 = {0};
            const float *restrict w = vt + d0 * keys;
            for (int64_t jv = 0; jv < vectors; jv++) {
                const v8f p = *(const v8f *)(s + jv * LANES);
                const float *restrict x = w + jv * LANES;
                a0 += p * *(const v8f *)(x);
                a1 += p * *(const v8f *)(x + keys);
                a2 += p * *(const v8f *)(x + 2 * keys);
                a3 += p * *(const v8f *)(x + 3 * keys);
                a4 += p * *(const v8f *)(x + 4 * keys);
                a5 += p * *(const v8f *)(x + 5 * keys);
                a6 += p * *(const v8f *)(x + 6 * keys);
                a7 += p * *(const v8f *)(x + 7 * keys);
            }
            const v8f out = sum_lanes(a0, a1, a2, a3, a4, a5, a6, a7) * inverse;
            memcpy(o + d0, &out, sizeof out);
        }
    }
}

static void attend_rows_8(const float *q, int64_t q_step, int64_t rows, const float *kt, const float *vt,
                          const float *bias, int64_t keys, float *s, float *o, int64_t o_step) {
    attend_rows(8, q, q_step, rows, kt, vt, bias, keys, s, o, o_step);
}

static void attend_rows_16(const float *q, int64_t q_step, int64_t rows, const float *kt, const float *vt,
                           const float *bias, int64_t keys, float *s, float *o, int64_t o_step) {
    attend_rows(16, q, q_step, rows, kt, vt, bias, keys, s, o, o_step);
}

/* Returns 0, or -1 for a head size other than 8 or 16, -2 when memory runs out. */
int small_head_attention(const float *q, const float *k, const float *v, const float *bias, float *out, int64_t B,
                         int64_t H, int64_t L, int64_t S, int64_t D, int64_t q_batch, int64_t q_token,
                         int64_t k_batch, int64_t k_token, int64_t v_batch, int64_t v_token, int64_t bias_batch,
                         float scale, int threads) {
    if (D != 8 && D != 16) return -1;
    const int64_t blocks = (L + QUERY_BLOCK - 1) / QUERY_BLOCK;
    const int64_t keys = (S + LANES - 1) / LANES * LANES;
    const int64_t tasks = B * H * blocks;
    const float key_scale = scale * LOG2_E;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *kt = aligned_alloc(32, sizeof(float) * keys * D);
        float *vt = aligned_alloc(32, sizeof(float) * keys * D);
        float *kb = aligned_alloc(32, sizeof(float) * keys);
        float *s = aligned_alloc(32, sizeof(float) * keys);
        if (!kt || !vt || !kb || !s) {
#pragma omp atomic write
            failed = 1;
        }
        int64_t loaded = -1;
#pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            if (!kt || !vt || !kb || !s) continue;
            const int64_t head = task / blocks, block = task % blocks;
            const int64_t b = head / H, h = head % H;
            if (head != loaded) {
                const float *kh = k + b * k_batch + h * D, *vh = v + b * v_batch + h * D;
                for (int64_t j = 0; j < keys; j++) {
                    for (int64_t d = 0; d < D; d++) {
                        kt[d * keys + j] = j < S ? kh[j * k_token + d] * key_scale : 0.f;
                        vt[d * keys + j] = j < S ? vh[j * v_token + d] : 0.f;
                    }
                    const float given = bias ? bias[b * bias_batch + j] : 0.f;
                    kb[j] = j >= S ? NO_KEY : (given < LOWEST_BIAS ? LOWEST_BIAS : given) * LOG2_E;
                }
                loaded = head;
            }
            const int64_t first = block * QUERY_BLOCK;
            const int64_t rows = (first + QUERY_BLOCK < L ? first + QUERY_BLOCK : L) - first;
            const float *qh = q + b * q_batch + first * q_token + h * D;
            float *oh = out + (b * L + first) * H * D + h * D;
            if (D == 8) attend_rows_8(qh, q_token, rows, kt, vt, kb, keys, s, oh, H * D);
            else attend_rows_16(qh, q_token, rows, kt, vt, kb, keys, s, oh, H * D);
        }
        free(kt);
        free(vt);
        free(kb);
        free(s);
    }
    return failed ? -2 : 0;
}
