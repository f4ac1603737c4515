// Fused RCE loss forward / backward on CPU. One pass per row for the maximum, one for the
// exp sum, OpenMP over rows when the input is large enough to pay for threads. Same maths
// as kernels/rce_loss.py:
//   u = z / T;  lse = logsumexp(u);  loss = lse - (sum_j u_j - u_y) / (L - 1)
//   grad = g / T * (softmax(u) - R_y),   R_y = 1/(L-1) off the label, 0 at it.
// Rows whose target equals ignore_index get loss 0 and gradient 0. The forward also
// returns the sum of the losses, the kept-row count and the first out-of-range label, so
// the small-input path needs no further tensor ops for the reduction or the label check.
//
// Vectorised, and the same bits on every x86 CPU: exp is vec_exp.h's branch-free exp
// (its subnormal results are flushed to 0, which cannot change a loss or a gradient:
// see vec_exp.h), and each row's maximum and sums are kept in kLanes fixed accumulators
// (lane k takes the elements j with j % kLanes == k, a short tail is padded) combined in
// a fixed order (narrow rows put kLanes rows side by side instead), so the
// order of every floating-point operation is the same whether the loop runs as SSE2,
// AVX2 or scalar code. The row kernels are compiled twice, for the
// x86-64 baseline and for AVX2, and the AVX2 copy is picked at run time where the CPU has
// it (or as the caller forces, for tests).
#include <cmath>
#include <cstdint>
#include <limits>

#include "rce.h"
#include "vec_exp.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RCE_FAST_X86_DISPATCH 1
#define RCE_FAST_TARGET_AVX2 __attribute__((target("avx2")))
#else
#define RCE_FAST_TARGET_AVX2
#endif
#if defined(__GNUC__)
#define RCE_FAST_INLINE inline __attribute__((always_inline))
#else
#define RCE_FAST_INLINE inline
#endif

namespace rce_fast {
namespace {

constexpr int64_t kParallelElems = 1 << 16;
constexpr int64_t kRowsPerTask = 16;
constexpr int kLanes = 16;
constexpr int64_t kBlock = 64 * kLanes;  // columns per first-level sum (see forward_rows)
// Rows narrower than these take the row-lane kernels (forward, backward): there they do
// less work per element than padded column lanes (the backward has no per-row reduction,
// so only its padding is saved).
constexpr int64_t kNarrowForward = 32;
constexpr int64_t kNarrowBackward = kLanes;

template <typename T>
RCE_FAST_INLINE T lanes_sum(const T* v) {  // fixed pairwise order
  T t[kLanes / 2];
  for (int k = 0; k < kLanes / 2; ++k) t[k] = v[k] + v[k + kLanes / 2];
  for (int w = kLanes / 4; w >= 1; w /= 2)
    for (int k = 0; k < w; ++k) t[k] = t[k] + t[k + w];
  return t[0];
}

// max that ignores NaN operands (like std::fmax) and vectorises as a compare + select
template <typename T>
RCE_FAST_INLINE T max_ignore_nan(T m, T u) {
  return u > m ? u : m;
}

template <typename T>
struct RowsResult {
  double loss_sum = 0.0;
  int64_t kept = 0;
  int64_t bad_row = -1;
};

template <typename T>
RCE_FAST_INLINE void forward_rows(const T* z, const int64_t* target, T* loss, T* lse,
                                  int64_t i0, int64_t i1, int64_t L, int64_t stride,
                                  int64_t ignore_index, double inv_t, RowsResult<T>* res) {
  const T it = static_cast<T>(inv_t);
  const T ninf = -std::numeric_limits<T>::infinity();
  const double inv_lm1_d = 1.0 / static_cast<double>(L - 1);
  const int64_t full = L - L % kLanes;
  const int64_t rem = L - full;
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = z + i * stride;
    // the tail, padded: -inf adds nothing to the max nor to the exp sum, 0 nothing to tot
    T tail_u[kLanes];
    for (int k = 0; k < kLanes; ++k) tail_u[k] = ninf;
    for (int64_t k = 0; k < rem; ++k) tail_u[k] = row[full + k] * it;
    T mx[kLanes];
    for (int k = 0; k < kLanes; ++k) mx[k] = tail_u[k];
    for (int64_t j = 0; j < full; j += kLanes)
      for (int k = 0; k < kLanes; ++k) mx[k] = max_ignore_nan(mx[k], row[j + k] * it);
    T m = mx[0];
    for (int k = 1; k < kLanes; ++k) m = max_ignore_nan(m, mx[k]);
    const T shift = m == ninf ? T(0) : m;
    // Two-level sums: each lane adds kBlock / kLanes terms in T, then the block's lane
    // totals go into double accumulators, so a row of 100k+ classes loses no more
    // precision than a short one (one T accumulator per lane over the whole row would
    // lose up to L / kLanes ulps).
    double sacc[kLanes], tacc[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      sacc[k] = rem > 0 ? static_cast<double>(exp_flush(tail_u[k] - shift)) : 0.0;
      tacc[k] = k < rem ? static_cast<double>(tail_u[k]) : 0.0;
    }
    for (int64_t j0 = 0; j0 < full; j0 += kBlock) {
      const int64_t j1 = j0 + kBlock < full ? j0 + kBlock : full;
      T s[kLanes], tot[kLanes];
      for (int k = 0; k < kLanes; ++k) {
        s[k] = T(0);
        tot[k] = T(0);
      }
      for (int64_t j = j0; j < j1; j += kLanes) {
        for (int k = 0; k < kLanes; ++k) {
          const T u = row[j + k] * it;
          s[k] += exp_flush(u - shift);
          tot[k] += u;
        }
      }
      for (int k = 0; k < kLanes; ++k) {
        sacc[k] += static_cast<double>(s[k]);
        tacc[k] += static_cast<double>(tot[k]);
      }
    }
    const int64_t y = target[i];
    const bool keep = y != ignore_index;
    const bool in_range = y >= 0 && y < L;
    if (keep && !in_range && res->bad_row < 0) res->bad_row = i;
    const int64_t yc = in_range ? y : 0;  // never read out of bounds
    const T l = m + static_cast<T>(std::log(lanes_sum(sacc)));
    lse[i] = l;
    const double off_label = lanes_sum(tacc) - static_cast<double>(row[yc] * it);
    const T li = keep ? l - static_cast<T>(off_label * inv_lm1_d) : T(0);
    loss[i] = li;
    res->loss_sum += static_cast<double>(li);
    res->kept += keep ? 1 : 0;
  }
}

// Narrow rows: the lanes run over kLanes rows at once instead (a block
// of rows is first copied into a column-major buffer, padded with zero rows), so no lane
// idles on padding. Each row's maximum and sums then run sequentially over its columns.
template <typename T>
RCE_FAST_INLINE void forward_rows_narrow(const T* z, const int64_t* target, T* loss, T* lse,
                                         int64_t i0, int64_t i1, int64_t L, int64_t stride,
                                         int64_t ignore_index, double inv_t,
                                         RowsResult<T>* res) {
  const T it = static_cast<T>(inv_t);
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
  const T ninf = -std::numeric_limits<T>::infinity();
  T u[kNarrowForward * kLanes];  // u[j * kLanes + k]: column j of row i + k, times 1/T
  for (int64_t i = i0; i < i1; i += kLanes) {
    const int64_t rows = i1 - i < kLanes ? i1 - i : kLanes;
    for (int64_t j = 0; j < L; ++j)
      for (int k = 0; k < kLanes; ++k)
        u[j * kLanes + k] = k < rows ? z[(i + k) * stride + j] * it : T(0);
    T mx[kLanes], shift[kLanes], s[kLanes], tot[kLanes];
    for (int k = 0; k < kLanes; ++k) mx[k] = ninf;
    for (int64_t j = 0; j < L; ++j)
      for (int k = 0; k < kLanes; ++k) mx[k] = max_ignore_nan(mx[k], u[j * kLanes + k]);
    for (int k = 0; k < kLanes; ++k) {
      shift[k] = mx[k] == ninf ? T(0) : mx[k];
      s[k] = T(0);
      tot[k] = T(0);
    }
    for (int64_t j = 0; j < L; ++j) {
      for (int k = 0; k < kLanes; ++k) {
        s[k] += exp_flush(u[j * kLanes + k] - shift[k]);
        tot[k] += u[j * kLanes + k];
      }
    }
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t y = target[i + k];
      const bool keep = y != ignore_index;
      const bool in_range = y >= 0 && y < L;
      if (keep && !in_range && res->bad_row < 0) res->bad_row = i + k;
      const int64_t yc = in_range ? y : 0;
      const T l = mx[k] + std::log(s[k]);
      lse[i + k] = l;
      const T li = keep ? l - (tot[k] - u[yc * kLanes + k]) * inv_lm1 : T(0);
      loss[i + k] = li;
      res->loss_sum += static_cast<double>(li);
      res->kept += keep ? 1 : 0;
    }
  }
}

template <typename T>
RCE_FAST_INLINE void backward_rows_narrow(const T* grad_rows, double grad_scale, const T* z,
                                          const int64_t* target, const T* lse, T* grad,
                                          int64_t i0, int64_t i1, int64_t L, int64_t stride,
                                          int64_t ignore_index, double inv_t) {
  const T it = static_cast<T>(inv_t);
  const T uniform = static_cast<T>(grad_scale) * it;
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
  T u[kNarrowBackward * kLanes];
  for (int64_t i = i0; i < i1; i += kLanes) {
    const int64_t rows = i1 - i < kLanes ? i1 - i : kLanes;
    T g[kLanes], l[kLanes];
    for (int k = 0; k < kLanes; ++k) {
      const bool real = k < rows;
      const bool keep = real && target[i + k] != ignore_index;
      g[k] = keep ? (grad_rows != nullptr ? grad_rows[i + k] * it : uniform) : T(0);
      l[k] = real ? lse[i + k] : T(0);
    }
    for (int64_t j = 0; j < L; ++j)
      for (int k = 0; k < kLanes; ++k)
        u[j * kLanes + k] = k < rows ? z[(i + k) * stride + j] * it : T(0);
    for (int64_t j = 0; j < L; ++j)
      for (int k = 0; k < kLanes; ++k)
        u[j * kLanes + k] = g[k] * (exp_flush(u[j * kLanes + k] - l[k]) - inv_lm1);
    for (int64_t k = 0; k < rows; ++k) {
      T* out = grad + (i + k) * L;
      const int64_t y = target[i + k];
      if (y == ignore_index) {  // 0, also where the logits are NaN
        for (int64_t j = 0; j < L; ++j) out[j] = T(0);
        continue;
      }
      if (y < 0 || y >= L) {  // a label out of range: NaN, and never out[y] out of bounds
        for (int64_t j = 0; j < L; ++j) out[j] = std::numeric_limits<T>::quiet_NaN();
        continue;
      }
      for (int64_t j = 0; j < L; ++j) out[j] = u[j * kLanes + k];
      // the label's entry is g p_y (R_y is 0 there): not (p_y - 1/(L-1)) + 1/(L-1), which
      // rounds a p_y far below 1/(L-1), the usual case in RCE training, to 0
      out[y] = g[k] * exp_flush(z[(i + k) * stride + y] * it - l[k]);
    }
  }
}

template <typename T>
RCE_FAST_INLINE void backward_rows(const T* grad_rows, double grad_scale, const T* z,
                                   const int64_t* target, const T* lse, T* grad, int64_t i0,
                                   int64_t i1, int64_t L, int64_t stride,
                                   int64_t ignore_index, double inv_t) {
  const T it = static_cast<T>(inv_t);
  const T uniform = static_cast<T>(grad_scale) * it;
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
  for (int64_t i = i0; i < i1; ++i) {
    const T* row = z + i * stride;
    T* out = grad + i * L;
    const int64_t y = target[i];
    if (y == ignore_index) {
      for (int64_t j = 0; j < L; ++j) out[j] = T(0);
      continue;
    }
    if (y < 0 || y >= L) {  // see backward_rows_narrow
      for (int64_t j = 0; j < L; ++j) out[j] = std::numeric_limits<T>::quiet_NaN();
      continue;
    }
    const T g = grad_rows != nullptr ? grad_rows[i] * it : uniform;
    const T l = lse[i];
    for (int64_t j = 0; j < L; ++j) out[j] = g * (exp_flush(row[j] * it - l) - inv_lm1);
    out[y] = g * exp_flush(row[y] * it - l);  // g p_y: see backward_rows_narrow
  }
}

template <typename T>
RCE_FAST_INLINE void exp_range(const T* x, T* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = exp_flush(x[i]);
}

// One copy of each row kernel per instruction set. The bodies are the always-inline
// templates above, so each copy is vectorised for its target.
#define RCE_FAST_KERNELS(SUFFIX, ATTR)                                                      \
  template <typename T>                                                                    \
  ATTR void forward_rows_##SUFFIX(const T* z, const int64_t* target, T* loss, T* lse,       \
                                  int64_t i0, int64_t i1, int64_t L, int64_t stride,        \
                                  int64_t ignore_index, double inv_t, RowsResult<T>* res) { \
    if (L < kNarrowForward)                                                                \
      forward_rows_narrow(z, target, loss, lse, i0, i1, L, stride, ignore_index, inv_t, res); \
    else                                                                                   \
      forward_rows(z, target, loss, lse, i0, i1, L, stride, ignore_index, inv_t, res);      \
  }                                                                                        \
  template <typename T>                                                                    \
  ATTR void backward_rows_##SUFFIX(const T* grad_rows, double grad_scale, const T* z,       \
                                   const int64_t* target, const T* lse, T* grad,            \
                                   int64_t i0, int64_t i1, int64_t L, int64_t stride,       \
                                   int64_t ignore_index, double inv_t) {                    \
    if (L < kNarrowBackward)                                                               \
      backward_rows_narrow(grad_rows, grad_scale, z, target, lse, grad, i0, i1, L, stride,  \
                           ignore_index, inv_t);                                            \
    else                                                                                   \
      backward_rows(grad_rows, grad_scale, z, target, lse, grad, i0, i1, L, stride,         \
                    ignore_index, inv_t);                                                   \
  }                                                                                        \
  template <typename T>                                                                    \
  ATTR void exp_range_##SUFFIX(const T* x, T* y, int64_t n) { exp_range(x, y, n); }

RCE_FAST_KERNELS(base, )
#ifdef RCE_FAST_X86_DISPATCH
RCE_FAST_KERNELS(avx2, RCE_FAST_TARGET_AVX2)
#endif
#undef RCE_FAST_KERNELS

bool use_avx2(int isa) {
#ifdef RCE_FAST_X86_DISPATCH
  if (isa == kIsaBaseline) return false;
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;  // kIsaAvx2 on a CPU without it runs the baseline rather than crash
#else
  (void)isa;
  return false;
#endif
}

template <typename T>
RceStats forward(const T* z, const int64_t* target, T* loss, T* lse, int64_t n, int64_t L,
                 int64_t stride, int64_t ignore_index, double inv_t, int threads, int isa) {
  const bool avx2 = use_avx2(isa);
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
  double loss_sum = 0.0;
  int64_t kept = 0;
  int64_t bad_row = n;  // min-reduced; n means none
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (n * L >= kParallelElems) \
    reduction(+ : loss_sum, kept) reduction(min : bad_row) schedule(static)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t i0 = t * kRowsPerTask;
    const int64_t i1 = i0 + kRowsPerTask < n ? i0 + kRowsPerTask : n;
    RowsResult<T> r;
#ifdef RCE_FAST_X86_DISPATCH
    if (avx2)
      forward_rows_avx2(z, target, loss, lse, i0, i1, L, stride, ignore_index, inv_t, &r);
    else
#endif
      forward_rows_base(z, target, loss, lse, i0, i1, L, stride, ignore_index, inv_t, &r);
    loss_sum += r.loss_sum;
    kept += r.kept;
    if (r.bad_row >= 0 && r.bad_row < bad_row) bad_row = r.bad_row;
  }
  (void)avx2;
  RceStats stats;
  stats.loss_sum = loss_sum;
  stats.kept = kept;
  stats.bad_row = bad_row < n ? bad_row : -1;
  return stats;
}

template <typename T>
void backward(const T* grad_rows, double grad_scale, const T* z, const int64_t* target,
              const T* lse, T* grad, int64_t n, int64_t L, int64_t stride,
              int64_t ignore_index, double inv_t, int threads, int isa) {
  const bool avx2 = use_avx2(isa);
  const int64_t tasks = (n + kRowsPerTask - 1) / kRowsPerTask;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (n * L >= kParallelElems) schedule(static)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t i0 = t * kRowsPerTask;
    const int64_t i1 = i0 + kRowsPerTask < n ? i0 + kRowsPerTask : n;
#ifdef RCE_FAST_X86_DISPATCH
    if (avx2)
      backward_rows_avx2(grad_rows, grad_scale, z, target, lse, grad, i0, i1, L, stride,
                         ignore_index, inv_t);
    else
#endif
      backward_rows_base(grad_rows, grad_scale, z, target, lse, grad, i0, i1, L, stride,
                         ignore_index, inv_t);
  }
  (void)avx2;
}

template <typename T>
void exp_all(const T* x, T* y, int64_t n, int isa) {
#ifdef RCE_FAST_X86_DISPATCH
  if (use_avx2(isa)) {
    exp_range_avx2(x, y, n);
    return;
  }
#endif
  (void)isa;
  exp_range_base(x, y, n);
}

}  // namespace

const char* cpu_isa_name(int isa) { return use_avx2(isa) ? "avx2" : "baseline"; }

RceStats rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse,
                         int64_t n, int64_t L, int64_t stride, int64_t ignore_index,
                         double inv_t, bool is_double, int threads, int isa) {
  if (is_double) {
    return forward(static_cast<const double*>(z), target, static_cast<double*>(loss),
                   static_cast<double*>(lse), n, L, stride, ignore_index, inv_t, threads, isa);
  }
  return forward(static_cast<const float*>(z), target, static_cast<float*>(loss),
                 static_cast<float*>(lse), n, L, stride, ignore_index, inv_t, threads, isa);
}

void rce_backward_cpu(const void* grad_rows, double grad_scale, const void* z,
                      const int64_t* target, const void* lse, void* grad, int64_t n, int64_t L,
                      int64_t stride, int64_t ignore_index, double inv_t, bool is_double,
                      int threads, int isa) {
  if (is_double) {
    backward(static_cast<const double*>(grad_rows), grad_scale, static_cast<const double*>(z),
             target, static_cast<const double*>(lse), static_cast<double*>(grad), n, L, stride,
             ignore_index, inv_t, threads, isa);
  } else {
    backward(static_cast<const float*>(grad_rows), grad_scale, static_cast<const float*>(z),
             target, static_cast<const float*>(lse), static_cast<float*>(grad), n, L, stride,
             ignore_index, inv_t, threads, isa);
  }
}

void exp_cpu(const void* x, void* y, int64_t n, bool is_double, int isa) {
  if (is_double) {
    exp_all(static_cast<const double*>(x), static_cast<double*>(y), n, isa);
  } else {
    exp_all(static_cast<const float*>(x), static_cast<float*>(y), n, isa);
  }
}

}  // namespace rce_fast
