// Dense linear layer in PyTorch's nn.Linear layout:  y[m, n] (=|+=) x[m, k] . w[n, k]^T
// The CPU version is the reference backend's workhorse: blocked and threaded (OpenMP), fp32 throughout.
// (The CUDA dense path is cuBLASLt, kernels/gemm.h; the int4 path is kernels/int4_gemm.h.)
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

namespace cpu {
void matmul_forward(const MatmulArgs& a);
}

}  // namespace qkd
