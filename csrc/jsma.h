// JSMA saliency pair search (Papernot et al. 2016), the hot step of the attack.
//
// For each image b with n features, alpha = d target / dx, beta = d (sum of other
// classes) / dx and a search-domain mask, find the pair p < q of features in the domain
// maximising  score = (alpha_p + alpha_q) * -(beta_p + beta_q)  subject to
//   increase (theta > 0):  alpha_p + alpha_q > 0  and  beta_p + beta_q < 0
//   decrease (theta < 0):  alpha_p + alpha_q < 0  and  beta_p + beta_q > 0
// Ties go to the lowest (p, q) in lexicographic order, so every implementation returns
// the same pair. No valid pair: (-1, -1). Arithmetic is float32, one rounding per add
// and per product, identical on CPU and GPU. Extra memory is O(n) per image.
#pragma once
#include <cstdint>
#include <string>

namespace rce_fast {

// CPU (OpenMP): out is int64[batch * 2].
void jsma_pairs_cpu(const float* alpha, const float* beta, const uint8_t* domain,
                    int64_t* out, int64_t batch, int64_t n, bool increase, int num_threads);

#ifdef RCE_FAST_WITH_CUDA
// Whether the CUDA kernels can run on the current device: `why` is "" when they can
// (driver new enough for the runtime built in, SASS or PTX for the architecture), else
// the reason; `permanent` says the answer holds for the process (a property of the build,
// driver and device), false for an error that may be transient. Never throws.
struct ProbeResult {
  std::string why;
  bool permanent;
};
ProbeResult jsma_cuda_probe();
// Number of partial results per image the CUDA path needs in its workspace.
int64_t jsma_cuda_blocks_per_image(int64_t n);
// CUDA: all pointers are device pointers; ws_score float[batch * blocks],
// ws_pair int64[batch * blocks * 2]; stream is a cudaStream_t (0 = default).
void jsma_pairs_cuda(const float* alpha, const float* beta, const uint8_t* domain,
                     int64_t* out, float* ws_score, int64_t* ws_pair, int64_t batch,
                     int64_t n, bool increase, void* stream);
#endif

}  // namespace rce_fast
