// CUDA JSMA pair search. Grid (blocks_per_image, batch): each block owns a slice of
// rows p and its threads sweep q > p; a block-wide reduction keeps the best
// (score desc, p asc, q asc), written to a per-image workspace (O(n / rows) entries).
// A second kernel reduces each image's partials. No n x n buffer anywhere.
#include <cuda_runtime.h>

#include <cstdio>
#include <stdexcept>
#include <string>

#include "jsma.h"

namespace rce_fast {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kRowsPerBlock = 64;

struct Best {
  float score;
  long long p, q;
};

__device__ __forceinline__ bool better(const Best& a, const Best& b) {
  if (a.p < 0) return false;
  if (b.p < 0) return true;
  if (a.score != b.score) return a.score > b.score;
  if (a.p != b.p) return a.p < b.p;
  return a.q < b.q;
}

__device__ __forceinline__ Best block_reduce(Best mine) {
  __shared__ float s_score[kThreads];
  __shared__ long long s_p[kThreads], s_q[kThreads];
  const int t = threadIdx.x;
  s_score[t] = mine.score;
  s_p[t] = mine.p;
  s_q[t] = mine.q;
  __syncthreads();
  for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
    if (t < stride) {
      Best other{s_score[t + stride], s_p[t + stride], s_q[t + stride]};
      Best cur{s_score[t], s_p[t], s_q[t]};
      if (better(other, cur)) {
        s_score[t] = other.score;
        s_p[t] = other.p;
        s_q[t] = other.q;
      }
    }
    __syncthreads();
  }
  return Best{s_score[0], s_p[0], s_q[0]};
}

__global__ void pairs_partial_kernel(const float* __restrict__ alpha,
                                     const float* __restrict__ beta,
                                     const unsigned char* __restrict__ domain, float* ws_score,
                                     long long* ws_pair, long long n, bool increase) {
  const long long img = blockIdx.y;
  const float* a = alpha + img * n;
  const float* b = beta + img * n;
  const unsigned char* d = domain + img * n;
  const long long p0 = static_cast<long long>(blockIdx.x) * kRowsPerBlock;
  const long long p1 = p0 + kRowsPerBlock < n ? p0 + kRowsPerBlock : n;
  Best best{0.0f, -1, -1};
  for (long long p = p0; p < p1; ++p) {
    if (!d[p]) continue;
    const float ap = a[p], bp = b[p];
    // Each thread walks q in increasing order, so its first hit of a score is its lowest q.
    for (long long q = p + 1 + threadIdx.x; q < n; q += kThreads) {
      if (!d[q]) continue;
      const float sa = __fadd_rn(ap, a[q]);
      const float sb = __fadd_rn(bp, b[q]);
      const bool ok = increase ? (sa > 0.0f && sb < 0.0f) : (sa < 0.0f && sb > 0.0f);
      if (!ok) continue;
      const Best cand{__fmul_rn(sa, -sb), p, q};
      if (better(cand, best)) best = cand;
    }
  }
  const Best r = block_reduce(best);
  if (threadIdx.x == 0) {
    const long long slot = img * gridDim.x + blockIdx.x;
    ws_score[slot] = r.score;
    ws_pair[2 * slot] = r.p;
    ws_pair[2 * slot + 1] = r.q;
  }
}

__global__ void pairs_final_kernel(const float* ws_score, const long long* ws_pair,
                                   long long* out, long long blocks) {
  const long long img = blockIdx.x;
  Best best{0.0f, -1, -1};
  for (long long i = threadIdx.x; i < blocks; i += kThreads) {
    const long long slot = img * blocks + i;
    const Best cand{ws_score[slot], ws_pair[2 * slot], ws_pair[2 * slot + 1]};
    if (better(cand, best)) best = cand;
  }
  const Best r = block_reduce(best);
  if (threadIdx.x == 0) {
    out[2 * img] = r.p;
    out[2 * img + 1] = r.q;
  }
}

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("rce_fast._C ") + what + ": " +
                             cudaGetErrorString(err));
  }
}

}  // namespace

ProbeResult jsma_cuda_probe() {
  int driver = 0, runtime = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess || driver == 0)
    return {"no CUDA driver is loaded", true};
  cudaRuntimeGetVersion(&runtime);
  const auto version = [](int v) {
    return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
  };
  // Minor-version compatibility lets an older driver of the same major version run it;
  // an older major cannot.
  if (driver / 1000 < runtime / 1000)
    return {"the CUDA driver supports CUDA " + version(driver) + ", older than the CUDA " +
                version(runtime) + " runtime rce_fast._C was built with (update the driver, " +
                "or rebuild with an nvcc no newer than the driver)",
            true};
  // On the caller's current device (no cudaSetDevice here: that could create a context
  // on another GPU, and change the device current for everything else in the thread).
  cudaFuncAttributes attr;
  cudaError_t err = cudaFuncGetAttributes(&attr, pairs_partial_kernel);
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attr, pairs_final_kernel);
  if (err == cudaSuccess) return {"", true};
  cudaGetLastError();  // clear the (non-sticky) error for the caller
  int device = -1;
  cudaGetDevice(&device);
  // Only a missing or incompatible kernel image, or a driver too old, is a property of
  // the build and the device; anything else (a transient or sticky error) may pass.
  const bool permanent = err == cudaErrorNoKernelImageForDevice ||
                         err == cudaErrorInsufficientDriver ||
                         err == cudaErrorUnsupportedPtxVersion ||
                         err == cudaErrorInvalidKernelImage ||
                         err == cudaErrorSystemDriverMismatch;
  return {"the CUDA kernels cannot run on device " + std::to_string(device) + " (" +
              cudaGetErrorString(err) + "; rce_fast._C holds code for the GPUs chosen by " +
              "CMAKE_CUDA_ARCHITECTURES at build time)",
          permanent};
}

int64_t jsma_cuda_blocks_per_image(int64_t n) {
  return n <= 0 ? 1 : (n + kRowsPerBlock - 1) / kRowsPerBlock;
}

void jsma_pairs_cuda(const float* alpha, const float* beta, const uint8_t* domain,
                     int64_t* out, float* ws_score, int64_t* ws_pair, int64_t batch,
                     int64_t n, bool increase, void* stream) {
  if (batch == 0) return;
  if (batch > 65535) throw std::invalid_argument("jsma_pairs_cuda: batch > 65535");
  const int64_t blocks = jsma_cuda_blocks_per_image(n);
  auto s = static_cast<cudaStream_t>(stream);
  pairs_partial_kernel<<<dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(batch)),
                         kThreads, 0, s>>>(alpha, beta, domain, ws_score,
                                           reinterpret_cast<long long*>(ws_pair), n, increase);
  check(cudaGetLastError(), "pairs_partial_kernel launch");
  pairs_final_kernel<<<static_cast<unsigned>(batch), kThreads, 0, s>>>(
      ws_score, reinterpret_cast<const long long*>(ws_pair),
      reinterpret_cast<long long*>(out), blocks);
  check(cudaGetLastError(), "pairs_final_kernel launch");
}

}  // namespace rce_fast
