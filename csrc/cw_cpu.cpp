// Fused C&W (Carlini-Wagner L2) update step on CPU: everything a step does after the
// model's input gradient, in ONE pass over the batch instead of about ten tensor ops
// (gradient through the distance and the tanh box, Adam, best-so-far bookkeeping, the
// next iterate and its distance). The model's forward and backward are all that is left.
//
// tanh(w) = sign(w) (1 - e) / (1 + e), e = exp(-2|w|) with vec_exp.h's branch-free exp,
// and its Taylor series below |w| = 0.25: absolute error below one float ulp of 1
// (tests/test_cw_fused.py), so x' stays inside [lo, hi] up to the same rounding as
// before, and a relative error of a few ulps near 0. Each row's squared distance is summed in kLanes fixed double accumulators, so
// the baseline and AVX2 copies (compiled with -ffp-contract=off) return the same bits.
#include <cmath>
#include <cstdint>

#include "cw.h"
#include "rce.h"
#include "vec_exp.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define RCE_FAST_CW_X86 1
// flatten: everything the copy calls (exp_flush included) is inlined into it, compiled for
// its ISA. Without it, link-time optimisation left exp_flush out of line in the AVX2 copy:
// a call per element, with AVX/SSE transitions, 12x slower than the baseline copy.
#define RCE_FAST_CW_AVX2 __attribute__((target("avx2"), flatten))
#define RCE_FAST_CW_BASE __attribute__((flatten))
#else
#define RCE_FAST_CW_AVX2
#define RCE_FAST_CW_BASE
#endif
#if defined(__GNUC__)
#define RCE_FAST_CW_INLINE inline __attribute__((always_inline))
#else
#define RCE_FAST_CW_INLINE inline
#endif

namespace rce_fast {
namespace {

constexpr int kLanes = 16;

// tanh(w) from w and e = exp(-2|w|) (computed by the caller, in its own loop).
RCE_FAST_CW_INLINE float tanh_from(float w, float e) {
  const float a = std::fabs(w);
  const float far = (1.0f - e) / (1.0f + e);
  // Below 0.25, 1 - e cancels (relative error ~ulp / a): the Taylor series to a^9 there
  // (the first term left out is below 1e-8 relative), so tanh keeps a relative error of
  // a few ulps down to the subnormals, where it returns a itself. Both are computed and
  // one selected: the loop stays branch-free.
  const float a2 = a * a;
  const float near = a + a * a2 * (-1.0f / 3.0f + a2 * (2.0f / 15.0f + a2 * (-17.0f / 315.0f
                                                                   + a2 * (62.0f / 2835.0f))));
  const float t = a < 0.25f ? near : far;
  return std::copysign(t, w);
}

constexpr int64_t kBlock = 256;  // elements per pass: the block's buffers stay in L1

// One row in blocks of kBlock elements; each block runs as a few simple loops (Adam,
// then tanh, then the next iterate and its distance), which the compiler vectorises
// (one loop doing everything stayed scalar, with a branch per select). Each element's
// arithmetic is the same whatever the vector width (no fma: -ffp-contract=off), and the
// squared distances go to kLanes double accumulators by index, summed in a fixed order,
// so every compiled copy returns the same bits.
template <bool kCopyBest>
RCE_FAST_CW_INLINE double update_row(const float* __restrict__ g, float* __restrict__ w,
                                     float* __restrict__ m, float* __restrict__ v,
                                     float* __restrict__ t, float* __restrict__ xp,
                                     const float* __restrict__ x, float* __restrict__ best,
                                     int64_t n, float b1, float one_minus_b1, float b2,
                                     float one_minus_b2, float step_size, float inv_sqrt_bc2,
                                     float eps, float half, float mid) {
  double acc[kLanes] = {0.0};
  float e[kBlock], d2[kBlock];
  for (int64_t j0 = 0; j0 < n; j0 += kBlock) {
    const int64_t len = n - j0 < kBlock ? n - j0 : kBlock;
    const float* gb = g + j0;
    const float* xb = x + j0;
    float* wb = w + j0;
    float* mb = m + j0;
    float* vb = v + j0;
    float* tb = t + j0;
    float* pb = xp + j0;
    if (kCopyBest)
      for (int64_t k = 0; k < len; ++k) best[j0 + k] = pb[k];
    for (int64_t k = 0; k < len; ++k) {
      const float tt = tb[k];
      float gw = gb[k] + 2.0f * (pb[k] - xb[k]);
      gw = gw - (gw * tt) * tt;
      gw = gw * half;
      const float mm = b1 * mb[k] + one_minus_b1 * gw;
      const float vv = b2 * vb[k] + one_minus_b2 * (gw * gw);
      mb[k] = mm;
      vb[k] = vv;
      wb[k] = wb[k] - step_size * (mm / (std::sqrt(vv) * inv_sqrt_bc2 + eps));
    }
    for (int64_t k = 0; k < len; ++k) e[k] = exp_flush(-2.0f * std::fabs(wb[k]));
    for (int64_t k = 0; k < len; ++k) {
      const float ww = wb[k];
      const float tn = tanh_from(ww, e[k]);
      const float xn = tn * half + mid;
      tb[k] = tn;
      pb[k] = xn;
      const float d = xn - xb[k];
      d2[k] = d * d;
    }
    for (int64_t k0 = 0; k0 < len; k0 += kLanes) {
      const int64_t lanes = len - k0 < kLanes ? len - k0 : kLanes;
      for (int64_t k = 0; k < lanes; ++k) acc[k] += static_cast<double>(d2[k0 + k]);
    }
  }
  double s[kLanes / 2];
  for (int k = 0; k < kLanes / 2; ++k) s[k] = acc[k] + acc[k + kLanes / 2];
  for (int h = kLanes / 4; h >= 1; h /= 2)
    for (int k = 0; k < h; ++k) s[k] = s[k] + s[k + h];
  return s[0];
}

#define RCE_FAST_CW_KERNELS(SUFFIX, ATTR)                                                    \
  ATTR double row_##SUFFIX(const float* g, float* w, float* m, float* v, float* t, float* xp, \
                           const float* x, float* best, bool copy, int64_t n, float b1,     \
                           float b1c, float b2, float b2c, float ss, float isb, float eps,  \
                           float half, float mid) {                                         \
    return copy ? update_row<true>(g, w, m, v, t, xp, x, best, n, b1, b1c, b2, b2c, ss, isb, \
                                   eps, half, mid)                                          \
                : update_row<false>(g, w, m, v, t, xp, x, best, n, b1, b1c, b2, b2c, ss,    \
                                    isb, eps, half, mid);                                   \
  }                                                                                         \
  ATTR void tanh_##SUFFIX(const float* x, float* y, int64_t n) {                            \
    for (int64_t i = 0; i < n; ++i) y[i] = exp_flush(-2.0f * std::fabs(x[i]));              \
    for (int64_t i = 0; i < n; ++i) y[i] = tanh_from(x[i], y[i]);                           \
  }

RCE_FAST_CW_KERNELS(base, RCE_FAST_CW_BASE)
#ifdef RCE_FAST_CW_X86
RCE_FAST_CW_KERNELS(avx2, RCE_FAST_CW_AVX2)
#endif
#undef RCE_FAST_CW_KERNELS

bool cw_use_avx2(int isa) {
#ifdef RCE_FAST_CW_X86
  if (isa == kIsaBaseline) return false;
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") != 0;
  }();
  return has;
#else
  (void)isa;
  return false;
#endif
}

}  // namespace

void cw_update_cpu(const float* g, float* w, float* m, float* v, float* t, float* xp,
                   const float* x, float* best, const uint8_t* improved, float* l2,
                   int64_t B, int64_t n, const CwAdam& adam, double half, double mid,
                   int threads, int isa) {
  const bool avx2 = cw_use_avx2(isa);
  const float b1 = static_cast<float>(adam.beta1), b2 = static_cast<float>(adam.beta2);
  const float b1c = static_cast<float>(1.0 - adam.beta1);
  const float b2c = static_cast<float>(1.0 - adam.beta2);
  const float ss = static_cast<float>(adam.step_size);
  const float isb = static_cast<float>(adam.inv_sqrt_bc2);
  const float eps = static_cast<float>(adam.eps);
  const float fh = static_cast<float>(half), fm = static_cast<float>(mid);
#pragma omp parallel for num_threads(threads) if (B * n >= (1 << 15)) schedule(static)
  for (int64_t r = 0; r < B; ++r) {
    const int64_t o = r * n;
    const bool copy = improved[r] != 0;
    double s;
#ifdef RCE_FAST_CW_X86
    if (avx2)
      s = row_avx2(g + o, w + o, m + o, v + o, t + o, xp + o, x + o, best + o, copy, n, b1,
                   b1c, b2, b2c, ss, isb, eps, fh, fm);
    else
#endif
      s = row_base(g + o, w + o, m + o, v + o, t + o, xp + o, x + o, best + o, copy, n, b1,
                   b1c, b2, b2c, ss, isb, eps, fh, fm);
    l2[r] = static_cast<float>(s);
  }
  (void)avx2;
}

void cw_tanh_cpu(const float* x, float* y, int64_t n, int isa) {
#ifdef RCE_FAST_CW_X86
  if (cw_use_avx2(isa)) {
    tanh_avx2(x, y, n);
    return;
  }
#endif
  (void)isa;
  tanh_base(x, y, n);
}

}  // namespace rce_fast
