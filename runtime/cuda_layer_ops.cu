// Device helpers of the CUDA backend (runtime/cuda_layer_ops.h): the fused RoPE + KV-cache write, attention for
// heads narrower than kernels/attention.cu serves, and the hash-based random fills of benchmark weights.
#include "runtime/cuda_layer_ops.h"

#include <algorithm>
#include <cmath>

#include "kernels/cuda_check.h"

namespace qkd::runtime {
namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

// ------------------------------------------------------------------------------------ RoPE + KV-cache write

// One block per (token, head of the fused row), one thread per element pair. Heads [0, n_heads) are q, the next
// n_kv_heads k, the last n_kv_heads v; q and k pairs are rotated, v pairs copied.
__global__ void qkv_rope_cache_kernel(const QkvRopeCacheArgs a) {
  const int t = blockIdx.x, head = blockIdx.y, i = threadIdx.x;
  const int hd = a.head_dim;
  const int fused_heads = a.n_heads + 2 * a.n_kv_heads;
  const bf162 in = reinterpret_cast<const bf162*>(a.qkv + (static_cast<int64_t>(t) * fused_heads + head) * hd)[i];
  const int pos = a.positions[t];
  bf162 out = in;
  if (head < a.n_heads + a.n_kv_heads) {
    // The angle exactly as kernels/rope.cu computes it: pos * inv_freq reaches thousands of radians, so the
    // product's rounding error (recovered exactly by the fma) is folded back to second order.
    const float inv = a.inv_freq[i];
    const float hi = static_cast<float>(pos) * inv;
    const float lo = fmaf(static_cast<float>(pos), inv, -hi);
    float s, c;
    sincosf(hi, &s, &c);
    const float half_lo2 = 0.5f * lo * lo;
    const float cs = c - lo * s - half_lo2 * c;
    const float sn = s + lo * c - half_lo2 * s;
    const float2 p = __bfloat1622float2(in);
    out = __floats2bfloat162_rn(p.x * cs - p.y * sn, p.x * sn + p.y * cs);
  }
  if (head < a.n_heads) {
    reinterpret_cast<bf162*>(a.q_out + (static_cast<int64_t>(t) * a.n_heads + head) * hd)[i] = out;
    return;
  }
  const bool is_k = head < a.n_heads + a.n_kv_heads;
  const int g = is_k ? head - a.n_heads : head - a.n_heads - a.n_kv_heads;
  const int b = t / a.seq_len;
  bf16* cache = is_k ? a.k_cache : a.v_cache;
  const int64_t row = (static_cast<int64_t>(b) * a.n_kv_heads + g) * a.ctx + pos;
  reinterpret_cast<bf162*>(cache + row * hd)[i] = out;
}

// ------------------------------------------------------------------------------------ narrow-head attention

// One warp per (sequence, query token, head). Lane l takes keys l, l + 32, ... with its own online softmax
// (running max, sum and weighted values in fp32), and the warp merges the 32 partial softmaxes at the end.
// Narrow heads make a key's dot product a few loads, so spreading keys over lanes keeps every lane busy.
template <int HD>
__global__ void small_head_attention_kernel(const AttentionArgs<bf16> a) {
  constexpr int kWarps = 4;
  const int lane = threadIdx.x & 31;
  const int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int64_t rows = static_cast<int64_t>(a.batch) * a.seq_len * a.n_heads;
  if (w >= rows) return;
  const int h = static_cast<int>(w % a.n_heads);
  const int64_t bi = w / a.n_heads;  // b * seq_len + i
  const int i = static_cast<int>(bi % a.seq_len), b = static_cast<int>(bi / a.seq_len);
  const int g = h / (a.n_heads / a.n_kv_heads);
  const int last = a.start_pos[b] + i;  // the query's own position: keys 0..last are visible

  float q[HD];
  const bf162* q_row = reinterpret_cast<const bf162*>(a.q + w * HD);
#pragma unroll
  for (int d = 0; d < HD / 2; ++d) {
    const float2 v = __bfloat1622float2(q_row[d]);
    q[2 * d] = v.x * a.scale;
    q[2 * d + 1] = v.y * a.scale;
  }
  const int64_t base = static_cast<int64_t>(b) * a.kv_batch_stride + static_cast<int64_t>(g) * a.kv_head_stride;
  float m = -INFINITY, l = 0.0f, acc[HD];
#pragma unroll
  for (int d = 0; d < HD; ++d) acc[d] = 0.0f;
  for (int j = lane; j <= last; j += 32) {
    const bf162* k_row = reinterpret_cast<const bf162*>(a.k + base + j * a.kv_seq_stride);
    float s = 0.0f;
#pragma unroll
    for (int d = 0; d < HD / 2; ++d) {
      const float2 kv = __bfloat1622float2(k_row[d]);
      s = fmaf(q[2 * d], kv.x, s);
      s = fmaf(q[2 * d + 1], kv.y, s);
    }
    if (s > m) {
      const float corr = expf(m - s);  // 0 while m is still -inf
      l *= corr;
#pragma unroll
      for (int d = 0; d < HD; ++d) acc[d] *= corr;
      m = s;
    }
    const float p = expf(s - m);
    l += p;
    const bf162* v_row = reinterpret_cast<const bf162*>(a.v + base + j * a.kv_seq_stride);
#pragma unroll
    for (int d = 0; d < HD / 2; ++d) {
      const float2 vv = __bfloat1622float2(v_row[d]);
      acc[2 * d] = fmaf(p, vv.x, acc[2 * d]);
      acc[2 * d + 1] = fmaf(p, vv.y, acc[2 * d + 1]);
    }
  }
  float mx = m;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
  const float f = m == -INFINITY ? 0.0f : expf(m - mx);  // lanes that saw no key hold nothing
  l *= f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) l += __shfl_xor_sync(0xffffffffu, l, o);
#pragma unroll
  for (int d = 0; d < HD; ++d) {
    float v = acc[d] * f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    acc[d] = v;
  }
  if (lane == 0) {
    bf16* out = a.out + w * HD;
    const float inv_l = 1.0f / l;  // key 0 is always visible, so l >= 1
#pragma unroll
    for (int d = 0; d < HD; ++d) out[d] = __float2bfloat16(acc[d] * inv_l);
  }
}

// ---------------------------------------------------------------------------------------------- random fills

// splitmix64's finalizer: consecutive inputs give independent-looking 64-bit outputs.
__device__ __forceinline__ uint64_t mix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

__global__ void fill_uniform_bf16_kernel(bf16* out, int64_t n, float lo, float span, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float u = static_cast<float>(mix64(seed ^ (static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull)) >> 40) *
                    0x1.0p-24f;  // 24 random bits in [0, 1)
    out[i] = __float2bfloat16(fmaf(u, span, lo));
  }
}

__global__ void fill_random_u32_kernel(uint32_t* out, int64_t n, uint64_t seed) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = static_cast<uint32_t>(mix64(seed ^ (static_cast<uint64_t>(i) * 0xD1B54A32D192ED03ull)) >> 32);
  }
}

unsigned fill_blocks(int64_t n) {
  constexpr int64_t kMaxBlocks = 4096;  // a grid-stride loop: enough blocks to fill the GPU, no more
  return static_cast<unsigned>(std::min<int64_t>(kMaxBlocks, (n + 255) / 256));
}

}  // namespace

void qkv_rope_cache_forward(const QkvRopeCacheArgs& a, cudaStream_t stream) {
  QKD_CHECK(a.head_dim % 2 == 0 && a.head_dim >= 2 && a.head_dim <= 2048,
            "qkv_rope_cache_forward: head_dim {} must be even and at most 2048", a.head_dim);
  QKD_CHECK(a.seq_len >= 1 && a.n_heads + 2 * a.n_kv_heads <= 65535,
            "qkv_rope_cache_forward: seq_len {} / heads {} + 2 x {} out of range", a.seq_len, a.n_heads,
            a.n_kv_heads);
  if (a.n_tokens == 0) return;
  const dim3 grid(a.n_tokens, a.n_heads + 2 * a.n_kv_heads);
  qkv_rope_cache_kernel<<<grid, a.head_dim / 2, 0, stream>>>(a);
  KERNEL_CHECK();
}

void small_head_attention_forward(const AttentionArgs<bf16>& a, cudaStream_t stream) {
  QKD_CHECK(a.lse == nullptr, "small_head_attention_forward: lse is not produced");
  QKD_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0,
            "small_head_attention_forward: n_heads {} is not a multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads);
  const int64_t rows = static_cast<int64_t>(a.batch) * a.seq_len * a.n_heads;
  if (rows == 0) return;
  constexpr int kThreads = 128;  // 4 warps, one query row each
  const auto blocks = static_cast<unsigned>((rows + 3) / 4);
  switch (a.head_dim) {
    case 8: small_head_attention_kernel<8><<<blocks, kThreads, 0, stream>>>(a); break;
    case 16: small_head_attention_kernel<16><<<blocks, kThreads, 0, stream>>>(a); break;
    case 32: small_head_attention_kernel<32><<<blocks, kThreads, 0, stream>>>(a); break;
    default: fail("small_head_attention_forward: head_dim {} is not 8, 16 or 32", a.head_dim);
  }
  KERNEL_CHECK();
}

void fill_uniform_bf16(bf16* out, int64_t n, float lo, float hi, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  fill_uniform_bf16_kernel<<<fill_blocks(n), 256, 0, stream>>>(out, n, lo, hi - lo, seed);
  KERNEL_CHECK();
}

void fill_random_u32(uint32_t* out, int64_t n, uint64_t seed, cudaStream_t stream) {
  if (n == 0) return;
  fill_random_u32_kernel<<<fill_blocks(n), 256, 0, stream>>>(out, n, seed);
  KERNEL_CHECK();
}

}  // namespace qkd::runtime
