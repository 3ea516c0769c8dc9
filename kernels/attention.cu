// CUDA prefill attention (kernels/attention.h): causal, grouped-query, flash-style, bf16 operands, fp32 softmax.
//   query (b, i, h) at absolute position p = start_pos[b] + i reads kv head g = h / (n_heads / n_kv_heads):
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q . k_j) * v_j          (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                  (written when lse != nullptr)
//
// One CTA owns 64 query rows of one head (4 warps x 16 rows, one m16 tensor-core tile per warp) and walks the
// keys in tiles of 64 with an online softmax (FlashAttention-2's forward): the scores of one key tile live
// only in registers, so no seq x seq matrix ever reaches memory. Q.K^T and P.V are mma.sync m16n8k16 (bf16 in,
// fp32 accumulate); K and V tiles are double-buffered in shared memory through cp.async so the next tile's
// loads overlap this tile's math. Scores are kept in the log2 domain (scale * log2(e) folded in) so every
// exponential is one exp2.
//
// This kernel serves prefill (seq_len in the tens to thousands). Decode steps (seq_len 1..16) go through
// kernels/decode_attention.h, which splits the context across CTAs instead. The backward will sit beside the
// forward in this file.
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/attention.h"
#include "kernels/cp_async.cuh"
#include "kernels/cuda_check.h"

namespace qkd::cuda {

namespace {

constexpr int kBlockM = 64;   // query rows per CTA: 4 warps x one 16-row MMA tile
constexpr int kBlockN = 64;   // keys per tile: 8 n8 MMA tiles of scores per warp, 32 fp32 registers
constexpr int kThreads = 128;

// Shared-memory rows are padded by 16 bytes: the 8 rows one ldmatrix phase reads then start in 8 different
// bank quads instead of all in the same one.
template <int D>
constexpr int smem_stride() {
  return D + 8;
}

template <int D>
constexpr size_t smem_bytes() {
  return static_cast<size_t>(kBlockM + 4 * kBlockN) * smem_stride<D>() * sizeof(__nv_bfloat16);  // Q, K[2], V[2]
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const __nv_bfloat16* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const __nv_bfloat16* smem) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// c[16x8] += a[16x16] . b[16x8]; fragment layouts as in the PTX ISA for mma.m16n8k16 (g = lane/4, t = lane%4):
// a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}, b: {(k 2t..2t+1, n g), (k 2t+8.., n g)},
// c: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // .x (the lower column) in the low half
  return *reinterpret_cast<const uint32_t*>(&h);
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

template <int D>
static __global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const AttentionArgs<__nv_bfloat16> a, float scale_log2) {
  constexpr int S = smem_stride<D>();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* s_k = s_q + kBlockM * S;        // [2][kBlockN][S]
  __nv_bfloat16* s_v = s_k + 2 * kBlockN * S;    // [2][kBlockN][S]

  // The last query tiles see the most keys; launching them first shortens the tail of the grid.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / (a.n_heads / a.n_kv_heads);
  const int start = a.start_pos[b];
  const int q_rows = min(kBlockM, a.seq_len - q0);
  const int kv_end = start + q0 + q_rows;  // keys [0, kv_end) are visible to some row of this tile
  const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

  const int64_t q_row_stride = static_cast<int64_t>(a.n_heads) * D;
  const __nv_bfloat16* q = a.q + (static_cast<int64_t>(b) * a.seq_len + q0) * q_row_stride + h * D;
  const __nv_bfloat16* k = a.k + b * a.kv_batch_stride + g * a.kv_head_stride;
  const __nv_bfloat16* v = a.v + b * a.kv_batch_stride + g * a.kv_head_stride;
  const int tid = threadIdx.x;

  for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = r < q_rows;  // rows past seq_len are zeros, computed and never stored
    cp_async_16(s_q + r * S + col, valid ? q + r * q_row_stride + col : a.q, valid);
  }
  auto load_kv = [&](int tile, int stage) {
    const int j0 = tile * kBlockN;
    for (int c = tid; c < kBlockN * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = j0 + r < kv_end;  // zero-fill past the cache's written part: 0 * garbage could be NaN
      const int64_t off = static_cast<int64_t>(j0 + r) * a.kv_seq_stride + col;
      cp_async_16(s_k + (stage * kBlockN + r) * S + col, valid ? k + off : k, valid);
      cp_async_16(s_v + (stage * kBlockN + r) * S + col, valid ? v + off : v, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  const int warp = tid / 32, lane = tid % 32;
  const int row0 = warp * 16 + lane / 4;  // this thread's rows in the tile: row0 and row0 + 8
  // Last key each of the two rows may see. Rows past seq_len see every loaded key, so they stay finite.
  const int last_key[2] = {min(start + q0 + row0, kv_end - 1), min(start + q0 + row0 + 8, kv_end - 1)};
  uint32_t q_frag[D / 16][4];
  float o[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY};  // running max of the log2-domain scores
  float l[2] = {0.0f, 0.0f};            // running softmax denominator, this thread's columns only

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just requested has landed
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(q_frag[kk], s_q + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
      }
    }
    const __nv_bfloat16* k_s = s_k + (t & 1) * kBlockN * S;
    const __nv_bfloat16* v_s = s_v + (t & 1) * kBlockN * S;
    const int mi = lane / 8, mr = lane % 8;  // which 8x8 matrix of an x4 ldmatrix this lane addresses, and its row

    float s[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; nt += 2) {
        // K rows are keys with head_dim contiguous: exactly the "col" B operand, no transpose needed.
        uint32_t kf[4];
        ldmatrix_x4(kf, k_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
        mma_bf16(s[nt], q_frag[kk], kf[0], kf[1]);
        mma_bf16(s[nt + 1], q_frag[kk], kf[2], kf[3]);
      }
    }

    const int j0 = t * kBlockN;
    // Only tiles that reach past the first row's position hold keys some row may not see.
    const bool need_mask = j0 + kBlockN - 1 > start + q0;
    float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[nt][e] * scale_log2;
        if (need_mask && j0 + nt * 8 + 2 * (lane % 4) + (e & 1) > last_key[e / 2]) x = -INFINITY;
        s[nt][e] = x;
        tile_max[e / 2] = fmaxf(tile_max[e / 2], x);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      // The 4 lanes of a quad hold one row's 64 scores between them.
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 1));
      tile_max[r] = fmaxf(tile_max[r], __shfl_xor_sync(0xffffffffu, tile_max[r], 2));
      // Key 0 is in tile 0 and visible to every row, so m is finite from the first tile on; on that tile
      // m = -inf gives alpha = exp2(-inf) = 0, which is right: nothing accumulated yet.
      const float m_new = fmaxf(m[r], tile_max[r]);
      alpha[r] = exp2f(m[r] - m_new);
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float p = exp2f(s[nt][e] - m[e / 2]);
        s[nt][e] = p;
        l[e / 2] += p;
      }
    }
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= alpha[0];
      o[dt][1] *= alpha[0];
      o[dt][2] *= alpha[1];
      o[dt][3] *= alpha[1];
    }

    // O += P . V. The score accumulators of n-tiles 2kk and 2kk+1 are, element for element, the A fragment of
    // a 16x16 P block, so P never leaves registers.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t p_frag[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                  pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        // V rows are keys, but B wants k (keys) along the fragment pairs: ldmatrix.trans transposes on the way.
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_s + (kk * 16 + (mi % 2) * 8 + mr) * S + (dt + mi / 2) * 8);
        mma_bf16(o[dt], p_frag, vf[0], vf[1]);
        mma_bf16(o[dt + 1], p_frag, vf[2], vf[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites the stage just read
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= q_rows) continue;
    const float inv = 1.0f / l[r];
    __nv_bfloat16* out = a.out + ((static_cast<int64_t>(b) * a.seq_len + q0 + row) * a.n_heads + h) * D;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<__nv_bfloat162*>(out + dt * 8 + 2 * (lane % 4)) =
          __floats2bfloat162_rn(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
    }
    if (a.lse != nullptr && lane % 4 == 0) {
      a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + q0 + row] =
          (m[r] + log2f(l[r])) * 0.69314718f;  // back from log2 to natural log
    }
  }
}

template <int D>
static void attention_forward_launch(const AttentionArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<D>();
  CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  const dim3 grid((a.seq_len + kBlockM - 1) / kBlockM, a.n_heads, a.batch);
  const float scale_log2 = a.scale * 1.44269504f;  // log2(e)
  attention_forward_kernel<D><<<grid, kThreads, bytes, stream>>>(a, scale_log2);
  KERNEL_CHECK();
}

void attention_forward(const AttentionArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.batch >= 0 && a.seq_len >= 0, "attention_forward: batch {} / seq_len {} invalid", a.batch,
            a.seq_len);
  QKD_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0,
            "attention_forward: n_heads {} is not a positive multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads);
  QKD_CHECK(a.head_dim == 64 || a.head_dim == 128,
            "attention_forward: head_dim {} is not supported on CUDA (64 or 128)", a.head_dim);
  QKD_CHECK(a.kv_seq_stride >= a.head_dim && a.kv_head_stride >= a.head_dim && a.kv_batch_stride >= 0,
            "attention_forward: kv strides (batch {}, head {}, seq {}) are invalid for head_dim {}",
            a.kv_batch_stride, a.kv_head_stride, a.kv_seq_stride, a.head_dim);
  QKD_CHECK(a.kv_seq_stride % 8 == 0 && a.kv_head_stride % 8 == 0 && a.kv_batch_stride % 8 == 0,
            "attention_forward: kv strides (batch {}, head {}, seq {}) must be multiples of 8 (16-byte loads)",
            a.kv_batch_stride, a.kv_head_stride, a.kv_seq_stride);
  for (const void* p : {static_cast<const void*>(a.out), static_cast<const void*>(a.q),
                        static_cast<const void*>(a.k), static_cast<const void*>(a.v)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "attention_forward: pointer {} is not 16-byte aligned", p);
  }
  QKD_CHECK(std::isfinite(a.scale), "attention_forward: scale {} is not finite", a.scale);
  QKD_CHECK(a.n_heads <= 65535 && a.batch <= 65535, "attention_forward: n_heads {} / batch {} exceed the grid",
            a.n_heads, a.batch);
  if (a.batch == 0 || a.seq_len == 0) return;
  QKD_CHECK(a.start_pos != nullptr, "attention_forward: start_pos is null");
  if (a.head_dim == 64) {
    attention_forward_launch<64>(a, stream);
  } else {
    attention_forward_launch<128>(a, stream);
  }
}

}  // namespace qkd::cuda
