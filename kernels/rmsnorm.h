// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block.
//   if add:  x += add                                   (x updated in place: the residual stream)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten; may not alias x)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr, kept for backward)
// backward, with n = x * rstd the normalised row and g = dout * weight:
//   dx[r]      += rstd * (g - n * mean(g * n))            (accumulates: dx is the residual stream's gradient)
//   dweight    += sum_r dout[r] * n[r]                    (accumulates, in acc_t<T>; deterministic order)
// The residual add of the forward has the identity as its gradient, so the backward needs no `add` input.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/dtype.h"

namespace qkd {

template <typename T>
struct RmsNormArgs {
  T* out;            // [rows, dim]
  T* x;              // [rows, dim]  residual stream; updated in place when add != nullptr
  const T* add;      // [rows, dim]  or nullptr
  const T* weight;   // [dim]
  float* rstd;       // [rows]       or nullptr
  int rows, dim;
  float eps;
};

template <typename T>
struct RmsNormBackwardArgs {
  T* dx;               // [rows, dim]  accumulated (+=)
  acc_t<T>* dweight;   // [dim]        accumulated (+=), or nullptr when the weight is frozen
  const T* dout;       // [rows, dim]
  const T* x;          // [rows, dim]  the forward's normalised input (after its residual add)
  const T* weight;     // [dim]
  const float* rstd;   // [rows]       from the forward
  int rows, dim;
  float* scratch = nullptr;  // CUDA only: [rmsnorm_backward_scratch_floats(rows, dim)] for the dweight partials
};

namespace cpu {
void rmsnorm_forward(const RmsNormArgs<float>& a);
void rmsnorm_forward(const RmsNormArgs<double>& a);
void rmsnorm_backward(const RmsNormBackwardArgs<float>& a);
void rmsnorm_backward(const RmsNormBackwardArgs<double>& a);
}  // namespace cpu
namespace cuda {
void rmsnorm_forward(const RmsNormArgs<__nv_bfloat16>& a, cudaStream_t stream);
// dweight is reduced over rows through per-block partials in `scratch`, summed in a fixed order: no atomics, so
// the result is the same bits on every run (training resumes reproduce the uninterrupted run exactly).
int64_t rmsnorm_backward_scratch_floats(int rows, int dim);
void rmsnorm_backward(const RmsNormBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
