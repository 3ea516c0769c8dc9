// CPU reference: the AdamW step and the sum of squares for gradient-norm clipping (kernels/adamw.h).
//   g = grad_scale grad;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2          (m, v updated)
//   p -= lr ((m / bc1) / (sqrt(v / bc2) + eps) + weight_decay p),  bc_i = 1 - beta_i^step      (p updated)
//   param_bf16 = bf16(p) when given;   sum_squares = sum x^2 in double
// The update is written operation by operation in the order of the CUDA kernel, whose _rn intrinsics forbid
// fused multiply-adds just as -ffp-contract=off does here; division and sqrt are correctly rounded on both. So
// the two agree bit for bit, and at worst (a compiler that fused anyway) within a few fp32 roundings.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/adamw.h"
#include "kernels/dtype.h"
#include "kernels/error.h"

namespace qkd::cpu {

void adamw_update(const AdamWArgs& a) {
  QKD_CHECK(a.n >= 0, "adamw_update: n {} is negative", a.n);
  QKD_CHECK(a.step >= 1, "adamw_update: step {} must be >= 1 (the bias corrections are 1-based)", a.step);
  QKD_CHECK(a.beta1 >= 0.0f && a.beta1 < 1.0f && a.beta2 >= 0.0f && a.beta2 < 1.0f,
            "adamw_update: beta1 {} and beta2 {} must lie in [0, 1)", a.beta1, a.beta2);
  QKD_CHECK(a.eps > 0.0f, "adamw_update: eps {} must be positive", a.eps);
  // The bias corrections in double, rounded once; cuda::adamw_update computes them with this same expression.
  const float bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta1), static_cast<double>(a.step)));
  const float bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta2), static_cast<double>(a.step)));
  const float one_minus_beta1 = 1.0f - a.beta1, one_minus_beta2 = 1.0f - a.beta2;
#pragma omp parallel for schedule(static) if (a.n > 65536)
  for (int64_t i = 0; i < a.n; ++i) {
    const float g = a.grad_scale * a.grad[i];
    const float m = a.beta1 * a.m[i] + one_minus_beta1 * g;
    const float v = a.beta2 * a.v[i] + one_minus_beta2 * (g * g);
    const float m_hat = m / bc1;
    const float v_hat = v / bc2;
    const float p = a.param[i];
    const float update = m_hat / (std::sqrt(v_hat) + a.eps) + a.weight_decay * p;
    const float p_new = p - a.lr * update;
    a.m[i] = m;
    a.v[i] = v;
    a.param[i] = p_new;
    if (a.param_bf16 != nullptr) {
      const uint16_t bits = float_to_bf16(p_new);
      std::memcpy(static_cast<void*>(a.param_bf16 + i), &bits, sizeof(bits));  // bf16 bits, rounded as on the GPU
    }
  }
}

double sum_squares(const float* x, int64_t n) {
  QKD_CHECK(n >= 0, "sum_squares: n {} is negative", n);
  // Fixed chunks, whatever the thread count, summed in chunk order: the same double on every machine.
  constexpr int64_t kChunk = 1 << 16;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<double> partial(static_cast<size_t>(chunks), 0.0);
#pragma omp parallel for schedule(static) if (chunks > 1)
  for (int64_t c = 0; c < chunks; ++c) {
    double acc = 0.0;
    const int64_t end = std::min(n, (c + 1) * kChunk);
    for (int64_t i = c * kChunk; i < end; ++i) acc += static_cast<double>(x[i]) * x[i];
    partial[static_cast<size_t>(c)] = acc;
  }
  double total = 0.0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace qkd::cpu
