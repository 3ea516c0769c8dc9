// CPU reference: RMSNorm, optionally fused with the residual add before it, and its backward (kernels/rmsnorm.h).
//   if add:  x += add                                   (x updated in place)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr)
// backward, with n = x * rstd and g = dout * weight:
//   dx[r]   += rstd * (g - n * mean(g * n))             (accumulates)
//   dweight += sum_r dout[r] * n[r]                     (accumulates; skipped when dweight == nullptr)
// fp32 and fp64 share one template; the fp64 instance exists for the finite-difference checks. Every row
// reduction (sum of squares, mean(g * n), the dweight column sums) is accumulated in double: one extra
// conversion per element, and it keeps the reference exact to the storage type's rounding for any dim or row
// count.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kernels/error.h"
#include "kernels/rmsnorm.h"

namespace qkd::cpu {
namespace {

// dweight is reduced over rows by column strips: each strip belongs to one thread, which walks the rows in
// order, so the sums are the same bits whatever the thread count. 64 columns = one 256-byte fp32 run per row.
constexpr int kColumnStrip = 64;

template <typename T>
void forward_impl(const RmsNormArgs<T>& a) {
  QKD_CHECK(a.rows >= 0, "rmsnorm_forward: rows {} is negative", a.rows);
  QKD_CHECK(a.dim > 0, "rmsnorm_forward: dim {} must be positive", a.dim);
  QKD_CHECK(a.eps >= 0.0f, "rmsnorm_forward: eps {} is negative", a.eps);
  QKD_CHECK(a.out != a.x || a.rows == 0, "rmsnorm_forward: out may not alias x (x is the residual stream)");
#pragma omp parallel for schedule(static) if (a.rows > 4)
  for (int r = 0; r < a.rows; ++r) {
    T* x = a.x + static_cast<int64_t>(r) * a.dim;
    T* out = a.out + static_cast<int64_t>(r) * a.dim;
    if (a.add != nullptr) {
      const T* add = a.add + static_cast<int64_t>(r) * a.dim;
      for (int i = 0; i < a.dim; ++i) x[i] += add[i];
    }
    double sum_sq = 0.0;
    for (int i = 0; i < a.dim; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
    const double rstd_exact = 1.0 / std::sqrt(sum_sq / a.dim + static_cast<double>(a.eps));
    const T rstd = static_cast<T>(rstd_exact);
    // (x * rstd) * weight in that order, as Hugging Face's LlamaRMSNorm does.
    for (int i = 0; i < a.dim; ++i) out[i] = (x[i] * rstd) * a.weight[i];
    if (a.rstd != nullptr) a.rstd[r] = static_cast<float>(rstd_exact);
  }
}

template <typename T>
void backward_impl(const RmsNormBackwardArgs<T>& a) {
  QKD_CHECK(a.rows >= 0, "rmsnorm_backward: rows {} is negative", a.rows);
  QKD_CHECK(a.dim > 0, "rmsnorm_backward: dim {} must be positive", a.dim);
  if (a.rows == 0) return;
  QKD_CHECK(a.dx != nullptr && a.dout != nullptr && a.x != nullptr && a.weight != nullptr && a.rstd != nullptr,
            "rmsnorm_backward: dx, dout, x, weight and rstd are required (dx {}, dout {}, x {}, weight {}, rstd {})",
            static_cast<const void*>(a.dx), static_cast<const void*>(a.dout), static_cast<const void*>(a.x),
            static_cast<const void*>(a.weight), static_cast<const void*>(a.rstd));
  // The dweight strips read dout and x after every dx row has been written: they must be other buffers.
  QKD_CHECK(a.dx != a.dout && a.dx != a.x, "rmsnorm_backward: dx may not alias dout or x");
  // rstd is the forward's fp32 value in both instances: the args carry no eps to recompute it from x. For the
  // fp64 instance that costs a relative 3e-8 (half an fp32 ulp) in n and rstd, far below the 1e-6 that the
  // finite-difference checks resolve.
#pragma omp parallel if (static_cast<int64_t>(a.rows) * a.dim > 4096)
  {
#pragma omp for schedule(static)
    for (int r = 0; r < a.rows; ++r) {
      const int64_t o = static_cast<int64_t>(r) * a.dim;
      const T* dout = a.dout + o;
      const T* x = a.x + o;
      T* dx = a.dx + o;
      const T rstd = static_cast<T>(a.rstd[r]);
      double gn = 0.0;
      for (int i = 0; i < a.dim; ++i) gn += static_cast<double>(dout[i] * a.weight[i]) * (x[i] * rstd);
      const T mean_gn = static_cast<T>(gn / a.dim);
      for (int i = 0; i < a.dim; ++i) dx[i] += rstd * (dout[i] * a.weight[i] - (x[i] * rstd) * mean_gn);
    }
    if (a.dweight != nullptr) {
      const int n_strips = (a.dim + kColumnStrip - 1) / kColumnStrip;
      std::vector<double> sum(kColumnStrip);
#pragma omp for schedule(static)
      for (int s = 0; s < n_strips; ++s) {
        const int c0 = s * kColumnStrip, c1 = std::min(a.dim, c0 + kColumnStrip);
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int r = 0; r < a.rows; ++r) {
          const int64_t o = static_cast<int64_t>(r) * a.dim;
          const T rstd = static_cast<T>(a.rstd[r]);
          for (int i = c0; i < c1; ++i) sum[i - c0] += static_cast<double>(a.dout[o + i]) * (a.x[o + i] * rstd);
        }
        for (int i = c0; i < c1; ++i) a.dweight[i] += static_cast<acc_t<T>>(sum[i - c0]);
      }
    }
  }
}

}  // namespace

void rmsnorm_forward(const RmsNormArgs<float>& a) { forward_impl(a); }
void rmsnorm_forward(const RmsNormArgs<double>& a) { forward_impl(a); }
void rmsnorm_backward(const RmsNormBackwardArgs<float>& a) { backward_impl(a); }
void rmsnorm_backward(const RmsNormBackwardArgs<double>& a) { backward_impl(a); }

}  // namespace qkd::cpu
