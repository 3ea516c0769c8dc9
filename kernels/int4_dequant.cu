// int4 -> bf16 dequantization (kernels/int4_dequant.h). Memory-bound: each packed word (8 columns, which always
// lie in one group: group sizes are multiples of 32) becomes 16 bytes of bf16, with the fused kernels' own
// per-group arithmetic (int4_device::dequant_word), so the copy is bit-identical to the operands the fused GEMM
// feeds its tensor cores.
#include "kernels/int4_dequant.h"

#include "kernels/cuda_check.h"
#include "kernels/error.h"

namespace qkd {
namespace {

namespace dq = int4_device;
using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

// A block covers up to kBlockWords packed words (8 columns each) of one row; thread t takes words t, t + 128,
// t + 256 and t + 384 of that span, so each of a warp's loads reads 128 contiguous bytes and each of its stores
// writes 512 contiguous bytes (a thread that took a whole 16-byte piece would scatter its four 16-byte stores
// 64 bytes apart). The row comes from the grid, so no thread divides.
constexpr int kThreads = 128;
constexpr int kWordsPerThread = 4;
constexpr int kBlockWords = kThreads * kWordsPerThread;

template <ScaleType ST>
__global__ void __launch_bounds__(kThreads) int4_dequant_kernel(bf16* __restrict__ out,
                                                                const uint32_t* __restrict__ packed,
                                                                const uint16_t* __restrict__ scales,
                                                                const uint16_t* __restrict__ mins, int words_per_row,
                                                                int groups, int group_shift, Int4Symmetry sym) {
  const int64_t row = blockIdx.x;
  const int first = static_cast<int>(blockIdx.y) * kBlockWords + static_cast<int>(threadIdx.x);
  const uint32_t* src = packed + row * words_per_row;
  uint4* dst = reinterpret_cast<uint4*>(out + row * (int64_t{words_per_row} * 8));  // 16 bytes a word
  uint32_t q[kWordsPerThread];
#pragma unroll
  for (int j = 0; j < kWordsPerThread; ++j) {  // all loads first: four in flight per thread
    const int w = first + j * kThreads;
    q[j] = w < words_per_row ? __ldg(src + w) : 0u;
  }
#pragma unroll
  for (int j = 0; j < kWordsPerThread; ++j) {
    const int w = first + j * kThreads;
    if (w >= words_per_row) break;
    const int64_t gi = row * groups + ((w * 8) >> group_shift);
    const uint16_t s = __ldg(scales + gi);
    const uint16_t m = sym == Int4Symmetry::Asymmetric ? __ldg(mins + gi) : uint16_t{0};
    const dq::GroupConsts<ST> c = dq::group_consts<ST>(s, m, sym);
    bf162 v[4];
    dq::dequant_word<ST>(q[j], c, v);
    const uint32_t* u = reinterpret_cast<const uint32_t*>(v);
    dst[w] = make_uint4(u[0], u[1], u[2], u[3]);
  }
}

}  // namespace

namespace cuda {

void int4_dequantize(const Int4DequantArgs& a, cudaStream_t stream) {
  int4_check(a.w, "int4_dequantize");
  QKD_CHECK(reinterpret_cast<uintptr_t>(a.out) % 16 == 0 && reinterpret_cast<uintptr_t>(a.w.packed) % 16 == 0,
            "int4_dequantize: out and packed must be 16-byte aligned");
  const int groups = static_cast<int>(int4_groups_per_row(a.w.k, a.w.group_size));
  const int shift = int4_group_shift(a.w.group_size, a.w.k);
  const int words_per_row = a.w.k / 8;
  if (a.w.n == 0) return;
  const dim3 grid(static_cast<unsigned>(a.w.n),  // a row a block in x (up to 2^31 - 1), its spans in y
                  static_cast<unsigned>((words_per_row + kBlockWords - 1) / kBlockWords));
  if (a.w.scale_type == ScaleType::BF16) {
    int4_dequant_kernel<ScaleType::BF16><<<grid, kThreads, 0, stream>>>(a.out, a.w.packed, a.w.scales, a.w.mins,
                                                                        words_per_row, groups, shift, a.w.sym);
  } else {
    int4_dequant_kernel<ScaleType::FP16><<<grid, kThreads, 0, stream>>>(a.out, a.w.packed, a.w.scales, a.w.mins,
                                                                        words_per_row, groups, shift, a.w.sym);
  }
  KERNEL_CHECK();
}

}  // namespace cuda
}  // namespace qkd
