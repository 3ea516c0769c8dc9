// CUDA RMSNorm fused with the residual add (kernels/rmsnorm.h), bf16 storage, fp32 math.
//   if add:  x += add                                   (x updated in place: the residual stream)
//   out = x * rsqrt(mean(x^2) + eps) * weight           (out overwritten; may not alias x)
//   rstd[r] = rsqrt(mean(x[r]^2) + eps)                 (written when rstd != nullptr)
// One block per row. Each thread keeps its slice of the row in registers between the sum of squares and the
// scaling, so x is read once and written at most twice (x, out): the op is a single pass over memory. The
// updated residual is rounded to bf16 before it is squared, so out normalises exactly the x the next layer reads.
//
// backward, with n = x * rstd and g = dout * weight:
//   dx[r]   += rstd * (g - n * mean(g * n))         (accumulates)
//   dweight += sum_r dout[r] * n[r]                 (accumulates in fp32, when dweight != nullptr)
// A fixed number of blocks (kBackwardBlocks, or rows if fewer) each walk rows blockIdx.x, blockIdx.x + gridDim.x,
// ...; a thread owns the same columns in every row, so it sums its columns' dweight terms in registers and the
// block writes one partial row to scratch. A second kernel adds the partials in block order into dweight. No
// atomics anywhere, so dweight has the same bits on every run.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include <cuda_bf16.h>

#include "kernels/bf16x8.cuh"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_check.h"
#include "kernels/rmsnorm.h"

namespace qkd::cuda {

namespace {

constexpr int kVec = kBf16x8;  // bf16 per 16-byte access
constexpr int kMaxThreads = 1024;

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
      bf16x8_to_float(v[k], f);
      if (add != nullptr) {
        float d[kVec];
        bf16x8_to_float(reinterpret_cast<const uint4*>(add)[row_off + i], d);
#pragma unroll
        for (int e = 0; e < kVec; ++e) f[e] += d[e];
        v[k] = float_to_bf16x8(f);
        xr[i] = v[k];
        bf16x8_to_float(v[k], f);  // continue with the rounded residual, the one stored
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
      bf16x8_to_float(v[k], f);
      bf16x8_to_float(reinterpret_cast<const uint4*>(weight)[i], w);
#pragma unroll
      for (int e = 0; e < kVec; ++e) f[e] = (f[e] * r) * w[e];  // HF's order: (x * rstd) * weight
      outr[i] = float_to_bf16x8(f);
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

// ---------------------------------------------------------------------------------------------------- backward

namespace {

// Threads per backward block, at most: 256 threads x 8 vectors cover a 16384-wide row, past any LLaMA width.
// Beyond one vector per thread each thread keeps VPT raw dout/x vectors and VPT x 8 dweight sums in registers,
// and 256 threads leave room for the 160 registers that VPT = 8 needs.
constexpr int kBackwardThreads = 256;
constexpr int kBackwardMaxVpt = 8;
// Blocks of the backward: about 4 resident per H100 SM at 256 threads, enough rows in flight to keep HBM busy.
// A constant, not the device's SM count, so the partial sums (and dweight's bits) are the same on every GPU.
constexpr int kBackwardBlocks = 512;
// dweight reduction: a block sums 32 columns (one warp-wide, coalesced row segment) over the partials in
// kReduceSlices interleaved slices, then combines the slices in slice order.
constexpr int kReduceSlices = 8;

int backward_blocks(int rows) { return std::min(rows, kBackwardBlocks); }

}  // namespace

template <int VPT>
static __global__ void __launch_bounds__(kBackwardThreads)
    rmsnorm_backward_kernel(__nv_bfloat16* dx, float* partial, const __nv_bfloat16* dout, const __nv_bfloat16* x,
                            const __nv_bfloat16* weight, const float* rstd, int rows, int vecs_per_row,
                            float inv_dim) {
  __shared__ float scratch[32];
  float dw[VPT][kVec];  // this thread's columns' sum over the block's rows of dout * n
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
#pragma unroll
    for (int e = 0; e < kVec; ++e) dw[k][e] = 0.0f;
  }
  const uint4* w4 = reinterpret_cast<const uint4*>(weight);
  for (int r = blockIdx.x; r < rows; r += gridDim.x) {
    const int64_t row_off = static_cast<int64_t>(r) * vecs_per_row;
    const float rs = rstd[r];
    uint4 dov[VPT], xv[VPT];  // the row slice as stored, kept for the second pass
    float gn = 0.0f;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < vecs_per_row) {
        dov[k] = reinterpret_cast<const uint4*>(dout)[row_off + i];
        xv[k] = reinterpret_cast<const uint4*>(x)[row_off + i];
        float d[kVec], xf[kVec], w[kVec];
        bf16x8_to_float(dov[k], d);
        bf16x8_to_float(xv[k], xf);
        bf16x8_to_float(w4[i], w);
#pragma unroll
        for (int e = 0; e < kVec; ++e) gn += (d[e] * w[e]) * (xf[e] * rs);
      }
    }
    const float mean_gn = block_sum(gn, scratch) * inv_dim;  // its trailing barrier frees scratch for the next row
    uint4* dxr = reinterpret_cast<uint4*>(dx) + row_off;
#pragma unroll
    for (int k = 0; k < VPT; ++k) {
      const int i = threadIdx.x + k * blockDim.x;
      if (i < vecs_per_row) {
        float d[kVec], xf[kVec], w[kVec], g[kVec];
        bf16x8_to_float(dov[k], d);
        bf16x8_to_float(xv[k], xf);
        bf16x8_to_float(w4[i], w);
        bf16x8_to_float(dxr[i], g);
#pragma unroll
        for (int e = 0; e < kVec; ++e) {
          const float n = xf[e] * rs;
          g[e] += rs * (d[e] * w[e] - n * mean_gn);
          dw[k][e] += d[e] * n;
        }
        dxr[i] = float_to_bf16x8(g);
      }
    }
  }
  if (partial == nullptr) return;
  float* part = partial + static_cast<int64_t>(blockIdx.x) * vecs_per_row * kVec;
#pragma unroll
  for (int k = 0; k < VPT; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < vecs_per_row) {
      float4* p = reinterpret_cast<float4*>(part + i * kVec);
      p[0] = make_float4(dw[k][0], dw[k][1], dw[k][2], dw[k][3]);
      p[1] = make_float4(dw[k][4], dw[k][5], dw[k][6], dw[k][7]);
    }
  }
}

// dweight[c] += sum over blocks p (in order within each slice, slices in order) of partial[p, c].
static __global__ void __launch_bounds__(32 * kReduceSlices)
    rmsnorm_dweight_reduce_kernel(float* dweight, const float* partial, int n_partials, int dim) {
  __shared__ float slice_sum[kReduceSlices][32];
  const int lane = threadIdx.x % 32, slice = threadIdx.x / 32;
  const int c = blockIdx.x * 32 + lane;
  float s = 0.0f;
  if (c < dim) {
    for (int p = slice; p < n_partials; p += kReduceSlices) s += partial[static_cast<int64_t>(p) * dim + c];
  }
  slice_sum[slice][lane] = s;
  __syncthreads();
  if (slice == 0 && c < dim) {
    float total = slice_sum[0][lane];
#pragma unroll
    for (int k = 1; k < kReduceSlices; ++k) total += slice_sum[k][lane];
    dweight[c] += total;
  }
}

int64_t rmsnorm_backward_scratch_floats(int rows, int dim) {
  if (rows <= 0 || dim <= 0) return 0;
  return static_cast<int64_t>(backward_blocks(rows)) * dim;
}

void rmsnorm_backward(const RmsNormBackwardArgs<__nv_bfloat16>& a, cudaStream_t stream) {
  QKD_CHECK(a.rows >= 0, "rmsnorm_backward: rows {} is negative", a.rows);
  QKD_CHECK(a.dim > 0, "rmsnorm_backward: dim {} must be positive", a.dim);
  QKD_CHECK(a.dim % kVec == 0, "rmsnorm_backward: dim {} is not a multiple of {} (16-byte accesses)", a.dim, kVec);
  const int vecs = a.dim / kVec;
  QKD_CHECK(vecs <= kBackwardMaxVpt * kBackwardThreads,
            "rmsnorm_backward: dim {} exceeds the largest supported width {}", a.dim,
            kBackwardMaxVpt * kBackwardThreads * kVec);
  for (const void* p : {static_cast<const void*>(a.dx), static_cast<const void*>(a.dout),
                        static_cast<const void*>(a.x), static_cast<const void*>(a.weight),
                        static_cast<const void*>(a.scratch)}) {
    QKD_CHECK(reinterpret_cast<uintptr_t>(p) % 16 == 0, "rmsnorm_backward: pointer {} is not 16-byte aligned", p);
  }
  if (a.rows == 0) return;
  QKD_CHECK(a.dx != nullptr && a.dout != nullptr && a.x != nullptr && a.weight != nullptr && a.rstd != nullptr,
            "rmsnorm_backward: dx, dout, x, weight and rstd must all be given");
  QKD_CHECK(a.dweight == nullptr || a.scratch != nullptr,
            "rmsnorm_backward: dweight needs scratch of rmsnorm_backward_scratch_floats({}, {}) = {} floats", a.rows,
            a.dim, rmsnorm_backward_scratch_floats(a.rows, a.dim));
  const int blocks = backward_blocks(a.rows);
  float* partial = a.dweight != nullptr ? a.scratch : nullptr;
  const float inv_dim = 1.0f / static_cast<float>(a.dim);
  auto launch = [&](auto vpt) {
    constexpr int VPT = decltype(vpt)::value;
    const int threads = std::min(kBackwardThreads, ((vecs + VPT - 1) / VPT + 31) / 32 * 32);
    rmsnorm_backward_kernel<VPT><<<blocks, threads, 0, stream>>>(a.dx, partial, a.dout, a.x, a.weight, a.rstd,
                                                                 a.rows, vecs, inv_dim);
    KERNEL_CHECK();
  };
  if (vecs <= kBackwardThreads) {
    launch(std::integral_constant<int, 1>{});
  } else if (vecs <= 2 * kBackwardThreads) {
    launch(std::integral_constant<int, 2>{});
  } else if (vecs <= 4 * kBackwardThreads) {
    launch(std::integral_constant<int, 4>{});
  } else {
    launch(std::integral_constant<int, 8>{});
  }
  if (a.dweight != nullptr) {
    rmsnorm_dweight_reduce_kernel<<<(a.dim + 31) / 32, 32 * kReduceSlices, 0, stream>>>(a.dweight, a.scratch, blocks,
                                                                                      a.dim);
    KERNEL_CHECK();
  }
}

}  // namespace qkd::cuda
