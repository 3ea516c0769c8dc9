// CUDA decode attention (kernels/decode_attention.h): causal GQA over the KV cache for few query tokens, the
// context split across CTAs, merged by the last CTA of each kv head. bf16 operands, fp32 math.
//   out[b,i,h,:] = sum_{j <= p} softmax_j(scale * q . k_j) * v_j          (out overwritten)
//   lse[b,h,i]   = log sum_{j <= p} exp(scale * q . k_j)                  (written when lse != nullptr)
//
// One kernel, grid (n_splits, n_kv_heads, batch). A CTA streams its slice of one kv head's keys/values in
// tiles of 64 through a cp.async double buffer, and serves every query row that reads that kv head: the
// (n_heads / n_kv_heads) heads of the GQA group times seq_len tokens, so each key/value byte crosses the memory
// bus once per step. With one to a few dozen query rows the math is small next to the bytes (about rows flops
// per byte), so CUDA cores do it; tensor cores would idle on 16-row tiles that are mostly padding.
//   scores:  one thread per (row, key) dot product over head_dim, from shared memory;
//   softmax: an online softmax per row (a group of lanes per row), in the log2 domain;
//   P.V:     each thread owns 8 output columns of RPT rows, and, when there are few rows, one of several key
//            slices (partial sums added at the end), so even a single row keeps all 128 threads busy.
// With one split the CTA writes the result itself. With several, each CTA writes a normalised partial output
// and its log-sum-exp to the workspace and counts itself done on a per-(batch row, kv head) counter; the CTA
// that counts last merges the n_splits partials of its rows (weights exp(lse_s - lse)) into bf16 out and lse
// ("last block finishes", as in the CUDA programming guide's __threadfence example). That saves the separate
// combine launch a decode step used to pay per layer: each kernel boundary in a replayed graph drains the GPU
// and ramps it up again, a few microseconds, which a 7B step paid 32 times. The counters reset themselves
// (atomicInc wraps to 0 on the last count), so graph replays need no memset; the caller zeroes them once.
//
// Forward only (decode has no backward).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>

#include "kernels/cp_async.cuh"
#include "kernels/cuda_check.h"
#include "kernels/decode_attention.h"

namespace qkd::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kTile = 64;       // keys per pipeline stage: 16 KB of K+V per stage at head_dim 128
constexpr int kMaxRows = 128;   // query rows per kv head: GQA 8 x 16 tokens
constexpr int kMaxSplits = 64;  // at most kTile: the merge stages [rows][n_splits] lse in the [rows][kTile] scores
// Counters at the start of the workspace, a fixed number for every plan so that plans sharing a workspace (the
// runtime keeps one for its batch-1 and its batch-N plan) agree where they are and no plan's partials overwrite
// another's counters. A plan splits only when batch * n_kv_heads < 2 * SMs, so 4096 serve any GPU below 2048 SMs.
constexpr int kCounterSlots = 4096;
constexpr size_t kCounterBytes = kCounterSlots * sizeof(unsigned int);  // a multiple of 16: partials stay aligned
static_assert(kMaxSplits <= kTile, "the merge stages the split lse in the score buffer");
constexpr float kLn2 = 0.69314718f;
constexpr float kLog2e = 1.44269504f;

struct SplitParams {
  int rows;            // query rows per CTA: group * seq_len; row r is token r / group, head h0 + r % group
  int group;           // n_heads / n_kv_heads
  int row_lanes;       // P.V: threads (per 8-column chunk) that split the rows; each holds RPT rows
  int key_slices;      // P.V: threads that split one tile's keys for the same rows
  int lanes_per_row;   // softmax: lanes per row (a power of two, at most 32)
  int n_splits;
  float scale_log2;    // scale * log2(e)
  float* part_out;     // [batch, seq_len, n_heads, n_splits, head_dim]  (n_splits > 1)
  float* part_lse;     // [batch, seq_len, n_heads, n_splits], log2 domain
  unsigned int* counters;  // [batch, n_kv_heads] CTAs of (b, kv head) done, 0 between launches (n_splits > 1)
};

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[8]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

template <int D>
constexpr int kv_stride() {
  return D + 8;  // 16 bytes of padding: 8 consecutive rows read at one column hit 8 different bank quads
}

// Shared memory of one CTA, carved from the dynamic allocation.
struct SplitSmem {
  __nv_bfloat16* k;  // [2][kTile][S]
  __nv_bfloat16* v;  // [2][kTile][S]
  float* q;          // [rows][D]
  float* p;          // [rows][kTile] scores, then probabilities; in the merge [rows][n_splits] split lse
  float* m;          // [rows] running max (log2 domain)
  float* l;          // [rows] running denominator
  float* alpha;      // [rows] this tile's rescale factor
};

template <int D>
__device__ __forceinline__ SplitSmem split_smem(unsigned char* raw, int rows) {
  constexpr int S = kv_stride<D>();
  SplitSmem s;
  s.k = reinterpret_cast<__nv_bfloat16*>(raw);
  s.v = s.k + 2 * kTile * S;
  s.q = reinterpret_cast<float*>(s.v + 2 * kTile * S);
  s.p = s.q + rows * D;
  s.m = s.p + rows * kTile;
  s.l = s.m + rows;
  s.alpha = s.l + rows;
  return s;
}

// Index of split 0 of CTA (b, g)'s query row r in the partial arrays: rows are [b, i, h], splits innermost.
__device__ __forceinline__ int64_t partial_base(const AttentionArgs<__nv_bfloat16>& a, const SplitParams& p, int b,
                                                int g, int r) {
  return ((static_cast<int64_t>(b) * a.seq_len + r / p.group) * a.n_heads + g * p.group + r % p.group) * p.n_splits;
}

template <int D>
size_t split_smem_bytes(int rows) {
  return 4 * kTile * kv_stride<D>() * sizeof(__nv_bfloat16)   // K, V double buffers
         + static_cast<size_t>(rows) * D * sizeof(float)       // Q in fp32
         + static_cast<size_t>(rows) * kTile * sizeof(float)   // scores, then probabilities
         + 3 * static_cast<size_t>(rows) * sizeof(float);      // running max, denominator, rescale factor
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

// One CTA's slice [k_begin, k_end) of kv head g of sequence b, for all its query rows: with one split the final
// out and lse, otherwise a normalised partial output and its log-sum-exp (log2 domain) at split `split`.
template <int D, int RPT>
__device__ __forceinline__ void attend_slice(const AttentionArgs<__nv_bfloat16>& a, const SplitParams& p,
                                             const SplitSmem& sm, int b, int g, int split, int k_begin, int k_end) {
  constexpr int S = kv_stride<D>();
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  const int tid = threadIdx.x;
  const int h0 = g * p.group;
  const int start = a.start_pos[b];
  const __nv_bfloat16* k = a.k + b * a.kv_batch_stride + g * a.kv_head_stride;
  const __nv_bfloat16* v = a.v + b * a.kv_batch_stride + g * a.kv_head_stride;
  const int n_tiles = (k_end - k_begin + kTile - 1) / kTile;
  auto load_kv = [&](int tile, int stage) {
    const int j0 = k_begin + tile * kTile;
    for (int c = tid; c < kTile * kChunks; c += kThreads) {
      const int r = c / kChunks, col = (c % kChunks) * 8;
      const bool valid = j0 + r < k_end;  // zero-fill past the slice: 0 * garbage could be NaN
      const int64_t off = static_cast<int64_t>(j0 + r) * a.kv_seq_stride + col;
      cp_async_16(sm.k + (stage * kTile + r) * S + col, valid ? k + off : k, valid);
      cp_async_16(sm.v + (stage * kTile + r) * S + col, valid ? v + off : v, valid);
    }
  };
  load_kv(0, 0);
  cp_async_commit();

  // The group's heads are adjacent in q, so the rows of one token are contiguous.
  for (int c = tid; c < p.rows * kChunks; c += kThreads) {
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const int64_t q_off =
        ((static_cast<int64_t>(b) * a.seq_len + r / p.group) * a.n_heads + h0 + r % p.group) * D + col;
    float f[8];
    unpack8(*reinterpret_cast<const uint4*>(a.q + q_off), f);
    *reinterpret_cast<float4*>(sm.q + r * D + col) = make_float4(f[0], f[1], f[2], f[3]);
    *reinterpret_cast<float4*>(sm.q + r * D + col + 4) = make_float4(f[4], f[5], f[6], f[7]);
  }
  for (int r = tid; r < p.rows; r += kThreads) {
    sm.m[r] = -INFINITY;
    sm.l[r] = 0.0f;
  }

  // P.V roles: 8 output columns (chunk) x a row lane x a key slice.
  const int chunk_col = (tid % kChunks) * 8;
  const int row_lane = tid / kChunks / p.key_slices, key_slice = tid / kChunks % p.key_slices;
  const bool pv_active = row_lane < p.row_lanes;
  float acc[RPT][8];
#pragma unroll
  for (int u = 0; u < RPT; ++u) {
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[u][e] = 0.0f;
  }
  // Softmax roles: lanes_per_row lanes (never straddling a warp) per row.
  const int lpr = p.lanes_per_row;
  const int sm_row = tid / lpr, sm_sub = tid % lpr;
  const bool sm_active = sm_row < p.rows;

  for (int t = 0; t < n_tiles; ++t) {
    if (t + 1 < n_tiles) load_kv(t + 1, (t + 1) & 1);
    cp_async_commit();
    cp_async_wait<1>();  // everything but the tile just requested has landed
    __syncthreads();
    const __nv_bfloat16* k_s = sm.k + (t & 1) * kTile * S;
    const __nv_bfloat16* v_s = sm.v + (t & 1) * kTile * S;
    const int j0 = k_begin + t * kTile;

    // Scores. Consecutive threads take consecutive keys of one row: the q reads are broadcasts and the padded
    // K rows keep the 16-byte reads free of bank conflicts.
    for (int pi = tid; pi < p.rows * kTile; pi += kThreads) {
      const int r = pi / kTile, key = pi % kTile;
      const float* qr = sm.q + r * D;
      const __nv_bfloat16* kr = k_s + key * S;
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float kf[8];
        unpack8(*reinterpret_cast<const uint4*>(kr + c * 8), kf);
        const float4 qa = *reinterpret_cast<const float4*>(qr + c * 8);
        const float4 qb = *reinterpret_cast<const float4*>(qr + c * 8 + 4);
        dot += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
               qb.z * kf[6] + qb.w * kf[7];
      }
      const int j = j0 + key;
      const bool visible = j < k_end && j <= start + r / p.group;
      sm.p[r * kTile + key] = visible ? dot * p.scale_log2 : -INFINITY;
    }
    __syncthreads();

    // Online softmax. Every thread runs the shuffles (full-warp masks); only rows that exist touch memory.
    {
      float* pr = sm.p + sm_row * kTile;
      float mx = -INFINITY;
      if (sm_active) {
        for (int key = sm_sub; key < kTile; key += lpr) mx = fmaxf(mx, pr[key]);
      }
      for (int o = lpr / 2; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
      const float m_old = sm_active ? sm.m[sm_row] : -INFINITY;
      const float m_new = fmaxf(m_old, mx);
      // A row sees no key at all in a slice that begins after its position: keep the base finite so that
      // exp2(-inf - (-inf)) never makes a NaN; its probabilities and alpha then come out 0.
      const float base = m_new == -INFINITY ? 0.0f : m_new;
      float sum = 0.0f;
      if (sm_active) {
        for (int key = sm_sub; key < kTile; key += lpr) {
          const float e = exp2f(pr[key] - base);
          pr[key] = e;
          sum += e;
        }
      }
      for (int o = lpr / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
      // The row group's reads of sm.m[sm_row] (above) must be ordered before its first lane overwrites it. The
      // shuffles converge the warp but do not order shared memory: compute-sanitizer racecheck reported this
      // read/write pair (43 warnings in test_gpu_attention, H200, 2026-12-04). Every lane gets here.
      __syncwarp();
      if (sm_active && sm_sub == 0) {
        const float alpha = exp2f(m_old - base);
        sm.alpha[sm_row] = alpha;
        sm.l[sm_row] = sm.l[sm_row] * alpha + sum;
        sm.m[sm_row] = m_new;
      }
    }
    __syncthreads();

    if (pv_active) {
#pragma unroll
      for (int u = 0; u < RPT; ++u) {
        const int r = row_lane + u * p.row_lanes;
        if (r < p.rows) {
          const float alpha = sm.alpha[r];
#pragma unroll
          for (int e = 0; e < 8; ++e) acc[u][e] *= alpha;
        }
      }
      for (int key = key_slice; key < kTile; key += p.key_slices) {
        float vf[8];
        unpack8(*reinterpret_cast<const uint4*>(v_s + key * S + chunk_col), vf);
#pragma unroll
        for (int u = 0; u < RPT; ++u) {
          const int r = row_lane + u * p.row_lanes;
          if (r < p.rows) {
            const float pk = sm.p[r * kTile + key];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[u][e] += pk * vf[e];
          }
        }
      }
    }
    __syncthreads();  // the next iteration's prefetch overwrites the stage just read
  }

  if (p.key_slices > 1) {
    // Key slices exist only with RPT == 1 (the plan picks the fewest rows per thread), so the partial sums,
    // key_slices * rows * D floats <= 128 * 8 floats, fit in the now idle K buffers.
    float* red = reinterpret_cast<float*>(sm.k);
    const int r = row_lane;
    if (pv_active && key_slice > 0 && r < p.rows) {
      float* dst = red + (static_cast<int64_t>(key_slice) * p.rows + r) * D + chunk_col;
#pragma unroll
      for (int e = 0; e < 8; ++e) dst[e] = acc[0][e];
    }
    __syncthreads();
    if (pv_active && key_slice == 0 && r < p.rows) {
      for (int ks = 1; ks < p.key_slices; ++ks) {
        const float* src = red + (static_cast<int64_t>(ks) * p.rows + r) * D + chunk_col;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[0][e] += src[e];
      }
    }
  }
  if (!pv_active || key_slice != 0) return;

#pragma unroll
  for (int u = 0; u < RPT; ++u) {
    const int r = row_lane + u * p.row_lanes;
    if (r >= p.rows) continue;
    const int i = r / p.group, h = h0 + r % p.group;
    const float l = sm.l[r], m = sm.m[r];
    if (p.n_splits == 1) {  // the only split holds key 0: l > 0
      const float inv = 1.0f / l;
      uint4 packed;
      __nv_bfloat162* h2 = reinterpret_cast<__nv_bfloat162*>(&packed);
#pragma unroll
      for (int e = 0; e < 4; ++e) h2[e] = __floats2bfloat162_rn(acc[u][2 * e] * inv, acc[u][2 * e + 1] * inv);
      *reinterpret_cast<uint4*>(a.out + ((static_cast<int64_t>(b) * a.seq_len + i) * a.n_heads + h) * D +
                                chunk_col) = packed;
      if (a.lse != nullptr && chunk_col == 0) {
        a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + i] = (m + log2f(l)) * kLn2;
      }
    } else {
      const int64_t idx = partial_base(a, p, b, g, r) + split;
      const float inv = l > 0.0f ? 1.0f / l : 0.0f;
      float* dst = p.part_out + idx * D + chunk_col;
      *reinterpret_cast<float4*>(dst) =
          make_float4(acc[u][0] * inv, acc[u][1] * inv, acc[u][2] * inv, acc[u][3] * inv);
      *reinterpret_cast<float4*>(dst + 4) =
          make_float4(acc[u][4] * inv, acc[u][5] * inv, acc[u][6] * inv, acc[u][7] * inv);
      if (chunk_col == 0) p.part_lse[idx] = l > 0.0f ? m + log2f(l) : -INFINITY;
    }
  }
}

// The merge of CTA (b, g)'s rows, by whichever of the n_splits CTAs of (b, g) finishes last; the others return.
//
// Memory ordering (PTX memory model, fence-fence synchronisation through the counter):
//  * release: the barrier orders every thread's partial stores before thread 0's __threadfence() (fence.sc.gpu,
//    cumulative: it covers the writes the barrier made visible to thread 0), and the fence orders them before
//    thread 0's increment of the counter;
//  * acquire: the CTA whose increment reads n_splits - 1 has read the increments of all other CTAs of (b, g)
//    (one RMW chain); thread 0's second __threadfence() orders that read before everything its CTA does after the
//    following barrier, so the merge sees every CTA's partials. The merge also reads them with ld.global.cg (L2,
//    the GPU's point of coherence), so no line this SM's L1 may hold can stand in for them.
// The counter resets itself: atomicInc(ctr, n_splits - 1) stores 0 when it reads n_splits - 1, i.e. exactly on
// the last count, so the next launch (or graph replay) starts from 0 with no store and no memset. The next
// launch is ordered after this one by the stream, so no CTA of it can see a count of this one.
//
// The arithmetic is the former combine kernel's, term for term: the max of the split lse, then in split order,
// skipping empty splits, w = 2^(lse_s - max), w_sum += w, acc += w * out_s (one fma), out = bf16(acc / w_sum)
// with the division as acc * (1 / w_sum), lse = (max + log2 w_sum) ln 2; so out and lse equal the two-kernel
// result bit for bit. Threads now take single columns instead of a warp taking a row, which changes no operation
// on any one output.
template <int D>
__device__ __forceinline__ void merge_if_last(const AttentionArgs<__nv_bfloat16>& a, const SplitParams& p,
                                              const SplitSmem& sm, int b, int g) {
  __shared__ bool s_last;
  __syncthreads();  // every thread's partial stores (attend_slice, or the empty split's lse) are done
  if (threadIdx.x == 0) {
    __threadfence();
    const unsigned int done_before =
        atomicInc(p.counters + static_cast<int64_t>(b) * a.n_kv_heads + g, static_cast<unsigned>(p.n_splits - 1));
    __threadfence();
    s_last = done_before == static_cast<unsigned>(p.n_splits - 1);
  }
  __syncthreads();
  if (!s_last) return;

  // Stage the rows' split lse, [rows][n_splits], in the idle score buffer (n_splits <= kTile).
  const int n = p.n_splits;
  float* s_lse = sm.p;
  for (int idx = threadIdx.x; idx < p.rows * n; idx += kThreads) {
    const int r = idx / n, s = idx % n;
    s_lse[idx] = __ldcg(p.part_lse + partial_base(a, p, b, g, r) + s);
  }
  __syncthreads();

  // One output column of one row per thread and step: consecutive threads read consecutive columns of a split.
  for (int idx = threadIdx.x; idx < p.rows * D; idx += kThreads) {
    const int r = idx / D, col = idx % D;
    const float* lse = s_lse + r * n;
    float mx = -INFINITY;
    for (int s = 0; s < n; ++s) mx = fmaxf(mx, lse[s]);
    // mx is finite: split 0 holds key 0, which every row sees.
    const float* po = p.part_out + partial_base(a, p, b, g, r) * D + col;
    float acc = 0.0f, w_sum = 0.0f;
    for (int s = 0; s < n; ++s) {
      const float ls = lse[s];
      if (ls == -INFINITY) continue;  // an empty split: its partial output was never written
      const float w = exp2f(ls - mx);
      w_sum += w;
      acc += w * __ldcg(po + static_cast<int64_t>(s) * D);
    }
    const float inv = 1.0f / w_sum;
    const int i = r / p.group, h = g * p.group + r % p.group;
    a.out[((static_cast<int64_t>(b) * a.seq_len + i) * a.n_heads + h) * D + col] = __float2bfloat16_rn(acc * inv);
    if (a.lse != nullptr && col == 0) {
      a.lse[(static_cast<int64_t>(b) * a.n_heads + h) * a.seq_len + i] = (mx + log2f(w_sum)) * kLn2;
    }
  }
}

// Minimum CTAs per SM: with the merge in the kernel, ptxas aimed the 8-rows-per-thread kernels at 128 registers
// and spilled (12 bytes at head_dim 128). Kernels of 8 or 16 rows per thread serve over 32 rows, whose shared
// memory (70 KB and up) allows at most three CTAs per SM; "at least one" lets ptxas take about 150 registers, which
// still fit three. 0 gives no hint (no .minnctapersm): the smaller kernels keep ptxas's own choice.
template <int D, int RPT>
static __global__ void __launch_bounds__(kThreads, RPT >= 8 ? 1 : 0)
    decode_attention_split_kernel(const AttentionArgs<__nv_bfloat16> a, const SplitParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const SplitSmem sm = split_smem<D>(smem_raw, p.rows);
  const int split = blockIdx.x, g = blockIdx.y, b = blockIdx.z;
  const int ctx = a.start_pos[b] + a.seq_len;
  // The live context divided evenly between the planned splits, in whole tiles.
  const int chunk = ((ctx + p.n_splits - 1) / p.n_splits + kTile - 1) / kTile * kTile;
  const int k_begin = split * chunk;
  const int k_end = min(ctx, k_begin + chunk);
  if (k_begin < k_end) {
    attend_slice<D, RPT>(a, p, sm, b, g, split, k_begin, k_end);
  } else {  // a split past the live context (n_splits > 1 only: split 0 always holds key 0): an empty partial
    for (int r = threadIdx.x; r < p.rows; r += kThreads) p.part_lse[partial_base(a, p, b, g, r) + split] = -INFINITY;
  }
  if (p.n_splits > 1) merge_if_last<D>(a, p, sm, b, g);
}

namespace {

// Smallest power of two >= n (n >= 1).
int next_pow2(int n) {
  int p = 1;
  while (p < n) p *= 2;
  return p;
}

void check_shape(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim) {
  QKD_CHECK(batch > 0 && seq_len > 0, "decode_attention: batch {} / seq_len {} must be positive", batch, seq_len);
  QKD_CHECK(n_heads > 0 && n_kv_heads > 0 && n_heads % n_kv_heads == 0,
            "decode_attention: n_heads {} is not a positive multiple of n_kv_heads {}", n_heads, n_kv_heads);
  QKD_CHECK(head_dim == 64 || head_dim == 128, "decode_attention: head_dim {} is not supported on CUDA (64 or 128)",
            head_dim);
  const int64_t rows = static_cast<int64_t>(n_heads / n_kv_heads) * seq_len;
  QKD_CHECK(rows <= kMaxRows,
            "decode_attention: (n_heads / n_kv_heads) * seq_len = {} * {} = {} query rows per kv head exceeds {}; "
            "use attention_forward (prefill) for this step",
            n_heads / n_kv_heads, seq_len, rows, kMaxRows);
  QKD_CHECK(n_kv_heads <= 65535 && batch <= 65535, "decode_attention: n_kv_heads {} / batch {} exceed the grid",
            n_kv_heads, batch);
}

template <int D, int RPT>
void launch_split(const AttentionArgs<__nv_bfloat16>& a, const SplitParams& p, cudaStream_t stream) {
  const size_t bytes = split_smem_bytes<D>(p.rows);
  CUDA_CHECK(cudaFuncSetAttribute(decode_attention_split_kernel<D, RPT>,
                                  cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  const dim3 grid(p.n_splits, a.n_kv_heads, a.batch);
  decode_attention_split_kernel<D, RPT><<<grid, kThreads, bytes, stream>>>(a, p);
  KERNEL_CHECK();
}

template <int D>
void launch(const AttentionArgs<__nv_bfloat16>& a, SplitParams p, cudaStream_t stream) {
  constexpr int kGroups = kThreads / (D / 8);  // threads per 8-column chunk
  // The fewest rows per thread that cover all rows: fewer rows per thread leaves threads for key slices.
  int rpt = 1;
  while ((p.rows + rpt - 1) / rpt > kGroups) rpt *= 2;
  p.row_lanes = (p.rows + rpt - 1) / rpt;
  p.key_slices = kGroups / p.row_lanes;
  p.lanes_per_row = std::min(32, kThreads / next_pow2(p.rows));
  switch (rpt) {
    case 1: launch_split<D, 1>(a, p, stream); break;
    case 2: launch_split<D, 2>(a, p, stream); break;
    case 4: launch_split<D, 4>(a, p, stream); break;
    case 8: launch_split<D, 8>(a, p, stream); break;
    case 16: launch_split<D, 16>(a, p, stream); break;
    default: fail("decode_attention: {} rows per thread is out of range (rows {})", rpt, p.rows);
  }
}

}  // namespace

DecodeAttentionPlan decode_attention_plan(int batch, int seq_len, int n_heads, int n_kv_heads, int head_dim,
                                          int max_ctx) {
  check_shape(batch, seq_len, n_heads, n_kv_heads, head_dim);
  QKD_CHECK(max_ctx >= seq_len, "decode_attention_plan: max_ctx {} is smaller than seq_len {}", max_ctx, seq_len);
  int device = 0, sms = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  DecodeAttentionPlan plan;
  plan.batch = batch;
  plan.seq_len = seq_len;
  plan.n_heads = n_heads;
  plan.n_kv_heads = n_kv_heads;
  plan.head_dim = head_dim;
  plan.max_ctx = max_ctx;
  // About two CTAs per SM: enough to cover the memory latency of one CTA's tile loads with another's math.
  const int64_t work = static_cast<int64_t>(batch) * n_kv_heads;
  int64_t n_splits = (2 * static_cast<int64_t>(sms) + work - 1) / work;
  n_splits = std::min<int64_t>(n_splits, (max_ctx + kTile - 1) / kTile);  // at least a tile of keys each
  n_splits = std::clamp<int64_t>(n_splits, 1, kMaxSplits);
  plan.n_splits = static_cast<int>(n_splits);
  if (plan.n_splits > 1) {
    QKD_CHECK(work <= kCounterSlots,
              "decode_attention_plan: batch {} x n_kv_heads {} = {} split (batch, kv head) pairs exceed the {} "
              "counters", batch, n_kv_heads, work, kCounterSlots);
    plan.counter_bytes = kCounterBytes;
    plan.workspace_bytes = kCounterBytes + static_cast<size_t>(batch) * seq_len * n_heads * plan.n_splits *
                                               (head_dim + 1) * sizeof(float);
  }
  return plan;
}

void decode_attention_forward(const AttentionArgs<__nv_bfloat16>& a, const DecodeAttentionPlan& plan,
                              void* workspace, cudaStream_t stream) {
  check_shape(a.batch, a.seq_len, a.n_heads, a.n_kv_heads, a.head_dim);
  QKD_CHECK(a.n_heads == plan.n_heads && a.n_kv_heads == plan.n_kv_heads && a.head_dim == plan.head_dim,
            "decode_attention_forward: heads {}/{} x head_dim {} differ from the plan's {}/{} x {}", a.n_heads,
            a.n_kv_heads, a.head_dim, plan.n_heads, plan.n_kv_heads, plan.head_dim);
  QKD_CHECK(a.batch <= plan.batch && a.seq_len <= plan.seq_len,
            "decode_attention_forward: batch {} x seq_len {} exceeds the plan's {} x {}", a.batch, a.seq_len,
            plan.batch, plan.seq_len);
  QKD_CHECK(plan.n_splits >= 1 && plan.n_splits <= kMaxSplits, "decode_attention_forward: plan n_splits {} invalid",
            plan.n_splits);
  QKD_CHECK(plan.n_splits == 1 || workspace != nullptr,
            "decode_attention_forward: the plan has {} splits and needs {} bytes of workspace, got null",
            plan.n_splits, plan.workspace_bytes);
  QKD_CHECK(plan.n_splits == 1 || (plan.counter_bytes == kCounterBytes &&
                                   static_cast<int64_t>(a.batch) * a.n_kv_heads <= kCounterSlots),
            "decode_attention_forward: plan counter_bytes {} (want {}) or batch {} x n_kv_heads {} (at most {}) "
            "invalid", plan.counter_bytes, kCounterBytes, a.batch, a.n_kv_heads, kCounterSlots);
  QKD_CHECK(a.kv_seq_stride >= a.head_dim && a.kv_head_stride >= a.head_dim && a.kv_batch_stride >= 0,
            "decode_attention_forward: kv strides (batch {}, head {}, seq {}) are invalid for head_dim {}",
            a.kv_batch_stride, a.kv_head_stride, a.kv_seq_stride, a.head_dim);
  QKD_CHECK(a.kv_seq_stride % 8 == 0 && a.kv_head_stride % 8 == 0 && a.kv_batch_stride % 8 == 0,
            "decode_attention_forward: kv strides (batch {}, head {}, seq {}) must be multiples of 8 (16-byte loads)",
            a.kv_batch_stride, a.kv_head_stride, a.kv_seq_stride);
  for (const void* ptr : {static_cast<const void*>(a.out), static_cast<const void*>(a.q),
                          static_cast<const void*>(a.k), static_cast<const void*>(a.v),
                          static_cast<const void*>(workspace)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(ptr) % 16 == 0, "decode_attention_forward: pointer {} is not 16-byte "
              "aligned", ptr);
  }
  QKD_CHECK(std::isfinite(a.scale), "decode_attention_forward: scale {} is not finite", a.scale);
  QKD_CHECK(a.start_pos != nullptr, "decode_attention_forward: start_pos is null");

  SplitParams p{};
  p.group = a.n_heads / a.n_kv_heads;
  p.rows = p.group * a.seq_len;
  p.n_splits = plan.n_splits;
  p.scale_log2 = a.scale * kLog2e;
  if (plan.n_splits > 1) {
    // The counters first (a fixed region, see kCounterSlots), then the partials, laid out for the plan's largest
    // step; a smaller step uses a prefix of each array.
    p.counters = static_cast<unsigned int*>(workspace);
    p.part_out = reinterpret_cast<float*>(static_cast<unsigned char*>(workspace) + kCounterBytes);
    p.part_lse = p.part_out + static_cast<size_t>(plan.batch) * plan.seq_len * plan.n_heads * plan.n_splits *
                                  plan.head_dim;
  }
  if (a.head_dim == 64) {
    launch<64>(a, p, stream);
  } else {
    launch<128>(a, p, stream);
  }
}

}  // namespace qkd::cuda
