// CUDA AdamW step and sum of squares (kernels/adamw.h) on flat fp32 buffers.
//   g = grad_scale grad;  m = beta1 m + (1 - beta1) g;  v = beta2 v + (1 - beta2) g^2          (m, v updated)
//   p -= lr ((m / bc1) / (sqrt(v / bc2) + eps) + weight_decay p),  bc_i = 1 - beta_i^step      (p updated)
//   param_bf16 = bf16(p) when given;   out = sum x^2
// adamw: elementwise, 4 floats per thread and step (16-byte accesses) when every buffer allows it. Every
// operation is an _rn intrinsic (no fused multiply-add) or a correctly rounded division / sqrt, in the order
// the CPU twin (compiled with -ffp-contract=off) writes them, so the two give the same bits.
// sum_squares: kSumSquaresBlocks blocks over a grid-stride split that depends only on n, each thread summing in
// double (free next to the memory traffic, and the sum of billions of squares keeps its precision), one fp32
// partial per block in `scratch`, then one block that adds the partials in a fixed tree: the same bits every run.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include <cuda_bf16.h>

#include "kernels/adamw.h"
#include "kernels/block_reduce.cuh"
#include "kernels/cuda_check.h"

namespace qkd::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1 << 14;  // grid-stride beyond this
constexpr int kSumThreads = 256;
constexpr int kFinalThreads = 1024;

struct AdamWConsts {
  float lr, beta1, beta2, one_minus_beta1, one_minus_beta2, bc1, bc2, eps, weight_decay, grad_scale;
};

// One element; returns the new parameter and updates m, v.
__device__ __forceinline__ float adamw_element(float p, float grad, float& m, float& v, const AdamWConsts& c) {
  const float g = __fmul_rn(c.grad_scale, grad);
  m = __fadd_rn(__fmul_rn(c.beta1, m), __fmul_rn(c.one_minus_beta1, g));
  v = __fadd_rn(__fmul_rn(c.beta2, v), __fmul_rn(c.one_minus_beta2, __fmul_rn(g, g)));
  const float m_hat = __fdiv_rn(m, c.bc1);
  const float v_hat = __fdiv_rn(v, c.bc2);
  const float update = __fadd_rn(__fdiv_rn(m_hat, __fadd_rn(__fsqrt_rn(v_hat), c.eps)), __fmul_rn(c.weight_decay, p));
  return __fsub_rn(p, __fmul_rn(c.lr, update));
}

bool aligned(const void* p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

int blocks_for(int64_t work, int threads) {
  return static_cast<int>(std::clamp<int64_t>((work + threads - 1) / threads, 1, kMaxBlocks));
}

}  // namespace

// ------------------------------------------------------------------------------------------------------ adamw

// VEC: elements [0, n4 * 4) as float4 (bf16 copy as 4 bf16 in 8 bytes); the scalar loop takes the rest, from
// n4 * 4 (all of it when !VEC, where n4 = 0).
template <bool VEC>
static __global__ void __launch_bounds__(kThreads)
    adamw_kernel(float* param, __nv_bfloat16* param_bf16, float* m, float* v, const float* grad, int64_t n, int64_t n4,
                 AdamWConsts c) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  if constexpr (VEC) {
    for (int64_t i = tid; i < n4; i += stride) {
      float4 p = reinterpret_cast<float4*>(param)[i];
      float4 mm = reinterpret_cast<float4*>(m)[i];
      float4 vv = reinterpret_cast<float4*>(v)[i];
      const float4 g = reinterpret_cast<const float4*>(grad)[i];
      p.x = adamw_element(p.x, g.x, mm.x, vv.x, c);
      p.y = adamw_element(p.y, g.y, mm.y, vv.y, c);
      p.z = adamw_element(p.z, g.z, mm.z, vv.z, c);
      p.w = adamw_element(p.w, g.w, mm.w, vv.w, c);
      reinterpret_cast<float4*>(param)[i] = p;
      reinterpret_cast<float4*>(m)[i] = mm;
      reinterpret_cast<float4*>(v)[i] = vv;
      if (param_bf16 != nullptr) {
        __nv_bfloat162 h[2] = {__floats2bfloat162_rn(p.x, p.y), __floats2bfloat162_rn(p.z, p.w)};
        reinterpret_cast<uint2*>(param_bf16)[i] = *reinterpret_cast<const uint2*>(h);
      }
    }
  }
  for (int64_t i = n4 * 4 + tid; i < n; i += stride) {
    float mi = m[i], vi = v[i];
    const float p = adamw_element(param[i], grad[i], mi, vi, c);
    param[i] = p;
    m[i] = mi;
    v[i] = vi;
    if (param_bf16 != nullptr) param_bf16[i] = __float2bfloat16_rn(p);
  }
}

void adamw_update(const AdamWArgs& a, cudaStream_t stream) {
  QKD_CHECK(a.n >= 0, "adamw_update: n {} is negative", a.n);
  QKD_CHECK(a.step >= 1, "adamw_update: step {} must be >= 1 (the bias corrections are 1-based)", a.step);
  QKD_CHECK(a.beta1 >= 0.0f && a.beta1 < 1.0f && a.beta2 >= 0.0f && a.beta2 < 1.0f,
            "adamw_update: beta1 {} and beta2 {} must lie in [0, 1)", a.beta1, a.beta2);
  QKD_CHECK(a.eps > 0.0f, "adamw_update: eps {} must be positive", a.eps);
  if (a.n == 0) return;
  QKD_CHECK(a.param != nullptr && a.m != nullptr && a.v != nullptr && a.grad != nullptr,
            "adamw_update: param {}, m {}, v {} and grad {} must not be null", static_cast<const void*>(a.param),
            static_cast<const void*>(a.m), static_cast<const void*>(a.v), static_cast<const void*>(a.grad));
  AdamWConsts c;
  c.lr = a.lr;
  c.beta1 = a.beta1;
  c.beta2 = a.beta2;
  c.one_minus_beta1 = 1.0f - a.beta1;
  c.one_minus_beta2 = 1.0f - a.beta2;
  // The same expressions as cpu::adamw_update: double, rounded once.
  c.bc1 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta1), static_cast<double>(a.step)));
  c.bc2 = static_cast<float>(1.0 - std::pow(static_cast<double>(a.beta2), static_cast<double>(a.step)));
  c.eps = a.eps;
  c.weight_decay = a.weight_decay;
  c.grad_scale = a.grad_scale;
  const bool vec = aligned(a.param, 16) && aligned(a.m, 16) && aligned(a.v, 16) && aligned(a.grad, 16) &&
                   (a.param_bf16 == nullptr || aligned(a.param_bf16, 8));
  if (vec) {
    const int64_t n4 = a.n / 4;
    adamw_kernel<true><<<blocks_for(std::max<int64_t>(n4, 1), kThreads), kThreads, 0, stream>>>(
        a.param, a.param_bf16, a.m, a.v, a.grad, a.n, n4, c);
  } else {
    adamw_kernel<false><<<blocks_for(a.n, kThreads), kThreads, 0, stream>>>(a.param, a.param_bf16, a.m, a.v, a.grad,
                                                                            a.n, 0, c);
  }
  KERNEL_CHECK();
}

// ----------------------------------------------------------------------------------------------- sum_squares

// Block b's partial: threads take float4s (when x is 16-byte aligned) in a grid stride, then the scalar tail.
static __global__ void __launch_bounds__(kSumThreads)
    sum_squares_partial_kernel(float* partial, const float* x, int64_t n, int64_t n4) {
  __shared__ double s_red[32];
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  double acc = 0.0;
  for (int64_t i = tid; i < n4; i += stride) {
    const float4 f = reinterpret_cast<const float4*>(x)[i];
    acc += static_cast<double>(f.x) * f.x + static_cast<double>(f.y) * f.y + static_cast<double>(f.z) * f.z +
           static_cast<double>(f.w) * f.w;
  }
  for (int64_t i = n4 * 4 + tid; i < n; i += stride) acc += static_cast<double>(x[i]) * x[i];
  const double total = block_sum(acc, s_red);
  if (threadIdx.x == 0) partial[blockIdx.x] = static_cast<float>(total);
}

static __global__ void __launch_bounds__(kFinalThreads)
    sum_squares_final_kernel(float* out, const float* partial, int count) {
  __shared__ double s_red[32];
  double acc = 0.0;
  for (int i = threadIdx.x; i < count; i += blockDim.x) acc += partial[i];
  const double total = block_sum(acc, s_red);
  if (threadIdx.x == 0) *out = static_cast<float>(total);
}

void sum_squares(const SumSquaresArgs& a, cudaStream_t stream) {
  QKD_CHECK(a.n >= 0, "sum_squares: n {} is negative", a.n);
  QKD_CHECK(a.out != nullptr && a.scratch != nullptr,
            "sum_squares: out {} and scratch {} ([kSumSquaresBlocks] = {} floats) must not be null",
            static_cast<const void*>(a.out), static_cast<const void*>(a.scratch), kSumSquaresBlocks);
  QKD_CHECK(a.x != nullptr || a.n == 0, "sum_squares: x is null");
  const int64_t n4 = aligned(a.x, 16) ? a.n / 4 : 0;
  sum_squares_partial_kernel<<<kSumSquaresBlocks, kSumThreads, 0, stream>>>(a.scratch, a.x, a.n, n4);
  KERNEL_CHECK();
  sum_squares_final_kernel<<<1, kFinalThreads, 0, stream>>>(a.out, a.scratch, kSumSquaresBlocks);
  KERNEL_CHECK();
}

}  // namespace qkd::cuda
