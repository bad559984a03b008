/* Kernels of a decoding step on CPU, loaded by nemo_aligner/generation/cpu_kernels.py
 * (which says why they exist): decode_product and decode_attention.
 *
 * decode_product: out (+)= W @ X for W [M, K] with contiguous rows (a layer's weight),
 * X [K, B] with any strides (a step's activations, B a few rows), out [M, B] with any
 * strides. Each thread takes a contiguous share of W's rows and walks them once, six
 * rows at a time, against X held in cache (packed to [K, BP] with BP a multiple of 16
 * when it is not already in that form); the 6 x 16 block of results stays in registers
 * for the whole of K. Every result is the FMA chain over k = 0 .. K-1 in order, computed
 * by one thread: it does not depend on the thread count, on B or on the other columns
 * of X. */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v8 __attribute__((vector_size(32)));

#define ROWS 6
#define COLS 16
/* Below this many multiply-adds a call runs on one thread: waking the other threads costs
 * more than they save (a hidden-64 model's products and attention). */
#define MIN_PARALLEL_WORK (1 << 18)

static inline v8 load8(const float *p) { v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void store8(float *p, v8 v) { memcpy(p, &v, sizeof v); }

static inline void block(int rows, const float *w, int64_t ldw, int64_t k_len,
                         const float *x, int64_t bp, int64_t c, float *acc_out) {
    v8 a[ROWS][2];
    const float *wr[ROWS];
    for (int i = 0; i < ROWS; ++i) {
        a[i][0] = a[i][1] = (v8){0};
        wr[i] = w + (i < rows ? i : 0) * ldw;
    }
    for (int64_t k = 0; k < k_len; ++k) {
        const v8 x0 = load8(x + k * bp + c), x1 = load8(x + k * bp + c + 8);
        for (int i = 0; i < ROWS; ++i) {
            const v8 s = (v8){0} + wr[i][k];
            a[i][0] += s * x0;
            a[i][1] += s * x1;
        }
    }
    for (int i = 0; i < rows; ++i) {
        store8(acc_out + i * COLS, a[i][0]);
        store8(acc_out + i * COLS + 8, a[i][1]);
    }
}

/* out must not overlap W or X. Returns 0, or -1 when a thread could not allocate its
 * packed copy of X (that thread's rows are then not written). */
int decode_product(const float *w, int64_t m, int64_t k_len, int64_t ldw,
                   const float *x, int64_t b, int64_t x_sk, int64_t x_sb,
                   float *out, int64_t out_sm, int64_t out_sb, int accumulate, int threads) {
    const int64_t bp = (b + COLS - 1) / COLS * COLS;
    const int pack = !(x_sb == 1 && x_sk == b && b % COLS == 0);
    const int64_t blocks = (m + ROWS - 1) / ROWS;
    int failed = 0;
    if (m * k_len * b < MIN_PARALLEL_WORK) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t first = blocks * t / n, last = blocks * (t + 1) / n;
        const float *xp = x;
        float *packed = NULL;
        if (first < last && pack && k_len > 0 && bp > 0) {
            packed = (float *)calloc((size_t)(k_len * bp), sizeof(float));
            if (packed == NULL) {
                failed = 1;
            } else {
                for (int64_t k = 0; k < k_len; ++k)
                    for (int64_t j = 0; j < b; ++j) packed[k * bp + j] = x[k * x_sk + j * x_sb];
                xp = packed;
            }
        }
        float acc[ROWS * COLS];
        for (int64_t blk = first; blk < last && !failed; ++blk) {
            const int64_t r0 = blk * ROWS;
            const int rows = (int)(m - r0 < ROWS ? m - r0 : ROWS);
            for (int64_t c = 0; c < bp; c += COLS) {
                block(rows, w + r0 * ldw, ldw, k_len, xp, bp, c, acc);
                const int64_t cols = b - c < COLS ? b - c : COLS;
                for (int i = 0; i < rows; ++i) {
                    float *o = out + (r0 + i) * out_sm + (c * out_sb);
                    const float *s = acc + i * COLS;
                    if (accumulate)
                        for (int64_t j = 0; j < cols; ++j) o[j * out_sb] += s[j];
                    else
                        for (int64_t j = 0; j < cols; ++j) o[j * out_sb] = s[j];
                }
            }
        }
        free(packed);
    }
    return failed ? -1 : 0;
}

static inline float dot(const float *a, const float *b, int64_t d) {
    v8 acc0 = {0}, acc1 = {0};
    int64_t i = 0;
    for (; i + 16 <= d; i += 16) {
        acc0 += load8(a + i) * load8(b + i);
        acc1 += load8(a + i + 8) * load8(b + i + 8);
    }
    for (; i + 8 <= d; i += 8) acc0 += load8(a + i) * load8(b + i);
    const v8 s = acc0 + acc1;
    float r = ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7]));
    for (; i < d; ++i) r += a[i] * b[i];
    return r;
}

typedef int32_t v8i __attribute__((vector_size(32)));

/* a where mask (all bits set), else b */
static inline v8 pick(v8i mask, v8 a, v8 b) { return (v8)(((v8i)a & mask) | ((v8i)b & ~mask)); }

/* exp of 8 floats (Cephes' expf: x = n ln2 + r, a degree-6 polynomial in r, times 2^n;
 * within 2 ulp of expf), 0 below -87 (where expf is subnormal or 0; -inf gives 0). */
static inline v8 exp8(v8 x) {
    const v8 lo = (v8){0} - 87.0f, hi = (v8){0} + 88.0f;
    const v8i keep = x > lo;
    x = pick(x < lo, lo, x);
    x = pick(x > hi, hi, x);
    v8 t = x * 1.44269504088896341f + 0.5f;
    v8 n = __builtin_convertvector(__builtin_convertvector(t, v8i), v8);
    n -= (v8)((v8i)((v8){0} + 1.0f) & (n > t));  /* floor: truncation rounded up below 0 */
    const v8 r = x - n * 0.693359375f - n * -2.12194440e-4f;
    v8 p = (v8){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const v8i scale = (__builtin_convertvector(n, v8i) + 127) << 23;
    return (v8)((v8i)(p * (v8)scale) & keep);
}

/* op[0 .. d) = inv * sum_j w[j] * v[j * v_ss + 0 .. d), the sums held in registers. */
static void weighted_sum(const float *w, const float *v, int64_t v_ss, int64_t len, int64_t d,
                         float inv, float *op) {
    int64_t i0 = 0;
    for (; i0 + 64 <= d; i0 += 64) {
        v8 a[8] = {{0}};
        for (int64_t j = 0; j < len; ++j) {
            const v8 s = (v8){0} + w[j];
            const float *row = v + j * v_ss + i0;
            for (int c = 0; c < 8; ++c) a[c] += s * load8(row + 8 * c);
        }
        for (int c = 0; c < 8; ++c) store8(op + i0 + 8 * c, a[c] * inv);
    }
    for (; i0 + 16 <= d; i0 += 16) {
        v8 a0 = {0}, a1 = {0};
        for (int64_t j = 0; j < len; ++j) {
            const v8 s = (v8){0} + w[j];
            a0 += s * load8(v + j * v_ss + i0);
            a1 += s * load8(v + j * v_ss + i0 + 8);
        }
        store8(op + i0, a0 * inv);
        store8(op + i0 + 8, a1 * inv);
    }
    for (; i0 + 8 <= d; i0 += 8) {
        v8 a0 = {0};
        for (int64_t j = 0; j < len; ++j) a0 += ((v8){0} + w[j]) * load8(v + j * v_ss + i0);
        store8(op + i0, a0 * inv);
    }
    for (; i0 < d; ++i0) {
        float a = 0.f;
        for (int64_t j = 0; j < len; ++j) a += w[j] * v[j * v_ss + i0];
        op[i0] = a * inv;
    }
}

/* decode_attention: one new query position per row against its cached keys and values.
 * For row b and key/value group g, the group's `per` query heads q[b, g, p, :] attend over
 * slots 0 .. len-1 of keys[b, g, :, :] and values[b, g, :, :] (head dim d contiguous in all
 * of them), with an additive bias[b, slot] (0 or -inf; NULL: none):
 *     out[b, g, p, :] = sum_j softmax_j(scale * q . k_j + bias_j) v_j
 * The softmax is the usual max-subtracted one in float32. Each (row, group) is one thread's
 * task: its keys and values are read in slot order. out must not overlap the inputs.
 * Returns 0, or -1 when a thread could not allocate its scores (its tasks are then not
 * written). */
int decode_attention(const float *q, int64_t q_sb, int64_t q_sg, int64_t q_sp,
                     const float *k, int64_t k_sb, int64_t k_sg, int64_t k_ss,
                     const float *v, int64_t v_sb, int64_t v_sg, int64_t v_ss,
                     const float *bias, int64_t bias_sb,
                     float *out, int64_t o_sb, int64_t o_sg, int64_t o_sp,
                     int64_t b, int64_t groups, int64_t per, int64_t d, int64_t len,
                     float scale, int threads) {
    const int64_t tasks = b * groups;
    int failed = 0;
    if (tasks * per * len * d < MIN_PARALLEL_WORK) threads = 1;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const int t = omp_get_thread_num(), n = omp_get_num_threads();
        const int64_t first = tasks * t / n, last = tasks * (t + 1) / n;
        float *scores = first < last ? (float *)malloc((size_t)(len + 8) * sizeof(float)) : NULL;
        if (first < last && scores == NULL) failed = 1;
        for (int64_t task = first; task < last && !failed; ++task) {
            const int64_t row = task / groups, g = task % groups;
            const float *qb = q + row * q_sb + g * q_sg;
            const float *kb = k + row * k_sb + g * k_sg, *vb = v + row * v_sb + g * v_sg;
            const float *bb = bias ? bias + row * bias_sb : NULL;
            for (int64_t p = 0; p < per; ++p) {
                const float *qp = qb + p * q_sp;
                float top = -INFINITY;
                for (int64_t j = 0; j < len; ++j) {
                    const float s = dot(qp, kb + j * k_ss, d) * scale + (bb ? bb[j] : 0.f);
                    scores[j] = s;
                    top = s > top ? s : top;
                }
                float *op = out + row * o_sb + g * o_sg + p * o_sp;
                if (top == -INFINITY) {  /* every slot masked: not reached from the engine */
                    for (int64_t i = 0; i < d; ++i) op[i] = 0.f;
                    continue;
                }
                v8 sums = {0};
                int64_t j = 0;
                for (; j + 8 <= len; j += 8) {
                    const v8 e = exp8(load8(scores + j) - top);
                    store8(scores + j, e);
                    sums += e;
                }
                float total = ((sums[0] + sums[4]) + (sums[1] + sums[5])) + ((sums[2] + sums[6]) + (sums[3] + sums[7]));
                for (; j < len; ++j) {
                    scores[j] = expf(scores[j] - top);
                    total += scores[j];
                }
                weighted_sum(scores, vb, v_ss, len, d, 1.f / total, op);
            }
        }
        free(scores);
    }
    return failed ? -1 : 0;
}

/* The same two kernels with their integer arguments in one array, in the order of the
 * signatures above (pointers as integers): a Python caller then converts one argument
 * per call instead of a dozen (~1 us against ~5 us through ctypes). */
int decode_product_args(const int64_t *a) {
    return decode_product((const float *)a[0], a[1], a[2], a[3], (const float *)a[4], a[5], a[6], a[7],
                          (float *)a[8], a[9], a[10], (int)a[11], (int)a[12]);
}

int decode_attention_args(const int64_t *a, float scale) {
    return decode_attention((const float *)a[0], a[1], a[2], a[3], (const float *)a[4], a[5], a[6], a[7],
                            (const float *)a[8], a[9], a[10], a[11], (const float *)a[12], a[13],
                            (float *)a[14], a[15], a[16], a[17], a[18], a[19], a[20], a[21], a[22],
                            scale, (int)a[23]);
}
