// Fused RCE loss on CPU (see rce_cpu.cpp). Pointers to float32 or float64 buffers
// (is_double), row stride of z in elements, labels int64 (range-checked by the caller).
#pragma once
#include <cstdint>

namespace rce_fast {

void rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse, int64_t n,
                     int64_t L, int64_t stride, int64_t ignore_index, double inv_t,
                     bool is_double, int threads);

void rce_backward_cpu(const void* grad_rows, const void* z, const int64_t* target,
                      const void* lse, void* grad, int64_t n, int64_t L, int64_t stride,
                      int64_t ignore_index, double inv_t, bool is_double, int threads);

}  // namespace rce_fast
