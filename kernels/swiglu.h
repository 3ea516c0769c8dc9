// SwiGLU activation of the LLaMA MLP.  out = silu(gate) * up,  silu(g) = g / (1 + exp(-g))   (out overwritten)
// gate and up may be two halves of one fused projection output, hence the row stride ld_in.
// backward (both overwritten; dgate/dup use the same row stride ld_in as gate/up):
//   dgate = dout * up * silu'(gate),  silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
//   dup   = dout * silu(gate)
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

template <typename T>
struct SwigluBackwardArgs {
  T* dgate;        // [rows, ld_in], first ffn_dim columns written
  T* dup;          // [rows, ld_in], first ffn_dim columns written
  const T* dout;   // [rows, ffn_dim]
  const T* gate;   // [rows, ld_in]
  const T* up;     // [rows, ld_in]
  int rows, ffn_dim;
  int64_t ld_in;
};

namespace cpu {
void swiglu_forward(const SwigluArgs<float>& a);
void swiglu_forward(const SwigluArgs<double>& a);
void swiglu_backward(const SwigluBackwardArgs<float>& a);
void swiglu_backward(const SwigluBackwardArgs<double>& a);
}  // namespace cpu
namespace cuda {
void swiglu_forward(const SwigluArgs<__nv_bfloat16>& a, cudaStream_t stream);
void swiglu_backward(const SwigluBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
