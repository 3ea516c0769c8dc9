// Decode attention: the op of kernels/attention.h (same AttentionArgs, same math, same out/lse), specialised for
// few query tokens per sequence (decode steps, seq_len 1..16, or speculative verification).
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q[b,i,h,:] . k[b,g,j,:]) * v[b,g,j,:]   (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                               (when lse != nullptr)
// Its CPU twin is cpu::attention_forward.
//
// With one query token there is too little work per sequence to fill a GPU along heads alone (32 kv heads is a
// quarter of an H100's SMs), so the context is split across CTAs ("flash-decoding"): each CTA reads one kv
// head's keys/values in one slice of the context once, for all query heads of its GQA group and all query
// tokens, and writes a partial (normalised output, log-sum-exp); the CTA of each (sequence, kv head) that
// finishes last merges the splits, in the same launch.
//
// The number of splits is fixed by a plan made once on the host from an upper bound on the context (the cache
// capacity), not from the live context: start_pos lives on the device and a decode step is replayed from a CUDA
// graph, so the grid cannot follow the context. Each CTA instead divides the live context (start_pos[b] +
// seq_len, read on the device) evenly between the planned splits; splits that get no keys write an empty partial.
//
//   DecodeAttentionPlan plan = decode_attention_plan(batch, seq_len, n_heads, n_kv_heads, head_dim, max_ctx);
//   workspace: plan.workspace_bytes of device memory (none when plan.n_splits == 1), allocated once, with its
//              first plan.counter_bytes zeroed once before the first launch (cudaMemset);
//   decode_attention_forward(args, plan, workspace, stream);      // any step whose shape fits the plan
// The workspace starts with the merge's completion counters. Every launch leaves them zero again, so launches
// and replays of a captured graph need no memset, and any plans may share one workspace of the largest
// workspace_bytes (the counters are a fixed region at its start that no plan's partials reach), launched one
// at a time in stream order. A launch that never finished (a fault) leaves the counters undefined.
#pragma once

#include <cstddef>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "kernels/attention.h"

namespace qkd {

struct DecodeAttentionPlan {
  int batch = 0, seq_len = 0;                 // largest step the plan serves
  int n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int max_ctx = 0;                            // upper bound on start_pos[b] + seq_len that sized n_splits
  int n_splits = 1;                           // CTAs per (batch, kv head) along the context
  size_t counter_bytes = 0;                   // the workspace's first bytes: merge counters, zero before first use
  size_t workspace_bytes = 0;                 // counter_bytes, then float partials:
                                              //   [batch, seq_len, n_heads, n_splits] x (head_dim + 1)
};

namespace cuda {

// Picks n_splits so that batch * n_kv_heads * n_splits CTAs cover the current device's SMs about twice, with at
// least one 64-key tile per split at max_ctx. Throws when the shape is unsupported (head_dim other than 64/128,
// more than 128 query rows per kv head: (n_heads / n_kv_heads) * seq_len).
DecodeAttentionPlan decode_attention_plan(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim,
                                          int max_ctx);

// a.batch <= plan.batch, a.seq_len <= plan.seq_len, heads and head_dim equal to the plan's. The live context
// start_pos[b] + seq_len may exceed plan.max_ctx (the result stays exact; the split count is just less apt).
void decode_attention_forward(const AttentionArgs<__nv_bfloat16>& a, const DecodeAttentionPlan& plan,
                              void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace qkd
