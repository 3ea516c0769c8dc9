// SwiGLU activation of the LLaMA MLP.  out = silu(gate) * up,  silu(g) = g / (1 + exp(-g))   (out overwritten)
// gate and up may be two halves of one fused projection output, hence the row stride ld_in.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

template <typename T>
struct SwigluArgs {
  T* out;          // [rows, ffn_dim]
  const T* gate;   // [rows, ld_in], first ffn_dim columns used
  const T* up;     // [rows, ld_in], first ffn_dim columns used
  int rows, ffn_dim;
  int64_t ld_in;   // row stride of gate/up in elements (= ffn_dim when contiguous)
};

namespace cpu {
void swiglu_forward(const SwigluArgs<float>& a);
}
namespace cuda {
void swiglu_forward(const SwigluArgs<__nv_bfloat16>& a, cudaStream_t stream);
}

}  // namespace qkd
