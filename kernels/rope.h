// Rotary position embedding, in place, in qkd's one internal convention: INTERLEAVED pairs (Meta/llama2.c/GGUF
// layout). Pair i of a head is (x[2i], x[2i+1]), rotated by angle pos * inv_freq[i]:
//   x[2i]   = x[2i] cos - x[2i+1] sin
//   x[2i+1] = x[2i] sin + x[2i+1] cos
// Hugging Face checkpoints store q_proj/k_proj rows permuted for the rotate-half form; the loader undoes that
// permutation, so every kernel sees interleaved pairs. inv_freq comes from the runtime (it holds any RoPE
// scaling, e.g. llama3's), so this kernel knows nothing about models.
// backward: the rotation is orthogonal, so the gradient is rotated back by -angle, in place (x holds dL/d(out)
// on entry and dL/d(in) on return).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

template <typename T>
struct RopeArgs {
  T* x;                     // [n_tokens, n_heads, head_dim]  rotated in place
  const int32_t* positions; // [n_tokens]
  const float* inv_freq;    // [head_dim / 2]
  int n_tokens, n_heads, head_dim;
};

namespace cpu {
void rope_forward(const RopeArgs<float>& a);
void rope_forward(const RopeArgs<double>& a);
void rope_backward(const RopeArgs<float>& a);
void rope_backward(const RopeArgs<double>& a);
}  // namespace cpu
namespace cuda {
void rope_forward(const RopeArgs<__nv_bfloat16>& a, cudaStream_t stream);
void rope_backward(const RopeArgs<__nv_bfloat16>& a, cudaStream_t stream);
}  // namespace cuda

}  // namespace qkd
