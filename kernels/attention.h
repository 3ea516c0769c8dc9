// Causal grouped-query attention over a KV cache.
//   For batch b, query token i (absolute position p = start_pos[b] + i), head h, kv head g = h / (n_heads/n_kv_heads):
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q[b,i,h,:] . k[b,g,j,:]) * v[b,g,j,:]     (out overwritten)
//   lse[b,h,i] = log sum_j exp(scale * q.k_j)   (written when lse != nullptr, kept for the backward pass)
// The keys/values for positions 0..start_pos[b]+seq_len-1 must already be in the cache (the caller appends the
// new tokens' k/v first). k/v are addressed by explicit element strides, so the same op serves the generation
// cache ([batch, n_kv_heads, max_seq, head_dim]) and training's contiguous [batch, seq, n_kv_heads, head_dim].
//
// backward (training: start_pos 0 for every sequence, k/v contiguous [batch, seq_len, n_kv_heads, head_dim]),
// flash-style: the probabilities are recomputed tile by tile from q, k and lse, never stored as seq x seq.
//   P = softmax(scale q k^T) (causal),  delta[i] = sum_d dout[i,d] out[i,d]
//   dv = P^T dout,  dP = dout v^T,  dS = P * (dP - delta),  dq = scale dS k,  dk = scale dS^T q
//   dq, dk, dv overwritten; dk/dv sum over the n_heads / n_kv_heads query heads of their group.
// The CUDA backward is deterministic: dk/dv and dq are each owned by one block (no float atomics).
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

namespace qkd {

template <typename T>
struct AttentionArgs {
  T* out;                    // [batch, seq_len, n_heads, head_dim]
  const T* q;                // [batch, seq_len, n_heads, head_dim]
  const T* k;                // element (b, g, j, d) at k[b*kv_batch_stride + g*kv_head_stride + j*kv_seq_stride + d]
  const T* v;                // same strides as k
  float* lse;                // [batch, n_heads, seq_len] or nullptr
  const int32_t* start_pos;  // [batch] absolute position of each sequence's first query token
  int batch, seq_len, n_heads, n_kv_heads, head_dim;
  int64_t kv_batch_stride, kv_head_stride, kv_seq_stride;
  float scale;               // usually 1/sqrt(head_dim)
};

template <typename T>
struct AttentionBackwardArgs {
  T* dq;              // [batch, seq_len, n_heads, head_dim]     overwritten
  T* dk;              // [batch, seq_len, n_kv_heads, head_dim]  overwritten
  T* dv;              // [batch, seq_len, n_kv_heads, head_dim]  overwritten
  const T* dout;      // [batch, seq_len, n_heads, head_dim]
  const T* q;         // [batch, seq_len, n_heads, head_dim]
  const T* k;         // [batch, seq_len, n_kv_heads, head_dim]
  const T* v;         // [batch, seq_len, n_kv_heads, head_dim]
  const T* out;       // [batch, seq_len, n_heads, head_dim]     the forward's output
  const float* lse;   // [batch, n_heads, seq_len]               the forward's lse
  int batch, seq_len, n_heads, n_kv_heads, head_dim;
  float scale;
  float* scratch = nullptr;  // CUDA only: attention_backward_scratch_floats(...) floats, 16-byte aligned (delta and,
                             // with grouped-query heads, the dK/dV partials of the head splits)
};

namespace cpu {
void attention_forward(const AttentionArgs<float>& a);
void attention_forward(const AttentionArgs<double>& a);
void attention_backward(const AttentionBackwardArgs<float>& a);
void attention_backward(const AttentionBackwardArgs<double>& a);
}  // namespace cpu
namespace cuda {
void attention_forward(const AttentionArgs<__nv_bfloat16>& a, cudaStream_t stream);
void attention_backward(const AttentionBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream);
// Floats of scratch attention_backward needs (0 for an empty or invalid shape).
int64_t attention_backward_scratch_floats(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim);
}  // namespace cuda

}  // namespace qkd
