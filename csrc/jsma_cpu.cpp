// CPU JSMA pair search: OpenMP over (image, row block) tasks, each scanning its rows
// against all later features of the compacted search domain.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "jsma.h"

namespace rce_fast {
namespace {

constexpr int64_t kRowsPerTask = 32;
constexpr int64_t kTile = 1024;
constexpr float kNone = -std::numeric_limits<float>::infinity();

struct Best {
  float score = kNone;
  int64_t p = -1, q = -1;
};

// (score desc, p asc, q asc): true when a should replace b.
inline bool better(const Best& a, const Best& b) {
  if (a.p < 0) return false;
  if (b.p < 0) return true;
  if (a.score != b.score) return a.score > b.score;
  if (a.p != b.p) return a.p < b.p;
  return a.q < b.q;
}

// Score of the pair; kNone where the sign conditions fail (NaN fails them too).
template <bool kIncrease>
inline float pair_score(float a, float b) {
  const bool ok = kIncrease ? (a > 0.0f && b < 0.0f) : (a < 0.0f && b > 0.0f);
  return ok ? a * -b : kNone;
}

// Compacted domain of one image: active feature indices (ascending) with their values.
struct Domain {
  std::vector<int64_t> idx;
  std::vector<float> a, b;
};

Domain compact(const float* alpha, const float* beta, const uint8_t* dom, int64_t n) {
  Domain d;
  for (int64_t i = 0; i < n; ++i) {
    if (dom[i]) {
      d.idx.push_back(i);
      d.a.push_back(alpha[i]);
      d.b.push_back(beta[i]);
    }
  }
  return d;
}

// Best pair whose first element lies in rows [r0, r1) of the compacted domain.
// A vectorised pass takes each tile's maximum; only a tile that beats the best so far
// is scanned again for its first (lowest q) argmax, which keeps ties deterministic.
// target_clones: AVX2 where the CPU has it, baseline SSE2 elsewhere (runtime dispatch;
// there is no multiply-add pattern to contract, so both give identical bits).
template <bool kIncrease>
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
Best search_rows(const Domain& d, int64_t r0, int64_t r1) {
  const int64_t k = static_cast<int64_t>(d.idx.size());
  const float* A = d.a.data();
  const float* B = d.b.data();
  Best best;
  for (int64_t i = r0; i < r1; ++i) {
    const float ai = A[i], bi = B[i];
    for (int64_t j0 = i + 1; j0 < k; j0 += kTile) {
      const int64_t len = std::min(kTile, k - j0);
      float m = kNone;
#pragma omp simd reduction(max : m)
      for (int64_t t = 0; t < len; ++t) {
        m = std::max(m, pair_score<kIncrease>(ai + A[j0 + t], bi + B[j0 + t]));
      }
      // Strictly better only: earlier rows / columns win ties.
      if (m > best.score) {
        for (int64_t t = 0; t < len; ++t) {
          if (pair_score<kIncrease>(ai + A[j0 + t], bi + B[j0 + t]) == m) {
            best.score = m;
            best.p = d.idx[i];
            best.q = d.idx[j0 + t];
            break;
          }
        }
      }
    }
  }
  return best;
}

}  // namespace

void jsma_pairs_cpu(const float* alpha, const float* beta, const uint8_t* domain,
                    int64_t* out, int64_t batch, int64_t n, bool increase, int num_threads) {
  std::vector<Domain> doms(batch);
  std::vector<int64_t> first_task(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    doms[b] = compact(alpha + b * n, beta + b * n, domain + b * n, n);
    const int64_t k = static_cast<int64_t>(doms[b].idx.size());
    first_task[b + 1] = first_task[b] + (k + kRowsPerTask - 1) / kRowsPerTask;
  }
  const int64_t tasks = first_task[batch];
  std::vector<Best> partial(tasks);
#ifdef _OPENMP
  const int threads = num_threads > 0 ? num_threads : omp_get_max_threads();
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
#endif
  for (int64_t t = 0; t < tasks; ++t) {
    const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), t) -
                      first_task.begin() - 1;
    const int64_t r0 = (t - first_task[b]) * kRowsPerTask;
    const int64_t k = static_cast<int64_t>(doms[b].idx.size());
    const int64_t r1 = std::min(k, r0 + kRowsPerTask);
    partial[t] = increase ? search_rows<true>(doms[b], r0, r1)
                          : search_rows<false>(doms[b], r0, r1);
  }
  for (int64_t b = 0; b < batch; ++b) {
    Best best;
    for (int64_t t = first_task[b]; t < first_task[b + 1]; ++t) {
      if (better(partial[t], best)) best = partial[t];
    }
    out[2 * b] = best.p;
    out[2 * b + 1] = best.q;
  }
}

}  // namespace rce_fast
