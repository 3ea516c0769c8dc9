// Row-wise L2 normalisation, for the cosine similarities of token-level contrastive distillation.
//   forward:   out[r] = x[r] / max(||x[r]||, eps),  norm[r] = max(||x[r]||, eps)      (out, norm overwritten)
//   backward:  dx[r] += (dout[r] - out[r] * (dout[r] . out[r])) / norm[r]            (accumulates; where
//              ||x|| < eps the map is x / eps, whose gradient is dout / eps)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

template <typename T>
struct L2NormArgs {
  T* out;          // [rows, dim]
  float* norm;     // [rows]
  const T* x;      // [rows, dim]
  int rows, dim;
  float eps = 1e-6f;
};

template <typename T>
struct L2NormBackwardArgs {
  T* dx;              // [rows, dim]  accumulated (+=)
  const T* dout;      // [rows, dim]
  const T* out;       // [rows, dim]  the forward's output
  const float* norm;  // [rows]       the forward's norms
  const T* x;         // [rows, dim]  the forward's input (to tell the clamped rows)
  int rows, dim;
  float eps = 1e-6f;
};

namespace cpu {
void l2norm_forward(const L2NormArgs<float>& a);
void l2norm_forward(const L2NormArgs<double>& a);
void l2norm_backward(const L2NormBackwardArgs<float>& a);
void l2norm_backward(const L2NormBackwardArgs<double>& a);
}  // namespace cpu
namespace cuda {
void l2norm_forward(const L2NormArgs<__nv_bfloat16>& a, cudaStream_t stream);
void l2norm_backward(const L2NormBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
