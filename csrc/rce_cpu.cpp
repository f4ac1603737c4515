// Fused RCE loss forward / backward on CPU for small inputs, where a chain of PyTorch
// ops costs more in dispatch than in arithmetic (at the paper's batch, 128 x 10, the
// whole loss is ~1 microsecond of maths). One pass per row, OpenMP over rows when the
// input is large enough to pay for threads. Same maths as kernels/rce_loss.py:
//   u = z / T;  lse = logsumexp(u);  loss = lse - (sum_j u_j - u_y) / (L - 1)
//   grad = g / T * (softmax(u) - R_y),   R_y = 1/(L-1) off the label, 0 at it.
// Rows whose target equals ignore_index get loss 0 and gradient 0.
#include <cmath>
#include <cstdint>
#include <limits>

#include "rce.h"

namespace rce_fast {
namespace {

constexpr int64_t kParallelElems = 1 << 16;

template <typename T>
void forward(const T* z, const int64_t* target, T* loss, T* lse, int64_t n, int64_t L,
             int64_t stride, int64_t ignore_index, double inv_t, int threads) {
  const T it = static_cast<T>(inv_t);
  const T inv_lm1 = static_cast<T>(1.0 / static_cast<double>(L - 1));
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) if (n * L >= kParallelElems)
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
    const int64_t yc = y < 0 ? 0 : (y >= L ? L - 1 : y);
    const T l = m + std::log(s);
    lse[i] = l;
    loss[i] = keep ? l - (tot - row[yc] * it) * inv_lm1 : T(0);
  }
}

template <typename T>
void backward(const T* grad_rows, const T* z, const int64_t* target, const T* lse, T* grad,
              int64_t n, int64_t L, int64_t stride, int64_t ignore_index, double inv_t,
              int threads) {
  const T it = static_cast<T>(inv_t);
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
    const T g = grad_rows[i] * it;
    const T l = lse[i];
    for (int64_t j = 0; j < L; ++j) out[j] = g * (std::exp(row[j] * it - l) - inv_lm1);
    out[y] += g * inv_lm1;
  }
}

}  // namespace

void rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse, int64_t n,
                     int64_t L, int64_t stride, int64_t ignore_index, double inv_t,
                     bool is_double, int threads) {
  if (is_double) {
    forward(static_cast<const double*>(z), target, static_cast<double*>(loss),
            static_cast<double*>(lse), n, L, stride, ignore_index, inv_t, threads);
  } else {
    forward(static_cast<const float*>(z), target, static_cast<float*>(loss),
            static_cast<float*>(lse), n, L, stride, ignore_index, inv_t, threads);
  }
}

void rce_backward_cpu(const void* grad_rows, const void* z, const int64_t* target,
                      const void* lse, void* grad, int64_t n, int64_t L, int64_t stride,
                      int64_t ignore_index, double inv_t, bool is_double, int threads) {
  if (is_double) {
    backward(static_cast<const double*>(grad_rows), static_cast<const double*>(z), target,
             static_cast<const double*>(lse), static_cast<double*>(grad), n, L, stride,
             ignore_index, inv_t, threads);
  } else {
    backward(static_cast<const float*>(grad_rows), static_cast<const float*>(z), target,
             static_cast<const float*>(lse), static_cast<float*>(grad), n, L, stride,
             ignore_index, inv_t, threads);
  }
}

}  // namespace rce_fast
