// Fused C&W update step on CPU (see cw_cpu.cpp).
#pragma once
#include <cstdint>

namespace rce_fast {

struct CwAdam {
  double lr, beta1, beta2, eps;
  double step_size;        // lr / (1 - beta1^step), computed by the caller
  double inv_sqrt_bc2;     // 1 / sqrt(1 - beta2^step)
};

// One step after the model's input gradient g = d(model term)/dx' is known, for a batch
// of B rows of n float32 features (contiguous):
//   gw   = (g + 2 (x' - x)) * (1 - t^2) * half            d loss / d w
//   Adam (torch's: m = b1 m + (1 - b1) gw, v = b2 v + (1 - b2) gw^2,
//         w -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps))
//   best[r] = x' (before the update) for rows with improved[r]
//   t = tanh(w), x' = t * half + mid, l2[r] = sum (x' - x)^2 (after the update)
// w, m, v, t, xp, best are updated in place; g is read only.
// isa: as in rce.h (kIsaAuto, kIsaBaseline, kIsaAvx2); every copy gives the same bits.
void cw_update_cpu(const float* g, float* w, float* m, float* v, float* t, float* xp,
                   const float* x, float* best, const uint8_t* improved, float* l2,
                   int64_t B, int64_t n, const CwAdam& adam, double half, double mid,
                   int threads, int isa);

// y = tanh(x) as the update computes it (tests measure its error).
void cw_tanh_cpu(const float* x, float* y, int64_t n, int isa);

}  // namespace rce_fast
