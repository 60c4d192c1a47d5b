// The element-wise passes of a matrix step, one pass each over memory (see fused.py).
//
// T is the parameter's storage type: float, or bf16 held as uint16 bits. Arithmetic is fp32 and every
// value is rounded to T exactly where the unfused torch step rounds it, so both give the same result up
// to fp32 rounding (the order of a sum, a fused multiply-add). Threads split rows (or elements); each
// thread's column partials are added in thread order, so a given thread count is deterministic.
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>
#include <omp.h>

typedef int64_t i64;
typedef uint16_t bf16;

static inline float load(float v) { return v; }
static inline float load(bf16 v) {
    uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
}
static inline float round_to(float v, float*) { return v; }
static inline bf16 round_to(float v, bf16*) {  // round to nearest even, as c10::BFloat16
    if (v != v) return 0x7FC0;
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    return bf16((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

// M ← G + mu·M (in T; kept in buf only with COMMIT);  N ← G + mu·M (nesterov, in T) | M, written as fp32.
template <typename T, bool NESTEROV, bool COMMIT>
static void momentum(const T* g, T* buf, float* n, i64 count, float mu, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (i64 k = 0; k < count; ++k) {
        float gk = load(g[k]);
        T b = round_to(std::fma(load(buf[k]), mu, gk), (T*)nullptr);  // torch.add(g, buf, alpha=mu): one fma
        if (COMMIT) buf[k] = b;
        n[k] = NESTEROV ? load(round_to(std::fma(load(b), mu, gk), (T*)nullptr)) : load(b);
    }
}

// 1 if every element is finite (exponent bits not all ones), else 0.
template <typename T, typename U, U EXP>
static int all_finite(const T* x, i64 count, int threads) {
    const U* bits = reinterpret_cast<const U*>(x);
    int bad = 0;
#pragma omp parallel for simd num_threads(threads) schedule(static) reduction(| : bad)
    for (i64 k = 0; k < count; ++k) bad |= (bits[k] & EXP) == EXP;
    return !bad;
}

// rows[i] (+)= Σ_j |x_ij|^p, cols[j] (+)= Σ_i |x_ij|^p over an h × w row-major rectangle; mode 0: p = 2,
// 1: p = 1, 2: p = inf (max instead of sums), 3: any other p. Either output may be null.
// The elements are value(k), k = i·w + j, each called once (it may write: the momentum pass below).
template <int MODE, typename F>
static void row_col(F value, i64 h, i64 w, float p, float* rows, float* cols, int threads) {
    std::vector<float> part(cols ? size_t(threads) * size_t(w) : 0, 0.0f);
#pragma omp parallel num_threads(threads) firstprivate(value)
    {
        int t = omp_get_thread_num();
        float* mine = cols ? part.data() + size_t(t) * size_t(w) : nullptr;
#pragma omp for schedule(static)
        for (i64 i = 0; i < h; ++i) {
            const i64 base = i * w;
            float acc = 0.0f;
            if (MODE == 2) {  // max; a NaN anywhere in a row or column makes its statistic NaN
                int nan = 0;
                if (mine) {
#pragma omp simd reduction(max : acc) reduction(| : nan)
                    for (i64 j = 0; j < w; ++j) {
                        float q = std::fabs(value(base + j));
                        nan |= q != q;
                        acc = std::max(acc, q);
                        mine[j] = (q > mine[j] || q != q) ? q : mine[j];
                    }
                } else {
#pragma omp simd reduction(max : acc) reduction(| : nan)
                    for (i64 j = 0; j < w; ++j) {
                        float q = std::fabs(value(base + j));
                        nan |= q != q;
                        acc = std::max(acc, q);
                    }
                }
                if (nan) acc = NAN;
            } else if (mine) {
#pragma omp simd reduction(+ : acc)
                for (i64 j = 0; j < w; ++j) {
                    float v = value(base + j);
                    float q = MODE == 0 ? v * v : MODE == 1 ? std::fabs(v) : std::pow(std::fabs(v), p);
                    acc += q;
                    mine[j] += q;
                }
            } else {
#pragma omp simd reduction(+ : acc)
                for (i64 j = 0; j < w; ++j) {
                    float v = value(base + j);
                    acc += MODE == 0 ? v * v : MODE == 1 ? std::fabs(v) : std::pow(std::fabs(v), p);
                }
            }
            if (rows) rows[i] = MODE == 2 ? ((acc > rows[i] || acc != acc) ? acc : rows[i]) : rows[i] + acc;
        }
    }
    if (!cols) return;
    for (int t = 0; t < threads; ++t) {
        const float* mine = part.data() + size_t(t) * size_t(w);
        for (i64 j = 0; j < w; ++j)
            cols[j] = MODE == 2 ? ((mine[j] > cols[j] || mine[j] != mine[j]) ? mine[j] : cols[j]) : cols[j] + mine[j];
    }
}

// x_ij ← (x_ij · row_i) · col_j in place (either scale may be null); returns Σ of the new x_ij², summed
// per row in fp32 and over rows in fp64 (what the "rms" scale's Frobenius norm needs, at no extra read).
static double scale(float* x, i64 h, i64 w, const float* row, const float* col, int threads) {
    double total = 0.0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : total)
    for (i64 i = 0; i < h; ++i) {
        float* xr = x + i * w;
        float r = row ? row[i] : 1.0f;
        float acc = 0.0f;
        if (row && col) {
#pragma omp simd reduction(+ : acc)
            for (i64 j = 0; j < w; ++j) {
                float v = (xr[j] * r) * col[j];
                xr[j] = v;
                acc += v * v;
            }
        } else if (col) {
#pragma omp simd reduction(+ : acc)
            for (i64 j = 0; j < w; ++j) {
                float v = xr[j] * col[j];
                xr[j] = v;
                acc += v * v;
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (i64 j = 0; j < w; ++j) {
                float v = xr[j] * r;
                xr[j] = v;
                acc += v * v;
            }
        }
        total += acc;
    }
    return total;
}

// W ← T(W·decay) (when decay_on), then W ← T(fma(alpha·U, s, W)) as torch's vectorised addcmul_ (scaled), or
// W ← T(fma(U, alpha, W)) as its add_(U, alpha=…) (not scaled).
template <typename T, bool SCALED>
static void update(T* x, const float* u, i64 count, float decay, int decay_on, float alpha, float s, int threads) {
#pragma omp parallel for simd num_threads(threads) schedule(static)
    for (i64 k = 0; k < count; ++k) {
        float w = load(x[k]);
        if (decay_on) w = load(round_to(w * decay, (T*)nullptr));
        x[k] = round_to(SCALED ? std::fma(alpha * u[k], s, w) : std::fma(u[k], alpha, w), (T*)nullptr);
    }
}

template <typename F>
static void row_col_any(F value, i64 h, i64 w, int mode, float p, float* rows, float* cols, int threads) {
    switch (mode) {
        case 0: row_col<0>(value, h, w, p, rows, cols, threads); break;
        case 1: row_col<1>(value, h, w, p, rows, cols, threads); break;
        case 2: row_col<2>(value, h, w, p, rows, cols, threads); break;
        default: row_col<3>(value, h, w, p, rows, cols, threads); break;
    }
}

// The momentum pass with the row/column statistics of N from the same read (an h × w rectangle).
template <typename T, bool NESTEROV, bool COMMIT>
static void momentum_row_col(const T* g, T* buf, float* n, i64 h, i64 w, float mu, int mode, float p, float* rows,
                             float* cols, int threads) {
    auto value = [=](i64 k) {
        float gk = load(g[k]);
        T b = round_to(std::fma(load(buf[k]), mu, gk), (T*)nullptr);
        if (COMMIT) buf[k] = b;
        float v = NESTEROV ? load(round_to(std::fma(load(b), mu, gk), (T*)nullptr)) : load(b);
        n[k] = v;
        return v;
    };
    row_col_any(value, h, w, mode, p, rows, cols, threads);
}

template <typename T>
static void momentum_any(const T* g, T* buf, float* n, i64 count, float mu, int nesterov, int commit, int threads) {
    if (commit)
        nesterov ? momentum<T, true, true>(g, buf, n, count, mu, threads)
                 : momentum<T, false, true>(g, buf, n, count, mu, threads);
    else
        nesterov ? momentum<T, true, false>(g, buf, n, count, mu, threads)
                 : momentum<T, false, false>(g, buf, n, count, mu, threads);
}

template <typename T>
static void momentum_row_col_any(const T* g, T* buf, float* n, i64 h, i64 w, float mu, int nesterov, int commit,
                                 int mode, float p, float* rows, float* cols, int threads) {
    if (commit)
        nesterov ? momentum_row_col<T, true, true>(g, buf, n, h, w, mu, mode, p, rows, cols, threads)
                 : momentum_row_col<T, false, true>(g, buf, n, h, w, mu, mode, p, rows, cols, threads);
    else
        nesterov ? momentum_row_col<T, true, false>(g, buf, n, h, w, mu, mode, p, rows, cols, threads)
                 : momentum_row_col<T, false, false>(g, buf, n, h, w, mu, mode, p, rows, cols, threads);
}

extern "C" {
void reg_momentum_f32(const float* g, float* buf, float* n, i64 count, float mu, int nesterov, int commit,
                      int threads) {
    momentum_any(g, buf, n, count, mu, nesterov, commit, threads);
}
void reg_momentum_bf16(const bf16* g, bf16* buf, float* n, i64 count, float mu, int nesterov, int commit,
                       int threads) {
    momentum_any(g, buf, n, count, mu, nesterov, commit, threads);
}
int reg_finite_f32(const float* x, i64 count, int threads) {
    return all_finite<float, uint32_t, 0x7F800000u>(x, count, threads);
}
int reg_finite_bf16(const bf16* x, i64 count, int threads) {
    return all_finite<bf16, uint16_t, 0x7F80u>(x, count, threads);
}
void reg_row_col_f32(const float* x, i64 h, i64 w, int mode, float p, float* rows, float* cols, int threads) {
    row_col_any([=](i64 k) { return x[k]; }, h, w, mode, p, rows, cols, threads);
}
void reg_momentum_row_col_f32(const float* g, float* buf, float* n, i64 h, i64 w, float mu, int nesterov, int commit,
                              int mode, float p, float* rows, float* cols, int threads) {
    momentum_row_col_any(g, buf, n, h, w, mu, nesterov, commit, mode, p, rows, cols, threads);
}
void reg_momentum_row_col_bf16(const bf16* g, bf16* buf, float* n, i64 h, i64 w, float mu, int nesterov, int commit,
                               int mode, float p, float* rows, float* cols, int threads) {
    momentum_row_col_any(g, buf, n, h, w, mu, nesterov, commit, mode, p, rows, cols, threads);
}
double reg_scale_f32(float* x, i64 h, i64 w, const float* row, const float* col, int threads) {
    return scale(x, h, w, row, col, threads);
}
void reg_update_f32(float* x, const float* u, i64 count, float decay, int decay_on, float alpha, float s, int scaled,
                    int threads) {
    scaled ? update<float, true>(x, u, count, decay, decay_on, alpha, s, threads)
           : update<float, false>(x, u, count, decay, decay_on, alpha, s, threads);
}
void reg_update_bf16(bf16* x, const float* u, i64 count, float decay, int decay_on, float alpha, float s, int scaled,
                     int threads) {
    scaled ? update<bf16, true>(x, u, count, decay, decay_on, alpha, s, threads)
           : update<bf16, false>(x, u, count, decay, decay_on, alpha, s, threads);
}
}
