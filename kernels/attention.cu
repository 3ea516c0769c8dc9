// CUDA prefill attention (kernels/attention.h): causal, grouped-query, flash-style, bf16 operands, fp32 softmax.
//   query (b, i, h) at absolute position p = start_pos[b] + i reads kv head g = h / (n_heads / n_kv_heads):
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q . k_j) * v_j          (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                  (written when lse != nullptr)
//
// One CTA owns 128 query rows of one head for head_dim 64 (4 warps x 32 rows, two m16 tensor-core tiles a warp),
// 64 for head_dim 128 (4 warps x 16 rows, one tile a warp: fwd_m_tiles), and walks the
// keys in tiles of 64 with an online softmax (FlashAttention-2's forward): the scores of one key tile live
// only in registers, so no seq x seq matrix ever reaches memory. Q.K^T and P.V are mma.sync m16n8k16 (bf16 in,
// fp32 accumulate); K and V tiles are double-buffered in shared memory through cp.async so the next tile's
// loads overlap this tile's math. Scores are kept in the log2 domain (scale * log2(e) folded in) so every
// exponential is one exp2.
//
// This kernel serves prefill (seq_len in the tens to thousands). Decode steps (seq_len 1..16) go through
// kernels/decode_attention.h, which splits the context across CTAs instead.
//
// backward (training layout: start_pos 0, k/v contiguous [batch, seq_len, n_kv_heads, head_dim]), FlashAttention-2
// style but deterministic, in three kernels:
//   delta:  delta[b,h,i] = dout[b,i,h,:] . out[b,i,h,:]  (one warp per row, into the caller's scratch)
//   dK/dV:  a CTA owns 64 keys of one kv head (4 warps x 16 keys) and walks every query tile of every head of the
//           group (or of its share of the group: with grouped-query heads the group is split over up to 4 CTAs whose
//           fp32 partials a last small kernel adds in a fixed order) that sees them, recomputing P^T = exp(scale K Q^T - lse) and accumulating
//           dV += P^T dO and dK += dS^T Q, dS^T = P^T * (V dO^T - delta), in registers; it writes dK, dV once.
//   dQ:     a CTA owns 64 query rows of one head (4 warps x 16 rows) and walks the key tiles they see,
//           recomputing P and dS the same way and accumulating dQ += dS K.
// Every output element is summed by one thread in a fixed order, so the gradients are the same bits on every run
// (FlashAttention-2 instead adds dQ across key CTAs with float atomics). The price is recomputing Q K^T and
// dO V^T in the dQ kernel: 7 tile GEMMs where FlashAttention-2 does 5. All GEMMs are mma.sync m16n8k16 with the
// score-side accumulators reused in place as A fragments, as in the forward; P and dS are rounded to bf16 for the
// tensor cores, everything else is fp32.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/attention.h"
#include "kernels/block_reduce.cuh"
#include "kernels/cp_async.cuh"
#include "kernels/cuda_check.h"

namespace qkd::cuda {

namespace {

constexpr int kBlockM = 64;   // query rows per CTA: 4 warps x one 16-row MMA tile
constexpr int kBlockN = 64;   // keys per tile: 8 n8 MMA tiles of scores per warp, 32 fp32 registers
constexpr int kThreads = 128;
constexpr float kLog2e = 1.44269504f;

// Shared-memory rows are padded by 16 bytes: the 8 rows one ldmatrix phase reads then start in 8 different
// bank quads instead of all in the same one.
template <int D>
constexpr int smem_stride() {
  return D + 8;
}

// Q tiles of `rows` rows, K[2] and V[2] tiles of kBlockN rows.
template <int D>
constexpr size_t smem_bytes(int rows) {
  return static_cast<size_t>(rows + 4 * kBlockN) * smem_stride<D>() * sizeof(__nv_bfloat16);
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

// Forward query tiles: MT m16 tiles a warp, 64 * MT rows a CTA. With MT = 2 every K and V fragment a warp loads
// from shared memory feeds two MMAs instead of one, which halves the ldmatrix traffic per flop and the K/V tile
// loads per query row; head_dim 64 has the registers for it (o and the scores of both tiles: 128 fp32), head_dim
// 128 does not (o alone would be 128) and keeps one tile a warp.
template <int D>
constexpr int fwd_m_tiles() {
  return D == 64 ? 2 : 1;
}

template <int D>
constexpr int fwd_block_m() {
  return kBlockM * fwd_m_tiles<D>();
}

template <int D>
static __global__ void __launch_bounds__(kThreads)
    attention_forward_kernel(const AttentionArgs<__nv_bfloat16> a, float scale_log2) {
  constexpr int S = smem_stride<D>();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int MT = fwd_m_tiles<D>();
  constexpr int BM = fwd_block_m<D>();
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* s_k = s_q + BM * S;             // [2][kBlockN][S]
  __nv_bfloat16* s_v = s_k + 2 * kBlockN * S;    // [2][kBlockN][S]

  // The last query tiles see the most keys; launching them first shortens the tail of the grid.
  const int q0 = (gridDim.x - 1 - blockIdx.x) * BM;
  const int h = blockIdx.y, b = blockIdx.z;
  const int g = h / (a.n_heads / a.n_kv_heads);
  const int start = a.start_pos[b];
  const int q_rows = min(BM, a.seq_len - q0);
  const int kv_end = start + q0 + q_rows;  // keys [0, kv_end) are visible to some row of this tile
  const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;

  const int64_t q_row_stride = static_cast<int64_t>(a.n_heads) * D;
  const __nv_bfloat16* q = a.q + (static_cast<int64_t>(b) * a.seq_len + q0) * q_row_stride + h * D;
  const __nv_bfloat16* k = a.k + b * a.kv_batch_stride + g * a.kv_head_stride;
  const __nv_bfloat16* v = a.v + b * a.kv_batch_stride + g * a.kv_head_stride;
  const int tid = threadIdx.x;

  for (int c = tid; c < BM * kChunks; c += kThreads) {
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
  // This thread's rows in the CTA tile: m-tile mt holds rows row0(mt) and row0(mt) + 8.
  auto row0 = [&](int mt) { return (warp * MT + mt) * 16 + lane / 4; };
  // Last key each row may see. Rows past seq_len see every loaded key, so they stay finite.
  int last_key[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    last_key[mt][0] = min(start + q0 + row0(mt), kv_end - 1);
    last_key[mt][1] = min(start + q0 + row0(mt) + 8, kv_end - 1);
  }
  uint32_t q_frag[MT][D / 16][4];
  float o[MT][D / 8][4];
  float m[MT][2], l[MT][2];  // running max of the log2-domain scores; running denominator, this thread's columns
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[mt][dt][0] = o[mt][dt][1] = o[mt][dt][2] = o[mt][dt][3] = 0.0f;
    m[mt][0] = m[mt][1] = -INFINITY;
    l[mt][0] = l[mt][1] = 0.0f;
  }

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just requested has landed
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          ldmatrix_x4(q_frag[mt][kk], s_q + ((warp * MT + mt) * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
        }
      }
    }
    const __nv_bfloat16* k_s = s_k + (t & 1) * kBlockN * S;
    const __nv_bfloat16* v_s = s_v + (t & 1) * kBlockN * S;
    const int mi = lane / 8, mr = lane % 8;  // which 8x8 matrix of an x4 ldmatrix this lane addresses, and its row

    float s[MT][kBlockN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; nt += 2) {
        // K rows are keys with head_dim contiguous: exactly the "col" B operand, no transpose needed.
        uint32_t kf[4];
        ldmatrix_x4(kf, k_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(s[mt][nt], q_frag[mt][kk], kf[0], kf[1]);
          mma_bf16(s[mt][nt + 1], q_frag[mt][kk], kf[2], kf[3]);
        }
      }
    }

    const int j0 = t * kBlockN;
    // Only tiles that reach past the first row's position hold keys some row may not see.
    const bool need_mask = j0 + kBlockN - 1 > start + q0;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[mt][nt][e] * scale_log2;
          if (need_mask && j0 + nt * 8 + 2 * (lane % 4) + (e & 1) > last_key[mt][e / 2]) x = -INFINITY;
          s[mt][nt][e] = x;
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
        const float m_new = fmaxf(m[mt][r], tile_max[r]);
        alpha[r] = exp2f(m[mt][r] - m_new);
        m[mt][r] = m_new;
        l[mt][r] *= alpha[r];
      }
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float p = exp2f(s[mt][nt][e] - m[mt][e / 2]);
          s[mt][nt][e] = p;
          l[mt][e / 2] += p;
        }
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        o[mt][dt][0] *= alpha[0];
        o[mt][dt][1] *= alpha[0];
        o[mt][dt][2] *= alpha[1];
        o[mt][dt][3] *= alpha[1];
      }
    }

    // O += P . V. The score accumulators of n-tiles 2kk and 2kk+1 are, element for element, the A fragment of
    // a 16x16 P block, so P never leaves registers.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      uint32_t p_frag[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        p_frag[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        p_frag[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        p_frag[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        p_frag[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        // V rows are keys, but B wants k (keys) along the fragment pairs: ldmatrix.trans transposes on the way.
        uint32_t vf[4];
        ldmatrix_x4_trans(vf, v_s + (kk * 16 + (mi % 2) * 8 + mr) * S + (dt + mi / 2) * 8);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          mma_bf16(o[mt][dt], p_frag[mt], vf[0], vf[1]);
          mma_bf16(o[mt][dt + 1], p_frag[mt], vf[2], vf[3]);
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites the stage just read
  }

#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 1);
      l[mt][r] += __shfl_xor_sync(0xffffffffu, l[mt][r], 2);
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = row0(mt) + 8 * r;
      if (row >= q_rows) continue;
      const float inv = 1.0f / l[mt][r];
      __nv_bfloat16* out = a.out + ((static_cast<int64_t>(b) * a.seq_len + q0 + row) * a.n_heads + h) * D;
#pragma unroll
      for (int dt = 0; dt < D / 8; ++dt) {
        *reinterpret_cast<__nv_bfloat162*>(out + dt * 8 + 2 * (lane % 4)) =
            __floats2bfloat162_rn(o[mt][dt][2 * r] * inv, o[mt][dt][2 * r + 1] * inv);
      }
      if (a.lse != nullptr && lane % 4 == 0) {
        a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + q0 + row] =
            (m[mt][r] + log2f(l[mt][r])) * 0.69314718f;  // back from log2 to natural log
      }
    }
  }
}

template <int D>
static void attention_forward_launch(const AttentionArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  constexpr size_t bytes = smem_bytes<D>(fwd_block_m<D>());
  constexpr int BM = fwd_block_m<D>();
  CUDA_CHECK(cudaFuncSetAttribute(attention_forward_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(bytes)));
  const dim3 grid((a.seq_len + BM - 1) / BM, a.n_heads, a.batch);
  const float scale_log2 = a.scale * kLog2e;
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

// ---------------------------------------------------------------------------------------------------- backward

namespace {

constexpr int kBwdKeys = 64;  // keys per dK/dV CTA: 4 warps x one 16-key MMA tile

// Query rows per step of the dK/dV kernel. A warp holds dK and dV for its 16 keys (head_dim / 2 fp32 registers
// each) plus the P^T and dS^T tiles of the step (BQ / 2 registers each): at head_dim 128 that is ~250 registers
// without spills (ptxas -v), 2 CTAs per SM. It must divide kBwdKeys (the causal start below relies on it).
template <int D>
constexpr int bwd_query_tile() {
  return 64;
}
static_assert(kBwdKeys % bwd_query_tile<64>() == 0 && kBwdKeys % bwd_query_tile<128>() == 0);

// The dK/dV CTA of key tile kt walks the query tiles from kt on for every head of its GQA group, so with a group
// of 8 heads and 16 key tiles the heaviest CTAs have 128 steps when an SM slot averages 88: the grid's critical
// path is its first CTAs. The group's heads are split over up to kMaxDkdvSplits CTAs; each writes its fp32 partial
// dK and dV to scratch, and one more kernel adds the partials in split order (the same bits on every run).
constexpr int kMaxDkdvSplits = 4;

int dkdv_splits(int group) {
  for (int s = kMaxDkdvSplits; s > 1; --s) {
    if (group % s == 0) return s;
  }
  return 1;
}

// Floats of scratch before the dK/dV partials: delta, rounded up to 16 bytes.
__host__ __device__ inline int64_t delta_floats(int64_t batch, int64_t seq_len, int64_t n_heads) {
  return (batch * n_heads * seq_len + 3) / 4 * 4;
}

template <int D>
constexpr size_t bwd_dkdv_smem_bytes() {
  // K, V (resident), Q[2], dO[2] (double-buffered), then lse[2] and delta[2] of the query tile.
  return static_cast<size_t>(2 * kBwdKeys + 4 * bwd_query_tile<D>()) * smem_stride<D>() * sizeof(__nv_bfloat16) +
         4 * bwd_query_tile<D>() * sizeof(float);
}

template <int D>
constexpr size_t bwd_dq_smem_bytes() {
  return smem_bytes<D>(kBlockM) + static_cast<size_t>(kBlockM) * smem_stride<D>() * sizeof(__nv_bfloat16);  // + dO
}

}  // namespace

// delta[b, h, i] = dout[b, i, h, :] . out[b, i, h, :]. Row r enumerates (b, i, h) in memory order. A row is D / 8
// consecutive lanes, each with one 16-byte load of dout and of out (a warp reads 4 or 2 whole rows: contiguous
// bytes), summed over the lanes in a fixed butterfly order.
template <int D>
static __global__ void __launch_bounds__(kThreads)
    attention_backward_delta_kernel(float* delta, const __nv_bfloat16* dout, const __nv_bfloat16* out,
                                    int64_t n_rows, int seq_len, int n_heads) {
  constexpr int kLanes = D / 8;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (kThreads / kLanes) + threadIdx.x / kLanes;
  const int c = (threadIdx.x % kLanes) * 8;
  float s = 0.0f;
  if (r < n_rows) {  // no early return: every lane takes part in the shuffles below
    const uint4 dv = *reinterpret_cast<const uint4*>(dout + r * D + c);
    const uint4 ov = *reinterpret_cast<const uint4*>(out + r * D + c);
    const __nv_bfloat162* d2 = reinterpret_cast<const __nv_bfloat162*>(&dv);
    const __nv_bfloat162* o2 = reinterpret_cast<const __nv_bfloat162*>(&ov);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const float2 x = __bfloat1622float2(d2[j]), y = __bfloat1622float2(o2[j]);
      s += x.x * y.x + x.y * y.y;
    }
  }
#pragma unroll
  for (int o = kLanes / 2; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (r < n_rows && threadIdx.x % kLanes == 0) {
    const int h = static_cast<int>(r % n_heads);
    const int64_t bi = r / n_heads;  // b * seq_len + i
    const int64_t b = bi / seq_len, i = bi % seq_len;
    delta[(b * n_heads + h) * seq_len + i] = s;
  }
}

// Grid (n_kv_heads, batch, key tiles): the key tile is the slowest index so that tile 0, which sees every query
// tile, is launched first and the light last tiles fill the tail.
template <int D>
static __global__ void __launch_bounds__(kThreads)
    attention_backward_dkdv_kernel(const AttentionBackwardArgs<__nv_bfloat16> a, float scale_log2, int splits) {
  constexpr int S = smem_stride<D>();
  constexpr int BQ = bwd_query_tile<D>();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* s_k = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kBwdKeys][S]
  __nv_bfloat16* s_v = s_k + kBwdKeys * S;                            // [kBwdKeys][S]
  __nv_bfloat16* s_q = s_v + kBwdKeys * S;                            // [2][BQ][S]
  __nv_bfloat16* s_do = s_q + 2 * BQ * S;                             // [2][BQ][S]
  float* s_lse = reinterpret_cast<float*>(s_do + 2 * BQ * S);         // [2][BQ] log2 domain
  float* s_delta = s_lse + 2 * BQ;                                    // [2][BQ]

  const int g = blockIdx.x / splits, split = blockIdx.x % splits, b = blockIdx.y;
  const int j0 = blockIdx.z * kBwdKeys;
  const int seq_len = a.seq_len;
  const int group = a.n_heads / a.n_kv_heads;
  const int heads = group / splits;  // this CTA's heads: g * group + split * heads + [0, heads)
  // Causal: query tiles before the one holding key j0 see none of this CTA's keys (BQ divides kBwdKeys).
  const int qt_first = j0 / BQ;
  const int per_head = (seq_len + BQ - 1) / BQ - qt_first;
  const int n_steps = heads * per_head;  // (head, query tile) pairs, head-major
  const int64_t q_row_stride = static_cast<int64_t>(a.n_heads) * D;
  const int64_t kv_row_stride = static_cast<int64_t>(a.n_kv_heads) * D;
  const int64_t q_batch = static_cast<int64_t>(b) * seq_len * q_row_stride;
  const int64_t kv_base = static_cast<int64_t>(b) * seq_len * kv_row_stride + g * D;
  const int tid = threadIdx.x;

  // Rows past seq_len are zero-filled: 0 * garbage could be NaN.
  for (int c = tid; c < kBwdKeys * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = j0 + r < seq_len;
    const int64_t off = kv_base + (j0 + r) * kv_row_stride + col;
    cp_async_16(s_k + r * S + col, valid ? a.k + off : a.k, valid);
    cp_async_16(s_v + r * S + col, valid ? a.v + off : a.v, valid);
  }
  auto step_head = [&](int step) { return g * group + split * heads + step / per_head; };
  auto step_q0 = [&](int step) { return (qt_first + step % per_head) * BQ; };
  auto load_q_do = [&](int step, int stage) {
    const int h = step_head(step), q0 = step_q0(step);
    for (int c = tid; c < BQ * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = q0 + r < seq_len;
      const int64_t off = q_batch + (q0 + r) * q_row_stride + h * D + col;
      cp_async_16(s_q + (stage * BQ + r) * S + col, valid ? a.q + off : a.q, valid);
      cp_async_16(s_do + (stage * BQ + r) * S + col, valid ? a.dout + off : a.dout, valid);
    }
  };
  // Thread tid < BQ fetches lse and delta of the step's query row tid into registers; they go to shared memory
  // once the stage is free, so the loads' latency hides behind a step of math. A row past seq_len gets
  // lse = +inf, hence P = 0, and delta = 0.
  float next_lse = INFINITY, next_delta = 0.0f;
  auto fetch_stats = [&](int step) {
    const int i = step_q0(step) + tid;
    if (i < seq_len) {
      const int64_t idx = (static_cast<int64_t>(b) * a.n_heads + step_head(step)) * seq_len + i;
      next_lse = a.lse[idx] * kLog2e;
      next_delta = a.scratch[idx];
    } else {
      next_lse = INFINITY;
      next_delta = 0.0f;
    }
  };
  load_q_do(0, 0);
  cp_async_commit();
  if (tid < BQ) {
    fetch_stats(0);
    s_lse[tid] = next_lse;
    s_delta[tid] = next_delta;
  }

  const int warp = tid / 32, lane = tid % 32;
  const int mi = lane / 8, mr = lane % 8;         // which 8x8 matrix of an x4 ldmatrix this lane addresses, its row
  const int key0 = j0 + warp * 16 + lane / 4;     // this thread's keys: key0 and key0 + 8
  float dk[D / 8][4], dv[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[dt][e] = dv[dt][e] = 0.0f;
  }

  for (int step = 0; step < n_steps; ++step) {
    const int stage = step & 1;
    if (step + 1 < n_steps) {
      load_q_do(step + 1, stage ^ 1);
      if (tid < BQ) fetch_stats(step + 1);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the step just requested has landed
    __syncthreads();
    const __nv_bfloat16* q_s = s_q + stage * BQ * S;
    const __nv_bfloat16* do_s = s_do + stage * BQ * S;
    const float* lse_s = s_lse + stage * BQ;
    const float* delta_s = s_delta + stage * BQ;
    const int q0 = step_q0(step);

    // S^T = K Q^T: rows are this warp's 16 keys, columns the BQ queries. Q rows (queries, head_dim contiguous)
    // are the "col" B operand as they are stored.
    float pt[BQ / 8][4];
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) pt[nt][0] = pt[nt][1] = pt[nt][2] = pt[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t kf[4];
      ldmatrix_x4(kf, s_k + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt += 2) {
        uint32_t qf[4];
        ldmatrix_x4(qf, q_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
        mma_bf16(pt[nt], kf, qf[0], qf[1]);
        mma_bf16(pt[nt + 1], kf, qf[2], qf[3]);
      }
    }
    // P^T = exp2(scale_log2 S^T - lse2), zero where the key is after the query. Only the tiles on the diagonal
    // hold such pairs; keys past seq_len come after every query, so the causal test covers them too.
    const bool need_mask = j0 + kBwdKeys - 1 > q0;
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * (lane % 4) + (e & 1);
        float p = exp2f(pt[nt][e] * scale_log2 - lse_s[col]);
        if (need_mask && key0 + 8 * (e / 2) > q0 + col) p = 0.0f;
        pt[nt][e] = p;
      }
    }
    // dV += P^T dO: the P^T accumulators of n-tiles 2kk, 2kk+1 are the A fragment of a 16x16 block (k = queries);
    // dO rows are queries, so ldmatrix.trans turns them into the B operand.
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      const uint32_t pf[4] = {pack_bf16(pt[2 * kk][0], pt[2 * kk][1]), pack_bf16(pt[2 * kk][2], pt[2 * kk][3]),
                              pack_bf16(pt[2 * kk + 1][0], pt[2 * kk + 1][1]),
                              pack_bf16(pt[2 * kk + 1][2], pt[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t f[4];
        ldmatrix_x4_trans(f, do_s + (kk * 16 + (mi % 2) * 8 + mr) * S + (dt + mi / 2) * 8);
        mma_bf16(dv[dt], pf, f[0], f[1]);
        mma_bf16(dv[dt + 1], pf, f[2], f[3]);
      }
    }
    // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta) in place.
    float dst[BQ / 8][4];
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) dst[nt][0] = dst[nt][1] = dst[nt][2] = dst[nt][3] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t vf[4];
      ldmatrix_x4(vf, s_v + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
#pragma unroll
      for (int nt = 0; nt < BQ / 8; nt += 2) {
        uint32_t f[4];
        ldmatrix_x4(f, do_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
        mma_bf16(dst[nt], vf, f[0], f[1]);
        mma_bf16(dst[nt + 1], vf, f[2], f[3]);
      }
    }
#pragma unroll
    for (int nt = 0; nt < BQ / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[nt][e] = pt[nt][e] * (dst[nt][e] - delta_s[nt * 8 + 2 * (lane % 4) + (e & 1)]);
    }
    // dK += dS^T Q (scaled once at the end).
#pragma unroll
    for (int kk = 0; kk < BQ / 16; ++kk) {
      const uint32_t sf[4] = {pack_bf16(dst[2 * kk][0], dst[2 * kk][1]), pack_bf16(dst[2 * kk][2], dst[2 * kk][3]),
                              pack_bf16(dst[2 * kk + 1][0], dst[2 * kk + 1][1]),
                              pack_bf16(dst[2 * kk + 1][2], dst[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t f[4];
        ldmatrix_x4_trans(f, q_s + (kk * 16 + (mi % 2) * 8 + mr) * S + (dt + mi / 2) * 8);
        mma_bf16(dk[dt], sf, f[0], f[1]);
        mma_bf16(dk[dt + 1], sf, f[2], f[3]);
      }
    }
    // The other stage's lse/delta were last read in the previous step, before this step's first barrier.
    if (step + 1 < n_steps && tid < BQ) {
      s_lse[(stage ^ 1) * BQ + tid] = next_lse;
      s_delta[(stage ^ 1) * BQ + tid] = next_delta;
    }
    __syncthreads();  // the next step's prefetch overwrites the stage just read
  }

  // One split: dK (scaled) and dV in bf16. Several: this split's fp32 partials, [split][batch, seq_len, n_kv_heads,
  // head_dim] each, after delta in scratch; attention_backward_dkdv_reduce_kernel adds them.
  const int64_t elems = static_cast<int64_t>(a.batch) * seq_len * kv_row_stride;
  float* dk_part = a.scratch + delta_floats(a.batch, seq_len, a.n_heads) + split * elems;
  float* dv_part = dk_part + splits * elems;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int key = key0 + 8 * r;
    if (key >= seq_len) continue;
    const int64_t off = kv_base + key * kv_row_stride + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      if (splits == 1) {
        *reinterpret_cast<__nv_bfloat162*>(a.dk + off + dt * 8) =
            __floats2bfloat162_rn(dk[dt][2 * r] * a.scale, dk[dt][2 * r + 1] * a.scale);
        *reinterpret_cast<__nv_bfloat162*>(a.dv + off + dt * 8) =
            __floats2bfloat162_rn(dv[dt][2 * r], dv[dt][2 * r + 1]);
      } else {
        *reinterpret_cast<float2*>(dk_part + off + dt * 8) = make_float2(dk[dt][2 * r], dk[dt][2 * r + 1]);
        *reinterpret_cast<float2*>(dv_part + off + dt * 8) = make_float2(dv[dt][2 * r], dv[dt][2 * r + 1]);
      }
    }
  }
}

// dK = scale * sum_s dk_part[s], dV = sum_s dv_part[s], s in split order; 4 elements a thread (elems % 4 == 0).
static __global__ void __launch_bounds__(256)
    attention_backward_dkdv_reduce_kernel(__nv_bfloat16* dk, __nv_bfloat16* dv, const float* part, int64_t elems,
                                          int splits, float scale) {
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * 4; i < elems;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * 4) {
    float4 k = *reinterpret_cast<const float4*>(part + i);
    float4 v = *reinterpret_cast<const float4*>(part + splits * elems + i);
    for (int sp = 1; sp < splits; ++sp) {
      const float4 k2 = *reinterpret_cast<const float4*>(part + sp * elems + i);
      const float4 v2 = *reinterpret_cast<const float4*>(part + (splits + sp) * elems + i);
      k.x += k2.x, k.y += k2.y, k.z += k2.z, k.w += k2.w;
      v.x += v2.x, v.y += v2.y, v.z += v2.z, v.w += v2.w;
    }
    __nv_bfloat162* dk2 = reinterpret_cast<__nv_bfloat162*>(dk + i);
    __nv_bfloat162* dv2 = reinterpret_cast<__nv_bfloat162*>(dv + i);
    dk2[0] = __floats2bfloat162_rn(k.x * scale, k.y * scale);
    dk2[1] = __floats2bfloat162_rn(k.z * scale, k.w * scale);
    dv2[0] = __floats2bfloat162_rn(v.x, v.y);
    dv2[1] = __floats2bfloat162_rn(v.z, v.w);
  }
}

// Grid (n_heads, batch, query tiles): the last query tiles see the most keys and are launched first.
template <int D>
static __global__ void __launch_bounds__(kThreads)
    attention_backward_dq_kernel(const AttentionBackwardArgs<__nv_bfloat16> a, float scale_log2) {
  constexpr int S = smem_stride<D>();
  constexpr int kChunks = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* s_q = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kBlockM][S]
  __nv_bfloat16* s_do = s_q + kBlockM * S;                            // [kBlockM][S]
  __nv_bfloat16* s_k = s_do + kBlockM * S;                            // [2][kBlockN][S]
  __nv_bfloat16* s_v = s_k + 2 * kBlockN * S;                         // [2][kBlockN][S]

  const int h = blockIdx.x, b = blockIdx.y;
  const int q0 = (gridDim.z - 1 - blockIdx.z) * kBlockM;
  const int seq_len = a.seq_len;
  const int g = h / (a.n_heads / a.n_kv_heads);
  const int q_rows = min(kBlockM, seq_len - q0);
  const int kv_end = q0 + q_rows;  // keys [0, kv_end) are visible to some row of this tile
  const int n_tiles = (kv_end + kBlockN - 1) / kBlockN;
  const int64_t q_row_stride = static_cast<int64_t>(a.n_heads) * D;
  const int64_t kv_row_stride = static_cast<int64_t>(a.n_kv_heads) * D;
  const int64_t q_base = (static_cast<int64_t>(b) * seq_len + q0) * q_row_stride + h * D;
  const int64_t kv_base = static_cast<int64_t>(b) * seq_len * kv_row_stride + g * D;
  const int tid = threadIdx.x;

  for (int c = tid; c < kBlockM * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool valid = r < q_rows;
    const int64_t off = q_base + r * q_row_stride + col;
    cp_async_16(s_q + r * S + col, valid ? a.q + off : a.q, valid);
    cp_async_16(s_do + r * S + col, valid ? a.dout + off : a.dout, valid);
  }
  auto load_kv = [&](int tile, int stage) {
    const int j0 = tile * kBlockN;
    for (int c = tid; c < kBlockN * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = j0 + r < kv_end;
      const int64_t off = kv_base + (j0 + r) * kv_row_stride + col;
      cp_async_16(s_k + (stage * kBlockN + r) * S + col, valid ? a.k + off : a.k, valid);
      cp_async_16(s_v + (stage * kBlockN + r) * S + col, valid ? a.v + off : a.v, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  const int warp = tid / 32, lane = tid % 32;
  const int mi = lane / 8, mr = lane % 8;
  const int row0 = warp * 16 + lane / 4;  // this thread's rows in the tile: row0 and row0 + 8
  float lse2[2], delta[2];                // a row past seq_len gets lse = +inf (P = 0) and delta = 0
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = q0 + row0 + 8 * r;
    const int64_t idx = (static_cast<int64_t>(b) * a.n_heads + h) * seq_len + i;
    lse2[r] = i < seq_len ? a.lse[idx] * kLog2e : INFINITY;
    delta[r] = i < seq_len ? a.scratch[idx] : 0.0f;
  }
  uint32_t q_frag[D / 16][4], do_frag[D / 16][4];
  float dq[D / 8][4];
#pragma unroll
  for (int dt = 0; dt < D / 8; ++dt) dq[dt][0] = dq[dt][1] = dq[dt][2] = dq[dt][3] = 0.0f;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    if (t == 0) {
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        ldmatrix_x4(q_frag[kk], s_q + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
        ldmatrix_x4(do_frag[kk], s_do + (warp * 16 + lane % 16) * S + kk * 16 + (lane / 16) * 8);
      }
    }
    const __nv_bfloat16* k_s = s_k + (t & 1) * kBlockN * S;
    const __nv_bfloat16* v_s = s_v + (t & 1) * kBlockN * S;

    // S = Q K^T and dP = dO V^T: K and V rows (keys, head_dim contiguous) are the "col" B operand as stored.
    float p[kBlockN / 8][4], ds[kBlockN / 8][4];
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) p[nt][e] = ds[nt][e] = 0.0f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int nt = 0; nt < kBlockN / 8; nt += 2) {
        uint32_t kf[4], vf[4];
        ldmatrix_x4(kf, k_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
        ldmatrix_x4(vf, v_s + ((nt + mi / 2) * 8 + mr) * S + kk * 16 + (mi % 2) * 8);
        mma_bf16(p[nt], q_frag[kk], kf[0], kf[1]);
        mma_bf16(p[nt + 1], q_frag[kk], kf[2], kf[3]);
        mma_bf16(ds[nt], do_frag[kk], vf[0], vf[1]);
        mma_bf16(ds[nt + 1], do_frag[kk], vf[2], vf[3]);
      }
    }
    // P = exp2(scale_log2 S - lse2), zero where the key is after the query; dS = P * (dP - delta).
    const int j0 = t * kBlockN;
    const bool need_mask = j0 + kBlockN - 1 > q0;
#pragma unroll
    for (int nt = 0; nt < kBlockN / 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float pe = exp2f(p[nt][e] * scale_log2 - lse2[e / 2]);
        if (need_mask && j0 + nt * 8 + 2 * (lane % 4) + (e & 1) > q0 + row0 + 8 * (e / 2)) pe = 0.0f;
        ds[nt][e] = pe * (ds[nt][e] - delta[e / 2]);
      }
    }
    // dQ += dS K (scaled once at the end): K rows are keys, the k index here, so ldmatrix.trans.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t sf[4] = {pack_bf16(ds[2 * kk][0], ds[2 * kk][1]), pack_bf16(ds[2 * kk][2], ds[2 * kk][3]),
                              pack_bf16(ds[2 * kk + 1][0], ds[2 * kk + 1][1]),
                              pack_bf16(ds[2 * kk + 1][2], ds[2 * kk + 1][3])};
#pragma unroll
      for (int dt = 0; dt < D / 8; dt += 2) {
        uint32_t kf[4];
        ldmatrix_x4_trans(kf, k_s + (kk * 16 + (mi % 2) * 8 + mr) * S + (dt + mi / 2) * 8);
        mma_bf16(dq[dt], sf, kf[0], kf[1]);
        mma_bf16(dq[dt + 1], sf, kf[2], kf[3]);
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites the stage just read
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    if (row >= q_rows) continue;
    __nv_bfloat16* dst = a.dq + q_base + row * q_row_stride + 2 * (lane % 4);
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      *reinterpret_cast<__nv_bfloat162*>(dst + dt * 8) =
          __floats2bfloat162_rn(dq[dt][2 * r] * a.scale, dq[dt][2 * r + 1] * a.scale);
    }
  }
}

template <int D>
static void attention_backward_launch(const AttentionBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  const float scale_log2 = a.scale * kLog2e;
  const int64_t n_rows = static_cast<int64_t>(a.batch) * a.seq_len * a.n_heads;
  constexpr int delta_rows = kThreads / (D / 8);  // rows per block of the delta kernel
  attention_backward_delta_kernel<D><<<static_cast<unsigned>((n_rows + delta_rows - 1) / delta_rows), kThreads, 0,
                                       stream>>>(a.scratch, a.dout, a.out, n_rows, a.seq_len, a.n_heads);
  KERNEL_CHECK();

  constexpr size_t dkdv_bytes = bwd_dkdv_smem_bytes<D>();
  CUDA_CHECK(cudaFuncSetAttribute(attention_backward_dkdv_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(dkdv_bytes)));
  const int splits = dkdv_splits(a.n_heads / a.n_kv_heads);
  const dim3 dkdv_grid(a.n_kv_heads * splits, a.batch, (a.seq_len + kBwdKeys - 1) / kBwdKeys);
  attention_backward_dkdv_kernel<D><<<dkdv_grid, kThreads, dkdv_bytes, stream>>>(a, scale_log2, splits);
  KERNEL_CHECK();
  if (splits > 1) {
    const int64_t elems = static_cast<int64_t>(a.batch) * a.seq_len * a.n_kv_heads * D;
    const int blocks = static_cast<int>(std::min<int64_t>((elems / 4 + 255) / 256, 4096));
    attention_backward_dkdv_reduce_kernel<<<blocks, 256, 0, stream>>>(
        a.dk, a.dv, a.scratch + delta_floats(a.batch, a.seq_len, a.n_heads), elems, splits, a.scale);
    KERNEL_CHECK();
  }

  constexpr size_t dq_bytes = bwd_dq_smem_bytes<D>();
  CUDA_CHECK(cudaFuncSetAttribute(attention_backward_dq_kernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(dq_bytes)));
  const dim3 dq_grid(a.n_heads, a.batch, (a.seq_len + kBlockM - 1) / kBlockM);
  attention_backward_dq_kernel<D><<<dq_grid, kThreads, dq_bytes, stream>>>(a, scale_log2);
  KERNEL_CHECK();
}

int64_t attention_backward_scratch_floats(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim) {
  if (batch <= 0 || seq_len <= 0 || n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0) return 0;
  const int splits = dkdv_splits(n_heads / n_kv_heads);
  const int64_t part = splits > 1 ? int64_t{2} * splits * batch * seq_len * n_kv_heads * head_dim : 0;
  return delta_floats(batch, seq_len, n_heads) + part;
}

void attention_backward(const AttentionBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.batch >= 0 && a.seq_len >= 0, "attention_backward: batch {} / seq_len {} invalid", a.batch,
            a.seq_len);
  QKD_CHECK(a.n_heads > 0 && a.n_kv_heads > 0 && a.n_heads % a.n_kv_heads == 0,
            "attention_backward: n_heads {} is not a positive multiple of n_kv_heads {}", a.n_heads, a.n_kv_heads);
  QKD_CHECK(a.head_dim == 64 || a.head_dim == 128,
            "attention_backward: head_dim {} is not supported on CUDA (64 or 128)", a.head_dim);
  QKD_CHECK(std::isfinite(a.scale), "attention_backward: scale {} is not finite", a.scale);
  QKD_CHECK(a.n_heads <= 65535 && a.batch <= 65535, "attention_backward: n_heads {} / batch {} exceed the grid",
            a.n_heads, a.batch);
  QKD_CHECK((static_cast<int64_t>(a.seq_len) + kBlockM - 1) / kBlockM <= 65535,
            "attention_backward: seq_len {} exceeds the grid ({} tiles of {} at most)", a.seq_len, 65535, kBlockM);
  for (const void* p : {static_cast<const void*>(a.dq), static_cast<const void*>(a.dk),
                        static_cast<const void*>(a.dv), static_cast<const void*>(a.dout),
                        static_cast<const void*>(a.q), static_cast<const void*>(a.k), static_cast<const void*>(a.v),
                        static_cast<const void*>(a.out)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "attention_backward: pointer {} is not 16-byte aligned", p);
  }
  if (a.batch == 0 || a.seq_len == 0) return;
  QKD_CHECK(a.dq != nullptr && a.dk != nullptr && a.dv != nullptr && a.dout != nullptr && a.q != nullptr &&
                a.k != nullptr && a.v != nullptr && a.out != nullptr && a.lse != nullptr,
            "attention_backward: dq, dk, dv, dout, q, k, v, out and lse must all be given");
  QKD_CHECK(a.scratch != nullptr, "attention_backward: scratch of {} floats (attention_backward_scratch_floats) is null",
            attention_backward_scratch_floats(a.batch, a.seq_len, a.n_heads, a.n_kv_heads, a.head_dim));
  QKD_CHECK(reinterpret_cast<uintptr_t>(a.scratch) % 16 == 0, "attention_backward: scratch {} is not 16-byte aligned",
            static_cast<const void*>(a.scratch));
  QKD_CHECK(a.n_kv_heads * dkdv_splits(a.n_heads / a.n_kv_heads) <= 65535,
            "attention_backward: n_kv_heads {} exceeds the grid", a.n_kv_heads);
  if (a.head_dim == 64) {
    attention_backward_launch<64>(a, stream);
  } else {
    attention_backward_launch<128>(a, stream);
  }
}

}  // namespace qkd::cuda
