// int4 -> bf16 dequantization (kernels/int4_dequant.h). Memory-bound: each thread turns one 16-byte piece of a
// row (32 columns, which always lie in one group: group sizes are multiples of 32) into 64 bytes of bf16, with
// the fused kernels' own per-group arithmetic (int4_device::dequant_word), so the copy is bit-identical to the
// operands the fused GEMM feeds its tensor cores.
#include "kernels/int4_dequant.h"

#include <algorithm>

#include "kernels/cuda_check.h"
#include "kernels/error.h"

namespace qkd {
namespace {

namespace dq = int4_device;
using bf16 = __nv_bfloat16;
using bf162 = __nv_bfloat162;

template <ScaleType ST>
__global__ void int4_dequant_kernel(bf16* __restrict__ out, const uint32_t* __restrict__ packed,
                                    const uint16_t* __restrict__ scales, const uint16_t* __restrict__ mins,
                                    int64_t pieces, int pieces_per_row, int groups, int group_shift,
                                    Int4Symmetry sym) {
  for (int64_t p = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; p < pieces; p += int64_t{gridDim.x} * blockDim.x) {
    const int64_t row = p / pieces_per_row;
    const int col = static_cast<int>(p - row * pieces_per_row) * 32;
    const uint4 q = __ldg(reinterpret_cast<const uint4*>(packed) + p);  // rows are k/8 words: pieces are dense
    const int64_t gi = row * groups + (col >> group_shift);
    const uint16_t s = __ldg(scales + gi);
    const uint16_t m = sym == Int4Symmetry::Asymmetric ? __ldg(mins + gi) : uint16_t{0};
    const dq::GroupConsts<ST> c = dq::group_consts<ST>(s, m, sym);
    const uint32_t words[4] = {q.x, q.y, q.z, q.w};
    uint4* dst = reinterpret_cast<uint4*>(out + row * (int64_t{pieces_per_row} * 32) + col);
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // word i: columns 8i .. 8i+7 of the piece, 16 bytes of output
      bf162 v[4];
      dq::dequant_word<ST>(words[i], c, v);
      const uint32_t* u = reinterpret_cast<const uint32_t*>(v);
      dst[i] = make_uint4(u[0], u[1], u[2], u[3]);
    }
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
  const int pieces_per_row = a.w.k / 32;
  const int64_t pieces = static_cast<int64_t>(a.w.n) * pieces_per_row;
  if (pieces == 0) return;
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((pieces + kThreads - 1) / kThreads, 132 * 16));
  if (a.w.scale_type == ScaleType::BF16) {
    int4_dequant_kernel<ScaleType::BF16><<<blocks, kThreads, 0, stream>>>(a.out, a.w.packed, a.w.scales, a.w.mins,
                                                                          pieces, pieces_per_row, groups, shift,
                                                                          a.w.sym);
  } else {
    int4_dequant_kernel<ScaleType::FP16><<<blocks, kThreads, 0, stream>>>(a.out, a.w.packed, a.w.scales, a.w.mins,
                                                                          pieces, pieces_per_row, groups, shift,
                                                                          a.w.sym);
  }
  KERNEL_CHECK();
}

}  // namespace cuda
}  // namespace qkd
