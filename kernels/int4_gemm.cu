// CUDA linear layer with int4 weights (kernels/int4_gemm.h), bf16 activations, fp32 accumulation:
//   forward:   y[m, n]  (=|+=)  x[m, k]  . dequant(W)[n, k]^T
//   backward:  dx[m, k] (=|+=)  dy[m, n] . dequant(W)[n, k]          (W frozen: no weight gradient)
// Three kernels, all on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate):
//  - int4_gemv_factored_kernel, forward with m <= 2 and groups of 128 or a whole row (batch-1 decode of g128
//    models): the scale is applied once per 128-column chunk instead of once per weight (see its comment).
//  - int4_gemv_kernel, the other forwards with m <= 16 (decode). Memory-bound: the weight is read once, 16 bytes
//    per lane, straight into registers, and dequantized there into the mma's A operand (weight rows are the mma's
//    M, tokens its N, so m = 1 wastes 7/8 of an n8 tile instead of 15/16 of an m16 one). A lane loads 32
//    consecutive columns of a row; the four lanes of a quad (t = 0..3) hold four such pieces, and each k16 step
//    contracts columns {32t + 4s + 0..3 : t} -- a permutation of k that the activations' B operand follows, so
//    every operand is one contiguous 16-byte load and nothing is shuffled. The 4 warps of a block split k and
//    meet in shared memory at the end; a block covers 16 or 32 rows, so 4096 rows give 128-256 blocks for 132
//    SMs, and several blocks per SM keep enough loads in flight. A warp issues the loads of U chunks (weights,
//    their scale codes and the matching x) before it dequantizes the first of them.
//  - int4_gemm_kernel, the forward for m > 16 and every backward: a 128 x 128 output tile per block, k in steps
//    of 64. Activations stream into a 3-stage shared-memory ring with cp.async; each thread loads one 16-byte
//    piece of the weight tile a step ahead into registers, dequantizes it to bf16 in shared memory, and the
//    8 warps (64 x 32 each) read both operands with ldmatrix. The backward uses the same weight tile read
//    through ldmatrix.trans, which hands out W's columns as the B operand.
// All are instantiated per scale storage type (int4_format.h: bf16 scales dequantize in bf16x2, fp16 ones in
// fp32). docs/int4-gemm-notes.md has the measurements, and the variants that lost.
#include <cstdint>
#include <cstring>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/int4_gemm.h"

namespace qkd::cuda {
namespace {

using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;
namespace dq = qkd::int4_device;

struct WeightParams {
  const uint32_t* packed;  // [n, k/8]
  const uint16_t* scales;  // [n, groups]
  const uint16_t* mins;    // [n, groups] when asymmetric
  int n, k, groups;
  int group_shift;  // group of column c = c >> group_shift (31 for per-channel: always group 0)
  Int4Symmetry sym;
  ScaleType scale_type;
};

WeightParams weight_params(const Int4Weight& w) {
  return {w.packed, w.scales, w.mins, w.n, w.k, w.k / w.group_size, int4_group_shift(w.group_size, w.k), w.sym,
          w.scale_type};
}

__device__ __forceinline__ uint32_t as_u32(bf162 v) {
  uint32_t u;
  memcpy(&u, &v, 4);
  return u;
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

// Weights are read once per launch (per token tile in the GEMM, where L2 serves the repeats): keep them out
// of L1 so the activations, which every block re-reads, stay there. kL2Block adds an L2 prefetch hint: the L2
// fetches the whole 256-byte block around the address, which the other warps of the block read next (the
// factored GEMV: 1-2% faster on the decode chain in each of three calls on the H200).
template <bool kL2Block = false>
__device__ __forceinline__ uint4 load_stream(const uint32_t* p) {
  uint4 v;
  if constexpr (kL2Block) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  } else {
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p));
  }
  return v;
}

// The scale (low half) and min (high half) codes of the group holding column col of weight row row.
__device__ __forceinline__ uint32_t load_codes(const WeightParams& w, int row, int col) {
  const int64_t gi = static_cast<int64_t>(row) * w.groups + (col >> w.group_shift);
  uint32_t c = __ldg(w.scales + gi);
  if (w.sym == Int4Symmetry::Asymmetric) c |= static_cast<uint32_t>(__ldg(w.mins + gi)) << 16;
  return c;
}

template <ScaleType ST>
__device__ __forceinline__ dq::GroupConsts<ST> consts_of(uint32_t codes, Int4Symmetry sym) {
  return dq::group_consts<ST>(static_cast<uint16_t>(codes & 0xFFFFu), static_cast<uint16_t>(codes >> 16), sym);
}

// c += a . b for one m16n8k16 tile; fragment layouts as in the PTX ISA (a: 4 regs, b: 2 regs, c: 4 floats).
__device__ __forceinline__ void mma_16816(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void store_out(bf16* out, int64_t idx, float v, Accumulate mode) {
  if (mode == Accumulate::Add) v += __bfloat162float(out[idx]);
  out[idx] = __float2bfloat16_rn(v);
}

// ------------------------------------------------------------------------------------------- decode GEMV

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = kGemvWarps * 32;
constexpr int kGemvChunk = 128;  // columns a warp contracts per step: 4 lanes of a quad x 32

struct GemvParams {
  bf16* y;        // [m, n]
  const bf16* x;  // [m, k]
  WeightParams w;
  int m;
  Accumulate mode;
};

// NT: n8 token tiles (m <= 8 NT). RB: 16-row blocks per block, which reuse one load of x. U: chunks whose
// loads are all issued before the first is used (the loads in flight per warp).
template <int NT, int RB, int U, ScaleType ST>
__global__ void __launch_bounds__(kGemvThreads) int4_gemv_kernel(const GemvParams p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16 * RB;
  const int n = p.w.n, k = p.w.k;
  const int n_chunks = (k + kGemvChunk - 1) / kGemvChunk;
  const int64_t row_words = k / 8;

  float acc[RB][NT][4];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[rb][j][e] = 0.0f;

  for (int c0 = warp; c0 < n_chunks; c0 += kGemvWarps * U) {
    uint4 wq[U][RB][2];  // [chunk][row block][rows g, g + 8]: 32 columns each
    uint4 xq[U][NT][4];  // [chunk][token tile][16-byte piece]: 32 columns of token 8j + g
    uint32_t codes[U][RB][2];  // scale | min << 16 of those pieces' groups
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int col = (c0 + u * kGemvWarps) * kGemvChunk + 32 * t;
      const bool col_ok = col < k;  // false past the last chunk too
#pragma unroll
      for (int rb = 0; rb < RB; ++rb)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int row = row0 + rb * 16 + h * 8 + g;
          const bool ok = col_ok && row < n;
          wq[u][rb][h] = ok ? load_stream(p.w.packed + row * row_words + col / 8) : make_uint4(0, 0, 0, 0);
          codes[u][rb][h] = ok ? load_codes(p.w, row, col) : 0u;  // zero scale: a skipped piece is zero
        }
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const int tok = j * 8 + g;
        const bool ok = col_ok && tok < p.m;
        const uint4* src = reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(tok) * k + col);
#pragma unroll
        for (int q = 0; q < 4; ++q) xq[u][j][q] = ok ? __ldg(src + q) : make_uint4(0, 0, 0, 0);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int rb = 0; rb < RB; ++rb) {
        const dq::GroupConsts<ST> gc0 = consts_of<ST>(codes[u][rb][0], p.w.sym);
        const dq::GroupConsts<ST> gc1 = consts_of<ST>(codes[u][rb][1], p.w.sym);
#pragma unroll
        for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i+7 of the lane's piece, two k16 steps
          bf162 lo[4], hi[4];          // rows g and g + 8
          dq::dequant_word<ST>(word(wq[u][rb][0], i), gc0, lo);
          dq::dequant_word<ST>(word(wq[u][rb][1], i), gc1, hi);
#pragma unroll
          for (int j = 0; j < NT; ++j) {
            // a0/a2 = row g, columns +0..1 / +2..3 of the step; a1/a3 the same for row g + 8; b0/b1 match.
            const uint4& xv = xq[u][j][i];
            mma_16816(acc[rb][j], as_u32(lo[0]), as_u32(hi[0]), as_u32(lo[1]), as_u32(hi[1]), xv.x, xv.y);
            mma_16816(acc[rb][j], as_u32(lo[2]), as_u32(hi[2]), as_u32(lo[3]), as_u32(hi[3]), xv.z, xv.w);
          }
        }
      }
  }

  // The 4 warps hold partial sums over disjoint k ranges: add them in shared memory. Lane-minor layout, so
  // each warp's writes and reads are conflict-free.
  constexpr int kOut = RB * NT * 4;
  __shared__ float red[kGemvWarps][kOut][32];
#pragma unroll
  for (int rb = 0; rb < RB; ++rb)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) red[warp][(rb * NT + j) * 4 + e][lane] = acc[rb][j][e];
  __syncthreads();
  for (int i = warp; i < kOut; i += kGemvWarps) {
    float s = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) s += red[w][i][lane];
    const int rb = i / (NT * 4), j = (i / 4) % NT, e = i % 4;
    // accumulator e: row g (+8 for e >= 2), token 2t (+1 for odd e) of the tile
    const int row = row0 + rb * 16 + g + (e >> 1) * 8;
    const int tok = j * 8 + 2 * t + (e & 1);
    if (row < n && tok < p.m) store_out(p.y, static_cast<int64_t>(tok) * n + row, s, p.mode);
  }
}

template <int NT, int RB, int U>
void launch_gemv(const GemvParams& p, cudaStream_t stream) {
  const int blocks = (p.w.n + 16 * RB - 1) / (16 * RB);
  if (p.w.scale_type == ScaleType::BF16) {
    int4_gemv_kernel<NT, RB, U, ScaleType::BF16><<<blocks, kGemvThreads, 0, stream>>>(p);
  } else {
    int4_gemv_kernel<NT, RB, U, ScaleType::FP16><<<blocks, kGemvThreads, 0, stream>>>(p);
  }
  KERNEL_CHECK();
}

// ---------------------------------------------------------------------------- factored decode GEMV (m <= 2)
// For group sizes of 128 or more (g128, per-channel), the 128 columns a quad contracts per chunk lie in one group
// of each row, so the scale can wait until the chunk's sum is done:
//   sum_c w_c x_c = s . sum_c (128 + u_c) x_c + b . sum_c x_c,   b = -136 s (symmetric) or m - 128 s (asymmetric)
// The mma takes 128 + u straight from magic_pair (at most two instructions a pair, none for scale or offset),
// the chunk's sum of x comes from shared memory where the block computed it once, and the scale and bias are
// applied in fp32 once per chunk: about 10 instructions a 32-bit word against int4_gemv_kernel's 16, and more
// exact, since no weight is rounded to bf16 (the cancellation against 128 . sum(x) costs a few fp32 units in the
// last place of the chunk sum). x lives in shared memory, not in registers (m <= 2 keeps it small), so a warp's
// registers hold weights: two batches of U chunks, the next one's loads in flight while the current one is
// contracted. Within a chunk x is stored lane-major (word i of lane t at 32 i + 8 t), so a quad's four 16-byte
// reads hit four different bank groups. docs/int4-gemm-notes.md has the measurements and the variants that lost.
constexpr int kFactMaxM = 2;

constexpr size_t kFactMaxSmem = 160 * 1024;  // longer rows (k > ~40000 at m = 2) take int4_gemv_kernel

struct FactLayout {
  int x_stride;  // bf16 elements per token row of x in shared memory: the chunks, then 8 of padding (banks)
  size_t bytes;  // m x rows, then float2 sum[n_chunks] (token 0, token 1)
};

FactLayout fact_layout(int k, int m) {
  const int n_chunks = (k + kGemvChunk - 1) / kGemvChunk;
  const int stride = n_chunks * kGemvChunk + 8;  // a multiple of 8: rows and the sums stay 16-byte aligned
  return {stride, static_cast<size_t>(m) * stride * sizeof(bf16) + static_cast<size_t>(n_chunks) * sizeof(float2)};
}

// W warps split k, U chunks a register batch, MINB blocks an SM bound the registers.
template <int W, int U, int MINB, ScaleType ST>
__global__ void __launch_bounds__(W * 32, MINB) int4_gemv_factored_kernel(const GemvParams p, const int x_stride) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* xs = reinterpret_cast<bf16*>(smem_raw);                       // [m][x_stride]
  float2* xsum = reinterpret_cast<float2*>(xs + p.m * x_stride);      // [n_chunks]
  __shared__ float red[W][4][32];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int row0 = blockIdx.x * 16;
  const int n = p.w.n, k = p.w.k;
  const int n_chunks = (k + kGemvChunk - 1) / kGemvChunk;
  // Per-lane row pointers, computed once: a chunk is 16 words further along a row, and its group is
  // chunk >> (group_shift - 7) (0 for a whole row: group_shift 31).
  bool row_ok[2];
  const uint32_t* wp[2];
  const uint16_t* sp[2];
  const uint16_t* mp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int row = row0 + g + 8 * h;
    row_ok[h] = row < n;
    const int64_t r = row_ok[h] ? row : 0;  // keeps the pointers inside the buffers
    wp[h] = p.w.packed + r * (k / 8) + 4 * t;
    sp[h] = p.w.scales + r * p.w.groups;
    mp[h] = p.w.sym == Int4Symmetry::Asymmetric ? p.w.mins + r * p.w.groups : nullptr;
  }
  const int chunk_group_shift = p.w.group_shift - 7;

  uint4 wq[2][U][2];        // [batch][chunk][rows g, g + 8]: 32 columns each
  uint32_t codes[2][U][2];  // scale | min << 16
  auto load_batch = [&](const int b, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = c0 + u * W;
      const bool col_ok = chunk * kGemvChunk + 32 * t < k;  // a piece past k is 128 + 0 times x = 0: harmless
      const int gi = chunk >> chunk_group_shift;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const bool ok = col_ok && row_ok[h];
        const uint32_t* src = wp[h] + chunk * (kGemvChunk / 8);
        wq[b][u][h] = ok ? load_stream<true>(src) : make_uint4(0, 0, 0, 0);
        // The chunk's first column names the group of the whole chunk, and lies inside k for every chunk that
        // exists. A zero code (rows past n) zeroes the row's sums. Every lane loads (the quad's four loads are
        // one request), so no branch splits the warp.
        const bool code_ok = chunk < n_chunks && row_ok[h];
        uint32_t c = code_ok ? __ldg(sp[h] + gi) : 0u;
        if (mp[h] != nullptr && code_ok) c |= static_cast<uint32_t>(__ldg(mp[h] + gi)) << 16;
        codes[b][u][h] = c;
      }
    }
  };
  constexpr int kStep = W * U;
  load_batch(0, warp);  // the first weights are in flight while x is staged

  // Stage x (zero past k) and each chunk's sum per token. 16 consecutive threads hold one chunk, so the sum is
  // four shuffles; the loop bound is the same for every thread (full-warp shuffles). Once per block, so it is
  // kept cheap: no division, one 16-byte load and store per thread and step.
  const int pieces = n_chunks * 16;  // 16-byte pieces of a token row, padded to whole chunks
  for (int tok = 0; tok < p.m; ++tok) {
    const bf16* xrow = p.x + int64_t{tok} * k;
    bf16* srow = xs + tok * x_stride;
    for (int base = 0; base < pieces; base += W * 32) {
      const int q = base + threadIdx.x;
      const int chunk = q >> 4, r = q & 15;  // source piece r = 4 t + i: columns 32 t + 8 i .. + 7 of the chunk
      const int col = 8 * q;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (q < pieces && col < k) v = __ldg(reinterpret_cast<const uint4*>(xrow + col));
      const uint32_t w4[4] = {v.x, v.y, v.z, v.w};
      float s = 0.0f;
#pragma unroll
      for (int e = 0; e < 4; ++e) s += __uint_as_float(w4[e] << 16) + __uint_as_float(w4[e] & 0xFFFF0000u);
#pragma unroll
      for (int off = 8; off > 0; off >>= 1) s += __shfl_xor_sync(0xFFFFFFFFu, s, off);
      if (q < pieces) {
        *reinterpret_cast<uint4*>(srow + chunk * kGemvChunk + 8 * (4 * (r & 3) + (r >> 2))) = v;
        if (r == 0) reinterpret_cast<float*>(xsum + chunk)[tok] = s;
        if (r == 1 && p.m == 1) xsum[chunk].y = 0.0f;  // token 1's column (never stored, but initialised)
      }
    }
  }
  __syncthreads();

  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // rows g (0, 1), g + 8 (2, 3); tokens 2t, 2t + 1
  // Lanes g >= m fill the n8 tile's columns of tokens that do not exist: any finite values do, since those
  // outputs are never stored, so they read token 0's row instead of being predicated to zero.
  const bf16* xg = xs + (g < p.m ? g : 0) * x_stride + 8 * t;
  auto compute = [&](const int b, int c0) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int chunk = c0 + u * W;
      if (chunk >= n_chunks) break;  // the same for the whole warp
      const bf16* xc = xg + chunk * kGemvChunk;
      float part[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const uint4 xv = *reinterpret_cast<const uint4*>(xc + 32 * i);
        const uint32_t lo = word(wq[b][u][0], i), hi = word(wq[b][u][1], i);
        mma_16816(part, dq::magic_pair(lo, 0), dq::magic_pair(hi, 0), dq::magic_pair(lo, 1), dq::magic_pair(hi, 1),
                  xv.x, xv.y);
        mma_16816(part, dq::magic_pair(lo, 2), dq::magic_pair(hi, 2), dq::magic_pair(lo, 3), dq::magic_pair(hi, 3),
                  xv.z, xv.w);
      }
      const float2 sx = xsum[chunk];  // tokens 0 and 1: the lanes with t = 0 hold those columns
      const dq::ChunkConsts c0s = dq::chunk_consts<ST>(codes[b][u][0], p.w.sym);
      const dq::ChunkConsts c1s = dq::chunk_consts<ST>(codes[b][u][1], p.w.sym);
      acc[0] = __fmaf_rn(c0s.bias, sx.x, __fmaf_rn(c0s.scale, part[0], acc[0]));
      acc[1] = __fmaf_rn(c0s.bias, sx.y, __fmaf_rn(c0s.scale, part[1], acc[1]));
      acc[2] = __fmaf_rn(c1s.bias, sx.x, __fmaf_rn(c1s.scale, part[2], acc[2]));
      acc[3] = __fmaf_rn(c1s.bias, sx.y, __fmaf_rn(c1s.scale, part[3], acc[3]));
    }
  };
  // Two batches alternate: the next one's loads are issued before the current one is contracted.
  for (int c0 = warp; c0 < n_chunks; c0 += 2 * kStep) {
    if (c0 + kStep < n_chunks) load_batch(1, c0 + kStep);
    compute(0, c0);
    if (c0 + kStep >= n_chunks) break;
    if (c0 + 2 * kStep < n_chunks) load_batch(0, c0 + 2 * kStep);
    compute(1, c0 + kStep);
  }

  // the W warps hold partial sums over disjoint chunks: add them in shared memory (lane-minor, conflict-free)
#pragma unroll
  for (int e = 0; e < 4; ++e) red[warp][e][lane] = acc[e];
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < W; ++w) s += red[w][e][lane];
      const int row = row0 + g + (e >> 1) * 8, tok = 2 * t + (e & 1);
      if (row < n && tok < p.m) store_out(p.y, static_cast<int64_t>(tok) * n + row, s, p.mode);
    }
  }
}

template <int W, int U, int MINB>
void launch_gemv_factored(const GemvParams& p, cudaStream_t stream) {
  const FactLayout L = fact_layout(p.w.k, p.m);
  const int blocks = (p.w.n + 15) / 16;
  auto go = [&](auto kernel) {
    // Past 48 KB of shared memory (dynamic plus the static reduction buffer) a kernel must opt in; the call is
    // cheap and valid during graph capture.
    if (L.bytes + sizeof(float) * W * 4 * 32 > 48 * 1024) {
      CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(L.bytes)));
    }
    kernel<<<blocks, W * 32, L.bytes, stream>>>(p, L.x_stride);
  };
  if (p.w.scale_type == ScaleType::BF16) {
    go(int4_gemv_factored_kernel<W, U, MINB, ScaleType::BF16>);
  } else {
    go(int4_gemv_factored_kernel<W, U, MINB, ScaleType::FP16>);
  }
  KERNEL_CHECK();
}

// Whether the factored kernel serves this product: the chunk must lie in one group (g128 or per-channel), and x
// must fit in shared memory.
bool factored_fits(const WeightParams& w, int m) {
  return m <= kFactMaxM && w.group_shift >= 7 && fact_layout(w.k, m).bytes <= kFactMaxSmem;
}

// Few rows (o_proj, down_proj of a 7B: 256 tiles of 16) need many warps per tile to keep loads in flight, many
// rows (qkv, gate_up) fewer. Measured on the H200 against these shapes (docs/int4-gemm-notes.md), every other
// tried choice was slower: 3 chunks a batch, more blocks an SM (64 registers, spills), 8 warps for qkv/gate_up,
// 32 warps for o/down, both batches issued before x is staged.
void gemv_factored(const GemvParams& p, cudaStream_t stream) {
  const int tiles = (p.w.n + 15) / 16;
  if (tiles >= 700) {
    launch_gemv_factored<4, 2, 6>(p, stream);
  } else if (tiles >= 350) {
    launch_gemv_factored<8, 2, 3>(p, stream);
  } else {
    launch_gemv_factored<16, 1, 2>(p, stream);
  }
}

// ----------------------------------------------------------------------------------------------------- GEMM

constexpr int kBM = 128, kBN = 128, kBK = 64;  // output tile (tokens x outputs) and reduction step
constexpr int kStages = 3;                     // cp.async ring depth for the activations
constexpr int kGemmThreads = 256;  // 8 warps: 2 (tokens) x 4 (outputs), 64 x 32 each; 2 blocks an SM
constexpr int kAStride = kBK + 8;  // +16 bytes a row: ldmatrix's 8 row addresses then hit 8 different bank groups

// The weight tile in shared memory is always [weight rows][weight columns], dequantized to bf16: forward
// [kBN outputs][kBK reduction], backward [kBK reduction][kBN outputs].
template <bool kBackward>
struct GemmTile {
  static constexpr int kWRows = kBackward ? kBK : kBN;
  static constexpr int kWCols = kBackward ? kBN : kBK;
  static constexpr int kWStride = kWCols + 8;  // same padding reason as kAStride
  static constexpr int kASize = kBM * kAStride;
  static constexpr int kWSize = kWRows * kWStride;
  static constexpr size_t kSmemBytes = (kStages * kASize + 2 * kWSize) * sizeof(bf16);
  static_assert(kWRows * kWCols / 32 == kGemmThreads, "one 32-column weight piece per thread");
};

struct GemmParams {
  bf16* out;       // forward y [m, n]; backward dx [m, k]
  const bf16* a;   // forward x [m, k]; backward dy [m, n]
  WeightParams w;
  int m;
  int n_out;       // N of this product: n forward, k backward
  int k_red;       // K of this product: k forward, n backward
  Accumulate mode;
};

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool ok) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  // src-size 0 reads nothing and zero-fills the 16 bytes: out-of-range rows and columns become zeros.
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const bf16* p) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const bf16* p) {
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <bool kBackward, ScaleType ST>
__global__ void __launch_bounds__(kGemmThreads, 2) int4_gemm_kernel(const GemmParams p) {
  using Tile = GemmTile<kBackward>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  bf16* a_smem = reinterpret_cast<bf16*>(smem_raw);   // [kStages][kBM][kAStride]
  bf16* w_smem = a_smem + kStages * Tile::kASize;     // [2][kWRows][kWStride]

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int warp_m = warp >> 2, warp_n = warp & 3;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  const int K = p.k_red, N = p.n_out;
  const int k_tiles = (K + kBK - 1) / kBK;

  auto load_a = [&](int stage, int kt) {
    bf16* dst = a_smem + stage * Tile::kASize;
#pragma unroll
    for (int i = 0; i < kBM * kBK / 8 / kGemmThreads; ++i) {
      const int c = tid + i * kGemmThreads;
      const int r = c / (kBK / 8), cc = c % (kBK / 8);
      const int row = m0 + r, col = kt * kBK + cc * 8;
      const bool ok = row < p.m && col < K;
      cp_async16(dst + r * kAStride + cc * 8, ok ? p.a + static_cast<int64_t>(row) * K + col : p.a, ok);
    }
  };

  // Each thread owns one 32-column piece of the weight tile: consecutive threads take consecutive rows, so
  // each group of 8 stores lands in 8 different bank groups (the stride is an odd number of 16-byte units).
  const int w_row = tid % Tile::kWRows;
  const int w_col = (tid / Tile::kWRows) * 32;
  uint4 w_piece;
  uint32_t w_codes;
  auto load_w = [&](int kt) {
    const int row = kBackward ? kt * kBK + w_row : n0 + w_row;  // weight row (an output feature)
    const int col = kBackward ? n0 + w_col : kt * kBK + w_col;  // weight column (an input feature)
    const bool ok = row < p.w.n && col < p.w.k;
    const uint32_t* src = p.w.packed + static_cast<int64_t>(row) * (p.w.k / 8) + col / 8;
    w_piece = ok ? load_stream(src) : make_uint4(0, 0, 0, 0);
    w_codes = ok ? load_codes(p.w, row, col) : 0u;  // zero scale: out-of-range pieces dequantize to zero
  };
  auto store_w = [&](int buf) {
    const dq::GroupConsts<ST> gc = consts_of<ST>(w_codes, p.w.sym);
    bf16* dst = w_smem + buf * Tile::kWSize + w_row * Tile::kWStride + w_col;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      bf162 o[4];
      dq::dequant_word<ST>(word(w_piece, i), gc, o);
      *reinterpret_cast<uint4*>(dst + 8 * i) = make_uint4(as_u32(o[0]), as_u32(o[1]), as_u32(o[2]), as_u32(o[3]));
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][nj][e] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_a(s, s);
    cp_async_commit();
  }
  load_w(0);

  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // this thread's copies of step kt have landed
    store_w(kt & 1);               // last read two steps ago, before the previous barrier
    __syncthreads();               // everyone's copies and dequantized weights visible; step kt-1 fully read
    {
      const int next = kt + kStages - 1;  // refills the stage step kt-1 used
      if (next < k_tiles) load_a(next % kStages, next);
      cp_async_commit();
    }
    if (kt + 1 < k_tiles) load_w(kt + 1);  // in flight during this step's math

    const bf16* a_tile = a_smem + (kt % kStages) * Tile::kASize;
    const bf16* w_tile = w_smem + (kt & 1) * Tile::kWSize;
#pragma unroll
    for (int kk = 0; kk < kBK / 16; ++kk) {
      uint32_t af[4][4], bfrag[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        // lanes 0-15 address rows 0-15 at column 0, lanes 16-31 the same rows at column 8: a0..a3 in order
        ldmatrix_x4(af[mi], a_tile + (warp_m * 64 + mi * 16 + (lane & 15)) * kAStride + kk * 16 + (lane >> 4) * 8);
      }
      const int q = lane >> 3, rr = lane & 7;  // matrix q of the x4 load, row rr of it
#pragma unroll
      for (int pp = 0; pp < 2; ++pp) {
        uint32_t r[4];
        if constexpr (!kBackward) {
          // W rows are the outputs: matrices (tile 2pp, k 0-7), (2pp, k 8-15), (2pp+1, k 0-7), (2pp+1, k 8-15)
          ldmatrix_x4(r, w_tile + (warp_n * 32 + pp * 16 + (q >> 1) * 8 + rr) * Tile::kWStride + kk * 16 +
                             (q & 1) * 8);
        } else {
          // W rows are the reduction: the transposed 8x8 loads give each lane W[2t, 2t+1][g] as B wants
          ldmatrix_x4_trans(r, w_tile + (kk * 16 + (q & 1) * 8 + rr) * Tile::kWStride + warp_n * 32 + pp * 16 +
                                   (q >> 1) * 8);
        }
        bfrag[2 * pp][0] = r[0];
        bfrag[2 * pp][1] = r[1];
        bfrag[2 * pp + 1][0] = r[2];
        bfrag[2 * pp + 1][1] = r[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
          mma_16816(acc[mi][nj], af[mi][0], af[mi][1], af[mi][2], af[mi][3], bfrag[nj][0], bfrag[nj][1]);
    }
  }

  // accumulator e of tile (mi, nj): token row g (+8 for e >= 2), output column 2t (+1 for odd e)
  const bool pairs = N % 2 == 0;  // then an even column's pair is 4-byte aligned
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int row = m0 + warp_m * 64 + mi * 16 + g + 8 * h;
      if (row >= p.m) continue;
#pragma unroll
      for (int nj = 0; nj < 4; ++nj) {
        const int col = n0 + warp_n * 32 + nj * 8 + 2 * t;
        const int64_t idx = static_cast<int64_t>(row) * N + col;
        float v0 = acc[mi][nj][2 * h], v1 = acc[mi][nj][2 * h + 1];
        if (pairs && col + 1 < N) {
          bf162* dst = reinterpret_cast<bf162*>(p.out + idx);
          if (p.mode == Accumulate::Add) {
            const float2 old = __bfloat1622float2(*dst);
            v0 += old.x;
            v1 += old.y;
          }
          *dst = __floats2bfloat162_rn(v0, v1);
        } else {
          if (col < N) store_out(p.out, idx, v0, p.mode);
          if (col + 1 < N) store_out(p.out, idx + 1, v1, p.mode);
        }
      }
    }
}

template <bool kBackward, ScaleType ST>
void launch_gemm_typed(const GemmParams& p, cudaStream_t stream) {
  constexpr size_t smem = GemmTile<kBackward>::kSmemBytes;
  // Above the 48 KB default: the limit must be raised per kernel (cheap, and valid during graph capture).
  CUDA_CHECK(cudaFuncSetAttribute(int4_gemm_kernel<kBackward, ST>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)));
  const dim3 grid((p.n_out + kBN - 1) / kBN, (p.m + kBM - 1) / kBM);
  QKD_CHECK(grid.y <= 65535u, "int4_gemm: m {} needs {} token tiles, over the grid limit 65535", p.m, grid.y);
  int4_gemm_kernel<kBackward, ST><<<grid, kGemmThreads, smem, stream>>>(p);
  KERNEL_CHECK();
}

template <bool kBackward>
void launch_gemm(const GemmParams& p, cudaStream_t stream) {
  if (p.w.scale_type == ScaleType::BF16) {
    launch_gemm_typed<kBackward, ScaleType::BF16>(p, stream);
  } else {
    launch_gemm_typed<kBackward, ScaleType::FP16>(p, stream);
  }
}

bool aligned(const void* p, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Shared argument checks; returns false when there is nothing to do (m == 0).
bool check_args(const Int4Weight& w, const void* out, const void* in, int m, const char* what) {
  int4_check(w, what);
  QKD_CHECK(m >= 0, "{}: m {} is negative", what, m);
  if (m == 0) return false;
  QKD_CHECK(out != nullptr && in != nullptr, "{}: null activation pointer", what);
  QKD_CHECK(aligned(in, 16), "{}: input {} is not 16-byte aligned", what, in);
  QKD_CHECK(aligned(w.packed, 16), "{}: packed weight {} is not 16-byte aligned", what,
            static_cast<const void*>(w.packed));
  QKD_CHECK(aligned(out, 4), "{}: output {} is not 4-byte aligned", what, out);
  return true;
}

}  // namespace

void int4_gemm_forward(const Int4GemmArgs<bf16>& a, cudaStream_t stream) {
  if (!check_args(a.w, a.y, a.x, a.m, "cuda::int4_gemm_forward")) return;
  const WeightParams w = weight_params(a.w);
  if (a.m <= 16) {
    const GemvParams p{a.y, a.x, w, a.m, a.mode};
    if (factored_fits(w, a.m)) {
      gemv_factored(p, stream);
    } else if (a.m <= 4) {
      launch_gemv<1, 1, 4>(p, stream);
    } else if (a.m <= 8) {
      launch_gemv<1, 2, 2>(p, stream);
    } else {
      launch_gemv<2, 2, 2>(p, stream);
    }
    return;
  }
  launch_gemm<false>({a.y, a.x, w, a.m, a.w.n, a.w.k, a.mode}, stream);
}

void int4_gemm_backward(const Int4GemmBackwardArgs<bf16>& a, cudaStream_t stream) {
  if (!check_args(a.w, a.dx, a.dy, a.m, "cuda::int4_gemm_backward")) return;
  QKD_CHECK(a.w.n % 8 == 0, "cuda::int4_gemm_backward: n {} must be a multiple of 8 (dy rows are read as 16-byte "
            "vectors)", a.w.n);
  launch_gemm<true>({a.dx, a.dy, weight_params(a.w), a.m, a.w.k, a.w.n, a.mode}, stream);
}

}  // namespace qkd::cuda
