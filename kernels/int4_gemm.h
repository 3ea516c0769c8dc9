// Linear layer with int4 weights (kernels/int4_format.h), W[n, k] in nn.Linear layout:
//   forward:   y[m, n]  (=|+=)  x[m, k]  . dequant(W)[n, k]^T
//   backward:  dx[m, k] (=|+=)  dy[m, n] . dequant(W)[n, k]          data gradient only: int4 weights are frozen
// Accumulate::Overwrite writes every output element, Accumulate::Add adds onto what is there (the residual
// stream, or a gradient summed over several paths).
// CUDA: bf16 activations, fp32 accumulation, each weight rounded to bf16 after dequantization (the tensor
// cores' operand type), except on the batch-1 decode path (m <= 2, groups of 128 or a whole row), which applies
// each group's scale in fp32 to the sum of (128 + u) x and rounds no weight. m <= 16 forward takes a memory-bound
// GEMV path, everything else a tensor-core GEMM.
// Shapes: k a multiple of 32 (the format's rule), n any positive count for the forward and a multiple of 8 for
// the backward (dy rows are read as 16-byte vectors); x/dy and the packed weight 16-byte aligned.
// CPU: fp32 throughout, with the exact fp32 dequantized weight.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/int4_format.h"
#include "kernels/matmul.h"

namespace qkd {

template <typename T>
struct Int4GemmArgs {
  T* y;          // [m, n]
  const T* x;    // [m, k]
  Int4Weight w;  // [n, k]
  int m;
  Accumulate mode = Accumulate::Overwrite;
};

template <typename T>
struct Int4GemmBackwardArgs {
  T* dx;          // [m, k]
  const T* dy;    // [m, n]
  Int4Weight w;   // [n, k]
  int m;
  Accumulate mode = Accumulate::Overwrite;
};

namespace cpu {
// out[n, k] = dequant(W), fp32 (the format's exact values).
void dequantize_int4(const Int4Weight& w, float* out);
void int4_gemm_forward(const Int4GemmArgs<float>& a);
void int4_gemm_backward(const Int4GemmBackwardArgs<float>& a);
}  // namespace cpu

namespace cuda {
void int4_gemm_forward(const Int4GemmArgs<__nv_bfloat16>& a, cudaStream_t stream);
void int4_gemm_backward(const Int4GemmBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
