// Fused RCE loss on CPU (see rce_cpu.cpp). Pointers to float32 or float64 buffers
// (is_double), row stride of z in elements, labels int64. The forward reports labels
// outside [0, L) (other than ignore_index) in its stats and reads no logit with them;
// the backward must only run on labels that passed.
#pragma once
#include <cstdint>

namespace rce_fast {

struct RceStats {
  double loss_sum = 0.0;  // sum of the kept rows' losses, accumulated in double
  int64_t kept = 0;       // rows whose target is not ignore_index
  int64_t bad_row = -1;   // first row with a label outside [0, L), or -1
};

RceStats rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse,
                         int64_t n, int64_t L, int64_t stride, int64_t ignore_index,
                         double inv_t, bool is_double, int threads);

// grad_rows: per-row upstream gradients, or nullptr to use grad_scale for every row.
void rce_backward_cpu(const void* grad_rows, double grad_scale, const void* z,
                      const int64_t* target, const void* lse, void* grad, int64_t n, int64_t L,
                      int64_t stride, int64_t ignore_index, double inv_t, bool is_double,
                      int threads);

}  // namespace rce_fast
