// Dense linear layer in PyTorch's nn.Linear layout:  y[m, n] (=|+=) x[m, k] . w[n, k]^T
// The CPU version is the reference backend's workhorse: blocked and threaded (OpenMP), fp32 throughout.
// (The CUDA dense path is cuBLASLt, kernels/gemm.h; the int4 path is kernels/int4_gemm.h.)
// backward of y = x . w^T:
//   data:    dx[m, k]  (=|+=)  dy[m, n] . w[n, k]
//   weight:  dw[n, k]  (=|+=)  dy[m, n]^T . x[m, k]
#pragma once

#include <cstdint>

namespace qkd {

enum class Accumulate { Overwrite, Add };

struct MatmulArgs {
  float* y;         // [m, n]
  const float* x;   // [m, k]
  const float* w;   // [n, k]
  int m, n, k;
  Accumulate mode = Accumulate::Overwrite;
};

struct MatmulBackwardDataArgs {
  float* dx;        // [m, k]
  const float* dy;  // [m, n]
  const float* w;   // [n, k]
  int m, n, k;
  Accumulate mode = Accumulate::Overwrite;
};

struct MatmulBackwardWeightArgs {
  float* dw;        // [n, k]
  const float* dy;  // [m, n]
  const float* x;   // [m, k]
  int m, n, k;
  Accumulate mode = Accumulate::Add;
};

namespace cpu {
void matmul_forward(const MatmulArgs& a);
void matmul_backward_data(const MatmulBackwardDataArgs& a);
void matmul_backward_weight(const MatmulBackwardWeightArgs& a);
}  // namespace cpu

}  // namespace qkd
