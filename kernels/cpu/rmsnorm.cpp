// CPU reference: RMSNorm, optionally fused with the residual add before it (kernels/rmsnorm.h).
//   if add:  x += add                                   (x updated in place)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr)
// The sum of squares is accumulated in double: it is one extra conversion per element, and it keeps the
// reference's rstd exact to fp32 rounding for any dim. The backward will sit beside the forward in this file.
#include <cmath>
#include <cstdint>

#include "kernels/error.h"
#include "kernels/rmsnorm.h"

namespace qkd::cpu {

void rmsnorm_forward(const RmsNormArgs<float>& a) {
  QKD_CHECK(a.rows >= 0, "rmsnorm_forward: rows {} is negative", a.rows);
  QKD_CHECK(a.dim > 0, "rmsnorm_forward: dim {} must be positive", a.dim);
  QKD_CHECK(a.eps >= 0.0f, "rmsnorm_forward: eps {} is negative", a.eps);
  QKD_CHECK(a.out != a.x || a.rows == 0, "rmsnorm_forward: out may not alias x (x is the residual stream)");
#pragma omp parallel for schedule(static) if (a.rows > 4)
  for (int r = 0; r < a.rows; ++r) {
    float* x = a.x + static_cast<int64_t>(r) * a.dim;
    float* out = a.out + static_cast<int64_t>(r) * a.dim;
    if (a.add != nullptr) {
      const float* add = a.add + static_cast<int64_t>(r) * a.dim;
      for (int i = 0; i < a.dim; ++i) x[i] += add[i];
    }
    double sum_sq = 0.0;
    for (int i = 0; i < a.dim; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
    const float rstd = static_cast<float>(1.0 / std::sqrt(sum_sq / a.dim + static_cast<double>(a.eps)));
    // (x * rstd) * weight in that order, as Hugging Face's LlamaRMSNorm does.
    for (int i = 0; i < a.dim; ++i) out[i] = (x[i] * rstd) * a.weight[i];
    if (a.rstd != nullptr) a.rstd[r] = rstd;
  }
}

}  // namespace qkd::cpu
