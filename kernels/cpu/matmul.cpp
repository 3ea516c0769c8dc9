// CPU reference: dense linear layer in nn.Linear layout (kernels/matmul.h).
//   y[m, n] = x[m, k] . w[n, k]^T        (Accumulate::Overwrite)
//   y[m, n] += x[m, k] . w[n, k]^T       (Accumulate::Add)
// The CPU backend's workhorse, so it is blocked and threaded:
//  - both operands are k-contiguous, so each output is a dot product of two rows. A micro-tile of kRowsX rows
//    of x by kRowsW rows of w keeps kRowsX * kRowsW accumulators of kLanes independent partial sums each, so
//    the k loop is plain vector FMAs and needs no -ffast-math reassociation.
//  - every output is summed in the same order (lanes over the whole k, then one fixed tree, then the k tail),
//    whatever tile it falls in: a row's result does not depend on m or on the threads, so decoding a token
//    alone gives the same bits as decoding it in a batch.
//  - m = 1 (decode) is a GEMV bound by streaming w: threads split n.
// backward of y = x . w^T:
//   data:    dx[m, k]  (=|+=)  dy[m, n] . w[n, k]
//   weight:  dw[n, k]  (=|+=)  dy[m, n]^T . x[m, k]
// Both are the forward's kernel on transposed operands: dx = dy . (w^T)^T and dw = (dy^T) . (x^T)^T. The
// reduction dimension (n for dx, m for dw) is cut into chunks of kReduceChunk, each transposed into scratch
// and added on in chunk order: the scratch is at most [max(m, n, k), kReduceChunk] however long the reduction
// (vocab_size for the LM head's dx, thousands of tokens for every dw), and each chunk is short enough for the
// forward's L2 blocking. The copies cost O(1/m + 1/k) (dx) and O(1/n + 1/k) (dw) of the arithmetic. The
// chunk order is fixed, so the result is the same bits on every run.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "kernels/error.h"
#include "kernels/matmul.h"

// Built twice, for x86-64-v3 (AVX2 + FMA) and the baseline, and chosen at load time: the baseline keeps the
// binary portable, the v3 clone doubles the vector width on any CPU of the last decade.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(__SANITIZE_ADDRESS__)
#define QKD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define QKD_CPU_CLONES
#endif

namespace qkd::cpu {
namespace {

constexpr int kLanes = 8;   // one AVX2 register of partial sums per accumulator
constexpr int kRowsX = 3;   // micro-tile: 3 x 4 accumulators = 12 vector registers, 4 left for operands
constexpr int kRowsW = 4;
constexpr int kBlockM = 48;  // a thread's block: 48 rows of x by 64 rows of w, both read once per block from
constexpr int kBlockN = 64;  // L2 for k up to ~1024 and reused across the block's 16 x 16 micro-tiles

// Eight partial sums in one GCC/Clang vector: the vectorization is spelled out instead of left to the
// auto-vectorizer, which turned the unrolled lane loops into shuffles. The baseline clone lowers it to two SSE
// registers.
using Vec8 = float __attribute__((vector_size(kLanes * sizeof(float))));

// By reference: a by-value 32-byte vector would change the ABI between the clones (g++ -Wpsabi).
inline __attribute__((always_inline)) void load8(Vec8& v, const float* p) {
  std::memcpy(&v, p, sizeof v);  // unaligned load
}

template <int MR, int NR>
inline __attribute__((always_inline)) void micro_tile(const float* x, const float* w, float* y, int n, int k,
                                                      Accumulate mode) {
  Vec8 acc[MR][NR] = {};
  const int k_main = k - k % kLanes;
  for (int kk = 0; kk < k_main; kk += kLanes) {
    Vec8 xv[MR], wv[NR];
    for (int i = 0; i < MR; ++i) load8(xv[i], x + static_cast<int64_t>(i) * k + kk);
    for (int j = 0; j < NR; ++j) load8(wv[j], w + static_cast<int64_t>(j) * k + kk);
    for (int i = 0; i < MR; ++i) {
      for (int j = 0; j < NR; ++j) acc[i][j] += xv[i] * wv[j];
    }
  }
  for (int i = 0; i < MR; ++i) {
    for (int j = 0; j < NR; ++j) {
      const Vec8 s = acc[i][j];
      float sum = ((s[0] + s[4]) + (s[2] + s[6])) + ((s[1] + s[5]) + (s[3] + s[7]));
      for (int kk = k_main; kk < k; ++kk) {
        sum += x[static_cast<int64_t>(i) * k + kk] * w[static_cast<int64_t>(j) * k + kk];
      }
      float& out = y[static_cast<int64_t>(i) * n + j];
      out = mode == Accumulate::Add ? out + sum : sum;
    }
  }
}

// Edge tiles (fewer rows than the full micro-tile) use the same kernel shape, so they sum in the same order.
// Direct calls, not a table of function pointers, so every tile inlines into each clone of matmul_block.
template <int MR>
inline __attribute__((always_inline)) void edge_tile(int nr, const float* x, const float* w, float* y, int n, int k,
                                                     Accumulate mode) {
  static_assert(kRowsW == 4, "edge_tile lists every micro-tile width");
  switch (nr) {
    case 1: micro_tile<MR, 1>(x, w, y, n, k, mode); break;
    case 2: micro_tile<MR, 2>(x, w, y, n, k, mode); break;
    case 3: micro_tile<MR, 3>(x, w, y, n, k, mode); break;
    default: micro_tile<MR, 4>(x, w, y, n, k, mode); break;
  }
}

QKD_CPU_CLONES void matmul_block(const MatmulArgs& a, int m0, int m1, int n0, int n1) {
  static_assert(kRowsX == 3, "matmul_block lists every micro-tile height");
  for (int j = n0; j < n1; j += kRowsW) {
    const int nr = std::min(kRowsW, n1 - j);
    for (int i = m0; i < m1; i += kRowsX) {
      const float* x = a.x + static_cast<int64_t>(i) * a.k;
      const float* w = a.w + static_cast<int64_t>(j) * a.k;
      float* y = a.y + static_cast<int64_t>(i) * a.n + j;
      switch (std::min(kRowsX, m1 - i)) {
        case 1: edge_tile<1>(nr, x, w, y, a.n, a.k, a.mode); break;
        case 2: edge_tile<2>(nr, x, w, y, a.n, a.k, a.mode); break;
        default: edge_tile<3>(nr, x, w, y, a.n, a.k, a.mode); break;
      }
    }
  }
}

// dst[c, r] = src[r, c] for the rows [r0, r1) and all cols of src (row stride ld_src); dst is
// [cols, r1 - r0], contiguous. Square tiles keep both the reads and the writes within a few cache lines.
constexpr int kTransposeTile = 32;

void transpose(const float* src, int64_t ld_src, int r0, int r1, int cols, float* dst) {
  const int rows = r1 - r0;
  const int col_tiles = (cols + kTransposeTile - 1) / kTransposeTile;
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(rows) * cols > 65536)
  for (int ct = 0; ct < col_tiles; ++ct) {
    const int c0 = ct * kTransposeTile, c1 = std::min(cols, c0 + kTransposeTile);
    for (int rt = 0; rt < rows; rt += kTransposeTile) {
      const int rt1 = std::min(rows, rt + kTransposeTile);
      for (int c = c0; c < c1; ++c) {
        for (int r = rt; r < rt1; ++r) dst[static_cast<int64_t>(c) * rows + r] = src[(r0 + r) * ld_src + c];
      }
    }
  }
}

// Reduction chunk of the backward passes: 512 floats = 2 KB a row, so the forward's 48 + 64 operand rows of a
// block (224 KB) stay in L2, and the LM head's [vocab_size, chunk] transposed dy is 64 MB, not the full
// [vocab_size, tokens].
constexpr int kReduceChunk = 512;

}  // namespace

void matmul_forward(const MatmulArgs& a) {
  QKD_CHECK(a.m >= 0 && a.n >= 0 && a.k >= 0, "matmul_forward: negative shape m {} n {} k {}", a.m, a.n, a.k);
  QKD_CHECK(a.y != a.x && a.y != a.w, "matmul_forward: y may not alias x or w");
  if (a.m == 0 || a.n == 0) return;
  const int blocks_m = (a.m + kBlockM - 1) / kBlockM;
  // A GEMV (and any short m) has too few m blocks to feed the threads: narrow the n blocks instead, keeping
  // them whole micro-tiles wide.
  const int block_n = a.m <= kRowsX ? kRowsW * 4 : kBlockN;
  const int blocks_n = (a.n + block_n - 1) / block_n;
  const int64_t n_blocks = static_cast<int64_t>(blocks_m) * blocks_n;
  const double flops = 2.0 * a.m * a.n * a.k;
#pragma omp parallel for schedule(dynamic, 1) if (flops > 1e5)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int bm = static_cast<int>(blk % blocks_m);
    const int bn = static_cast<int>(blk / blocks_m);
    matmul_block(a, bm * kBlockM, std::min(a.m, (bm + 1) * kBlockM), bn * block_n, std::min(a.n, (bn + 1) * block_n));
  }
}

void matmul_backward_data(const MatmulBackwardDataArgs& a) {
  QKD_CHECK(a.m >= 0 && a.n >= 0 && a.k >= 0, "matmul_backward_data: negative shape m {} n {} k {}", a.m, a.n, a.k);
  QKD_CHECK(a.dx != a.dy && a.dx != a.w, "matmul_backward_data: dx may not alias dy or w");
  if (a.m == 0 || a.k == 0) return;
  if (a.n == 0) {  // an empty sum: dx = 0, or dx unchanged
    if (a.mode == Accumulate::Overwrite) std::fill(a.dx, a.dx + static_cast<int64_t>(a.m) * a.k, 0.0f);
    return;
  }
  // dx[m, k] (=|+=) sum over n-chunks of dy[:, chunk] . (w[chunk, :]^T)^T, i.e. the forward with
  // x' = dy[:, chunk] as [m, nc] and w' = w[chunk, :]^T as [k, nc].
  const int chunk = std::min(a.n, kReduceChunk);
  // With a single chunk dy is already the contiguous [m, n] operand; only a chunked dy is copied out.
  std::vector<float> dy_chunk(chunk < a.n ? static_cast<size_t>(a.m) * chunk : 0);
  std::vector<float> wt_chunk(static_cast<size_t>(a.k) * chunk);
  for (int n0 = 0; n0 < a.n; n0 += chunk) {
    const int nc = std::min(chunk, a.n - n0);
    const float* dy = a.dy;
    if (chunk < a.n) {
#pragma omp parallel for schedule(static) if (static_cast<int64_t>(a.m) * nc > 65536)
      for (int i = 0; i < a.m; ++i) {
        std::memcpy(dy_chunk.data() + static_cast<int64_t>(i) * nc, a.dy + static_cast<int64_t>(i) * a.n + n0,
                    static_cast<size_t>(nc) * sizeof(float));
      }
      dy = dy_chunk.data();
    }
    transpose(a.w, a.k, n0, n0 + nc, a.k, wt_chunk.data());
    const Accumulate mode = n0 == 0 ? a.mode : Accumulate::Add;
    matmul_forward({a.dx, dy, wt_chunk.data(), a.m, a.k, nc, mode});
  }
}

void matmul_backward_weight(const MatmulBackwardWeightArgs& a) {
  QKD_CHECK(a.m >= 0 && a.n >= 0 && a.k >= 0, "matmul_backward_weight: negative shape m {} n {} k {}", a.m, a.n,
            a.k);
  QKD_CHECK(a.dw != a.dy && a.dw != a.x, "matmul_backward_weight: dw may not alias dy or x");
  if (a.n == 0 || a.k == 0) return;
  if (a.m == 0) {  // no tokens: dw = 0, or dw unchanged
    if (a.mode == Accumulate::Overwrite) std::fill(a.dw, a.dw + static_cast<int64_t>(a.n) * a.k, 0.0f);
    return;
  }
  // dw[n, k] (=|+=) sum over m-chunks of dy[chunk, :]^T . (x[chunk, :]^T)^T, i.e. the forward with
  // x' = dy[chunk, :]^T as [n, mc] and w' = x[chunk, :]^T as [k, mc].
  const int chunk = std::min(a.m, kReduceChunk);
  std::vector<float> dyt_chunk(static_cast<size_t>(a.n) * chunk), xt_chunk(static_cast<size_t>(a.k) * chunk);
  for (int m0 = 0; m0 < a.m; m0 += chunk) {
    const int mc = std::min(chunk, a.m - m0);
    transpose(a.dy, a.n, m0, m0 + mc, a.n, dyt_chunk.data());
    transpose(a.x, a.k, m0, m0 + mc, a.k, xt_chunk.data());
    const Accumulate mode = m0 == 0 ? a.mode : Accumulate::Add;
    matmul_forward({a.dw, dyt_chunk.data(), xt_chunk.data(), a.n, a.k, mc, mode});
  }
}

}  // namespace qkd::cpu
