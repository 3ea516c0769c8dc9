// CUDA RMSNorm fused with the residual add (kernels/rmsnorm.h), bf16 storage, fp32 math.
//   if add:  x += add                                   (x updated in place: the residual stream)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten; may not alias x)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr)
// One block per row. Each thread keeps its slice of the row in registers between the sum of squares and the
// scaling, so x is read once and written at most twice (x, out): the op is a single pass over memory. The
// updated residual is rounded to bf16 before it is squared, so out normalises exactly the x the next layer reads.
// The backward will sit beside the forward in this file.
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>

#include "kernels/cuda_check.h"
#include "kernels/rmsnorm.h"

namespace qkd::cuda {

namespace {

constexpr int kVec = 8;               // bf16 per 16-byte access
constexpr int kMaxThreads = 1024;

__device__ __forceinline__ void unpack8(const uint4& u, float (&f)[kVec]) {
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) {
    const float2 p = __bfloat1622float2(h[i]);
    f[2 * i] = p.x;
    f[2 * i + 1] = p.y;
  }
}

__device__ __forceinline__ uint4 pack8(const float (&f)[kVec]) {
  uint4 u;
  __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < kVec / 2; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
  return u;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int n_warps = blockDim.x / 32;
  v = lane < n_warps ? scratch[lane] : 0.0f;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

// VPT: 16-byte vectors per thread, kept in registers (a compile-time count so the array stays in registers).
template <int VPT>
static __global__ void __launch_bounds__(kMaxThreads)
    rmsnorm_forward_kernel(__nv_bfloat16* out, __nv_bfloat16* x, const __nv_bfloat16* add,
                           const __nv_bfloat16* weight, float* rstd, int vecs_per_row, float inv_dim, float eps) {
  __shared__ float scratch[32];
  const int64_t row_off = static_cast<int64_t>(blockIdx.x) * vecs_per_row;
  uint4* xr = reinterpret_cast<uint4*>(x) + row_off;
  uint4 v[VPT];  // the row slice as stored (bf16): 4 registers a vector, so even VPT = 8 stays in registers
  float sum_sq = 0.0f;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < vecs_per_row) {
      v[k] = xr[i];
      float f[kVec];
      unpack8(v[k], f);
      if (add != nullptr) {
        float d[kVec];
        unpack8(reinterpret_cast<const uint4*>(add)[row_off + i], d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) f[e] += d[e];
        v[k] = pack8(f);
        xr[i] = v[k];
        unpack8(v[k], f);  // continue with the rounded residual, the one stored
      }
#pragma unroll
      for (int e = 0; e < kVec; ++e) sum_sq += f[e] * f[e];
    }
  }
  const float r = rsqrtf(block_sum(sum_sq, scratch) * inv_dim + eps);
  if (rstd != nullptr && threadIdx.x == 0) rstd[blockIdx.x] = r;
  uint4* outr = reinterpret_cast<uint4*>(out) + row_off;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < vecs_per_row) {
      float f[kVec], w[kVec];
      unpack8(v[k], f);
      unpack8(reinterpret_cast<const uint4*>(weight)[i], w);
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = (f[e] * r) * w[e];  // HF's order: (x * rstd) * weight
      outr[i] = pack8(f);
    }
  }
}

void rmsnorm_forward(const RmsNormArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.rows >= 0, "rmsnorm_forward: rows {} is negative", a.rows);
  QKD_CHECK(a.dim > 0, "rmsnorm_forward: dim {} must be positive", a.dim);
  QKD_CHECK(a.eps >= 0.0f, "rmsnorm_forward: eps {} is negative", a.eps);
  QKD_CHECK(a.dim % kVec == 0, "rmsnorm_forward: dim {} is not a multiple of {} (16-byte accesses)", a.dim, kVec);
  QKD_CHECK(a.out != a.x || a.rows == 0, "rmsnorm_forward: out may not alias x (x is the residual stream)");
  for (const void* p : {static_cast<const void*>(a.out), static_cast<const void*>(a.x),
                        static_cast<const void*>(a.add), static_cast<const void*>(a.weight)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "rmsnorm_forward: pointer {} is not 16-byte aligned", p);
  }
  if (a.rows == 0) return;
  const int vecs = a.dim / kVec;
  const float inv_dim = 1.0f / static_cast<float>(a.dim);
  // The fewest vectors per thread that fit the row in one block: a decode step has a single row, and spreading
  // it over as many threads as possible keeps its latency down.
  auto launch = [&](auto vpt) {
    constexpr int VPT = decltype(vpt)::value;
    const int threads = ((vecs + VPT - 1) / VPT + 31) / 32 * 32;
    rmsnorm_forward_kernel<VPT><<<a.rows, threads, 0, stream>>>(a.out, a.x, a.add, a.weight, a.rstd, vecs,
                                                                inv_dim, a.eps);
    KERNEL_CHECK();
  };
  if (vecs <= kMaxThreads) {
    launch(std::integral_constant<int, 1>{});
  } else if (vecs <= 2 * kMaxThreads) {
    launch(std::integral_constant<int, 2>{});
  } else if (vecs <= 4 * kMaxThreads) {
    launch(std::integral_constant<int, 4>{});
  } else {
    QKD_CHECK(vecs <= 8 * kMaxThreads, "rmsnorm_forward: dim {} exceeds the largest supported width {}", a.dim,
              8 * kMaxThreads * kVec);
    launch(std::integral_constant<int, 8>{});
  }
}

}  // namespace qkd::cuda
