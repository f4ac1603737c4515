// Fused RCE loss forward / backward on CPU for small inputs, where a chain of PyTorch
// ops costs more in dispatch than in arithmetic (at the paper's batch, 128 x 10, the
// whole loss is ~1 microsecond of maths). One pass per row, OpenMP over rows when the
// input is large enough to pay for threads. Same maths as kernels/rce_loss.py:
//   u = z / T;  lse = logsumexp(u);  loss = lse - (sum_j u_j - u_y) / (L - 1)
//   grad = g / T * (softmax(u) - R_y),   R_y = 1/(L-1) off the label, 0 at it.
// Rows whose target equals ignore_index get loss 0 and gradient 0. The forward also
// returns the sum of the losses, the kept-row count and the first out-of-range label, so
// the small-input path needs no further tensor ops for the reduction or the label check.
#include <cmath>
#include <cstdint>
#include <limits>

#include "rce.h"

namespace rce_fast {
namespace {

constexpr int64_t kParallelElems = 1 << 16;

template <typename T>
RceStats forward(const T* z, const int64_t* target, T* loss, T* lse, int64_t n, int64_t L,
                 int64_t stride, int64_t ignore_index, double inv_t, int threads) {
  const T it = static_cast<T>(inv_t);
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
  double loss_sum = 0.0;
  int64_t kept = 0;
  int64_t bad_row = n;  // min-reduced; n means none
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (n * L >= kParallelElems) \
    reduction(+ : loss_sum, kept) reduction(min : bad_row)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* row = z + i * stride;
    T m = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j < L; ++j) m = std::fmax(m, row[j] * it);
    const T shift = std::isinf(m) && m < 0 ? T(0) : m;
    T s = 0, tot = 0;
    for (int64_t j = 0; j < L; ++j) {
      const T u = row[j] * it;
      s += std::exp(u - shift);
      tot += u;
    }
    const int64_t y = target[i];
    const bool keep = y != ignore_index;
    const bool in_range = y >= 0 && y < L;
    if (keep && !in_range && i < bad_row) bad_row = i;
    const int64_t yc = in_range ? y : 0;  // never read out of bounds
    const T l = m + std::log(s);
    lse[i] = l;
    const T li = keep ? l - (tot - row[yc] * it) * inv_lm1 : T(0);
    loss[i] = li;
    loss_sum += static_cast<double>(li);
    kept += keep ? 1 : 0;
  }
  RceStats stats;
  stats.loss_sum = loss_sum;
  stats.kept = kept;
  stats.bad_row = bad_row < n ? bad_row : -1;
  return stats;
}

template <typename T>
void backward(const T* grad_rows, double grad_scale, const T* z, const int64_t* target,
              const T* lse, T* grad, int64_t n, int64_t L, int64_t stride,
              int64_t ignore_index, double inv_t, int threads) {
  const T it = static_cast<T>(inv_t);
  const T uniform = static_cast<T>(grad_scale) * it;
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (n * L >= kParallelElems)
#endif
  for (int64_t i = 0; i < n; ++i) {
    const T* row = z + i * stride;
    T* out = grad + i * L;
    const int64_t y = target[i];
    if (y == ignore_index) {
      for (int64_t j = 0; j < L; ++j) out[j] = T(0);
      continue;
    }
    const T g = grad_rows != nullptr ? grad_rows[i] * it : uniform;
    const T l = lse[i];
    for (int64_t j = 0; j < L; ++j) out[j] = g * (std::exp(row[j] * it - l) - inv_lm1);
    out[y] += g * inv_lm1;
  }
}

}  // namespace

RceStats rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse,
                         int64_t n, int64_t L, int64_t stride, int64_t ignore_index,
                         double inv_t, bool is_double, int threads) {
  if (is_double) {
    return forward(static_cast<const double*>(z), target, static_cast<double*>(loss),
                   static_cast<double*>(lse), n, L, stride, ignore_index, inv_t, threads);
  }
  return forward(static_cast<const float*>(z), target, static_cast<float*>(loss),
                 static_cast<float*>(lse), n, L, stride, ignore_index, inv_t, threads);
}

void rce_backward_cpu(const void* grad_rows, double grad_scale, const void* z,
                      const int64_t* target, const void* lse, void* grad, int64_t n, int64_t L,
                      int64_t stride, int64_t ignore_index, double inv_t, bool is_double,
                      int threads) {
  if (is_double) {
    backward(static_cast<const double*>(grad_rows), grad_scale, static_cast<const double*>(z),
             target, static_cast<const double*>(lse), static_cast<double*>(grad), n, L, stride,
             ignore_index, inv_t, threads);
  } else {
    backward(static_cast<const float*>(grad_rows), grad_scale, static_cast<const float*>(z),
             target, static_cast<const float*>(lse), static_cast<float*>(grad), n, L, stride,
             ignore_index, inv_t, threads);
  }
}

}  // namespace rce_fast
