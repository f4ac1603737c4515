// pybind11 module rce_fast._C. Takes raw data pointers and sizes from Python (no torch
// headers at build time): the Python side owns every buffer and checks every argument.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cw.h"
#include "jsma.h"
#include "rce.h"

namespace py = pybind11;

namespace {

// Last-line guards on sizes and pointers (the Python side checks tensors first): a bad
// call from Python raises ValueError instead of reading or writing out of bounds.
void require(bool ok, const char* what) {
  if (!ok) throw py::value_error(std::string("rce_fast._C: ") + what);
}

void check_rce_sizes(uintptr_t z, uintptr_t target, uintptr_t lse, uintptr_t out,
                     int64_t n, int64_t L, int64_t stride) {
  require(n >= 0, "n must be >= 0");
  require(L >= 2, "L (classes) must be >= 2");
  // Rows may overlap or repeat (a stride below L, 0 for expanded logits): they are read
  // only. The outputs are the caller's own contiguous buffers.
  require(stride >= 0, "the row stride must be >= 0");
  require(n == 0 || (z != 0 && target != 0 && lse != 0 && out != 0),
          "a null buffer pointer");
}

void check_jsma_sizes(uintptr_t alpha, uintptr_t beta, uintptr_t domain, uintptr_t out,
                      int64_t batch, int64_t n) {
  require(batch >= 0 && n >= 0, "batch and n must be >= 0");
  require(batch == 0 || n == 0 || (alpha != 0 && beta != 0 && domain != 0 && out != 0),
          "a null buffer pointer");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "rce_fast compiled kernels: the JSMA pair search (CPU, CUDA), the fused RCE loss (CPU)";
  m.def(
      "rce_forward_cpu",
      [](uintptr_t z, uintptr_t target, uintptr_t loss, uintptr_t lse, int64_t n, int64_t L,
         int64_t stride, int64_t ignore_index, double inv_t, bool is_double, int threads,
         int isa) {
        check_rce_sizes(z, target, lse, loss, n, L, stride);
        const rce_fast::RceStats st = rce_fast::rce_forward_cpu(
            reinterpret_cast<const void*>(z), reinterpret_cast<const int64_t*>(target),
            reinterpret_cast<void*>(loss), reinterpret_cast<void*>(lse), n, L, stride,
            ignore_index, inv_t, is_double, threads, isa);
        return py::make_tuple(st.loss_sum, st.kept, st.bad_row);
      },
      py::arg("z"), py::arg("target"), py::arg("loss"), py::arg("lse"), py::arg("n"),
      py::arg("L"), py::arg("stride"), py::arg("ignore_index"), py::arg("inv_t"),
      py::arg("is_double"), py::arg("threads"), py::arg("isa") = rce_fast::kIsaAuto,
      "Per-row loss and lse into the given buffers; returns (sum of losses, kept rows, "
      "first row with an out-of-range label or -1).");
  m.def(
      "rce_backward_cpu",
      [](uintptr_t grad_rows, double grad_scale, uintptr_t z, uintptr_t target, uintptr_t lse,
         uintptr_t grad, int64_t n, int64_t L, int64_t stride, int64_t ignore_index,
         double inv_t, bool is_double, int threads, int isa) {
        check_rce_sizes(z, target, lse, grad, n, L, stride);
        rce_fast::rce_backward_cpu(
            reinterpret_cast<const void*>(grad_rows), grad_scale,
            reinterpret_cast<const void*>(z), reinterpret_cast<const int64_t*>(target),
            reinterpret_cast<const void*>(lse), reinterpret_cast<void*>(grad), n, L, stride,
            ignore_index, inv_t, is_double, threads, isa);
      },
      py::arg("grad_rows"), py::arg("grad_scale"), py::arg("z"), py::arg("target"),
      py::arg("lse"), py::arg("grad"), py::arg("n"), py::arg("L"), py::arg("stride"),
      py::arg("ignore_index"), py::arg("inv_t"), py::arg("is_double"), py::arg("threads"),
      py::arg("isa") = rce_fast::kIsaAuto,
      "Gradient into grad; grad_rows = 0 (null) applies grad_scale to every row.");
  m.def(
      "exp_cpu",
      [](uintptr_t x, uintptr_t y, int64_t n, bool is_double, int isa) {
        py::gil_scoped_release release;
        rce_fast::exp_cpu(reinterpret_cast<const void*>(x), reinterpret_cast<void*>(y), n,
                          is_double, isa);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("is_double"),
      py::arg("isa") = rce_fast::kIsaAuto,
      "y = exp(x) elementwise with the fused loss's vectorised exp (for tests).");
  m.def(
      "cw_update_cpu",
      [](uintptr_t g, uintptr_t w, uintptr_t m_, uintptr_t v, uintptr_t t, uintptr_t xp,
         uintptr_t x, uintptr_t best, uintptr_t improved, uintptr_t l2, int64_t B, int64_t n,
         double lr, double beta1, double beta2, double eps, double step_size,
         double inv_sqrt_bc2, double half, double mid, int threads, int isa) {
        rce_fast::CwAdam adam{lr, beta1, beta2, eps, step_size, inv_sqrt_bc2};
        rce_fast::cw_update_cpu(
            reinterpret_cast<const float*>(g), reinterpret_cast<float*>(w),
            reinterpret_cast<float*>(m_), reinterpret_cast<float*>(v),
            reinterpret_cast<float*>(t), reinterpret_cast<float*>(xp),
            reinterpret_cast<const float*>(x), reinterpret_cast<float*>(best),
            reinterpret_cast<const uint8_t*>(improved), reinterpret_cast<float*>(l2), B, n,
            adam, half, mid, threads, isa);
      },
      py::arg("g"), py::arg("w"), py::arg("m"), py::arg("v"), py::arg("t"), py::arg("xp"),
      py::arg("x"), py::arg("best"), py::arg("improved"), py::arg("l2"), py::arg("B"),
      py::arg("n"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
      py::arg("step_size"), py::arg("inv_sqrt_bc2"), py::arg("half"), py::arg("mid"),
      py::arg("threads"), py::arg("isa") = rce_fast::kIsaAuto,
      "Fused C&W update step (float32, contiguous (B, n) buffers), see csrc/cw.h.");
  m.def(
      "cw_tanh_cpu",
      [](uintptr_t x, uintptr_t y, int64_t n, int isa) {
        rce_fast::cw_tanh_cpu(reinterpret_cast<const float*>(x), reinterpret_cast<float*>(y),
                              n, isa);
      },
      py::arg("x"), py::arg("y"), py::arg("n"), py::arg("isa") = rce_fast::kIsaAuto,
      "tanh as the fused C&W step computes it (float32).");
  m.def("cpu_isa", &rce_fast::cpu_isa_name, py::arg("isa") = rce_fast::kIsaAuto,
        "Which compiled copy of the CPU loss kernels runs: 'avx2' or 'baseline'.");
  m.attr("ISA_AUTO") = rce_fast::kIsaAuto;
  m.attr("ISA_BASELINE") = rce_fast::kIsaBaseline;
  m.attr("ISA_AVX2") = rce_fast::kIsaAvx2;
  m.def(
      "jsma_pairs_cpu",
      [](uintptr_t alpha, uintptr_t beta, uintptr_t domain, uintptr_t out, int64_t batch,
         int64_t n, bool increase, int num_threads) {
        check_jsma_sizes(alpha, beta, domain, out, batch, n);
        py::gil_scoped_release release;
        rce_fast::jsma_pairs_cpu(reinterpret_cast<const float*>(alpha),
                                 reinterpret_cast<const float*>(beta),
                                 reinterpret_cast<const uint8_t*>(domain),
                                 reinterpret_cast<int64_t*>(out), batch, n, increase,
                                 num_threads);
      },
      py::arg("alpha"), py::arg("beta"), py::arg("domain"), py::arg("out"), py::arg("batch"),
      py::arg("n"), py::arg("increase"), py::arg("num_threads") = 0);
#ifdef RCE_FAST_WITH_CUDA
  m.attr("with_cuda") = true;
  m.def("jsma_cuda_blocks_per_image", &rce_fast::jsma_cuda_blocks_per_image);
  m.def(
      "jsma_cuda_probe",
      []() {
        const rce_fast::ProbeResult r = rce_fast::jsma_cuda_probe();
        return py::make_tuple(r.why, r.permanent);
      },
      "(why, permanent): why is '' when the CUDA pair search can run on the current "
      "device, else why not; permanent: the answer holds for the process.");
  m.def(
      "jsma_pairs_cuda",
      [](uintptr_t alpha, uintptr_t beta, uintptr_t domain, uintptr_t out, uintptr_t ws_score,
         uintptr_t ws_pair, int64_t batch, int64_t n, bool increase, uintptr_t stream) {
        check_jsma_sizes(alpha, beta, domain, out, batch, n);
        py::gil_scoped_release release;
        rce_fast::jsma_pairs_cuda(
            reinterpret_cast<const float*>(alpha), reinterpret_cast<const float*>(beta),
            reinterpret_cast<const uint8_t*>(domain), reinterpret_cast<int64_t*>(out),
            reinterpret_cast<float*>(ws_score), reinterpret_cast<int64_t*>(ws_pair), batch, n,
            increase, reinterpret_cast<void*>(stream));
      },
      py::arg("alpha"), py::arg("beta"), py::arg("domain"), py::arg("out"),
      py::arg("ws_score"), py::arg("ws_pair"), py::arg("batch"), py::arg("n"),
      py::arg("increase"), py::arg("stream"));
#else
  m.attr("with_cuda") = false;
#endif
}
