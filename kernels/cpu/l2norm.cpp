// CPU reference: row-wise L2 normalisation (kernels/l2norm.h).
//   forward:   norm[r] = max(||x[r]||, eps);  out[r] = x[r] / norm[r]                      (both overwritten)
//   backward:  dx[r] += (dout[r] - out[r] (dout[r] . out[r])) / norm[r],  or dout[r] / eps where ||x[r]|| < eps
// Sums of squares and dot products run in double. The norm is stored as float whatever T (the header's type),
// so a double run's backward sees it rounded to fp32: a relative error of 2^-24 in dx, far below what its
// finite-difference check resolves.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "kernels/error.h"
#include "kernels/l2norm.h"

namespace qkd::cpu {

namespace {

template <typename T>
double row_norm(const T* x, int dim) {
  double sum_sq = 0.0;
  for (int i = 0; i < dim; ++i) sum_sq += static_cast<double>(x[i]) * x[i];
  return std::sqrt(sum_sq);
}

void check(int rows, int dim, float eps, const char* what) {
  QKD_CHECK(rows >= 0, "{}: rows {} is negative", what, rows);
  QKD_CHECK(dim > 0, "{}: dim {} must be positive", what, dim);
  QKD_CHECK(eps > 0.0f, "{}: eps {} must be positive", what, eps);
}

template <typename T>
void forward_impl(const L2NormArgs<T>& a) {
  check(a.rows, a.dim, a.eps, "l2norm_forward");
#pragma omp parallel for schedule(static) if (a.rows > 4)
  for (int r = 0; r < a.rows; ++r) {
    const T* x = a.x + static_cast<int64_t>(r) * a.dim;
    T* out = a.out + static_cast<int64_t>(r) * a.dim;
    const double norm = std::max(row_norm(x, a.dim), static_cast<double>(a.eps));
    for (int i = 0; i < a.dim; ++i) out[i] = static_cast<T>(x[i] / norm);
    a.norm[r] = static_cast<float>(norm);
  }
}

template <typename T>
void backward_impl(const L2NormBackwardArgs<T>& a) {
  check(a.rows, a.dim, a.eps, "l2norm_backward");
#pragma omp parallel for schedule(static) if (a.rows > 4)
  for (int r = 0; r < a.rows; ++r) {
    const int64_t off = static_cast<int64_t>(r) * a.dim;
    const T* dout = a.dout + off;
    const T* out = a.out + off;
    T* dx = a.dx + off;
    if (row_norm(a.x + off, a.dim) < a.eps) {  // the clamped branch: out = x / eps, a linear map
      for (int i = 0; i < a.dim; ++i) dx[i] += static_cast<T>(dout[i] / static_cast<double>(a.eps));
      continue;
    }
    double dot = 0.0;
    for (int i = 0; i < a.dim; ++i) dot += static_cast<double>(dout[i]) * out[i];
    const double inv_norm = 1.0 / a.norm[r];
    for (int i = 0; i < a.dim; ++i) dx[i] += static_cast<T>((dout[i] - out[i] * dot) * inv_norm);
  }
}

}  // namespace

void l2norm_forward(const L2NormArgs<float>& a) { forward_impl(a); }
void l2norm_forward(const L2NormArgs<double>& a) { forward_impl(a); }
void l2norm_backward(const L2NormBackwardArgs<float>& a) { backward_impl(a); }
void l2norm_backward(const L2NormBackwardArgs<double>& a) { backward_impl(a); }

}  // namespace qkd::cpu
