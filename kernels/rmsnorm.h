// RMSNorm, optionally fused with the residual add that precedes it in a pre-norm transformer block.
//   if add:  x += add                                   (x updated in place: the residual stream)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten; may not alias x)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr, kept for backward)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

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

namespace cpu {
void rmsnorm_forward(const RmsNormArgs<float>& a);
}
namespace cuda {
void rmsnorm_forward(const RmsNormArgs<__nv_bfloat16>& a, cudaStream_t stream);
}

}  // namespace qkd
