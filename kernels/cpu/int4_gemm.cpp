// CPU reference: linear layer with int4 weights (kernels/int4_gemm.h), fp32 throughout.
//   forward:   y[m, n]  (=|+=)  x[m, k]  . dequant(W)[n, k]^T
//   backward:  dx[m, k] (=|+=)  dy[m, n] . dequant(W)[n, k]
// The weight is dequantized once to fp32 through the format header's own definition (int4_dequant_value), then
// the product goes through the blocked CPU matmul, so this file adds no arithmetic of its own.
#include <cstdint>
#include <vector>

#include "kernels/error.h"
#include "kernels/int4_gemm.h"

namespace qkd::cpu {

void dequantize_int4(const Int4Weight& w, float* out) {
  int4_check(w, "dequantize_int4: w");
  QKD_CHECK(out != nullptr, "dequantize_int4: out is null");
  const int groups = w.k / w.group_size;
#pragma omp parallel for schedule(static)
  for (int r = 0; r < w.n; ++r) {
    const uint32_t* row = w.packed + static_cast<int64_t>(r) * (w.k / 8);
    float* dst = out + static_cast<int64_t>(r) * w.k;
    for (int g = 0; g < groups; ++g) {
      const int64_t gi = static_cast<int64_t>(r) * groups + g;
      const float s = int4_scale_to_float(w.scales[gi], w.scale_type);
      const float m = w.sym == Int4Symmetry::Asymmetric ? int4_scale_to_float(w.mins[gi], w.scale_type) : 0.0f;
      for (int c = g * w.group_size; c < (g + 1) * w.group_size; ++c) {
        dst[c] = int4_dequant_value(int4_get(row, c), s, m, w.sym);
      }
    }
  }
}

static void check_activations(const void* out, const void* in, int m, const char* what) {
  QKD_CHECK(m >= 0, "{}: m {} is negative", what, m);
  QKD_CHECK(m == 0 || (out != nullptr && in != nullptr), "{}: null activation pointer", what);
}

void int4_gemm_forward(const Int4GemmArgs<float>& a) {
  int4_check(a.w, "cpu::int4_gemm_forward: w");
  check_activations(a.y, a.x, a.m, "cpu::int4_gemm_forward");
  if (a.m == 0) return;
  std::vector<float> w(static_cast<size_t>(a.w.n) * a.w.k);
  dequantize_int4(a.w, w.data());
  matmul_forward({a.y, a.x, w.data(), a.m, a.w.n, a.w.k, a.mode});
}

void int4_gemm_backward(const Int4GemmBackwardArgs<float>& a) {
  int4_check(a.w, "cpu::int4_gemm_backward: w");
  check_activations(a.dx, a.dy, a.m, "cpu::int4_gemm_backward");
  if (a.m == 0) return;
  const int n = a.w.n, k = a.w.k;
  std::vector<float> w(static_cast<size_t>(n) * k), wt(w.size());
  dequantize_int4(a.w, w.data());
  // matmul_forward contracts over the rows' contiguous axis, so dx = dy . W needs W^T [k, n].
#pragma omp parallel for schedule(static)
  for (int c = 0; c < k; ++c) {
    for (int r = 0; r < n; ++r) wt[static_cast<size_t>(c) * n + r] = w[static_cast<size_t>(r) * k + c];
  }
  matmul_forward({a.dx, a.dy, wt.data(), a.m, k, n, a.mode});
}

}  // namespace qkd::cpu
