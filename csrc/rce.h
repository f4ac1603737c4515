// Fused RCE loss on CPU (see rce_cpu.cpp). Pointers to float32 or float64 buffers
// (is_double), row stride of z in elements, labels int64. The forward reports labels
// outside [0, L) (other than ignore_index) in its stats and reads no logit with them;
// the backward must only run on labels that passed.
//
// isa picks the compiled copy of the row kernels: kIsaAuto (AVX2 where the CPU has it,
// else the x86-64 baseline), kIsaBaseline, or kIsaAvx2 (runs the baseline on a CPU
// without AVX2). Every copy returns the same bits; forcing one is for tests.
#pragma once
#include <cstdint>

namespace rce_fast {

constexpr int kIsaAuto = -1;
constexpr int kIsaBaseline = 0;
constexpr int kIsaAvx2 = 1;

struct RceStats {
  double loss_sum = 0.0;  // sum of the kept rows' losses, accumulated in double
  int64_t kept = 0;       // rows whose target is not ignore_index
  int64_t bad_row = -1;   // first row with a label outside [0, L), or -1
};

RceStats rce_forward_cpu(const void* z, const int64_t* target, void* loss, void* lse,
                         int64_t n, int64_t L, int64_t stride, int64_t ignore_index,
                         double inv_t, bool is_double, int threads, int isa = kIsaAuto);

// grad_rows: per-row upstream gradients, or nullptr to use grad_scale for every row.
void rce_backward_cpu(const void* grad_rows, double grad_scale, const void* z,
                      const int64_t* target, const void* lse, void* grad, int64_t n, int64_t L,
                      int64_t stride, int64_t ignore_index, double inv_t, bool is_double,
                      int threads, int isa = kIsaAuto);

// y[i] = exp(x[i]) with vec_exp.h's exp (subnormal results flushed to 0): the exp the
// loss uses, exposed so that tests can measure its error over the whole float range.
void exp_cpu(const void* x, void* y, int64_t n, bool is_double, int isa = kIsaAuto);

// "avx2" or "baseline": the copy that isa selects on this CPU.
const char* cpu_isa_name(int isa);

}  // namespace rce_fast
