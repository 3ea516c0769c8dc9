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
// The backward (dx = dy . w, dw += dy^T . x) will sit beside the forward in this file.
#include <algorithm>
#include <cstdint>
#include <cstring>

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

}  // namespace qkd::cpu
