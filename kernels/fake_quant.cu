// CUDA group-wise symmetric fake quantization with LSQ step sizes and a module clip factor (kernels/fake_quant.h).
//   s_e = bf16(gamma * s[r, g]);  q = clamp(rint(w / s_e), qmin, qmax);  wq = bf16(s_e * q)       (overwritten)
//   dw = dwq inside [qmin, qmax] else 0 (overwritten, may alias dwq);  dscale = gamma * ds_e (overwritten)
//   ds_e = sum_group dwq * (q - v in range, else q);  dscale = lsq_scale * gamma * ds_e;  dclip += sum_{r,g} s * ds_e
// wq: s_e * q is exact in fp32 (8 significant bits times |q| <= 2^7), and the one rounding to bf16 is the same
// one the int4 GEMM's device dequantization makes (bf16(s * (u - 8)) with u = q + 8), so a quantized layer
// trains on the values it will be served with. The CPU twin keeps the exact fp32 product.
// The arithmetic that decides q uses the _rn intrinsics (IEEE division, no fma contraction), so q is the CPU's
// bit for bit. Groups are the int4 format's (32, 64, 128 or k; k a multiple of 32): a vector of 8 columns never
// straddles a group.
// Forward: one thread per 8 weights (two float4 loads, one 16-byte bf16 store). Backward: one block per row;
// a group of 32..256 columns is 4..32 consecutive lanes of one warp, summed with a segmented butterfly, and a
// longer per-channel group (group_size = k) is summed over the block. dclip goes through one partial per row in
// `scratch` and one more block that adds them in row order: no atomics, the same bits on every run.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/bf16x8.cuh"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_check.h"
#include "kernels/fake_quant.h"

namespace qkd::cuda {

namespace {

constexpr int kForwardThreads = 256;
constexpr int kMaxForwardBlocks = 1 << 16;  // grid-stride beyond this: plenty to fill 132 SMs
constexpr int kBackwardMaxThreads = 256;
constexpr int kClipSumThreads = 1024;

__device__ __forceinline__ float effective_scale(float s, float gamma) {
  return __bfloat162float(__float2bfloat16_rn(__fmul_rn(gamma, s)));
}

// q = clamp(round_half_even(v), qmin, qmax) for v = w / s_e, the rule of int4_symmetric_q. Through an integer
// (the conversion saturates, and the clamp follows), so a small negative v gives q = +0 as on the CPU, not -0.
__device__ __forceinline__ int quantize(float v, int qmin, int qmax) { return min(max(__float2int_rn(v), qmin), qmax); }

__device__ __forceinline__ void load_float8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x, f[1] = a.y, f[2] = a.z, f[3] = a.w, f[4] = b.x, f[5] = b.y, f[6] = b.z, f[7] = b.w;
}

__device__ __forceinline__ void store_float8(float* p, const float (&f)[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(f[0], f[1], f[2], f[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(f[4], f[5], f[6], f[7]);
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

static __global__ void __launch_bounds__(kForwardThreads)
    fake_quant_forward_kernel(__nv_bfloat16* wq, const float* w, const float* scale, const float* clip,
                              int64_t n_vecs, int k, int group_size, int qmin, int qmax) {
  const float gamma = clip != nullptr ? *clip : 1.0f;
  const int groups = k / group_size;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n_vecs;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i * kBf16x8;
    const int64_t r = e / k;
    const int c = static_cast<int>(e - r * k);
    const float s_e = effective_scale(scale[r * groups + c / group_size], gamma);
    float f[kBf16x8];
    load_float8(w + e, f);
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) {
      // a zero scale (an all-zero group) puts everything on 0, as int4_symmetric_q does
      const int q = s_e == 0.0f ? 0 : quantize(__fdiv_rn(f[j], s_e), qmin, qmax);
      f[j] = __fmul_rn(s_e, static_cast<float>(q));
    }
    reinterpret_cast<uint4*>(wq)[i] = float_to_bf16x8(f);
  }
}

void fake_quant_forward(const FakeQuantArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  cpu::fake_quant_check(a.n, a.k, a.group_size, a.bits, "fake_quant_forward");
  QKD_CHECK(a.wq != nullptr && a.w != nullptr && a.scale != nullptr,
            "fake_quant_forward: wq {}, w {} and scale {} must not be null", static_cast<const void*>(a.wq),
            static_cast<const void*>(a.w), static_cast<const void*>(a.scale));
  QKD_CHECK(aligned16(a.wq) && aligned16(a.w), "fake_quant_forward: wq {} and w {} must be 16-byte aligned",
            static_cast<const void*>(a.wq), static_cast<const void*>(a.w));
  const int64_t n_vecs = static_cast<int64_t>(a.n) * a.k / kBf16x8;
  const int blocks = static_cast<int>(std::min<int64_t>((n_vecs + kForwardThreads - 1) / kForwardThreads,
                                                        kMaxForwardBlocks));
  const int qmin = -(1 << (a.bits - 1)), qmax = (1 << (a.bits - 1)) - 1;
  fake_quant_forward_kernel<<<blocks, kForwardThreads, 0, stream>>>(a.wq, a.w, a.scale, a.clip, n_vecs, a.k,
                                                                    a.group_size, qmin, qmax);
  KERNEL_CHECK();
}

// --------------------------------------------------------------------------------------------------- backward

// One block per row. WHOLE_ROW: the row is one group longer than a warp's 256 columns (or of a length that is
// not a power-of-two number of vectors), summed over the block; otherwise a group is lanes_per_group
// consecutive lanes (4, 8, 16 or 32), aligned within a warp because the vector count of a row is a multiple of
// it. clip_rows[r] (when not null) = sum_g s[r, g] * ds_e[r, g], this row's share of dclip.
template <bool WHOLE_ROW>
static __global__ void __launch_bounds__(kBackwardMaxThreads)
    fake_quant_backward_kernel(float* dw, float* dscale, float* clip_rows, const float* dwq, const float* w,
                               const float* scale, const float* clip, int k, int group_size, int qmin, int qmax,
                               float lsq_scale) {
  __shared__ float s_red[32];
  const int r = blockIdx.x;
  const float gamma = clip != nullptr ? *clip : 1.0f;
  const int groups = k / group_size;
  const int vecs = k / kBf16x8;
  const int lanes_per_group = group_size / kBf16x8;
  const int64_t row = static_cast<int64_t>(r) * k;
  float acc = 0.0f;  // WHOLE_ROW: this thread's part of the group sum; else its groups' part of clip_rows[r]
  const int iters = (vecs + blockDim.x - 1) / blockDim.x;
  for (int it = 0; it < iters; ++it) {  // a uniform trip count: every lane reaches the shuffles below
    const int vi = it * blockDim.x + threadIdx.x;
    const int g = vi * kBf16x8 / group_size;
    float s = 0.0f, part = 0.0f;
    if (vi < vecs) {
      s = scale[static_cast<int64_t>(r) * groups + g];
      const float s_e = effective_scale(s, gamma);
      const int64_t e = row + static_cast<int64_t>(vi) * kBf16x8;
      float gr[kBf16x8], wv[kBf16x8];
      load_float8(dwq + e, gr);  // all reads of dwq before the writes of dw: they may alias
      load_float8(w + e, wv);
#pragma unroll
      for (int j = 0; j < kBf16x8; ++j) {
        if (s_e == 0.0f) continue;  // v = q = 0: in range, nothing for ds_e (dw = dwq as loaded)
        const float v = __fdiv_rn(wv[j], s_e);
        const float q = static_cast<float>(quantize(v, qmin, qmax));
        const bool in_range = v >= static_cast<float>(qmin) && v <= static_cast<float>(qmax);
        part += gr[j] * (in_range ? q - v : q);
        if (!in_range) gr[j] = 0.0f;
      }
      store_float8(dw + e, gr);
    }
    if constexpr (WHOLE_ROW) {
      acc += part;
    } else {
      for (int o = lanes_per_group / 2; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (vi < vecs && threadIdx.x % lanes_per_group == 0) {
        const float ds_e = part;
        dscale[static_cast<int64_t>(r) * groups + g] = lsq_scale * gamma * ds_e;
        acc += s * ds_e;
      }
    }
  }
  if constexpr (WHOLE_ROW) {
    const float ds_e = block_sum(acc, s_red);
    if (threadIdx.x == 0) {
      const float s = scale[r];  // one group per row
      dscale[r] = lsq_scale * gamma * ds_e;
      if (clip_rows != nullptr) clip_rows[r] = s * ds_e;
    }
  } else if (clip_rows != nullptr) {
    const float total = block_sum(acc, s_red);
    if (threadIdx.x == 0) clip_rows[r] = total;
  }
}

// dclip += sum of clip_rows[0 .. n), one block: each thread a fixed stride of rows, then the block tree.
static __global__ void __launch_bounds__(kClipSumThreads)
    fake_quant_clip_sum_kernel(float* dclip, const float* clip_rows, int n) {
  __shared__ float s_red[32];
  float acc = 0.0f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) acc += clip_rows[i];
  const float total = block_sum(acc, s_red);
  if (threadIdx.x == 0) *dclip += total;
}

void fake_quant_backward(const FakeQuantBackwardArgs& a, cudaStream_t stream) {
  cpu::fake_quant_check(a.n, a.k, a.group_size, a.bits, "fake_quant_backward");
  QKD_CHECK(a.dw != nullptr && a.dscale != nullptr && a.dwq != nullptr && a.w != nullptr && a.scale != nullptr,
            "fake_quant_backward: dw {}, dscale {}, dwq {}, w {} and scale {} must not be null",
            static_cast<const void*>(a.dw), static_cast<const void*>(a.dscale), static_cast<const void*>(a.dwq),
            static_cast<const void*>(a.w), static_cast<const void*>(a.scale));
  QKD_CHECK(a.dclip == nullptr || a.clip != nullptr, "fake_quant_backward: dclip is given but clip is null");
  QKD_CHECK(a.dclip == nullptr || a.scratch != nullptr,
            "fake_quant_backward: dclip needs scratch ([n] = {} floats for the per-row partials)", a.n);
  QKD_CHECK(aligned16(a.dw) && aligned16(a.dwq) && aligned16(a.w),
            "fake_quant_backward: dw {}, dwq {} and w {} must be 16-byte aligned", static_cast<const void*>(a.dw),
            static_cast<const void*>(a.dwq), static_cast<const void*>(a.w));
  const int qmin = -(1 << (a.bits - 1)), qmax = (1 << (a.bits - 1)) - 1;
  const float lsq_scale = 1.0f / std::sqrt(static_cast<float>(a.group_size) * static_cast<float>(qmax));
  const int vecs = a.k / kBf16x8;
  const int lanes_per_group = a.group_size / kBf16x8;
  const bool whole_row = lanes_per_group > 32 || (lanes_per_group & (lanes_per_group - 1)) != 0;
  // Enough threads for the row in one sweep, up to the cap; a multiple of 32 for the reductions.
  const int threads = std::min(kBackwardMaxThreads, (vecs + 31) / 32 * 32);
  float* clip_rows = a.dclip != nullptr ? a.scratch : nullptr;
  if (whole_row) {
    fake_quant_backward_kernel<true><<<a.n, threads, 0, stream>>>(a.dw, a.dscale, clip_rows, a.dwq, a.w, a.scale,
                                                                  a.clip, a.k, a.group_size, qmin, qmax, lsq_scale);
  } else {
    fake_quant_backward_kernel<false><<<a.n, threads, 0, stream>>>(a.dw, a.dscale, clip_rows, a.dwq, a.w, a.scale,
                                                                   a.clip, a.k, a.group_size, qmin, qmax, lsq_scale);
  }
  KERNEL_CHECK();
  if (a.dclip != nullptr) {
    fake_quant_clip_sum_kernel<<<1, kClipSumThreads, 0, stream>>>(a.dclip, a.scratch, a.n);
    KERNEL_CHECK();
  }
}

}  // namespace qkd::cuda
