// Device helpers the CUDA backend needs beyond kernels/ (runtime/cuda_layer_ops.cu):
//  - qkv_rope_cache_forward: the step between the fused q/k/v projection and attention. It reads the fused
//    projection output, rotates q into its own buffer and k into the KV cache, and copies v into the cache, in
//    one pass (kernels/rope.h rotates a contiguous [n_tokens, n_heads, head_dim] tensor in place and has no row
//    stride, so it cannot read q and k out of the fused rows; the rotation here is the same computation).
//  - small_head_attention_forward: causal GQA attention for head_dim 8, 16 or 32, which kernels/attention.h and
//    kernels/decode_attention.h do not cover (they take 64 and 128); the tiny llama2.c models need it.
//  - random fills for benchmark weights, generated on the device so a 7B preset costs no host memory.
// The CUDA backend checks every shape before calling these; the kernels trust their arguments.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention.h"

namespace qkd::runtime {

struct QkvRopeCacheArgs {
  __nv_bfloat16* q_out;       // [n_tokens, n_heads, head_dim]       rotated q (overwritten)
  __nv_bfloat16* k_cache;     // [batch, n_kv_heads, ctx, head_dim]  rotated k written at each token's position
  __nv_bfloat16* v_cache;     // [batch, n_kv_heads, ctx, head_dim]  v written at each token's position
  const __nv_bfloat16* qkv;   // [n_tokens, (n_heads + 2 n_kv_heads) * head_dim]: q, then k, then v
  const int32_t* positions;   // [n_tokens] absolute position of each token
  const float* inv_freq;      // [head_dim / 2]
  int n_tokens;
  int seq_len;                // tokens per sequence in this step: token t belongs to sequence t / seq_len
  int n_heads, n_kv_heads, head_dim, ctx;
};

void qkv_rope_cache_forward(const QkvRopeCacheArgs& a, cudaStream_t stream);

// Same arguments and result as cuda::attention_forward (lse must be null); head_dim 8, 16 or 32.
void small_head_attention_forward(const AttentionArgs<__nv_bfloat16>& a, cudaStream_t stream);

// out[i] = a value drawn uniformly from [lo, hi) by a hash of (seed, i), rounded to bf16.
void fill_uniform_bf16(__nv_bfloat16* out, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream);
// out[i] = 32 random bits from a hash of (seed, i).
void fill_random_u32(uint32_t* out, int64_t n, uint64_t seed, cudaStream_t stream);

}  // namespace qkd::runtime
