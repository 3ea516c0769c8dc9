// CUDA row-wise L2 normalisation (kernels/l2norm.h), bf16 storage, fp32 math.
//   forward:   norm[r] = max(||x[r]||, eps);  out[r] = x[r] / norm[r]                      (both overwritten)
//   backward:  dx[r] += (dout[r] - out[r] (dout[r] . out[r])) / norm[r],  or dout[r] / eps where ||x[r]|| < eps
// One block per row, 8 values (16 bytes) per thread and step, two sweeps over the row (a reduction, then the
// elementwise part; the second sweep's reads hit L1/L2). The backward recomputes ||x|| with the forward's exact
// summation (same thread layout, explicit fma, same block tree), so it takes the clamped branch for exactly the
// rows whose forward did.
#include <algorithm>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/bf16x8.cuh"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_check.h"
#include "kernels/l2norm.h"

namespace qkd::cuda {

namespace {

constexpr int kMaxThreads = 1024;

__device__ __forceinline__ uint4 load_vec(const __nv_bfloat16* row, int vi) {
  return reinterpret_cast<const uint4*>(row)[vi];
}

// sum of squares of one row: the forward and the backward must get the same bits (the clamped-row decision).
__device__ __forceinline__ float row_sum_sq(const __nv_bfloat16* x, int vecs, float* scratch) {
  float acc = 0.0f;
  for (int vi = threadIdx.x; vi < vecs; vi += blockDim.x) {
    float f[kBf16x8];
    bf16x8_to_float(load_vec(x, vi), f);
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) acc = __fmaf_rn(f[j], f[j], acc);
  }
  return block_sum(acc, scratch);
}

int threads_for(int dim) { return std::min(kMaxThreads, (dim / kBf16x8 + 31) / 32 * 32); }

void check(int rows, int dim, float eps, const void* const* ptrs, int n_ptrs, const char* what) {
  QKD_CHECK(rows >= 0, "{}: rows {} is negative", what, rows);
  QKD_CHECK(dim > 0 && dim % kBf16x8 == 0, "{}: dim {} must be a positive multiple of {} (16-byte accesses)", what,
            dim, kBf16x8);
  QKD_CHECK(eps > 0.0f, "{}: eps {} must be positive", what, eps);
  for (int i = 0; i < n_ptrs; ++i) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(ptrs[i]) % 16 == 0, "{}: pointer {} is not 16-byte aligned", what,
              ptrs[i]);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------------- forward

static __global__ void __launch_bounds__(kMaxThreads)
    l2norm_forward_kernel(__nv_bfloat16* out, float* norm, const __nv_bfloat16* x, int dim, float eps) {
  __shared__ float s_red[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * dim;
  const int vecs = dim / kBf16x8;
  const float n = fmaxf(sqrtf(row_sum_sq(x + off, vecs, s_red)), eps);
  const float inv = 1.0f / n;
  if (threadIdx.x == 0) norm[blockIdx.x] = n;
  for (int vi = threadIdx.x; vi < vecs; vi += blockDim.x) {
    float f[kBf16x8];
    bf16x8_to_float(load_vec(x + off, vi), f);
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) f[j] *= inv;
    reinterpret_cast<uint4*>(out + off)[vi] = float_to_bf16x8(f);
  }
}

void l2norm_forward(const L2NormArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  const void* ptrs[] = {a.out, a.x};
  check(a.rows, a.dim, a.eps, ptrs, 2, "l2norm_forward");
  if (a.rows == 0) return;
  l2norm_forward_kernel<<<a.rows, threads_for(a.dim), 0, stream>>>(a.out, a.norm, a.x, a.dim, a.eps);
  KERNEL_CHECK();
}

// --------------------------------------------------------------------------------------------------- backward

static __global__ void __launch_bounds__(kMaxThreads)
    l2norm_backward_kernel(__nv_bfloat16* dx, const __nv_bfloat16* dout, const __nv_bfloat16* out, const float* norm,
                           const __nv_bfloat16* x, int dim, float eps) {
  __shared__ float s_red[32];
  const int64_t off = static_cast<int64_t>(blockIdx.x) * dim;
  const int vecs = dim / kBf16x8;
  const bool clamped = sqrtf(row_sum_sq(x + off, vecs, s_red)) < eps;
  float dot = 0.0f;
  if (!clamped) {  // block-uniform
    for (int vi = threadIdx.x; vi < vecs; vi += blockDim.x) {
      float g[kBf16x8], o[kBf16x8];
      bf16x8_to_float(load_vec(dout + off, vi), g);
      bf16x8_to_float(load_vec(out + off, vi), o);
#pragma unroll
      for (int j = 0; j < kBf16x8; ++j) dot += g[j] * o[j];
    }
    dot = block_sum(dot, s_red);
  }
  const float inv = clamped ? 1.0f / eps : 1.0f / norm[blockIdx.x];
  for (int vi = threadIdx.x; vi < vecs; vi += blockDim.x) {
    float g[kBf16x8], o[kBf16x8], d[kBf16x8];
    bf16x8_to_float(load_vec(dout + off, vi), g);
    bf16x8_to_float(load_vec(out + off, vi), o);
    bf16x8_to_float(load_vec(dx + off, vi), d);
#pragma unroll
    for (int j = 0; j < kBf16x8; ++j) d[j] += (clamped ? g[j] : g[j] - o[j] * dot) * inv;
    reinterpret_cast<uint4*>(dx + off)[vi] = float_to_bf16x8(d);
  }
}

void l2norm_backward(const L2NormBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  const void* ptrs[] = {a.dx, a.dout, a.out, a.x};
  check(a.rows, a.dim, a.eps, ptrs, 4, "l2norm_backward");
  if (a.rows == 0) return;
  l2norm_backward_kernel<<<a.rows, threads_for(a.dim), 0, stream>>>(a.dx, a.dout, a.out, a.norm, a.x, a.dim,
                                                                     a.eps);
  KERNEL_CHECK();
}

}  // namespace qkd::cuda
